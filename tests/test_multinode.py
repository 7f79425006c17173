"""Training across two Ray nodes on this machine: the session's head plus a second raylet
(`ray start --address`, its own temp dir, ports, working directory and TMPDIR), one worker per
node, checkpoints on a folder both nodes see (declared a shared mount, MEDGPT_SHARED_STORAGE=1),
tracking on the MLflow server, and the second node removed mid-run under STRICT_SPREAD.
tests/test_cluster.py has the SPREAD run that survives losing the node (regrouping on the head
and resuming to the uninterrupted run's weights), with no shared folder at all."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from medgpt.config import Recipe
from medgpt.errors import ConfigError
from medgpt.launch import train
from medgpt.testing import wait_for
from medgpt.testing.training import LONG, registered_steps, start_driver, tiny_recipe

pytestmark = pytest.mark.slow


def _worker_nodes(dashboard: str) -> set[str]:
    from ray.util.state import list_actors

    workers = list_actors(
        address=dashboard,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )
    return {w.node_id for w in workers}


@pytest.fixture
def shared_folder(stack_env, monkeypatch) -> None:
    """tmp_path is one folder for both nodes here, as an NFS mount would be on a cluster; the
    records go to the tracking server (a sqlite file is refused on two nodes)."""
    monkeypatch.setenv("MEDGPT_SHARED_STORAGE", "1")


def _lose_node_mid_run(
    data: Path, tmp_path: Path, name: str, strategy: str, ray_cluster, remove
) -> tuple[int, str, Path]:
    """A LONG 2-worker run under ``strategy`` (one retry allowed) in a driver process: once it
    has registered a checkpoint with one worker on each node, node 2 is removed. Returns the
    driver's exit status, its log and the run's folder."""
    storage = tmp_path / "shared"
    recipe = tiny_recipe(
        data, storage, name, **LONG,
        **{"job.placement_strategy": strategy, "job.max_failures": 1},
    )  # fmt: skip
    run_dir = storage / name
    proc = start_driver(recipe, tmp_path, name)
    try:
        wait_for(lambda: registered_steps(run_dir), 240, "the first registered checkpoint")
        nodes = wait_for(
            lambda: (n := _worker_nodes(ray_cluster["dashboard"])) and len(n) == 2 and n,
            60,
            "one live worker on each node",
        )
        assert len(nodes) == 2
        remove()
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, (tmp_path / f"{name}.log").read_text(), run_dir


def test_strict_spread_needs_as_many_nodes_as_workers(ray_cluster, icd_data, tmp_path) -> None:
    """Refused up front on the one-node cluster, instead of waiting for a node that is not
    there."""
    recipe = tiny_recipe(
        icd_data, tmp_path, "strict", **{"job.placement_strategy": "STRICT_SPREAD"}
    )
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of the 2 workers on its own"):
        train(Recipe.from_dict(recipe))


def test_run_fails_clearly_when_it_cannot_place_its_workers(
    ray_cluster, icd_data, tmp_path, second_node, shared_folder
) -> None:
    """STRICT_SPREAD: after node 2 dies, two workers cannot be placed one per node; the run
    stops with an error naming the placement (not a hang), and its checkpoints stay."""
    rc, log, run_dir = _lose_node_mid_run(
        icd_data, tmp_path, "strict-lost", "STRICT_SPREAD", ray_cluster, second_node
    )
    assert rc == 2, log[-3000:]
    assert "medgpt train: error: training run 'strict-lost' failed" in log, log[-3000:]
    assert "waiting for 2 workers" in log, log[-3000:]
    assert registered_steps(run_dir)
