"""The cluster stack (medgpt.stack) for tests and benchmarks: free ports for every component,
a folder the `postgres` user can reach, and a client environment with nothing of the caller's
own Ray, MLflow or AWS settings."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from medgpt.stack import WEED_GRPC_OFFSET, StackConfig, port_free

__all__ = ["client_env", "stack_config", "stack_dir", "stop_orphaned_stacks"]

_CLIENT_PREFIXES = ("RAY_", "MLFLOW_", "AWS_", "MEDGPT_STORAGE")


def _free_pair(taken: set[int]) -> int:
    """A free port p below 55535 whose p + WEED_GRPC_OFFSET is free too (SeaweedFS binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        grpc = p + WEED_GRPC_OFFSET
        if p <= 55535 and not {p, grpc} & taken and port_free("127.0.0.1", grpc):
            taken.update({p, grpc})
            return p


_OWNER_FILE = "medgpt-owner.pid"


def stack_dir(label: str = "stack") -> Path:
    """A new folder under /tmp (pytest's own tmp folders are closed to other users, and
    PostgreSQL runs as `postgres` when the tests run as root), holding this process's pid so
    that :func:`stop_orphaned_stacks` can tell a live session's stack from a killed one's."""
    root = Path(tempfile.mkdtemp(prefix=f"medgpt-{label}-", dir="/tmp"))
    (root / _OWNER_FILE).write_text(str(os.getpid()))
    return root


def stop_orphaned_stacks() -> None:
    """Stop the stacks of test sessions that were killed before their teardown, and remove
    their folders; stacks of sessions still running are left alone."""
    from medgpt.procs import alive
    from medgpt.stack import Stack, StackError

    for root in Path("/tmp").glob("medgpt-*-*"):
        try:
            owner = int((root / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not alive(owner):
            with contextlib.suppress(StackError):
                Stack.open({"dir": str(root)}).down()
            shutil.rmtree(root, ignore_errors=True)


def stack_config(root: Path, ray: bool = False, **changes: Any) -> StackConfig:
    """A StackConfig in ``root`` with every port free right now."""
    taken: set[int] = set()
    ports = {
        k: _free_pair(taken)
        for k in ("s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port")
    }
    for k in ("postgres_port", "mlflow_port", "ray_port", "ray_dashboard_port", "ray_client_port"):
        ports[k] = _free_pair(taken)
    return StackConfig(dir=str(root), ray=ray, **{**ports, **changes})


def client_env(env: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) without its Ray, MLflow and AWS settings, plus ``env``."""
    base = dict(os.environ if base is None else base)
    out = {k: v for k, v in base.items() if not k.startswith(_CLIENT_PREFIXES)}
    return {**out, **env}
