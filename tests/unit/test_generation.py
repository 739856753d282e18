"""The pure pieces of generation and of the OpenAI API layer: token choice, conversation cutting,
streamed text, request checks (tasks/generation.py, pipelines/openai_api.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines import openai_api
from tasks.generation import LoadedModel, ModelSpec, Sampling, TextStream, choose_token, fit_conversation


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.integration.chat_serve_models import CHAT_TEMPLATE, readable_decoding
    from tests.conftest import save_tiny_model

    from transformers import AutoTokenizer

    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    readable_decoding(model_dir)
    loaded = AutoTokenizer.from_pretrained(str(model_dir))
    loaded.chat_template = CHAT_TEMPLATE
    return loaded


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert choose_token(logits, Sampling(4), None) == 1
    for sampling in (Sampling(4, temperature=1.5, top_k=1), Sampling(4, temperature=1.5, top_p=1e-6)):
        assert {choose_token(logits, sampling, sampling.generator()) for _ in range(20)} == {1}


def test_sampling_keeps_to_top_k_and_repeats_with_a_seed():
    logits = torch.zeros(50)
    logits[[7, 30]] = 1.0
    sampling = Sampling(4, temperature=1.0, top_k=2, seed=3)
    generator = sampling.generator()
    draws = [choose_token(logits, sampling, generator) for _ in range(100)]
    assert set(draws) == {7, 30}
    again = sampling.generator()
    assert [choose_token(logits, sampling, again) for _ in range(100)] == draws
    unseeded = Sampling(4, temperature=1.0)
    assert [choose_token(torch.zeros(1000), unseeded, unseeded.generator()) for _ in range(3)] != \
        [choose_token(torch.zeros(1000), unseeded, unseeded.generator()) for _ in range(3)]


def test_a_long_conversation_loses_its_oldest_exchanges_first(tokenizer):
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": role, "content": f"question {i} answer {i * 7}"} for i in range(12)
             for role in ("user", "assistant")] + [{"role": "user", "content": "question 99"}]
    kept, ids = fit_conversation(tokenizer, [system, *turns], room=60)
    assert len(ids) <= 60 and kept[0] == system and kept[-1] == turns[-1]
    assert kept[1:] == turns[-(len(kept) - 1):] and len(kept) < len(turns)
    assert kept[1]["role"] == "user"  # exchanges go whole
    alone, ids = fit_conversation(tokenizer, [{"role": "user", "content": "question 5 " * 40}], room=20)
    assert len(ids) == 20 and len(alone) == 1  # the newest message alone is cut from its start


def test_streamed_text_never_shows_half_a_character(tokenizer):
    ids = tokenizer.encode("question é 7 — ok", add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def served(tokenizer) -> dict:
    return {"m": LoadedModel(ModelSpec("m", Path("m")), None, None, tokenizer, context=32, default_max_new_tokens=8)}


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, 400, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 32}, 400,
     "max_completion_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "question 1 " * 30}]}, 400, "messages"),
])
def test_chat_requests_are_checked(tokenizer, body, status, param):
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.chat_job(body, served(tokenizer))
    assert (refused.value.status, refused.value.body()["error"]["param"]) == (status, param)


def test_a_valid_request_becomes_a_job_with_its_budget(tokenizer):
    job = openai_api.chat_job({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                               "temperature": 0, "stream": True, "n": 1, "stop": None}, served(tokenizer))
    assert (job.sampling.temperature, job.sampling.max_new_tokens, job.stream) == (0.0, 8, True)
    job = openai_api.completion_job({"model": "m", "prompt": ["question"], "max_tokens": 20}, served(tokenizer))
    assert job.sampling.max_new_tokens == 20 and job.sampling.temperature == 1.0
    with pytest.raises(openai_api.ApiError):
        openai_api.parse_body(b"[1, 2]")
