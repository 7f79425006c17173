"""Training on a real local Ray cluster (started once per session with `ray start --head`),
tracked in a real MLflow sqlite store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medgpt.config import Recipe
from medgpt.errors import ConfigError
from medgpt.launch import TrainingError, TrainResult, train
from medgpt.testing import REPO, free_port, wait_for
from medgpt.testing.training import LONG, registered_steps, start_driver, tiny_recipe

pytestmark = pytest.mark.slow

CHECKPOINT_FILES = {"model.safetensors", "config.json", "meta.json", "train_state.pt"}


def _mlflow(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(result: TrainResult, key: str) -> dict[int, float]:
    client = _mlflow(result.mlflow_tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(ray_cluster, icd_data, storage) -> TrainResult:
    """An uninterrupted 2-worker run that other tests compare against."""
    return train(Recipe.from_dict(tiny_recipe(icd_data, storage, "reference")))


def test_run_writes_checkpoints_result_and_mlflow_record(reference, storage) -> None:
    s = reference
    assert s.final_step == 6
    run_dir = storage / "reference"
    ckpts = sorted(p.name for p in run_dir.glob("step-*"))
    assert ckpts == ["step-000003", "step-000006"]
    for c in ckpts:
        assert {p.name for p in (run_dir / c).iterdir()} == CHECKPOINT_FILES
    assert s.best_checkpoint in {str(run_dir / c) for c in ckpts}
    meta = json.loads((Path(s.best_checkpoint) / "meta.json").read_text())
    assert meta["mlflow_run_id"] == s.mlflow_run_id
    assert meta["val_loss"] == pytest.approx(s.best_val_loss)
    assert len(meta["data_manifest_hash"]) == 64
    on_disk = json.loads((run_dir / "medgpt-result.json").read_text())
    assert on_disk["best_checkpoint"] == s.best_checkpoint
    assert on_disk == s.to_dict() and s.result_file == str(run_dir / "medgpt-result.json")

    client = _mlflow(s.mlflow_tracking_uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6"
    assert run.data.params["model.n_embd"] == "32"
    assert run.data.params["job.num_workers"] == "2"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_ms", "val_loss"):
        assert key in run.data.metrics, key
    assert sorted(_history(s, "loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(_history(s, "val_loss")) == [3, 6]
    top = {a.path for a in client.list_artifacts(s.mlflow_run_id)}
    assert {"loss_curve.png", "result.json", "data", "config", "model", "samples"} <= top
    model_files = {
        a.path.rsplit("/", 1)[-1]
        for a in client.list_artifacts(s.mlflow_run_id, "model/checkpoint")
    }
    assert {"model.safetensors", "config.json", "meta.json"} <= model_files
    samples = client.list_artifacts(s.mlflow_run_id, "samples")
    assert [a.path for a in samples] == ["samples/step-000003.txt", "samples/step-000006.txt"]


def test_two_workers_equal_one_worker_with_accumulation(reference, icd_data, storage) -> None:
    # 1 worker x 2 micro-batches of 4 sees the same 8 windows per step as 2 workers x 4
    # (the loader deals window i of the epoch to rank i % W), so the loss trajectories
    # agree up to float reassociation in the gradient all-reduce.
    single = train(
        Recipe.from_dict(tiny_recipe(icd_data, storage, "single", **{"job.num_workers": 1}))
    )
    a, b = _history(reference, "loss"), _history(single, "loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), step
    assert _history(reference, "val_loss")[6] == pytest.approx(
        _history(single, "val_loss")[6], rel=1e-4
    )


def test_fsdp_run_trains_as_the_ddp_run_and_its_checkpoint_serves_as_any(
    reference, icd_data, storage, tmp_path
) -> None:
    """job.strategy: fsdp through Ray Train (gloo, 2 workers): the DDP run's trajectory, and
    a checkpoint that evaluates, registers and exports like the DDP one (tests/test_sharding.py
    covers its resume)."""
    from medgpt.checkpoint import load_model, serving_sha256
    from medgpt.cli import main
    from medgpt.hf import save_hf_gpt2
    from medgpt.registry import fetch_registered

    recipe = tiny_recipe(icd_data, storage, "fsdp", **{"job.strategy": "fsdp"})
    fsdp = train(Recipe.from_dict(recipe))
    assert fsdp.final_step == 6 and fsdp.best_checkpoint.endswith("step-000006")
    for key in ("loss", "val_loss"):
        a, b = _history(fsdp, key), _history(reference, key)
        assert sorted(a) == sorted(b)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-5), (key, step)
    a, b = _weights(fsdp.best_checkpoint), _weights(reference.best_checkpoint)
    assert sorted(a) == sorted(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    registry = tmp_path / "registry"
    rc = main(
        ["evaluate", "--quiet", "--checkpoint", fsdp.best_checkpoint, "--data", str(icd_data),
         "--storage", str(registry), "--max-loss", "20", "--register", "--out",
         str(tmp_path / "report")]
    )  # fmt: skip
    assert rc == 0
    folder, _ = fetch_registered(
        f"sqlite:///{registry / 'mlflow.db'}", "models:/medgpt@champion", tmp_path / "cache"
    )
    assert serving_sha256(folder) == serving_sha256(fsdp.best_checkpoint)
    save_hf_gpt2(load_model(folder), tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_more_workers_than_the_cluster_has_is_refused(ray_cluster, icd_data, storage) -> None:
    recipe = Recipe.from_dict(
        tiny_recipe(
            icd_data, storage, "too-big", **{"job.num_workers": 4, "train.batch_tokens": 512}
        )
    )
    with pytest.raises(ConfigError, match=r"4 workers need 4 CPU but the cluster has 2"):
        train(recipe)


@pytest.fixture(scope="module")
def long_reference(ray_cluster, icd_data, storage) -> TrainResult:
    return train(Recipe.from_dict(tiny_recipe(icd_data, storage, "long-reference", **LONG)))


def test_resume_after_the_driver_is_stopped(long_reference, icd_data, storage, tmp_path) -> None:
    recipe = tiny_recipe(icd_data, storage, "driver-restart", **LONG)
    run_dir = storage / "driver-restart"
    proc = start_driver(recipe, tmp_path, "first")
    try:
        wait_for(lambda: registered_steps(run_dir), 180, "the first registered checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its job's actors go with it
        proc.wait(30)
    done_before = registered_steps(run_dir)
    assert done_before and "step-000024" not in done_before, done_before
    resumed = train(Recipe.from_dict(recipe))
    assert resumed.final_step == 24
    # One MLflow run for the whole run name, reused on resume.
    client = _mlflow(resumed.mlflow_tracking_uri)
    runs = client.search_runs(
        [client.get_run(resumed.mlflow_run_id).info.experiment_id],
        filter_string="tags.`medgpt.run_name` = 'driver-restart'",
    )
    assert len(runs) == 1
    # The resumed run continued at the checkpoint's step with the same data and state: its
    # final weights equal those of an uninterrupted run with the same seed. (Everything is
    # deterministic on CPU: fixed data order, no dropout, a 2-rank gloo all-reduce.)
    a, b = _weights(resumed.best_checkpoint), _weights(long_reference.best_checkpoint)
    assert resumed.best_checkpoint.endswith("step-000024")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_killed_worker_restarts_from_checkpoint(
    long_reference, ray_cluster, icd_data, storage, tmp_path
) -> None:
    from ray.util.state import list_actors

    recipe = tiny_recipe(icd_data, storage, "worker-kill", **LONG, **{"job.max_failures": 1})
    run_dir = storage / "worker-kill"
    proc = start_driver(recipe, tmp_path, "kill")
    try:
        wait_for(lambda: registered_steps(run_dir), 180, "the first registered checkpoint")
        workers = wait_for(
            lambda: list_actors(
                address=ray_cluster["dashboard"],
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                detail=True,
            ),
            60,
            "live training workers",
        )
        killed_at = registered_steps(run_dir)
        os.kill(workers[-1].pid, signal.SIGKILL)
        assert proc.wait(300) == 0, (tmp_path / "kill.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "step-000024" not in killed_at
    summary = json.loads((run_dir / "medgpt-result.json").read_text())
    assert summary["final_step"] == 24
    log = (tmp_path / "kill.log").read_text()
    # The worker group really was restarted (not finished before the kill landed).
    assert log.count("Started training worker group") >= 2, log[-3000:]
    a, b = _weights(summary["best_checkpoint"]), _weights(long_reference.best_checkpoint)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_ray_job_submit_runs_train_job(ray_cluster, icd_data, tmp_path) -> None:
    import yaml

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(tiny_recipe(icd_data, tmp_path / "runs", "submitted")))
    env = dict(os.environ)  # the job's driver imports medgpt from the install, like any job
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", ray_cluster["dashboard"], "--",
        sys.executable, str(REPO / "jobs/train.py"), "--config", str(cfg),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert "best checkpoint:" in out
    summary = json.loads((tmp_path / "runs/submitted/medgpt-result.json").read_text())
    assert summary["final_step"] == 6

    # The gate as a job: a FAIL fails the job (exit 1), a PASS registers the run's best model.
    evaluate = [
        *cmd[: cmd.index("--") + 1], sys.executable, str(REPO / "jobs/evaluate.py"),
        "--checkpoint", str(tmp_path / "runs/submitted"), "--data", str(icd_data),
        "--storage", str(tmp_path / "runs"), "--register", "--no-samples",
    ]  # fmt: skip
    failed = subprocess.run(
        [*evaluate, "--max-loss", "0.01"], capture_output=True, text=True, env=env, timeout=600
    )
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "FAIL: loss" in out, out[-4000:]
    passed = subprocess.run(
        [*evaluate, "--max-loss", "20"], capture_output=True, text=True, env=env, timeout=600
    )
    out = passed.stdout + passed.stderr
    assert passed.returncode == 0 and "PASS: loss" in out, out[-4000:]
    assert "registered models:/medgpt/1; alias 'champion' -> version 1" in out


def test_gate_on_a_trained_run_records_into_its_store(reference, icd_data, storage, tmp_path):
    from medgpt.checkpoint import read_meta, serving_sha256
    from medgpt.cli import main
    from medgpt.registry import fetch_registered

    out = tmp_path / "report"
    rc = main(
        ["evaluate", "--quiet", "--checkpoint", str(storage / "reference"), "--data",
         str(icd_data), "--storage", str(storage), "--max-loss", "20", "--register",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["path"] == reference.best_checkpoint
    assert report["mlflow"]["run_id"] == reference.mlflow_run_id
    assert report["mlflow"]["training_run"] is True
    uri = reference.mlflow_tracking_uri
    assert report["mlflow"]["tracking_uri"] == uri
    history = _mlflow(uri).get_metric_history(reference.mlflow_run_id, "eval_loss")
    assert [m.value for m in history] == [report["model"]["loss"]]

    folder, info = fetch_registered(uri, "models:/medgpt@champion", tmp_path / "cache")
    assert serving_sha256(folder) == serving_sha256(reference.best_checkpoint)
    meta = read_meta(reference.best_checkpoint)
    assert info["tags"]["training_run_id"] == reference.mlflow_run_id
    assert info["tags"]["data_manifest_hash"] == meta["data_manifest_hash"]
    assert info["run_id"] == reference.mlflow_run_id


def test_corrupt_checkpoint_on_resume_names_the_file(ray_cluster, icd_data, storage) -> None:
    recipe = tiny_recipe(icd_data, storage, "corrupt", **{"train.max_steps": 3})
    first = train(Recipe.from_dict(recipe))
    weights = Path(first.best_checkpoint) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    recipe["train"]["max_steps"] = 6
    with pytest.raises(TrainingError, match=r"model\.safetensors"):
        train(Recipe.from_dict(recipe))


@pytest.mark.slow
def test_quickstart_prepares_trains_gates_and_serves(ray_cluster, tmp_path, capsys) -> None:
    """The README's main job, shortened: prepare, train on Ray, gate, register the champion;
    a rerun reuses all of it; then the whole command with serving, stopped by Ctrl-C."""
    from medgpt.cli import main
    from medgpt.registry import model_version

    storage, data = tmp_path / "runs", tmp_path / "icd10cm"
    argv = ["quickstart", "--data", str(data), "--max-loss", "20",
            "--set", f"job.storage_path={storage}", "--set", "train.max_steps=4"]  # fmt: skip
    rc = main([*argv, "--no-serve"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    for line in ("[1/3] preparing", "[2/3] training", "[3/3] readiness gate", "PASS: loss"):
        assert line in out
    assert "registered models:/medgpt/1; alias 'champion' -> version 1" in out
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    v = model_version(uri, "models:/medgpt@champion")
    assert str(v.version) == "1" and v.tags["step"] == "4"

    # Idempotent: the same data, the finished run and its registered version are reused.
    rc = main([*argv, "--no-serve"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "already registered as models:/medgpt/1" in out
    assert str(model_version(uri, "models:/medgpt@champion").version) == "1"

    # The whole main job: it ends serving the champion behind the page; Ctrl-C stops it all.
    serve_port, web_port = free_port(), free_port()
    log = tmp_path / "quickstart.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "medgpt"), *argv, "--serve-port", str(serve_port),
             "--web-port", str(web_port), "--serve-cpus", "0.5"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
        )  # fmt: skip
    page = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: f"open {page}" in log.read_text(), 400, "the quickstart's page")
        import requests

        assert "medgpt" in requests.get(page, timeout=10).text
        r = requests.post(
            f"{page}/api/generate", json={"prompt": "Asthma is", "max_new_tokens": 4, "seed": 1},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["completion_tokens"] >= 1
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "[4/4] serving the champion" in text and "stopped" in text
    for port in (serve_port, web_port):
        with socket.socket() as s, contextlib.suppress(OSError):
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    # Nothing the command started outlives it: its process group is empty.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 0)
        raise AssertionError("processes of the quickstart's group are still running")
