"""The GPT training loop that Ray Train runs on every worker, and what it needs.

One optimizer step = ``grad_accum_steps`` micro-batches per worker on every worker, so the
global batch is ``train.batch_tokens`` tokens whatever the number of workers. With
``job.strategy: ddp`` gradients are all-reduced once per step (DDP's ``no_sync`` on the other
micro-steps); with ``fsdp`` the model is sharded over the workers (medgpt.sharding) and the
checkpoints are gathered into the same format. Rank 0 writes checkpoints and MLflow records;
every rank calls ``ray.train.report`` at the same steps, because it is a barrier.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from medgpt.checkpoint import (
    is_checkpoint,
    load_model,
    load_train_state,
    read_config,
    save_checkpoint,
)
from medgpt.config import ModelConfig, Recipe, TrainConfig
from medgpt.data.loader import WindowLoader, read_manifest
from medgpt.errors import CheckpointError, ConfigError, DataError
from medgpt.hf import load_hf_gpt2
from medgpt.model import GPT, flops_per_token
from medgpt.tokenizer import N_VOCAB, TOKENIZER_NAME


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
    embedding/head matrix included, as GPT-2 recipes do). ``fused`` defaults to on: torch has
    fused AdamW kernels for CUDA and CPU, and on this CPU the fused step is ~5x faster than
    the default per-tensor loop.
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def check_dataset(data_dir: str | Path, model_config: ModelConfig) -> dict[str, Any]:
    """The dataset's manifest, after checking it fits the model (tokenizer, vocabulary)."""
    manifest = read_manifest(data_dir)
    tok = manifest.get("tokenizer", {})
    if tok.get("name") != TOKENIZER_NAME or tok.get("n_vocab", N_VOCAB) > model_config.vocab_size:
        raise DataError(
            f"{data_dir}: tokenized with {tok.get('name')!r} ({tok.get('n_vocab')} ids); the "
            f"model expects {TOKENIZER_NAME!r} with at most {model_config.vocab_size} ids — "
            "prepare the data again with this medgpt"
        )
    return manifest


def resolve_model_config(recipe: Recipe) -> ModelConfig:
    """The shape the run trains: the recipe's, or that of the weights it starts from."""
    src = recipe.train.init_from
    if src == "scratch":
        return recipe.model
    if is_checkpoint(src):
        config, _ = read_config(src)
    else:
        config = build_model(recipe).config
    return ModelConfig(**{**config.to_dict(), "dropout": recipe.model.dropout})


def build_model(recipe: Recipe) -> GPT:
    """A fresh model per ``train.init_from`` (scratch / our checkpoint / HF GPT-2)."""
    src = recipe.train.init_from
    if src == "scratch":
        return GPT(recipe.model)
    if is_checkpoint(src):
        return load_model(src, dropout=recipe.model.dropout)
    return load_hf_gpt2(src, dropout=recipe.model.dropout)


