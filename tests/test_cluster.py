"""Like a real cluster: two Ray nodes that share no disk, checkpoints in the object store, MLflow
on the PostgreSQL-backed server (the session's medgpt.stack), and the faults such a cluster has:
a node lost mid-run, the tracking server gone, the object store gone at checkpoint time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch

from medgpt import storage
from medgpt.checkpoint import WEIGHTS
from medgpt.testing import REPO, free_port, wait_for
from medgpt.testing.training import LONG, start_driver, tiny_recipe

pytestmark = pytest.mark.slow


def _bucket() -> str:
    return f"s3://medgpt/e2e-{uuid.uuid4().hex[:8]}"


def _remote_steps(run_uri: str) -> list[str]:
    """The checkpoints Ray Train has registered for a run in object storage."""
    import re

    try:
        text = storage.read_bytes(storage.join(run_uri, "checkpoint_manager_snapshot.json"))
    except (FileNotFoundError, storage.StorageError):
        return []
    return sorted(set(re.findall(r"step-\d{6}", text.decode())))


def _weights(ckpt_uri: str, tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    local = storage.download_dir(ckpt_uri, tmp / uuid.uuid4().hex, only=[WEIGHTS])
    return load_file(str(local / WEIGHTS))


def _run(recipe: dict, folder: Path, name: str, timeout: float = 600) -> tuple[int, str]:
    proc = start_driver(recipe, folder, name)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, (folder / f"{name}.log").read_text()


def _medgpt(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgpt.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ), timeout=timeout)  # fmt: skip


def _node_views(node_ids: list[str]) -> list[dict]:
    """On each node: its working directory and TMPDIR, after writing a file by a relative path;
    then whether each node sees the files the others wrote by the same relative paths."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def write(tag: str) -> dict:
        import tempfile

        Path(f"medgpt-node-{tag}").write_text(tag)
        return {"cwd": os.getcwd(), "tmp": tempfile.gettempdir()}

    @ray.remote(num_cpus=0)
    def sees(tags: list[str]) -> list[str]:
        return [t for t in tags if Path(f"medgpt-node-{t}").exists()]

    def on(node: str):
        return NodeAffinitySchedulingStrategy(node, soft=False)

    tags = [uuid.uuid4().hex[:8] for _ in node_ids]
    views = ray.get([write.options(scheduling_strategy=on(n)).remote(t)
                     for n, t in zip(node_ids, tags, strict=True)])  # fmt: skip
    @ray.remote(num_cpus=0)
    def remove(tag: str) -> None:
        Path(f"medgpt-node-{tag}").unlink(missing_ok=True)

    try:
        for view, node, tag in zip(views, node_ids, tags, strict=True):
            others = [t for t in tags if t != tag]
            view["sees_others"] = ray.get(sees.options(scheduling_strategy=on(node)).remote(others))
    finally:
        ray.get([remove.options(scheduling_strategy=on(n)).remote(t)
                 for n, t in zip(node_ids, tags, strict=True)])  # fmt: skip
    return views


