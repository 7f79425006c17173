"""Admitting several requests at once: packed prefill against one prompt at a time.

When requests arrive together (a burst, or every stream of a steady load ending in the same
step), the serving engine admits them in one step and prefills their prompts. Packed
(``Engine(..., pack_prefill=True)``, the default with the CPU decode kernel), consecutive
prompts of up to ``medgpt.kernels.MAX_ROWS`` tokens together go through the model in one
pass (``GPT.prefill``), so each weight matrix is read once for all of them. The baseline,
``pack_prefill=False``, is what the engine did before: each prompt alone into its cache row
(a pass of one prompt; the same arithmetic as ``GPT.features``).

One GPT-2-shaped model (random init, ``torch.manual_seed(0)``; speed does not depend on what the
weights learned), float32, CPU, the decode kernel on, 2 torch threads by default. Per round and
method: submit ``--requests`` prompts of ``--prompt-tokens`` tokens (each its own slice of a
fixed medical text) with ``max_new_tokens=1``, and time the one ``Engine.step`` that admits,
prefills and finishes them all (its first token sampled, seed per request). The methods take
turns going first each round; medians over rounds. Both must pick the same first tokens: the
kernel gives a row the same numbers in any batch, so packing changes no result.

    python bench/serve_prefill.py                                  # 8 x 30 tokens, 5 rounds
    python bench/serve_prefill.py --requests 16 --prompt-tokens 60 --json out.json
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from medgpt.testing import bench

TEXT = (
    "The patient is a 64-year-old man with type 2 diabetes mellitus, hypertension and chronic "
    "kidney disease stage 3, admitted with shortness of breath and swelling of both legs. "
    "Asthma is a chronic disease of the airways; symptoms include wheezing, cough, chest "
    "tightness and shortness of breath, often worse at night or early in the morning. "
)
METHODS = {"packed": "packed prefill (GPT.prefill)", "alone": "one prompt at a time (baseline)"}


def prompts(n: int, tokens: int) -> list[list[int]]:
    from medgpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary(TEXT)
    while len(ids) < n + tokens:
        ids = ids + ids
    return [ids[i : i + tokens] for i in range(n)]


def admit_once(engine, batch: list[list[int]], tag: str) -> tuple[float, list[int]]:
    from medgpt.generation import SamplingParams

    for i, ids in enumerate(batch):
        engine.submit(f"{tag}-{i}", ids, SamplingParams(max_new_tokens=1, temperature=0.8, seed=i))
    t0 = time.perf_counter()
    events = engine.step()
    elapsed = time.perf_counter() - t0
    if engine.has_work or len(events) != len(batch):
        raise RuntimeError("the admission step did not finish every request")
    first = {ev.request_id: ev.token_ids for ev in events}
    return elapsed, [t for i in range(len(batch)) for t in first[f"{tag}-{i}"]]


def main(argv: list[str] | None = None) -> int:
    ap = bench.model_bench_parser(__doc__, rounds=5)
    ap.add_argument("--requests", type=int, default=8, help="prompts admitted together")
    ap.add_argument("--prompt-tokens", type=int, default=30, help="tokens per prompt")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.prompt_tokens < 1 or a.rounds < 1 or a.threads < 0:
        ap.error("--requests, --prompt-tokens and --rounds must be >= 1, --threads >= 0")

    from medgpt.config import ModelConfig
    from medgpt.generation import Engine, SamplingParams
    from medgpt.model import GPT

    bench.set_threads(a.threads)
    if bench.decode_kernel_missing("the engine packs prompts only with it, so nothing to compare"):
        return 1
    cfg = ModelConfig.preset(a.size)
    if a.prompt_tokens + 1 > cfg.block_size:
        ap.error(f"--prompt-tokens {a.prompt_tokens} does not fit the context of {cfg.block_size}")
    torch.manual_seed(0)
    model = GPT(cfg)
    engines = {
        m: Engine(model, max_batch_size=a.requests, pack_prefill=(m == "packed")) for m in METHODS
    }
    batch = prompts(a.requests, a.prompt_tokens)
    for engine in engines.values():  # warm-up: first calls allocate and build
        engine.generate(batch[0], SamplingParams(max_new_tokens=2, temperature=0))
        admit_once(engine, batch, "warm")
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    tokens: dict[str, list[int]] = {}
    order = list(METHODS)
    for r in range(a.rounds):
        for m in bench.in_turn(order, r):
            elapsed, tokens[m] = admit_once(engines[m], batch, f"r{r}")
            times[m].append(elapsed)
    same = tokens["packed"] == tokens["alone"]
    med = {m: statistics.median(ts) for m, ts in times.items()}
    n_tok = a.requests * a.prompt_tokens
    print(f"{a.size} ({model.num_params(non_embedding=False) / 1e6:.1f}M params), float32, "
          f"{torch.get_num_threads()} threads, decode kernel on; {a.requests} prompts x "
          f"{a.prompt_tokens} tokens admitted in one step; {a.rounds} rounds; "
          f"{bench.cpu_name()}")  # fmt: skip
    print(f"{'method':<34} {'median ms':>10} {'prompt tok/s':>13} {'vs baseline':>12}")
    for m, label in METHODS.items():
        print(f"{label:<34} {med[m] * 1e3:>10.0f} {n_tok / med[m]:>13.0f} "
              f"{med['alone'] / med[m]:>11.2f}x")  # fmt: skip
    print("per round (ms): " + "; ".join(
        f"{m} " + " / ".join(f"{t * 1e3:.0f}" for t in ts) for m, ts in times.items()))  # fmt: skip
    print(f"same first tokens: {'yes' if same else 'NO'}; peak RSS "
          f"{bench.peak_rss_mib():,.0f} MiB (one model, both engines' caches); load average "
          f"before {bench.fmt_load(load_before)}")  # fmt: skip
    if a.json:
        bench.write_json(a.json, a, median_s=med, rounds_s=times,
                         speedup=med["alone"] / med["packed"], same_first_tokens=same,
                         load_average_before=load_before)  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
