"""Every YAML file in configs/ maps onto its dataclasses without errors: training recipes,
data recipes (data-*.yaml) and sweep files (tune-*.yaml, also run in test_tune)."""

from pathlib import Path

import pytest

from medgpt.config import Recipe, load_yaml
from medgpt.data.prepare import PrepareConfig
from medgpt.tuning import load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "medquad-cpu.yaml", "medquad-124m.yaml"} <= names
    assert "medquad-finetune-gpt2.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_loads(path: Path) -> None:
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
