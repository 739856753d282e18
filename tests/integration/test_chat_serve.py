"""pipelines.serve and pipelines.chat against a finished run's published layout (a tiny Llama and two
LoRA branches made by tests/integration/chat_serve_models.py): the server started by the command a
finished run prints, through the official `openai` client, its greedy output token for token against
`generate` of the same directories, streaming, adapters by model name, concurrent (batched) requests
and the error statuses; the same run in an object store (file://), fetched onto the serving node;
the terminal chat with scripted input."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from benchmarks.serve_load import stop_server
from pipelines import chat, serving_models
from tests.conftest import REPO, compose_config
from tests.integration.chat_serve_models import BRANCHES, NARROW_VOCAB, PRETRAIN_FP, RUN_ID, make_run, store_run
from tests.integration.test_resume import free_port

API_KEY = "test-key"
MESSAGES = [{"role": "user", "content": "question 3"}]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-run")
    make_run(root)
    return root


def reference(root, model_id: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """What `generate` of the model's directories gives, greedy: the pretrained model, or it + the branch's adapter."""
    from peft import PeftModel

    from tasks.models import load_base_model

    model = load_base_model(root / "pretrain" / PRETRAIN_FP / "model")
    if model_id != "pretrain":
        model = PeftModel.from_pretrained(model, str(adapter_dir(root, model_id)))
    ids = torch.tensor([prompt_ids])
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def adapter_dir(root, model_id: str):
    return root / "finetune" / BRANCHES[model_id.removeprefix("finetune.")] / "adapter"


def tokenizer_of(root, model_id: str):
    from transformers import AutoTokenizer

    path = root / "pretrain" / PRETRAIN_FP / "model" if model_id == "pretrain" else adapter_dir(root, model_id)
    return AutoTokenizer.from_pretrained(str(path))


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def printed_command(root: str, port: str) -> list[str]:
    """The command a finished run prints after its summary (pipelines.run calls after_run), split."""
    cfg = compose_config(["+experiment=tiny", f"paths.root={root}", f"serve.port={port}", "serve.num_cpus=1"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        serving_models.after_run(cfg, {"run_id": RUN_ID, "steps": [{"name": "pretrain"}, {"name": "finetune.alpha"}]})
    label, command = out.getvalue().strip().split(":", 1)
    assert label == "serve it with" and "\n" not in command
    return shlex.split(command)


@contextlib.contextmanager
def started(command: list[str], **env):
    """The printed command (`python` as this interpreter), run until it says `serving ...`; stopped after."""
    assert command[:3] == ["python", "-m", "pipelines.serve"]
    process = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    lines, deadline = [], threading.Timer(300, process.kill)  # a server that never comes up fails, not hangs
    deadline.start()
    try:
        for line in process.stdout:  # the server prints `serving ...` once the app is up
            lines.append(line)
            if line.startswith("serving "):
                break
        deadline.cancel()
        assert lines and lines[-1].startswith("serving ") and process.poll() is None, "".join(lines[-40:])
        yield lines
    finally:
        stop_server(process)


def test_a_finished_run_prints_the_command_that_serves_it(run_root):
    assert printed_command(str(run_root), "8123") == [
        "python", "-m", "pipelines.serve", "--root", str(run_root), "--run-id", RUN_ID, "--port", "8123",
        "--num-cpus", "1"]


@pytest.fixture(scope="module")
def server(run_root):
    """The server as the run's printed command starts it (the API key from $LMFORGE_API_KEY)."""
    port = free_port()
    with started(printed_command(str(run_root), port), LMFORGE_API_KEY=API_KEY) as lines:
        assert lines[-1].startswith(f"serving pretrain, finetune.alpha, finetune.beta, finetune.narrow at "
                                    f"http://127.0.0.1:{port}/v1 (API key required)")
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)


def test_models_list_each_branch_with_its_run_and_fingerprint(client):
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(listed) == {"pretrain", "finetune.alpha", "finetune.beta", "finetune.narrow"}  # not the classifier
    assert listed["pretrain"]["fingerprint"] == PRETRAIN_FP
    assert listed["finetune.beta"]["fingerprint"] == BRANCHES["beta"]
    assert all(m["run_id"] == RUN_ID for m in listed.values())


def test_greedy_chat_equals_generate_and_adapters_differ(client, run_root):
    replies = {}
    for model_id in ("finetune.alpha", "finetune.beta"):
        tokenizer = tokenizer_of(run_root, model_id)
        prompt = chat_ids(tokenizer, MESSAGES)
        expected = reference(run_root, model_id, prompt, 10)
        reply = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=10)
        assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))
        assert reply.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")
        replies[model_id] = expected
    assert replies["finetune.alpha"] != replies["finetune.beta"]


def test_completion_of_the_base_model_equals_generate(client, run_root):
    tokenizer = tokenizer_of(run_root, "pretrain")
    expected = reference(run_root, "pretrain", tokenizer.encode("question 12", add_special_tokens=False), 8)
    reply = client.completions.create(model="pretrain", prompt="question 12", temperature=0, max_tokens=8)
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.completion_tokens == len(expected)


