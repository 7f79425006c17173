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
# A shell after `eval "$(medgpt stack up)"` would send every test's runs and records to that
# stack: tests that want a stack ask for the `stack_env` fixture.
for _var in ("MEDGPT_STORAGE", "MEDGPT_SHARED_STORAGE", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)


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
    # The session is over and nothing of the cluster is kept: one of Ray's processes always
    # sits out a SIGTERM grace (10 s by default), so a short one.
    stop_test_clusters(grace_s=2.0, marker=str(temp_dir).encode())
    shutil.rmtree(temp_dir, ignore_errors=True)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *env):
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def cluster_stack() -> Any:
    """The production topology's services (medgpt.stack, without its Ray head: the tests have
    their own cluster): SeaweedFS, PostgreSQL and an MLflow server on it, on free ports, once
    per session. Yields the Stack; ``stack.env()`` is what a client needs."""
    from medgpt.stack import Stack, StackError
    from medgpt.testing.stack import stack_config, stack_dir, stop_orphaned_stacks

    stop_orphaned_stacks()  # what a killed earlier session left running
    root = stack_dir()
    stack = Stack(stack_config(root))
    try:
        stack.up()
    except StackError as e:
        stack.down()
        pytest.fail(str(e))
    yield stack
    stack.down()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack_env(cluster_stack, monkeypatch) -> dict[str, str]:
    """The stack's client environment in this process (and so in drivers it starts): the S3
    endpoint and keys, MLFLOW_TRACKING_URI and MEDGPT_STORAGE."""
    env = cluster_stack.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def second_node(ray_cluster, tmp_path_factory, monkeypatch):
    """A 1-CPU raylet joined to the session cluster, as another machine would be: its workers
    run with their own working directory and TMPDIR. The two nodes share no storage a run may
    rely on, so the fixture does not set MEDGPT_SHARED_STORAGE; a test whose storage is a local
    folder both see sets it. Removed (SIGKILL) by calling the fixture's value, or at the end."""
    from medgpt.testing import wait_for
    from medgpt.testing.ray_cluster import alive_nodes, join_node

    before = len(alive_nodes(ray_cluster["dashboard"]))
    temp = make_temp_dir("node2-")
    home = temp / "home"
    (home / "tmp").mkdir(parents=True)
    join_node(ray_cluster["address"], temp, num_cpus=1, cwd=home, env={"TMPDIR": str(home / "tmp")})
    wait_for(
        lambda: len(alive_nodes(ray_cluster["dashboard"])) == before + 1, 60, "the second node"
    )

    def remove() -> None:
        stop_test_clusters(grace_s=0.0, marker=str(temp).encode())

    remove.home = home  # type: ignore[attr-defined]
    yield remove
    remove()
    shutil.rmtree(temp, ignore_errors=True)
    wait_for(lambda: len(alive_nodes(ray_cluster["dashboard"])) == before, 90, "node 2 gone")


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
