"""HTTP serving benchmark: the Ray Serve app under 1, 2, 4, 8, 16 concurrent streaming clients.

Definitions follow vLLM's ``benchmarks/benchmark_serving.py`` (``--max-concurrency`` with an
unlimited request rate): at each concurrency level C, N requests (``--requests``; default
``max(8, 2*C)``) are sent by C client workers (asyncio + ``aiohttp``, one connection pool), each
worker starting its next request as soon as its previous one has finished. By default (see
``--paths`` below for the others) every request is ``POST /v1/completions`` with ``stream:
true`` and ``stream_options: {"include_usage": true}``, one of a fixed set of medical prompts
(24-38 GPT-2 tokens), ``max_tokens`` (``--max-tokens``), temperature 0.8 and a distinct seed.

Per request, measured at the client from just before the POST:

* TTFT   time to the first chunk carrying non-empty ``choices[0].text``
* ITL    the gaps between successive text chunks after the first (one token per chunk, except
  where a UTF-8 character spans tokens and two arrive together)
* E2EL   time until ``data: [DONE]`` (end-to-end latency)
* TPOT   (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token;
  output tokens are ``usage.completion_tokens`` from the last chunk before ``[DONE]``

Per level: duration (first request sent to last one finished), request throughput
(completed / duration), output token throughput (output tokens / duration), and the mean,
median and p99 of TTFT, TPOT, ITL and E2EL (``numpy.percentile``, linear, as vLLM). The API has
no ``ignore_eos``: a random-init model rarely samples end-of-text, and real counts come from
``usage`` anyway (the output lists any request that stopped early).

Unless ``--url`` is given, the benchmark serves a model itself: a random-init checkpoint of
``--size`` (``torch.manual_seed(0)``; decode speed does not depend on what the weights learned)
or ``--checkpoint``, on a PRIVATE local Ray (``ray.init(address="local", num_cpus=2)``: it never
joins another cluster running on this machine), Serve's HTTP proxy on a free port of 127.0.0.1,
one ``MedgptServer`` replica (``max_batch_size`` 16, ``kv_cache_tokens`` as ServeConfig's
default unless ``--kv-cache-tokens``, 2 CPUs, 2 torch threads). The replica's peak resident
memory (``VmHWM`` of its process, found through the actor table) is reported against the
1.5 GB requirement: at start-up, then reset (``/proc/PID/clear_refs``) and read again after
each level, so the peak while serving shows apart from the checkpoint load's; with the
engine's KV cache figures from ``/healthz``. The client runs on the same machine as the
server and takes some of the same CPUs, as a local user's would.

``--paths`` measures more than ``/v1/completions``, every path at every level against the same
replica (the paths take turns going first; each sends the same request ids, so the same
prompts and seeds): ``serve`` is Serve's ``POST /generate/stream`` and ``web`` the same body
(``prompt``, ``max_new_tokens``, ``temperature``, ``seed``) to the Flask front's
``POST /api/generate/stream``, which validates it and relays Serve's SSE bytes. For ``web`` the
benchmark starts ``web.app.create_app({"SERVE_URL": <Serve>})`` in a subprocess on a free
127.0.0.1 port: gunicorn with gthread workers (``--web-workers``, ``--web-threads``) when it
is installed, else werkzeug's threaded ``run_simple``. Both /generate/stream paths send
``{"text"}`` per token (text chunks give TTFT and ITL) and end with ``{"done": true, ...}``
carrying ``completion_tokens``. With ``serve`` and ``web`` together the summary adds a table
per level of output tok/s and TTFT, ITL and E2E medians, direct vs via the front and their
ratio (via web / direct), whether both paths produced identical texts, and the front's peak
resident memory (``VmHWM`` of the gunicorn master and each worker; never reset, so start-up
is included).

    python bench/serve_http.py --size tiny --max-tokens 16 --concurrency 1,4   # smoke, ~1 min
    python bench/serve_http.py                                 # gpt2 124M fp32, ~5 minutes
    python bench/serve_http.py --int8 --json int8.json
    python bench/serve_http.py --url http://127.0.0.1:8000     # an already running server
    python bench/serve_http.py --paths serve,web --concurrency 1,2,4,8   # Flask -> Serve vs Serve
    python bench/serve_http.py --size tiny --max-tokens 16 --concurrency 1,4 --paths serve,web
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medgpt.testing import REPO, free_port
from medgpt.testing import bench as harness

PROMPTS = [
    "The patient is a 67-year-old woman with a history of congestive heart failure and atrial "
    "fibrillation who presents with worsening dyspnea on exertion.",
    "Question: What are the first-line pharmacological treatments for newly diagnosed essential "
    "hypertension in adults without diabetes?\nAnswer:",
    "ICD-10-CM E11.9: Type 2 diabetes mellitus without complications. Use additional code to "
    "identify control using insulin or oral hypoglycemic drugs.",
    "Discharge summary: the patient was admitted with community-acquired pneumonia, treated with "
    "intravenous ceftriaxone and azithromycin, and improved steadily.",
    "Acute kidney injury is defined by an increase in serum creatinine of at least 0.3 mg/dL "
    "within 48 hours or a decrease in urine output.",
    "Question: How should a clinician evaluate a child presenting with fever, irritability and a "
    "non-blanching petechial rash?\nAnswer:",
    "Chronic obstructive pulmonary disease is characterised by persistent respiratory symptoms "
    "and airflow limitation due to airway and alveolar abnormalities.",
    "Medication reconciliation: metformin 1000 mg twice daily, lisinopril 20 mg once daily, "
    "atorvastatin 40 mg at bedtime, and aspirin 81 mg daily.",
]
TEMPERATURE = 0.8
SEED_BASE = 1000
RSS_LIMIT_BYTES = 1.5e9  # the project's requirement for a GPT-2 124M fp32 replica
RATIO_TARGET = 4.0  # output tok/s at concurrency 8 / at concurrency 1
REPLICA_CLASS = "MedgptServer"


# ---------------------------------------------------------------------------------------------
# One request


def _completions_event(data: str) -> dict[str, Any]:
    """One ``/v1/completions`` SSE payload: text chunks, then a usage chunk, then [DONE]."""
    if data == "[DONE]":
        return {"done": True}
    chunk = json.loads(data)
    ev: dict[str, Any] = {"text": ""}
    if chunk.get("usage"):
        ev["output_tokens"] = chunk["usage"]["completion_tokens"]
        ev["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
    for choice in chunk.get("choices") or []:
        ev["text"] += choice.get("text") or ""
        if choice.get("finish_reason"):
            ev["finish_reason"] = choice["finish_reason"]
    return ev


def _generate_event(data: str) -> dict[str, Any]:
    """One ``/generate/stream`` payload (Serve's, relayed byte for byte by the web front):
    ``{"text"}`` per token, then ``{"done": true, ...counts}``; the front adds ``{"error"}``
    when it loses Serve mid-stream."""
    chunk = json.loads(data)
    if "error" in chunk:
        return {"error": str((chunk["error"] or {}).get("message"))[:200]}
    ev: dict[str, Any] = {"text": chunk.get("text") or ""}
    if chunk.get("done"):
        ev.update(done=True, output_tokens=chunk.get("completion_tokens"),
                  prompt_tokens=chunk.get("prompt_tokens"),
                  finish_reason=chunk.get("finish_reason"))  # fmt: skip
    return ev


# path -> (route, payload parser, mount): "web" is the Flask front, the others Serve itself.
PATHS: dict[str, tuple[str, Any, str]] = {
    "completions": ("/v1/completions", _completions_event, "serve"),
    "serve": ("/generate/stream", _generate_event, "serve"),
    "web": ("/api/generate/stream", _generate_event, "web"),
}


def _label(path: str) -> str:
    route, _, mount = PATHS[path]
    if mount == "web":
        return f"{path}: web front {route} -> Serve {PATHS['serve'][0]}"
    return f"{path}: Serve {route}"


async def one_request(session: Any, url: str, body: dict[str, Any], path: str) -> dict[str, Any]:
    """Stream one generation; client-side timings (seconds) and the server's token counts."""
    out: dict[str, Any] = {"ok": False, "ttft": None, "itl": [], "latency": None,
                           "output_tokens": None, "prompt_tokens": None, "chunks": 0,
                           "finish_reason": None, "text": "", "error": None}  # fmt: skip
    parse = PATHS[path][1]
    t0 = time.perf_counter()
    last = t0
    done = False
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for raw in resp.content:  # one SSE line at a time
                now = time.perf_counter()
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                ev = parse(line[len("data:") :].strip())
                if ev.get("error"):
                    out["error"] = ev["error"]
                    break
                for key in ("output_tokens", "prompt_tokens", "finish_reason"):
                    if ev.get(key) is not None:
                        out[key] = ev[key]
                if ev.get("text"):
                    if out["ttft"] is None:
                        out["ttft"] = now - t0
                    else:
                        out["itl"].append(now - last)
                    last = now
                    out["chunks"] += 1
                    out["text"] += ev["text"]
                # /generate/stream has no [DONE] line after its done event
                if ev.get("done"):
                    done = True
                    break
        out["latency"] = time.perf_counter() - t0
        if out["error"] is None and not done:
            out["error"] = "stream ended before its end event"
        elif out["error"] is None and out["output_tokens"] is None:
            out["error"] = "no token count"
        elif out["error"] is None and out["ttft"] is None:
            out["error"] = "no text"
        out["ok"] = out["error"] is None
    except Exception as e:  # a failed request is counted, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
        out["latency"] = time.perf_counter() - t0
    return out


def request_body(i: int, max_tokens: int, model: str | None, path: str) -> dict[str, Any]:
    """The same prompt, length, temperature and seed on every path; /generate/stream has its
    own field names and no model field (the web front refuses unknown fields)."""
    if path != "completions":
        return {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_tokens,
                "temperature": TEMPERATURE, "seed": SEED_BASE + i}  # fmt: skip
    body = {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "seed": SEED_BASE + i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


async def run_level(
    base_url: str, concurrency: int, n_requests: int, max_tokens: int, first_id: int,
    model: str | None, path: str = "completions",
) -> dict[str, Any]:  # fmt: skip
    import aiohttp

    url = base_url.rstrip("/") + PATHS[path][0]
    ids = iter(range(first_id, first_id + n_requests))
    results: list[dict[str, Any]] = []

    async def worker(session: Any) -> None:
        for i in ids:  # shared iterator: each worker takes the next request when it is free
            res = await one_request(session, url, request_body(i, max_tokens, model, path), path)
            res["id"] = i
            results.append(res)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    s = summarize(concurrency, sorted(results, key=lambda r: r["id"]), duration, max_tokens)
    return {"path": path, **s}


# ---------------------------------------------------------------------------------------------
# Metrics


def _stats(xs: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not xs:
        return {"mean": None, "median": None, "p99": None, "std": None}
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99)), "std": float(a.std())}  # fmt: skip


