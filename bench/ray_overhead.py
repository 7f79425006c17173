"""What running our training loop under Ray Train costs, against the same loop without Ray.

Every case runs ``medgpt.training.run_loop`` with the same recipe and seed; only the harness
around it changes:

* ``1 worker``   ``bare``     one plain process: ``local_context()``, one torch thread
                 ``ray``      ``TorchTrainer`` with ``num_workers=1`` (one CPU per worker)
* ``2 workers``  ``torchrun`` ``torchrun --standalone --nproc_per_node 2`` running this file's
                              hidden ``_worker`` subcommand: gloo process group, plain
                              ``DistributedDataParallel``, one torch thread per process
                 ``ray``      ``TorchTrainer`` with ``num_workers=2`` (DDP via Ray's
                              ``prepare_model``, run_loop's default)

Each of ``--repeats`` rounds runs the baselines in fresh subprocesses while no Ray process of
ours exists, and the Ray cases on one local cluster (``ray.init(num_cpus=2)``, shut down after
them); odd rounds run the baselines first, even rounds Ray first, so drift in the machine's
speed falls on both. The Ray train function is this file's own small wrapper around
``run_loop`` (not ``train_loop_per_worker``) whose reporter calls ``ray.train.report`` at every
step, as medgpt's does at every ``log_every`` step. With ``log_every=1`` here, every step pays
the report barrier: a worst case for real runs.

The default shape (2 layers, width 128, 128-token windows, 2 windows per worker per step)
makes a step ~0.4 s on one core of the 2-core CPU box; GPT-2's 50257-token output layer is most
of the work.

Figures per case (rank 0's unless said otherwise), pooled over the rounds:

* ``step tok/s``  median of run_loop's own per-step ``tokens_per_s`` over the measured steps.
  run_loop times a step from its start to the end of ``optimizer.step()``: the report that
  follows is *not* in it (with 2 workers, a slow report still shows up as waiting in the next
  step's gradient all-reduce).
* ``loop tok/s``  median of ``batch_tokens`` / (time between consecutive reporter calls): the
  full cycle including the loss all-reduce and ``ray.train.report``.
* ``ratio``       Ray / baseline of each.
* ``startup s``   launch (subprocess start, or ``TorchTrainer.fit()`` call) to the start of the
  first training step; ``wall s`` launch to exit / ``fit()`` return (medians over rounds).
  ``ray.init`` is timed separately.
* ``peak RSS``    ``ru_maxrss`` of each training process, read inside the loop (per rank;
  the largest over the rounds).

The first ``--warmup-steps`` steps are excluded; the run has one step more than
``warmup + steps`` because run_loop evaluates and checkpoints at its last step (eval and
checkpoint cadence are set to ``max_steps``, no text samples): that step is excluded too.

    python bench/ray_overhead.py                  # 3 rounds x (5 warm-up + 30 measured steps)
    python bench/ray_overhead.py --wait-load 0.5 --json out.json   # wait for a quiet machine
    python bench/ray_overhead.py --workers 2 --repeats 1 --micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgpt.testing import REPO, free_port, peak_rss_mib
from medgpt.testing import bench as harness

WORKER_CMD = "_worker"  # hidden subcommand: one rank of the bare / torchrun baselines
RAY_ENV = {
    # See /work/shared/FIELD-NOTES.md: faster polling, no preemption watcher, no metrics export.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
}


# --------------------------------------------------------------------------- the loop, per rank


def run_recorded(
    recipe_dict: dict[str, Any],
    rank: int,
    world: int,
    wrap: Callable[[Any], Any] | None,
    forward: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Run ``run_loop`` on this rank, recording every reported step; ``forward`` (Ray's
    ``report``) receives each step's metrics plus this process's peak RSS."""
    import torch

    from medgpt.config import Recipe
    from medgpt.training import _Ctx, run_loop

    entered = time.time()
    torch.set_num_threads(1)  # what a 1-CPU Ray worker gets (train_loop_per_worker does this)
    recipe = Recipe.from_dict(recipe_dict)
    ctx = _Ctx(rank, world, torch.device("cpu"))
    steps: list[dict[str, Any]] = []

    def reporter(metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        mono, wall = time.perf_counter(), time.time()
        cpu_thread, cpu_proc = time.thread_time(), time.process_time()
        if checkpoint_dir is not None:  # the final step's checkpoint: not part of the measure
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
        rss = peak_rss_mib()
        steps.append(
            {
                "step": step,
                "tokens_per_s": metrics["tokens_per_s"],
                "step_time_ms": metrics["step_time_ms"],
                "loss": metrics["loss"],
                "mono": mono,
                "cpu_thread": cpu_thread,  # this (training) thread's CPU seconds so far
                "cpu_proc": cpu_proc,  # the whole process's: Ray's / gloo's threads too
                "wall": wall,
                "peak_rss_mib": rss,
            }
        )
        if forward is not None:
            forward({**metrics, "peak_rss_mib": rss})

    for _ in run_loop(recipe, ctx, None, None, reporter, wrap=wrap):
        pass
    return {
        "rank": rank,
        "world": world,
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "entered": entered,
        "first_step_start": steps[0]["wall"] - steps[0]["step_time_ms"] / 1000,
        "exited": time.time(),
        "peak_rss_mib": peak_rss_mib(),
        "steps": steps,
    }


def _worker_main(argv: list[str]) -> None:
    """``_worker RECIPE_JSON OUT_DIR``: one rank of a baseline (torchrun sets RANK/WORLD_SIZE)."""
    recipe_path, out_dir = argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    wrap = None
    if world > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m)  # noqa: E731
    record = run_recorded(json.loads(Path(recipe_path).read_text()), rank, world, wrap, None)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def ray_train_fn(config: dict[str, Any]) -> None:
    """Ray Train's entry: run_loop with DDP by ``prepare_model`` (run_loop's default), a
    ``ray.train.report`` at every step, and the per-rank record written to ``out_dir``."""
    import ray.train

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    record = run_recorded(config["recipe"], rank, world, None, ray.train.report)
    Path(config["out_dir"], f"rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------- the cases


class CpuWatch(threading.Thread):
    """CPU seconds spent by processes that are not this benchmark's, sampled from /proc.

    Ours: this process, its descendants, and the processes of our Ray cluster (their command
    line names ``marker``, our private Ray temp dir) with their descendants. Everything else on
    the machine (other people's tests and benchmarks) is "foreign": a row whose foreign CPU is
    not near zero was measured on a shared machine.
    """

    def __init__(self, marker: str, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.marker, self.period_s = marker, period_s
        self.tick = os.sysconf("SC_CLK_TCK")
        self.marked: dict[tuple[int, int], bool] = {}
        self.last: dict[tuple[int, int], int] = {}
        self.foreign_ticks = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._sample(count=False)  # what ran before we started is not counted

    def _sample(self, count: bool = True) -> None:
        procs: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, starttime, cpu ticks)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry.name)] = (
                int(fields[1]),
                int(fields[19]),
                int(fields[11]) + int(fields[12]),
            )
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        roots = [os.getpid()]
        for pid, (_, start, _) in procs.items():
            key = (pid, start)
            if key not in self.marked:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        self.marked[key] = self.marker.encode() in f.read()
                except OSError:
                    self.marked[key] = False
            if self.marked[key]:
                roots.append(pid)
        ours: set[int] = set()
        while roots:
            pid = roots.pop()
            if pid not in ours:
                ours.add(pid)
                roots.extend(children.get(pid, ()))
        foreign, last = 0, {}
        for pid, (_, start, ticks) in procs.items():
            key = (pid, start)
            last[key] = ticks
            if pid not in ours:
                foreign += ticks - self.last.get(key, 0)
        with self.lock:
            self.last = last
            if count:
                self.foreign_ticks += foreign

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self._sample()

    def foreign_cpu_s(self) -> float:
        with self.lock:
            return self.foreign_ticks / self.tick