def test_streams_give_the_same_text_and_end_with_done(client, server):
    whole = client.chat.completions.create(model="finetune.beta", messages=MESSAGES, temperature=0, max_tokens=9)
    stream = client.chat.completions.create(model="finetune.beta", messages=MESSAGES, temperature=0, max_tokens=9,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    body = {"model": "pretrain", "prompt": "answer", "max_tokens": 5, "temperature": 0, "stream": True}
    events = post(server, "/completions", json.dumps(body).encode())[1].split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    streamed = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-2])
    assert streamed == client.completions.create(model="pretrain", prompt="answer", max_tokens=5, temperature=0).choices[0].text


def test_concurrent_requests_to_different_adapters_each_match_generate(client, run_root):
    asks = [(model_id, f"question {n}") for n in (1, 22, 333) for model_id in ("finetune.alpha", "finetune.beta", "pretrain")]
    expected = {}
    for model_id, text in asks:
        tokenizer = tokenizer_of(run_root, model_id)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        expected[model_id, text] = tokenizer.decode(reference(run_root, model_id, prompt, 6), skip_special_tokens=True)

    def ask(model_and_text):
        model_id, text = model_and_text
        return client.completions.create(model=model_id, prompt=text, temperature=0, max_tokens=6).choices[0].text

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == [expected[a] for a in asks]


def test_seeded_sampling_repeats(client):
    ask = lambda seed: client.chat.completions.create(model="finetune.alpha", messages=MESSAGES, temperature=1.0,
                                                      top_p=0.9, seed=seed, max_tokens=12).choices[0].message.content
    assert ask(7) == ask(7)


