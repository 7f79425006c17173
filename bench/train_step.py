"""Training-step throughput of medgpt's GPT against Hugging Face's GPT2LMHeadModel.

One step is forward + backward + optimizer step on random token ids. Both models are built from
the same shape (layers, heads, width, positions, GPT-2's 50257-token vocabulary, dropout 0,
tanh-GELU) and measured in the same run, each in a fresh spawned process so that its peak
resident memory is its own and neither model's allocations (allocator caches, thread pools)
colour the other's timing. The processes never compute at the same time: the parent hands out
one step to each in turn, so load from other programs hits all models alike.

Rows per size:

* ``medgpt GPT``                   our model, ``configure_optimizer`` (fused AdamW, decay groups)
* ``HF GPT2LMHeadModel``           same optimizer: the headline ratio compares model code only
* ``HF + torch.optim.AdamW defaults``  ``AdamW(model.parameters(), lr)``, what HF Trainer's
  ``adamw_torch`` gives, to show how much the optimizer adds

MFU divides achieved FLOP/s (``medgpt.model.flops_per_token`` × tokens/s, the same count for
both models) by a peak this script measures on the machine with a large matmul, or by
``--peak-tflops`` where the vendor figure is wanted (GPUs).

    python bench/train_step.py                       # sizes small,gpt2 on the CPU, fp32
    python bench/train_step.py --sizes gpt2 --steps 10 --json out.json
    python bench/train_step.py --device cuda --dtype bf16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from medgpt.config import ModelConfig
from medgpt.model import flops_per_token
from medgpt.testing import bench as harness

IMPLS: dict[str, str] = {
    "ours": "medgpt GPT",
    "hf": "HF GPT2LMHeadModel",
    "hf_adamw": "HF + torch.optim.AdamW defaults",
}
LR = 6e-4
SEED = 1234
# A shape small enough for a quick look on any CPU, big enough that matmuls dominate.
SMALL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}


@dataclass
class Result:
    size: str
    impl: str
    label: str
    n_params: int
    step_ms_median: float
    step_ms_all: list[float]
    tokens_per_s: float
    flops_per_token: float
    peak_rss_mib: float
    base_rss_mib: float  # resident memory after imports (torch, medgpt[, transformers])
    loss_first: float
    loss_last: float
    threads: int
    mfu: float = float("nan")  # set by the parent once the peak is known


def model_config(size: str) -> ModelConfig:
    """``small`` is this benchmark's own shape; any other name is a medgpt preset."""
    if size == "small":
        return ModelConfig(**SMALL)
    return ModelConfig.preset(size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> torch.autocast:
    # fp32 keeps autocast disabled, so both models run exactly as written.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def measure_peak_flops(device_name: str, dtype: str, threads: int | None, n: int = 2048) -> float:
    """Best sustained FLOP/s of an ``n``×``n`` matmul in the training dtype: the MFU denominator.

    A measured peak rather than a datasheet one, because a CPU's depends on its clock, its SIMD
    width and the thread count; that is also why it runs with the benchmark's own thread count.
    """
    harness.set_threads(threads)
    device = torch.device(device_name)
    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(device, mm_dtype)
    b = torch.randn(n, n, generator=gen).to(device, mm_dtype)
    reps = 50 if device.type == "cuda" else 3
    best = float("inf")
    for trial in range(6):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        dt = time.perf_counter() - t0
        if trial > 0:  # the first pass pays for thread start-up and packing buffers
            best = min(best, dt)
    return 2 * n**3 * reps / best


def _build(impl: str, config: ModelConfig) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """The model and a ``loss(tokens)`` closure in the way each library is meant to be called."""
    if impl == "ours":
        from medgpt.model import GPT

        ours = GPT(config)

        def ours_loss(tokens: torch.Tensor) -> torch.Tensor:
            # Our forward takes already shifted targets.
            _, loss = ours(tokens[:, :-1], tokens[:, 1:])
            assert loss is not None
            return loss

        return ours, ours_loss

    # Imported only here so that the medgpt worker's resident memory does not include it.
    from transformers import GPT2Config, GPT2LMHeadModel

    from medgpt.hf import hf_config_dict

    # The config medgpt exports the same shape with (tanh GELU, tied head, our dropout); then
    # the same attention kernel as ours (F.scaled_dot_product_attention), and no KV cache: a
    # training step has no use for one, and building it is not model compute.
    hf_config = GPT2Config.from_dict(
        {**hf_config_dict(config), "use_cache": False}, attn_implementation="sdpa"
    )
    hf = GPT2LMHeadModel(hf_config)

    def hf_loss(tokens: torch.Tensor) -> torch.Tensor:
        # HF shifts labels inside the model, so input and labels are the same T tokens.
        return hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss

    return hf, hf_loss


def _worker_main(
    conn: Connection,
    impl: str,
    size: str,
    batch_size: int,
    seq_len: int,
    threads: int | None,
    device_name: str,
    dtype: str,
) -> None:
    """Build one model and its optimizer, then run one timed training step per "step" request."""
    with harness.reporting_errors(conn):
        from medgpt.training import configure_optimizer

        n_threads = harness.set_threads(threads)
        device = torch.device(device_name)
        config = model_config(size)
        if impl != "ours":
            # Imported before the baseline reading, so the baseline holds each library's import
            # cost and peak minus baseline is what the model and its training state take.
            import transformers  # noqa: F401
        base_rss = harness.rss_now_mib()

        torch.manual_seed(SEED)
        model, loss_fn = _build(impl, config)
        model.to(device).train()
        if impl == "hf_adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        else:
            optimizer = configure_optimizer(model, lr=LR)
        # The same random tokens for every model: T inputs plus one for ours' shifted targets.
        gen = torch.Generator().manual_seed(SEED)
        tokens = torch.randint(
            config.vocab_size, (batch_size, seq_len + 1), generator=gen, dtype=torch.long
        ).to(device)
        conn.send(("ready", None))

        while conn.recv() == "step":
            _sync(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = loss_fn(tokens)
            loss.backward()
            optimizer.step()
            _sync(device)
            dt = time.perf_counter() - t0
            conn.send(("step", (dt, loss.item())))  # .item() after the clock: it syncs GPUs

        conn.send(
            (
                "done",
                {
                    # Tied tensors are yielded once by parameters(), so this is the real count.
                    "n_params": sum(p.numel() for p in model.parameters()),
                    "peak_rss_mib": harness.peak_rss_mib(),
                    "base_rss_mib": base_rss,
                    "threads": n_threads,
                },
            )
        )


def measure_size(size: str, args: argparse.Namespace) -> list[Result]:
    """Time every model of ``args.impl_list`` at one size, interleaved step by step.

    Each model lives in its own process, but only one process computes at a time: the parent
    hands out one step to each in turn (rotating who goes first). A burst of load from other
    programs on the machine then slows neighbouring steps of all models alike instead of all
    the steps of whichever model happened to be running, which matters on small shared CPUs.
    """
    config = model_config(size)
    worker_args = (size, args.batch_size, args.seq_len, args.threads, args.device, args.dtype)
    workers = [harness.Worker(IMPLS[impl], _worker_main, impl, *worker_args)
               for impl in args.impl_list]  # fmt: skip
    try:
        for w in workers:
            w.call()  # wait for "ready"
        times: dict[str, list[float]] = {impl: [] for impl in args.impl_list}
        losses: dict[str, list[float]] = {impl: [] for impl in args.impl_list}
        for step in range(args.warmup + args.steps):
            print(f"  {size}: step {step + 1}/{args.warmup + args.steps}", file=sys.stderr)
            for impl, w in harness.in_turn(list(zip(args.impl_list, workers, strict=True)), step):
                dt, loss = w.call("step")
                losses[impl].append(loss)
                if step >= args.warmup:
                    times[impl].append(dt)
        stats = {impl: w.call("done") for impl, w in zip(args.impl_list, workers, strict=True)}
    finally:
        for w in workers:
            w.close()

    results = []
    for impl in args.impl_list:
        median = statistics.median(times[impl])
        results.append(
            Result(
                size=size,
                impl=impl,
                label=IMPLS[impl],
                n_params=stats[impl]["n_params"],
                step_ms_median=median * 1e3,
                step_ms_all=[t * 1e3 for t in times[impl]],
                tokens_per_s=args.batch_size * args.seq_len / median,
                flops_per_token=flops_per_token(config, args.seq_len),
                peak_rss_mib=stats[impl]["peak_rss_mib"],
                base_rss_mib=stats[impl]["base_rss_mib"],
                loss_first=losses[impl][0],
                loss_last=losses[impl][-1],
                threads=stats[impl]["threads"],
            )
        )
    return results


def machine_info(device_name: str) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu": harness.cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device_name.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device_name))
    return info


def print_table(
    size: str, config: ModelConfig, rows: list[Result], args: argparse.Namespace
) -> None:
    n = rows[0].n_params
    print(
        f"\n== {size}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"n_positions={config.block_size} vocab={config.vocab_size}, {n / 1e6:.1f}M params; "
        f"batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len} "
        f"tokens/step, {args.steps} measured steps after {args.warmup} warm-up"
        + ", steps interleaved across the models"
    )
    header = (
        f"{'impl':<33} {'tokens/s':>9} {'step ms':>9} {'MFU %':>6} "
        f"{'peak RSS MiB':>12} {'imports':>7} {'loss 0':>7} {'loss N':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.label:<33} {r.tokens_per_s:>9.0f} {r.step_ms_median:>9.1f} {100 * r.mfu:>6.1f} "
            f"{r.peak_rss_mib:>12.0f} {r.base_rss_mib:>7.0f} {r.loss_first:>7.3f} "
            f"{r.loss_last:>7.3f}"
        )
    by_impl = {r.impl: r for r in rows}
    ours = by_impl["ours"]
    if "hf" in by_impl:
        print(
            f"ratio ours/HF (same optimizer): {ours.tokens_per_s / by_impl['hf'].tokens_per_s:.2f}x"
        )
    if "hf_adamw" in by_impl:
        print(
            "ratio ours/HF + torch.optim.AdamW defaults: "
            f"{ours.tokens_per_s / by_impl['hf_adamw'].tokens_per_s:.2f}x"
        )
    # Random tokens: every model should start near ln(vocab) and go down as it memorises them.
    if "hf" in by_impl and abs(ours.loss_first - by_impl["hf"].loss_first) > 0.1:
        print(
            f"WARNING: step-0 losses differ: ours {ours.loss_first:.3f}, "
            f"HF {by_impl['hf'].loss_first:.3f} (both should be close to ln(vocab))"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sizes",
        default="small,gpt2",
        help="comma-separated: 'small' (4 layers, 4 heads, 256 wide, 256 positions) or a "
        "medgpt preset (tiny, gpt2, gpt2-medium, ...); default small,gpt2",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (cuda only)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU denominator instead of measuring one"
    )
    p.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {', '.join(IMPLS)} (ours is always run)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        p.error("--dtype bf16 is for --device cuda (CPU runs are fp32)")
    if min(args.batch_size, args.seq_len, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size, --seq-len and --steps must be >= 1, --warmup >= 0")
    args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in args.size_list:
        try:
            block = model_config(size).block_size
        except Exception as e:
            p.error(f"--sizes: {e}")
        if args.seq_len > block:
            p.error(f"--seq-len {args.seq_len} exceeds {size}'s {block} positions")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {unknown[0]!r} (allowed: {', '.join(IMPLS)})")
    args.impl_list = ["ours", *[i for i in IMPLS if i in impls and i != "ours"]]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info(args.device)
    print(
        f"machine: {info['cpu']} ({info['cpu_count']} cores, {info['cpu_capability']}), "
        f"torch {info['torch']}, transformers {info['transformers']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
    )
    # Other processes share the cores on small machines; a high figure here means noisy timings.
    load_before = os.getloadavg()
    print(
        f"device {args.device}, {args.dtype}; load average before: {harness.fmt_load(load_before)}"
    )
    peaks: list[float] = []
    if not args.peak_tflops:
        peaks.append(
            harness.in_fresh_process(measure_peak_flops, args.device, args.dtype, args.threads)
        )
    print(
        "optimizers: medgpt + HF rows use medgpt.training.configure_optimizer(lr=6e-4) "
        "(fused AdamW, decay on matrices only); the last row uses "
        "torch.optim.AdamW(model.parameters(), lr=6e-4)"
    )
    print(
        "inputs: random ids; ours: model(x, y) with y = x shifted by one; "
        "HF: model(input_ids=x, labels=x), shifted inside HF (scores T-1 positions of T)"
    )

    results: list[Result] = []
    tables: list[tuple[str, ModelConfig, list[Result]]] = []
    for size in args.size_list:
        config = model_config(size)
        rows = measure_size(size, args)
        tables.append((size, config, rows))
        results.extend(rows)
    load_after = os.getloadavg()

    if args.peak_tflops:
        peak, peak_src = args.peak_tflops * 1e12, "given by --peak-tflops"
    else:
        # Measured again after the runs and the higher one kept: load from elsewhere can only
        # lower a measurement, and a low peak would inflate every MFU.
        peaks.append(
            harness.in_fresh_process(measure_peak_flops, args.device, args.dtype, args.threads)
        )
        peak = max(peaks)
        peak_src = (
            f"measured: 2048x2048 {args.dtype} matmul at the same thread count, best of before/after "
            f"the runs ({' / '.join(f'{p / 1e12:.3f}' for p in peaks)})"
        )
    for r in results:
        r.mfu = r.flops_per_token * r.tokens_per_s / peak
    print(f"MFU peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    print(f"load average after: {harness.fmt_load(load_after)}")
    for size, config, rows in tables:
        print_table(size, config, rows, args)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": info,
            "device": args.device,
            "dtype": args.dtype,
            "peak_flops": peak,
            "peak_source": peak_src,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
