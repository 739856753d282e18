"""Secrets never reach MLflow, manifests, Hydra's run folder or the console; the values are replaced by '***'.
Fingerprints still use the real values. What is masked:

- any value under a key that names a secret (SECRET_KEY: passwords, secrets, credentials, api/access/private
  keys, and the tokens that grant access: `token`, `access_token`, `hf_token`, `api_token`, ...);
- under a key that only hints at one (SUSPICIOUS_KEY, e.g. `vendor_token`, `cache_key`), a value that looks random:
  one long word mixing letters and digits with high entropy;
- anywhere in text: the password inside a URL (`scheme://user:password@host`), a query parameter that names
  one (`?access_token=...`, `&sig=...`), and strings shaped like well-known tokens (Hugging Face `hf_...`,
  GitHub `ghp_...`, `sk-...` API keys, AWS `AKIA...` key ids, Slack, GitLab, Google keys, JWTs).

Counts and tokenizer settings whose names end in "token(s)" (eval.max_new_tokens, tokenizer.eos_token,
finetune.prefix.num_virtual_tokens, ...) are not secrets and stay visible.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

MASK = "***"
# Prefixes that make a "*_token" a credential (an access token of some service), not a vocabulary token
TOKEN_KINDS = ("access", "auth", "api", "bearer", "hf", "hub", "huggingface", "github", "gh", "gitlab", "oauth",
               "refresh", "session", "security", "id", "pat", "personal_access", "jwt", "slack", "wandb", "tracking",
               "databricks", "read", "write", "client", "service", "sas", "csrf", "npm", "pypi", "registry", "deploy")
KEY_KINDS = ("api", "access", "secret", "private", "signing", "encryption", "ssh", "master", "account", "client",
             "storage", "subscription", "license")
SECRET_KEY = re.compile(
    r"secret|passw(or)?d|passphrase|credential|^(tokens?|keys?)$|"
    rf"(^|[_.-])(({'|'.join(TOKEN_KINDS)})[_-]?tokens?|({'|'.join(KEY_KINDS)})[_-]?keys?([_-]?id)?)$",
    re.IGNORECASE)
SUSPICIOUS_KEY = re.compile(r"token|key|auth|sig|cred|pass|cookie|session|bearer", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@/\s]+@", re.IGNORECASE)
QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s]+)=)(?P<value>[^&;#\s'\"]+)")
SIGNATURE = re.compile(r"(^|[-_.])(sig|signature|auth|session|jwt|code)$", re.IGNORECASE)
TOKEN_SHAPES = re.compile(
    r"\b(hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|sk-[A-Za-z0-9_-]{20,}"
    r"|[rs]k_(live|test)_[A-Za-z0-9]{16,}|(AKIA|ASIA)[A-Z0-9]{16}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|glpat-[A-Za-z0-9_-]{20,}|AIza[A-Za-z0-9_-]{35}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})")
RANDOM_RUN = re.compile(r"[A-Za-z0-9+/=]{16,}")
MIN_ENTROPY_BITS = 3.3  # per character of a 16+ character run: words and identifiers stay below, random keys above


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def looks_random(value: str) -> bool:
    """One word (no spaces, not a path) with a run of 16+ letters and digits, both, as varied as a random key's."""
    if not value or any(c.isspace() for c in value) or value.startswith(("/", ".", "~")):
        return False
    return any(re.search(r"\d", run) and re.search(r"[A-Za-z]", run) and entropy_bits(run) >= MIN_ENTROPY_BITS
               for run in RANDOM_RUN.findall(value))


def entropy_bits(text: str) -> float:
    """Shannon entropy of the characters of text, in bits per character."""
    return -sum(n / len(text) * math.log2(n / len(text)) for n in Counter(text).values())


def is_secret(key: str, value: Any) -> bool:
    """Whether the value under this key (the last part of a dotted name) is masked whole."""
    if value is None:
        return False
    if is_secret_key(key):
        return True
    return isinstance(value, str) and bool(SUSPICIOUS_KEY.search(str(key))) and looks_random(value)


def redact_text(text: str) -> str:
    text = TOKEN_SHAPES.sub(MASK, text)
    text = URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return QUERY_PARAM.sub(lambda m: m.group("head") + (MASK if is_secret_key(m.group("name")) or
                                                          SIGNATURE.search(m.group("name")) else m.group("value")), text)


def redact_override(override: str) -> str:
    """A Hydra command-line override (`key=value`, `+key=value`) with its value masked when it is a secret
    (is_secret), and URL passwords, secret query parameters and token-shaped strings masked in any case."""
    key, sep, value = override.partition("=")
    if sep and is_secret(key.lstrip("+~").rsplit(".", 1)[-1], value):
        return f"{key}={MASK}"
    return redact_text(override)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with secrets masked."""
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v, key) for v in tree]
    if is_secret(key, tree):
        return MASK
    return redact_text(tree) if isinstance(tree, str) else tree
