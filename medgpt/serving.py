"""Ray Serve application: the champion model behind an OpenAI-compatible HTTP API.

One replica holds one :class:`medgpt.generation.Engine`. A thread of its own loads the
model, then runs the engine's steps back to back and hands each step's events to the
replica's event loop, which stays free to accept requests, stream tokens and notice
disconnects; each request has an ``asyncio.Queue`` its handler drains. New requests join the
running batch at the next step. The engine never waits for the event loop: with the loop
awaiting each step instead (``asyncio.to_thread``), the next step started only once the loop
had streamed the last one's tokens, and at 8 streams the cores sat ~15% idle.

Routes: ``POST /v1/completions`` (OpenAI), ``POST /generate`` and ``POST /generate/stream``
(the web page's JSON and SSE API), ``GET /v1/models``, ``GET /healthz``. Every body is
validated strictly (types, ranges, unknown fields); errors are OpenAI-style JSON with the
offending field, status 400 — never a stack trace. A full queue answers 503 with Retry-After.

Started by ``serve run serve/config.yaml`` or ``medgpt serve``; ``app_builder`` turns the
config's ``args`` into the application (paths are made absolute there, on the driver).
"""

# No ``from __future__ import annotations`` here: FastAPI must see the body models as real
# classes on the ingress methods (with string annotations Serve's wrapped methods would
# turn them into query parameters).
import asyncio
import json
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
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from medgpt.generation import MAX_STOP_STRINGS, Engine, Event, QueueFull, SamplingParams

MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 20_000
RETRY_AFTER_S = 2


