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
        "lower it, or set train.activation_checkpointing: true"
    )
