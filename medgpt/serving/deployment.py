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
import contextlib
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


def _mem_available_bytes() -> int | None:
    """What this machine (or the replica's cgroup, when it is tighter) can still give."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _trim_heap() -> None:
    """Hand freed weights back to the system: glibc keeps freed heap pages otherwise."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclasses.dataclass
class Loaded:
    """One version a replica serves: its engine and what names it on every answer."""

    engine: Any  # medgpt.generation.Engine; None once freed
    path: str
    registry: dict[str, Any] | None
    model_id: str
    card: dict[str, Any]
    lineage: dict[str, Any]

    @property
    def version(self) -> str | None:
        return self.registry["version"] if self.registry else None

    @property
    def context(self) -> int:
        return int(self.card["context_length"])

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: which weights, training run and data answered."""
        run = (self.lineage.get("training_run_id") or "-")[:12]
        data = (self.lineage.get("data_hash") or "-")[:12]
        return f"{self.model_id}+run.{run}+data.{data}"

    def headers(self) -> dict[str, str]:
        return {
            "X-Medgpt-Model": self.model_id,
            "X-Medgpt-Lineage": "; ".join(f"{k}={v}" for k, v in self.lineage.items() if v),
        }


# Options (CPUs, request limit, replicas) come from the serve config through
# ServeConfig.deployment_options, applied by medgpt.serving.build_app.
@serve.deployment
@serve.ingress(app)
class MedgptServer:
    def __init__(self, config: dict[str, Any]) -> None:
        from medgpt.registry import parse_model_uri, resolve_checkpoint
        from medgpt.tracking import tracking_uri_for

        cfg = ServeConfig.from_dict(config)
        self.cfg = cfg
        storage = Path(cfg.storage_path)
        self.tracking_uri = tracking_uri_for(str(storage), cfg.tracking_uri)
        self.cache_dir = storage / "downloads"
        path, registry = resolve_checkpoint(cfg.checkpoint, self.tracking_uri, self.cache_dir)
        # A models:/NAME@ALIAS checkpoint is followed: the alias is re-read and a new version
        # rolled out (medgpt.rollout).
        self.follows: tuple[str, str] | None = None
        if cfg.checkpoint.startswith("models:/"):
            name, alias, _ = parse_model_uri(cfg.checkpoint)
            if alias is not None and cfg.follow_poll_s > 0:
                self.follows = (name, alias)
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._owner: dict[str, Loaded] = {}  # request id -> the version that serves it
        self._metrics()
        self._event_loop = asyncio.get_running_loop()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        # Which version takes a request, and freeing a drained one, under one lock: a request
        # is submitted to the version it was given, never to one being freed.
        self._swap_lock = threading.Lock()
        self.retiring: list[Loaded] = []
        self._pending: tuple[str, dict[str, Any], str, Future[Any]] | None = None
        self._admit = asyncio.Event()  # cleared while a drained replica swaps versions
        self._admit.set()
        self._refresh = asyncio.Event()
        self.rollout: dict[str, Any] = {"state": "idle", "following": self.follows is not None}
        self._failed: dict[str, str] = {}  # versions that could not be loaded -> why
        # Every torch operation of the replica (load, warm-up, steps) runs in this one thread.
        # OpenMP (libgomp) gives each thread that starts parallel regions a pool of its own;
        # with two pools it manages more threads than the replica has CPUs and stops spinning
        # at barriers: every region then sleeps and wakes its threads. Loading in __init__'s
        # thread and stepping here did that: 65-100 futex sleeps a step, steps ~10% slower in
        # a probe, and at 8 streams a third of a core idle and c=8 7% slower in Serve.
        ready: Future[Any] = Future()
        self._stepper = threading.Thread(
            target=self._engine_thread, args=(str(path), registry, ready), name="medgpt-engine",
            daemon=True,
        )  # fmt: skip
        self._stepper.start()
        self.current: Loaded = ready.result()  # re-raises what loading or the warm-up raised
        self._follower = (
            asyncio.get_running_loop().create_task(self._follow()) if self.follows else None
        )

    @property
    def engine(self) -> Any:
        return self.current.engine

    @property
    def model_id(self) -> str:
        return self.current.model_id

    @property
    def model_card(self) -> dict[str, Any]:
        return self.current.card

    # -- loading (the engine thread only) -----------------------------------------------------

    def _load(self, path: str, registry: dict[str, Any] | None) -> Loaded:
        """Load, build and warm up one version's engine; its card and lineage."""
        import torch

        from medgpt.checkpoint import read_meta

        cfg = self.cfg
        torch.set_num_threads(cfg.threads or _actor_cpus())  # Ray sets OMP_NUM_THREADS=1
        model = load_replica_model(path, cfg.replica_device(), cfg.dtype, cfg.int8)
        engine = Engine(
            model,
            cfg.max_batch_size,
            cfg.max_queue,
            kv_cache_tokens=cfg.kv_cache_tokens,
            fast_linear=cfg.fast_linear,
        )
        engine.generate("warm up", SamplingParams(max_new_tokens=2, temperature=0))
        meta = read_meta(path)
        tags = registry["tags"] if registry else {}
        # A model id without "/": clients put it in URL paths (GET /v1/models/{id}).
        model_id = f"{registry['name']}-v{registry['version']}" if registry else Path(path).name
        card = {
            "id": model_id,
            "object": "model",
            "created": int(Path(path, "model.safetensors").stat().st_mtime),
            "owned_by": "medgpt",
            "checkpoint": cfg.checkpoint,
            "registry_name": registry["name"] if registry else None,
            "registry_version": registry["version"] if registry else None,
            "registry_aliases": registry["aliases"] if registry else [],
            "training_run_id": meta.get("mlflow_run_id"),
            "step": meta.get("step"),
            "val_loss": meta.get("val_loss"),
            "eval_loss": float(tags["eval_loss"]) if "eval_loss" in tags else None,
            "context_length": model.config.block_size,
            "int8": cfg.int8,
            "fast_linear": engine.fast_linear,
            "device": str(engine.device),
            "dtype": cfg.dtype,
        }
        lineage = {
            "model": model_id,
            "registry_version": f"{registry['name']}/{registry['version']}" if registry else None,
            "training_run_id": meta.get("mlflow_run_id") or tags.get("training_run_id"),
            "data_hash": meta.get("data_manifest_hash") or tags.get("data_manifest_hash"),
            "checkpoint_sha256": tags.get("checkpoint_sha256"),
        }
        card["lineage"] = lineage
        return Loaded(engine, path, registry, model_id, card, lineage)

    def _free(self, loaded: Loaded) -> None:
        loaded.engine = None
        _trim_heap()

    def _engine_thread(
        self, path: str, registry: dict[str, Any] | None, ready: "Future[Any]"
    ) -> None:
        """Loads the first version and hands it to ``__init__`` through ``ready``, then runs
        the step loop."""
        try:
            loaded = self._load(path, registry)
        except BaseException as e:
            ready.set_exception(e)
            return
        self.current = loaded  # before the step loop reads it
        ready.set_result(loaded)
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
        """The engine thread: steps every version with work (the current one, and old ones
        finishing their streams), frees old ones once drained, swaps in a new version when
        one is handed over, and sleeps on ``_wake`` when there is nothing to do."""
        try:
            while not self._stop.is_set():
                if self._pending is not None:
                    self._swap()
                with self._swap_lock:
                    drained = [r for r in self.retiring if not r.engine.has_work]
                    self.retiring = [r for r in self.retiring if r not in drained]
                for r in drained:
                    self._free(r)
                    self._event_loop.call_soon_threadsafe(self._retired, r.model_id)
                busy = [v for v in (self.current, *self.retiring) if v.engine.has_work]
                if not busy:
                    # Cleared before has_work is read again, so a submit in between is seen.
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                for v in busy:
                    self._step(v)
        except BaseException as e:
            self._failure = e
            raise

    def _step(self, v: Loaded) -> None:
        events = v.engine.step()
        running = v.engine.stats()["running"]
        self._event_loop.call_soon_threadsafe(self._deliver, events, running)

    def _swap(self) -> None:
        """Take the handed-over version (``_pending``): beside the current one, which keeps
        stepping its streams until they finish (then it is freed); or, drained, after the
        current one finished its streams and was freed (new requests wait meanwhile), and
        back to it if the new one does not load."""
        path, registry, mode, done = self._pending  # type: ignore[misc]
        self._pending = None
        old = self.current
        try:
            if mode == "drain":
                while old.engine.has_work and not self._stop.is_set():
                    self._step(old)
                self._free(old)
                try:
                    new = self._load(path, registry)
                except BaseException:
                    self.current = self._load(old.path, old.registry)
                    raise
                with self._swap_lock:
                    self.current = new
            else:
                new = self._load(path, registry)
                with self._swap_lock:
                    self.current = new
                    self.retiring.append(old)
        except BaseException as e:
            done.set_exception(e)
            return
        done.set_result(new.model_id)

    def _deliver(self, events: list[Event], running: int) -> None:
        self.m_batch.set(running)
        for ev in events:
            q = self._queues.get(ev.request_id)
            if q is not None:
                q.put_nowait(ev)

    def _retired(self, model_id: str) -> None:
        self.rollout["retired"] = model_id
        self.rollout["rss_mib_after_free"] = round(_rss_bytes() / 2**20, 1)

    async def check_health(self) -> None:
        if not self._stepper.is_alive():
            raise RuntimeError(f"the decode loop stopped: {self._failure!r}")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica gracefully.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # -- following the registry alias (the event loop) ----------------------------------------

    async def _follow(self) -> None:
        """Re-read the alias every ``follow_poll_s`` seconds, or at once when told (here, or
        through the app's coordinator by another replica), and roll out what it names."""
        import ray

        from medgpt.rollout import coordinator

        seen, coord = 0, None
        in_serve = ray.is_initialized() and self._replica_context() is not None
        while not self._stop.is_set():
            if not in_serve:  # a replica built outside Serve (tests): no peers
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._refresh.wait(), self.cfg.follow_poll_s)
                told = self._refresh.is_set()
                self._refresh.clear()
                await self._check_alias_logged(None, told)
                continue
            try:
                if coord is None:
                    coord = coordinator(self._app_name())
                    seen = await coord.wait.remote(-1, 0)
                here = asyncio.ensure_future(self._refresh.wait())
                polled = asyncio.ensure_future(coord.wait.remote(seen, self.cfg.follow_poll_s))
                done, _ = await asyncio.wait(
                    {here, polled}, timeout=self.cfg.follow_poll_s + 5,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                here.cancel()
                told = self._refresh.is_set()
                if polled in done:
                    told = told or polled.result() > seen
                    seen = polled.result()
                else:
                    polled.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the coordinator died with its replica: make another
                coord = None
                self.rollout["coordinator_error"] = f"{type(e).__name__}: {e}"
                await asyncio.sleep(min(self.cfg.follow_poll_s, 5))
                told = self._refresh.is_set()
            self._refresh.clear()
            await self._check_alias_logged(coord, told)

    async def _check_alias_logged(self, coord: Any, told: bool) -> None:
        try:
            await self._check_alias(coord, told)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the registry unreachable: serve on, try at the next poll
            self.rollout.update(state="error", error=f"{type(e).__name__}: {e}")

    def _replica_context(self) -> Any:
        try:
            return serve.get_replica_context()
        except Exception:  # built outside Serve (tests)
            return None

    def _app_name(self) -> str:
        ctx = self._replica_context()
        return ctx.app_name if ctx is not None else f"local-{os.getpid()}"

    def _replica_tag(self) -> str:
        ctx = self._replica_context()
        return ctx.replica_tag if ctx is not None else f"local-{os.getpid()}-{id(self)}"

    def _mode(self, path: Path) -> tuple[str, str]:
        """beside or drain, and why (``rollout: auto`` decides by memory)."""
        if self.cfg.rollout != "auto":
            return self.cfg.rollout, "the serve config says so"
        cur = self.current.engine
        weights = Path(path, "model.safetensors").stat().st_size
        if self.cfg.dtype != "float32":
            weights //= 2
        need = int(weights * 1.1) + cur.stats()["cache_bytes"]
        if self.cfg.memory_mb is not None:
            left = self.cfg.memory_mb * 2**20 - _rss_bytes()
        else:
            left = _mem_available_bytes() or 0
        why = f"needs ~{need / 2**20:.0f} MiB beside the current version, {left / 2**20:.0f} MiB left"
        return ("beside" if need < 0.9 * left else "drain"), why

    async def _check_alias(self, coord: Any, told: bool) -> None:
        """Roll out the version the alias names, unless it is the one served or one that
        failed here before: polls skip those (no retry storm), being told retries them (the
        store was down, say, and is back)."""
        from medgpt.registry import alias_version, fetch_registered

        name, alias = self.follows  # type: ignore[misc]
        version = await asyncio.to_thread(alias_version, self.tracking_uri, name, alias)
        self.rollout["checked_at"] = time.time()
        if version is None or version == self.current.version:
            return
        if version in self._failed and not told:
            return
        t0 = time.perf_counter()
        self.rollout.update(state="downloading", version=version, error=None)
        try:
            path, registry = await asyncio.to_thread(
                fetch_registered, self.tracking_uri, f"models:/{name}/{version}", self.cache_dir
            )
        except Exception as e:
            self._failed[version] = str(e)
            self.rollout.update(state="refused", error=str(e))
            return
        mode, why = self._mode(path)
        me, locked = self._replica_tag(), False
        if mode == "drain" and coord is not None:
            # One replica of the app at a time: the others keep serving meanwhile.
            self.rollout.update(state="waiting for the other replicas")
            while not await coord.acquire.remote(me, 600.0):
                await asyncio.sleep(0.5)
            locked = True
        self.rollout.update(state=f"loading ({mode})", mode=mode, why=why)
        if mode == "drain":
            self._admit.clear()
            self.rollout["drain_started"] = time.time()
        done: Future[Any] = Future()
        self._pending = (str(path), registry, mode, done)
        self._wake.set()
        try:
            await asyncio.wrap_future(done)
            self.rollout.update(state="idle", serving=self.current.model_id, swapped_at=time.time(),
                                seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
        except Exception as e:
            self._failed[version] = str(e)
            self.rollout.update(state="failed", error=f"{type(e).__name__}: {e}")
        finally:
            self._admit.set()
            if locked:
                await coord.release.remote(me)

    # -- plumbing ---------------------------------------------------------------------------

    async def _body(self, request: Request, model: type) -> Any:
        raw = await read_body(request)
        return parse_body(model, raw, max_tokens_cap=self.cfg.max_tokens_cap)

    async def _serving(self) -> Loaded:
        """The version new requests go to (waiting while a drained replica swaps)."""
        await self._admit.wait()
        return self.current

    def _params(
        self,
        served: Loaded,
        prompt: str | list[int],
        max_tokens: int,
        body: Any,
        field: str,
        seed: int | None,
    ) -> tuple[list[int], SamplingParams]:
        """The prompt's tokens and sampling parameters; the model's context is the one limit
        the protocol cannot check without the tokenizer."""
        ids = served.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_tokens > served.context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + {field} ({max_tokens}) exceeds the model's context "
                f"of {served.context} tokens",
                field,
            )
        params = SamplingParams(
            max_tokens, body.temperature, body.top_k, body.top_p, seed, body.stops
        )
        return ids, params

    def _start(
        self, served: Loaded, ids: list[int], params: SamplingParams
    ) -> tuple[str, asyncio.Queue[Event]]:
        rid = uuid.uuid4().hex
        q: asyncio.Queue[Event] = asyncio.Queue()
        with self._swap_lock:
            if served.engine is None:  # freed since: a drained swap; cannot happen beside
                raise ApiError(503, "the model is being replaced; retry shortly", None,
                               "server_overloaded", {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            try:
                served.engine.submit(rid, ids, params)
            except QueueFull:
                self.m_requests.inc(tags={"outcome": "rejected"})
                raise ApiError(
                    503,
                    "the server is busy; retry shortly",
                    None,
                    "server_overloaded",
                    {"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            self._owner[rid] = served
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
            owner = self._owner.pop(rid, None)
            if not done and owner is not None and owner.engine is not None:
                owner.engine.cancel(rid)
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

    def _check_model(self, model: str | None, served: Loaded) -> None:
        """A request may name the version it gets, one still finishing, or the registry name
        (and name@alias) a followed alias serves under whatever version."""
        ok = {None, served.model_id, *(r.model_id for r in self.retiring)}
        if served.registry:
            ok.add(served.registry["name"])
        if self.follows:
            ok.add(f"{self.follows[0]}@{self.follows[1]}")
        if model not in ok:
            raise ApiError(
                404,
                f"model {model!r} is not served here (serving {served.model_id!r})",
                "model",
                "not_found_error",
            )

    # -- routes -----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self.check_health()
        served = await self._serving()
        return {
            "status": "ok",
            "model": served.model_id,
            **served.engine.stats(),
            "rollout": dict(self.rollout),
            "versions_loaded": [served.model_id, *(r.model_id for r in self.retiring)],
            "rss_mib": round(_rss_bytes() / 2**20, 1),
            "replica": self._replica_tag(),
            "pid": os.getpid(),
        }

    @app.post("/admin/refresh")
    async def refresh(self) -> JSONResponse:
        """Re-read the alias now, here and (through the coordinator) in every replica."""
        if not self.follows:
            raise ApiError(
                400,
                f"this app serves {self.cfg.checkpoint}, not a models:/NAME@ALIAS it could follow "
                "(or follow_poll_s is 0)",
            )
        self._refresh.set()
        import ray

        if ray.is_initialized() and self._replica_context() is not None:
            from medgpt.rollout import coordinator

            # The coordinator being remade (its replica died): this replica checks anyway.
            with contextlib.suppress(Exception):
                await coordinator(self._app_name()).bump.remote()
        return JSONResponse({"refreshing": True, "serving": self.current.model_id},
                            status_code=202)  # fmt: skip

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        served = await self._serving()
        return {"object": "list", "data": [served.card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        served = await self._serving()
        if model_id != served.model_id:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here (serving {served.model_id!r})",
                "model",
                "not_found_error",
            )
        return served.card

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict[str, Any]:
        # vLLM's fields that lm-eval reads (eos/bos/pad), GPT-2's as Hugging Face sets them.
        served = await self._serving()
        return {
            "tokenizer_class": "GPT2TokenizerFast",
            "name": "gpt2",
            "vocab_size": served.engine.enc.n_vocab,
            "eos_token": EOT_TOKEN,
            "bos_token": EOT_TOKEN,
            "unk_token": EOT_TOKEN,
            "pad_token": None,
            "model_max_length": served.context,
        }

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body: TokenizeRequest = await self._body(request, TokenizeRequest)
        served = await self._serving()
        self._check_model(body.model, served)
        ids = served.engine.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        served = await self._serving()
        self._check_model(body.model, served)
        return {"prompt": served.engine.enc.decode(body.tokens, errors="replace")}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        served = await self._serving()
        self._check_model(body.model, served)
        ids, base = self._params(
            served, body.the_prompt, body.max_tokens, body, "max_tokens", body.seed
        )
        if body.logprobs is not None:  # with echo, the prompt's tokens are scored too
            base = dataclasses.replace(base, logprobs=body.logprobs, prompt_logprobs=body.echo)
        starts = []
        for i in range(body.n):  # choice i samples with seed + i
            seed = None if body.seed is None else body.seed + i
            starts.append(self._start(served, ids, dataclasses.replace(base, seed=seed)))
        out = Completion(
            served.model_id,
            len(ids),
            body.n,
            echo=served.engine.enc.decode(ids, errors="replace") if body.echo else None,
            logprobs=body.logprobs,
            system_fingerprint=served.fingerprint,
        )
        headers = served.headers()
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

            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
        async for i, ev in self._merged(starts):
            out.add(i, ev)
        return JSONResponse(out.body(), headers=headers)

    async def _generate_start(
        self, body: GenerateRequest
    ) -> tuple[Loaded, Generation, str, asyncio.Queue[Event]]:
        served = await self._serving()
        ids, params = self._params(
            served, body.prompt, body.max_new_tokens, body, "max_new_tokens", body.seed
        )
        gen = Generation(served.card, len(ids))
        rid, q = self._start(served, ids, params)
        return served, gen, rid, q

    async def generate_body(self, body: GenerateRequest) -> dict[str, Any]:
        """``/generate``'s answer for a checked body (also the unit tests' way in)."""
        _, gen, rid, q = await self._generate_start(body)
        async for ev in self._events(rid, q):
            gen.add(ev)
        return gen.body()

    @app.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        body: GenerateRequest = await self._body(request, GenerateRequest)
        served, gen, rid, q = await self._generate_start(body)
        async for ev in self._events(rid, q):
            gen.add(ev)
        return JSONResponse(gen.body(), headers=served.headers())

    @app.post("/generate/stream")
    async def generate_stream(self, request: Request) -> StreamingResponse:
        body: GenerateRequest = await self._body(request, GenerateRequest)
        served, gen, rid, q = await self._generate_start(body)

        async def stream() -> AsyncIterator[str]:
            # First, which version answers (the page shows it while the text arrives).
            yield sse({"model": gen.model})
            async for ev in self._events(rid, q):
                for payload in gen.events(ev):
                    yield sse(payload)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers=served.headers()
        )