def build_recipe(args: argparse.Namespace, data_dir: Path, world: int) -> dict[str, Any]:
    from medgpt.config import Recipe

    max_steps = args.warmup_steps + args.steps + 1  # +1: the final (eval + checkpoint) step
    recipe = Recipe.from_dict(
        {
            "model": {
                "n_layer": args.n_layer,
                "n_head": args.n_head,
                "n_embd": args.n_embd,
                "block_size": args.seq_len,
                "dropout": 0.0,
            },
            "train": {
                "data_dir": str(data_dir),
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch,
                "batch_tokens": args.micro_batch * args.seq_len * world,  # 1 micro-step/worker
                "max_steps": max_steps,
                "warmup_steps": 2,
                "lr": 2e-3,
                "min_lr": 2e-4,
                "eval_every": max_steps,
                "checkpoint_every": max_steps,
                "eval_batches": 1,
                "log_every": 1,
                "sample_tokens": 0,
                "seed": 1337,
            },
            "job": {"num_workers": world, "cpus_per_worker": 1.0},
        }
    )
    return recipe.to_dict()


def _read_records(out_dir: Path, world: int) -> list[dict[str, Any]]:
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return sorted(records, key=lambda r: r["rank"])


def _launched(launch: Callable[[], Any], out: Path, world: int, watch: CpuWatch) -> dict[str, Any]:
    """Run ``launch()`` (one case, start to end) and return its wall-clock span, the load
    before it, the cores other programs used meanwhile, and the ranks' records in ``out``."""
    load, foreign0 = os.getloadavg()[0], watch.foreign_cpu_s()
    launched = time.time()
    launch()
    ended = time.time()
    return {
        "launched": launched,
        "ended": ended,
        "load_1m": load,
        "foreign_cores": (watch.foreign_cpu_s() - foreign0) / (ended - launched),
        "records": _read_records(out, world),
    }


