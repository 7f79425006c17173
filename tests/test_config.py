"""from_mapping / load_yaml / ModelConfig: every bad key or value is a ConfigError naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medgpt.config import MODEL_PRESETS, ModelConfig, from_mapping, load_yaml
from medgpt.errors import ConfigError, MedgptError

MODEL_FIELDS = [
    "bias",
    "block_size",
    "dropout",
    "layer_norm_epsilon",
    "n_embd",
    "n_head",
    "n_layer",
    "vocab_size",
]


# --- from_mapping ----------------------------------------------------------------------------


def test_from_mapping_valid() -> None:
    cfg = from_mapping(ModelConfig, {"n_layer": 2, "n_head": 2, "n_embd": 32, "bias": False})
    assert cfg == ModelConfig(n_layer=2, n_head=2, n_embd=32, bias=False)
    assert cfg.head_dim == 16
    assert from_mapping(ModelConfig, {}) == ModelConfig()
    assert from_mapping(ModelConfig, cfg.to_dict()) == cfg


def test_unknown_key_names_key_and_allowed() -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(ModelConfig, {"n_layers": 2})
    msg = str(exc.value)
    assert "unknown key n_layers" in msg
    assert f"(allowed: {', '.join(MODEL_FIELDS)})" in msg


def test_numeric_string_accepted_for_float() -> None:
    # YAML 1.1 reads 1e-5 (no dot) as a string; it means the number.
    assert from_mapping(ModelConfig, {"layer_norm_epsilon": "1e-5"}).layer_norm_epsilon == 1e-5


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_layer", "2"),  # string for int
        ("n_layer", True),  # bool for int
        ("n_layer", 2.0),  # float for int
        ("n_layer", None),
        ("bias", 1),  # int for bool
        ("bias", "true"),
        ("dropout", "high"),  # non-numeric string for float
        ("dropout", False),  # bool for float
        ("layer_norm_epsilon", [1e-5]),
    ],
)
def test_wrong_type_names_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(ModelConfig, {key: value})
    msg = str(exc.value)
    assert msg.startswith(f"{key}: expected ")
    assert repr(value) in msg


def test_int_accepted_for_float() -> None:
    cfg = from_mapping(ModelConfig, {"dropout": 0, "layer_norm_epsilon": 1})
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float
    assert cfg.layer_norm_epsilon == 1.0 and type(cfg.layer_norm_epsilon) is float


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="ModelConfig: expected a mapping"):
        from_mapping(ModelConfig, [("n_layer", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"block_size": -1}, "block_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
    ],
)
def test_range_checks_name_field(values: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(ModelConfig, values)
    assert str(exc.value).startswith(f"{field}: must be")
    with pytest.raises(ConfigError):
        ModelConfig(**values)


def test_config_error_is_user_facing() -> None:
    assert issubclass(ConfigError, MedgptError)


# Nested dataclasses, optional and list fields: the generic paths of from_mapping.


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Outer:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    seed: int | None = None
    opt: ModelConfig | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)


def test_nested_and_generic_fields() -> None:
    out = from_mapping(
        _Outer,
        {
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
            "inner": {"lr": 1, "tags": ["a", "b"]},
            "seed": None,
            "sizes": (1, 2),
        },
    )
    assert out.model == ModelConfig(n_layer=2, n_head=2, n_embd=32)
    assert out.inner == _Inner(lr=1.0, tags=["a", "b"])
    assert out.seed is None and out.sizes == [1, 2]
    assert from_mapping(_Outer, {"seed": 3}).seed == 3
    assert out.opt is None
    assert from_mapping(_Outer, {"opt": {"n_layer": 1}}).opt == ModelConfig(n_layer=1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"n_layers": 2}}, "unknown key model.n_layers"),
        ({"model": {"n_layer": "2"}}, "model.n_layer: expected int"),
        ({"model": {"dropout": 1.0}}, "dropout: must be in [0, 1)"),
        ({"opt": {"n_layers": 2}}, "unknown key opt.n_layers"),
        ({"opt": {"n_head": 5}}, "n_embd: must be divisible by n_head"),
        ({"model": 3}, "model: expected a mapping of ModelConfig fields"),
        ({"inner": {"tags": ["a", 1]}}, "inner.tags[1]: expected str"),
        ({"sizes": [1, True]}, "sizes[1]: expected int"),
        ({"sizes": "12"}, "sizes: expected list of int"),
        ({"seed": "3"}, "seed: expected int or null"),
        ({"seed": True}, "seed: expected int or null"),
    ],
)
def test_nested_errors_carry_the_path(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(_Outer, data)
    msg = str(exc.value)
    assert expected in msg
    key = next(iter(data))
    assert msg.startswith((key, f"unknown key {key}."))  # the outer key is named


def test_unknown_keys_of_mixed_types() -> None:
    # YAML `1: 2` next to a misspelt key gives {1: 2, "n_layers": 3}.
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(ModelConfig, {1: 2, "n_layers": 3})


# --- presets ---------------------------------------------------------------------------------


def test_preset_unknown_lists_allowed() -> None:
    with pytest.raises(ConfigError) as exc:
        ModelConfig.preset("gpt3")
    msg = str(exc.value)
    assert "'gpt3'" in msg
    assert "allowed: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl" in msg


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_presets_valid(name: str) -> None:
    cfg = ModelConfig.preset(name)
    for k, v in MODEL_PRESETS[name].items():
        assert getattr(cfg, k) == v
    assert cfg.n_embd % cfg.n_head == 0


def test_preset_overrides() -> None:
    cfg = ModelConfig.preset("gpt2", n_layer=2, dropout=0.1, bias=False)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (2, 12, 768)
    assert cfg.dropout == 0.1 and cfg.bias is False
    assert cfg.block_size == 1024 and cfg.vocab_size == 50257
    tiny = ModelConfig.preset("tiny", block_size=16)
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (2, 2, 32, 16)
    # Overrides go through the same checks.
    with pytest.raises(ConfigError, match="unknown key n_layers"):
        ModelConfig.preset("tiny", n_layers=3)
    with pytest.raises(ConfigError, match="n_layer: expected int"):
        ModelConfig.preset("tiny", n_layer="3")
    with pytest.raises(ConfigError, match="n_embd: must be divisible"):
        ModelConfig.preset("tiny", n_head=3)
    # The table itself is not modified by overrides.
    assert MODEL_PRESETS["gpt2"] == {"n_layer": 12, "n_head": 12, "n_embd": 768}


# --- load_yaml -------------------------------------------------------------------------------


def test_load_yaml_mapping(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text("model:\n  n_layer: 2\n  dropout: 0.1\nname: run-1\n", encoding="utf-8")
    assert load_yaml(p) == {"model": {"n_layer": 2, "dropout": 0.1}, "name": "run-1"}
    assert load_yaml(str(p)) == load_yaml(p)


def test_load_yaml_missing(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as exc:
        load_yaml(p)
    assert str(p) in str(exc.value)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path)  # a directory is not a config file


def test_load_yaml_invalid(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  n_layer: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as exc:
        load_yaml(p)
    assert str(p) in str(exc.value)
    assert "\n" not in str(exc.value)  # one line


def test_load_yaml_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: Ménière\n".encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_yaml(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("hi\n", "str")]
)
def test_load_yaml_top_level_not_mapping(tmp_path: Path, text: str, kind: str) -> None:
    p = tmp_path / "top.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_yaml(p)
    msg = str(exc.value)
    assert str(p) in msg and "mapping" in msg and kind in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "null\n"])
def test_load_yaml_empty(tmp_path: Path, text: str) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text(text, encoding="utf-8")
    assert load_yaml(p) == {}
