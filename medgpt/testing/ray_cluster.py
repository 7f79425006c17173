"""Ray clusters for tests on one machine: the settings a test session runs Ray with, a head or
an extra node started with ``ray start`` under a private temp dir, and a teardown that stops
exactly the processes of such clusters.

Ray itself is imported only inside the functions that query a running cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from medgpt.procs import MARKER_ENV, alive, stop_marked
from medgpt.testing import free_port

__all__ = [
    "RAY_BIN",
    "RAY_TEST_ENV",
    "TEMP_PREFIX",
    "alive_nodes",
    "export_auth_env",
    "join_node",
    "make_temp_dir",
    "start_head",
    "stop_orphaned_clusters",
    "stop_test_clusters",
]

RAY_BIN = Path(sys.executable).parent / "ray"
# Every test cluster's temp dir starts with this (short: Ray's socket paths live under it). The
# marker is how teardown tells the test's processes from a developer's or a benchmark's own Ray,
# which `ray stop --force` would kill too.
TEMP_PREFIX = "/tmp/rmt-"

# Faster Ray Train control loop for tests (see FIELD-NOTES): quicker polling of reports, no
# preemption watcher or metrics exporter, and a bounded wait when workers cannot be placed.
RAY_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
    "RAY_USAGE_STATS_ENABLED": "0",
}
_TOKEN_VAR = "MEDGPT_TEST_RAY_AUTH_TOKEN"


def export_auth_env() -> dict[str, str]:
    """Export (and return) RAY_TEST_ENV plus token auth with this test session's token.

    Ray caches its auth mode when it is first imported, so this must run before anything
    imports ray. The token is kept in the environment: a second call (conftest imported twice,
    a subprocess) exports the same one instead of a new one the cluster would refuse."""
    token = os.environ.setdefault(_TOKEN_VAR, secrets.token_hex(32))
    env = {**RAY_TEST_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    os.environ.update(env)
    return env


_OWNER_FILE = "medgpt-owner.pid"


def make_temp_dir(label: str = "") -> Path:
    """A new temp dir for one test cluster or node, named so that ``stop_test_clusters`` finds
    its processes, and holding this process's pid so that ``stop_orphaned_clusters`` can tell
    a live session's cluster from one a killed session left behind."""
    folder, prefix = TEMP_PREFIX.rsplit("/", 1)
    temp = Path(tempfile.mkdtemp(prefix=f"{prefix}{label}", dir=folder))
    (temp / _OWNER_FILE).write_text(str(os.getpid()))
    return temp


def stop_orphaned_clusters() -> None:
    """Stop the test clusters whose session has gone (killed before its teardown ran), and
    remove their temp dirs. Clusters of sessions still running are left alone: two test
    sessions on one machine (two engineers, CI beside a developer) each keep their own."""
    folder, prefix = TEMP_PREFIX.rsplit("/", 1)
    for temp in Path(folder).glob(f"{prefix}*"):
        try:
            owner = int((temp / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (or being created right now)
        if not alive(owner):
            stop_test_clusters(grace_s=5.0, marker=str(temp).encode())
            shutil.rmtree(temp, ignore_errors=True)


def _run_ray_start(
    args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    proc = subprocess.run([str(RAY_BIN), "start", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def start_head(temp_dir: Path | str, num_cpus: int = 2) -> dict[str, str]:
    """``ray start --head`` on free ports with the dashboard on (placement-group cleanup needs
    the State API, FIELD-NOTES); returns its ``address`` and ``dashboard`` URL."""
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    _run_ray_start([
        "--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        "--disable-usage-stats",
    ], env={MARKER_ENV: str(temp_dir)})  # fmt: skip
    return {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}


def join_node(
    address: str,
    temp_dir: Path | str,
    num_cpus: int = 1,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """A further raylet joined to ``address``; every port its own, since the head's defaults
    are taken on this host. Its processes (and workers) start in ``cwd`` with ``env`` added."""
    ports = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
             "metrics-export", "runtime-env-agent")  # fmt: skip
    _run_ray_start([
        f"--address={address}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        *(f"--{name}-port={free_port()}" for name in ports), "--disable-usage-stats",
    ], cwd=cwd, env={**(env or {}), MARKER_ENV: str(temp_dir)})  # fmt: skip


def alive_nodes(dashboard: str) -> list[Any]:
    """The cluster's ALIVE nodes, from the State API at ``dashboard``."""
    from ray.util.state import list_nodes

    # Filtered on the client: with a server-side filter the State API raises when the filter
    # drops nodes ("Failed to retrieve all 2 nodes ... data truncation").
    return [n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]


def stop_test_clusters(grace_s: float = 10.0, marker: bytes = TEMP_PREFIX.encode()) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names a test cluster's temp dir
    (``TEMP_PREFIX``*, or one node's own ``marker``); Ray's workers, raylet, GCS and dashboard
    all carry it."""
    stop_marked(marker, grace_s)
