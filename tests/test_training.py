"""The training loop and its parts without Ray: schedule, optimizer, checkpoints, exact resume,
and the driver's input checks (which run before any Ray worker starts)."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from medgpt.checkpoint import (
    is_checkpoint,
    load_model,
    load_train_state,
    read_meta,
    save_checkpoint,
)
from medgpt.cli import main
from medgpt.config import ModelConfig, Recipe, TrainConfig
from medgpt.errors import CheckpointError, ConfigError, DataError, WeightsError
from medgpt.launch import train, validate
from medgpt.model import GPT
from medgpt.testing.training import tiny_recipe
from medgpt.training import configure_optimizer, local_context, lr_at, run_loop


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_optimizer_decays_matrices_only() -> None:
    model = GPT(ModelConfig.preset("tiny"))
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.transformer.wpe.weight for p in no_decay["params"])
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counted == model.num_params(non_embedding=False)  # tied head counted once


def test_batch_tokens_must_split_over_workers() -> None:
    cfg = TrainConfig(seq_len=64, micro_batch_size=4, batch_tokens=512)
    assert cfg.grad_accum_steps(1) == 2
    assert cfg.grad_accum_steps(2) == 1
    with pytest.raises(ConfigError, match=r"batch_tokens: 512 is not a multiple .* = 768"):
        cfg.grad_accum_steps(3)


def test_recipe_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr \(allowed: .*lr,"):
        Recipe.from_dict({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"train\.seq_len: 128 exceeds model\.block_size 64"):
        Recipe.from_dict({"model": {"block_size": 64}, "train": {"seq_len": 128}})
    with pytest.raises(ConfigError, match=r"job\.num_workers: must be >= 1"):
        Recipe.from_dict({"job": {"num_workers": 0}})
    assert Recipe.from_dict({"train": {"lr": "3e-4"}}).train.lr == 3e-4  # YAML 1.1 spelling


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = GPT(ModelConfig.preset("tiny"))
    state = {"step": 3, "opt": {"m": torch.ones(2)}}
    out = save_checkpoint(tmp_path / "step-000003", model, {"step": 3, "val_loss": 1.5}, state)
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "meta.json",
        "train_state.pt",
    }
    assert is_checkpoint(out)
    again = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.lm_head.weight is again.transformer.wte.weight
    # Loaded onto the file's tensors (meta-device build): real, trainable parameters.
    assert all(p.device.type == "cpu" and p.requires_grad for p in again.parameters())
    assert read_meta(out)["val_loss"] == 1.5
    assert torch.equal(load_train_state(out)["opt"]["m"], torch.ones(2))
    assert not list(tmp_path.glob(".step-*")), "temporary folder left behind"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"format": "x"}'), "not a medgpt checkpoint"),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps(
                    {
                        "format": "medgpt-checkpoint",
                        "format_version": 1,
                        "model": {"n_embd": 48, "n_head": 2, "n_layer": 2, "block_size": 64},
                    }
                )
            ),
            "weights do not match config.json",
        ),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path, damage, match: str) -> None:
    out = save_checkpoint(tmp_path / "c", GPT(ModelConfig.preset("tiny")), {}, {"step": 1})
    damage(out)
    with pytest.raises(CheckpointError, match=match):
        load_model(out)


def test_corrupt_train_state_is_a_clear_error(tmp_path: Path) -> None:
    out = save_checkpoint(tmp_path / "c", GPT(ModelConfig.preset("tiny")), {}, {"step": 1})
    (out / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"train_state\.pt: corrupt"):
        load_train_state(out)
    (out / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_train_state(out)


# --- the loop, in-process ------------------------------------------------------------------


class _Keep:
    """A reporter that keeps the checkpoints the loop writes, like Ray's storage would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[int, Path] = {}

    def __call__(self, metrics, checkpoint_dir, step) -> None:
        if checkpoint_dir is not None:
            dest = self.root / f"step-{step:06d}"
            shutil.copytree(checkpoint_dir, dest)
            shutil.rmtree(checkpoint_dir.parent)
            self.paths[step] = dest


class _Dir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


def _loop(recipe: Recipe, keep: _Keep, checkpoint=None) -> list[dict]:
    torch.set_num_threads(1)
    return list(run_loop(recipe, local_context(), None, checkpoint, keep))


def test_loop_learns_and_resumes_exactly(icd_data: Path, tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        tiny_recipe(
            icd_data,
            tmp_path,
            "x",
            **{
                "job.num_workers": 1,
                "train.max_steps": 8,
                "train.checkpoint_every": 4,
                "train.eval_every": 4,
                "train.lr": 3e-3,
            },
        )
    )
    full = _Keep(tmp_path / "full")
    metrics = _loop(recipe, full)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["val_loss"] < metrics[3]["val_loss"] < 10.9  # it learns
    for m in metrics:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_ms"} <= set(m)

    resumed = _Keep(tmp_path / "resumed")
    tail = _loop(recipe, resumed, checkpoint=_Dir(full.paths[4]))
    assert [m["step"] for m in tail] == [5, 6, 7, 8]  # continues at the checkpoint's step
    for a, b in zip(tail, metrics[4:], strict=True):
        assert a["loss"] == b["loss"], a["step"]  # same batches, same state: same numbers
    final_a, final_b = load_model(full.paths[8]), load_model(resumed.paths[8])
    for k, v in final_a.state_dict().items():
        assert torch.equal(v, final_b.state_dict()[k]), k


def test_resume_into_a_different_model_shape_is_refused(icd_data: Path, tmp_path: Path) -> None:
    keep = _Keep(tmp_path / "a")
    base = tiny_recipe(
        icd_data,
        tmp_path,
        "x",
        **{"job.num_workers": 1, "train.max_steps": 2, "train.checkpoint_every": 2},
    )
    _loop(Recipe.from_dict(base), keep)
    other = {**base, "model": {**base["model"], "n_embd": 64}}
    with pytest.raises(CheckpointError, match="model shape differs"):
        _loop(Recipe.from_dict(other), keep, checkpoint=_Dir(keep.paths[2]))


def test_init_from_pretrained_hf_folder(icd_data: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    recipe = Recipe.from_dict(
        tiny_recipe(
            icd_data,
            tmp_path,
            "ft",
            **{"job.num_workers": 1, "train.max_steps": 2, "train.init_from": str(tmp_path / "hf")},
        )
    )
    keep = _Keep(tmp_path / "ft")
    metrics = _loop(recipe, keep)
    assert metrics[-1]["step"] == 2
    assert load_model(keep.paths[2]).config.n_embd == 32


# --- driver-side checks: they fail before Ray starts ------------------------------------------


def test_missing_dataset_dir(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(tiny_recipe(tmp_path / "nope", tmp_path, "x"))
    with pytest.raises(DataError, match=r"no manifest\.json"):
        validate(recipe)


def test_dataset_with_another_tokenizer(icd_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(icd_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"] = {"name": "cl100k_base", "n_vocab": 100277, "eot": 100257}
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="tokenized with 'cl100k_base'"):
        validate(Recipe.from_dict(tiny_recipe(data, tmp_path, "x")))


def test_init_from_nonexistent_folder(icd_data: Path, tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        tiny_recipe(icd_data, tmp_path, "x", **{"train.init_from": str(tmp_path / "missing")})
    )
    with pytest.raises(WeightsError, match="no such model folder"):
        train(recipe)


def test_cli_train_bad_input_is_one_line(icd_data: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medgpt train: error: unknown key train.lrr")
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["train", "--config", str(cfg), "--set", "nonsense"]) == 2
    assert "expected section.key=value" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
