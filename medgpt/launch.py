"""The driver side of a training run: validate, connect to Ray, fit, summarise.

``medgpt train`` and ``jobs/train.py`` call :func:`train`. Everything that can be checked before
workers start is checked here, so bad input fails in a second with one line instead of a
worker-group retry loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from medgpt.checkpoint import RUN_RESULT as RESULT_FILE
from medgpt.config import Recipe
from medgpt.data.loader import WindowLoader
from medgpt.errors import ConfigError, MedgptError
from medgpt.training import check_dataset, resolve_model_config, train_loop_per_worker


class TrainingError(MedgptError):
    """The run failed in the workers; the message carries the workers' own error."""


@dataclasses.dataclass
class TrainResult:
    """What a training run left: its best checkpoint, final step and MLflow run. The fields
    but ``result_file`` are ``<run dir>/medgpt-result.json`` (and the MLflow run's result.json)."""

    run_name: str
    run_dir: str
    best_checkpoint: str | None
    best_val_loss: float | None
    final_step: int | None
    final_val_loss: float | None
    mlflow_run_id: str
    mlflow_tracking_uri: str
    seconds: float
    result_file: str | None = None  # a local path or a URI in the run's object storage

    def to_dict(self) -> dict[str, Any]:
        """The result file's content."""
        out = dataclasses.asdict(self)
        del out["result_file"]
        return out


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(recipe: Recipe) -> Recipe:
    """Absolute paths everywhere: Ray workers run in another working directory."""
    data = recipe.to_dict()
    data["train"]["data_dir"] = str(Path(recipe.train.data_dir).expanduser().resolve())
    src = recipe.train.init_from
    if src != "scratch" and Path(src).expanduser().exists():
        data["train"]["init_from"] = str(Path(src).expanduser().resolve())
    if not _is_uri(recipe.job.storage_path):
        data["job"]["storage_path"] = str(Path(recipe.job.storage_path).expanduser().resolve())
    return Recipe.from_dict(data)


def validate(recipe: Recipe) -> dict[str, Any]:
    """Check data, model source and batch arithmetic; returns the dataset manifest."""
    tc = recipe.train
    model_config = resolve_model_config(recipe)
    if tc.seq_len > model_config.block_size:
        raise ConfigError(
            f"train.seq_len: {tc.seq_len} exceeds the model's context {model_config.block_size}"
        )
    manifest = check_dataset(tc.data_dir, model_config)
    tc.grad_accum_steps(recipe.job.num_workers)
    for split in ("train", "val"):  # enough tokens for a batch on every worker?
        WindowLoader(tc.data_dir, split, tc.seq_len, tc.micro_batch_size, 0, recipe.job.num_workers)
    return manifest


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The driver's storage and tracking settings go to the job's workers (as `ray job submit
# --runtime-env-json` would carry them): a cluster whose nodes get credentials from instance roles
# needs none of these, but a driver pointed at an S3-compatible endpoint or a tracking server by
# its environment (`eval "$(medgpt stack up)"`) runs the same on a cluster started without them.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL",
    "MEDGPT_STORAGE_ATTEMPTS", "MEDGPT_STORAGE_RETRY_S",
)  # fmt: skip


