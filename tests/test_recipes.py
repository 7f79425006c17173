"""Every YAML file in configs/ maps onto its dataclasses without errors: training recipes,
data recipes (data-*.yaml) and sweep files (tune-*.yaml, also run in test_tune).

Storage comes from the environment: the CPU recipes default to the local ``runs`` folder and
take ``MEDGPT_STORAGE`` when it is set; the multi-node GPU recipes require it (a local default
there would have each node write to its own disk)."""

from pathlib import Path

import pytest

from medgpt.config import Recipe, load_yaml
from medgpt.data.prepare import PrepareConfig
from medgpt.errors import ConfigError
from medgpt.tuning import load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BY_NAME = {p.name: p for p in CONFIGS}
# Recipes for the GPU cluster: no storage without MEDGPT_STORAGE.
NEEDS_STORAGE = {"medquad-124m.yaml", "medquad-finetune-gpt2.yaml"}
TRAINING = [p for p in CONFIGS if not p.name.startswith(("data-", "tune-"))]
BUCKET = "s3://medgpt-test-bucket/runs"


@pytest.fixture
def no_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDGPT_STORAGE", raising=False)


def test_there_are_recipes() -> None:
    names = set(BY_NAME)
    assert {"tiny-cpu.yaml", "medquad-cpu.yaml", "medquad-124m.yaml"} <= names
    assert "medquad-finetune-gpt2.yaml" in names
    assert names >= NEEDS_STORAGE


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGPT_STORAGE", BUCKET)
    data = load_yaml(path)
    if path.name.startswith("data-"):
        cfg = PrepareConfig.from_dict(data)
        assert cfg.specs, f"{path.name} names no sources"
        assert cfg.out
        return
    if path.name.startswith("tune-"):
        spec = load_spec(path)
        assert spec.sweep.name == path.stem
        recipe = Recipe.from_dict(spec.recipe)
        assert recipe.train.grad_accum_steps(recipe.job.num_workers) >= 1
        return
    recipe = Recipe.from_dict(data)
    # The global batch must split evenly over the recipe's own worker count.
    assert recipe.train.grad_accum_steps(recipe.job.num_workers) >= 1
    assert recipe.job.name == path.stem
    assert recipe.job.storage_path == BUCKET, "job.storage_path does not follow MEDGPT_STORAGE"


@pytest.mark.parametrize(
    "path", [p for p in TRAINING if p.name not in NEEDS_STORAGE], ids=lambda p: p.name
)
def test_cpu_recipes_default_to_local_runs(path: Path, no_storage_env: None) -> None:
    recipe = Recipe.from_dict(load_yaml(path))
    assert recipe.job.storage_path == "runs"


@pytest.mark.parametrize("value", ["", None], ids=["empty", "unset"])
def test_sweep_of_a_cpu_recipe_defaults_to_local_runs(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("MEDGPT_STORAGE", raising=False)
    else:
        monkeypatch.setenv("MEDGPT_STORAGE", value)
    spec = load_spec(BY_NAME["tune-tiny-cpu.yaml"])
    assert Recipe.from_dict(spec.recipe).job.storage_path == "runs"


@pytest.mark.parametrize("name", sorted(NEEDS_STORAGE))
def test_cluster_recipes_require_storage(name: str, no_storage_env: None) -> None:
    path = BY_NAME[name]
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert str(path) in msg and "job.storage_path" in msg and "MEDGPT_STORAGE" in msg
    assert "not set" in msg and "\n" not in msg
    # A --storage flag replaces the value anyway: the CLI can skip it.
    data = load_yaml(path, skip=["job.storage_path"])
    assert data["job"]["storage_path"] == "${MEDGPT_STORAGE}"


@pytest.mark.parametrize("name", sorted(NEEDS_STORAGE))
def test_cluster_recipes_load_with_storage(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGPT_STORAGE", "gs://other-bucket/runs")
    recipe = Recipe.from_dict(load_yaml(BY_NAME[name]))
    assert recipe.job.storage_path == "gs://other-bucket/runs"
    assert recipe.job.use_gpu
