"""Shared fixtures: one real Ray cluster per test session and a small prepared dataset. Plain
helpers live in medgpt.testing, which test modules import (never this file or each other)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from medgpt.testing.ray_cluster import (
    export_auth_env,
    make_temp_dir,
    start_head,
    stop_orphaned_clusters,
    stop_test_clusters,
)

# Ray caches its auth mode when it is first imported: a test module that imports ray before the
# cluster fixture runs would fix it at "disabled" for the whole session, and every later
# connection would fail. So the token settings are exported as soon as pytest loads this file,
# before it imports any test module.
_AUTH_ENV = export_auth_env()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A head node started with `ray start --head` (token auth on, as Ray 2.60 defaults to),
    shared by every Ray test; RAY_ADDRESS and the token are exported so in-process drivers,
    subprocess drivers and `ray job submit` all reach it."""
    env = _AUTH_ENV
    os.environ.update(env)
    # A private temp dir marks this cluster's processes, so teardown stops them and nothing
    # else: `ray stop --force` would also kill a developer's (or a benchmark's) own Ray, or
    # another test session's cluster.
    stop_orphaned_clusters()  # leftovers of an earlier test session that was killed
    temp_dir = make_temp_dir()
    try:
        head = start_head(temp_dir, num_cpus=2)
    except RuntimeError as e:
        pytest.fail(str(e))
    address = head["address"]
    os.environ["RAY_ADDRESS"] = address
    # Placement-group cleanup after stopped trials goes through the State API (FIELD-NOTES).
    os.environ["RAY_API_SERVER_ADDRESS"] = head["dashboard"]
    yield {"address": address, "dashboard": head["dashboard"], "env": env}
    import ray

    ray.shutdown()
    stop_test_clusters(marker=str(temp_dir).encode())
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