# Dense bf16 tensor-core peaks (NVIDIA's datasheets), most specific pattern first: matching by
# substring made "L40S" and "L40" read as "L4" (3x and 1.5x too high MFU) and gave a PCIe H100
# the SXM figure.
GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b", 989e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10G?\b", 125e12),  # A10's figure; AWS's A10G is the same chip at lower clocks
)
UNKNOWN_GPU_PEAK = 100e12


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of the GPU ``torch.cuda.get_device_name`` calls ``name``; None when
    the table does not know it."""
    import re

    for pattern, flops in GPU_PEAK_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


def compile_problem() -> str | None:
    """Why torch.compile's GPU backend cannot build on this machine, or None. Triton compiles a
    small C launcher at the first step: it needs a C compiler and the Python headers, which a
    bare cloud image (python3-venv only) lacks."""
    import os
    import shutil
    import sysconfig

    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"the Python headers are missing ({header}; e.g. apt-get install python3-dev)"
    compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    if not any(c and shutil.which(c) for c in compilers):
        return "no C compiler on PATH (cc, gcc, clang or $CC; e.g. apt-get install build-essential)"
    return None


def use_compile(setting: bool | str, problem: str | None, is_main: bool) -> bool:
    """Whether to torch.compile, given ``train.compile`` and :func:`compile_problem`'s answer:
    without the build tools, ``true`` trains eager after one warning (from rank 0) and
    ``"required"`` is a ConfigError."""
    if not setting:
        return False
    if problem is None:
        return True
    if setting == "required":
        raise ConfigError(
            f"train.compile: required, but torch.compile cannot build here: {problem}"
        )
    if is_main:
        print(
            f"medgpt: warning: torch.compile is off for this run: {problem}; training runs eager "
            "(train.compile: required fails instead)",
            flush=True,
        )
    return False


def measured_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU: a table for known GPUs (bf16 dense), measured on a CPU."""
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        return UNKNOWN_GPU_PEAK if peak is None else peak
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    reps, t0 = 8, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@dataclass
class _Ctx:
    """What the loop needs to know about where it runs."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _all_reduce_mean(values: list[float], ctx: _Ctx) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1 and dist.is_initialized():
        dist.all_reduce(t)
        t /= ctx.world
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader: WindowLoader, batches: int, ctx: _Ctx, autocast) -> float:
    """Mean validation loss over the same windows at every evaluation.

    ``batches`` micro-batches in all, split over the ranks: the loader deals window i to rank
    i % W, so the evaluated windows (and thus val_loss) do not depend on the worker count.
    """
    batches = max(1, batches // ctx.world)
    was_training = model.training
    model.eval()
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch": 0})
    total = 0.0
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x.to(ctx.device), y.to(ctx.device))
        total += float(loss)
    model.train(was_training)
    return _all_reduce_mean([total / batches], ctx)[0]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` saved. The checkpoint holds the generators of every GPU
    rank 0 could see; a worker that sees fewer (a resume on other nodes, or Ray showing each
    worker its own GPU) restores those it has, and one that sees more keeps the rest as seeded."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, gen in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen, index)


class _Tracker:
    """MLflow logging from rank 0 (a no-op elsewhere or when no run id was given), through
    tracking.RunLogger: a tracking server that goes away never stops or fails training."""

    # At a checkpoint the records so far are given this long to reach the server; at the end of
    # the run, FINAL_FLUSH_S. Past that training goes on and the logger keeps trying.
    CHECKPOINT_FLUSH_S = 10.0
    FINAL_FLUSH_S = 60.0

    def __init__(self, tracking: dict[str, Any] | None, ctx: _Ctx) -> None:
        self.logger = None
        self.run_id = None
        if ctx.is_main and tracking and tracking.get("run_id"):
            from medgpt.tracking import RunLogger

            self.run_id = tracking["run_id"]
            self.logger = RunLogger(tracking["tracking_uri"], self.run_id)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.metrics(values, step)

    def flush(self) -> None:
        if self.logger is not None:
            self.logger.flush(self.CHECKPOINT_FLUSH_S)

    def text(self, text: str, path: str) -> None:
        if self.logger is not None:
            self.logger.text(text, path)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close(self.FINAL_FLUSH_S)
            self.logger = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker; ``loop_config`` = {"recipe": dict, "tracking": dict}."""
    import ray.train
    import ray.train.torch

    recipe = Recipe.from_dict(loop_config["recipe"])
    tc = recipe.train
    tctx = ray.train.get_context()
    ctx = _Ctx(tctx.get_world_rank(), tctx.get_world_size(), ray.train.torch.get_device())
    if ctx.device.type == "cpu":
        # Ray starts workers with OMP_NUM_THREADS=1; use the CPUs the worker reserved.
        torch.set_num_threads(tc.threads_per_worker or max(1, int(recipe.job.cpus_per_worker)))
    for _ in run_loop(
        recipe, ctx, loop_config.get("tracking"), ray.train.get_checkpoint(), _report
    ):
        pass


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
    import pyarrow.fs
    import ray.train

    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    extra: dict[str, Any] = {}
    store = ray.train.get_context().get_storage()
    if not isinstance(store.storage_filesystem, pyarrow.fs.LocalFileSystem):
        extra["checkpoint_upload_fn"] = _checked_upload
    try:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=f"step-{step:06d}",
            **extra,
        )
    finally:
        shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)


