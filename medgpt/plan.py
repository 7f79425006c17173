"""Will a recipe fit on a GPU? Per-GPU training memory by part, from the model's shape alone.

Data-parallel training (DDP) keeps on every GPU: fp32 weights, their fp32 gradients, AdamW's two
fp32 moments, DDP's gradient buckets (a second gradient copy: medgpt does not use
``gradient_as_bucket_view``), and the activations autograd saves for backward. The activation
model counts what a GPT-2 block saves per token: 17 values of width ``n_embd`` (the two
LayerNorm inputs, the attention's input, q/k/v and output, the MLP's input, its 4x-wide hidden
state before and after GELU), of which the LayerNorm inputs stay fp32 under bf16 autocast and
the rest are bf16; plus the head's logits, their fp32 log-softmax and, in backward, their
gradient. With activation checkpointing a block keeps only its fp32 input, and one block at a
time is recomputed. tests/test_plan.py checks the activation figure against what autograd
really saves (fp32, CPU) within 20%.
"""

from __future__ import annotations

import dataclasses

from medgpt.config import ModelConfig
from medgpt.errors import ConfigError
from medgpt.model import count_params

# Memory as nvidia-smi reports it (MiB) for the GPUs the cluster files offer and their peers.
GPUS_MIB = {
    "A10G": 23028,
    "L4": 23034,
    "L40S": 46068,
    "A100-40GB": 40960,
    "A100-80GB": 81920,
    "H100-80GB": 81559,
}
# What the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation take
# before a tensor of ours: a fixed part and a share of the card.
RESERVED_MIB = 1536
RESERVED_SHARE = 0.05
GIB = 2**30

BLOCK_VALUES = 17  # per token per layer, in units of n_embd
BLOCK_FP32_VALUES = 2  # the LayerNorm inputs (the fp32 residual stream) under autocast


def usable_bytes(gpu: str) -> int:
    if gpu not in GPUS_MIB:
        raise ConfigError(f"--gpu: {gpu!r} (allowed: {', '.join(GPUS_MIB)})")
    mib = GPUS_MIB[gpu]
    return int((mib * (1 - RESERVED_SHARE) - RESERVED_MIB) * 2**20)


def block_bytes_per_token(config: ModelConfig, mixed: bool) -> int:
    """What one block saves for backward, per token (bf16 autocast when ``mixed``)."""
    if not mixed:
        return BLOCK_VALUES * config.n_embd * 4
    return (BLOCK_FP32_VALUES * 4 + (BLOCK_VALUES - BLOCK_FP32_VALUES) * 2) * config.n_embd


def activation_bytes(
    config: ModelConfig, micro_batch: int, seq_len: int, mixed: bool, checkpointing: bool
) -> int:
    """Activation memory of one micro-batch at its peak (end of forward / start of backward)."""
    tokens = micro_batch * seq_len
    block = block_bytes_per_token(config, mixed)
    # With checkpointing: every block's fp32 input kept, and one block recomputed at a time.
    layers = config.n_layer * config.n_embd * 4 + block if checkpointing else config.n_layer * block
    head_in = 2 * config.n_embd * 4  # ln_f's input and the head's input
    logit = 2 if mixed else 4
    # The logits, their fp32 log-softmax (cross-entropy runs in fp32), their gradient.
    head = config.vocab_size * (logit + 4 + logit)
    return tokens * (layers + head_in + head)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes by part for one setting."""

    params: int
    micro_batch: int
    checkpointing: bool
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def memory_plan(
    config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool, mixed: bool = True
) -> MemoryPlan:
    p = count_params(config, non_embedding=False)
    parts = {
        "weights (fp32)": 4 * p,
        "gradients (fp32)": 4 * p,
        "AdamW moments (fp32)": 8 * p,
        "DDP gradient buckets": 4 * p,
        f"activations (micro-batch {micro_batch} x {seq_len})": activation_bytes(
            config, micro_batch, seq_len, mixed, checkpointing
        ),
    }
    return MemoryPlan(p, micro_batch, checkpointing, parts)


def largest_micro_batch(
    config: ModelConfig, seq_len: int, checkpointing: bool, budget: int, limit: int = 4096
) -> int:
    """The largest micro-batch whose plan fits ``budget`` bytes (0: not even one sequence)."""
    best = 0
    lo, hi = 1, limit
    while lo <= hi:
        mid = (lo + hi) // 2
        if memory_plan(config, mid, seq_len, checkpointing).total <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def describe(config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool,
             gpu: str) -> tuple[str, bool]:  # fmt: skip
    """The planner's report and whether the recipe's own setting fits."""
    budget = usable_bytes(gpu)
    plans = {ck: memory_plan(config, micro_batch, seq_len, ck) for ck in (False, True)}
    mark = {ck: " *" if ck == checkpointing else "" for ck in (False, True)}
    lines = [
        f"model: {count_params(config, non_embedding=False) / 1e6:,.1f}M parameters "
        f"({config.n_layer} layers x {config.n_embd}); bf16 autocast, DDP; per GPU",
        f"{gpu}: {GPUS_MIB[gpu]:,} MiB, {budget / GIB:.1f} GiB usable "
        f"(less {RESERVED_MIB} MiB and {RESERVED_SHARE:.0%} for CUDA and the allocator)",
        "",
        f"{'part':<42}{'no recompute' + mark[False]:>16}{'act. checkpointing' + mark[True]:>22}",
    ]
    for name in plans[False].parts:
        a, b = plans[False].parts[name], plans[True].parts[name]
        lines.append(f"{name:<42}{a / GIB:>12.2f} GiB{b / GIB:>18.2f} GiB")
    lines.append(
        f"{'total':<42}{plans[False].total / GIB:>12.2f} GiB{plans[True].total / GIB:>18.2f} GiB"
    )
    lines.append(
        f"{'largest micro-batch that fits':<42}"
        f"{largest_micro_batch(config, seq_len, False, budget):>16}"
        f"{largest_micro_batch(config, seq_len, True, budget):>22}"
    )
    mine = plans[checkpointing]
    fits = mine.total <= budget
    lines += [
        "(* the recipe's train.activation_checkpointing)",
        "",
        f"fits: micro-batch {micro_batch} x {seq_len} uses {mine.total / GIB:.1f} of "
        f"{budget / GIB:.1f} GiB"
        if fits
        else f"does not fit: micro-batch {micro_batch} x {seq_len} needs {mine.total / GIB:.1f} "
        f"GiB, {budget / GIB:.1f} usable",
    ]
    return "\n".join(lines), fits