def post(server: str, path: str, data: bytes, key: str = API_KEY) -> tuple[int, str]:
    request = urllib.request.Request(server + path, data=data, headers={"Authorization": f"Bearer {key}",
                                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_errors_are_openai_json_with_their_status(client, server):
    import openai

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="finetune.gamma", messages=MESSAGES)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="pretrain", prompt="question 1 answer 7 " * 20)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="pretrain", prompt="question", max_tokens=64)
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model="finetune.alpha", messages=MESSAGES, n=2)
    assert several.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    status, body = post(server, "/chat/completions", b'{"model": "pretrain", "messages": [')
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = post(server, "/chat/completions", json.dumps({"model": "pretrain", "messages": "hi"}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    assert client.completions.create(model="pretrain", prompt="question", max_tokens=2).usage.completion_tokens >= 1


def test_a_failing_generation_is_a_500_and_the_replica_serves_on(client, run_root):
    import openai

    tokenizer = tokenizer_of(run_root, "pretrain")
    high, low = "question 333", "question 1"  # token ids beyond the narrow model's embeddings, and within them
    assert max(tokenizer.encode(high, add_special_tokens=False)) >= NARROW_VOCAB
    assert max(tokenizer.encode(low, add_special_tokens=False)) < NARROW_VOCAB

    def ask(model_and_prompt):
        model_id, prompt = model_and_prompt
        try:
            return client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=4).choices[0].text
        except openai.InternalServerError as error:
            return error.body["type"]

    asks = [("finetune.narrow", high), ("pretrain", low), ("finetune.alpha", low)] * 2
    with ThreadPoolExecutor(len(asks)) as pool:  # the failing rows and the others may share a batch
        answers = list(pool.map(ask, asks))
    assert answers[0] == answers[3] == "server_error"
    assert "server_error" not in answers[1:3] + answers[4:]
    # rows of the failing model decoded in the same pass fail with it; alone, a good prompt is served
    assert ask(("finetune.narrow", low)) != "server_error"


def test_terminal_chat_streams_replies_and_keeps_the_conversation(run_root):
    tokenizer = tokenizer_of(run_root, "finetune.alpha")
    first = tokenizer.decode(reference(run_root, "finetune.alpha", chat_ids(tokenizer, MESSAGES), 6),
                             skip_special_tokens=True)
    script = "question 3\nanswer 21\n/reset\nquestion 3\n"
    done = subprocess.run([sys.executable, "-m", "pipelines.chat", "--root", str(run_root), "--branch", "alpha",
                           "--temperature", "0", "--max-new-tokens", "6"], cwd=REPO, input=script,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    replies = [line.split("model> ", 1)[1] for line in done.stdout.splitlines() if "model> " in line]
    assert len(replies) == 3
    assert replies[0] == replies[2] == first  # the same question after /reset gets the same greedy answer
    assert replies[1] != first
    assert "finetune.alpha" in done.stderr and "chat mode" in done.stderr


@pytest.mark.parametrize("argv, option", [(["--branch", "cls"], "--branch cls"), (["--branch", "nope"], "--branch nope"),
                                          ([], "--branch"), (["--run-id", "feed"], "--run-id feed"),
                                          (["--experiment", "other"], "--experiment")])
def test_chat_refuses_with_one_line_naming_the_option(run_root, capsys, argv, option):
    assert chat.main(["--root", str(run_root), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {option}") and "\n" not in error


def test_chat_without_finished_runs_names_the_root(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert chat.main(["--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --root: no finished run")


def test_ctrl_c_stops_a_reply_not_the_session(run_root, monkeypatch):
    import io

    from tasks import generation

    step, calls = generation.Decoder.step, []

    def interrupted_on_third_token(self, module):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, module)

    monkeypatch.setattr(generation.Decoder, "step", interrupted_on_third_token)
    args = chat.parser().parse_args(["--root", str(run_root), "--branch", "alpha", "--temperature", "0",
                                     "--max-new-tokens", "6"])
    _, specs, skipped, _ = chat.serving_models.selected_models(args)
    spec = chat.serving_models.pick_branch(specs, skipped, "alpha", {"run_id": RUN_ID})
    out = io.StringIO()
    session = chat.Session(generation.load_models([spec])[spec.id], args, out)
    lines = iter(["question 3", "question 3"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    chat.converse(session, read)
    replies = out.getvalue().split("model> ")[1:]
    assert replies[0].endswith(" [interrupted]\n")
    assert len(session.messages) == 4  # both exchanges kept, the cut reply as far as it got
    assert not replies[1].endswith(" [interrupted]\n") and len(calls) > 3


@pytest.fixture(scope="module")
def store_uri(run_root, tmp_path_factory):
    return store_run(run_root, tmp_path_factory.mktemp("bucket") / "lmforge")


def test_a_run_in_an_object_store_is_served_from_its_fetched_steps(run_root, store_uri, tmp_path):
    """paths.root=file://...: the printed command keeps the URI; the replica fetches the run's steps into
    its node's working copy ($LMFORGE_CACHE) and serves them as from a local root."""
    import openai

    port, cache = free_port(), tmp_path / "node-cache"
    command = printed_command(store_uri, port)
    assert command[command.index("--root") + 1] == store_uri
    tokenizer = tokenizer_of(run_root, "finetune.alpha")
    expected = tokenizer.decode(reference(run_root, "finetune.alpha", chat_ids(tokenizer, MESSAGES), 8),
                                skip_special_tokens=True)
    with started(command, LMFORGE_CACHE=str(cache)) as lines:
        assert "not served: finetune.cls, a classifier" in "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="finetune.alpha", messages=MESSAGES, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == expected
    for step, fingerprint, folder in [("pretrain", PRETRAIN_FP, "model"), ("finetune", BRANCHES["alpha"], "adapter")]:
        assert (cache / step / fingerprint / folder).is_dir()
        assert (cache / step / fingerprint / "_manifest.json").exists()
    assert not (cache / "finetune" / BRANCHES["cls"]).exists()  # only what is served is fetched


def test_terminal_chat_with_a_run_in_an_object_store(run_root, store_uri, tmp_path):
    tokenizer = tokenizer_of(run_root, "finetune.beta")
    expected = tokenizer.decode(reference(run_root, "finetune.beta", chat_ids(tokenizer, MESSAGES), 6),
                                skip_special_tokens=True)
    done = subprocess.run([sys.executable, "-m", "pipelines.chat", "--root", store_uri, "--branch", "beta",
                           "--temperature", "0", "--max-new-tokens", "6"], cwd=REPO, input="question 3\n",
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LMFORGE_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("model> ", 1)[1].split("\n", 1)[0] == expected
    assert f"fetched finetune {BRANCHES['beta']}" in done.stderr and (tmp_path / "finetune" / BRANCHES["beta"]).is_dir()


def test_serve_config_application_from_a_stored_run(store_uri, tmp_path, monkeypatch):
    """cluster/serve-config.yaml's application, built as `serve deploy` builds it (its args, with the
    root pointed at the test's store): the run's models, and what each replica fetches."""
    import yaml
    from ray import serve as ray_serve

    from pipelines import serve

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    config = yaml.safe_load((REPO / "cluster" / "serve-config.yaml").read_text())
    args = {**config["applications"][0]["args"], "root": store_uri, "run_id": RUN_ID}
    args.pop("experiment", None)
    assert isinstance(serve.build_app(args), ray_serve.Application)
    with pytest.raises(serve.UserError, match="args: unknown prot"):
        serve.build_app({**args, "prot": 8000})
    bound = {}
    monkeypatch.setattr(serve, "application",
                        lambda args, specs, source: bound.update(specs=specs, source=source) or "app")
    assert serve.build_app(args) == "app"
    assert {s.id for s in bound["specs"]} == {"pretrain", "finetune.alpha", "finetune.beta", "finetune.narrow"}
    assert bound["source"].uri == store_uri and ("finetune", BRANCHES["alpha"]) in bound["source"].steps
    assert not (tmp_path / "finetune").exists()  # nothing is downloaded where the application is built
