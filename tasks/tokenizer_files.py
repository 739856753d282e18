"""An existing tokenizer reused from `tokenizer.path` instead of training one: its files, their
digest (the tokenize step's fingerprint uses the bytes, not the path), and loading it with its
special tokens resolved.

`tokenizer.path` is a directory saved by `save_pretrained` (it needs tokenizer.json, the fast
tokenizer; tokenizer_config.json / special_tokens_map.json name its special tokens) or a
tokenizer.json file. The tokenizer's own eos/pad/bos come first; `tokenizer.eos_token` etc. fill
in those it lacks when they are in its vocabulary. EOS (it ends every document) and pad are required.

    load(cfg: TokenizerConfig) -> PreTrainedTokenizerFast
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from conf.schema import TokenizerConfig
from tasks.common import UserError, file_digest, first_line

# What `PreTrainedTokenizerFast.from_pretrained` reads from a directory (tokenizer.json required)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
REQUIRED_ROLES = ("eos", "pad")


def tokenizer_files(path: str) -> dict[str, Path]:
    """The files that make up the tokenizer at tokenizer.path, by file name."""
    source = Path(path).expanduser()
    if source.is_file():
        return {"tokenizer.json": source}
    if not source.is_dir():
        raise UserError(f"tokenizer.path: '{path}' does not exist")
    files = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    if "tokenizer.json" not in files:
        raise UserError(f"tokenizer.path: no tokenizer.json in '{path}' (a fast tokenizer saved by save_pretrained)")
    return files


def files_digest(path: str) -> str:
    """Hash of the tokenizer files' names and bytes: a changed file reruns tokenize, a moved one does not."""
    try:
        parts = [f"{name}:{file_digest(file)}" for name, file in sorted(tokenizer_files(path).items())]
    except OSError as error:
        raise UserError(f"tokenizer.path: cannot read '{path}' ({error.strerror or error})") from None
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def load(cfg: TokenizerConfig):
    """The tokenizer at cfg.path with eos, pad (required) and bos set; a UserError naming tokenizer.path
    when it cannot be read or lacks a required token."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = tokenizer_files(cfg.path)["tokenizer.json"]
    source = Path(cfg.path).expanduser()
    try:
        if source.is_dir():  # the generic class: a tokenizer_class or auto_map in its config runs no code
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=True)
        else:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    except Exception as error:  # tokenizers reports a malformed file as a bare Exception
        raise UserError(f"tokenizer.path: cannot load '{cfg.path}' ({first_line(error)})") from None
    fill_special_tokens(tokenizer, cfg)
    return tokenizer


def fill_special_tokens(tokenizer, cfg: TokenizerConfig) -> None:
    """Set eos/pad/bos the tokenizer lacks from cfg's names that are in its vocabulary."""
    vocab = tokenizer.get_vocab()
    for role in ("eos", "pad", "bos"):
        name = getattr(cfg, f"{role}_token")
        if getattr(tokenizer, f"{role}_token") is None and name in vocab:
            setattr(tokenizer, f"{role}_token", name)
    missing = [role for role in REQUIRED_ROLES if getattr(tokenizer, f"{role}_token") is None]
    if missing:
        names = ", ".join(f"tokenizer.{role}_token '{getattr(cfg, f'{role}_token')}'" for role in missing)
        hint = f" (its EOS '{tokenizer.eos_token}' can pad)" if tokenizer.eos_token else ""
        raise UserError(f"tokenizer.path: the tokenizer in '{cfg.path}' has no {' and no '.join(missing)} token and "
                        f"{names} {'is' if len(missing) == 1 else 'are'} not in its vocabulary; set "
                        f"{'it' if len(missing) == 1 else 'them'} to one of its tokens{hint}")
