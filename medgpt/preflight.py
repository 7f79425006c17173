"""Checks before any worker starts: does this Ray cluster reach the run's storage and tracking?

On a cluster whose nodes share no disk, a local ``job.storage_path`` fails at the first
checkpoint and a sqlite tracking URI opens an empty database on each node (the run dies at its
first evaluation): both only after paid GPU time. So with more than one node they are refused
up front, and a probe task on every node writes to the storage and asks the tracking server
for its health, from where the workers will run.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

from medgpt import storage
from medgpt.errors import ConfigError, MedgptError

# Set (to 1) when a local-looking storage path is a mount every node shares (NFS, FSx, a
# Filestore): then it is allowed on a multi-node cluster.
SHARED_STORAGE_ENV = "MEDGPT_SHARED_STORAGE"
PROBE_TIMEOUT_S = 120.0


class PreflightError(MedgptError):
    """A node that cannot reach the run's storage or tracking server."""


def is_local_tracking(uri: str) -> bool:
    """sqlite or file stores (and bare paths): one process's disk, invisible to other nodes."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_settings(
    nodes: int, storage_path: str | None, tracking_uri: str | None, setting: str
) -> None:
    """Refuse storage and tracking a ``nodes``-node cluster without a shared disk cannot use.
    ``setting`` names where the storage path comes from (``job.storage_path``, ``--storage``)."""
    if nodes <= 1:
        return
    if (
        storage_path is not None
        and not storage.is_remote(storage_path)
        and os.environ.get(SHARED_STORAGE_ENV) != "1"
    ):
        raise ConfigError(
            f"{setting}: {storage_path!r} is a local folder, but this Ray cluster has {nodes} "
            "nodes and they share no disk; use object storage (s3://BUCKET/runs, gs://BUCKET/runs, "
            f"e.g. MEDGPT_STORAGE), or set {SHARED_STORAGE_ENV}=1 if it is a mount every node shares"
        )
    if tracking_uri is not None and is_local_tracking(tracking_uri):
        raise ConfigError(
            f"MLflow tracking URI {tracking_uri!r} is a local store, but this Ray cluster has "
            f"{nodes} nodes: workers on the others would open empty stores of their own; run an "
            "MLflow tracking server (docs/cluster.md, `medgpt stack up`) and set "
            "MLFLOW_TRACKING_URI=http://HOST:PORT (or job.mlflow_tracking_uri)"
        )


def probe_here(storage_uri: str | None, tracking_uri: str | None, write: bool = True) -> list[str]:
    """What this process cannot reach: the remote storage (written, read back and deleted, or
    with ``write=False`` only looked up) and an HTTP tracking server (its /health). Returns one
    line per problem."""
    problems = []
    if storage_uri is not None and storage.is_remote(storage_uri):
        try:
            if write:
                storage.probe(storage_uri)
            elif not storage.exists(storage_uri):
                problems.append(f"storage: {storage_uri}: no such object or folder")
        except storage.StorageError as e:
            problems.append(f"storage: {e}")
    if tracking_uri is not None and tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if r.status != 200:
                    problems.append(f"tracking: {url} answered {r.status}")
        except (OSError, urllib.error.URLError) as e:
            problems.append(f"tracking: {url} not reachable ({getattr(e, 'reason', e)})")
    return problems


def _probe_task(storage_uri: str | None, tracking_uri: str | None) -> list[str]:
    return probe_here(storage_uri, tracking_uri)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def probe_nodes(storage_uri: str | None, tracking_uri: str | None) -> None:
    """Run :func:`probe_here` on every alive node of the connected cluster (a zero-CPU task
    pinned to each); raises PreflightError naming each node and what it cannot reach."""
    needs_storage = storage_uri is not None and storage.is_remote(storage_uri)
    needs_tracking = tracking_uri is not None and tracking_uri.startswith(("http://", "https://"))
    if not (needs_storage or needs_tracking):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_probe_task)
    nodes = alive_nodes()
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(storage_uri, tracking_uri)
        for n in nodes
    }
    problems = []
    for node, ref in refs.items():
        try:
            found = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            found = [f"the probe task did not finish within {PROBE_TIMEOUT_S:.0f} s"]
        except ray.exceptions.RayError as e:
            found = [f"the probe task failed ({str(e).strip().splitlines()[-1]})"]
        problems.extend(f"node {node}: {p}" for p in found)
    if problems:
        raise PreflightError(
            f"preflight: {len(problems)} problem(s) on {len(nodes)} node(s): " + "; ".join(problems)
        )


def check_cluster(storage_path: str | None, tracking_uri: str | None, setting: str) -> None:
    """Both checks on the connected Ray cluster, before the run's workers start."""
    check_settings(len(alive_nodes()), storage_path, tracking_uri, setting)
    probe_nodes(storage_path, tracking_uri)


def check_local(storage_uri: str | None, tracking_uri: str | None, write: bool = True) -> None:
    """The probe in this process only (commands that run no Ray workers: evaluate)."""
    problems = probe_here(storage_uri, tracking_uri, write)
    if problems:
        raise PreflightError("preflight: " + "; ".join(problems))
