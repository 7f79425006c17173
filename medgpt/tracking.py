"""MLflow: where runs are recorded, and the driver-side bookkeeping of a training run.

Embedded default: ``sqlite:///<storage>/mlflow.db`` with artifacts in ``<storage>/mlartifacts``
— no server. ``MLFLOW_TRACKING_URI`` (or ``job.mlflow_tracking_uri``) points at a real server.
The driver creates the experiment and run before any worker logs (concurrent first use of a
sqlite store races in its schema migration), passes the run id to rank 0, and reuses the same
run when a run name is resumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medgpt.errors import CheckpointError

RUN_NAME_TAG = "medgpt.run_name"


def tracking_uri_for(storage_path: str, configured: str | None = None) -> str:
    """The tracking URI a run uses: env var, then the recipe, then sqlite next to the runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    # With remote run storage, keep the record beside the driver rather than guess a server.
    base = Path("runs" if "://" in storage_path else storage_path).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a server decides


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
) -> tuple[str, bool]:
    """The MLflow run for ``run_name`` in ``experiment``: the existing one, or a new one with
    ``params`` logged. Returns (run_id, resumed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else client.create_experiment(experiment, artifact_location=_artifact_root(uri))
    )
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    from mlflow.entities import Param

    flat = flatten(params)
    items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):  # MLflow caps params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, False


def loss_curve_png(uri: str, run_id: str, path: Path) -> Path | None:
    """Train and validation loss against step, from the run's metric history."""
    from mlflow.tracking import MlflowClient

    from medgpt.plots import Series, line_chart

    client = MlflowClient(tracking_uri=uri)
    series = []
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        series.append(Series(key, [m.step for m in hist], [m.value for m in hist], style))
    return line_chart(series, path, "step", "loss (nats/token)")


