"""Load on `pipelines.serve` (loopback only, bounded): N concurrent clients stream completions of a
fixed set of prompts (greedy, a fixed token budget) from the served model; printed are the p50/p99
latency, the p50/p99 time to first token and the generated tokens/s, for the server with batching
(--max-batch-size, default 8) and without (1), against the reference measured in the same run: a bare
sequential `model.generate` loop over the same prompts in this process, on as many threads as the
server's replica (measured before and after the servers, averaged: these machines are noisy).

    python benchmarks/serve_load.py [--root DIR] [--run-id ID | --experiment NAME | --model-dir DIR]
        [--model pretrain] [--clients 8] [--requests 32] [--max-tokens 32] [--num-cpus 2]
"""
from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines import serving_models  # noqa: E402

PROMPTS = ["The old prince", "It was late in the evening when", "Natasha looked at", "The army had",
           "He said that he", "In the morning the", "Pierre could not", "The battle of", "She did not know why",
           "Moscow was", "The soldiers", "Everyone in the room"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference(spec, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """Sequential `generate` (greedy, KV cache) over the prompts: tokens/s and per-request seconds."""
    import torch

    from tasks.generation import load_models, text_prompt

    torch.set_num_threads(threads)
    model = load_models([spec])[spec.id]
    seconds, tokens = [], 0
    with model.selected() as module:
        for prompt in prompts:
            ids = torch.tensor([text_prompt(model.tokenizer, prompt)])
            start = time.perf_counter()
            out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                  do_sample=False, eos_token_id=model.stop_ids, pad_token_id=model.tokenizer.pad_token_id)
            seconds.append(time.perf_counter() - start)
            tokens += out.shape[1] - ids.shape[1]
    return {"tokens_per_s": tokens / sum(seconds), "latency": seconds, "tokens": tokens}


def start_server(selection: list[str], port: int, num_cpus: int, max_batch_size: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "pipelines.serve", *selection, "--port", str(port),
                                "--num-cpus", str(num_cpus), "--max-batch-size", str(max_batch_size)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        if line.startswith("serving "):
            return process
        lines.append(line)
    raise SystemExit(f"the server did not start (exit code {process.wait()}):\n" + "".join(lines[-30:]))


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def load(port: int, model_id: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Every prompt once, `clients` at a time, streamed: latency, time to first token, tokens."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)

    def one(prompt: str) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        for chunk in client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        latency = time.perf_counter() - start
        return latency, first if first is not None else latency, tokens

    one(prompts[0])  # warm up: the first request pays for lazy initialisation
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    return {"latency": [r[0] for r in results], "ttft": [r[1] for r in results],
            "tokens_per_s": sum(r[2] for r in results) / wall, "tokens": sum(r[2] for r in results)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    serving_models.add_selection_arguments(parse)
    parse.add_argument("--model", default=None, help="the served model id (default: the run's first, pretrain)")
    parse.add_argument("--clients", type=int, default=8)
    parse.add_argument("--requests", type=int, default=32)
    parse.add_argument("--max-tokens", type=int, default=32)
    parse.add_argument("--num-cpus", type=int, default=2)
    parse.add_argument("--max-batch-size", type=int, default=8)
    args = parse.parse_args()
    _, specs, _, source = serving_models.selected_models(args)
    specs = serving_models.fetched(specs, source)
    spec = next((s for s in specs if s.id == args.model), specs[0]) if args.model else specs[0]
    selection = ["--model-dir", str(args.model_dir)] if args.model_dir else \
        ["--root", args.root, *(["--run-id", args.run_id] if args.run_id else []),
         *(["--experiment", args.experiment] if args.experiment else [])]
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(args.requests)]

    before = reference(spec, prompts, args.max_tokens, args.num_cpus)
    served = {}
    for batch in sorted({1, args.max_batch_size}):
        port = free_port()
        process = start_server(selection, port, args.num_cpus, batch)
        try:
            served[batch] = load(port, spec.id, prompts, args.clients, args.max_tokens)
        finally:
            stop_server(process)
    after = reference(spec, prompts, args.max_tokens, args.num_cpus)

    base_rate = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    base_latency = statistics.median(before["latency"] + after["latency"])
    print(f"model {spec.id} ({spec.path}), {args.requests} requests of up to {args.max_tokens} tokens, "
          f"{args.clients} concurrent clients, {args.num_cpus} threads")
    print(f"reference: sequential model.generate  {base_rate:8.1f} tokens/s  (before {before['tokens_per_s']:.1f}, "
          f"after {after['tokens_per_s']:.1f}), latency p50 {base_latency * 1000:.0f} ms")
    print(f"{'server':<22} {'lat p50':>8} {'lat p99':>8} {'ttft p50':>9} {'ttft p99':>9} {'tokens/s':>9}  vs reference")
    for batch, result in served.items():
        print(f"max_batch_size={batch:<7} {percentile(result['latency'], .5) * 1000:6.0f}ms "
              f"{percentile(result['latency'], .99) * 1000:6.0f}ms {percentile(result['ttft'], .5) * 1000:7.0f}ms "
              f"{percentile(result['ttft'], .99) * 1000:7.0f}ms {result['tokens_per_s']:9.1f}  "
              f"x{result['tokens_per_s'] / base_rate:.2f}")


if __name__ == "__main__":
    main()
