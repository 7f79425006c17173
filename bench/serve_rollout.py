"""Rolling out a new champion under load: how long from ``medgpt promote`` to the first answer
of the new version, and what the rollout costs the clients streaming meanwhile.

Setup. A temporary MLflow store (sqlite) with two versions of ``medgpt``, random-init weights
of ``--size`` (default ``gpt2``, 124M; seeds 1 and 2), each with a passing gate record; the
champion alias on version 1. A PRIVATE local Ray (``ray.init(address="local", num_cpus=2)``),
Serve's proxy on a free port of 127.0.0.1, one ``MedgptServer`` replica (2 CPUs, 2 torch
threads, ``max_batch_size`` 8, ``kv_cache_tokens`` 4096) following ``models:/medgpt@champion``
with ``follow_poll_s`` 300, so that only the immediate path (``medgpt promote --serve-url``
telling the app) moves it, and ``--rollout`` (``auto``: beside the old version when the
machine's memory allows, which it does here).

Load. ``--clients`` (8) streaming clients (:class:`medgpt.testing.rollout.StreamLoad`: each
sends its next ``POST /v1/completions``, ``stream: true``, ``max_tokens`` ``--max-tokens``
(32), temperature 0.8, model ``medgpt``, as soon as the previous one ended) for the whole run:
``--warmup`` s, then a quiet window of ``--quiet`` s, then ``medgpt promote --version 2
--serve-url ...`` (in this process), a settle of ``--quiet`` s, ``medgpt rollback``, and
``--quiet`` s more.

Per rollout (promote, then rollback), from just before the command: ``alias moved`` (the
command's registry check — version, gate record, download with hash check, weights header —
and the alias move), ``serving`` (the command returned: ``/v1/models`` names the new version),
``first answer`` (the earliest first-token time of an answer from the new version), ``old
freed`` (``/healthz`` lists one version loaded again). Clients: TTFT and end-to-end latency,
median and p99 (numpy, linear), of answers that STARTED in the quiet window before the
rollout against those that were in flight at any time between the command and ``old freed``
(the baseline: the same replica, the same load, the same run); and that every answer came back
whole (``[DONE]`` after a finish reason, one version named throughout). Memory: the replica's
VmRSS before each rollout and after the old version was freed, and its VmHWM (peak, reset
before the rollout) while both were loaded.

    python bench/serve_rollout.py                          # gpt2 124M, ~3 minutes
    python bench/serve_rollout.py --size tiny --quiet 8     # smoke, ~1 minute
    python bench/serve_rollout.py --rollout drain --json drain.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import serve_http  # bench/serve_http.py: the replica's pid and memory

from medgpt.testing import bench as harness
from medgpt.testing import free_port
from medgpt.testing.rollout import GATED, Answer, StreamLoad, percentile, register_version

MiB = 2**20


def _window(answers: list[Answer], lo: float, hi: float, started: bool) -> list[Answer]:
    """Answers that started in [lo, hi) (``started``) or were in flight at any time in it."""
    if started:
        return [a for a in answers if lo <= a.start < hi]
    return [a for a in answers if a.start < hi and a.end > lo]


def _stats(answers: list[Answer]) -> dict[str, Any]:
    ttft = [a.ttft for a in answers if a.ttft is not None]
    e2e = [a.latency for a in answers]
    return {
        "answers": len(answers),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
    }


def _healthz(base: str) -> dict[str, Any]:
    status, body = serve_http._http_get(base + "/healthz", timeout=30)
    if status != 200:
        raise RuntimeError(f"/healthz: {status} {body}")
    return body


def rollout(base: str, store: Path, pid: int | None, command: list[str], new: str) -> dict:
    from medgpt.cli import main

    rss_before = serve_http.proc_memory(pid).get("VmRSS") if pid else None
    if pid:
        serve_http.reset_peak(pid)
    t0 = time.monotonic()
    rc = main([*command, "--storage", str(store), "--serve-url", base, "--wait", "300"])
    t_served = time.monotonic()
    if rc != 0:
        raise RuntimeError(f"medgpt {' '.join(command)}: exit {rc}")
    while _healthz(base)["versions_loaded"] != [new]:
        time.sleep(0.1)
    t_freed = time.monotonic()
    time.sleep(1.0)  # the allocator's trim, then the reading
    mem = serve_http.proc_memory(pid) if pid else {}
    # The first answer of the new version may still be streaming: main() fills it in.
    return {
        "command": " ".join(command),
        "t0": t0,
        "served_s": t_served - t0,
        "freed_s": t_freed - t0,
        "t_freed": t_freed,
        "rss_before_mib": rss_before / MiB if rss_before else None,
        "rss_after_mib": mem.get("VmRSS", 0) / MiB if mem else None,
        "hwm_during_mib": mem.get("VmHWM", 0) / MiB if mem else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2", help="ModelConfig preset of both versions (gpt2)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of load before measuring")
    p.add_argument("--quiet", type=float, default=25.0, help="seconds of each quiet window")
    p.add_argument("--rollout", default="auto", choices=["auto", "beside", "drain"])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)

    import ray
    from ray import serve

    from medgpt.config import ModelConfig
    from medgpt.serving import build_app

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    shape = {k: getattr(ModelConfig.preset(a.size), k)
             for k in ("n_layer", "n_head", "n_embd", "block_size")}  # fmt: skip
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medgpt-rollout-") as tmp:
        root = Path(tmp)
        store = root / "store"
        store.mkdir()
        t = time.perf_counter()
        for seed in (1, 2):
            register_version(store, root, seed, GATED, **shape)
        from medgpt.cli import main as cli

        cli(["rollback", "--storage", str(store)])  # the champion: version 1
        print(f"registered two {a.size} versions in {time.perf_counter() - t:.1f} s", flush=True)
        ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            args = {"checkpoint": "models:/medgpt@champion", "storage_path": str(store),
                    "max_batch_size": 8, "kv_cache_tokens": 4096, "threads": a.num_cpus,
                    "num_cpus": a.num_cpus, "follow_poll_s": 300,
                    "rollout": a.rollout}  # fmt: skip
            serve.run(build_app(args), name="rollout", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            serve_http.wait_healthy(base, 300)
            pid, how = serve_http.replica_pid(None)
            load = StreamLoad(base, clients=a.clients, max_tokens=a.max_tokens,
                              model="medgpt").start()  # fmt: skip
            time.sleep(a.warmup)
            t_quiet = time.monotonic()
            time.sleep(a.quiet)
            rolls = [rollout(base, store, pid, ["promote", "--version", "2"], "medgpt-v2")]
            time.sleep(a.quiet)
            rolls.append(rollout(base, store, pid, ["rollback"], "medgpt-v1"))
            time.sleep(a.quiet)
            answers = load.stop()
        finally:
            serve.shutdown()
            ray.shutdown()

    quiet = _stats(_window(answers, t_quiet, rolls[0]["t0"], started=True))
    broken = [x for x in answers if not x.whole]
    print(f"\n{a.size} ({shape}), rollout {a.rollout}; {a.clients} streaming clients, "
          f"max_tokens {a.max_tokens}; one replica, {a.num_cpus} CPUs; replica pid {pid} ({how})")
    print(f"machine: {harness.cpu_name()}, load average before {harness.fmt_load(load_avg)}")
    print(f"answers: {len(answers)}, broken (failed, truncated or two versions): {len(broken)}")
    header = (f"{'window':<22}{'answers':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'E2E p50':>10}{'E2E p99':>10}")  # fmt: skip
    print(header)

    def row(name: str, s: dict[str, Any]) -> None:
        def f(x: float | None) -> str:
            return f"{x:.3f}" if x is not None else "-"

        print(f"{name:<22}{s['answers']:>8}{f(s['ttft_p50_s']):>10}{f(s['ttft_p99_s']):>10}"
              f"{f(s['e2e_p50_s']):>10}{f(s['e2e_p99_s']):>10}")  # fmt: skip

    row("quiet (baseline)", quiet)
    results = []
    for r in rolls:
        new = "medgpt-v2" if r["command"].startswith("promote") else "medgpt-v1"
        firsts = [x.start + x.ttft for x in answers if x.model == new and x.ttft
                  and x.start + x.ttft >= r["t0"]]  # fmt: skip
        r["first_answer_s"] = (min(firsts) - r["t0"]) if firsts else None
        during = _stats(_window(answers, r["t0"], r["t_freed"], started=False))
        row(f"during {r['command'].split()[0]}", during)
        r.update(during=during)
        results.append(r)
    for r in results:
        ratio = (r["during"]["e2e_p99_s"] / quiet["e2e_p99_s"]
                 if quiet["e2e_p99_s"] and r["during"]["e2e_p99_s"] else None)  # fmt: skip
        r["e2e_p99_ratio_vs_quiet"] = ratio
        print(f"{r['command']}: serving after {r['served_s']:.2f} s, first answer from the new "
              f"version {r['first_answer_s']:.2f} s after the command, old version freed after "
              f"{r['freed_s']:.2f} s; E2E p99 during / quiet: {ratio:.2f}x; replica RSS "
              f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} MiB (peak "
              f"{r['hwm_during_mib']:.0f} MiB during the rollout)")  # fmt: skip
    if a.json:
        clean = [{k: v for k, v in r.items() if k not in ("t0", "t_freed")} for r in results]
        harness.write_json(a.json, a, quiet=quiet, rollouts=clean, answers=len(answers),
                           broken=len(broken), replica_pid=pid)  # fmt: skip
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
