"""MLflow: where runs are recorded, and the driver-side bookkeeping of a training run.

Embedded default: ``sqlite:///<storage>/mlflow.db`` with artifacts in ``<storage>/mlartifacts``
— no server. ``MLFLOW_TRACKING_URI`` (or ``job.mlflow_tracking_uri``) points at a real server.
The driver creates the experiment and run before any worker logs (concurrent first use of a
sqlite store races in its schema migration), passes the run id to rank 0, and reuses the same
run when a run name is resumed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], style, label=key, ms=3)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    if summary.get("best_val_loss") is not None:
        client.set_tag(run_id, "best_val_loss", str(summary["best_val_loss"]))
    client.set_terminated(run_id, status=status)
