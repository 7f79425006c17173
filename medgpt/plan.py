"""Will a recipe fit on a GPU? Per-GPU training memory by part, from the model's shape alone.

Data-parallel training (DDP) keeps on every GPU: fp32 weights, their fp32 gradients, AdamW's two
fp32 moments, DDP's gradient buckets (a second gradient copy: medgpt does not use
``gradient_as_bucket_view``), and the activations autograd saves for backward. Sharded training
(``job.strategy: fsdp``, medgpt.sharding) keeps 1/W of the weights, gradients and moments over W
workers, plus what it gathers: the root unit (embeddings, tied head, last LayerNorm) and two
blocks' weights at a time (the one running and the one prefetched), and the whole gradients of
the root and of one block before they are reduce-scattered.

The activation model counts what a GPT-2 block saves per token: 17 values of width ``n_embd``
(the two LayerNorm inputs, the attention's input, q/k/v and output, the MLP's input, its 4x-wide
hidden state before and after GELU), of which the LayerNorm inputs stay fp32 under bf16 autocast
and the rest are bf16; plus the head's logits, their fp32 log-softmax and, in backward, their
gradient. With activation checkpointing a block keeps only its fp32 input, and one block at a
time is recomputed. tests/test_plan.py checks the activation figure against what autograd
really saves (fp32, CPU) within 20%.
"""

from __future__ import annotations

import dataclasses

