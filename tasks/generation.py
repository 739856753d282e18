"""Text generation from exported models, shared by the terminal chat (pipelines/chat.py) and the
OpenAI-compatible server (pipelines/serve.py): loading models (LoRA adapters of one base model share
one copy of its weights, the adapter chosen per request), prompts (the tokenizer's chat template, or
plain text), sampling, and a batched decoding loop over a KV cache that yields token by token.

    models = load_models([ModelSpec(...), ...])          # {model id: LoadedModel}
    decoder = Decoder(prompts, samplings, stop_ids, pad_id)   # rows that share one model
    with models[id].selected() as module:                 # callers serialise this (one adapter at a time)
        pieces = decoder.step(module)                     # per row (token, finish reason) or None once done
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.modelcard import generation_budget

FINISH_STOP, FINISH_LENGTH = "stop", "length"
MAX_TRUSTED_LENGTH = 1_000_000
"""A tokenizer's model_max_length above this is transformers' 'no limit' placeholder, not a trained length."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to load, and what names it: `id` is what a request or `--branch` selects."""

    id: str
    path: Path
    """A full model directory (config.json and weights), or with base_path a PEFT adapter directory."""
    base_path: Path | None = None
    """For an adapter: the pretrained model directory it applies to."""
    run_id: str = ""
    step: str = ""
    fingerprint: str = ""
    chat: bool | None = None
    """Whether it was trained on conversations (None: unknown; the tokenizer's chat template decides)."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: torch.nn.Module
    """The model, or the PeftModel that holds this model's adapter beside others of the same base."""
    adapter: str | None
    """This model's adapter in `module`; None: `module` with every adapter switched off (the base)."""
    tokenizer: object
    context: int
    """Most tokens of prompt + generated text: the model's positions, or the trained length where shorter."""
    default_max_new_tokens: int
    stop_ids: list[int] = field(default_factory=list)

    @contextlib.contextmanager
    def selected(self):
        """The module with this model's adapter active. Not thread-safe: hold the caller's lock."""
        if self.adapter is not None:
            self.module.set_adapter(self.adapter)
            yield self.module
        elif hasattr(self.module, "disable_adapter"):
            with self.module.disable_adapter():
                yield self.module
        else:
            yield self.module

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template by default."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return has_template if self.spec.chat is None else self.spec.chat and has_template


def load_models(specs: list[ModelSpec]) -> dict[str, LoadedModel]:
    """The models, in eval mode: adapters of the same base loaded into one PeftModel (the base itself,
    when also asked for, is that PeftModel with its adapters off); other full models on their own."""
    from peft import PeftModel

    from tasks.models import load_base_model, load_saved
    from tasks.training import quiet_frameworks

    quiet_frameworks()
    shared: dict[Path, PeftModel] = {}
    adapter_names: dict[str, str] = {}
    for index, spec in enumerate(s for s in specs if s.base_path is not None):
        name = adapter_names[spec.id] = f"adapter{index}"  # PEFT names become module keys: no dots
        if spec.base_path not in shared:
            shared[spec.base_path] = PeftModel.from_pretrained(load_base_model(spec.base_path), str(spec.path),
                                                               adapter_name=name)
        else:
            shared[spec.base_path].load_adapter(str(spec.path), adapter_name=name)
    loaded = {}
    for spec in specs:
        if spec.base_path is not None:
            module, adapter = shared[spec.base_path], adapter_names[spec.id]
        else:
            module = shared[spec.path] if spec.path in shared else load_saved(spec.path)
            adapter = None
        loaded[spec.id] = describe(spec, module.eval(), adapter)
    return loaded


