"""Training across two Ray nodes on this machine: the session's head plus a second raylet
(`ray start --address`, its own temp dir and ports), one worker per node, checkpoints on a
storage path both nodes see, and the second node removed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from medgpt.config import Recipe
from medgpt.errors import ConfigError
from medgpt.launch import train
from tests.conftest import RAY_BIN, _free_port, _stop_test_clusters, tiny_recipe, wait_for
from tests.test_train_ray import LONG, _driver, _registered_steps

pytestmark = pytest.mark.slow


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    # Filtered on the client: with a server-side filter the State API raises when the filter
    # drops nodes ("Failed to retrieve all 2 nodes ... data truncation").
    return [n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]


@pytest.fixture
def second_node(ray_cluster):
    """A 1-CPU raylet joined to the session cluster; removed (SIGKILL) by the test or at the
    end. Its temp dir marks its processes, so removing it touches nothing else."""
    before = len(_alive_nodes(ray_cluster["dashboard"]))
    temp = tempfile.mkdtemp(prefix="rmt-node2-", dir="/tmp")
    cmd = [
        str(RAY_BIN), "start", f"--address={ray_cluster['address']}", "--num-cpus=1",
        f"--temp-dir={temp}", f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(
        lambda: len(_alive_nodes(ray_cluster["dashboard"])) == before + 1, 60, "the second node"
    )

    def remove() -> None:
        _stop_test_clusters(grace_s=0.0, marker=temp.encode())

    yield remove
    remove()
    shutil.rmtree(temp, ignore_errors=True)
    wait_for(lambda: len(_alive_nodes(ray_cluster["dashboard"])) == before, 90, "node 2 gone")


def _worker_nodes(dashboard: str) -> set[str]:
    from ray.util.state import list_actors

    workers = list_actors(
        address=dashboard,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )
    return {w.node_id for w in workers}


def _run_until_node_removed(recipe, tmp_path, name, ray_cluster, remove) -> subprocess.Popen:
    run_dir = Path(recipe["job"]["storage_path"]) / recipe["job"]["name"]
    proc = _driver(recipe, tmp_path, name)
    try:
        wait_for(lambda: _registered_steps(run_dir), 240, "the first registered checkpoint")
        nodes = wait_for(
            lambda: (n := _worker_nodes(ray_cluster["dashboard"])) and len(n) == 2 and n,
            60,
            "one live worker on each node",
        )
        assert len(nodes) == 2
        remove()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> int:
    """The driver's exit status; killed (with its group) if it outlives the timeout."""
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_strict_spread_needs_as_many_nodes_as_workers(ray_cluster, icd_data, tmp_path) -> None:
    """Refused up front on the one-node cluster, instead of waiting for a node that is not
    there."""
    recipe = tiny_recipe(
        icd_data, tmp_path, "strict", **{"job.placement_strategy": "STRICT_SPREAD"}
    )
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of the 2 workers on its own"):
        train(Recipe.from_dict(recipe))


def test_run_survives_losing_a_node_when_it_can_regroup(
    ray_cluster, icd_data, tmp_path, second_node
) -> None:
    """SPREAD: one worker per node while both are there; when node 2 dies, the group restarts
    from the last checkpoint with both workers on the head, and the run finishes."""
    storage = tmp_path / "shared"
    recipe = tiny_recipe(
        icd_data, storage, "spread", **LONG,
        **{"job.placement_strategy": "SPREAD", "job.max_failures": 1},
    )  # fmt: skip
    rc = _finish(_run_until_node_removed(recipe, tmp_path, "spread", ray_cluster, second_node))
    log = (tmp_path / "spread.log").read_text()
    assert rc == 0, log[-3000:]
    assert log.count("Started training worker group") >= 2, log[-3000:]
    summary = json.loads((storage / "spread" / "medgpt-result.json").read_text())
    assert summary["final_step"] == 24
    assert Path(summary["best_checkpoint"]).parent == storage / "spread"


def test_run_fails_clearly_when_it_cannot_place_its_workers(
    ray_cluster, icd_data, tmp_path, second_node
) -> None:
    """STRICT_SPREAD: after node 2 dies, two workers cannot be placed one per node; the run
    stops with an error naming the placement (not a hang), and its checkpoints stay."""
    storage = tmp_path / "shared"
    recipe = tiny_recipe(
        icd_data, storage, "strict-lost", **LONG,
        **{"job.placement_strategy": "STRICT_SPREAD", "job.max_failures": 1},
    )  # fmt: skip
    rc = _finish(_run_until_node_removed(recipe, tmp_path, "strict", ray_cluster, second_node))
    log = (tmp_path / "strict.log").read_text()
    assert rc == 2, log[-3000:]
    assert "medgpt train: error: training run 'strict-lost' failed" in log, log[-3000:]
    assert "waiting for 2 workers" in log, log[-3000:]
    assert _registered_steps(storage / "strict-lost")