from medgpt.config import STRATEGIES, ModelConfig, Recipe
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
    "H200-141GB": 143771,
}
# Ray's accelerator_type resource names (ray.util.accelerators) for the cards above.
RAY_ACCELERATOR_TYPES = {
    "A10G": "A10G",
    "L4": "L4",
    "L40S": "L40S",
    "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB",
    "H100": "H100-80GB",
    "H200": "H200-141GB",
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
    strategy: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _unit_params(config: ModelConfig) -> tuple[int, int]:
    """Parameters of one block and of the root unit (everything outside the blocks)."""

    def with_layers(n: int) -> int:
        return count_params(ModelConfig(**{**config.__dict__, "n_layer": n}), False)

    block = with_layers(2) - with_layers(1)
    return block, with_layers(config.n_layer) - config.n_layer * block


def memory_plan(
    config: ModelConfig,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    mixed: bool = True,
    strategy: str = "ddp",
    workers: int = 1,
) -> MemoryPlan:
    if strategy not in STRATEGIES:
        raise ConfigError(f"job.strategy: {strategy!r} (allowed: {', '.join(STRATEGIES)})")
    p = count_params(config, non_embedding=False)
    shard = 1 if strategy == "ddp" else max(1, workers)
    parts = {
        "weights (fp32)": 4 * p // shard,
        "gradients (fp32)": 4 * p // shard,
        "AdamW moments (fp32)": 8 * p // shard,
    }
    if strategy == "ddp":
        parts["DDP gradient buckets"] = 4 * p
    else:
        block, root = _unit_params(config)
        parts["FSDP gathered weights and gradients"] = 4 * (root + 2 * block) + 4 * (root + block)
    parts[f"activations (micro-batch {micro_batch} x {seq_len})"] = activation_bytes(
        config, micro_batch, seq_len, mixed, checkpointing
    )
    return MemoryPlan(p, micro_batch, checkpointing, strategy, parts)


def largest_micro_batch(
    config: ModelConfig,
    seq_len: int,
    checkpointing: bool,
    budget: int,
    strategy: str = "ddp",
    workers: int = 1,
    limit: int = 4096,
) -> int:
    """The largest micro-batch whose plan fits ``budget`` bytes (0: not even one sequence)."""
    best = 0
    lo, hi = 1, limit
    while lo <= hi:
        mid = (lo + hi) // 2
        if (
            memory_plan(config, mid, seq_len, checkpointing, True, strategy, workers).total
            <= budget
        ):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


SETTINGS = [(s, ck) for s in STRATEGIES for ck in (False, True)]


def _heading(strategy: str, checkpointing: bool) -> str:
    return f"{strategy}{' + ckpt' if checkpointing else ''}"


def describe(config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool,
             gpu: str, strategy: str = "ddp", workers: int = 1) -> tuple[str, bool]:  # fmt: skip
    """The planner's report (every strategy, with and without activation checkpointing) and
    whether the recipe's own setting fits."""
    budget = usable_bytes(gpu)
    plans = {
        (st, ck): memory_plan(config, micro_batch, seq_len, ck, True, st, workers)
        for st, ck in SETTINGS
    }
    mine = (strategy, checkpointing)
    width = 16
    head = "".join(f"{_heading(*key) + (' *' if key == mine else ''):>{width}}" for key in SETTINGS)
    lines = [
        f"model: {count_params(config, non_embedding=False) / 1e6:,.1f}M parameters "
        f"({config.n_layer} layers x {config.n_embd}); bf16 autocast; per GPU, {workers} "
        f"worker(s) (fsdp shards over them)",
        f"{gpu}: {GPUS_MIB[gpu]:,} MiB, {budget / GIB:.1f} GiB usable "
        f"(less {RESERVED_MIB} MiB and {RESERVED_SHARE:.0%} for CUDA and the allocator)",
        "",
        f"{'GiB':<40}{head}",
    ]
    names = list(dict.fromkeys(n for plan in plans.values() for n in plan.parts))
    names.sort(key=lambda n: n.startswith("activations"))  # the parts that scale, last
    for name in names:
        cells = "".join(
            f"{plans[key].parts[name] / GIB:>{width}.2f}" if name in plans[key].parts
            else f"{'-':>{width}}"
            for key in SETTINGS
        )  # fmt: skip
        lines.append(f"{name:<40}{cells}")
    lines.append(
        f"{'total':<40}" + "".join(f"{plans[k].total / GIB:>{width}.2f}" for k in SETTINGS)
    )
    lines.append(
        f"{'largest micro-batch that fits':<40}"
        + "".join(
            f"{largest_micro_batch(config, seq_len, ck, budget, st, workers):>{width}}"
            for st, ck in SETTINGS
        )
    )
    total = plans[mine].total
    fits = total <= budget
    lines += [
        "(* the recipe's job.strategy and train.activation_checkpointing)",
        "",
        f"fits: micro-batch {micro_batch} x {seq_len} uses {total / GIB:.1f} of "
        f"{budget / GIB:.1f} GiB"
        if fits
        else f"does not fit: micro-batch {micro_batch} x {seq_len} needs {total / GIB:.1f} "
        f"GiB, {budget / GIB:.1f} usable",
    ]
    return "\n".join(lines), fits


def fit_advice(recipe: Recipe) -> str:
    """What would make a recipe that does not fit fit, in the recipe's own keys."""
    ways = ["lower train.micro_batch_size (train.batch_tokens stays: more accumulation)"]
    if not recipe.train.activation_checkpointing:
        ways.append("set train.activation_checkpointing: true")
    if recipe.job.strategy == "ddp":
        ways.append("set job.strategy: fsdp (with more job.num_workers to shard over)")
    return ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def fit_problem(recipe: Recipe, config: ModelConfig, gpu: str) -> str | None:
    """Why ``recipe`` (training the shape ``config``) cannot fit on ``gpu``, or None."""
    tc, job = recipe.train, recipe.job
    need = memory_plan(
        config, tc.micro_batch_size, tc.seq_len, tc.activation_checkpointing, True,
        job.strategy, job.num_workers,
    ).total  # fmt: skip
    budget = usable_bytes(gpu)
    if need <= budget:
        return None
    return (
        f"train.micro_batch_size: {tc.micro_batch_size} x {tc.seq_len} needs {need / GIB:.1f} GiB "
        f"per GPU with job.strategy {job.strategy}, {gpu} has {budget / GIB:.1f} usable: "
        f"{fit_advice(recipe)}; `medgpt plan --config RECIPE --gpu {gpu}` shows the parts"
    )


TABLE_GPUS = ("A10G", "A100-40GB", "A100-80GB")  # 24, 40 and 80 GB cards


def preset_table(workers: int = 8, seq_len: int = 1024) -> str:
    """The largest micro-batch of each GPT-2 size on 24/40/80 GB cards, every setting (a
    Markdown table, as docs/cluster.md has it; 0 = does not fit)."""

    lines = [
        f"Largest micro-batch of {seq_len} tokens per GPU (0: does not fit); fsdp over "
        f"{workers} GPUs; bf16 autocast, AdamW.",
        "",
        "| model | GPU | " + " | ".join(_heading(*k) for k in SETTINGS) + " |",
        "|---|---|" + "---:|" * len(SETTINGS),
    ]
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        config = ModelConfig.preset(name, block_size=seq_len)
        size = f"{name} ({count_params(config, non_embedding=False) / 1e6:,.0f}M)"
        for gpu in TABLE_GPUS:
            budget = usable_bytes(gpu)
            cells = [
                str(largest_micro_batch(config, seq_len, ck, budget, st, workers))
                for st, ck in SETTINGS
            ]
            lines.append(f"| {size} | {gpu} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
