"""Sweeps: the sweep file's checks (no Ray), and a real ASHA sweep on the session's 2-CPU
cluster with MLflow parent/child runs, the best checkpoint, the gate and a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medgpt.cli import main
from medgpt.errors import ConfigError
from medgpt.testing.training import tiny_recipe
from medgpt.tuning import count_trials, load_spec, plan_concurrency, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, body: dict[str, Any], name: str = "tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _sweep_file(tmp_path: Path, data: Path, storage: Path, **sections: Any) -> Path:
    recipe = tiny_recipe(data, storage, "unused", **{"job.num_workers": 1})
    recipe["train"].update(
        max_steps=6, eval_every=2, checkpoint_every=2, log_every=2, batch_tokens=128, min_lr=1e-7,
        sample_tokens=0,
    )  # fmt: skip
    body = {
        "recipe": recipe,
        "space": {"train.lr": {"grid": [3e-3, 2e-3, 1e-6, 2e-6]}},
        "sweep": {"name": "sweep", "num_samples": 1, "search": "random", "grace_period": 2},
    }
    for key, value in sections.items():  # None drops the section
        body[key] = value
    return _write(tmp_path, {k: v for k, v in body.items() if v is not None})


# -- the sweep file -------------------------------------------------------------------------


def test_every_shipped_sweep_file_loads() -> None:
    files = sorted((REPO / "configs").glob("tune-*.yaml"))
    assert files, "no configs/tune-*.yaml"
    for f in files:
        spec = load_spec(f)
        assert spec.space and count_trials(spec) >= 1


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"choice": [1e-3]}}, "space.train.lrr: unknown hyperparameter 'lrr'"),
        ({"optim.lr": {"choice": [1e-3]}}, "expected model.KEY or train.KEY"),
        ({"job.num_workers": {"choice": [1, 2]}}, "job settings decide where a trial runs"),
        ({"train.max_steps": {"choice": [10, 20]}}, "fixed for the whole sweep"),
        ({"train.lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"train.lr": 1e-3}, "a fixed value belongs in overrides"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "low must be > 0"),
        ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "low must be below high"),
        ({"train.warmup_steps": {"randint": [0.5, 3]}}, "expected [low, high] integers"),
        ({"train.lr": {"choice": []}}, "expected a non-empty list"),
        ({"train.lr": {"choice": ["fast"]}}, "value 'fast' makes an invalid recipe"),
        ({"model.dropout": {"uniform": [0.0, 1.5]}}, "model.dropout: must be in [0, 1)"),
        # Each value is fine alone; together they are not (36 % 8 != 0).
        (
            {"model.n_head": {"choice": [2, 8]}, "model.n_embd": {"choice": [32, 36]}},
            "the combination model.n_embd=36, model.n_head=8",
        ),
    ],
)
def test_bad_search_space_is_refused(tmp_path, space, message) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs", space=space)
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert message in str(e.value)


def test_empty_search_space_is_refused(tmp_path) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs", space={})
    with pytest.raises(ConfigError, match="empty search space"):
        load_spec(path)
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs", space=None)
    with pytest.raises(ConfigError, match="empty search space"):
        load_spec(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.search=bayes"], "sweep.search: 'bayes' (allowed: auto, random, optuna"),
        (["sweep.scheduler=hyperband"], "sweep.scheduler: 'hyperband' (allowed: asha, fifo)"),
        (["sweep.num_samples=0"], "sweep.num_samples: must be >= 1"),
        (["sweep.reduction_factor=1"], "sweep.reduction_factor: must be > 1"),
        (["sweep.name=a/b"], "sweep.name: must be a plain folder name"),
        (["sweep.samples=3"], "unknown key sweep.samples (allowed:"),
        (["gate.max_loss=-1"], "gate.max_loss: must be a positive number"),
        (["train.lr=-1"], "train.lr: must be > 0"),
        (["sweep.search=optuna"], "grid is not supported by search 'optuna'"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, message) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs")
    with pytest.raises(ConfigError) as e:
        load_spec(path, overrides)
    assert message in str(e.value)


def test_unknown_section_and_missing_recipe(tmp_path) -> None:
    path = _write(tmp_path, {"recipe": {}, "space": {"train.lr": {"choice": [1e-3]}}, "x": 1})
    with pytest.raises(ConfigError, match="unknown section 'x'"):
        load_spec(path)
    path = _write(tmp_path, {"space": {"train.lr": {"choice": [1e-3]}}})
    with pytest.raises(ConfigError, match="recipe: name the training recipe"):
        load_spec(path)
    path = _write(tmp_path, {"recipe": "nope.yaml", "space": {"train.lr": {"choice": [1e-3]}}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_spec(path)


def test_overrides_reach_each_section(tmp_path) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs")
    spec = load_spec(
        path,
        ["sweep.num_samples=3", "gate.max_loss=7.5", "train.max_steps=8",
         "space.model.dropout={choice: [0.0, 0.1]}"],
    )  # fmt: skip
    assert spec.sweep.num_samples == 3 and spec.gate.max_loss == 7.5
    assert spec.recipe["train"]["max_steps"] == 8
    assert [d.key for d in spec.space] == ["train.lr", "model.dropout"]
    assert count_trials(spec) == 3 * 4  # num_samples x the grid


def test_concurrency_follows_the_cluster(tmp_path, monkeypatch) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs")
    one = load_spec(path)
    assert plan_concurrency(one, {"CPU": 2.0}, trials=4) == 2
    assert plan_concurrency(one, {"CPU": 8.0}, trials=3) == 3
    capped = load_spec(path, ["sweep.max_concurrent_trials=1"])
    assert plan_concurrency(capped, {"CPU": 8.0}, trials=4) == 1
    two = load_spec(path, ["job.num_workers=2", "train.batch_tokens=256"])
    assert plan_concurrency(two, {"CPU": 2.0}, trials=4) == 1
    gpu = load_spec(path, ["job.use_gpu=true"])
    with pytest.raises(ConfigError, match="a trial needs 1 GPU"):
        plan_concurrency(gpu, {"CPU": 2.0}, trials=4)
    # An autoscaling cluster may have no GPU node yet: the stated limit is trusted.
    monkeypatch.setenv("MEDGPT_ALLOW_AUTOSCALE", "1")
    limited = load_spec(path, ["job.use_gpu=true", "sweep.max_concurrent_trials=3"])
    assert plan_concurrency(limited, {"CPU": 2.0}, trials=8) == 3


def test_register_without_a_gate_is_refused_before_anything_runs(tmp_path, icd_data) -> None:
    path = _sweep_file(tmp_path, icd_data, tmp_path / "runs")
    with pytest.raises(ConfigError, match="--register needs a gate"):
        run_sweep(load_spec(path), register=True)
    assert not (tmp_path / "runs" / "sweep").exists()


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs", space={})
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medgpt tune: error:") and "empty search space" in err
    assert "Traceback" not in err
    assert main(["tune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _report(gate: dict | None, registered: dict | None) -> Any:
    from medgpt.evaluation import GateReport

    model = {
        "label": "model",
        "spec": "x",
        "path": "/c",
        "kind": "medgpt-checkpoint",
        "loss": 4.5,
        "perplexity": 90.0,
        "tokens": 10,
        "documents": 2,
        "per_source": {},
    }
    data = {
        "model": model,
        "baselines": [],
        "gate": gate,
        "registered": registered,
        "mlflow": {"tracking_uri": "sqlite:///m.db", "run_id": "r", "training_run": True},
    }
    return GateReport(data, "/reports/a")  # fmt: skip


def test_sweep_result_file_keeps_its_shape(capsys) -> None:
    from medgpt.cli import print_gate
    from medgpt.tuning import BestTrial, SweepResult, TrialResult

    rows = [
        TrialResult("t1", "completed", {"train.lr": 0.001}, 6, [(2, 5.0), (6, 4.0)], 4.0,
                    "/s/t1/step-000006", "run1", None),
        TrialResult("t2", "stopped early", {"train.lr": 1e-6}, 2, [(2, 9.0)], 9.0,
                    "/s/t2/step-000002", "run2", None),
    ]  # fmt: skip
    best = BestTrial("t1", {"train.lr": 0.001}, 4.0, "/s/t1/step-000006", "run1")
    result = SweepResult("sweep", "parent", "sqlite:///m.db", rows, best, 12.5, "/s")
    keys = ["name", "mlflow_parent_run_id", "mlflow_tracking_uri", "trials", "best", "counts",
            "seconds", "sweep_dir", "gate"]  # fmt: skip
    plain = json.loads(json.dumps(result.to_dict(), default=str))
    assert list(plain) == keys  # no gate: no "registered" key, as before
    assert plain["gate"] is None
    assert plain["counts"] == {"completed": 1, "stopped early": 1, "error": 0, "no result": 0}
    assert plain["trials"][0] == {
        "trial_id": "t1", "status": "completed", "values": {"train.lr": 0.001}, "last_step": 6,
        "val_loss_curve": [[2, 5.0], [6, 4.0]], "best_val_loss": 4.0,
        "best_checkpoint": "/s/t1/step-000006", "mlflow_run_id": "run1", "error": None,
    }  # fmt: skip
    assert plain["best"] == {"trial_id": "t1", "values": {"train.lr": 0.001}, "val_loss": 4.0,
                             "checkpoint": "/s/t1/step-000006", "mlflow_run_id": "run1"}  # fmt: skip
    assert result.result_file == Path("/s/medgpt-sweep.json")

    gate = {"max_loss": 5.0, "loss": 4.5, "passed": True}
    reg = {"name": "medgpt", "version": "3", "alias": "champion", "model_uri": "models:/medgpt/3",
           "serving_sha256": "ab", "run_id": "r", "reused": True}  # fmt: skip
    result.report = _report(gate, reg)
    plain = result.to_dict()
    assert list(plain) == [*keys, "registered"]
    assert plain["gate"] == gate and plain["registered"] == reg  # report.json's own entries
    assert "report" not in plain
    assert print_gate(result.report) == 0
    out = capsys.readouterr().out
    assert "PASS: loss 4.5000 <= 5.0" in out
    assert (
        "already registered as models:/medgpt/3" in out and "report:    /reports/a/report.md" in out
    )


def test_gate_report_typed_views() -> None:
    report = _report({"max_loss": 4.0, "loss": 4.5, "passed": False}, None)
    assert report.passed is False and report.exit_status == 1
    assert report.gate is not None and report.gate.loss == 4.5 and report.gate.max_loss == 4.0
    assert report.model.loss == 4.5 and report.model.kind == "medgpt-checkpoint"
    assert report.baselines == [] and report.registered is None
    assert report.mlflow is not None and report.mlflow.training_run is True
    no_gate = _report(None, None)
    assert no_gate.passed is None and no_gate.exit_status == 0 and no_gate.gate is None


# -- on the Ray cluster ---------------------------------------------------------------------


def test_trials_bigger_than_the_cluster_fail_fast(ray_cluster, icd_data, tmp_path) -> None:
    path = _sweep_file(tmp_path, icd_data, tmp_path / "runs")
    spec = load_spec(path, ["job.num_workers=4", "train.batch_tokens=512"])
    with pytest.raises(ConfigError, match=r"a trial needs 4 CPU .* the cluster has 2"):
        run_sweep(spec)


def _mlflow(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _checkpoint_losses(run_dir: Path) -> dict[str, float]:
    from medgpt.checkpoint import is_checkpoint, read_meta

    return {
        str(p): float(read_meta(p)["val_loss"])
        for p in sorted(run_dir.iterdir())
        if p.is_dir() and is_checkpoint(p)
    }


@pytest.mark.slow
def test_asha_sweep_records_gates_and_resumes(ray_cluster, icd_data, tmp_path, capsys) -> None:
    """4 one-worker trials, 2 at a time on 2 CPUs: the two good learning rates run first, so
    ASHA stops at least one of the two hopeless ones at its first rung."""
    from medgpt.registry import model_version

    storage = tmp_path / "runs"
    path = _sweep_file(tmp_path, icd_data, storage)
    rc = main(["tune", "--config", str(path), "--max-loss", "0.5", "--register"])
    out = capsys.readouterr().out
    assert rc == 1, out[-3000:]
    assert "FAIL: loss" in out and "registered models:/" not in out
    summary = json.loads((storage / "sweep" / "medgpt-sweep.json").read_text())
    rows = summary["trials"]
    assert len(rows) == 4
    assert summary["counts"]["stopped early"] >= 1, rows
    assert summary["counts"]["error"] == 0, rows
    by_lr = {r["values"]["train.lr"]: r for r in rows}
    assert by_lr[3e-3]["status"] == "completed"
    assert {by_lr[1e-6]["status"], by_lr[2e-6]["status"]} & {"stopped early"}

    # MLflow: one parent run, a child run per trial with its params and curves.
    uri = summary["mlflow_tracking_uri"]
    assert uri == f"sqlite:///{storage / 'mlflow.db'}"
    client = _mlflow(uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.tags["medgpt.kind"] == "sweep"
    assert parent.data.tags["gate"] == "FAIL"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(summary["best"]["val_loss"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "trials.md", "val_loss_curves.png"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert len(children) == 4
    for child in children:
        lr = json.loads(child.data.tags["medgpt.hparams"])["train.lr"]
        assert float(child.data.params["train.lr"]) == lr
        assert client.get_metric_history(child.info.run_id, "loss")
        assert child.info.status in ("FINISHED", "KILLED")
        assert child.data.tags["medgpt.trial_status"] == by_lr[lr]["status"]

    # The best checkpoint is the lowest val_loss of every checkpoint of every trial.
    every = {}
    for child in children:
        every.update(_checkpoint_losses(storage / "sweep" / "trials" / child.data.tags[
            "medgpt.run_name"]))  # fmt: skip
    lowest = min(every, key=every.get)
    assert summary["best"]["checkpoint"] == lowest
    assert summary["best"]["val_loss"] == pytest.approx(every[lowest])
    assert summary["best"]["values"]["train.lr"] in (3e-3, 2e-3)

    # Rerun with the same name: Tune restores the finished sweep (no new trials), and a
    # passing gate registers its best checkpoint as the champion.
    rc = main(["tune", "--config", str(path), "--max-loss", "20", "--register"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "resuming" in out and "PASS: loss" in out
    again = json.loads((storage / "sweep" / "medgpt-sweep.json").read_text())
    assert [r["trial_id"] for r in again["trials"]] == [r["trial_id"] for r in rows]
    assert again["best"]["checkpoint"] == lowest
    v = model_version(uri, "models:/medgpt@champion")
    assert str(v.version) == "1"
    assert v.tags["training_run_id"] == summary["best"]["mlflow_run_id"]

    # The same name with another space is refused, not mixed into the old sweep.
    other = load_spec(path, ["space.train.lr={grid: [1e-3, 1e-4]}"])
    with pytest.raises(ConfigError, match="started with a different recipe, space or search"):
        run_sweep(other)


def test_search_algorithms(tmp_path) -> None:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from medgpt.tuning import _search_algorithm

    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs")
    spec = load_spec(path, ["sweep.search=auto"])  # a grid: auto means random
    alg, name = _search_algorithm(spec.sweep, spec.space, 2)
    assert name == "random" and isinstance(alg, BasicVariantGenerator)
    assert alg.max_concurrent == 2  # Tune would ignore TuneConfig's limit with this alg
    spec = load_spec(path, ["space.train.lr={loguniform: [1.0e-4, 1.0e-2]}", "sweep.search=auto"])
    pytest.importorskip("optuna")
    alg, name = _search_algorithm(spec.sweep, spec.space, 3)
    assert name == "optuna" and isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 3
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        spec = load_spec(path, ["space.train.lr={loguniform: [1.0e-4, 1.0e-2]}",
                                "sweep.search=hyperopt"])  # fmt: skip
        with pytest.raises(ConfigError, match="needs the hyperopt package"):
            _search_algorithm(spec.sweep, spec.space, 1)


# -- a task as the sweep metric and in the gate (no Ray) ------------------------------------


def test_task_metric_and_task_gate_settings(tmp_path) -> None:
    path = _sweep_file(tmp_path, tmp_path / "data", tmp_path / "runs")
    plain = load_spec(path)
    assert plain.sweep.metric == "val_loss" and plain.sweep.mode == "min"
    assert plain.sweep.task is None and not plain.gate.tasks and not plain.gate.defined
    spec = load_spec(
        path,
        ["sweep.metric=medquad_mc_acc_norm", "gate.min_accuracy=0.3",
         "gate.benchmark.distractors=2", "gate.benchmark.small_types=any"],
    )  # fmt: skip
    assert spec.sweep.task == "medquad-mc" and spec.sweep.mode == "max"
    assert spec.gate.defined and spec.gate.min_accuracy == 0.3
    assert spec.gate.benchmark.distractors == 2 and spec.gate.benchmark.small_types == "any"
    # The metric only ranks finished trials: a sweep can be resumed under another one.
    assert spec.fingerprint() == plain.fingerprint()
    tasks = load_spec(path, ["gate.tasks=[medquad-mc]", "gate.min_accuracy=0.3"])
    assert tasks.gate.tasks == ["medquad-mc"]
    for overrides, message in [
        (["sweep.metric=accuracy"], "sweep.metric: 'accuracy' (allowed: val_loss, medquad_mc_acc"),
        (["gate.min_accuracy=0.3"], "gate.min_accuracy: needs gate.tasks"),
        (["gate.min_accuracy=2"], "gate.min_accuracy: must be a fraction"),
        (["gate.tasks=[pubmedqa]"], "unknown task 'pubmedqa' (allowed: medquad-mc)"),
        (["gate.benchmark.distractors=0"], "gate.benchmark.distractors: must be >= 1"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_spec(path, overrides)
        assert message in str(e.value), str(e.value)


def test_trials_ranked_by_a_task_metric() -> None:
    from medgpt.tuning import BestTrial, SweepResult, TrialResult, rank_trials, trial_table

    def row(tid: str, loss: float | None, ckpt: str | None) -> TrialResult:
        return TrialResult(tid, "completed", {"train.lr": 0.001}, 6, [], loss, ckpt, f"run-{tid}",
                           None)  # fmt: skip

    rows = [row("t1", 4.0, "/c1"), row("t2", 5.0, "/c2"), row("t3", 4.5, "/c3"),
            row("t4", None, None)]  # fmt: skip
    result = SweepResult("s", "p", "u", rows, BestTrial("t1", {}, 4.0, "/c1", "run-t1"))
    accs = {"/c1": 0.30, "/c2": 0.40, "/c3": 0.40}
    seen = []

    def score(paths: list[str]) -> list[dict[str, float]]:
        seen.extend(paths)
        return [{"medquad_mc_acc": accs[p] - 0.1, "medquad_mc_acc_norm": accs[p]} for p in paths]

    rank_trials(result, "medquad_mc_acc_norm", score)
    assert seen == ["/c1", "/c2", "/c3"]  # a trial without a checkpoint is not scored
    # The highest accuracy wins; of two equal ones, the lower val_loss.
    assert result.best.trial_id == "t3" and result.best.checkpoint == "/c3"
    assert result.best.metric_value == 0.40 and result.best.val_loss == 4.5
    plain = result.to_dict()
    assert plain["best"]["metric"] == "medquad_mc_acc_norm"
    assert plain["trials"][1]["metrics"] == {"medquad_mc_acc": pytest.approx(0.3),
                                             "medquad_mc_acc_norm": 0.4}  # fmt: skip
    assert "metrics" not in plain["trials"][3]
    assert "medquad_mc_acc_norm" in trial_table(rows).splitlines()[0]


@pytest.mark.slow
def test_sweep_ranked_by_the_benchmark(ray_cluster, tmp_path, capsys) -> None:
    """sweep.metric: medquad_mc_acc_norm on a MedQuAD-shaped dataset: every trial's best
    checkpoint is scored, the most accurate one is gated (on the same items) and its runs
    carry the accuracy."""
    from medgpt.data.prepare import PrepareConfig, prepare
    from medgpt.testing.qa import medquad_folder

    src = medquad_folder(tmp_path / "medquad")
    data = tmp_path / "data"
    prepare(PrepareConfig(sources=[str(src)], out=str(data), val_fraction=0.5, seed=5),
            progress=False)  # fmt: skip
    storage = tmp_path / "runs"
    sweep = {"name": "mc", "num_samples": 1, "search": "random", "scheduler": "fifo",
             "metric": "medquad_mc_acc_norm"}  # fmt: skip
    gate = {"min_accuracy": 0.0, "benchmark": {"answer_tokens": 16}}
    path = _sweep_file(tmp_path, data, storage, space={"train.lr": {"grid": [3e-3, 1e-6]}},
                       sweep=sweep, gate=gate)  # fmt: skip
    rc = main(["tune", "--config", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "ranking the trials by medquad_mc_acc_norm" in out and "PASS: medquad-mc acc_norm" in out
    summary = json.loads((storage / "mc" / "medgpt-sweep.json").read_text())
    scored = [t for t in summary["trials"] if "metrics" in t]
    assert len(scored) == 2
    best = max(scored, key=lambda t: (t["metrics"]["medquad_mc_acc_norm"], -t["best_val_loss"]))
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert summary["best"]["metric"] == "medquad_mc_acc_norm"
    assert summary["best"]["checkpoint"] == best["best_checkpoint"]
    value = best["metrics"]["medquad_mc_acc_norm"]
    assert summary["gate"]["accuracy"] == {"medquad-mc": pytest.approx(value)}
    client = _mlflow(summary["mlflow_tracking_uri"])
    for t in scored:
        run = client.get_run(t["mlflow_run_id"])
        assert run.data.metrics["medquad_mc_acc_norm"] == pytest.approx(
            t["metrics"]["medquad_mc_acc_norm"]
        )
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.metrics["best_medquad_mc_acc_norm"] == pytest.approx(value)
    assert parent.data.metrics["gate_medquad_mc_acc_norm"] == pytest.approx(value)
