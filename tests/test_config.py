"""from_mapping / load_yaml / ModelConfig: every bad key or value is a ConfigError naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medgpt.config import MODEL_PRESETS, ModelConfig, from_mapping, load_yaml, option
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


# --- environment variables in recipes ------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_load_yaml_expands_set_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGPT_T_STORE", "s3://bucket/runs")
    monkeypatch.setenv("MEDGPT_T_NAME", "run-7")
    p = _yaml(tmp_path, "job:\n  storage_path: ${MEDGPT_T_STORE}\n  name: a-${MEDGPT_T_NAME}-b\n")
    assert load_yaml(p) == {"job": {"storage_path": "s3://bucket/runs", "name": "a-run-7-b"}}
    # A set variable wins over the default.
    p = _yaml(tmp_path, "job:\n  storage_path: ${MEDGPT_T_STORE:-runs}\n")
    assert load_yaml(p)["job"]["storage_path"] == "s3://bucket/runs"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_load_yaml_default_when_unset_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("MEDGPT_T_STORE", raising=False)
    else:
        monkeypatch.setenv("MEDGPT_T_STORE", value)
    p = _yaml(tmp_path, "job:\n  storage_path: ${MEDGPT_T_STORE:-runs}\n  x: ${MEDGPT_T_STORE:-}\n")
    assert load_yaml(p) == {"job": {"storage_path": "runs", "x": ""}}


def test_load_yaml_unset_variable_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDGPT_T_STORE", raising=False)
    p = _yaml(tmp_path, "job:\n  storage_path: ${MEDGPT_T_STORE}\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(p)
    msg = str(exc.value)
    assert str(p) in msg and "job.storage_path" in msg and "MEDGPT_T_STORE" in msg
    assert "not set" in msg and "${MEDGPT_T_STORE:-default}" in msg
    assert "\n" not in msg
    # A key the caller replaces anyway (a --storage flag) is not expanded, so need not be set.
    assert load_yaml(p, skip=["job.storage_path"]) == {"job": {"storage_path": "${MEDGPT_T_STORE}"}}
    # Set but empty is a value (as in the shell): only the :- form replaces it.
    monkeypatch.setenv("MEDGPT_T_STORE", "")
    assert load_yaml(p) == {"job": {"storage_path": ""}}


def test_load_yaml_dollar_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGPT_T_X", "ex")
    p = _yaml(
        tmp_path,
        "a: price $$5\n"  # $$ is one literal $
        "b: $${MEDGPT_T_X}\n"  # ... so this is the text ${MEDGPT_T_X}, not a reference
        "c: $MEDGPT_T_X and $ alone\n"  # only the braced form is expanded
        "d: $$$${MEDGPT_T_X}\n",
    )
    assert load_yaml(p) == {
        "a": "price $5",
        "b": "${MEDGPT_T_X}",
        "c": "$MEDGPT_T_X and $ alone",
        "d": "$${MEDGPT_T_X}",
    }


@pytest.mark.parametrize("ref", ["${MEDGPT_T_X-d}", "${1X}", "${}", "${MEDGPT_T_X", "${A B}"])
def test_load_yaml_bad_reference(tmp_path: Path, ref: str) -> None:
    p = _yaml(tmp_path, f"train:\n  data_dir: 'x{ref}'\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(p)
    msg = str(exc.value)
    assert str(p) in msg and "train.data_dir" in msg and "bad variable reference" in msg
    assert "${VAR:-default}" in msg  # what is allowed


def test_load_yaml_expands_nested_values_not_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDGPT_T_X", "ex")
    monkeypatch.delenv("MEDGPT_T_UNSET", raising=False)
    p = _yaml(
        tmp_path,
        "applications:\n"
        "  - name: ${MEDGPT_T_X}\n"
        "    args: {storage_path: '${MEDGPT_T_UNSET:-runs}', prompts: [a, '${MEDGPT_T_X}', [x]]}\n"
        "${MEDGPT_T_X}: key stays\n",
    )
    assert load_yaml(p) == {
        "applications": [
            {"name": "ex", "args": {"storage_path": "runs", "prompts": ["a", "ex", ["x"]]}}
        ],
        "${MEDGPT_T_X}": "key stays",
    }
    # The key path of a nested unset variable names list positions.
    p = _yaml(tmp_path, "applications:\n  - args: {sample: [ok, '${MEDGPT_T_UNSET}']}\n")
    with pytest.raises(
        ConfigError, match=r"applications\[0\]\.args\.sample\[1\]: .*MEDGPT_T_UNSET"
    ):
        load_yaml(p)


def test_load_yaml_leaves_other_values_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDGPT_T_UNSET", raising=False)
    p = _yaml(tmp_path, "model:\n  n_layer: 2\n  dropout: 0.1\n  bias: false\njob:\n  uri: null\n")
    data = load_yaml(p)
    assert data == {"model": {"n_layer": 2, "dropout": 0.1, "bias": False}, "job": {"uri": None}}
    assert type(data["model"]["n_layer"]) is int and data["model"]["bias"] is False
    # An expanded value stays text; the dataclasses decide what it must be.
    p = _yaml(tmp_path, "train:\n  lr: ${MEDGPT_T_UNSET:-3e-4}\n")
    assert load_yaml(p) == {"train": {"lr": "3e-4"}}


# --- overrides: the one KEY.PATH=VALUE parser ---------------------------------------------------


def test_parse_override_reads_the_value_as_yaml() -> None:
    from medgpt.config import parse_override

    o = parse_override("train.lr=3e-4")
    assert (o.key, o.path, o.head, o.rest, o.given) == (
        "train.lr", ["train", "lr"], "train", "lr", "train.lr=3e-4"
    )  # fmt: skip
    assert o.value == "3e-4"  # YAML 1.1 text; from_mapping reads it as the float it spells
    assert parse_override(" job.name = x=y").value == "x=y"  # only the first '=' splits
    assert parse_override("train.max_steps=40").value == 40
    assert parse_override("job.use_gpu=true").value is True
    assert parse_override("gate.max_loss=null").value is None
    assert parse_override("space.train.lr={choice: [1, 2]}").value == {"choice": [1, 2]}
    assert parse_override("train.data_dir=").value == ""
    assert parse_override("job.name=[unclosed").value == "[unclosed"  # not YAML: stays text


@pytest.mark.parametrize("item", ["nonsense", "=3", " =3", "train..lr=1", ".lr=1", "train.=1"])
def test_parse_override_refuses_malformed_items(item: str) -> None:
    from medgpt.config import apply_overrides, parse_override

    with pytest.raises(ConfigError) as exc:
        parse_override(item)
    assert str(exc.value) == (f"override {item!r}: expected section.key=value (e.g. train.lr=3e-4)")
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        apply_overrides({}, [item])


def test_parse_override_dotted_form_for_sweeps() -> None:
    from medgpt.config import parse_override

    form = "key=value (e.g. sweep.num_samples=8)"
    assert parse_override("sweep.num_samples=8", form, dotted=True).value == 8
    with pytest.raises(ConfigError) as exc:
        parse_override("num_samples=8", form, dotted=True)
    assert str(exc.value) == f"override 'num_samples=8': expected {form}"


def test_apply_overrides_copies_and_names_a_non_section() -> None:
    from medgpt.config import Override, apply_overrides

    base = {"train": {"lr": 1e-3, "max_steps": 10}, "job": {"name": "a"}}
    out = apply_overrides(base, ["train.lr=3e-4", Override("job.name", "b", "--name b")])
    assert out == {"train": {"lr": "3e-4", "max_steps": 10}, "job": {"name": "b"}}
    assert base == {"train": {"lr": 1e-3, "max_steps": 10}, "job": {"name": "a"}}  # untouched
    assert apply_overrides({}, ["model.n_layer=2"]) == {"model": {"n_layer": 2}}
    with pytest.raises(ConfigError) as exc:
        apply_overrides({"train": 3}, ["train.lr=1"])
    assert str(exc.value) == "override 'train.lr=1': train is not a section"


def test_tune_and_recipe_overrides_share_the_parser(tmp_path: Path) -> None:
    # The sweep's --set goes through the same parser: same value reading, its own form.
    from medgpt.config import Override
    from medgpt.tuning import load_spec

    recipe = {"model": MODEL_PRESETS["tiny"], "train": {"data_dir": str(tmp_path), "seq_len": 64}}
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "recipe: " + repr(recipe).replace("'", '"') + "\n"
        "space: {train.lr: {choice: [0.001, 0.002]}}\n",
        encoding="utf-8",
    )
    spec = load_spec(
        path, ["train.max_steps=7", Override("sweep.num_samples", 3, "--num-samples 3")]
    )
    assert spec.recipe["train"]["max_steps"] == 7 and spec.sweep.num_samples == 3
    for bad in ("nonsense", "sweep..name=x", "num_samples=3"):
        with pytest.raises(ConfigError) as exc:
            load_spec(path, [bad])
        assert str(exc.value) == f"override {bad!r}: expected key=value (e.g. sweep.num_samples=8)"


# --- flags declared on the fields ---------------------------------------------------------------


def _train_parser():
    import argparse

    from medgpt.config import Recipe, add_flags, flags_of

    p = argparse.ArgumentParser(prog="t")
    add_flags(p, flags_of(Recipe))
    return p


def test_recipe_flags_are_declared_on_the_fields() -> None:
    from medgpt.config import JobConfig, Recipe, TrainConfig, flags_of

    by_flag = {f.flag: f for f in flags_of(Recipe)}
    assert {k: f.key for k, f in by_flag.items()} == {
        "--data": "train.data_dir",
        "--init-from": "train.init_from",
        "--max-steps": "train.max_steps",
        "--name": "job.name",
        "--storage": "job.storage_path",
        "--num-workers": "job.num_workers",
    }
    assert by_flag["--max-steps"].help == "optimizer steps (train.max_steps)"
    assert by_flag["--max-steps"].type is int
    # The declaration does not change the defaults.
    assert TrainConfig().max_steps == 1000 and JobConfig().storage_path == "runs"
    assert TrainConfig().data_dir == "data/icd10cm" and JobConfig().num_workers == 2


def test_a_flag_its_yaml_key_and_its_override_reach_the_same_field(tmp_path: Path) -> None:
    from medgpt.config import Recipe, apply_overrides, flags_of, given_flags, load_yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 40\n  data_dir: '2024'\n", encoding="utf-8")
    from_yaml = Recipe.from_dict(load_yaml(recipe))
    from_set = Recipe.from_dict(
        apply_overrides({}, ["train.max_steps=40", "train.data_dir='2024'"])
    )
    args = _train_parser().parse_args(["--max-steps", "40", "--data", "2024"])
    overrides = given_flags(args, flags_of(Recipe))
    assert [(o.key, o.value, o.given) for o in overrides] == [
        ("train.data_dir", "2024", "--data 2024"),  # a text field keeps its text
        ("train.max_steps", 40, "--max-steps 40"),
    ]
    from_flag = Recipe.from_dict(apply_overrides({}, overrides))
    assert from_yaml == from_set == from_flag
    assert from_flag.train.max_steps == 40 and from_flag.train.data_dir == "2024"
    # Flags not given change nothing.
    assert given_flags(_train_parser().parse_args([]), flags_of(Recipe)) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "abc"], "--max-steps: train.max_steps: expected int, got 'abc'"),
        (["--max-steps", "2.5"], "--max-steps: train.max_steps: expected int, got 2.5"),
        (["--num-workers", "true"], "--num-workers: job.num_workers: expected int, got True"),
    ],
)
def test_a_bad_flag_value_names_the_flag_key_and_type(argv: list[str], message: str) -> None:
    from medgpt.config import Recipe, flags_of, given_flags

    with pytest.raises(ConfigError) as exc:
        given_flags(_train_parser().parse_args(argv), flags_of(Recipe))
    assert str(exc.value) == message


def test_a_flag_out_of_range_is_refused_like_the_key() -> None:
    from medgpt.config import Recipe, apply_overrides, flags_of, given_flags

    args = _train_parser().parse_args(["--max-steps", "0"])
    with pytest.raises(ConfigError) as from_flag:
        Recipe.from_dict(apply_overrides({}, given_flags(args, flags_of(Recipe))))
    with pytest.raises(ConfigError) as from_set:
        Recipe.from_dict(apply_overrides({}, ["train.max_steps=0"]))
    assert str(from_flag.value) == str(from_set.value) == "train.max_steps: must be >= 1, got 0"


@dataclasses.dataclass
class _Flagged:
    on: bool = option(True, flag="--no-on", help="turn it off")
    loud: bool = option(False, flag="--loud", help="turn it up")
    tags: list[str] = option(default_factory=list, flag="--tag", help="repeat")  # noqa: RUF009
    limit: float | None = option(None, flag="--limit", help="a number or nothing")
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_flag_kinds_bool_negated_repeated_optional() -> None:
    import argparse

    from medgpt.config import add_flags, flag_for, flags_of, given_flags

    p = argparse.ArgumentParser(prog="t")
    flags = flags_of(_Flagged)
    add_flags(p, flags)
    assert [o.value for o in given_flags(p.parse_args([]), flags)] == []
    args = p.parse_args(["--no-on", "--loud", "--tag", "a", "--tag", "7", "--limit", "0.5"])
    got = {o.key: o.value for o in given_flags(args, flags)}
    assert got == {"on": False, "loud": True, "tags": ["a", "7"], "limit": 0.5}
    assert from_mapping(_Flagged, got) == _Flagged(on=False, loud=True, tags=["a", "7"], limit=0.5)
    with pytest.raises(ConfigError, match=r"^--limit: limit: expected float or null, got 'x'$"):
        given_flags(p.parse_args(["--limit", "x"]), flags)
    assert flag_for(_Flagged, "limit", help="other words").help == "other words"
    with pytest.raises(KeyError):
        flag_for(_Flagged, "inner.lr")


def test_cli_flags_map_through_the_declarations(tmp_path: Path, capsys) -> None:
    from medgpt.cli import _load_recipe, build_parser, main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 64}\n"
                      "train: {seq_len: 64, max_steps: 3}\n")  # fmt: skip
    argv = ["train", "--config", str(recipe), "--set", "train.max_steps=5", "--set",
            "job.name=from-set", "--max-steps", "7", "--storage", "elsewhere"]  # fmt: skip
    r = _load_recipe(build_parser().parse_args(argv))
    # The YAML, then --set, then the flags: a flag given wins over a --set of the same key.
    assert (r.train.max_steps, r.job.name, r.job.storage_path) == (7, "from-set", "elsewhere")
    assert r.model.n_layer == 2 and r.train.seq_len == 64

    assert main(["train", "--config", str(recipe), "--max-steps", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "medgpt train: error: --max-steps: train.max_steps: expected int, got 'abc'\n"
    assert main(["tune", "--config", str(recipe), "--num-samples", "many"]) == 2
    err = capsys.readouterr().err
    assert "--num-samples: sweep.num_samples: expected int, got 'many'" in err