def run_baseline(recipe: dict[str, Any], world: int, work: Path, watch: CpuWatch) -> dict[str, Any]:
    out = work / f"{'bare' if world == 1 else 'torchrun'}-{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True)
    recipe_path = out / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    me = str(Path(__file__).resolve())
    if world == 1:
        cmd = [sys.executable, me, WORKER_CMD, str(recipe_path), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={world}", me, WORKER_CMD, str(recipe_path), str(out)]
    # OMP_NUM_THREADS=1 as Ray sets in its workers (torchrun would set it for >1 proc anyway).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return _launched(lambda: subprocess.run(cmd, env=env, check=True, cwd=str(work)), out, world,
                     watch)  # fmt: skip


def run_ray(recipe: dict[str, Any], world: int, work: Path, watch: CpuWatch) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    name = f"ray-overhead-{world}w-{uuid.uuid4().hex[:6]}"
    out = work / name
    out.mkdir(parents=True)
    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config={"recipe": recipe, "out_dir": str(out)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, use_gpu=False, resources_per_worker={"CPU": 1.0}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(work / "ray-storage"),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    )
    return _launched(trainer.fit, out, world, watch)


def _measured(run: dict[str, Any], warmup: int, batch_tokens: int) -> dict[str, list[float]]:
    """Rank 0's steps warmup+1 .. max_steps-1: run_loop's tokens/s, and batch_tokens over the
    time from the previous step's reporter call to this one's (the whole cycle)."""
    steps = run["records"][0]["steps"]
    by_step = {s["step"]: s for s in steps}
    measured = [s for s in steps[:-1] if s["step"] > warmup and s["step"] - 1 in by_step]
    prev = [by_step[s["step"] - 1] for s in measured]
    cycles = [s["mono"] - p["mono"] for s, p in zip(measured, prev, strict=True)]
    thread = [s["cpu_thread"] - p["cpu_thread"] for s, p in zip(measured, prev, strict=True)]
    proc = [s["cpu_proc"] - p["cpu_proc"] for s, p in zip(measured, prev, strict=True)]
    return {
        "tokens_per_s": [s["tokens_per_s"] for s in measured],
        "loop_tokens_per_s": [batch_tokens / c for c in cycles],
        "step_ms": [s["step_time_ms"] for s in measured],
        "cycle_ms": [c * 1000 for c in cycles],
        # Cores used over a cycle by the training thread, and by the process's other threads.
        "train_thread_cores": [t / c for t, c in zip(thread, cycles, strict=True)],
        "other_thread_cores": [(p - t) / c for p, t, c in zip(proc, thread, cycles, strict=True)],
    }


