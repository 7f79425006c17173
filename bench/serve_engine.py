"""Single-stream decode speed of the serving engine against ``transformers`` ``generate``.

One GPT-2 124M-shaped model (random init, ``torch.manual_seed(0)``; decode speed does not
depend on what the weights learned), one request at a time, greedy, on the CPU:

* ``medgpt Engine fp32``   ``Engine(model, max_batch_size=1).generate(prompt,
  SamplingParams(max_new_tokens=N, temperature=0))`` (this includes the engine's streaming
  detokenisation, as serving does)
* ``Engine fp32 F.linear`` the same with ``fast_linear=False``: every linear layer through
  ``F.linear`` (MKL) instead of ``medgpt.kernels``' decode kernel
* ``medgpt Engine int8``   the same on ``medgpt.quantize.quantize_int8(model)``
* ``HF generate fp32``     the baseline: ``transformers.GPT2LMHeadModel`` loaded from the folder
  ``medgpt.hf.save_hf_gpt2`` wrote from the same weights, ``model.generate(input_ids,
  max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True)``

No ``HF generate int8`` row: HF's GPT-2 keeps its projections in ``Conv1D`` modules, which
``quantize_dynamic`` does not convert, so only its head would be int8.

Decode speed excludes prefill: each round times one generation of N new tokens (one prefill
forward pass, then N - 1 decode steps) and, separately, generations of 1 new token (the
prefill alone plus the choice of the first token; the median of three), and reports
(N - 1) / (t_N - t_1). Every method runs in its own spawned process (its peak RSS is its own,
read with ``getrusage``), all processes stay up for the whole run, and the parent hands out
one round to each in turn, rotating who goes first, so that load from other programs hits all
methods alike. Medians over rounds.

Beside each speed: the memory-bandwidth ceiling at batch 1, where every weight is read once per
token: bytes of weights per decode step (fp32: 4 bytes per parameter, the tied head counted
once; int8: the int8 matrices plus per-row scales and float32 biases, embedding rows not
counted) divided by a read bandwidth measured in this run (summing a 1 GiB float32 tensor, best
of before and after the rounds). The KV cache read is left out (about 1% here).

Held-out loss change of int8 against fp32 (``score_documents`` on the first documents of a
prepared split): on a trained checkpoint, where it means something (``--checkpoint``; skipped
if missing), and on the random GPT-2-shaped model, for completeness.

    python bench/serve_engine.py                      # 64 new tokens, 2 rounds, ~5 minutes
    python bench/serve_engine.py --new-tokens 128 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from medgpt.testing import REPO
from medgpt.testing import bench as harness

METHODS = {
    "engine_fp32": "medgpt Engine fp32",
    "engine_fp32_mkl": "Engine fp32 F.linear",
    "engine_int8": "medgpt Engine int8",
    "hf_fp32": "HF generate fp32",
}
BASELINE = "hf_fp32"
PROMPT = (
    "The patient is a 64-year-old man with type 2 diabetes mellitus, hypertension and chronic "
    "kidney disease stage 3, admitted with shortness of breath and swelling of both legs."
)


def prompt_ids(n: int) -> list[int]:
    from medgpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary(PROMPT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_bandwidth(threads: int, gib: float = 1.0, reps: int = 3) -> float:
    """Read bandwidth in bytes/s: the best of several sums over a ``gib`` GiB float32 tensor."""
    harness.set_threads(threads)
    a = torch.ones(int(gib * 2**30) // 4)
    a.sum()  # first touch and thread start-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


# ---------------------------------------------------------------------------------------------
# One method per process


def _build(method: str, folder: str) -> tuple[Any, Any, dict[str, Any]]:
    """(generate(ids, n) -> new token ids, the model, facts about it)."""
    if method.startswith("engine"):
        from medgpt.checkpoint import load_model
        from medgpt.generation import Engine, SamplingParams
        from medgpt.quantize import quantize_int8, weight_bytes

        model = load_model(Path(folder) / "ours")
        if method == "engine_int8":
            t0 = time.perf_counter()
            model = quantize_int8(model, inplace=True)
            facts = {"quantize_s": time.perf_counter() - t0}
        else:
            facts = {}
        facts["weight_bytes"] = weight_bytes(model)["total"]
        engine = Engine(model, max_batch_size=1, fast_linear=method != "engine_fp32_mkl")
        facts["fast_linear"] = engine.fast_linear

        def gen_engine(ids: list[int], n: int) -> list[int]:
            out = engine.generate(ids, SamplingParams(max_new_tokens=n, temperature=0))
            return out["token_ids"]

        return gen_engine, model, facts

    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(Path(folder) / "hf", dtype=torch.float32).eval()
    weights = {id(p): p for p in model.parameters()}  # the tied head once
    facts = {
        "weight_bytes": sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if "wte" not in n and "wpe" not in n
        )
        + model.lm_head.weight.numel() * 4,
        "parameters": sum(p.numel() for p in weights.values()),
        "attn_implementation": model.config._attn_implementation,
    }

    @torch.no_grad()
    def gen_hf(ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
        )
        return out[0, len(ids) :].tolist()

    return gen_hf, model, facts


def _worker_main(conn: Connection, method: str, folder: str, args: dict[str, Any]) -> None:
    with harness.reporting_errors(conn):
        threads = harness.set_threads(args["threads"])
        if method.startswith("hf"):
            import transformers  # noqa: F401  (before the baseline RSS reading)
        base_rss = harness.rss_now_mib()
        generate, _model, facts = _build(method, folder)
        ids = prompt_ids(args["prompt_tokens"])
        n = args["new_tokens"]
        generate(ids, min(8, n))  # warm-up: thread pools, allocator, first-call paths
        ready_rss = harness.rss_now_mib()
        conn.send(("ready", None))
        while conn.recv() == "round":
            t0 = time.perf_counter()
            tokens = generate(ids, n)
            t_n = time.perf_counter() - t0
            t_1s = []
            for _ in range(3):
                t0 = time.perf_counter()
                generate(ids, 1)
                t_1s.append(time.perf_counter() - t0)
            conn.send(("round", {"t_n": t_n, "t_1": statistics.median(t_1s), "t_1_all": t_1s,
                                 "tokens": tokens}))  # fmt: skip
        conn.send(("done", facts | {"threads": threads, "base_rss_mib": base_rss,
                                    "ready_rss_mib": ready_rss, "end_rss_mib": harness.rss_now_mib(),
                                    "peak_rss_mib": harness.peak_rss_mib()}))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Held-out loss, fp32 vs int8


def loss_change(checkpoint: str, data: str, split: str, documents: int, threads: int) -> dict:
    """``score_documents`` loss of the model at ``checkpoint`` and of its int8 copy."""
    from medgpt.checkpoint import load_model
    from medgpt.evaluation import EvalConfig, prepared_documents, score_documents
    from medgpt.quantize import quantize_int8

    harness.set_threads(threads)
    docs = []
    for doc in prepared_documents(data, split).documents:
        docs.append(doc)
        if len(docs) == documents:
            break
    model = load_model(checkpoint)
    q = quantize_int8(model)
    fp32, int8 = score_documents([model, q], docs, EvalConfig(), torch.device("cpu"),
                                 progress=False)  # fmt: skip
    a, b = fp32.total.loss, int8.total.loss
    return {
        "checkpoint": checkpoint,
        "model": model.config.to_dict(),
        "documents": len(docs),
        "tokens": fp32.total.tokens,
        "loss_fp32": a,
        "loss_int8": b,
        "relative_change_pct": 100 * (b - a) / a,
        "seconds_fp32": fp32.seconds,
        "seconds_int8": int8.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model preset for the speed rows (gpt2)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    p.add_argument("--checkpoint", default=str(REPO / "runs/tiny-cpu/step-000150"),
                   help="trained checkpoint for the loss change (skipped if missing)")  # fmt: skip
    p.add_argument("--data", default=str(REPO / "data/icd10cm"), help="prepared dataset")
    p.add_argument("--split", default="val")
    p.add_argument("--loss-documents", type=int, default=30, help="first N documents")
    p.add_argument("--json", type=Path, help="write the figures here too")
    a = p.parse_args(argv)
    if a.new_tokens < 2 or a.prompt_tokens < 1 or a.rounds < 1:
        p.error("--new-tokens must be >= 2, --prompt-tokens and --rounds >= 1")

    import transformers

    from medgpt.checkpoint import save_checkpoint
    from medgpt.config import ModelConfig
    from medgpt.hf import save_hf_gpt2
    from medgpt.model import GPT

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    print(
        f"machine: {harness.cpu_name()} ({os.cpu_count()} cores, "
        f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, quantized engine "
        f"{torch.backends.quantized.engine}"
    )
    print(f"load average before: {harness.fmt_load(load_before)}")
    bandwidths = [harness.in_fresh_process(measure_bandwidth, a.threads)]

    config = ModelConfig.preset(a.size)
    if a.prompt_tokens + a.new_tokens > config.block_size:
        p.error(f"prompt + new tokens exceed the context of {config.block_size}")
    args = vars(a) | {"json": None}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPT(config)
        n_params = model.num_params(non_embedding=False)
        save_checkpoint(Path(tmp) / "ours", model, {"step": 0})
        save_hf_gpt2(model, Path(tmp) / "hf")
        del model
        workers = [harness.Worker(METHODS[m], _worker_main, m, tmp, args) for m in METHODS]
        try:
            for w in workers:
                w.call()  # wait for "ready"
            for r in range(a.rounds):
                print(f"  round {r + 1}/{a.rounds}", file=sys.stderr)
                for m, w in harness.in_turn(list(zip(METHODS, workers, strict=True)), r):
                    runs[m].append(w.call("round"))
            facts = {m: w.call("done") for m, w in zip(METHODS, workers, strict=True)}
        finally:
            for w in workers:
                w.close()
        random_loss = harness.in_fresh_process(  # the same random weights as the speed rows
            loss_change, str(Path(tmp) / "ours"), a.data, a.split, a.loss_documents, a.threads
        )
    trained_loss = None
    if Path(a.checkpoint).is_dir():
        trained_loss = harness.in_fresh_process(
            loss_change, a.checkpoint, a.data, a.split, a.loss_documents, a.threads
        )
    bandwidths.append(harness.in_fresh_process(measure_bandwidth, a.threads))
    bandwidth = max(bandwidths)
    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start

    n = a.new_tokens
    summary: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        decode = [(n - 1) / (x["t_n"] - x["t_1"]) for x in runs[m]]
        generated = {len(x["tokens"]) for x in runs[m]}
        wb = facts[m]["weight_bytes"]
        summary[m] = {
            "label": METHODS[m],
            "decode_tokens_per_s": statistics.median(decode),
            "decode_tokens_per_s_all": decode,
            "prefill_s": statistics.median(x["t_1"] for x in runs[m]),
            "total_s": statistics.median(x["t_n"] for x in runs[m]),
            "generated_tokens": sorted(generated),
            "weight_bytes_per_step": wb,
            "ceiling_tokens_per_s": bandwidth / wb,
            "peak_rss_mib": facts[m]["peak_rss_mib"],
            "serving_rss_mib": facts[m]["end_rss_mib"],
            "base_rss_mib": facts[m]["base_rss_mib"],
            "threads": facts[m]["threads"],
        }
    base = summary[BASELINE]["decode_tokens_per_s"]
    for s in summary.values():
        s["ratio_vs_baseline"] = s["decode_tokens_per_s"] / base

    print(
        f"model {a.size} ({n_params / 1e6:.1f}M params, random init seed 0), CPU fp32 unless "
        f"noted, threads {summary['engine_fp32']['threads']}; prompt {a.prompt_tokens} tokens, "
        f"{n} new tokens, greedy, batch 1; {a.rounds} rounds, medians"
    )
    print(
        f"decode tok/s = (N-1) / (t[N new tokens] - t[1 new token]); read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (1 GiB float32 sum, best of "
        f"{' / '.join(f'{b / 1e9:.1f}' for b in bandwidths)} before/after)"
    )
    header = (
        f"{'method':<22}{'decode tok/s':>13}{'vs HF fp32':>11}{'prefill ms':>11}"
        f"{'MB/step':>9}{'ceiling tok/s':>14}{'% ceiling':>10}{'peak RSS':>10}{'serving':>9}"
    )
    print(header)
    print("-" * len(header))
    for s in summary.values():
        print(
            f"{s['label']:<22}{s['decode_tokens_per_s']:>13.1f}{s['ratio_vs_baseline']:>10.2f}x"
            f"{1e3 * s['prefill_s']:>11.0f}{s['weight_bytes_per_step'] / 1e6:>9.0f}"
            f"{s['ceiling_tokens_per_s']:>14.1f}"
            f"{100 * s['decode_tokens_per_s'] / s['ceiling_tokens_per_s']:>9.0f}%"
            f"{s['peak_rss_mib']:>7.0f} MiB{s['serving_rss_mib']:>5.0f} MiB"
        )
    for m in METHODS:
        per_round = ", ".join(f"{x:.1f}" for x in summary[m]["decode_tokens_per_s_all"])
        print(f"  {METHODS[m]}: per round {per_round} tok/s")
    ef, ei = summary["engine_fp32"], summary["engine_int8"]
    if not facts["engine_fp32"]["fast_linear"]:
        print("WARNING: the decode kernel was unavailable; Engine fp32 ran on F.linear")
    print(f"ratio Engine fp32 / HF generate fp32: {ef['ratio_vs_baseline']:.2f}x")
    em = summary["engine_fp32_mkl"]["decode_tokens_per_s"]
    print(f"ratio Engine fp32 kernel / F.linear: {ef['decode_tokens_per_s'] / em:.2f}x")
    print(f"ratio Engine int8 / HF generate fp32: {ei['ratio_vs_baseline']:.2f}x")
    same = runs["engine_fp32"][0]["tokens"] == runs["hf_fp32"][0]["tokens"]
    fp32_toks, int8_toks = runs["engine_fp32"][0]["tokens"], runs["engine_int8"][0]["tokens"]
    prefix = next(
        (i for i, (x, y) in enumerate(zip(fp32_toks, int8_toks, strict=False)) if x != y),
        min(len(fp32_toks), len(int8_toks)),
    )
    print(
        f"greedy tokens: Engine fp32 {'==' if same else '!='} HF fp32; Engine int8 follows fp32 "
        f"for the first {prefix}/{n}"
    )
    if any(s["generated_tokens"] != [n] for s in summary.values()):
        print("WARNING: a method stopped before N tokens (end-of-text); its speed is off")
    for name, res in (("trained", trained_loss), (f"random-init {a.size}", random_loss)):
        if res is None:
            print(f"held-out loss ({name}): {a.checkpoint} not found, skipped")
            continue
        cfg = res["model"]
        print(
            f"held-out loss, {name} ({cfg['n_layer']}L/{cfg['n_embd']}d): "
            f"{res['documents']} {a.split} docs, {res['tokens']:,} tokens: fp32 "
            f"{res['loss_fp32']:.4f}, int8 {res['loss_int8']:.4f}, change "
            f"{res['relative_change_pct']:+.3f}%"
        )
    print(f"load average after: {harness.fmt_load(load_after)}; wall {wall:.0f} s")

    if a.json:
        payload = {
            "args": vars(a) | {"json": str(a.json)},
            "machine": {"cpu": harness.cpu_name(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "transformers": transformers.__version__},
            "load_average_before": load_before,
            "load_average_after": load_after,
            "bandwidth_bytes_per_s": bandwidths,
            "summary": summary,
            "runs": runs,
            "facts": facts,
            "loss": {"trained": trained_loss, "random": random_loss},
        }  # fmt: skip
        harness.dump_json(a.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
