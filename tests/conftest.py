"""Shared fixtures: one real Ray cluster per test session, a small prepared dataset, and the
tiny training recipe the Ray tests run."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"

# Faster Ray Train control loop for tests (see FIELD-NOTES): quicker polling of reports, no
# preemption watcher or metrics exporter, and a bounded wait when workers cannot be placed.
RAY_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray caches its auth mode when it is first imported: a test that imports ray before the
# cluster fixture runs would fix it at "disabled" for the whole session, and every later
# connection would fail. So the token settings are exported as soon as pytest loads this file.
# Test modules import this file both as `conftest` and as `tests.conftest`, which runs it
# twice: the token lives in the environment so that both copies export the same one.
_TOKEN = os.environ.setdefault("MEDGPT_TEST_RAY_AUTH_TOKEN", secrets.token_hex(32))
_AUTH_ENV = {**RAY_TEST_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN}
os.environ.update(_AUTH_ENV)


def _stop_test_clusters(grace_s: float = 10.0, marker: bytes = b"/tmp/rmt-") -> None:
    """SIGTERM, then SIGKILL, every process whose command line names a test cluster's temp dir
    (/tmp/rmt-*, or one node's own ``marker``); Ray's workers, raylet, GCS and dashboard all
    carry it."""
    import signal

    def ours() -> list[int]:
        marked, parent = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker in cmd:
                marked.add(int(entry.name))
        # Ray retitles its workers (the marker leaves their command line): take descendants.
        changed = True
        while changed:
            extra = {pid for pid, pp in parent.items() if pp in marked and pid not in marked}
            changed = bool(extra)
            marked |= extra
        return sorted(marked)

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = ours()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = ours()
        if not pids:
            return


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A head node started with `ray start --head` (token auth on, as Ray 2.60 defaults to),
    shared by every Ray test; RAY_ADDRESS and the token are exported so in-process drivers,
    subprocess drivers and `ray job submit` all reach it."""
    port, dash, agent = _free_port(), _free_port(), _free_port()
    env = _AUTH_ENV
    os.environ.update(env)
    # A private temp dir marks this cluster's processes, so teardown stops them and nothing
    # else: `ray stop --force` would also kill a developer's (or a benchmark's) own Ray.
    temp_dir = Path(tempfile.mkdtemp(prefix="rmt-", dir="/tmp"))  # short: socket paths
    _stop_test_clusters()  # leftovers of an earlier test session that was killed
    start = [
        str(RAY_BIN), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.run(start, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"ray start --head failed:\n{proc.stdout}\n{proc.stderr}")
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    # Placement-group cleanup after stopped trials goes through the State API (FIELD-NOTES).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    import ray

    ray.shutdown()
    _stop_test_clusters()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *env):
        os.environ.pop(key, None)


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_env_unchanged() -> Any:
    """Fail a test that leaves MLflow's URI variables changed: ``mlflow.set_tracking_uri``
    exports them, and a leak sends every later run in the session (and every subprocess, like
    `ray job submit`) to another store — CI once failed two distant tests that way."""
    before = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    yield
    after = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"the test left MLflow's environment changed: {after} != {before}"


@pytest.fixture(scope="session")
def icd_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin ICD-10-CM corpus, prepared once per session (~1.2M tokens)."""
    from medgpt.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "icd10cm"
    prepare(PrepareConfig(sources=["builtin:icd10cm"], out=str(out)), progress=False)
    return out


def tiny_recipe(data_dir: Path, storage: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A recipe whose steps take milliseconds: the Ray tests check plumbing, not learning."""
    recipe: dict[str, Any] = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64},
        "train": {
            "data_dir": str(data_dir),
            "seq_len": 32,
            "micro_batch_size": 4,
            "batch_tokens": 256,
            "max_steps": 6,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "sample_tokens": 4,
            "sample_prompts": ["Question: What is diabetes?\nAnswer:"],
        },
        "job": {"name": name, "storage_path": str(storage), "num_workers": 2},
    }
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        recipe[section][field] = value
    return recipe


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