def test_no_shared_disk_end_to_end(
    ray_cluster, icd_data, tmp_path, second_node, stack_env, cluster_stack
) -> None:
    import ray

    ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    views = _node_views(nodes)
    assert views[0]["cwd"] != views[1]["cwd"] and views[0]["tmp"] != views[1]["tmp"], views
    assert all(v["sees_others"] == [] for v in views), f"a node sees another's files: {views}"

    base = _bucket()
    common = {**LONG, "job.placement_strategy": "SPREAD", "job.max_failures": 1}
    # The uninterrupted run, then the same run losing node 2 after its first checkpoint.
    ref = tiny_recipe(icd_data, base, "ref", **common)  # type: ignore[arg-type]
    rc, log = _run(ref, tmp_path, "ref")
    assert rc == 0, log[-3000:]
    cut = tiny_recipe(icd_data, base, "cut", **common)  # type: ignore[arg-type]
    proc = start_driver(cut, tmp_path, "cut")
    try:
        wait_for(lambda: _remote_steps(f"{base}/cut"), 300, "the first registered checkpoint")
        second_node()
        rc = proc.wait(400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "cut.log").read_text()
    assert rc == 0, log[-3000:]
    assert log.count("Started training worker group") >= 2, log[-3000:]
    # No worker opened a database of its own (MLflow's default store is ./mlflow.db).
    assert "Creating initial MLflow database tables" not in log, log[-3000:]
    result = json.loads(storage.read_bytes(f"{base}/cut/medgpt-result.json"))
    assert result["final_step"] == 24 and result["best_checkpoint"].startswith(f"{base}/cut/")
    assert result["mlflow_tracking_uri"] == stack_env["MLFLOW_TRACKING_URI"]
    a = _weights(f"{base}/ref/step-000024", tmp_path)
    b = _weights(f"{base}/cut/step-000024", tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from the object store"

    # Gate and register from the object store; the registry lives in PostgreSQL.
    work = tmp_path / "work"
    work.mkdir()
    gate = _medgpt("evaluate", "--quiet", "--no-samples", "--checkpoint", f"{base}/cut",
                   "--data", str(icd_data), "--max-loss", "20", "--register",
                   "--storage", str(tmp_path / "cache"), "--out", str(tmp_path / "report"),
                   cwd=work)  # fmt: skip
    assert gate.returncode == 0, (gate.stdout + gate.stderr)[-3000:]
    import psycopg

    c = cluster_stack.config
    with psycopg.connect(host=c.host, port=c.postgres_port, user="medgpt", dbname="mlflow",
                         password=cluster_stack.state["secrets"]["postgres_password"]) as db:  # fmt: skip
        versions = db.execute("SELECT name, version FROM model_versions").fetchall()
        alias = db.execute(
            "SELECT version FROM registered_model_aliases WHERE alias = 'champion'"
        ).fetchall()
    assert any(n == "medgpt" for n, _ in versions) and alias, (versions, alias)
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="medgpt", Prefix="mlflow-artifacts/")
            .get("Contents", [])]  # fmt: skip
    assert any(k.endswith(f"checkpoint/{WEIGHTS}") for k in keys), keys[:20]

    # Serve the champion through the tracking server (once the cluster knows node 2 is gone:
    # the preflight probes every node it lists).
    from ray import serve

    wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 1, 120, "node 2 marked dead")

    from medgpt.serving import DEFAULT_CONFIG, deploy

    serve.shutdown()
    port = free_port()
    try:
        url = deploy(DEFAULT_CONFIG, {"checkpoint": "models:/medgpt@champion",
                                      "storage_path": str(tmp_path / "serve-cache"),
                                      "num_cpus": 0.5}, "127.0.0.1", port)  # fmt: skip
        served = requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        assert served.startswith("medgpt"), served  # the registered model, by its version
        out = requests.post(f"{url}/v1/completions", json={"model": served, "prompt": "Asthma",
                                                           "max_tokens": 4}, timeout=120)  # fmt: skip
        assert out.status_code == 200, out.text
        assert out.json()["choices"][0]["text"] is not None
    finally:
        serve.shutdown()
    # No file of the run on local disk: checkpoints and records are in the store and database.
    local = [p for p in [*tmp_path.rglob("*"), *work.rglob("*")]
             if p.name in ("mlflow.db", "checkpoint_manager_snapshot.json")
             or p.name.startswith("step-")]  # fmt: skip
    assert local == []
    assert not any((REPO / "runs" / n).exists() for n in ("ref", "cut"))


