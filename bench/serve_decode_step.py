"""One decode step of a continuous batch: the CPU kernel's attention against PyTorch's SDPA.

In a continuous batch every row sits at its own position. ``GPT.decode_step`` with the CPU
decode kernel's backend (``medgpt.kv_cache.KERNEL``, as the serving engine runs float32 on
the CPU) hands each layer's attention to ``torch.ops.medgpt.decode_attention``
(``medgpt/kernels/decode_attention.h``): each row's new key and value written at its position, its query
over its own positions only. The baseline is what ran before, and still runs wherever the kernel
is unavailable: the new entries stored with ``index_copy_`` and
``F.scaled_dot_product_attention`` over the longest row's positions with a boolean mask. The
linear layers are the kernel's in both, so the difference is attention alone.

Beside it, the step's sampling (temperature 0.8, a generator per row): ``sample_batch`` over
the whole batch, as the engine samples now, against one ``sample_batch`` call per row (how the
engine sampled before: each row's softmax and cumulative sum on its own).

One GPT-2-shaped model (random init, ``torch.manual_seed(0)``), float32, CPU, 2 torch threads
by default. Per batch size B: a KV cache of B rows, row b prefilled with a prompt of
``--prompt-tokens + 2 b`` tokens, so that no two rows share a position; then per round and
method ``--steps`` decode steps from those positions (each step timed alone; the methods take
turns going first). Medians over all steps of all rounds. Both methods must give the same
logits to float32 rounding (checked on every step, the largest difference printed).

    python bench/serve_decode_step.py                        # batch 1 and 8, ~1 minute
    python bench/serve_decode_step.py --batch 1,4,8,16 --json out.json
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch

from medgpt.testing import bench

METHODS = {
    "kernel": "kernel attention (decode_attention)",
    "sdpa": "SDPA + mask (baseline)",
}


_BACKEND: list = []  # the decode backend run_steps passes, set by attention()


@contextmanager
def attention(method: str):
    """The decode step's backend for ``method``: ``medgpt.kv_cache.KERNEL`` or ``SDPA``."""
    from medgpt.kv_cache import KERNEL, SDPA

    _BACKEND[:] = [KERNEL if method == "kernel" else SDPA]
    try:
        yield
    finally:
        _BACKEND.clear()


def run_steps(model, cache, start: torch.Tensor, steps: int, tokens: torch.Tensor):
    times, logits = [], []
    pos = start.clone()
    with torch.no_grad():
        for s in range(steps):
            t0 = time.perf_counter()
            out = model.decode_step(tokens[s], pos, cache, *_BACKEND)
            times.append(time.perf_counter() - t0)
            logits.append(out)
            pos = pos + 1
    return times, logits


def time_sampling(logits: list[torch.Tensor], B: int) -> dict[str, float]:
    from medgpt.generation import SamplingParams, sample_batch

    params = [SamplingParams(temperature=0.8)] * B
    out: dict[str, list[float]] = {"batched": [], "per_row": []}
    for lg in logits:
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        t0 = time.perf_counter()
        batched = sample_batch(lg, params, gens)
        t1 = time.perf_counter()
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        per_row = [sample_batch(lg[i : i + 1], params[:1], gens[i : i + 1])[0] for i in range(B)]
        t2 = time.perf_counter()
        if batched != per_row:
            raise RuntimeError("batched sampling picked other tokens than row by row")
        out["batched"].append(t1 - t0)
        out["per_row"].append(t2 - t1)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = bench.model_bench_parser(__doc__, rounds=3)
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=24, help="row 0's prompt length")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round and method")
    a = ap.parse_args(argv)
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        ap.error(f"--batch: comma-separated integers, got {a.batch!r}")
    if min(batches) < 1 or a.prompt_tokens < 1 or a.steps < 1 or a.rounds < 1 or a.threads < 0:
        ap.error("--batch, --prompt-tokens, --steps, --rounds must be >= 1, --threads >= 0")

    from medgpt import kernels
    from medgpt.config import ModelConfig
    from medgpt.kv_cache import KVCache
    from medgpt.model import GPT

    bench.set_threads(a.threads)
    if bench.decode_kernel_missing("nothing to compare"):
        return 1
    cfg = ModelConfig.preset(a.size)
    longest = a.prompt_tokens + 2 * (max(batches) - 1) + a.steps
    if longest > cfg.block_size:
        ap.error(f"rows reach {longest} positions, beyond the context of {cfg.block_size}")
    torch.manual_seed(0)
    model = kernels.with_kernel_linears(GPT(cfg)).eval()
    load_before = os.getloadavg()
    results = []
    for B in batches:
        cache = KVCache(cfg, B, longest)
        lengths = [a.prompt_tokens + 2 * b for b in range(B)]
        with torch.no_grad():
            for b, n in enumerate(lengths):
                model.features(torch.randint(0, cfg.vocab_size, (1, n)), kv_cache=cache.row(b))
        start = torch.tensor(lengths)
        tokens = torch.randint(0, cfg.vocab_size, (a.steps, B))
        for m in METHODS:  # warm-up
            with attention(m):
                run_steps(model, cache, start, 2, tokens)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        worst = 0.0
        order = list(METHODS)
        for r in range(a.rounds):
            logits = {}
            for m in bench.in_turn(order, r):
                with attention(m):
                    ts, logits[m] = run_steps(model, cache, start, a.steps, tokens)
                times[m] += ts
            for x, y in zip(logits["kernel"], logits["sdpa"], strict=True):
                worst = max(worst, float((x - y).abs().max()))
        med = {m: statistics.median(ts) for m, ts in times.items()}
        sampling = time_sampling(logits["kernel"], B)
        results.append({"batch": B, "median_step_s": med, "max_abs_logit_diff": worst,
                        "sampling_s": sampling})  # fmt: skip

    print(f"{a.size} ({model.num_params(non_embedding=False) / 1e6:.1f}M params), float32, "
          f"{torch.get_num_threads()} threads, decode kernel linears in both; rows at positions "
          f"{a.prompt_tokens}, {a.prompt_tokens + 2}, ... then {a.steps} steps x {a.rounds} "
          f"rounds; {bench.cpu_name()}")  # fmt: skip
    print(f"{'batch':>5}  {'method':<36} {'step ms':>8} {'tok/s':>7} {'vs baseline':>12}")
    for res in results:
        B, med = res["batch"], res["median_step_s"]
        for m, label in METHODS.items():
            print(f"{B:>5}  {label:<36} {med[m] * 1e3:>8.1f} {B / med[m]:>7.1f} "
                  f"{med['sdpa'] / med[m]:>11.2f}x")  # fmt: skip
        s = res["sampling_s"]
        print(f"{B:>5}  sampling: batched {s['batched'] * 1e3:.2f} ms, one row at a time "
              f"(baseline) {s['per_row'] * 1e3:.2f} ms, {s['per_row'] / s['batched']:.2f}x; "
              f"largest logit difference {res['max_abs_logit_diff']:.1e}")  # fmt: skip
    ok = all(r["max_abs_logit_diff"] < 1e-3 for r in results)
    print(f"same logits to float32 rounding: {'yes' if ok else 'NO'}; peak RSS "
          f"{bench.peak_rss_mib():,.0f} MiB; load average before "
          f"{bench.fmt_load(load_before)}")  # fmt: skip
    if a.json:
        bench.write_json(a.json, a, results=results, load_average_before=load_before)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