def _checked_upload(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's checkpoint upload for object storage, with every write checked and retried.

    Ray's own copy loses upload errors (see medgpt.storage) and would register a checkpoint of
    missing files. Here a failed attempt is deleted and tried again with growing delays; after
    the last one the report fails with a StorageError, Ray has registered nothing, and the
    previous checkpoint stays the one a restart resumes from."""
    import ray.train

    from medgpt import storage

    store = ray.train.get_context().get_storage()
    # Uploads go through a filesystem like Ray's (made from the storage URI and the environment:
    # launch passes no storage_filesystem) but with bounded memory (storage.streaming); the
    # checkpoint is reported on Ray's own, which Ray checks it against.
    fs = storage.streaming(store.storage_filesystem)
    dest = store.build_checkpoint_path_from_name(dir_name)
    uri = f"{fs.type_name}://{dest}"

    def attempt() -> None:
        with contextlib.suppress(OSError):  # FileNotFoundError too: nothing to delete
            fs.delete_dir(dest)  # what an earlier, failed attempt left
        storage.upload_to(fs, dest, checkpoint.path, uri)

    def warn(n: int, e: BaseException, delay: float) -> None:
        print(f"medgpt: checkpoint upload {n} failed, retrying in {delay:.0f} s: {e}", flush=True)

    storage.with_retries(attempt, f"checkpoint {dir_name} to {uri}", on_retry=warn)
    return ray.train.Checkpoint(path=dest, filesystem=store.storage_filesystem)


Reporter = Callable[[dict[str, Any], "Path | None", int], None]


def run_loop(
    recipe: Recipe,
    ctx: _Ctx,
    tracking: dict[str, Any] | None,
    checkpoint: Any,
    report: Reporter,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Iterator[dict[str, Any]]:
    """The loop itself, independent of Ray Train: ``report`` receives metrics and the
    checkpoint folder rank 0 wrote (it owns the folder's parent and must delete it);
    ``checkpoint`` is anything with ``as_directory()``; ``wrap`` turns the model into its
    DDP form when ``ctx.world > 1`` (default: Ray Train's ``prepare_model``; plain DDP for
    torchrun; unused with ``job.strategy: fsdp``, which shards over the default process group).
    Yields each reported metrics dict.
    """

    tc = recipe.train
    torch.manual_seed(tc.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(recipe).to(ctx.device)
    model.activation_checkpointing = tc.activation_checkpointing
    accum = tc.grad_accum_steps(ctx.world)
    train_loader = WindowLoader(
        tc.data_dir, "train", tc.seq_len, tc.micro_batch_size, ctx.rank, ctx.world, tc.seed
    )
    val_loader = WindowLoader(
        tc.data_dir, "val", tc.seq_len, tc.micro_batch_size, ctx.rank, ctx.world, tc.seed
    )
    manifest_hash = train_loader.shards.manifest["content_hash"]
    step, tokens_seen, best_val = 0, 0, float("inf")
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored = load_model(d, dropout=recipe.model.dropout)
            if restored.config != model.config:
                raise CheckpointError(f"{d}: model shape differs from this run's recipe")
            model.load_state_dict(restored.state_dict())
            # The restored model's tensors were copied into ours: keeping them would hold a
            # second copy in host memory for the whole run (~6 GB for gpt2-xl).
            del restored
            state = load_train_state(d)
            resumed_from = d
    use_cuda = ctx.device.type == "cuda"
    if use_cuda:
        # fp32 matmuls outside autocast (the optimizer step, eval of fp32 parts) on tensor
        # cores; Ampere and later otherwise run them at full fp32 precision, several times slower.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sharded = ctx.world > 1 and recipe.job.strategy == "fsdp"
    if sharded:
        from medgpt import sharding

        # Sharded before compiling, as FSDP2 asks; the optimizer is built over the shards.
        model = sharding.shard(model, ctx.device)
    if use_compile(tc.compile, compile_problem(), ctx.is_main):
        model = torch.compile(model)
    raw: GPT = model if not hasattr(model, "_orig_mod") else model._orig_mod  # type: ignore[assignment]
    if ctx.world > 1 and wrap is None and not sharded:
        import ray.train.torch

        wrap = ray.train.torch.prepare_model
    ddp = wrap(model) if ctx.world > 1 and wrap is not None and not sharded else model
    optimizer = configure_optimizer(
        raw,
        tc.lr,
        tc.weight_decay,
        (tc.beta1, tc.beta2),
        fused=ctx.device.type in ("cpu", "cuda"),
    )
    if state is not None:
        try:
            if sharded:
                sharding.load_optimizer_state(raw, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
            train_loader.load_state_dict(state["loader"])
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            best_val = float(state.get("best_val_loss", best_val))
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{resumed_from}: training state does not fit this run ({e})"
            ) from None
        # On a GPU the optimizer state was copied onto the device (and with fsdp only this
        # rank's shard kept): the host copy would otherwise stay for the whole run (~13 GB of
        # AdamW state for gpt2-xl).
        state = None

    def autocast() -> contextlib.AbstractContextManager[Any]:
        # bf16 only on CUDA: these CPUs run bf16 matmuls far slower than fp32.
        if use_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    tracker = _Tracker(tracking, ctx)
    fpt = flops_per_token(raw.config, tc.seq_len)
    peak = measured_peak_flops(ctx.device) * ctx.world
    tokens_per_step = tc.batch_tokens
    ddp.train()
    while step < tc.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(accum):
            x, y = train_loader.next_batch()
            if use_cuda:  # a pinned source makes the copy asynchronous, as non_blocking asks
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            # DDP: skip the gradient all-reduce on all but the last micro-step. FSDP
            # reduce-scatters every micro-step: holding whole gradients until the last one
            # would cost the memory that sharding saves.
            skip = ctx.world > 1 and not sharded and micro < accum - 1
            sync = ddp.no_sync() if skip else contextlib.nullcontext()
            with sync:
                with autocast():  # the forward only: backward runs in the forward's dtypes
                    _, loss = ddp(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()  # stays on the device: no sync per micro-step
        # With clipping off, an infinite threshold still measures the norm for the metrics.
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += tokens_per_step
        last = step == tc.max_steps
        do_ckpt = step % tc.checkpoint_every == 0 or last
        do_eval = step % tc.eval_every == 0 or do_ckpt
        (train_loss,) = _all_reduce_mean([float(loss_sum) / accum], ctx)
        tps = tokens_per_step / dt
        metrics: dict[str, Any] = {
            "step": step,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": fpt * tps / peak,
            "step_time_ms": dt * 1000,
            "tokens_seen": tokens_seen,
        }
        # Every step goes to MLflow (asynchronously, from rank 0); Ray's report is a barrier
        # across workers, so it only happens every log_every steps and at eval/checkpoints.
        if not (do_eval or step % tc.log_every == 0 or step == 1):
            tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            continue
        sampling = do_eval and bool(tc.sample_prompts and tc.sample_tokens)
        # With fsdp no rank holds the whole model: checkpoints and samples need it gathered (a
        # collective: every rank takes part, rank 0 receives it on its CPU). Before evaluating:
        # an FSDP root's weights stay unsharded after a forward without backward, and the
        # optimizer state could then no longer be matched to them.
        weights = sharding.full_model_state(raw) if sharded and (do_ckpt or sampling) else None
        optimizer_state = (
            sharding.full_optimizer_state(raw, optimizer) if sharded and do_ckpt else None
        )
        if do_eval:
            val = evaluate(model, val_loader, tc.eval_batches, ctx, autocast)
            best_val = min(best_val, val)
            metrics.update(val_loss=val, val_perplexity=math.exp(min(val, 50.0)))
            if ctx.is_main and sampling:
                tracker.text(_samples(raw, weights, tc), f"samples/step-{step:06d}.txt")
        tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        ckpt_dir = None
        if do_ckpt:
            tracker.flush()  # the metrics up to a checkpoint are on record before it exists
        if do_ckpt and ctx.is_main:
            meta = {
                "step": step,
                "tokens_seen": tokens_seen,
                "val_loss": metrics["val_loss"],
                "train_loss": train_loss,
                "data_manifest_hash": manifest_hash,
                "data_dir": str(tc.data_dir),
                "recipe": recipe.to_dict(),
                "mlflow_run_id": tracker.run_id,
            }
            train_state = {
                "optimizer": optimizer_state if sharded else optimizer.state_dict(),
                "loader": train_loader.state_dict(),
                "step": step,
                "tokens_seen": tokens_seen,
                "best_val_loss": best_val,
                "rng": _rng_state(),
            }
            ckpt_dir = save_checkpoint(
                Path(tempfile.mkdtemp(prefix="medgpt-ckpt-")) / "checkpoint",
                raw,
                meta,
                train_state,
                weights=weights,
            )
        weights = optimizer_state = None  # rank 0's gathered copies, released before training
        report(metrics, ckpt_dir, step)
        yield metrics
    tracker.close()


def _samples(model: GPT, weights: dict[str, torch.Tensor] | None, tc: TrainConfig) -> str:
    """Completions of ``tc.sample_prompts`` from ``model``, or (fsdp) from a CPU copy made of
    the gathered ``weights``: a sharded model runs only with every rank taking part."""
    from medgpt.generation import complete

    if weights is not None:
        copy = GPT(model.config)
        copy.load_state_dict(weights)
        model = copy
    return "\n".join(
        f"### {p}\n{complete(model, p, tc.sample_tokens, seed=i)}\n"
        for i, p in enumerate(tc.sample_prompts)
    )


def discard_report(metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
    """A reporter for running the loop outside Ray: drops checkpoints after they are written."""
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)


def local_context() -> _Ctx:
    """Rank 0 of 1 on the best local device (for running the loop outside Ray)."""
    return _Ctx(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
