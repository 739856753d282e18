"""An OpenAI-compatible HTTP server for a finished run's models, on Ray Serve (CPU engine:
transformers with a KV cache, tasks/generation.py).

    python -m pipelines.serve                        # the newest finished run under --root
    python -m pipelines.serve --run-id ID | --experiment NAME | --model-dir DIR
        [--root DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--num-cpus 2] [--max-batch-size 8]

Routes: POST /v1/chat/completions and /v1/completions (with "stream": true as server-sent events
ending with `data: [DONE]`), GET /v1/models (each model's id, run id, step and fingerprint). The
`model` of a request is a model id of the run: `pretrain`, `finetune` or `finetune.<branch>`
(pipelines/serving_models.py). One deployment holds the pretrained weights once and every LoRA
branch as a PEFT adapter on them; full fine-tunes are loaded beside.

Concurrent requests are batched (@serve.batch): the rows of one model are decoded together, one
forward pass per step with left padding, each row with its own sampling (greedy, or its own seeded
generator), budget and stop; rows of different models (adapters) take turns step by step under a
lock that keeps the adapter choice and the forward pass together. A client that goes away frees its row.
Errors are OpenAI's JSON error objects: unknown model 404; a malformed body, an unsupported option,
a prompt longer than the context or a max_tokens beyond it 400; a missing or wrong key (with
--api-key or $LMFORGE_API_KEY) 401; a failed generation 500, which the replica survives.
--root may be an object store (s3://..., file:///...): each replica fetches the run's steps onto its
node (pipelines/serving_models.py: fetched). `build_app` makes the same application from a Ray Serve
config file (cluster/serve-config.yaml, cluster/kuberay/rayservice.yaml), and `pipelines.run` prints
this command for the run it finished, or with serve.enabled=true runs it (serving_models.after_run).
docs/serving.md has the details and the GPU route (Ray Serve LLM with vLLM).
"""

import argparse
import asyncio
import hmac
import os
import signal
import sys
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from pipelines import openai_api, serving_models
from pipelines.openai_api import ApiError, Job
from pipelines.serving_models import StoreSource
from tasks.common import UserError
from tasks.generation import Decoder, LoadedModel, ModelSpec, TextStream, load_models

MAX_BATCH_SIZE = 8
api = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)


class GenerationFailed(Exception):
    """A row's generation raised: its request gets a 500, the replica and the other rows go on."""


def failed_or(pieces):
    """A job's pieces of one decoding step, or the failure of its generation raised."""
    if isinstance(pieces, GenerationFailed):
        raise pieces
    return pieces