class ServeConfig(BaseModel):
    """The application's arguments (``args`` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = "models:/medgpt@champion"
    storage_path: str = "runs"  # the MLflow store and download cache for models:/ URIs
    tracking_uri: str | None = None
    max_batch_size: int = Field(8, ge=1, le=256)
    max_queue: int = Field(64, ge=0)  # waiting requests beyond the batch; then 503
    # KV cache budget in token positions (rows x positions); a request that would exceed it
    # waits. 4096 is 302 MB for GPT-2 124M fp32 (73.7 KB a position), which keeps a replica
    # under the 1.5 GB standard; None = no limit (max_batch_size full-context rows).
    kv_cache_tokens: int | None = Field(4096, ge=1)
    max_tokens_cap: int = Field(512, ge=1)
    threads: int = Field(0, ge=0)  # torch threads; 0 = the replica's num_cpus
    int8: bool = False  # weight-only int8 linears (CPU); see docs/benchmarks.md for its loss cost
    fast_linear: bool = True  # float32 on CPU: medgpt.fastlinear's decode kernel
    device: str = "auto"


# --- request bodies ------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True)


class CompletionRequest(BaseModel):
    model_config = _STRICT

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None


class GenerateRequest(BaseModel):
    model_config = _STRICT

    prompt: str
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


def _error(status: int, message: str, param: str | None, kind: str, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


app = FastAPI(title="medgpt", docs_url=None, redoc_url=None)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the top-level field (unions add member names after it)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return _error(400, "the body is not valid JSON", None, "invalid_request_error")
    if kind == "extra_forbidden":
        msg = f"unknown field {param!r}"
    elif kind == "missing":
        msg = f"missing field {param!r}"
    elif param is None:
        msg = "the body must be a JSON object"
    else:
        msg = f"{param}: {first.get('msg', 'invalid value')}"
    return _error(400, msg, param, "invalid_request_error")


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.kind, exc.headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged by Serve with its traceback; the client gets one line.
    return _error(500, f"internal error ({type(exc).__name__})", None, "server_error")


@app.middleware("http")
async def _limit_body(request: Request, call_next: Any) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _error(
            413, f"request body over {MAX_BODY_BYTES} bytes", None, "invalid_request_error"
        )
    return await call_next(request)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP_STRINGS or any(not s or len(s) > 64 for s in items):
        raise ApiError(
            400,
            f"stop: at most {MAX_STOP_STRINGS} non-empty strings of up to 64 characters",
            "stop",
        )
    return tuple(items)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# Defined before the deployment class: serve.ingress captures the globals its methods use
# when the class is decorated, so helpers defined below it would be missing in the replica.
def _actor_cpus() -> int:
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside Ray (unit use): one thread per core
        return os.cpu_count() or 1


@serve.deployment(
    max_ongoing_requests=32,
    health_check_period_s=2,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(app)
class MedgptServer:
    def __init__(self, config: dict[str, Any]) -> None:
        from medgpt.checkpoint import read_meta, resolve_checkpoint
        from medgpt.tracking import tracking_uri_for

        cfg = ServeConfig(**config)
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
        self.model_id = f"{registry['name']}/{registry['version']}" if registry else Path(path).name
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
        }

    def _engine_thread(self, path: str, ready: "Future[Any]") -> None:
        """Loads the model, builds and warms up the engine, hands the model to ``__init__``
        through ``ready``, then runs the step loop."""
        try:
            import torch

            from medgpt.checkpoint import load_model, resolve_device

            cfg = self.cfg
            torch.set_num_threads(cfg.threads or _actor_cpus())  # Ray sets OMP_NUM_THREADS=1
            model = load_model(path, device=resolve_device(cfg.device))
            if cfg.int8:
                from medgpt.quantize import quantize_int8

                model = quantize_int8(model)
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

    def _params(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stop: tuple[str, ...],
        field: str,
    ) -> tuple[list[int], SamplingParams]:
        if not prompt.strip():
            raise ApiError(400, "prompt: must not be empty", "prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt: longer than {MAX_PROMPT_CHARS} characters", "prompt")
        if max_tokens > self.cfg.max_tokens_cap:
            raise ApiError(400, f"{field}: at most {self.cfg.max_tokens_cap}", field)
        ids = self.engine.encode(prompt)
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + {field} ({max_tokens}) exceeds the model's context "
                f"of {self.context} tokens",
                field,
            )
        params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, stop)
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

    # -- routes -----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self.check_health()
        return {"status": "ok", "model": self.model_id, **self.engine.stats()}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request", "prompt")
        if body.model not in (None, self.model_id):
            raise ApiError(
                404,
                f"model {body.model!r} is not served here (serving {self.model_id!r})",
                "model",
                "not_found_error",
            )
        stops = _stops(body.stop)
        ids, base = self._params(
            prompts[0],
            body.max_tokens,
            body.temperature,
            body.top_k,
            body.top_p,
            body.seed,
            stops,
            "max_tokens",
        )
        starts = []
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            starts.append(self._start(ids, SamplingParams(**{**vars(base), "seed": seed})))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": self.model_id}

        async def merged() -> AsyncIterator[tuple[int, Event]]:
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

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                completion = 0
                async for i, ev in merged():
                    completion += len(ev.token_ids)
                    if ev.text or ev.finished:
                        choice = {
                            "text": ev.text,
                            "index": i,
                            "logprobs": None,
                            "finish_reason": ev.finish_reason if ev.finished else None,
                        }
                        yield _sse({**head, "choices": [choice]})
                if include_usage:
                    usage = {
                        "prompt_tokens": len(ids) * body.n,
                        "completion_tokens": completion,
                        "total_tokens": len(ids) * body.n + completion,
                    }
                    yield _sse({**head, "choices": [], "usage": usage})
                yield _sse("[DONE]")

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts = [""] * body.n
        reasons: list[str | None] = [None] * body.n
        completion = 0
        async for i, ev in merged():
            texts[i] += ev.text
            completion += len(ev.token_ids)
            if ev.finished:
                reasons[i] = ev.finish_reason
        return {
            **head,
            "choices": [
                {"text": t, "index": i, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
            "usage": {
                "prompt_tokens": len(ids) * body.n,
                "completion_tokens": completion,
                "total_tokens": len(ids) * body.n + completion,
            },
        }

    def _generate_start(self, body: GenerateRequest) -> tuple[int, str, asyncio.Queue[Event]]:
        ids, params = self._params(
            body.prompt,
            body.max_new_tokens,
            body.temperature,
            body.top_k,
            body.top_p,
            body.seed,
            _stops(body.stop),
            "max_new_tokens",
        )
        rid, q = self._start(ids, params)
        return len(ids), rid, q

    def _summary(
        self, n_prompt: int, n_out: int, reason: str | None, t0: float, ttft: float | None
    ) -> dict:
        seconds = time.perf_counter() - t0
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "finish_reason": reason,
            "seconds": round(seconds, 4),
            "ttft_s": None if ttft is None else round(ttft, 4),
            "tokens_per_s": round(n_out / seconds, 2) if seconds > 0 else None,
            "model": {
                k: self.model_card[k] for k in ("id", "registry_version", "val_loss", "eval_loss")
            },
        }

    @app.post("/generate")
    async def generate(self, body: GenerateRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        n_prompt, rid, q = self._generate_start(body)
        text, n_out, reason, ttft = [], 0, None, None
        async for ev in self._events(rid, q):
            if ev.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(ev.text)
            n_out += len(ev.token_ids)
            reason = ev.finish_reason
        return {"text": "".join(text), **self._summary(n_prompt, n_out, reason, t0, ttft)}

    @app.post("/generate/stream")
    async def generate_stream(self, body: GenerateRequest) -> StreamingResponse:
        t0 = time.perf_counter()
        n_prompt, rid, q = self._generate_start(body)

        async def sse() -> AsyncIterator[str]:
            n_out, ttft = 0, None
            async for ev in self._events(rid, q):
                if ev.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                n_out += len(ev.token_ids)
                if ev.text:
                    yield _sse({"text": ev.text})
                if ev.finished:
                    yield _sse(
                        {"done": True, **self._summary(n_prompt, n_out, ev.finish_reason, t0, ttft)}
                    )

        return StreamingResponse(sse(), media_type="text/event-stream")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``serve run serve/config.yaml``: the config's ``args`` → the app. Serve requires a
    builder of exactly one parameter (it refuses a second, even with a default); the
    deployment's options come from the config's ``deployments`` section."""
    return build_app(args)


def build_app(args: dict[str, Any], deployment: dict[str, Any] | None = None) -> serve.Application:
    """The app from ``args`` (and, for ``medgpt serve``, the deployment's options).

    Runs on the driver: relative paths become absolute (replicas run in another cwd), and the
    checkpoint is resolved here first, so a wrong path or registry name fails at once with
    one line instead of as a replica that keeps crashing."""
    from medgpt.checkpoint import read_config, resolve_checkpoint
    from medgpt.tracking import tracking_uri_for

    cfg = ServeConfig(**(args or {}))
    data = cfg.model_dump()
    data["storage_path"] = str(Path(cfg.storage_path).resolve())
    if not cfg.checkpoint.startswith(("models:/", "runs:/")) and Path(cfg.checkpoint).exists():
        data["checkpoint"] = str(Path(cfg.checkpoint).resolve())
    data["tracking_uri"] = tracking_uri_for(data["storage_path"], cfg.tracking_uri)
    path, _ = resolve_checkpoint(
        data["checkpoint"], data["tracking_uri"], Path(data["storage_path"]) / "downloads"
    )
    read_config(path)  # a medgpt checkpoint, readable
    server = MedgptServer.options(**deployment) if deployment else MedgptServer
    return server.bind(data)