def describe(spec: ModelSpec, module, adapter: str | None) -> LoadedModel:
    """The loaded model with its tokenizer (the spec's directory's: an adapter's carries its chat
    template), context, default token budget (generation_config.json's, within half the context, as
    the exports set it) and stop tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
    config = module.config
    trained = tokenizer.model_max_length if tokenizer.model_max_length < MAX_TRUSTED_LENGTH else None
    context = min(config.max_position_embeddings, trained or config.max_position_embeddings)
    default = generation_budget(config.max_position_embeddings, trained)
    configured = getattr(getattr(module, "generation_config", None), "max_new_tokens", None) or default
    return LoadedModel(spec, module, adapter, tokenizer, context, min(configured, default),
                       stop_token_ids(tokenizer))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every other special token but padding, BOS and unknown: a chat model that writes a role or
    end-of-turn tag (<|user|>, <|end|>) has finished its turn."""
    ids = {tokenizer.eos_token_id, *tokenizer.all_special_ids}
    return sorted(ids - {None, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id})


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def text_prompt(tokenizer, text: str) -> list[int]:
    """Plain text, encoded as pretraining encoded documents (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False)


def fit_conversation(tokenizer, messages: list[dict], room: int) -> tuple[list[dict], list[int]]:
    """The conversation and its prompt ids within `room` tokens: the oldest exchanges after the system
    message go first; if the newest message alone is still too long, the start of the prompt is cut."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    ids = chat_prompt(tokenizer, system + turns)
    while len(ids) > room and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user message and its answer together
        ids = chat_prompt(tokenizer, system + turns)
    return system + turns, ids[-room:]


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token. temperature 0: greedy (the most likely token)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()  # a fresh torch.Generator always starts from the same default seed
        else:
            generator.manual_seed(self.seed)
        return generator


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits: argmax, or a draw after temperature, top-k and top-p."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, sampling.top_k).values[-1], float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        beyond = probs.cumsum(-1) - probs > sampling.top_p  # the smallest set whose mass reaches top_p stays
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered.masked_fill(beyond, float("-inf")))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


class Decoder:
    """Rows that share one model, decoded together: the prompts left-padded, the whole prompts in the
    first forward pass, then one pass per step over each row's newest token with the KV cache. Each
    row samples its own way and stops at a stop token or its token budget; `cancel` ends a row early."""

    def __init__(self, prompts: list[list[int]], samplings: list[Sampling], stop_ids: list[int], pad_id: int):
        width = max(len(p) for p in prompts)
        self.input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        self.samplings, self.stop_ids, self.pad_id = samplings, set(stop_ids), pad_id
        self.generators = [s.generator() for s in samplings]
        self.produced = [0] * len(prompts)
        self.finished: list[str | None] = [None] * len(prompts)
        self.cache = None

    @property
    def done(self) -> bool:
        return all(self.finished)

    def cancel(self, row: int) -> None:
        self.finished[row] = self.finished[row] or "cancelled"

    @torch.no_grad()
    def step(self, module) -> list[tuple[int, str | None] | None]:
        """One token for every unfinished row: (token, finish reason or None); None for finished rows."""
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        if self.cache is not None:
            positions = positions[:, -1:]
        out = module(input_ids=self.input_ids, attention_mask=self.mask, position_ids=positions,
                     cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        logits = out.logits[:, -1].float()
        pieces, next_ids = [], []
        for row, sampling in enumerate(self.samplings):
            if self.finished[row]:
                pieces.append(None)
                next_ids.append(self.pad_id)  # a finished row still rides along; its output is ignored
                continue
            token = choose_token(logits[row], sampling, self.generators[row])
            self.produced[row] += 1
            if token in self.stop_ids:
                self.finished[row] = FINISH_STOP
            elif self.produced[row] >= sampling.max_new_tokens:
                self.finished[row] = FINISH_LENGTH
            pieces.append((token, self.finished[row]))
            next_ids.append(token)
        self.input_ids = torch.tensor(next_ids).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.input_ids)], dim=1)
        return pieces


class TextStream:
    """Token ids in, new text out: what decoding all ids so far adds to the text already given, held
    back while it ends in half a character (byte-level BPE splits UTF-8 sequences across tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._new(text)

    def flush(self) -> str:
        return self._new(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _new(self, text: str) -> str:
        new, self.sent = text[self.sent:], len(text)
        return new
