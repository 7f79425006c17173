"""Multiple-choice scoring throughput: ``medgpt evaluate``'s scorer against lm-evaluation-harness
through HTTP, on the same model and the same items, in one run.

Items. The ``medquad-mc`` benchmark (:mod:`medgpt.benchmark`) built from the MedQuAD sample
next to the repository (``--qa-data``, default ``../shared/data/medquad``) with medgpt
prepare's default split (``SplitRule.defaults()``: seed 1337, 5% held out, duplicates dropped),
``small_types: any``, 3 distractors (4 options an item) and options cut to 64 tokens: 576
items. By default all of them are scored (``--items 0``; about 30 s for ``medgpt`` and 5 minutes
for ``lm-eval`` a round on 2 cores); ``--items N`` keeps the first N of the benchmark's
(id-sorted) order. Each item is 4 (prompt, option) sequences to score, up to 97 tokens; items/s
counts items, not sequences.

Model. Random-init weights (``torch.manual_seed(0)``; scoring speed does not depend on what the
weights learned) of ``--size``, saved with ``save_checkpoint`` in a temporary folder, or
``--checkpoint FOLDER``. The default, ``medquad-cpu``, is the model shape of
``configs/medquad-cpu.yaml`` (4 layers, 4 heads, 256 wide, context 256; 16M parameters): the
model this 2-core machine trains, i.e. the one ``medgpt evaluate`` is run on here; every item
fits its context, so neither method truncates anything. ``gpt2`` (124M) and the other
``ModelConfig`` presets work too; ``--block-size`` overrides a preset's context (``tiny``'s 64
is shorter than the 64-token options: give ``--block-size 128``).

Methods, each timed in a process of its own (``harness.Worker``, spawned), after a warm-up:

* ``medgpt``   ``medgpt.benchmark.loglikelihoods``, what ``medgpt evaluate --task medquad-mc``
  runs: every sequence of the benchmark in length-sorted padded batches (EvalConfig's
  ``batch_tokens`` and ``head_chunk``), the output head on the option positions only; CPU,
  ``--threads`` torch threads (2). Timed: that one call (the model loaded and one item scored
  beforehand). Peak RSS: the worker's VmHWM, model load included.
* ``lm-eval``  lm-evaluation-harness (``lm_eval``) ``local-completions`` against a Ray Serve app
  serving the same checkpoint (``medgpt.serving.build_app``; one ``MedgptServer`` replica, 2
  CPUs and 2 torch threads, ``max_batch_size`` 16), on the task ``export_lm_eval`` writes of
  the same items. Its defaults otherwise: one (prompt, option) per request, ``--concurrency``
  requests in flight (``num_concurrent``, 8), token-id prompts with ``echo`` and
  ``logprobs``, tokenised by the server's ``/tokenize`` (lm-eval detects the remote tokenizer),
  ``max_length`` the context minus one (lm-eval asks for ``max_tokens: 1`` beyond the prompt,
  and the server refuses prompt + max_tokens over its context). Timed: the whole
  ``lm_eval.simple_evaluate(model="local-completions", ...)`` call (the client built, the task's
  docs read, every request, the metrics, lm-eval's environment report); items/s = items / that
  wall time. Beside it, from timers put around the client's methods: ``loglikelihood``
  (tokenising through ``/tokenize`` + scoring) and ``_loglikelihood_tokens`` (the
  ``/v1/completions`` requests alone), and lm-eval's own ``total_evaluation_time_seconds``
  (its EvaluationTracker: the same span as the wall time; lm-eval times nothing finer). Not
  timed: importing lm_eval and building its TaskManager (reported as set-up). Peak RSS: the
  client's VmHWM, and the replica's (VmHWM of its process, found through the GCS actor table,
  reset after start-up so the reading is the peak while scoring).

Ray runs PRIVATELY (``ray.init(address="local", num_cpus=2)``: it never joins another cluster
on this machine; Serve's proxy on a free port of 127.0.0.1), for both methods' turns: the
idle cluster costs the ``medgpt`` turn a little too. The lm-eval client shares the machine's
CPUs with the replica, as a local user's would. ``--rounds`` rounds (2), the methods taking
turns going first (``harness.in_turn``), a fresh worker each turn; the medians are reported.
Both methods' acc and acc_norm must agree (the same scores ranked the same way); their
per-option log-likelihoods to float32 rounding (the largest difference is printed; 2e-5 or
less seen here). A disagreement is a bug, printed as a WARNING (exit status 1), unless
sequences were truncated (longer than the context, each method keeps a different number of
tokens; the count is printed).

    python bench/eval_scoring.py                 # medquad-cpu shape, all 576 items, 2 rounds, ~12 min
    python bench/eval_scoring.py --size tiny --block-size 128 --items 40 --rounds 1   # smoke
    python bench/eval_scoring.py --size gpt2 --items 100 --json eval_scoring.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import serve_http  # bench/serve_http.py: the private Ray + Serve app and the replica's memory

from medgpt.testing import REPO
from medgpt.testing import bench as harness

TASK = "medquad-mc"
METHODS = {"medgpt": "medgpt loglikelihoods", "lm-eval": "lm-eval local-completions/HTTP"}
RECIPE_SIZE = "medquad-cpu"  # the model shape of configs/medquad-cpu.yaml


# ---------------------------------------------------------------------------------------------
# The workers


def _medgpt_worker(
    conn: Connection, checkpoint: str, bench: Any, threads: int, eval_cfg: dict[str, int]
) -> None:
    with harness.reporting_errors(conn):
        t0 = time.perf_counter()
        used = harness.set_threads(threads)
        import torch

        from medgpt.benchmark import accuracies, loglikelihoods
        from medgpt.checkpoint import load_model

        device = torch.device("cpu")
        model = load_model(checkpoint, device=device).eval()
        warm = dataclasses.replace(bench, items=bench.items[:1])
        loglikelihoods(model, warm, device, **eval_cfg)
        conn.send(("ready", {"setup_s": time.perf_counter() - t0, "threads": used}))
        conn.recv()
        t0 = time.perf_counter()
        lls = loglikelihoods(model, bench, device, **eval_cfg)
        seconds = time.perf_counter() - t0
        acc = accuracies(bench, lls)
        conn.send(("result", {
            "seconds": seconds,
            "items": len(lls),
            "acc": acc["acc"],
            "acc_norm": acc["acc_norm"],
            "lls": {it.id: [float(x) for x in ll] for it, ll in zip(bench.items, lls, strict=True)},
            "peak_rss_mib": harness.peak_rss_mib(),  # VmHWM
            "threads": used,
        }))  # fmt: skip


def _lm_eval_worker(conn: Connection, include_path: str, task: str, model_args: str,
                    hf_cache: str) -> None:  # fmt: skip
    with harness.reporting_errors(conn):
        # Offline: the task's docs are a local .jsonl; its Arrow cache private to this run.
        os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                           "HF_DATASETS_CACHE": hf_cache, "TQDM_DISABLE": "1"})  # fmt: skip
        t0 = time.perf_counter()
        import lm_eval
        import lm_eval.tasks
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        timers = {"loglikelihood": 0.0, "_loglikelihood_tokens": 0.0}

        def timed(name: str) -> None:
            inner = getattr(LocalCompletionsAPI, name)

            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return inner(self, *args, **kwargs)
                finally:
                    timers[name] += time.perf_counter() - start

            setattr(LocalCompletionsAPI, name, wrapper)

        for name in timers:
            timed(name)
        manager = lm_eval.tasks.TaskManager(include_path=include_path)
        conn.send(("ready", {"setup_s": time.perf_counter() - t0}))
        conn.recv()
        tracker = EvaluationTracker()
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                      tasks=[task], task_manager=manager,
                                      evaluation_tracker=tracker)  # fmt: skip
        seconds = time.perf_counter() - t0
        tracker.general_config_tracker.log_end_time()
        if out is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        r = out["results"][task]
        lls = {s["doc"]["id"]: [float(x[0]) for x in s["filtered_resps"]]
               for s in out["samples"][task]}  # fmt: skip
        conn.send(("result", {
            "seconds": seconds,
            "items": int(out["n-samples"][task]["effective"]),
            "acc": float(r["acc,none"]),
            "acc_norm": float(r["acc_norm,none"]),
            "lls": lls,
            "loglikelihood_s": timers["loglikelihood"],
            "completions_s": timers["_loglikelihood_tokens"],
            "lm_eval_total_evaluation_time_s": float(
                tracker.general_config_tracker.total_evaluation_time_seconds or "nan"),
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "peak_rss_mib": harness.peak_rss_mib(),  # VmHWM
        }))  # fmt: skip


def run_turn(method: str, ctx: dict[str, Any], round_no: int) -> dict[str, Any]:
    if method == "medgpt":
        w = harness.Worker(method, _medgpt_worker, ctx["checkpoint"], ctx["bench"],
                           ctx["threads"], ctx["eval_cfg"])  # fmt: skip
    else:
        cache = str(Path(ctx["tmp"]) / f"hf-datasets-{round_no}")
        w = harness.Worker(method, _lm_eval_worker, ctx["export"], ctx["task"],
                           ctx["model_args"], cache)  # fmt: skip
    try:
        ready = w.call()
        result = w.call("run")
    finally:
        w.close()
    return {"method": method, "round": round_no, **ready, **result}


# ---------------------------------------------------------------------------------------------
# Items, model, server


def build_items(a: argparse.Namespace) -> Any:
    from medgpt.benchmark import BenchmarkConfig, SplitRule, build_benchmark, qa_sources

    cfg = BenchmarkConfig(qa_data=[a.qa_data], distractors=a.distractors,
                          answer_tokens=a.answer_tokens, small_types="any")  # fmt: skip
    rule = SplitRule.defaults()
    bench = build_benchmark(TASK, qa_sources(rule, cfg, TASK), rule, cfg, count_tokens=False)
    built = len(bench.items)
    if a.items:
        bench = dataclasses.replace(bench, items=bench.items[: a.items],
                                    description=dict(bench.description))  # fmt: skip
        bench.description["items"] = len(bench.items)
        bench.description["items_hash"] = bench.content_hash()
    return bench, built


def model_config(a: argparse.Namespace) -> Any:
    from medgpt.config import ModelConfig, from_mapping

    if a.size == RECIPE_SIZE:
        import yaml

        shape = yaml.safe_load((REPO / "configs/medquad-cpu.yaml").read_text())["model"]
        config = from_mapping(ModelConfig, shape)
    else:
        config = ModelConfig.preset(a.size)
    if a.block_size:
        config = from_mapping(ModelConfig, {**config.to_dict(), "block_size": a.block_size})
    return config


def sequence_lengths(bench: Any) -> list[int]:
    from medgpt.benchmark import context_tokens
    from medgpt.tokenizer import get_tokenizer

    enc = get_tokenizer()
    out = []
    for it in bench.items:
        n = len(context_tokens(enc, it))
        out.extend(n + len(bench.continuations[c]) for c in it.choices)
    return out


def warm_up(base: str, model_id: str, tokens: list[int]) -> None:
    """One request of each kind lm-eval sends, so that neither round pays the first ones."""
    import requests

    r = requests.post(f"{base}/tokenize", json={"prompt": "Question: warm-up"}, timeout=60)
    r.raise_for_status()
    body = {"model": model_id, "prompt": tokens, "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}  # fmt: skip
    r = requests.post(f"{base}/v1/completions", json=body, timeout=120)
    r.raise_for_status()


# ---------------------------------------------------------------------------------------------
# Report


def predictions(bench: Any, lls: dict[str, list[float]]) -> tuple[list[int], list[int]]:
    import numpy as np

    acc, norm = [], []
    for it in bench.items:
        ll = np.array(lls[it.id], dtype=np.float64)
        acc.append(int(np.argmax(ll)))
        norm.append(int(np.argmax(ll / np.array([float(len(c)) for c in it.choices]))))
    return acc, norm


def compare(bench: Any, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Agreement of one medgpt turn and one lm-eval turn: accuracies, predictions, scores."""
    a, b = ours["lls"], theirs["lls"]
    same_items = sorted(a) == sorted(b)
    out: dict[str, Any] = {
        "same_items": same_items,
        "acc_equal": abs(ours["acc"] - theirs["acc"]) < 1e-12,
        "acc_norm_equal": abs(ours["acc_norm"] - theirs["acc_norm"]) < 1e-12,
    }
    if same_items:
        pa, pn = predictions(bench, a)
        qa, qn = predictions(bench, b)
        out["items_acc_pick_differs"] = sum(x != y for x, y in zip(pa, qa, strict=True))
        out["items_acc_norm_pick_differs"] = sum(x != y for x, y in zip(pn, qn, strict=True))
        out["max_abs_loglik_diff"] = max(
            abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True)
        )
    out["agree"] = same_items and out["acc_equal"] and out["acc_norm_equal"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default=RECIPE_SIZE,
                   help=f"random-init model shape: {RECIPE_SIZE} (configs/medquad-cpu.yaml's, "
                   "the default) or a ModelConfig preset (tiny, gpt2, ...)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=0, help="override the size's context")
    p.add_argument("--checkpoint", help="score this medgpt checkpoint folder instead")
    p.add_argument("--qa-data", default=str(REPO.parent / "shared/data/medquad"),
                   help="the MedQuAD folder the items are built from")  # fmt: skip
    p.add_argument("--items", type=int, default=0, help="first N items; 0 = all (576)")
    p.add_argument("--distractors", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="lm-eval's num_concurrent")
    p.add_argument("--max-batch-size", type=int, default=16, help="the replica engine's rows")
    p.add_argument("--num-cpus", type=int, default=2,
                   help="Ray CPUs = the replica's CPUs and torch threads")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="the medgpt worker's torch threads")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    if a.items < 0 or a.rounds < 1 or a.concurrency < 1 or a.block_size < 0:
        p.error("--items >= 0, --rounds and --concurrency >= 1, --block-size >= 0")
    if a.checkpoint and (a.block_size or a.size != RECIPE_SIZE):
        p.error("--checkpoint: the checkpoint's shape is used; --size/--block-size do not apply")

    import torch

    from medgpt.benchmark import export_lm_eval, lm_eval_name
    from medgpt.checkpoint import read_config, save_checkpoint
    from medgpt.evaluation import EvalConfig
    from medgpt.model import GPT, count_params
    from medgpt.serving import ServeConfig

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    try:
        from importlib.metadata import version

        lm_eval_version = version("lm_eval")
    except Exception:
        lm_eval_version = "?"
    print(f"machine: {harness.cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"lm_eval {lm_eval_version}; load average before: {harness.fmt_load(load_before)}")  # fmt: skip

    t0 = time.perf_counter()
    bench, built = build_items(a)
    print(f"items: {len(bench.items)} of the {built} {TASK} items built from {a.qa_data} "
          f"({bench.description['pairs_read']} pairs read; medgpt prepare's default split, "
          f"small_types any, {a.distractors} distractors, options <= {a.answer_tokens} tokens) "
          f"in {time.perf_counter() - t0:.1f} s; items hash "
          f"{bench.description['items_hash'][:12]}")  # fmt: skip

    tmp_ctx = tempfile.TemporaryDirectory(prefix="eval_scoring_")
    tmp = Path(tmp_ctx.name)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    memory: dict[str, Any] = {}
    server: dict[str, Any] = {}
    started = False
    try:
        if a.checkpoint:
            checkpoint = str(Path(a.checkpoint).resolve())
            config, _ = read_config(checkpoint)
            what = f"checkpoint {a.checkpoint}"
        else:
            config = model_config(a)
            torch.manual_seed(0)
            model = GPT(config)
            what = f"{a.size} random init (seed 0)"
            checkpoint = str(tmp / "model")
            save_checkpoint(checkpoint, model, {"step": 0})
            del model
        if a.answer_tokens >= config.block_size - 1:
            raise SystemExit(f"--answer-tokens {a.answer_tokens}: the model's context is "
                             f"{config.block_size}; give --block-size > {a.answer_tokens + 1}")  # fmt: skip
        params = count_params(config, non_embedding=False)
        lengths = sequence_lengths(bench)
        # medgpt keeps a sequence's last block_size + 1 tokens, lm-eval its last max_length.
        max_length = config.block_size - 1
        truncated = {"medgpt": sum(n > config.block_size + 1 for n in lengths),
                     "lm-eval": sum(n > max_length for n in lengths)}  # fmt: skip
        print(f"model: {what}; {config.n_layer} layers, {config.n_head} heads, {config.n_embd} "
              f"wide, context {config.block_size}, {params / 1e6:.1f}M params; sequences "
              f"{len(lengths)} of {min(lengths)}-{max(lengths)} tokens (mean "
              f"{statistics.fmean(lengths):.0f}); truncated: medgpt {truncated['medgpt']}, "
              f"lm-eval {truncated['lm-eval']}")  # fmt: skip
        export = export_lm_eval([bench], tmp / "lm-eval")
        task = lm_eval_name(TASK)

        ns = argparse.Namespace(checkpoint=checkpoint, storage_path=str(tmp / "storage"),
                                size=a.size, num_cpus=a.num_cpus, int8=False,
                                max_batch_size=a.max_batch_size,
                                kv_cache_tokens=ServeConfig().kv_cache_tokens or 0)  # fmt: skip
        started = True
        base, server = serve_http.start_server(ns, tmp)
        pid, how = serve_http.replica_pid(server["dashboard_url"])
        server["replica_pid"], server["replica_pid_from"] = pid, how
        if pid is not None:
            memory["after_start"] = serve_http.proc_memory(pid)
            server["peak_reset_after_start"] = serve_http.reset_peak(pid)
        status, models = serve_http._http_get(base + "/v1/models")
        if status != 200 or not isinstance(models, dict):
            raise RuntimeError(f"{base}/v1/models: {status} {models}")
        model_id = models["data"][0]["id"]
        from medgpt.benchmark import context_tokens
        from medgpt.tokenizer import get_tokenizer

        first = bench.items[0]
        warm_up(base, model_id, [*context_tokens(get_tokenizer(), first),
                                 *bench.continuations[first.choices[0]]][-max_length:])  # fmt: skip
        model_args = (f"model={model_id},base_url={base}/v1/completions,max_length={max_length},"
                      f"num_concurrent={a.concurrency}")  # fmt: skip
        print(f"server: Ray {server['ray_version']} (private local cluster, {a.num_cpus} CPUs), "
              f"Serve at {base}, model {model_id!r}, one replica (max_batch_size "
              f"{a.max_batch_size}, {a.num_cpus} threads), ready in {server['startup_s']:.0f} s; "
              f"lm-eval model_args {model_args}")  # fmt: skip

        eval_defaults = EvalConfig()
        ctx = {"checkpoint": checkpoint, "bench": bench, "threads": a.threads,
               "eval_cfg": {"batch_tokens": eval_defaults.batch_tokens,
                            "head_chunk": eval_defaults.head_chunk},
               "export": str(export), "task": task, "model_args": model_args,
               "tmp": str(tmp)}  # fmt: skip
        for r in range(a.rounds):
            for m in harness.in_turn(list(METHODS), r):
                print(f"  round {r + 1}/{a.rounds}: {m}", file=sys.stderr)
                run = run_turn(m, ctx, r)
                runs[m].append(run)
                print(f"  round {r + 1}: {METHODS[m]:<32} {run['seconds']:7.2f} s "
                      f"{run['items'] / run['seconds']:7.2f} items/s  acc {run['acc']:.4f} "
                      f"acc_norm {run['acc_norm']:.4f}")  # fmt: skip
                if m == "lm-eval" and pid is not None:
                    memory[f"after_round_{r + 1}"] = serve_http.proc_memory(pid)
    finally:
        try:
            if started:
                serve_http.stop_server()
        finally:
            tmp_ctx.cleanup()
    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start

    summary: dict[str, Any] = {}
    for m in METHODS:
        secs = statistics.median(x["seconds"] for x in runs[m])
        summary[m] = {
            "items": runs[m][0]["items"],
            "seconds": secs,
            "items_per_s": runs[m][0]["items"] / secs,
            "acc": runs[m][0]["acc"],
            "acc_norm": runs[m][0]["acc_norm"],
            "peak_rss_mib": max(x["peak_rss_mib"] for x in runs[m]),
            "setup_s": statistics.median(x["setup_s"] for x in runs[m]),
        }
    theirs = summary["lm-eval"]
    for k in ("loglikelihood_s", "completions_s", "lm_eval_total_evaluation_time_s"):
        theirs[k] = statistics.median(x[k] for x in runs["lm-eval"])
    serving = [v["VmHWM"] for k, v in memory.items() if k != "after_start" and "VmHWM" in v]
    replica = {
        "pid": server.get("replica_pid"),
        "found_via": server.get("replica_pid_from"),
        "peak_rss_mib_after_start": memory.get("after_start", {}).get("VmHWM", 0) / 2**20,
        "peak_rss_mib_while_scoring": max(serving) / 2**20 if serving else None,
        "peak_reset_after_start": server.get("peak_reset_after_start"),
    }
    agreement = [compare(bench, o, t) for o, t in zip(runs["medgpt"], runs["lm-eval"],
                                                       strict=True)]  # fmt: skip
    agree = all(x["agree"] for x in agreement)
    consistent = all(len({(x["acc"], x["acc_norm"]) for x in runs[m]}) == 1 for m in METHODS)

    print()
    print(f"Scoring {summary['medgpt']['items']} {TASK} items ({len(lengths)} sequences), "
          f"{what}, {a.rounds} round(s), medians; peak RSS of the scoring process")  # fmt: skip
    print(f"{'method':<34}{'items':>6}{'s':>9}{'items/s':>9}{'acc':>8}{'acc_norm':>10}"
          f"{'peak RSS':>12}")  # fmt: skip
    for m, label in METHODS.items():
        s = summary[m]
        print(f"{label:<34}{s['items']:>6}{s['seconds']:>9.2f}{s['items_per_s']:>9.2f}"
              f"{s['acc']:>8.4f}{s['acc_norm']:>10.4f}{s['peak_rss_mib']:>8.0f} MiB")  # fmt: skip
    ratio = summary["medgpt"]["items_per_s"] / theirs["items_per_s"]
    print(f"HEADLINE items/s, medgpt / lm-eval over HTTP: {ratio:.2f}x")
    n = theirs["items"]
    print(f"lm-eval phases (median): whole simple_evaluate {theirs['seconds']:.2f} s; "
          f"loglikelihood (/tokenize + scoring) {theirs['loglikelihood_s']:.2f} s "
          f"({n / theirs['loglikelihood_s']:.2f} items/s); /v1/completions requests alone "
          f"{theirs['completions_s']:.2f} s ({n / theirs['completions_s']:.2f} items/s, "
          f"medgpt / that {summary['medgpt']['items_per_s'] * theirs['completions_s'] / n:.2f}x); "
          f"lm-eval's total_evaluation_time_seconds "
          f"{theirs['lm_eval_total_evaluation_time_s']:.2f} s; set-up not timed (import, "
          f"TaskManager) {theirs['setup_s']:.1f} s")  # fmt: skip
    if replica["peak_rss_mib_while_scoring"] is not None:
        print(f"replica pid {replica['pid']} (via {replica['found_via']}): peak RSS while "
              f"scoring {replica['peak_rss_mib_while_scoring']:.0f} MiB"
              f"{' (VmHWM reset after start-up)' if replica['peak_reset_after_start'] else ''}, "
              f"after start-up {replica['peak_rss_mib_after_start']:.0f} MiB; lm-eval client "
              f"{theirs['peak_rss_mib']:.0f} MiB")  # fmt: skip
    else:
        print(f"replica peak RSS: unavailable ({replica['found_via']})")
    last = agreement[-1]
    print(f"acc and acc_norm agree: {agree} (medgpt {summary['medgpt']['acc']:.4f} / "
          f"{summary['medgpt']['acc_norm']:.4f}, lm-eval {theirs['acc']:.4f} / "
          f"{theirs['acc_norm']:.4f}); items picked differently: acc "
          f"{last.get('items_acc_pick_differs')}, acc_norm "
          f"{last.get('items_acc_norm_pick_differs')}; max |option log-likelihood difference| "
          f"{last.get('max_abs_loglik_diff', float('nan')):.2e}; same figures every round: "
          f"{consistent}")  # fmt: skip
    if not agree:
        why = (f" ({truncated['lm-eval']} sequences longer than lm-eval's max_length "
               f"{max_length}: the methods score those with different contexts)"
               if truncated["lm-eval"] else ": the same scores should rank the same way: A BUG")  # fmt: skip
        print(f"WARNING: medgpt and lm-eval DISAGREE{why}: {agreement}")
    print(f"load average after: {harness.fmt_load(load_after)}; wall {wall:.0f} s")

    if a.json:
        for m in METHODS:
            for x in runs[m]:
                x.pop("lls", None)
        harness.write_json(
            a.json, a,
            machine={"cpu": harness.cpu_name(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__, "lm_eval": lm_eval_version},
            items={"count": len(bench.items), "built": built, "sequences": len(lengths),
                   "tokens_min_mean_max": [min(lengths), statistics.fmean(lengths),
                                           max(lengths)],
                   "truncated": truncated, "description": bench.description},
            model={"what": what, "config": config.to_dict(), "params": params,
                   "model_args": model_args},
            server={k: v for k, v in server.items() if k != "dashboard_url"},
            replica=replica, replica_memory=memory, runs=runs, summary=summary,
            ratio_items_per_s_medgpt_over_lm_eval=ratio, agreement=agreement, agree=agree,
            load_average_before=load_before, load_average_after=load_after, wall_s=wall,
        )  # fmt: skip
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