def summarise(runs: list[dict[str, Any]], warmup: int, batch_tokens: int) -> dict[str, Any]:
    """One case over its repeats: medians of the pooled measured steps, medians of the
    per-repeat startup and wall times, the largest peak RSS seen per rank."""
    per = [_measured(r, warmup, batch_tokens) for r in runs]
    pooled = {k: [v for m in per for v in m[k]] for k in per[0]}
    med = statistics.median
    world = len(runs[0]["records"])
    return {
        "tokens_per_s": med(pooled["tokens_per_s"]),
        "loop_tokens_per_s": med(pooled["loop_tokens_per_s"]),
        "step_ms_median": med(pooled["step_ms"]),
        "cycle_ms_median": med(pooled["cycle_ms"]),
        "train_thread_cores": med(pooled["train_thread_cores"]),
        "other_thread_cores": med(pooled["other_thread_cores"]),
        "measured_steps": len(pooled["tokens_per_s"]),
        "startup_s": med(r["records"][0]["first_step_start"] - r["launched"] for r in runs),
        "wall_s": med(r["ended"] - r["launched"] for r in runs),
        "teardown_s": med(r["ended"] - r["records"][0]["steps"][-1]["wall"] for r in runs),
        "peak_rss_mib": [
            round(max(r["records"][k]["peak_rss_mib"] for r in runs), 1) for k in range(world)
        ],
        "torch_threads": [rec["torch_threads"] for rec in runs[0]["records"]],
        "loss_last": [r["records"][0]["steps"][-1]["loss"] for r in runs],
        "load_1m_before": [r["load_1m"] for r in runs],
        "foreign_cores": [r["foreign_cores"] for r in runs],
        "per_repeat": [
            {
                "tokens_per_s": med(m["tokens_per_s"]),
                "loop_tokens_per_s": med(m["loop_tokens_per_s"]),
                "startup_s": r["records"][0]["first_step_start"] - r["launched"],
                "wall_s": r["ended"] - r["launched"],
                "tokens_per_s_all": [s["tokens_per_s"] for s in r["records"][0]["steps"]],
            }
            for m, r in zip(per, runs, strict=True)
        ],
    }


# --------------------------------------------------------------------------- driver


def ensure_data(path: str | None, work: Path) -> Path:
    if path:
        p = Path(path).expanduser().resolve()
        if (p / "manifest.json").is_file():
            return p
        raise SystemExit(f"--data {p}: no manifest.json (prepare it with medgpt prepare)")
    default = REPO / "data" / "icd10cm"
    if (default / "manifest.json").is_file():
        return default
    out = work / "icd"
    cmd = [sys.executable, "-m", "medgpt.cli", "prepare", "--source", "builtin:icd10cm"]
    subprocess.run([*cmd, "--out", str(out)], check=True)
    return out