def _digest(text: str) -> str:
    """Stands in for the text in the results: enough to tell whether two paths produced the
    same output, without the JSON carrying every generation."""
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def summarize(
    concurrency: int, results: list[dict[str, Any]], duration: float, max_tokens: int
) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    tpots = [
        (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1
    ]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "short": [r["id"] for r in ok if r["output_tokens"] < max_tokens],
        "duration_s": duration,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "ttft_s": _stats([r["ttft"] for r in ok]),
        "tpot_s": _stats(tpots),
        "itl_s": _stats([x for r in ok for x in r["itl"]]),
        "e2el_s": _stats([r["latency"] for r in ok]),
        "results": [
            {k: v for k, v in r.items() if k != "text"} | {"text_sha1": _digest(r["text"])}
            for r in results
        ],
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def print_level(s: dict[str, Any]) -> None:
    """vLLM's result block for one concurrency level."""
    width = 50
    print(f"{' Serving Benchmark Result: concurrency ' + str(s['concurrency']) + ' ':=^{width}}")
    rows = [
        ("Successful requests:", f"{s['completed']}"),
        ("Failed requests:", f"{s['failed']}"),
        ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
        ("Total input tokens:", f"{s['prompt_tokens']}"),
        ("Total generated tokens:", f"{s['output_tokens']}"),
        ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
    ]
    sections = (("Time to First Token", "TTFT", "ttft_s"), ("Time per Output Token (excl. "
                "1st token)", "TPOT", "tpot_s"), ("Inter-token Latency", "ITL", "itl_s"),
                ("End-to-end Latency", "E2EL", "e2el_s"))  # fmt: skip
    for title, name, key in sections:
        rows.append((title, None))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append((f"{label} {name} (ms):", _ms(s[key][stat])))
    for name, value in rows:
        print(f"{name:-^{width}}" if value is None else f"{name:<40}{value:>10}")
    for err in s["errors"]:
        print(f"  error: {err}")
    if s["short"]:
        print(f"  {len(s['short'])} request(s) stopped before max_tokens (end-of-text)")
    print("=" * width)


def print_table(levels: list[dict[str, Any]]) -> None:
    header = (
        f"{'conc':>4}{'reqs':>6}{'fail':>5}{'dur s':>8}{'req/s':>7}{'out tok/s':>10}"
        f"{'TTFT mean/med/p99 ms':>24}{'TPOT mean/med/p99 ms':>23}{'ITL mean/med/p99 ms':>23}"
        f"{'E2EL med s':>11}"
    )
    print(header)
    print("-" * len(header))
    for s in levels:
        trio = {
            k: "/".join(f"{1e3 * s[k][x]:.0f}" if s[k][x] is not None else "-"
                        for x in ("mean", "median", "p99"))
            for k in ("ttft_s", "tpot_s", "itl_s")
        }  # fmt: skip
        med = s["e2el_s"]["median"]
        print(
            f"{s['concurrency']:>4}{s['requests']:>6}{s['failed']:>5}{s['duration_s']:>8.1f}"
            f"{s['request_throughput']:>7.2f}{s['output_throughput']:>10.1f}"
            f"{trio['ttft_s']:>24}{trio['tpot_s']:>23}{trio['itl_s']:>23}"
            f"{'-' if med is None else f'{med:.2f}':>11}"
        )


# ---------------------------------------------------------------------------------------------
# Server side: a private Ray, the app, the replica's memory


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    import requests

    try:
        r = requests.get(url, timeout=timeout)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text
    except requests.RequestException as e:
        return 0, str(e)


def wait_healthy(base_url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status, body = 0, None
    while time.monotonic() < deadline:
        status, body = _http_get(base_url + "/healthz")
        if status == 200:
            return body
        time.sleep(1.0)
    raise RuntimeError(f"{base_url}/healthz not 200 within {timeout_s:.0f} s: {status} {body}")


def replica_pid(dashboard_url: str | None) -> tuple[int | None, str]:
    """The pid of the ALIVE MedgptServer replica of THIS driver's cluster, and how it was found.

    ``ray.util.state.list_actors`` needs the dashboard's state API (off here, and another
    cluster's dashboard must not answer instead), so the GCS actor table of the connected
    cluster is the fallback; both give the actor's ``pid``."""
    if dashboard_url:
        try:
            from ray.util.state import list_actors

            actors = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")],
                                 detail=True)  # fmt: skip
            pids = [a.pid for a in actors if REPLICA_CLASS in a.class_name]
            if len(pids) == 1:
                return pids[0], "ray.util.state.list_actors"
        except Exception:
            pass
    from ray._private import state

    table = state.actors()
    pids = [
        a["Pid"]
        for a in table.values()
        if a["State"] == "ALIVE" and REPLICA_CLASS in a["ActorClassName"]
    ]
    if len(pids) != 1:
        return None, f"GCS actor table: {len(pids)} ALIVE {REPLICA_CLASS} actors"
    return pids[0], "GCS actor table (ray._private.state.actors)"


def proc_memory(pid: int) -> dict[str, Any]:
    """VmHWM (peak resident) and VmRSS of a process, in bytes, and its title."""
    out: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out["title"] = f.read().split(b"\0")[0].decode(errors="replace")[:80]
    except OSError as e:
        out["error"] = str(e)
    return out


def reset_peak(pid: int) -> bool:
    """Restart the process's VmHWM from its current RSS (Linux ``clear_refs`` 5), so that a
    later reading is the peak while serving, not the checkpoint load's at start-up."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start_server(a: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, Any]]:
    import ray
    import torch
    from ray import serve

    from medgpt.serving import build_app

    if a.checkpoint:
        checkpoint, storage = a.checkpoint, a.storage_path
        what = f"checkpoint {a.checkpoint}"
    else:
        from medgpt.checkpoint import save_checkpoint
        from medgpt.config import ModelConfig
        from medgpt.model import GPT

        torch.manual_seed(0)
        model = GPT(ModelConfig.preset(a.size))
        what = (f"{a.size} ({model.num_params(non_embedding=False) / 1e6:.1f}M params, random "
                f"init seed 0)")  # fmt: skip
        checkpoint = str(tmp / "model")
        save_checkpoint(checkpoint, model, {"step": 0})
        del model
        storage = str(tmp / "storage")
    ctx = ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False,
                   log_to_driver=False)  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "checkpoint": checkpoint,
        "storage_path": storage,
        "max_batch_size": a.max_batch_size,
        "kv_cache_tokens": a.kv_cache_tokens or None,
        "max_queue": 256,
        "max_tokens_cap": 512,
        "threads": a.num_cpus,
        "int8": a.int8,
    }
    # The replica's Serve options are app args too (medgpt.serving.config.ServeConfig).
    deployment = {"max_ongoing_requests": 300, "num_cpus": a.num_cpus}
    args.update(deployment)
    t0 = time.perf_counter()
    serve.run(build_app(args), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, 300)
    info = {"what": what + (", int8" if a.int8 else ", fp32"), "app_args": args,
            "deployment": deployment, "ray_version": ray.__version__,
            "startup_s": time.perf_counter() - t0,
            "dashboard_url": getattr(ctx, "dashboard_url", None) or None}  # fmt: skip
    return base, info


def stop_server() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The web front (web/app.py) in its own process, as it is deployed: Flask never shares the
# replica's or the client's interpreter


def start_web(serve_url: str, a: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """``web.app.create_app({"SERVE_URL": serve_url})`` on a free 127.0.0.1 port: under
    gunicorn's gthread workers (the README's production server) when it is installed, else
    werkzeug's threaded ``run_simple`` (what ``medgpt web`` runs). Waits for its /healthz to
    see Serve."""
    import importlib.util
    import subprocess

    port = free_port()
    factory = f"web.app:create_app({{'SERVE_URL': {serve_url!r}}})"
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if a.web_server == "gunicorn" or (
        a.web_server == "auto" and gunicorn.exists() and importlib.util.find_spec("gunicorn")
    ):
        server = f"gunicorn {a.web_workers} gthread workers x {a.web_threads} threads"
        cmd = [str(gunicorn), "-w", str(a.web_workers), "-k", "gthread",
               "--threads", str(a.web_threads), "-b", f"127.0.0.1:{port}", factory]  # fmt: skip
    else:
        server = "werkzeug run_simple(threaded=True)"
        code = ("import sys; from werkzeug.serving import run_simple; from web.app import "
                "create_app; run_simple('127.0.0.1', int(sys.argv[1]), create_app({'SERVE_URL': "
                "sys.argv[2]}), threaded=True, use_reloader=False, use_debugger=False)"
                )  # fmt: skip
        cmd = [sys.executable, "-c", code, str(port), serve_url]
    env = dict(os.environ)
    env.pop("MEDGPT_WEB_API_KEY", None)  # a key in the caller's shell would 401 every request
    log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_web
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    web = {"proc": proc, "log": log, "log_path": log_path, "url": f"http://127.0.0.1:{port}",
           "server": server, "cmd": cmd}  # fmt: skip
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        status, body = _http_get(web["url"] + "/healthz", timeout=2.0)
        if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
            web["startup_s"] = time.perf_counter() - t0
            return web
        time.sleep(0.3)
    stop_web(web)
    tail = log_path.read_text(errors="replace")[-1500:]
    raise RuntimeError(f"web front ({server}) not ready at {web['url']}:\n{tail}")


def web_pids(root: int) -> list[int]:
    """The front's process and its children (gunicorn's workers), root first."""
    children: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == root:
                        children.append(int(proc.name))
                    break
        except (OSError, ValueError):
            continue
    return [root, *sorted(children)]


def web_memory(web: dict[str, Any]) -> list[dict[str, Any]]:
    return [proc_memory(pid) for pid in web_pids(web["proc"].pid)]


def stop_web(web: dict[str, Any]) -> None:
    import signal
    import subprocess

    proc = web["proc"]
    if proc.poll() is None:
        # SIGINT: gunicorn's quick shutdown; SIGTERM's graceful one waits out keep-alives
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    web["log"].close()


def _fmt_web_memory(readings: list[dict[str, Any]]) -> str:
    parts = [f"pid {m['pid']} {m.get('VmHWM', 0) / 1e6:,.0f} MB" for m in readings]
    total = sum(m.get("VmHWM", 0) for m in readings)
    return f"{', '.join(parts)}; sum of peaks {total / 1e6:,.0f} MB"


def print_comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Serve's /generate/stream direct vs the same requests through the web front's
    /api/generate/stream, per concurrency level; ratio = via web / direct. A markdown table,
    to paste as it is."""
    direct = {s["concurrency"]: s for s in runs if s["path"] == "serve"}
    via = {s["concurrency"]: s for s in runs if s["path"] == "web"}
    rows = []
    print(
        "| concurrency | output tok/s direct / web (ratio) | TTFT median ms direct / web "
        "(ratio) | ITL median ms direct / web (ratio) | E2E median s direct / web (ratio) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for c in sorted(set(direct) & set(via)):
        d, w = direct[c], via[c]
        row: dict[str, Any] = {"concurrency": c}
        cells = []
        for key, stat, scale, fmt in (("output_throughput", None, 1, ".1f"),
                                      ("ttft_s", "median", 1e3, ".0f"),
                                      ("itl_s", "median", 1e3, ".0f"),
                                      ("e2el_s", "median", 1, ".2f")):  # fmt: skip
            x = d[key] if stat is None else d[key][stat]
            y = w[key] if stat is None else w[key][stat]
            ratio = y / x if x and y is not None else None
            row[key] = {"direct": x, "web": y, "ratio": ratio}
            if ratio is None:
                cells.append("-")
            else:
                cells.append(f"{x * scale:{fmt}} / {y * scale:{fmt}} ({ratio:.2f}x)")
        # Same seeds give the same tokens on both paths if the engine's sampling does not
        # depend on batch composition; a mismatch would mean the two legs did unequal work.
        same = sum(
            x["ok"] and y["ok"] and x["text_sha1"] == y["text_sha1"]
            for x, y in zip(d["results"], w["results"], strict=True)
        )
        row["identical_outputs"] = f"{same}/{len(d['results'])}"
        rows.append(row)
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("identical texts, direct vs web, per level: "
          + ", ".join(f"c={r['concurrency']} {r['identical_outputs']}" for r in rows))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------


def pytest_pids() -> list[int]:
    """Running pytest processes: other load on the CPUs the benchmark measures (and, before
    commit 84a58e5, a Ray test fixture that ran ``ray stop --force``, which killed every Ray
    cluster on the machine, this benchmark's private one included)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"pytest" in arg for arg in argv[:3]):
            pids.append(int(proc.name))
    return pids


def wait_for_quiet(max_wait_s: float, threshold: float = 1.0) -> list[dict[str, Any]]:
    """Poll until the 1-minute load average is <= threshold and no pytest is running, or
    max_wait_s has passed; returns every reading."""
    t0 = time.monotonic()
    seen: list[dict[str, Any]] = []
    while True:
        now = {"t_s": time.monotonic() - t0, "load1": os.getloadavg()[0], "pytest": pytest_pids()}
        seen.append(now)
        if (now["load1"] <= threshold and not now["pytest"]) or now["t_s"] >= max_wait_s:
            return seen
        print(f"  load {now['load1']:.2f}, pytest pids {now['pytest']}: waiting", file=sys.stderr)
        time.sleep(min(30.0, max(1.0, max_wait_s - now["t_s"])))


def _prompt_tokens() -> list[int]:
    from medgpt.tokenizer import get_tokenizer

    enc = get_tokenizer()
    return [len(enc.encode_ordinary(p)) for p in PROMPTS]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="gpt2", help="random-init model preset to serve (gpt2)")
    p.add_argument("--checkpoint", help="serve this checkpoint instead (folder, run, models:/)")
    p.add_argument("--storage-path", default="runs", help="MLflow store for --checkpoint models:/")
    p.add_argument("--int8", action="store_true", help="serve the int8 engine (int8: true)")
    p.add_argument("--url", help="benchmark a running server at this base URL; no Ray started")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level; 0 = max(8, 2 x concurrency)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16, help="the engine's batch rows")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="the engine's KV cache budget in token positions; 0 = no limit "
                   "(default: ServeConfig's)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs = the replica's CPUs/threads")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="first wait up to this many seconds for 1-min load <= 1.0 and no "
                   "pytest running")  # fmt: skip
    p.add_argument("--paths", default="completions",
                   help="comma-separated, each measured at every level against the same replica: "
                   "completions (Serve's /v1/completions), serve (Serve's /generate/stream), "
                   "web (the Flask front's /api/generate/stream -> Serve's /generate/stream); "
                   "serve and web together print the web/direct comparison (default: "
                   "completions)")  # fmt: skip
    p.add_argument("--web-server", choices=("auto", "gunicorn", "werkzeug"), default="auto",
                   help="what serves the front for --paths web: gunicorn gthread workers if "
                   "installed (auto), else werkzeug's threaded run_simple")  # fmt: skip
    p.add_argument("--web-workers", type=int, default=2, help="gunicorn workers (README's 2)")
    p.add_argument("--web-threads", type=int, default=0,
                   help="threads per gunicorn worker; 0 = max(8, largest concurrency), so that "
                   "no stream waits for a thread however the workers split the "
                   "connections")  # fmt: skip
    p.add_argument("--json", type=Path, help="write all figures and per-request timings here")
    a = p.parse_args(argv)
    try:
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency: comma-separated integers")
    if not levels or min(levels) < 1 or a.max_tokens < 1 or a.requests < 0:
        p.error("--concurrency levels and --max-tokens must be >= 1, --requests >= 0")
    paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    if not paths or any(x not in PATHS for x in paths) or len(set(paths)) != len(paths):
        p.error(f"--paths: distinct names from {', '.join(PATHS)}")
    if a.web_workers < 1 or a.web_threads < 0:
        p.error("--web-workers >= 1, --web-threads >= 0")
    a.web_threads = a.web_threads or max(8, max(levels))
    if a.url and (a.checkpoint or a.int8 or a.kv_cache_tokens is not None):
        p.error("--url benchmarks a running server: --checkpoint/--int8/--kv-cache-tokens do "
                "not apply")  # fmt: skip
    if a.kv_cache_tokens is not None and a.kv_cache_tokens < 0:
        p.error("--kv-cache-tokens: >= 0 (0 = no limit)")
    if a.kv_cache_tokens is None and not a.url:
        from medgpt.serving import ServeConfig

        a.kv_cache_tokens = ServeConfig().kv_cache_tokens or 0

    import aiohttp
    import torch

    prompt_lens = _prompt_tokens()
    quiet = wait_for_quiet(a.wait_quiet) if a.wait_quiet > 0 else []
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    print(f"machine: {harness.cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"aiohttp {aiohttp.__version__}, Python {platform.python_version()}")  # fmt: skip
    if len(quiet) > 1:
        print(f"waited {quiet[-1]['t_s']:.0f} s for quiet: 1-min load "
              f"{' -> '.join(format(x['load1'], '.2f') for x in quiet)}")  # fmt: skip
    busy = pytest_pids()
    print(f"load average before: {harness.fmt_load(load_before)}; pytest processes running: "
          f"{busy or 'none'}")  # fmt: skip
    if busy:
        print("WARNING: pytest is running: its load skews the timings (and test fixtures before "
              "84a58e5 ran `ray stop --force`, killing every Ray cluster on the machine)")  # fmt: skip

    tmp_ctx = tempfile.TemporaryDirectory(prefix="serve_http_")
    tmp = Path(tmp_ctx.name)
    server: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    web: dict[str, Any] | None = None
    web_mem: dict[str, list[dict[str, Any]]] = {}
    runs: list[dict[str, Any]] = []
    started = False
    try:
        if a.url:
            base = a.url.rstrip("/")
            server = {"what": f"running server at {base}"}
        else:
            started = True
            base, server = start_server(a, tmp)
            print(f"serving {server['what']} on Ray {server['ray_version']} (private local "
                  f"cluster, {a.num_cpus} CPUs), Serve at {base}; ready in "
                  f"{server['startup_s']:.0f} s")  # fmt: skip
            pid, how = replica_pid(server["dashboard_url"])
            server["replica_pid"], server["replica_pid_from"] = pid, how
            if pid is not None:
                memory["after_start"] = proc_memory(pid)
                server["peak_reset_after_start"] = reset_peak(pid)
        status, models = _http_get(base + "/v1/models")
        card = models["data"][0] if status == 200 and isinstance(models, dict) else {}
        context = card.get("context_length")
        if context is not None and max(prompt_lens) + a.max_tokens > context:
            raise SystemExit(
                f"longest prompt ({max(prompt_lens)} tokens) + --max-tokens {a.max_tokens} "
                f"exceeds the model's context of {context}"
            )
        model_id = card.get("id")
        mounts = {"serve": base}
        if "web" in paths:
            web = start_web(base, a, tmp / "web.log")
            mounts["web"] = web["url"]
            web_mem["after_start"] = web_memory(web)
            print(f"web front: web/app.py create_app({{'SERVE_URL': {base!r}}}) under "
                  f"{web['server']} at {web['url']}; ready in {web['startup_s']:.1f} s; "
                  f"peak RSS {_fmt_web_memory(web_mem['after_start'])}")  # fmt: skip
        for path in paths:  # also the web front's first-request imports and connections
            warm = asyncio.run(run_level(mounts[PATHS[path][2]], 1, 1, min(8, a.max_tokens), 0,
                                         model_id, path))  # fmt: skip
            if warm["failed"]:
                raise SystemExit(f"warm-up request ({path}) failed: {warm['errors']}")
        print(f"model {model_id!r}, context {context}; prompts {len(PROMPTS)} "
              f"({min(prompt_lens)}-{max(prompt_lens)} tokens), max_tokens {a.max_tokens}, "
              f"temperature {TEMPERATURE}, seed {SEED_BASE}+i per request, streamed; "
              f"engine max_batch_size {a.max_batch_size}, kv_cache_tokens "
              f"{'as configured' if a.url else a.kv_cache_tokens or 'unlimited'}; paths "
              f"{', '.join(f'{x} ({PATHS[x][0]})' for x in paths)}")  # fmt: skip
        next_id = 1
        for k, c in enumerate(levels):
            n = a.requests or max(8, 2 * c)
            # The paths take turns going first, so that a drift in the machine's load does not
            # always favour the same one; each gets the same request ids (prompts and seeds).
            order = paths[k % len(paths) :] + paths[: k % len(paths)]
            level = []
            for path in order:
                print(f"  concurrency {c}, {path}: {n} requests", file=sys.stderr)
                s = asyncio.run(run_level(mounts[PATHS[path][2]], c, n, a.max_tokens, next_id,
                                          model_id, path))  # fmt: skip
                level.append(s)
                print(f"[{_label(path)}]")
                print_level(s)
            next_id += n
            runs.extend(sorted(level, key=lambda x: paths.index(x["path"])))
            if started and server.get("replica_pid") is not None:  # read now: Ray may die later
                memory[f"after_concurrency_{c}"] = proc_memory(server["replica_pid"])
            if web is not None:
                web_mem[f"after_concurrency_{c}"] = web_memory(web)
            status, health = _http_get(base + "/healthz")
            busy = pytest_pids()
            for s in level:
                if status == 200 and isinstance(health, dict):
                    s["engine"] = {k: v for k, v in health.items()
                                   if k.startswith(("cache", "kv"))}  # fmt: skip
                if busy:
                    s["pytest_during"] = busy
            if busy:
                print(f"WARNING: pytest processes {busy} ran during this level")
            if not all(s["completed"] for s in level):
                print("every request of this level failed on a path: the sweep stops here")
                break
    finally:
        try:
            if web is not None:
                web_log = web["log_path"].read_text(errors="replace")
                stop_web(web)
                if any(s["failed"] for s in runs if s["path"] == "web"):
                    print(f"web front log (last 2000 characters):\n{web_log[-2000:]}")
        finally:
            if started:
                stop_server()
            tmp_ctx.cleanup()
    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start

    print()
    print(f"Summary: {server['what']}; max_tokens {a.max_tokens}; times in ms unless noted")
    ratios: dict[str, float] = {}
    for path in paths:
        mine = [s for s in runs if s["path"] == path]
        if not mine:
            continue
        print(f"[{_label(path)}]")
        print_table(mine)
        by_c = {s["concurrency"]: s for s in mine}
        if 1 in by_c and 8 in by_c and by_c[1]["output_throughput"] > 0:
            ratio = by_c[8]["output_throughput"] / by_c[1]["output_throughput"]
            ratios[path] = ratio
            print(f"output tok/s at concurrency 8 / at concurrency 1: "
                  f"{by_c[8]['output_throughput']:.1f} / {by_c[1]['output_throughput']:.1f} = "
                  f"{ratio:.2f}x (target >= {RATIO_TARGET:.0f}x: "
                  f"{'met' if ratio >= RATIO_TARGET else 'NOT met'})")  # fmt: skip
    comparison: list[dict[str, Any]] = []
    if "serve" in paths and "web" in paths:
        print()
        print("Through the web front vs Serve direct (same /generate/stream body and request "
              "ids; ratio = via web / direct):")  # fmt: skip
        comparison = print_comparison(runs)
    failed = sum(s["failed"] for s in runs)
    if failed:
        print(f"WARNING: {failed} request(s) failed; the figures of those levels are not valid")
    readings = [(k, v) for k, v in memory.items() if "VmHWM" in v and "Replica" in v["title"]]
    if readings:
        when, m = readings[-1]
        first = memory.get("after_start", {})
        reset = server.get("peak_reset_after_start")
        peak = max(m["VmHWM"], first.get("VmHWM", 0)) if reset else m["VmHWM"]
        serving = (f", while serving {m['VmHWM'] / 1e6:,.0f} MB (VmHWM reset after start-up)"
                   if reset else "")  # fmt: skip
        print(f"replica pid {m['pid']} ({m['title']}; found via "
              f"{server['replica_pid_from']}): peak RSS (VmHWM) {peak / 1e6:,.0f} MB "
              f"= {peak / 2**20:,.0f} MiB{serving}, RSS {when.replace('_', ' ')} "
              f"{m['VmRSS'] / 1e6:,.0f} MB "
              f"(after start-up: peak {first.get('VmHWM', 0) / 1e6:,.0f} MB, RSS "
              f"{first.get('VmRSS', 0) / 1e6:,.0f} MB); requirement < "
              f"{RSS_LIMIT_BYTES / 1e9:.1f} GB: "
              f"{'met' if peak < RSS_LIMIT_BYTES else 'NOT met'}")  # fmt: skip
    elif started:
        print(f"replica peak RSS: unavailable ({server.get('replica_pid_from')}; {memory})")
    if web_mem:
        when = list(web_mem)[-1]
        print(f"web front ({web['server'] if web else '?'}) peak RSS (VmHWM, no reset: "
              f"start-up included), {when.replace('_', ' ')}: "
              f"{_fmt_web_memory(web_mem[when])}")  # fmt: skip
    engine = runs[-1].get("engine") if runs else None
    if engine:
        print(f"engine KV cache: budget {engine['kv_cache_tokens'] or 'unlimited'} positions, peak "
              f"{engine['cache_peak_bytes'] / 1e6:,.1f} MB (resizes included), now "
              f"{engine['cache_bytes'] / 1e6:,.1f} MB ({engine['cache_rows']} rows x "
              f"{engine['cache_positions']} positions)")  # fmt: skip
    print(f"load average after: {harness.fmt_load(load_after)}; wall {wall:.0f} s")

    if a.json:
        payload = {
            "args": vars(a) | {"json": str(a.json)},
            "machine": {"cpu": harness.cpu_name(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__},
            "load_average_before": load_before,
            "load_average_after": load_after,
            "waited_for_quiet": quiet,
            "server": server,
            "replica_memory": memory,
            "prompt_tokens": prompt_lens,
            "paths": {x: PATHS[x][2] + " " + PATHS[x][0] for x in paths},
            "ratio_c8_over_c1": ratios,
            "levels": runs,
            "web": None if web is None else {k: web[k] for k in ("server", "url", "cmd",
                                                                 "startup_s") if k in web},
            "web_memory": web_mem,
            "web_vs_direct": comparison,
            "wall_s": wall,
        }  # fmt: skip
        harness.dump_json(a.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
