"""Every YAML recipe in configs/ maps onto its dataclasses without errors."""

from pathlib import Path

import pytest

from medgpt.config import Recipe, load_yaml
from medgpt.data.prepare import PrepareConfig

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
    recipe = Recipe.from_dict(data)
    # The global batch must split evenly over the recipe's own worker count.
    assert recipe.train.grad_accum_steps(recipe.job.num_workers) >= 1
    assert recipe.job.name == path.stem
