"""Every YAML recipe in configs/ maps onto its dataclass without errors."""

from pathlib import Path

import pytest

from medgpt.config import load_yaml
from medgpt.data.prepare import PrepareConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert CONFIGS, "configs/ holds no YAML recipes"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_loads(path: Path) -> None:
    data = load_yaml(path)
    if path.name.startswith("data-"):
        cfg = PrepareConfig.from_dict(data)
        assert cfg.specs, f"{path.name} names no sources"
        assert cfg.out
    else:
        pytest.fail(f"{path.name}: no dataclass is known for this recipe; extend this test")