def row_indices(groups: dict[str, list[int]]) -> list[int]:
    """For each job of a batch (in order), its row in its model's decoder."""
    rows = {}
    for indices in groups.values():
        rows.update({index: row for row, index in enumerate(indices)})
    return [rows[index] for index in sorted(rows)]


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# Serve serialises the class when it is decorated: what its methods call is defined above this line.
@serve.deployment(max_ongoing_requests=128, health_check_period_s=5)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, specs: list[ModelSpec], source: StoreSource | None, api_key: str | None, num_threads: int,
                 max_batch_size: int):
        import torch

        torch.set_num_threads(num_threads)
        self.models: dict[str, LoadedModel] = load_models(serving_models.fetched(specs, source))
        self.api_key = api_key
        self.lock = threading.Lock()  # one forward pass at a time: the adapter it selected stays selected
        self.decode.set_max_batch_size(max_batch_size)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            self.check_key(request)
        except ApiError as error:
            return error_response(error)
        return openai_api.model_list(self.models)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.respond(request, openai_api.chat_job)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.respond(request, openai_api.completion_job)

    async def respond(self, request: Request, make_job):
        try:
            self.check_key(request)
            job = make_job(openai_api.parse_body(await request.body()), self.models)
        except ApiError as error:
            return error_response(error)
        if job.stream:
            return StreamingResponse(self.stream(job), media_type="text/event-stream")
        try:
            tokens, finish = await self.collect(job)
        except Exception as error:  # noqa: BLE001 - a failed generation is this request's 500, not the replica's end
            return error_response(ApiError(500, f"generation failed: {error}", kind="server_error"))
        text = self.models[job.model_id].tokenizer.decode(tokens, skip_special_tokens=True)
        return openai_api.response(job, text, finish, len(tokens))

    async def collect(self, job: Job) -> tuple[list[int], str | None]:
        tokens, finish = [], None
        async for pieces in self.decode(job):
            for token, finish in failed_or(pieces):
                tokens.append(token)
        return tokens, finish

    async def stream(self, job: Job):
        text, count, finish = TextStream(self.models[job.model_id].tokenizer), 0, None
        try:
            if job.kind == "chat":
                yield openai_api.chunk(job, None, role=True)
            async for pieces in self.decode(job):
                for token, finish in failed_or(pieces):
                    count += 1
                    new = text.add(token)
                    if new:
                        yield openai_api.chunk(job, new)
            tail = text.flush()
            if tail:
                yield openai_api.chunk(job, tail)
            yield openai_api.chunk(job, None, finish)
            if job.include_usage:
                yield openai_api.usage_chunk(job, count)
        except Exception as error:  # noqa: BLE001 - the stream ends with the error, the replica goes on
            yield openai_api.event(ApiError(500, f"generation failed: {error}", kind="server_error").body())
        finally:
            job.cancelled = True  # a client that went away mid-stream frees its row
        yield openai_api.DONE

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def decode(self, jobs: list[Job]):
        """Per step, for each job: the (token, finish) pairs it got (none, or one), its GenerationFailed,
        or StopIteration once it has had its last one."""
        groups: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.model_id, []).append(index)
        decoders = {model_id: Decoder([jobs[i].prompt_ids for i in rows], [jobs[i].sampling for i in rows],
                                      self.models[model_id].stop_ids, self.models[model_id].tokenizer.pad_token_id)
                    for model_id, rows in groups.items()}
        row_of, finished = row_indices(groups), [False] * len(jobs)
        while not all(finished):
            results: list = [StopIteration if finished[i] else [] for i in range(len(jobs))]
            for model_id, rows in groups.items():  # each model's rows in turn: one forward pass each
                outcomes = await self.advance(model_id, decoders[model_id], [jobs[i] for i in rows])
                for index, outcome in zip(rows, outcomes):
                    results[index] = outcome if outcome is not None else results[index]
            yield results
            finished = [decoders[job.model_id].finished[row_of[i]] is not None for i, job in enumerate(jobs)]

    async def advance(self, model_id: str, decoder: Decoder, jobs: list[Job]) -> list:
        """One decoding step of one model's rows, in a thread (the event loop keeps serving): per row
        [(token, finish)], or None (finished already), or GenerationFailed for all if the step raised."""
        for row, job in enumerate(jobs):
            if job.cancelled:
                decoder.cancel(row)
        if decoder.done:
            return [None] * len(jobs)
        try:
            pieces = await asyncio.to_thread(self.step, self.models[model_id], decoder)
        except Exception as error:  # noqa: BLE001 - these rows fail; the replica and the other rows go on
            for row in range(len(jobs)):
                decoder.cancel(row)
            return [GenerationFailed(f"{type(error).__name__}: {error}")] * len(jobs)
        return [None if piece is None else [piece] for piece in pieces]

    def step(self, model: LoadedModel, decoder: Decoder) -> list[tuple[int, str | None] | None]:
        with self.lock, model.selected() as module:
            return decoder.step(module)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n\n")[0])
    serving_models.add_selection_arguments(parse)
    parse.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parse.add_argument("--port", type=int, default=8000)
    parse.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                       help="require `Authorization: Bearer KEY` (default $LMFORGE_API_KEY; unset: no key)")
    parse.add_argument("--num-cpus", type=int, default=min(os.cpu_count() or 1, 4),
                       help="CPUs of the embedded Ray and threads of the model replica")
    parse.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help="most requests decoded together")
    parse.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="join this Ray cluster instead of starting an embedded one ($RAY_ADDRESS)")
    return parse


def served_specs(args: argparse.Namespace) -> tuple[list[ModelSpec], StoreSource | None]:
    """The models to serve, and for an object-store root what each replica fetches onto its node."""
    if args.max_batch_size < 1 or args.num_cpus < 1:
        raise UserError("--max-batch-size and --num-cpus: give 1 or more")
    summary, specs, skipped, source = serving_models.selected_models(args)
    for step, reason in skipped.items():
        print(f"not served: {step}, {reason}", file=sys.stderr)
    return specs, source


def application(args: argparse.Namespace, specs: list[ModelSpec], source: StoreSource | None) -> serve.Application:
    return OpenAIServer.options(ray_actor_options={"num_cpus": args.num_cpus}).bind(
        specs, source, args.api_key, args.num_cpus, args.max_batch_size)


def build_app(config: dict) -> serve.Application:
    """The application of a Serve config file (`import_path: pipelines.serve:build_app`, `serve run` /
    `serve deploy` / a RayService; cluster/serve-config.yaml). Its `args` are this command's options
    without the dashes: root, run_id or experiment or model_dir, num_cpus, max_batch_size, api_key
    (default $LMFORGE_API_KEY where the application is built); host and port are the config's http_options."""
    options = {action.dest for action in parser()._actions} - {"help", "host", "port", "address"}
    unknown = sorted(set(config) - options)
    if unknown:
        raise UserError(f"args: unknown {', '.join(unknown)}; give {', '.join(sorted(options))}")
    args = parser().parse_args([f"--{key.replace('_', '-')}={value}" for key, value in config.items()])
    return application(args, *served_specs(args))


def start(args: argparse.Namespace, specs: list[ModelSpec], source: StoreSource | None) -> None:
    """Ray (embedded, loopback only, unless --address), Serve's proxy on --host:--port, the app."""
    import logging

    import ray

    from pipelines.executor import loopback_only

    if args.address:
        ray.init(address=args.address, logging_level=logging.WARNING)
    else:
        loopback_only()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    serve.run(application(args, specs, source), name="lmforge", route_prefix="/",
              logging_config={"log_level": "WARNING"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        specs, source = served_specs(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as Ctrl-C does: Serve and Ray shut down
    try:
        start(args, specs, source)
        print(f"serving {', '.join(s.id for s in specs)} at http://{args.host}:{args.port}/v1"
              f"{' (API key required)' if args.api_key else ''}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        return 0
    finally:
        stop()


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop() -> None:
    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
