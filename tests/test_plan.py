"""medgpt.plan: the activation estimate against what autograd really saves (fp32 on CPU), the
parts' arithmetic, and `medgpt plan` exiting 2 for a recipe that cannot fit."""

from __future__ import annotations

import pytest
import torch

from medgpt import plan
from medgpt.config import ModelConfig
from medgpt.model import GPT, count_params


def _saved_bytes(cfg: ModelConfig, batch: int, seq: int, ckpt: bool) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward in one forward (parameters excluded),
    and of the logits."""
    torch.manual_seed(0)
    model = GPT(cfg)
    model.train()
    model.activation_checkpointing = ckpt
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(x[:, :-1], x[:, 1:])
    return sum(saved.values()), logits.numel() * logits.element_size()


def _measured_activation_bytes(cfg: ModelConfig, batch: int, seq: int, ckpt: bool) -> int:
    """What is saved, plus the logits and (in backward) a gradient of their size; with
    checkpointing, plus one block's own saved tensors, which exist again while it is
    recomputed."""
    saved, logits = _saved_bytes(cfg, batch, seq, ckpt)
    recompute = 0
    if ckpt:
        one = ModelConfig(**{**cfg.__dict__, "n_layer": 1})
        recompute = _saved_bytes(one, batch, seq, False)[0] - _saved_bytes(one, batch, seq, True)[0]
    return saved + 2 * logits + recompute


@pytest.mark.parametrize(
    ("layers", "heads", "width", "batch", "seq"),
    [(2, 4, 128, 4, 64), (4, 4, 256, 2, 128), (6, 6, 384, 2, 256), (8, 8, 512, 1, 256)],
)
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_estimate_within_20_percent(layers, heads, width, batch, seq, ckpt) -> None:
    cfg = ModelConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=seq, dropout=0.0)
    measured = _measured_activation_bytes(cfg, batch, seq, ckpt)
    estimate = plan.activation_bytes(cfg, batch, seq, mixed=False, checkpointing=ckpt)
    assert abs(estimate - measured) / measured < 0.20, (estimate, measured)


def test_parts_and_largest_micro_batch() -> None:
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768)
    p = count_params(cfg, non_embedding=False)
    mp = plan.memory_plan(cfg, 4, 1024, checkpointing=False)
    assert mp.parts["weights (fp32)"] == 4 * p and mp.parts["AdamW moments (fp32)"] == 8 * p
    budget = plan.usable_bytes("A10G")
    n = plan.largest_micro_batch(cfg, 1024, False, budget)
    assert plan.memory_plan(cfg, n, 1024, False).total <= budget
    assert plan.memory_plan(cfg, n + 1, 1024, False).total > budget
    assert plan.largest_micro_batch(cfg, 1024, True, budget) > n  # checkpointing frees room
    xl = ModelConfig(n_layer=48, n_head=25, n_embd=1600)
    assert plan.largest_micro_batch(xl, 1024, True, budget) == 0  # 16 bytes/param alone: 23 GiB
    assert plan.largest_micro_batch(xl, 1024, True, plan.usable_bytes("A100-80GB")) > 0
    with pytest.raises(Exception, match="--gpu: 'T4' \\(allowed: A10G, L4"):
        plan.usable_bytes("T4")


def test_cli_exit_codes(capsys) -> None:
    from medgpt.cli import main

    tiny = ["plan", "--config", "configs/tiny-cpu.yaml"]
    assert main([*tiny, "--gpu", "L4"]) == 0
    assert "fits: micro-batch 8 x 128" in capsys.readouterr().out
    xl = ["--set", "model.n_layer=48", "--set", "model.n_embd=1600", "--set", "model.n_head=25"]
    assert main([*tiny, *xl, "--gpu", "L4"]) == 2
    out, err = capsys.readouterr()
    assert "does not fit" in out
    assert err.strip() == (
        "medgpt plan: error: train.micro_batch_size: 8 x 128 does not fit on L4 (table above): "
        "lower train.micro_batch_size (train.batch_tokens stays: more accumulation), set "
        "train.activation_checkpointing: true or set job.strategy: fsdp (with more "
        "job.num_workers to shard over)"
    )


XL = ModelConfig(n_layer=48, n_head=25, n_embd=1600)


def test_fsdp_shards_the_training_state_and_gathers_two_blocks() -> None:
    p = count_params(XL, non_embedding=False)
    ddp = plan.memory_plan(XL, 1, 1024, True, strategy="ddp", workers=8)
    fsdp = plan.memory_plan(XL, 1, 1024, True, strategy="fsdp", workers=8)
    assert fsdp.parts["weights (fp32)"] == 4 * p // 8
    assert fsdp.parts["AdamW moments (fp32)"] == 8 * p // 8
    assert "DDP gradient buckets" not in fsdp.parts and "DDP gradient buckets" in ddp.parts
    block = 12 * 1600 * 1600 + 13 * 1600  # the four matrices, their biases, two LayerNorms
    root = p - 48 * block
    assert root == 50257 * 1600 + 1024 * 1600 + 2 * 1600  # wte (tied head), wpe, ln_f
    assert fsdp.parts["FSDP gathered weights and gradients"] == 4 * (2 * root + 3 * block)
    key = "activations (micro-batch 1 x 1024)"
    assert fsdp.parts[key] == ddp.parts[key]  # sharding does not change what a rank computes
    # gpt2-xl on 24 GB cards: never with DDP; with FSDP over 8 GPUs and checkpointing.
    l4 = plan.usable_bytes("L4")
    assert plan.largest_micro_batch(XL, 1024, True, l4, "ddp", 8) == 0
    assert plan.largest_micro_batch(XL, 1024, True, l4, "fsdp", 8) >= 8
    assert plan.largest_micro_batch(XL, 1024, True, l4, "fsdp", 1) == 0  # nothing to shard over
    with pytest.raises(Exception, match=r"job.strategy: 'zero' \(allowed: ddp, fsdp\)"):
        plan.memory_plan(XL, 1, 1024, True, strategy="zero")


def test_the_table_has_every_setting_and_marks_the_recipes(capsys) -> None:
    from medgpt.cli import main

    args = ["plan", "--config", "configs/tiny-cpu.yaml", "--set", "model.n_layer=48",
            "--set", "model.n_embd=1600", "--set", "model.n_head=25", "--set",
            "job.num_workers=8", "--set", "job.strategy=fsdp", "--set",
            "train.activation_checkpointing=true", "--gpu", "L4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("GiB"))
    assert header.split()[1:] == ["ddp", "ddp", "+", "ckpt", "fsdp", "fsdp", "+", "ckpt", "*"]
    rows = [line.split()[0] for line in out.splitlines()[4:10]]
    assert rows == ["weights", "gradients", "AdamW", "DDP", "FSDP", "activations"]
    assert "fits: micro-batch 8 x 128" in out


def _recipe(**over):
    from medgpt.config import Recipe

    raw = {"model": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
           "train": {"micro_batch_size": 4, "seq_len": 1024, "batch_tokens": 4096 * 8,
                     "data_dir": "data"},
           "job": {"num_workers": 8, "use_gpu": True}}  # fmt: skip
    for key, value in over.items():
        section, field = key.split(".")
        raw[section][field] = value
    return Recipe.from_dict(raw)


def test_train_refuses_a_recipe_its_smallest_gpu_cannot_hold(monkeypatch, capsys) -> None:
    from medgpt import launch
    from medgpt.errors import ConfigError

    # Ray's labels of a mixed cluster (a fake of ray.nodes' parsing, tested below for real).
    monkeypatch.setattr(launch, "gpu_types", lambda: {"A100-80G": "10.0.0.2", "L4": "10.0.0.3"})
    with pytest.raises(ConfigError, match=r"needs .* GiB per GPU with job.strategy ddp, L4 has"):
        launch.check_fit(_recipe())
    launch.check_fit(_recipe(**{"job.strategy": "fsdp", "train.activation_checkpointing": True}))
    monkeypatch.setattr(launch, "gpu_types", lambda: {"H100": "10.0.0.2", "T4": "10.0.0.4"})
    launch.check_fit(_recipe())  # checked on the H100s; the T4s are named as not checked
    assert "GPU memory not checked for T4" in capsys.readouterr().out
    launch.check_fit(_recipe(**{"job.use_gpu": False}))  # CPU runs: nothing to check


@pytest.mark.slow
def test_gpu_types_reads_the_real_cluster(ray_cluster, capsys) -> None:
    import ray

    from medgpt import launch

    ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
    assert launch.gpu_types() == {}  # the test cluster's raylets have no GPUs
    launch.check_fit(_recipe())
    assert "GPU memory not checked for unlabelled GPUs" in capsys.readouterr().out


def test_the_documented_table_is_what_plan_prints(capsys) -> None:
    from medgpt.cli import main
    from medgpt.testing import REPO

    assert main(["plan", "--table"]) == 0
    table = capsys.readouterr().out.strip()
    assert table == plan.preset_table()
    rows = [line for line in table.splitlines() if line.startswith("| gpt2")]
    assert len(rows) == 12  # four sizes on three cards
    xl_a10g = rows[9].split("|")[3:7]
    assert [int(c) for c in xl_a10g][:2] == [0, 0] and int(xl_a10g[3]) > 0  # fsdp makes it fit
    assert table in (REPO / "docs" / "cluster.md").read_text(), "docs/cluster.md: run plan --table"
    assert main(["plan", "--config", "configs/tiny-cpu.yaml"]) == 2
    assert "--gpu: required (or --table" in capsys.readouterr().err
