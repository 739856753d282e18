"""The OpenAI API's shapes for pipelines/serve.py: a request body checked and turned into a `Job`
(or an `ApiError` carrying the HTTP status and OpenAI's error object), and the responses, stream
chunks and model list built. No Ray and no model code here: what a request means is decided here,
how it is generated is tasks/generation.py.

    job = chat_job(body, models)        # POST /v1/chat/completions
    job = completion_job(body, models)  # POST /v1/completions
    response(job, text, finish, completion_tokens) / chunk(job, text, finish) / usage_chunk(...) / model_list(models)
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tasks.generation import LoadedModel, Sampling, chat_prompt, text_prompt

ROLES = ("system", "user", "assistant")
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "stop": (None, "", []), "logprobs": (None, False),
           "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "tools": (None, []),
           "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {})}
"""Options this server does not implement, with the values that ask for nothing: any other value is a 400."""
DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """A request that cannot be served: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request, ready to decode."""

    kind: str
    """'chat' or 'completion'."""
    model_id: str
    prompt_ids: list[int]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    cancelled: bool = False
    """Set when the client went away: the decoding loop drops the row."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def chosen_model(body: dict, models: dict[str, LoadedModel]) -> LoadedModel:
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' is required: one of the ids GET /v1/models lists", param="model")
    if name not in models:
        raise ApiError(404, f"The model `{name}` does not exist; this server has {', '.join(sorted(models))}",
                       param="model", code="model_not_found")
    return models[name]


def check_supported(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        if name in body and not any(body[name] == value and type(body[name]) is type(value) for value in neutral):
            raise ApiError(400, f"'{name}' is not supported by this server (leave it out or at its default)", param=name)


def number(body: dict, name: str, default, low: float, high: float, kind=float, open_low: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
            not (low < value if open_low else low <= value) or value > high:
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'} in {bounds}; "
                            f"got {value!r}", param=name)
    return kind(value)


def sampling_of(body: dict, model: LoadedModel, prompt_tokens: int, prompt_param: str) -> Sampling:
    """Sampling from the request, its token budget checked against the model's context. Chat requests
    may name the budget max_completion_tokens (OpenAI's newer name) or max_tokens."""
    room = model.context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {model.context} tokens; the prompt has "
                            f"{prompt_tokens}", param=prompt_param, code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, name, None, 1, 1 << 30, kind=int)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"'{name}' is too large: {max_tokens} generated tokens after a prompt of "
                            f"{prompt_tokens} exceed this model's context of {model.context}; give at most {room}",
                       param=name, code="context_length_exceeded")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
        raise ApiError(400, f"'seed' must be an integer in [0, 2**63); got {seed!r}", param="seed")
    return Sampling(max_tokens or min(model.default_max_new_tokens, room),
                    temperature=number(body, "temperature", 1.0, 0, 2),
                    top_p=number(body, "top_p", 1.0, 0, 1, open_low=True),
                    top_k=number(body, "top_k", 0, 0, 1 << 20, kind=int), seed=seed)


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be true or false and 'stream_options' an object", param="stream")
    return stream, stream and bool(options.get("include_usage"))


def message_text(message, index: int) -> dict:
    """{role, content} of one chat message; content parts of type text are joined."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"messages[{index}] must be an object with a role in {ROLES}", param="messages")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be text", param="messages")
    return {"role": message["role"], "content": content}


def chat_job(body: dict, models: dict[str, LoadedModel]) -> Job:
    model = chosen_model(body, models)
    check_supported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = [message_text(m, i) for i, m in enumerate(messages)]
    if not model.tokenizer.chat_template:
        raise ApiError(400, f"the model `{model.spec.id}` has no chat template (it was not trained on "
                            f"conversations); use /v1/completions", param="model")
    prompt = chat_prompt(model.tokenizer, messages)
    stream, include_usage = stream_flags(body)
    return Job("chat", model.spec.id, prompt, sampling_of(body, model, len(prompt), "messages"),
               stream, include_usage)


def completion_job(body: dict, models: dict[str, LoadedModel]) -> Job:
    model = chosen_model(body, models)
    check_supported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    ids = text_prompt(model.tokenizer, prompt)
    if not ids:
        raise ApiError(400, "'prompt' is empty: there is nothing to continue", param="prompt")
    stream, include_usage = stream_flags(body)
    return Job("completion", model.spec.id, ids, sampling_of(body, model, len(ids), "prompt"), stream,
               include_usage)


def usage(job: Job, completion_tokens: int) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def envelope(job: Job, chunked: bool) -> dict:
    kind = {"chat": "chat.completion", "completion": "text_completion"}[job.kind]
    prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
    return {"id": f"{prefix}-{job.id}", "object": kind + (".chunk" if chunked and job.kind == "chat" else ""),
            "created": job.created, "model": job.model_id}


def response(job: Job, text: str, finish: str | None, completion_tokens: int) -> dict:
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**envelope(job, False), "choices": [choice], "usage": usage(job, completion_tokens)}


def chunk(job: Job, text: str | None, finish: str | None = None, role: bool = False) -> str:
    """One server-sent event of a stream: new text, or (text None) the end with its finish reason."""
    if job.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return event({**envelope(job, True), "choices": [choice]})


def usage_chunk(job: Job, completion_tokens: int) -> str:
    """The last event when the client asked for stream_options.include_usage (no choices, as OpenAI sends it)."""
    return event({**envelope(job, True), "choices": [], "usage": usage(job, completion_tokens)})


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def model_list(models: dict[str, LoadedModel]) -> dict:
    """GET /v1/models: each model's id, and where it comes from (run id, step, fingerprint)."""
    return {"object": "list", "data": [
        {"id": m.spec.id, "object": "model", "created": 0, "owned_by": "lmforge", "run_id": m.spec.run_id,
         "step": m.spec.step, "fingerprint": m.spec.fingerprint, "context_length": m.context,
         "chat": bool(m.tokenizer.chat_template)}
        for m in models.values()]}