def test_object_store_then_tracking_server_down(
    ray_cluster, icd_data, tmp_path, stack_env, cluster_stack
) -> None:
    """Two faults in one run's life (one run: each Ray Train start costs ~30 s here).

    1. The object store stops after the first checkpoint: the next upload is retried with
       backoff, then the run fails naming the store; the first checkpoint is intact.
    2. Rerun once the store is back: it resumes from that checkpoint. The MLflow server stops
       after the rerun's first checkpoint and comes back after another: training goes on, and
       every step's metrics reach the run once the server is back."""
    base = _bucket()
    name = "faults"
    run = f"{base}/{name}"
    recipe = tiny_recipe(icd_data, base, name, **LONG)  # type: ignore[arg-type]
    os.environ["MEDGPT_STORAGE_ATTEMPTS"] = "3"
    os.environ["MEDGPT_STORAGE_RETRY_S"] = "1"
    proc = start_driver(recipe, tmp_path, "store-down")
    try:
        first = wait_for(lambda: _remote_steps(run), 300, "the first checkpoint")
        cluster_stack.stop("objectstore")
        rc = proc.wait(400)
    finally:
        os.environ.pop("MEDGPT_STORAGE_ATTEMPTS")
        os.environ.pop("MEDGPT_STORAGE_RETRY_S")
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster_stack.start("objectstore")
    log = (tmp_path / "store-down.log").read_text()
    assert rc != 0, log[-3000:]
    assert "checkpoint upload 1 failed, retrying in 1 s" in log, log[-3000:]
    assert "medgpt train: error:" in log, log[-3000:]
    # The store answers again a few seconds after its restart (volumes re-register).
    kept = wait_for(lambda: _remote_steps(run), 90, "the store to serve reads")
    assert kept == first, (kept, first)
    _weights(f"{run}/{first[0]}", tmp_path)  # readable and whole

    proc = start_driver(recipe, tmp_path, "mlflow-down")
    try:
        # Ray Train keeps the latest checkpoints only: look for new names, not more of them.
        wait_for(lambda: set(_remote_steps(run)) - set(first), 300, "the rerun's first checkpoint")
        cluster_stack.stop("mlflow")
        down_at = set(_remote_steps(run))
        wait_for(lambda: set(_remote_steps(run)) - down_at, 120,
                 "a checkpoint while the server is down")  # fmt: skip
        time.sleep(5)
        cluster_stack.start("mlflow")
        rc = proc.wait(400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster_stack.start("mlflow")
    log = (tmp_path / "mlflow-down.log").read_text()
    assert rc == 0, log[-3000:]
    assert "resuming" in log, log[-3000:]
    assert "is not answering" in log and "training goes on" in log, log[-3000:]
    assert "Traceback" not in log.split("is not answering", 1)[1], log[-3000:]
    from mlflow.tracking import MlflowClient

    result = json.loads(storage.read_bytes(f"{run}/medgpt-result.json"))
    assert result["final_step"] == 24
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    record = client.get_run(result["mlflow_run_id"])
    assert record.info.status == "FINISHED"
    # One MLflow run over both attempts: the failed one logged up to its failed checkpoint,
    # the resumed one from the checkpoint on (some steps twice; none missing).
    steps = [m.step for m in client.get_metric_history(record.info.run_id, "loss")]
    assert set(steps) == set(range(1, 25)), sorted(steps)
    # Steps up to the kept checkpoint once: the rerun resumed there, not from scratch.
    assert all(steps.count(k) == 1 for k in range(1, int(first[0][-6:]) + 1)), sorted(steps)


def test_preflight_refusals_on_two_nodes(ray_cluster, icd_data, tmp_path, second_node, stack_env,
                                         monkeypatch) -> None:  # fmt: skip
    """Each refusal on a two-node cluster, before any worker starts: one line, exit 2."""
    cases = []
    local = tiny_recipe(icd_data, tmp_path / "runs", "local-storage")
    cases.append((local, {}, "job.storage_path: '" + str(tmp_path / "runs") + "' is a local "
                  "folder, but this Ray cluster has 2 nodes and they share no disk"))  # fmt: skip
    sqlite = tiny_recipe(icd_data, _bucket(), "sqlite-tracking")  # type: ignore[arg-type]
    cases.append((sqlite, {"MLFLOW_TRACKING_URI": ""}, "a local store, but this Ray cluster has 2"))
    dead = f"http://127.0.0.1:{free_port()}"
    cases.append((sqlite, {"MLFLOW_TRACKING_URI": dead}, "preflight: 2 problem(s) on 2 node(s)"))
    for i, (recipe, env, message) in enumerate(cases):
        for k, v in env.items():
            if v:
                monkeypatch.setenv(k, v)
            else:
                monkeypatch.delenv(k, raising=False)
        started = time.monotonic()
        rc, log = _run(recipe, tmp_path, f"case{i}", timeout=180)
        lines = [line for line in log.splitlines() if "medgpt train: error:" in line]
        assert rc == 2 and len(lines) == 1 and message in lines[0], log[-3000:]
        assert "Started training worker group" not in log
        assert time.monotonic() - started < 120
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stack_env["MLFLOW_TRACKING_URI"])
    assert f"tracking: {dead}/health not reachable" in lines[0]
    from medgpt.checkpoint import save_checkpoint
    from medgpt.config import ModelConfig
    from medgpt.model import GPT

    ckpt = save_checkpoint(tmp_path / "ck", GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32)), {})
    serve = _medgpt("serve", "--checkpoint", str(ckpt), "--storage-path", str(tmp_path),
                    cwd=tmp_path, timeout=180)  # fmt: skip
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert f"medgpt serve: error: checkpoint: '{ckpt}' is a local folder, but this Ray cluster "
    "has 2 nodes" in serve.stderr, serve.stderr[-2000:]
