"""What the training loop needs. (The Ray Train loop itself lands with the training issue.)"""

from __future__ import annotations

import torch
import torch.nn as nn


def configure_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Biases, LayerNorm gains and the position embedding table are vectors/lookups where decay
    only hurts; every tensor with two or more dims except ``wpe`` is decayed (the tied
    embedding/head matrix included, as GPT-2 recipes do). ``fused`` defaults to on wherever
    torch has a fused kernel for the parameters' device (CUDA and CPU in torch >= 2.4).
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and not name.endswith("wpe.weight") else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
