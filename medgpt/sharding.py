"""Sharded data parallelism (``job.strategy: fsdp``) with FSDP2's ``fully_shard``.

Each transformer block is one FSDP unit and the root holds the rest (the embeddings, the head
tied to them, the last LayerNorm), so a worker keeps 1/W of the weights, gradients and AdamW
state and gathers one block's weights at a time. Checkpoints stay in the format DDP runs write:
full fp32 weights, and the optimizer state in ``torch.optim``'s own layout (parameters by
index), gathered to rank 0. So an FSDP checkpoint resumes under DDP and the other way round,
and evaluation, the registry and HF export read it as any other.

Every function here that gathers is a collective: all ranks call it, rank 0 gets the result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from medgpt.model import GPT

__all__ = ["full_model_state", "full_optimizer_state", "load_optimizer_state", "shard"]


def shard(model: GPT, device: torch.device) -> GPT:
    """Shard ``model`` in place over the default process group (its class becomes FSDP's
    subclass of GPT); build the optimizer after this, over the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 ({} on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters in the order ``state_dict()`` numbers them."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0 ({} elsewhere), keyed as ``optimizer.state_dict()``
    keys it on an unsharded model (torch's distributed state dicts key by parameter name)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a checkpoint's optimizer state (``torch.optim`` layout, as DDP and
    :func:`full_optimizer_state` write it) into the sharded optimizer; every rank passes the
    whole state and keeps its shard. Raises ValueError when it does not fit the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names(model, optimizer)
    groups = state["param_groups"]
    saved = sum(len(g["params"]) for g in groups)
    if saved != len(names) or len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the optimizer state has {saved} parameters in {len(groups)} groups, this model "
            f"{len(names)} in {len(optimizer.param_groups)}"
        )
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )
