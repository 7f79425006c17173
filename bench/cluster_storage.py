"""What the cluster stack's storage and tracking cost against the single-machine defaults.

One run brings up ``medgpt.stack`` (SeaweedFS S3, PostgreSQL, the MLflow server on PostgreSQL;
no Ray) on free ports in a fresh folder under /tmp, measures, and always stops it again.

**Checkpoints** of the GPT-2 124M shape (fp32), with the optimizer and train state written the
way ``medgpt.training`` writes them (``save_checkpoint`` with AdamW moments after one step, the
loader position, RNG): weights ~0.5 GB, ``train_state.pt`` ~1 GB.

* ``local disk``    baseline: ``save_checkpoint`` to a temp folder, then copied into a storage
  folder with ``pyarrow.fs.copy_files`` (what Ray Train does with a local ``storage_path``);
  restore copies it back to a temp folder the same way and loads it (``load_model`` +
  ``load_train_state``). Ray itself reads a local storage folder in place, so its restore is
  the ``load`` column alone.
* ``object store``  ``save_checkpoint`` to a temp folder, then ``medgpt.storage.upload_dir`` to
  ``s3://BUCKET/bench/...`` (checked sizes; the path training's checkpoint upload takes);
  restore with ``storage.download_dir`` and the same loads.

Saves run in one spawned process that holds the model and optimizer (as a training worker
does); its peak RSS (``VmHWM``) is reset before each save, so a save's peak is its own. Every
restore runs in a fresh spawned process (a restarting worker), whose peak RSS is its own.
Rounds alternate which method goes first; medians are reported. Every restore is checked
against the saved weights and optimizer moments.

**Per-step MLflow logging**: N steps of 8 metrics (training's seven per-step keys and
``val_loss``), each method in its own spawned process, rounds in turn:

* ``embedded sqlite``  baseline: ``MlflowClient(sqlite:///.../mlflow.db).log_batch`` per step,
  synchronous (the store training uses without a tracking server).
* ``HTTP server``      the same calls to the stack's MLflow server (PostgreSQL behind it).
* ``RunLogger``        ``medgpt.tracking.RunLogger.metrics`` against the HTTP server: what the
  training thread pays (building the records and queueing them); the background thread's
  drain time for the round is reported beside it. Steps are issued back to back, so the
  sender thread competes with the caller for the GIL throughout: an upper bound.

Each method checks at the end that the server holds every step it logged.

    python bench/cluster_storage.py --json out.json      # 124M, 3 repeats, 300 logging steps
    python bench/cluster_storage.py --quick              # tiny model, 1 repeat, 50 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from medgpt.testing import bench as harness

CKPT_METHODS = {"local": "local disk (copy_files)", "s3": "object store (SeaweedFS S3)"}
LOG_METHODS = {
    "sqlite": "embedded sqlite, sync",
    "http": "HTTP server (PostgreSQL), sync",
    "runlogger": "RunLogger -> HTTP (queue only)",
}
# training.run_loop's per-step metrics (less "step") and the val_loss of evaluation steps.
METRIC_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_ms", "tokens_seen",
               "val_loss")  # fmt: skip
LR = 6e-4
SEED = 1234
MB = 1e6  # throughput in 10^6 bytes/s


# --------------------------------------------------------------------------- memory readings


def vm_hwm_mib() -> float:
    """This process's peak resident memory since the last :func:`reset_peak` (``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> bool:
    """Restart ``VmHWM`` from the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def group_hwm_mib(pgid: int | None) -> float:
    """Sum of the peak RSS (``VmHWM``) of the processes in process group ``pgid`` (the stack
    starts each component as a group of its own); shared pages count once per process."""
    if pgid is None:
        return float("nan")
    total, found = 0.0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
                    found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else float("nan")


# --------------------------------------------------------------------------- checkpoints


def _model_config(size: str) -> Any:
    from medgpt.config import ModelConfig

    return ModelConfig.preset(size)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fingerprint(params: Any, opt_state: dict[str, Any]) -> tuple[float, float]:
    """Sums (float64) of all weights and of every AdamW second moment: a restore must match."""
    w = sum(float(p.detach().double().sum()) for p in params)
    v = sum(float(s["exp_avg_sq"].double().sum()) for s in opt_state["state"].values())
    return w, v


def _local_copy(src: str, dst: str) -> None:
    """Ray Train's persist/restore for a local storage_path: ``pyarrow.fs.copy_files`` with its
    64 MiB chunks into a created folder (ray.train.v2 ``_upload_to_fs_path``)."""
    import pyarrow.fs

    fs = pyarrow.fs.LocalFileSystem()
    fs.create_dir(dst, recursive=True)
    pyarrow.fs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs,
                          chunk_size=64 * 1024 * 1024)  # fmt: skip


def _save_worker(conn: Connection, size: str, threads: int | None, work: str) -> None:
    """Hold a model and its optimizer (with state) like a training worker; save on request."""
    with harness.reporting_errors(conn):
        import torch

        from medgpt import storage
        from medgpt.checkpoint import save_checkpoint
        from medgpt.model import GPT
        from medgpt.training import configure_optimizer

        n_threads = harness.set_threads(threads)
        base_rss = harness.rss_now_mib()
        torch.manual_seed(SEED)
        config = _model_config(size)
        model = GPT(config)
        optimizer = configure_optimizer(model, lr=LR)
        # One AdamW step on small random gradients: both moments exist, as after any step.
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = 1000
        meta = {"step": step, "tokens_seen": step * 4096, "val_loss": 5.0, "train_loss": 5.1,
                "data_manifest_hash": "bench", "data_dir": "bench", "recipe": {},
                "mlflow_run_id": None}  # fmt: skip
        # What training.run_loop puts in train_state.pt (loader: DataLoader.state_dict's keys).
        train_state = {
            "optimizer": optimizer.state_dict(),
            "loader": {"dataset": "bench", "epoch": 0, "batch": step, "seed": SEED,
                       "world_size": 1, "block_size": config.block_size, "batch_size": 4},
            "step": step,
            "tokens_seen": step * 4096,
            "best_val_loss": 5.0,
            "rng": {"torch": torch.get_rng_state()},
        }  # fmt: skip
        fingerprint = _fingerprint(model.parameters(), train_state["optimizer"])
        conn.send(("ready", {
            "n_params": sum(p.numel() for p in model.parameters()),
            "fingerprint": fingerprint,
            "rss_imports_mib": base_rss,
            "rss_held_mib": harness.rss_now_mib(),
            "threads": n_threads,
        }))  # fmt: skip

        while (msg := conn.recv()) != "done":
            req = json.loads(msg)
            tmp = Path(tempfile.mkdtemp(prefix="medgpt-ckpt-", dir=work))
            try:
                reset_peak()
                rss0 = harness.rss_now_mib()
                t0 = time.perf_counter()
                ckpt = save_checkpoint(tmp / "checkpoint", model, meta, train_state)
                t1 = time.perf_counter()
                if req["method"] == "local":
                    _local_copy(str(ckpt), req["dest"])
                else:
                    storage.upload_dir(ckpt, req["dest"])
                t2 = time.perf_counter()
                files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
                conn.send(("saved", {
                    "write_s": t1 - t0, "transfer_s": t2 - t1, "bytes": sum(files.values()),
                    "files": files, "rss_before_mib": rss0, "peak_mib": vm_hwm_mib(),
                }))  # fmt: skip
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # training drops its copy after report
        conn.send(("done", {"peak_rss_mib": harness.peak_rss_mib()}))


def _restore(method: str, src: str, work: str, threads: int | None) -> dict[str, Any]:
    """A restarting worker: fetch the checkpoint folder, load weights and training state."""
    from medgpt import storage
    from medgpt.checkpoint import load_model, load_train_state

    harness.set_threads(threads)
    base = harness.rss_now_mib()
    tmp = Path(tempfile.mkdtemp(prefix="medgpt-restore-", dir=work))
    try:
        dst = tmp / "checkpoint"
        t0 = time.perf_counter()
        if method == "local":
            _local_copy(src, str(dst))
        else:
            storage.download_dir(src, dst)
        t1 = time.perf_counter()
        model = load_model(dst)
        state = load_train_state(dst)
        t2 = time.perf_counter()
        return {
            "transfer_s": t1 - t0,
            "load_s": t2 - t1,
            "bytes": _folder_bytes(dst),
            "fingerprint": _fingerprint(model.parameters(), state["optimizer"]),
            "rss_imports_mib": base,
            "peak_rss_mib": harness.peak_rss_mib(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_checkpoints(args: argparse.Namespace, work: Path, bucket: str) -> dict[str, Any]:
    from medgpt import storage

    saves: dict[str, list[dict[str, Any]]] = {m: [] for m in CKPT_METHODS}
    restores: dict[str, list[dict[str, Any]]] = {m: [] for m in CKPT_METHODS}
    worker = harness.Worker("checkpoint save", _save_worker, args.size, args.threads, str(work))
    try:
        info = worker.call()
        for r in range(args.repeats):
            for method in harness.in_turn(list(CKPT_METHODS), r):
                name = f"step-{r:06d}-{uuid.uuid4().hex[:8]}"
                dest = (
                    str(work / "storage" / name)
                    if method == "local"
                    else f"s3://{bucket}/bench/{name}"
                )
                print(f"  checkpoint round {r + 1}/{args.repeats}: {method}", file=sys.stderr)
                saved = worker.call(json.dumps({"method": method, "dest": dest}))
                restored = harness.in_fresh_process(_restore, method, dest, str(work),
                                                    args.threads)  # fmt: skip
                if tuple(restored["fingerprint"]) != tuple(info["fingerprint"]):
                    raise RuntimeError(
                        f"{method}: restored checkpoint differs from the saved one "
                        f"({restored['fingerprint']} vs {info['fingerprint']})"
                    )
                if restored["bytes"] != saved["bytes"]:
                    raise RuntimeError(f"{method}: restored {restored['bytes']} bytes of "
                                       f"{saved['bytes']}")  # fmt: skip
                saves[method].append(saved)
                restores[method].append(restored)
                if method == "local":
                    shutil.rmtree(dest, ignore_errors=True)
                else:
                    storage.delete_dir(dest)
        final = worker.call("done")
    finally:
        worker.close()
    return {"worker": info | final, "saves": saves, "restores": restores}


def summarize_checkpoints(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m in CKPT_METHODS:
        s, r = raw["saves"][m], raw["restores"][m]
        nbytes = s[0]["bytes"]
        med = statistics.median
        save_total = med(x["write_s"] + x["transfer_s"] for x in s)
        restore_total = med(x["transfer_s"] + x["load_s"] for x in r)
        out[m] = {
            "bytes": nbytes,
            "save_write_s": med(x["write_s"] for x in s),
            "save_transfer_s": med(x["transfer_s"] for x in s),
            "save_s": save_total,
            "save_mb_s": nbytes / MB / save_total,
            "save_transfer_mb_s": nbytes / MB / med(x["transfer_s"] for x in s),
            "save_peak_rss_mib": max(x["peak_mib"] for x in s),
            "save_rss_before_mib": max(x["rss_before_mib"] for x in s),
            # What a save adds on top of what the process held: freed memory stays with the
            # allocator, so a later save can start from an earlier one's peak; the largest.
            "save_peak_growth_mib": max(x["peak_mib"] - x["rss_before_mib"] for x in s),
            "restore_transfer_s": med(x["transfer_s"] for x in r),
            "restore_load_s": med(x["load_s"] for x in r),
            "restore_s": restore_total,
            "restore_mb_s": nbytes / MB / restore_total,
            "restore_transfer_mb_s": nbytes / MB / med(x["transfer_s"] for x in r),
            "restore_peak_rss_mib": max(x["peak_rss_mib"] for x in r),
            "restore_rss_imports_mib": max(x["rss_imports_mib"] for x in r),
        }
    return out


# --------------------------------------------------------------------------- MLflow logging


def _log_worker(conn: Connection, method: str, uri: str) -> None:
    """One logging method against one store: a run of its own, N steps per request."""
    with harness.reporting_errors(conn):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from medgpt.tracking import RunLogger

        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment(f"bench-cluster-storage-{method}-{uuid.uuid4().hex[:8]}")
        run_id = client.create_run(exp, run_name=f"bench-{method}").info.run_id
        logger = RunLogger(uri, run_id, log=lambda msg: print(msg, file=sys.stderr)) \
            if method == "runlogger" else None  # fmt: skip
        conn.send(("ready", {"rss_mib": harness.rss_now_mib()}))
        step = 0
        while (msg := conn.recv()) != "done":
            req = json.loads(msg)
            times: list[float] = []
            t_first = time.perf_counter()
            for i in range(req["warmup"] + req["steps"]):
                step += 1
                values = {k: 1.0 / (step + j) for j, k in enumerate(METRIC_KEYS)}
                t0 = time.perf_counter()
                if logger is not None:
                    logger.metrics(values, step)
                else:
                    ts = int(time.time() * 1000)
                    client.log_batch(
                        run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()]
                    )
                dt = time.perf_counter() - t0
                if i >= req["warmup"]:
                    times.append(dt)
            drain_s = None
            if logger is not None:
                if not logger.flush(300):
                    raise RuntimeError("RunLogger did not drain within 300 s")
                drain_s = time.perf_counter() - t_first
            conn.send(("round", {"step_s": times, "drain_s": drain_s,
                                 "steps_total": req["warmup"] + req["steps"]}))  # fmt: skip
        undelivered = logger.close(60) if logger is not None else 0
        stored = len(client.get_metric_history(run_id, METRIC_KEYS[0]))
        if stored != step or undelivered:
            raise RuntimeError(f"{method}: {stored} of {step} steps stored, "
                               f"{undelivered} undelivered")  # fmt: skip
        client.set_terminated(run_id)
        conn.send(("done", {"steps_stored": stored, "peak_rss_mib": harness.peak_rss_mib()}))


def measure_logging(args: argparse.Namespace, sqlite_uri: str, http_uri: str) -> dict[str, Any]:
    uris = {"sqlite": sqlite_uri, "http": http_uri, "runlogger": http_uri}
    workers = {m: harness.Worker(LOG_METHODS[m], _log_worker, m, uris[m]) for m in LOG_METHODS}
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in LOG_METHODS}
    try:
        ready = {m: w.call() for m, w in workers.items()}
        for r in range(args.repeats):
            print(f"  logging round {r + 1}/{args.repeats}", file=sys.stderr)
            for m in harness.in_turn(list(LOG_METHODS), r):
                req = {"steps": args.log_steps, "warmup": args.log_warmup}
                rounds[m].append(workers[m].call(json.dumps(req)))
        done = {m: w.call("done") for m, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    return {"ready": ready, "rounds": rounds, "done": done}


def summarize_logging(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in LOG_METHODS:
        times = sorted(t for rd in raw["rounds"][m] for t in rd["step_s"])
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        out[m] = {
            "ms_per_step_median": 1e3 * statistics.median(times),
            "ms_per_step_mean": 1e3 * statistics.fmean(times),
            "ms_per_step_p99": 1e3 * p99,
            "steps_measured": len(times),
            "steps_stored": raw["done"][m]["steps_stored"],
            "peak_rss_mib": raw["done"][m]["peak_rss_mib"],
        }
        drains = [rd["drain_s"] for rd in raw["rounds"][m] if rd["drain_s"] is not None]
        if drains:
            # Seconds from the round's first queued record until the server held them all,
            # per step: how fast the background thread delivers.
            per = [d / rd["steps_total"] for d, rd in zip(drains, raw["rounds"][m], strict=True)]
            out[m]["drain_ms_per_step_median"] = 1e3 * statistics.median(per)
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    import mlflow
    import pyarrow
    import torch

    return {
        "cpu": harness.cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "pyarrow": pyarrow.__version__,
    }


def print_tables(args: argparse.Namespace, ck: dict[str, Any], lg: dict[str, Any],
                 raw_ck: dict[str, Any]) -> None:  # fmt: skip
    w = raw_ck["worker"]
    nbytes = ck["local"]["bytes"]
    print(
        f"\n== checkpoint: {args.size} ({w['n_params'] / 1e6:.1f}M params, fp32) + AdamW state "
        f"= {nbytes / MB:,.0f} MB per checkpoint; {args.repeats} repeats, medians"
    )
    hdr = (f"{'method':<30}{'save s':>8}{'(write':>8}{'+ xfer)':>8}{'MB/s':>7}{'xfer MB/s':>10}"
           f"{'save +MiB':>10}{'restore s':>10}{'(xfer':>7}{'+ load)':>8}{'MB/s':>7}"
           f"{'xfer MB/s':>10}{'restore peak MiB':>17}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for m, label in CKPT_METHODS.items():
        c = ck[m]
        print(
            f"{label:<30}{c['save_s']:>8.2f}{c['save_write_s']:>8.2f}{c['save_transfer_s']:>8.2f}"
            f"{c['save_mb_s']:>7.0f}{c['save_transfer_mb_s']:>10.0f}{c['save_peak_growth_mib']:>10,.0f}"
            f"{c['restore_s']:>10.2f}{c['restore_transfer_s']:>7.2f}{c['restore_load_s']:>8.2f}"
            f"{c['restore_mb_s']:>7.0f}{c['restore_transfer_mb_s']:>10.0f}"
            f"{c['restore_peak_rss_mib']:>17,.0f}"
        )
    lo, s3 = ck["local"], ck["s3"]
    print(
        f"ratio object store / local disk (time): save {s3['save_s'] / lo['save_s']:.2f}x "
        f"(transfer alone {s3['save_transfer_s'] / lo['save_transfer_s']:.2f}x), restore "
        f"{s3['restore_s'] / lo['restore_s']:.2f}x (transfer alone "
        f"{s3['restore_transfer_s'] / lo['restore_transfer_s']:.2f}x)"
    )
    print(
        f"save +MiB = the saving process's peak RSS (VmHWM, reset before each save) above its "
        f"RSS before the save, largest over the repeats (it held {w['rss_held_mib']:,.0f} MiB "
        f"after building; peak over the run {w['peak_rss_mib']:,.0f} MiB); restore peak = a "
        f"fresh process's, {lo['restore_rss_imports_mib']:,.0f} MiB of it imports"
    )

    print(
        f"\n== MLflow logging: {len(METRIC_KEYS)} metrics per step, {args.log_steps} steps x "
        f"{args.repeats} rounds ({args.log_warmup} warm-up steps per round not counted)"
    )
    hdr = (f"{'method':<34}{'ms/step median':>15}{'mean':>8}{'p99':>8}{'vs sqlite':>10}"
           f"{'drain ms/step':>14}{'peak RSS MiB':>13}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    base = lg["sqlite"]["ms_per_step_median"]
    for m, label in LOG_METHODS.items():
        x = lg[m]
        drain = x.get("drain_ms_per_step_median")
        print(
            f"{label:<34}{x['ms_per_step_median']:>15.3f}{x['ms_per_step_mean']:>8.3f}"
            f"{x['ms_per_step_p99']:>8.3f}{x['ms_per_step_median'] / base:>9.3g}x"
            f"{(f'{drain:.2f}' if drain is not None else '-'):>14}{x['peak_rss_mib']:>13,.0f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model preset (default gpt2, 124M)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every measurement")
    p.add_argument("--log-steps", type=int, default=300, help="measured logging steps per round")
    p.add_argument("--log-warmup", type=int, default=10, help="unmeasured steps per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 1 repeat, 50 logging steps (a smoke run, not figures)",
    )
    p.add_argument("--keep", action="store_true", help="leave the stack's folder in /tmp")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.log_steps, args.log_warmup = "tiny", 1, 50, 5
    if min(args.repeats, args.log_steps) < 1 or args.log_warmup < 0:
        p.error("--repeats and --log-steps must be >= 1, --log-warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medgpt.stack import Stack
    from medgpt.testing.stack import stack_config

    info = machine_info()
    load_before = os.getloadavg()
    print(
        f"machine: {info['cpu']} ({info['cpu_count']} cores), python {info['python']}, "
        f"torch {info['torch']}, mlflow {info['mlflow']}, pyarrow {info['pyarrow']}; "
        f"load average before: {harness.fmt_load(load_before)}"
    )
    # PostgreSQL runs as user postgres when we are root: the folder must be one it can enter.
    root = Path(tempfile.mkdtemp(prefix="medgpt-bench-stack-", dir="/tmp"))
    root.chmod(0o711)  # mkdtemp makes it 0700: the postgres user must pass through
    work = root / "work"
    work.mkdir()
    config = stack_config(root / "stack")  # every port free (SeaweedFS's +10000 too), no Ray
    pg_port = config.postgres_port
    stack = Stack(config)
    saved_env = {k: os.environ.get(k) for k in
                 ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")}  # fmt: skip
    try:
        t0 = time.perf_counter()
        env = stack.up()
        startup_s = time.perf_counter() - t0
        print(f"stack up in {startup_s:.1f} s: S3 {env['AWS_ENDPOINT_URL']}, MLflow "
              f"{env['MLFLOW_TRACKING_URI']} (PostgreSQL :{pg_port}), folder {root}")  # fmt: skip
        # The spawned workers inherit it: pyarrow's S3 filesystem reads these variables.
        for k in saved_env:
            os.environ[k] = env[k]
        raw_ck = measure_checkpoints(args, work, config.bucket)
        raw_lg = measure_logging(args, f"sqlite:///{work / 'mlflow.db'}",
                                 env["MLFLOW_TRACKING_URI"])  # fmt: skip
        stack_rss = {n: group_hwm_mib(stack._pid(n)) for n in ("objectstore", "mlflow")}
    finally:
        try:
            stack.down()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    ck, lg = summarize_checkpoints(raw_ck), summarize_logging(raw_lg)
    print(f"load average after: {harness.fmt_load(load_after)}")
    print_tables(args, ck, lg, raw_ck)
    print(f"\nstack start-up {startup_s:.1f} s; peak RSS: SeaweedFS server "
          f"{stack_rss['objectstore']:,.0f} MiB, MLflow server "
          f"{stack_rss['mlflow']:,.0f} MiB (sums over each process group)")  # fmt: skip
    if args.json:
        harness.dump_json(args.json, {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "stack_startup_s": startup_s,
            "stack_peak_rss_mib": stack_rss,
            "checkpoint": {"summary": ck, **raw_ck},
            "logging": {"summary": lg, **raw_lg},
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