def finish_run(
    uri: str,
    run_id: str,
    summary: dict[str, Any],
    best_checkpoint: str | None,
    manifest: dict[str, Any],
    recipe: dict[str, Any],
    status: str = "FINISHED",
) -> None:
    """Log the end-of-run artifacts: the best checkpoint folder (as ``model/checkpoint``), the
    data manifest, the resolved recipe, the loss curve and the summary."""
    import yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            (t / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            (t / "result.json").write_text(json.dumps(summary, indent=2))
            client.log_artifact(run_id, str(t / "manifest.json"), "data")
            client.log_artifact(run_id, str(t / "recipe.yaml"), "config")
            client.log_artifact(run_id, str(t / "result.json"))
            png = loss_curve_png(uri, run_id, t / "loss_curve.png")
            if png is not None:
                client.log_artifact(run_id, str(png))
        if best_checkpoint and "://" not in best_checkpoint:
            client.log_artifacts(run_id, best_checkpoint, "model/checkpoint")
        elif best_checkpoint:
            # In object storage: its serving files pass through here on their way to the artifact
            # store, so `runs:/ID` and registering work as for a local run.
            from medgpt import storage
            from medgpt.checkpoint import SERVING_FILES

            with tempfile.TemporaryDirectory() as tmp:
                local = storage.download_dir(best_checkpoint, Path(tmp) / "c", only=SERVING_FILES)
                client.log_artifacts(run_id, str(local), "model/checkpoint")
    finally:
        # The run's status and best loss are recorded even when its artifacts cannot be.
        if summary.get("best_val_loss") is not None:
            client.set_tag(run_id, "best_val_loss", str(summary["best_val_loss"]))
        client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------
# Evaluation records and the model registry


def mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for a block.

    Some calls ignore their ``tracking_uri=`` argument part of the way down (downloading a
    registered version resolves its logged model through the global store), so without
    this they would read — and create — ``./mlflow.db`` in the working directory.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (and the registry's
    variable) into this process's environment; those are put back exactly as they were, or
    every later run in the process — and every subprocess it starts — would follow ``uri``."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    # The explicitly set values (usually None), not the resolved defaults: restoring a
    # resolved ``sqlite:///<cwd>/mlflow.db`` would pin today's working directory.
    previous = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mlflow_message(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.splitlines()[0] if msg else type(e).__name__


def require_store(uri: str) -> None:
    """Looking something up in a sqlite store that does not exist would create an empty one:
    say what is missing instead."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise CheckpointError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')} (nothing trained or registered "
            "there yet; check --storage / MLFLOW_TRACKING_URI)"
        )


def run_exists(uri: str, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return mlflow_client(uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def evaluation_run(uri: str, run_id: str | None, experiment: str, name: str) -> tuple[str, bool]:
    """The run an evaluation is recorded in: the checkpoint's training run when this store
    knows it, else a new run. Returns (run id, is the training run)."""
    if run_exists(uri, run_id):
        assert run_id is not None
        return run_id, True
    new_id, _ = start_or_resume_run(
        uri, experiment, name, params={}, tags={"medgpt.kind": "evaluation"}
    )
    mlflow_client(uri).set_terminated(new_id)
    return new_id, False


def log_evaluation(
    uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str], report_dir: Path
) -> None:
    from mlflow.entities import Metric

    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if math.isfinite(v)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.log_artifacts(run_id, str(report_dir), f"evaluation/{report_dir.name}")


def metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /``: map anything else to ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)[:250]


def git_commit() -> str | None:
    """The commit of this medgpt checkout (with ``-dirty`` when it has local changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------
# Logging from a training worker that must not wait for (or die with) the tracking server

# A call to an unreachable server fails after one try and this many seconds instead of MLflow's
# default of 7 retries with exponential backoff (minutes): the logger below does the retrying,
# off the training thread.
WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def few_retries() -> Iterator[None]:
    """MLflow's HTTP calls in this block try once more at most (WORKER_HTTP_ENV's timeout),
    instead of backing off for minutes; the variables are put back after."""
    saved = {k: os.environ.get(k) for k in WORKER_HTTP_ENV}
    os.environ.update({**WORKER_HTTP_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """Sends a run's metrics and texts to MLflow from a background thread, in order.

    Training never waits for the server: :meth:`metrics` and :meth:`text` only queue. When a
    send fails (server down, network cut) the thread keeps the record, says so once, and
    tries again with growing pauses (up to ``max_delay_s``); records queued meanwhile are sent
    once it answers again. At most ``max_pending`` metric records are held; past that the
    oldest are dropped and counted. :meth:`close` waits a bounded time for the queue to drain
    and returns (and prints) how many records were never delivered."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        max_pending: int = 200_000,
        max_delay_s: float = 30.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        import collections
        import threading

        from mlflow.tracking import MlflowClient

        for k, v in WORKER_HTTP_ENV.items():
            os.environ.setdefault(k, v)
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._log = log or (lambda msg: print(msg, flush=True))
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._inflight = 0  # queued items the current request carries
        self._closed = False
        self.max_pending, self.max_delay_s = max_pending, max_delay_s
        self.dropped = 0
        self.sent = 0
        self.failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="medgpt-mlflow", daemon=True)
        self._thread.start()

    def _metric_count(self) -> int:
        return sum(len(item) for kind, item in self._pending if kind == "metrics")

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # when it was measured, not when it reached the server
        batch = [Metric(k, float(v), ts, step) for k, v in values.items() if math.isfinite(v)]
        with self._cond:
            self._pending.append(("metrics", batch))
            # Drop the oldest records not in the request being sent (which pops its own).
            while self._metric_count() > self.max_pending and len(self._pending) > self._inflight:
                kind, item = self._pending[self._inflight]
                del self._pending[self._inflight]
                self.dropped += len(item) if kind == "metrics" else 1
            self._cond.notify_all()

    def text(self, text: str, path: str) -> None:
        with self._cond:
            self._pending.append(("text", (text, path)))
            self._cond.notify_all()

    def _send(self, kind: str, item: Any) -> None:
        if kind == "metrics":
            for i in range(0, len(item), 1000):  # MLflow's cap per batch
                self.client.log_batch(self.run_id, metrics=item[i : i + 1000])
        else:
            self.client.log_text(self.run_id, item[0], item[1])

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                kind, item = self._pending[0]
                taken = 1
                if kind == "metrics":
                    # The steps queued meanwhile go in one request (up to MLflow's 1000 per
                    # batch): a loop faster than one round trip per step does not fall behind.
                    item = list(item)
                    while (
                        taken < len(self._pending)
                        and self._pending[taken][0] == "metrics"
                        and len(item) + len(self._pending[taken][1]) <= 1000
                    ):
                        item.extend(self._pending[taken][1])
                        taken += 1
                self._busy, self._inflight = True, taken
            try:
                self._send(kind, item)
            except Exception as e:  # any failure of the client: keep the record, retry later
                with self._cond:
                    self._busy, self._inflight = False, 0
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                        self._log(
                            f"medgpt: MLflow at {self.uri} is not answering "
                            f"({mlflow_message(e)}); training goes on, records are kept and "
                            "sent when it is back"
                        )
                    self._cond.notify_all()
                    # Pause, but wake up at once for close() so it does not wait out a delay.
                    self._cond.wait(timeout=delay)
                    if self._closed and self._close_deadline < time.monotonic():
                        return
                delay = min(delay * 2, self.max_delay_s)
                continue
            with self._cond:
                for _ in range(taken):
                    self._pending.popleft()
                self._busy, self._inflight = False, 0
                self.sent += len(item) if kind == "metrics" else 1
                if self.failing_since is not None:
                    self._log(
                        f"medgpt: MLflow at {self.uri} is back after "
                        f"{time.monotonic() - self.failing_since:.0f} s; sending what was kept"
                    )
                    self.failing_since = None
                delay = 1.0
                self._cond.notify_all()

    _close_deadline = float("inf")

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything queued to be sent; True when it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True

    def close(self, timeout_s: float = 60.0) -> int:
        """Drain for up to ``timeout_s``, stop the thread; returns the records not delivered
        (dropped ones included), after one warning line when there are any."""
        with self._cond:
            self._closed = True
            self._close_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        self.flush(timeout_s)
        self._thread.join(timeout=5)
        with self._cond:
            left = self.dropped + sum(
                len(item) if kind == "metrics" else 1 for kind, item in self._pending
            )
        if left:
            self._log(
                f"medgpt: warning: {left} MLflow record(s) of run {self.run_id} were not "
                f"delivered to {self.uri} (server unreachable); the checkpoints are unaffected"
            )
        return left