def job_env() -> dict[str, str]:
    """The variables of FORWARDED_ENV this driver has."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def connect_ray(recipe: Recipe) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start one here.

    Ray Train frees the placement group of a run whose controller died (a stopped Tune trial,
    a killed driver) from a detached actor that finds the State API through
    RAY_API_SERVER_ADDRESS, else by auto-detecting the cluster, which fails when a second Ray
    runs on the same host: the group then leaks and later runs wait for its CPUs for ever. So
    the job's workers are told the address: the dashboard port of a cluster started here is
    chosen up front."""
    import ray

    if ray.is_initialized():
        return
    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    forwarded = job_env()
    if os.environ.get("RAY_ADDRESS"):
        env = {**forwarded, **({"RAY_API_SERVER_ADDRESS": api} if api else {})}
        ray.init(
            address=os.environ["RAY_ADDRESS"],
            log_to_driver=True,
            runtime_env={"env_vars": env} if env else None,
        )
        return
    # Fail instead of waiting forever when the worker group cannot be placed.
    os.environ.setdefault(  # inherited by the local raylet and its workers
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(recipe.job.start_timeout_s)
    )
    port = _free_port()
    ray.init(
        include_dashboard=True,
        dashboard_port=port,
        log_to_driver=True,
        runtime_env={
            "env_vars": {**forwarded, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        },
    )


def worker_group_resources(recipe: Recipe) -> dict[str, float]:
    """What the run's whole worker group reserves: CPUs, and a GPU per worker when used."""
    job = recipe.job
    need = {"CPU": job.num_workers * job.cpus_per_worker}
    if job.use_gpu:
        need["GPU"] = float(job.num_workers)
    return need


def check_capacity(recipe: Recipe) -> None:
    """Refuse a worker group this cluster can never hold (Ray would otherwise wait)."""
    import ray

    total = ray.cluster_resources()
    job = recipe.job
    for res, amount in worker_group_resources(recipe).items():
        have = float(total.get(res, 0.0))
        if amount > have and not os.environ.get("MEDGPT_ALLOW_AUTOSCALE"):
            raise ConfigError(
                f"job.num_workers: {job.num_workers} workers need {amount:g} {res} but the "
                f"cluster has {have:g}; lower job.num_workers/cpus_per_worker (or set "
                "MEDGPT_ALLOW_AUTOSCALE=1 on an autoscaling cluster to wait for nodes)"
            )
    if job.placement_strategy == "STRICT_SPREAD" and not os.environ.get("MEDGPT_ALLOW_AUTOSCALE"):
        fit = [
            n
            for n in ray.nodes()
            if n.get("Alive")
            and n["Resources"].get("CPU", 0) >= job.cpus_per_worker
            and (not job.use_gpu or n["Resources"].get("GPU", 0) >= 1)
        ]
        if len(fit) < job.num_workers:
            raise ConfigError(
                f"job.placement_strategy: STRICT_SPREAD puts each of the {job.num_workers} "
                f"workers on its own node, but {len(fit)} node(s) can hold one; use SPREAD or "
                "PACK, or fewer workers"
            )


def _worker_error(exc: BaseException) -> str:
    """The most useful line from a failed fit: our own error if a worker raised one."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        cause = err
        while cause is not None:
            if isinstance(cause, MedgptError):
                return f"rank {rank}: {cause}"
            cause = getattr(cause, "cause", None) or cause.__cause__
        text = str(err).strip().splitlines()
        if text:
            return f"rank {rank}: {text[-1]}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def make_trainer(recipe: Recipe, uri: str, run_id: str, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of one training run (``recipe`` already resolved and validated)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    job = recipe.job
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.to_dict(),
            "tracking": {"tracking_uri": uri, "run_id": run_id},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={
                "CPU": job.cpus_per_worker,
                **({"GPU": 1} if job.use_gpu else {}),
            },
            placement_strategy=job.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=job.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=recipe.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=job.max_failures, controller_failure_limit=0
            ),
            callbacks=callbacks or None,
        ),
    )


def fit_and_record(
    recipe: Recipe,
    uri: str,
    run_id: str,
    manifest: dict[str, Any],
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Fit the run, close its MLflow record (FAILED with the workers' error, or FINISHED with
    the best checkpoint logged) and write ``<run dir>/medgpt-result.json``."""
    from medgpt import tracking

    job = recipe.job
    trainer = make_trainer(recipe, uri, run_id, callbacks)
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        try:
            # Quickly: what failed the run (the artifact store down) may fail this too, and
            # MLflow's default retries would hold the error back for minutes.
            with tracking.few_retries():
                tracking.finish_run(
                    uri, run_id, {"error": _worker_error(e)}, None, manifest, recipe.to_dict(),
                    "FAILED",
                )  # fmt: skip
        except Exception as record_error:  # what failed the run (a store down) may fail this too
            print(
                f"medgpt train: warning: the failure could not be recorded in MLflow at {uri}: "
                f"{tracking.mlflow_message(record_error)}",
                flush=True,
            )
        raise TrainingError(f"training run {job.name!r} failed: {_worker_error(e)}") from None
    best = result.get_best_checkpoint("val_loss", "min")
    best_val = None
    for ckpt, metrics in result.best_checkpoints:
        if best is not None and ckpt.path == best.path:
            best_val = metrics.get("val_loss")
    best_path = best.path if best is not None else None
    if best_path and _is_uri(job.storage_path) and not _is_uri(best_path):
        # Ray reports a checkpoint on remote storage by its path inside the bucket, without
        # the scheme; without it the path would read as a (missing) local folder.
        best_path = f"{job.storage_path.split('://', 1)[0]}://{best_path}"
    summary = TrainResult(
        run_name=job.name,
        run_dir=str(Path(job.storage_path) / job.name)
        if not _is_uri(job.storage_path)
        else f"{job.storage_path}/{job.name}",
        best_checkpoint=best_path,
        best_val_loss=best_val,
        final_step=(result.metrics or {}).get("step"),
        final_val_loss=(result.metrics or {}).get("val_loss"),
        mlflow_run_id=run_id,
        mlflow_tracking_uri=uri,
        seconds=round(time.time() - started, 1),
    )
    try:
        tracking.finish_run(
            uri, run_id, summary.to_dict(), summary.best_checkpoint, manifest, recipe.to_dict()
        )
    except Exception as e:  # the server or its artifact store gone at the end of the run
        raise TrainingError(
            f"training run {job.name!r} finished (best checkpoint {summary.best_checkpoint}), "
            f"but recording it in MLflow at {uri} failed: {tracking.mlflow_message(e)}; "
            "running the same command again records it"
        ) from None
    text = json.dumps(summary.to_dict(), indent=2) + "\n"
    if not _is_uri(job.storage_path):
        out = Path(summary.run_dir) / RESULT_FILE
        out.write_text(text)
        summary.result_file = str(out)
    else:
        # Beside the checkpoints, where `evaluate --checkpoint s3://.../RUN` looks for the best.
        from medgpt import storage

        summary.result_file = storage.join(summary.run_dir, RESULT_FILE)
        storage.write_bytes(summary.result_file, text.encode())
    return summary


def gpu_types() -> dict[str, str]:
    """The GPU types of the alive nodes with GPUs, as Ray labels them (its
    ``accelerator_type:NAME`` resources), each with the first node address that has it."""
    import ray

    found: dict[str, str] = {}
    for node in ray.nodes():
        if not node.get("Alive") or not node["Resources"].get("GPU"):
            continue
        for key in node["Resources"]:
            if key.startswith("accelerator_type:"):
                found.setdefault(key.split(":", 1)[1], node["NodeManagerAddress"])
    return found


def check_fit(recipe: Recipe) -> None:
    """Refuse a GPU run whose per-GPU training memory (medgpt.plan) exceeds the smallest GPU
    type of the cluster: it would die of CUDA out-of-memory at its first step, after the
    cluster has started and loaded everything. Types the planner has no figures for are
    named and not checked."""
    from medgpt import plan
    from medgpt.training import resolve_model_config

    if not recipe.job.use_gpu:
        return
    types = gpu_types()
    known = {t: plan.RAY_ACCELERATOR_TYPES[t] for t in types if t in plan.RAY_ACCELERATOR_TYPES}
    unknown = sorted(set(types) - set(known))
    if unknown or not types:
        print(
            f"medgpt train: GPU memory not checked for {', '.join(unknown) or 'unlabelled GPUs'} "
            f"(medgpt plan knows {', '.join(plan.GPUS_MIB)})",
            flush=True,
        )
    if not known:
        return
    gpu = min(known.values(), key=plan.GPUS_MIB.__getitem__)
    try:
        config = resolve_model_config(recipe)
    except (MedgptError, OSError) as e:  # the workers will report it where they load it
        print(f"medgpt train: GPU memory not checked: {e}", flush=True)
        return
    problem = plan.fit_problem(recipe, config, gpu)
    if problem:
        raise ConfigError(problem)


def train(recipe: Recipe) -> TrainResult:
    """Run (or resume) the training run ``recipe.job.name``."""
    from medgpt import preflight, tracking

    recipe = resolve_paths(recipe)
    manifest = validate(recipe)
    job = recipe.job
    connect_ray(recipe)
    check_capacity(recipe)
    check_fit(recipe)
    uri = tracking.tracking_uri_for(job.storage_path, job.mlflow_tracking_uri)
    preflight.check_cluster(job.storage_path, uri, "job.storage_path")
    run_id, resumed = tracking.start_or_resume_run(
        uri,
        job.experiment,
        job.name,
        recipe.to_dict(),
        {"data_manifest_hash": manifest["content_hash"], "mlflow.source.name": "medgpt train"},
    )
    print(
        f"medgpt train: run {job.name!r} ({'resuming' if resumed else 'new'}), "
        f"{job.num_workers} worker(s), MLflow run {run_id} at {uri}",
        flush=True,
    )
    return fit_and_record(recipe, uri, run_id, manifest)
