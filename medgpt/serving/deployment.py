"""The Ray Serve deployment: one replica, one :class:`medgpt.generation.Engine`.

A thread of its own loads the model, then runs the engine's steps back to back and hands each
step's events to the replica's event loop, which stays free to accept requests, stream tokens
and notice disconnects; each request has an ``asyncio.Queue`` its handler drains. New requests
join the running batch at the next step. The engine never waits for the event loop: with the
loop awaiting each step instead (``asyncio.to_thread``), the next step started only once the
loop had streamed the last one's tokens, and at 8 streams the cores sat ~15% idle.

This module owns the replica's lifecycle, its engine thread and its metrics. What a body may
hold is :mod:`medgpt.api`'s; how events become response bodies is :mod:`.responses`'.
Routes: ``POST /v1/completions`` (OpenAI), ``POST /generate`` and ``POST /generate/stream``
(the page's JSON and SSE API), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /healthz``,
and vLLM's tokenizer routes ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``
(with them lm-evaluation-harness tokenizes through the server: no tokenizer files needed).
Every error, on any route or method, is OpenAI's error body with a 4xx status (5xx only for a
failure of the server itself); a full queue answers 503 with Retry-After.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the route parameters'
# annotations as real classes.
import asyncio
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medgpt.api import (
    MAX_BODY_BYTES,
    RETRY_AFTER_S,
    ApiError,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    error_body,
    parse_body,
    sse,
)
from medgpt.generation import Engine, Event, QueueFull, SamplingParams
from medgpt.serving.config import ServeConfig
from medgpt.serving.responses import Completion, Generation
from medgpt.tokenizer import EOT_TOKEN


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


app = FastAPI(title="medgpt", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _json_error(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Routing errors (404, 405) in OpenAI's shape rather than FastAPI's {"detail": ...}.
    if exc.status_code == 404:
        message = f"no such route: {request.url.path}"
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (use {allowed})"
    else:
        message = str(exc.detail)
    err = ApiError(exc.status_code, message, headers=exc.headers)
    return _json_error(err)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Bodies are parsed by medgpt.api, so only a path or query parameter can land here.
    return _json_error(ApiError(400, "invalid request parameters"))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged by Serve with its traceback; the client gets one line.
    body = error_body(f"internal error ({type(exc).__name__})", "server_error")
    return JSONResponse(body, status_code=500)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes — whether it
    declares its length or comes chunked (then it is cut off while being read)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; a 4xx keeps it out of the server-error counts and logs.
        raise ApiError(400, "the client left before its body arrived") from None
    return b"".join(chunks)


# Defined before the deployment class: serve.ingress captures the globals its methods use
# when the class is decorated, so helpers defined below it would be missing in the replica.
def _actor_cpus() -> int:
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside Ray (unit use): one thread per core
        return os.cpu_count() or 1


def load_replica_model(path: str, device: str, dtype: str = "float32", int8: bool = False) -> Any:
    """The replica's model: the checkpoint's float32 weights loaded on ``device``
    (:func:`medgpt.checkpoint.resolve_device`'s names), cast there to ``dtype`` (a
    ``torch`` dtype's name; the file stays float32), then int8 linears if asked for.
    :class:`ServeConfig` decides which combinations a replica may use; this does what it is
    told (tests run bfloat16 on the CPU through it)."""
    import torch

    from medgpt import checkpoint

    model = checkpoint.load_model(path, device=checkpoint.resolve_device(device))
    if dtype != "float32":
        # In place on the device: the tied head stays the token embedding.
        model = model.to(dtype=getattr(torch, dtype))
    if int8:
        from medgpt.quantize import quantize_int8

        model = quantize_int8(model)
    return model


# Options (CPUs, request limit, replicas) come from the serve config through
# ServeConfig.deployment_options, applied by medgpt.serving.build_app.
@serve.deployment
@serve.ingress(app)
class MedgptServer:
    def __init__(self, config: dict[str, Any]) -> None:
        from medgpt.checkpoint import read_meta
        from medgpt.registry import resolve_checkpoint
        from medgpt.tracking import tracking_uri_for

        cfg = ServeConfig.from_dict(config)
        self.cfg = cfg
        storage = Path(cfg.storage_path)
        uri = tracking_uri_for(str(storage), cfg.tracking_uri)
        path, registry = resolve_checkpoint(cfg.checkpoint, uri, storage / "downloads")
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._metrics()
        self._event_loop = asyncio.get_running_loop()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        # Every torch operation of the replica (load, warm-up, steps) runs in this one thread.
        # OpenMP (libgomp) gives each thread that starts parallel regions a pool of its own;
        # with two pools it manages more threads than the replica has CPUs and stops spinning
        # at barriers: every region then sleeps and wakes its threads. Loading in __init__'s
        # thread and stepping here did that: 65-100 futex sleeps a step, steps ~10% slower in
        # a probe, and at 8 streams a third of a core idle and c=8 7% slower in Serve.
        ready: Future[Any] = Future()
        self._stepper = threading.Thread(
            target=self._engine_thread, args=(path, ready), name="medgpt-engine", daemon=True
        )
        self._stepper.start()
        model = ready.result()  # re-raises what loading or the warm-up raised
        meta = read_meta(path)
        self.context = model.config.block_size
        # A model id without "/": clients put it in URL paths (GET /v1/models/{id}).
        self.model_id = (
            f"{registry['name']}-v{registry['version']}" if registry else Path(path).name
        )
        self.model_card = {
            "id": self.model_id,
            "object": "model",
            "created": int(Path(path, "model.safetensors").stat().st_mtime),
            "owned_by": "medgpt",
            "checkpoint": cfg.checkpoint,
            "registry_version": registry["version"] if registry else None,
            "registry_aliases": registry["aliases"] if registry else [],
            "training_run_id": meta.get("mlflow_run_id"),
            "step": meta.get("step"),
            "val_loss": meta.get("val_loss"),
            "eval_loss": float(registry["tags"]["eval_loss"])
            if registry and "eval_loss" in registry["tags"]
            else None,
            "context_length": self.context,
            "int8": cfg.int8,
            "fast_linear": self.engine.fast_linear,
            "device": str(self.engine.device),
            "dtype": cfg.dtype,
        }

    def _engine_thread(self, path: str, ready: "Future[Any]") -> None:
        """Loads the model, builds and warms up the engine, hands the model to ``__init__``
        through ``ready``, then runs the step loop."""
        try:
            import torch

            cfg = self.cfg
            torch.set_num_threads(cfg.threads or _actor_cpus())  # Ray sets OMP_NUM_THREADS=1
            model = load_replica_model(path, cfg.replica_device(), cfg.dtype, cfg.int8)
            self.engine = Engine(
                model,
                cfg.max_batch_size,
                cfg.max_queue,
                kv_cache_tokens=cfg.kv_cache_tokens,
                fast_linear=cfg.fast_linear,
            )
            self.engine.generate("warm up", SamplingParams(max_new_tokens=2, temperature=0))
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(model)
        self._step_loop()

    def _metrics(self) -> None:
        from ray.serve import metrics

        buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.m_ttft = metrics.Histogram(
            "medgpt_time_to_first_token_s", "Time to first token", buckets
        )
        self.m_itl = metrics.Histogram(
            "medgpt_inter_token_latency_s", "Between two tokens", buckets
        )
        self.m_latency = metrics.Histogram("medgpt_request_latency_s", "Whole request", buckets)
        self.m_tokens = metrics.Counter("medgpt_generated_tokens", "Tokens generated")
        self.m_batch = metrics.Gauge("medgpt_batch_size", "Sequences in the running batch")
        self.m_requests = metrics.Counter(
            "medgpt_requests", "Requests by outcome", tag_keys=("outcome",)
        )

    def _step_loop(self) -> None:
        """The engine thread: steps while there is work, sleeps on ``_wake`` otherwise."""
        try:
            while not self._stop.is_set():
                if not self.engine.has_work:
                    # Cleared before has_work is read again, so a submit in between is seen.
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                events = self.engine.step()
                running = self.engine.stats()["running"]
                self._event_loop.call_soon_threadsafe(self._deliver, events, running)
        except BaseException as e:
            self._failure = e
            raise

    def _deliver(self, events: list[Event], running: int) -> None:
        self.m_batch.set(running)
        for ev in events:
            q = self._queues.get(ev.request_id)
            if q is not None:
                q.put_nowait(ev)

    async def check_health(self) -> None:
        if not self._stepper.is_alive():
            raise RuntimeError(f"the decode loop stopped: {self._failure!r}")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica gracefully.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # -- plumbing ---------------------------------------------------------------------------

    async def _body(self, request: Request, model: type) -> Any:
        raw = await read_body(request)
        return parse_body(model, raw, max_tokens_cap=self.cfg.max_tokens_cap)

    def _params(
        self, prompt: str | list[int], max_tokens: int, body: Any, field: str, seed: int | None
    ) -> tuple[list[int], SamplingParams]:
        """The prompt's tokens and sampling parameters; the model's context is the one limit
        the protocol cannot check without the tokenizer."""
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + {field} ({max_tokens}) exceeds the model's context "
                f"of {self.context} tokens",
                field,
            )
        params = SamplingParams(
            max_tokens, body.temperature, body.top_k, body.top_p, seed, body.stops
        )
        return ids, params

    def _start(self, ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue[Event]]:
        rid = uuid.uuid4().hex
        q: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.engine.submit(rid, ids, params)
        except QueueFull:
            self.m_requests.inc(tags={"outcome": "rejected"})
            raise ApiError(
                503,
                "the server is busy; retry shortly",
                None,
                "server_overloaded",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        self._queues[rid] = q
        self._wake.set()
        return rid, q

    async def _events(self, rid: str, q: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        """A request's events until it finishes; a disconnect (CancelledError here) or any
        early exit cancels the generation and frees its batch row."""
        t0 = last = time.perf_counter()
        first, done = True, False
        try:
            while True:
                ev = await q.get()
                now = time.perf_counter()
                if ev.token_ids:
                    (self.m_ttft if first else self.m_itl).observe(now - (t0 if first else last))
                    self.m_tokens.inc(len(ev.token_ids))
                    first, last = False, now
                if ev.finished:
                    done = True
                    self.m_latency.observe(now - t0)
                    self.m_requests.inc(tags={"outcome": ev.finish_reason or "done"})
                yield ev
                if done:
                    return
        finally:
            self._queues.pop(rid, None)
            if not done:
                self.engine.cancel(rid)
                self._wake.set()
                self.m_requests.inc(tags={"outcome": "cancelled"})

    async def _merged(
        self, starts: list[tuple[str, asyncio.Queue[Event]]]
    ) -> AsyncIterator[tuple[int, Event]]:
        """The events of several requests (a completion's ``n`` choices) as they come."""
        streams = [self._events(rid, q) for rid, q in starts]
        nexts = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
        try:
            while nexts:
                done, _ = await asyncio.wait(nexts, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = nexts.pop(fut)
                    try:
                        ev = fut.result()
                    except StopAsyncIteration:
                        continue
                    yield i, ev
                    nexts[asyncio.ensure_future(anext(streams[i]))] = i
        finally:
            for fut in nexts:
                fut.cancel()
            for s in streams:
                await s.aclose()

    # -- routes -----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self.check_health()
        return {"status": "ok", "model": self.model_id, **self.engine.stats()}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.model_id:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here (serving {self.model_id!r})",
                "model",
                "not_found_error",
            )
        return self.model_card

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.model_id):
            raise ApiError(
                404,
                f"model {model!r} is not served here (serving {self.model_id!r})",
                "model",
                "not_found_error",
            )

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict[str, Any]:
        # vLLM's fields that lm-eval reads (eos/bos/pad), GPT-2's as Hugging Face sets them.
        return {
            "tokenizer_class": "GPT2TokenizerFast",
            "name": "gpt2",
            "vocab_size": self.engine.enc.n_vocab,
            "eos_token": EOT_TOKEN,
            "bos_token": EOT_TOKEN,
            "unk_token": EOT_TOKEN,
            "pad_token": None,
            "model_max_length": self.context,
        }

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body: TokenizeRequest = await self._body(request, TokenizeRequest)
        self._check_model(body.model)
        ids = self.engine.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        self._check_model(body.model)
        return {"prompt": self.engine.enc.decode(body.tokens, errors="replace")}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        self._check_model(body.model)
        prompt = body.the_prompt
        ids, base = self._params(prompt, body.max_tokens, body, "max_tokens", body.seed)
        if body.logprobs is not None:  # with echo, the prompt's tokens are scored too
            base = dataclasses.replace(base, logprobs=body.logprobs, prompt_logprobs=body.echo)
        starts = []
        for i in range(body.n):  # choice i samples with seed + i
            seed = None if body.seed is None else body.seed + i
            starts.append(self._start(ids, dataclasses.replace(base, seed=seed)))
        out = Completion(
            self.model_id,
            len(ids),
            body.n,
            echo=self.engine.enc.decode(ids, errors="replace") if body.echo else None,
            logprobs=body.logprobs,
        )
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def stream() -> AsyncIterator[str]:
                async for i, ev in self._merged(starts):
                    chunk = out.chunk(i, ev)
                    if chunk is not None:
                        yield sse(chunk)
                if include_usage:
                    yield sse(out.usage_chunk())
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")
        async for i, ev in self._merged(starts):
            out.add(i, ev)
        return out.body()

    def _generate_start(
        self, body: GenerateRequest
    ) -> tuple[Generation, str, asyncio.Queue[Event]]:
        ids, params = self._params(
            body.prompt, body.max_new_tokens, body, "max_new_tokens", body.seed
        )
        gen = Generation(self.model_card, len(ids))
        rid, q = self._start(ids, params)
        return gen, rid, q

    async def generate_body(self, body: GenerateRequest) -> dict[str, Any]:
        """``/generate``'s answer for a checked body (also the unit tests' way in)."""
        gen, rid, q = self._generate_start(body)
        async for ev in self._events(rid, q):
            gen.add(ev)
        return gen.body()

    @app.post("/generate")
    async def generate(self, request: Request) -> dict[str, Any]:
        body: GenerateRequest = await self._body(request, GenerateRequest)
        return await self.generate_body(body)

    @app.post("/generate/stream")
    async def generate_stream(self, request: Request) -> StreamingResponse:
        body: GenerateRequest = await self._body(request, GenerateRequest)
        gen, rid, q = self._generate_start(body)

        async def stream() -> AsyncIterator[str]:
            async for ev in self._events(rid, q):
                for payload in gen.events(ev):
                    yield sse(payload)

        return StreamingResponse(stream(), media_type="text/event-stream")
