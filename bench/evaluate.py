"""Held-out scoring speed of ``medgpt evaluate`` against the usual Hugging Face recipe.

Both score the same documents of a prepared split with the same weights (a randomly
initialised GPT-2-shaped model: speed does not depend on what the weights learned), every
token once, documents one by one from their end-of-text token:

* ``medgpt score_documents``   windows of many documents batched together (sorted by length,
  right-padded), the 50257-wide output head applied only to the rows that are scored, in
  chunks; float64 sums.
* ``HF sliding window``        ``GPT2LMHeadModel`` with ``labels``, one window per forward
  pass, stride as in the transformers perplexity guide (the baseline people copy); full
  logits for every position.

Each method runs in its own spawned process (its peak RSS is its own), the rounds alternate
methods so background load hits both alike, and the median time is reported. Loss values are
printed beside speed: the two recipes give each token nearly, not exactly, the same context
(HF's later windows hold one token less), so they agree to a few thousandths, not bit for bit.

    python bench/evaluate.py                                   # gpt2-124M shape, 24 ICD docs
    python bench/evaluate.py --size tiny --documents 200 --rounds 3
    python bench/evaluate.py --device cuda --documents 500
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medgpt.config import ModelConfig
from medgpt.testing import REPO
from medgpt.testing import bench as harness

METHODS = {"ours": "medgpt score_documents", "hf": "HF sliding window"}


def _documents(data: str, split: str, n: int) -> list[tuple[str, Any]]:
    from medgpt.evaluation import prepared_documents

    docs = []
    for source, toks in prepared_documents(data, split).documents:
        docs.append((source, toks))
        if len(docs) == n:
            break
    return docs


def _run(method: str, folder: str, args: dict[str, Any]) -> dict[str, Any]:
    harness.set_threads(args["threads"])
    device = torch.device(args["device"])
    docs = _documents(args["data"], args["split"], args["documents"])
    if method == "ours":
        from medgpt.checkpoint import load_model
        from medgpt.evaluation import EvalConfig, score_documents

        model = load_model(Path(folder) / "ours", device=device)
        extra = {"head_chunk": args["head_chunk"]} if args["head_chunk"] else {}
        cfg = EvalConfig(stride=args["stride"], batch_tokens=args["batch_tokens"], **extra)
        t0 = time.perf_counter()
        total = score_documents([model], docs, cfg, device, progress=False)[0].total
        seconds = time.perf_counter() - t0
        nll, tokens = total.nll, total.tokens
    else:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(Path(folder) / "hf").to(device).eval()
        block = model.config.n_positions
        stride = args["stride"] or block // 2
        nll, tokens = 0.0, 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for _, toks in docs:
                ids = torch.as_tensor(toks, dtype=torch.long, device=device)[None]
                n, prev_end = ids.size(1), 0
                for begin in range(0, n, stride):
                    end = min(begin + block, n)
                    trg_len = end - prev_end
                    inputs = ids[:, begin:end]
                    labels = inputs.clone()
                    labels[:, :-trg_len] = -100
                    valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels
                    if valid:
                        loss = model(inputs, labels=labels).loss
                        nll += float(loss) * valid
                        tokens += valid
                    prev_end = end
                    if end == n:
                        break
        seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "method": method,
        "seconds": seconds,
        "tokens": tokens,
        "loss": nll / tokens,
        "peak_rss_mib": harness.peak_rss_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO / "data/icd10cm"), help="prepared dataset")
    p.add_argument("--split", default="val")
    p.add_argument("--documents", type=int, default=24, help="first N documents of the split")
    p.add_argument("--size", default="gpt2", help="model preset (tiny, gpt2, ...)")
    p.add_argument("--stride", type=int, default=None, help="window advance (half the context)")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument(
        "--head-chunk", type=int, default=None, help="rows per head matmul (default: EvalConfig's)"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()

    from medgpt.checkpoint import save_checkpoint
    from medgpt.hf import save_hf_gpt2
    from medgpt.model import GPT, count_params

    torch.manual_seed(0)
    config = ModelConfig.preset(a.size)
    model = GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ours", model, {"step": 0})
        save_hf_gpt2(model, Path(tmp) / "hf")
        del model
        args = vars(a) | {"data": str(Path(a.data).resolve())}
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for r in range(a.rounds):
            for m in harness.in_turn(list(METHODS), r):  # each round in a fresh process
                runs[m].append(harness.in_fresh_process(_run, m, tmp, args))
    params = count_params(config, non_embedding=False)
    print(
        f"scoring {runs['ours'][0]['tokens']:,} tokens of {a.documents} documents "
        f"({a.data}, {a.split}); model {a.size} ({params / 1e6:.0f}M params, context "
        f"{config.block_size}), {a.device}, torch {torch.__version__}, {harness.cpu_name()}, "
        f"threads {a.threads or torch.get_num_threads()}, {a.rounds} rounds"
    )
    print(f"{'method':<26}{'tok/s':>10}{'s (median)':>12}{'loss':>10}{'peak RSS':>12}")
    summary = {}
    for m, label in METHODS.items():
        secs = statistics.median(x["seconds"] for x in runs[m])
        tps = runs[m][0]["tokens"] / secs
        rss = max(x["peak_rss_mib"] for x in runs[m])
        summary[m] = {
            "tokens_per_s": tps,
            "seconds": secs,
            "loss": runs[m][0]["loss"],
            "peak_rss_mib": rss,
        }
        print(f"{label:<26}{tps:>10.0f}{secs:>12.2f}{runs[m][0]['loss']:>10.4f}{rss:>9.0f} MiB")
    ratio = summary["ours"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
    print(f"speed ratio medgpt / HF sliding window: {ratio:.2f}x")
    if a.json:
        harness.dump_json(Path(a.json), {"args": vars(a), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