def wait_for_load(threshold: float, timeout_s: float) -> float:
    """Wait until the 1-minute load average is below ``threshold``; returns the last reading."""
    deadline = time.time() + timeout_s
    load = os.getloadavg()[0]
    while load >= threshold and time.time() < deadline:
        print(f"waiting: 1-min load {load:.2f} >= {threshold}", file=sys.stderr, flush=True)
        time.sleep(15)
        load = os.getloadavg()[0]
    if load >= threshold:
        print(f"warning: load still {load:.2f} after {timeout_s:.0f} s", file=sys.stderr)
    return load


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<10} {'impl':<9} {'step tok/s':>10} {'ratio':>6} {'loop tok/s':>10} "
        f"{'ratio':>6} {'startup s':>9} {'wall s':>7} {'peak RSS MiB/rank':>18} {'last loss':>9} "
        f"{'others':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
        loop_ratio = f"{r['loop_ratio']:.3f}" if r.get("loop_ratio") is not None else "-"
        rss = "/".join(f"{x:.0f}" for x in r["peak_rss_mib"])
        lines.append(
            f"{r['case']:<10} {r['impl']:<9} {r['tokens_per_s']:>10.0f} {ratio:>6} "
            f"{r['loop_tokens_per_s']:>10.0f} {loop_ratio:>6} {r['startup_s']:>9.1f} "
            f"{r['wall_s']:>7.1f} {rss:>18} {r['loss_last'][0]:>9.4f} "
            f"{max(r['foreign_cores']):>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_CMD]:
        _worker_main(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per case")
    ap.add_argument("--warmup-steps", type=int, default=5, help="first steps left out")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2, help="windows per worker per step")
    ap.add_argument("--data", help="prepared dataset (default: data/icd10cm, else prepared)")
    ap.add_argument("--workers", default="1,2", help="cases to run: 1, 2 or 1,2")
    ap.add_argument(
        "--health-check-s",
        type=float,
        default=0.2,
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default is 2)",
    )
    ap.add_argument(
        "--wait-load", type=float, default=0.0, help="first wait until 1-min load < this"
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds, alternating the order")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 3 or args.warmup_steps < 1 or args.repeats < 1:
        ap.error("--steps must be >= 3, --warmup-steps and --repeats >= 1")
    worlds = sorted({int(w) for w in args.workers.split(",")})

    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="medgpt-ray-overhead-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rovh-", dir="/tmp"))  # short: socket path limit
    data_dir = ensure_data(args.data, work)
    load_start = wait_for_load(args.wait_load, 600) if args.wait_load else os.getloadavg()[0]
    watch = CpuWatch(marker=str(ray_tmp))
    watch.start()
    recipes = {w: build_recipe(args, data_dir, w) for w in worlds}
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_s)
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)  # before ray.init: inherited by raylet and workers
    # Our own cluster even where another runs (tests...): address="local", and a private temp
    # dir so that its address file redirects nobody else's ray.init(). Ray Train's
    # PlacementGroupCleaner finds the State API by RAY_API_SERVER_ADDRESS, else by the default
    # temp dir's address file, which may name that other cluster.
    os.environ.pop("RAY_ADDRESS", None)
    ray_init_s: list[float] = []

    def baselines(rep: int) -> None:  # run while no Ray process of ours exists
        for w in worlds:
            impl = "bare" if w == 1 else "torchrun"
            print(f"== repeat {rep + 1}: {w} worker(s), {impl}", flush=True)
            runs.setdefault((w, impl), []).append(run_baseline(recipes[w], w, work, watch))

    def ray_cases(rep: int) -> None:  # one cluster for all Ray cases of a repeat
        port = free_port()
        t0 = time.time()
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            _temp_dir=str(ray_tmp),
        )
        ray_init_s.append(time.time() - t0)
        try:
            for w in worlds:
                print(f"== repeat {rep + 1}: {w} worker(s), ray", flush=True)
                runs.setdefault((w, "ray"), []).append(run_ray(recipes[w], w, work, watch))
        finally:
            ray.shutdown()

    for rep in range(args.repeats):  # ABBA: alternate which goes first, against drift
        for phase in (baselines, ray_cases) if rep % 2 == 0 else (ray_cases, baselines):
            phase(rep)
    load_end = os.getloadavg()[0]
    watch.done.set()

    rows = []
    for w in worlds:
        base_impl = "bare" if w == 1 else "torchrun"
        bt = recipes[w]["train"]["batch_tokens"]
        base = summarise(runs[w, base_impl], args.warmup_steps, bt)
        ray_row = summarise(runs[w, "ray"], args.warmup_steps, bt)
        case = f"{w} worker" + ("s" if w > 1 else "")
        rows.append({"case": case, "impl": base_impl, "ratio": None, "loop_ratio": None, **base})
        ray_row["ratio_per_repeat"] = [
            r["tokens_per_s"] / b["tokens_per_s"]
            for r, b in zip(ray_row["per_repeat"], base["per_repeat"], strict=True)
        ]
        rows.append(
            {
                "case": case,
                "impl": "ray",
                "ratio": ray_row["tokens_per_s"] / base["tokens_per_s"],
                "loop_ratio": ray_row["loop_tokens_per_s"] / base["loop_tokens_per_s"],
                **ray_row,
            }
        )
    print()
    print(_fmt_table(rows))
    print(
        "others: cores used by other people's processes during the case (worst round); "
        "cores per training process, training thread + its other threads:"
    )
    for r in rows:
        line = (
            f"  {r['case']:<9} {r['impl']:<8} {r['train_thread_cores']:.2f} + "
            f"{r['other_thread_cores']:.2f}"
        )
        if r["impl"] == "ray":
            line += "   ratio per round: " + ", ".join(f"{x:.3f}" for x in r["ratio_per_repeat"])
        print(line)
    print(
        f"ray.init: {', '.join(f'{x:.1f}' for x in ray_init_s)} s (in no row); 1-min load "
        f"{load_start:.2f} at start, {load_end:.2f} at end; {args.repeats} repeat(s) x "
        f"{args.steps} measured steps after {args.warmup_steps} warm-up"
    )
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "args": vars(args),
        "recipes": {str(w): r for w, r in recipes.items()},
        "ray_env": {k: os.environ.get(k) for k in [*RAY_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]},
        "ray_init_s": ray_init_s,
        "load_1m": {"start": load_start, "end": load_end},
        "rows": rows,
    }
    if args.json:
        harness.dump_json(Path(args.json), result)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
