"""The GPU check: a few minutes on one lent GPU that say whether medgpt's GPU paths work and how
fast they are, against stated targets, in one command (``make gpu-check``).

Steps (each in its own subprocess with its own time limit; a failure is reported and the next
step still runs):

1. ``gpu tests``     ``pytest -m gpu``: the CUDA-only tests; passed / failed / skipped counts.
2. ``train ddp``     GPT-2 124M (configs/medquad-124m.yaml, a few dozen steps) through
                     ``medgpt.launch.train``: Ray Train, one worker per visible GPU, NCCL, bf16
                     autocast, ``torch.compile``. Tokens/s and MFU are the run's own reported
                     metrics (``tokens_per_s``, ``mfu`` in MLflow; MFU against
                     ``training.gpu_peak_flops``), medians over the steps after the warm-up
                     (compilation). Target: MFU >= 40% on H100/H200-class GPUs.
3. ``train fsdp``    the same with ``job.strategy=fsdp`` (with one GPU there is nothing to
                     shard: the loop runs unsharded, so this checks the setting's plumbing).
4. ``plan xl``       ``medgpt plan`` for gpt2-xl (48 layers, 25 heads, 1600 wide) at the
                     recipe's micro-batch with activation checkpointing on an H100-80GB: its
                     verdict line. Beside it, the plan of step 2's run against the memory step 2
                     measured.
5. ``decode``        batch-1 greedy decode tokens/s of ``medgpt.generation.Engine`` against
                     ``transformers`` ``GPT2LMHeadModel.generate`` on the same GPU, same weights
                     (a random 124M model exported with ``medgpt.hf.save_hf_gpt2``), bf16.
                     Decode speed excludes prefill: (N - 1) / (t_N - t_1), as
                     bench/serve_engine.py measures it. Target: >= 1.5x.
6. ``serve``         ``medgpt serve --num-gpus 1 --device cuda`` on a random 124M checkpoint:
                     one POST /v1/completions must answer 200 with text; then Ctrl-C stops it.

Peak memory is printed beside each speed: ``torch.cuda.max_memory_allocated`` on the GPU (in the
training workers: the largest over the ranks), peak RSS on the CPU. The last screen is the
summary: each step's status (OK / FAIL / SKIP), figure and target. Exit 1 when any step failed
(a missed target is a failure), 2 when there is no CUDA device (use ``--cpu``).

``--cpu`` runs the same steps on the CPU with a tiny model (2 layers, 64 wide), a few steps,
fp32, gloo (two workers, so FSDP really shards), the GPU tests reported as skipped and a CPU
Serve replica (``--num-gpus 0``): it proves that the script and every step's plumbing work
(about 100 s on 2 busy cores); its figures are not GPU figures and no target applies.

Ray: a private local cluster (``ray start --head`` in a temp dir, stopped at the end) unless
RAY_ADDRESS names one. Everything else (data: the builtin ICD-10-CM corpus, as the quickstart
prepares it; checkpoints; MLflow) goes to a work folder (``--work``, default a new temp
folder); logs stay there, run folders and models are removed unless ``--keep``. No downloads.

    .venv/bin/python bench/gpu_check.py                 # on a GPU machine (make gpu-check)
    .venv/bin/python bench/gpu_check.py --cpu           # the plumbing, on a CPU
    .venv/bin/python bench/gpu_check.py --only train_ddp,decode --keep --work /tmp/gc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgpt.testing import REPO, free_port, peak_rss_mib

# (name, title) in the order they run; the summary lists every one.
STEPS = [
    ("gpu_tests", "CUDA-only tests (pytest -m gpu)"),
    ("train_ddp", "train, DDP (Ray Train)"),
    ("train_fsdp", "train, FSDP (Ray Train)"),
    ("plan_xl", "gpt2-xl fit (medgpt plan)"),
    ("decode", "decode: Engine vs HF generate"),
    ("serve", "Serve replica /v1/completions"),
]
RAY_STEPS = {"train_ddp", "train_fsdp", "serve"}
# Seconds per step: GPU mode includes torch.compile (about a minute for 124M), CPU mode runs
# beside other work on 2 cores.
TIMEOUTS = {
    "gpu": {"gpu_tests": 420, "train_ddp": 480, "train_fsdp": 360, "plan_xl": 60,
            "decode": 300, "serve": 300},
    "cpu": {"gpu_tests": 120, "train_ddp": 150, "train_fsdp": 150, "plan_xl": 60,
            "decode": 120, "serve": 180},
}  # fmt: skip
MFU_TARGET = 0.40  # on H100/H200-class GPUs
MFU_TARGET_GPUS = ("H100", "H200")
DECODE_TARGET = 1.5  # Engine / HF generate at batch 1
PLAN_GPU = "H100-80GB"
XL = {"model.n_layer": 48, "model.n_head": 25, "model.n_embd": 1600}
PROMPT = (
    "The patient is a 64-year-old man with type 2 diabetes mellitus, hypertension and chronic "
    "kidney disease stage 3, admitted with shortness of breath and swelling of both legs."
)
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# What a step returns, and the step's context


def result(status: str, figure: str, target: str = "", memory: str = "", **extra: Any) -> dict:
    return {"status": status, "figure": figure, "target": target, "memory": memory, **extra}


class Ctx:
    """Where a step runs: the mode, the work folder, the GPUs."""

    def __init__(self, cpu: bool, work: Path) -> None:
        self.cpu = cpu
        self.work = work
        self.mode = "cpu" if cpu else "gpu"

    @property
    def gpus(self) -> int:
        import torch

        return 0 if self.cpu else torch.cuda.device_count()

    @property
    def gpu_name(self) -> str:
        import torch

        return "" if self.cpu else torch.cuda.get_device_name(0)

    def peak_memory(self) -> str:
        """This process's peak: the GPU's allocator peak, else resident memory."""
        if self.cpu:
            return f"{peak_rss_mib():,.0f} MiB RSS"
        import torch

        return f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB GPU"


def data_dir(ctx: Ctx) -> Path:
    """The builtin ICD-10-CM corpus prepared into the work folder (as the quickstart does;
    a second call finds it unchanged). A quarter for validation: eval on many GPUs needs a
    micro-batch of held-out windows per worker."""
    from medgpt.data.prepare import PrepareConfig, prepare

    out = ctx.work / "data" / "icd10cm"
    cfg = PrepareConfig(sources=["builtin:icd10cm"], out=str(out), val_fraction=0.25)
    prepare(cfg, progress=False)
    return out


def model_config(ctx: Ctx) -> Any:
    from medgpt.config import ModelConfig

    if ctx.cpu:
        return ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=256)
    return ModelConfig()  # GPT-2 124M


def random_checkpoint(ctx: Ctx) -> Path:
    """A random model (seed 0) as a medgpt checkpoint, saved once per work folder; decode speed
    and serving do not depend on what the weights learned."""
    import torch

    from medgpt.checkpoint import is_checkpoint, save_checkpoint
    from medgpt.model import GPT

    path = ctx.work / "models" / f"random-{ctx.mode}"
    if not is_checkpoint(path):
        torch.manual_seed(0)
        save_checkpoint(path, GPT(model_config(ctx)), {"step": 0})
    return path


# ---------------------------------------------------------------------------------------------
# 1. pytest -m gpu


def step_gpu_tests(ctx: Ctx) -> dict:
    import xml.etree.ElementTree as ET

    junit = ctx.work / "gpu-tests.xml"
    # Without this run's Ray settings: the tests start (or skip) their own cluster, as in any
    # test session. -m gpu overrides the default "not slow": GPU tests run whatever else they
    # are marked.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q",
           f"--junitxml={junit}", "tests"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
    if not junit.is_file():
        return result("FAIL", f"pytest exited {rc} without a report")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = n["failures"] + n["errors"]
    figure = f"{passed} passed, {bad} failed, {n['skipped']} skipped"
    if bad:
        return result("FAIL", figure, "all pass", counts=n)
    if ctx.cpu:
        return result("SKIP", figure + " (no CUDA here)", "all pass (on a GPU)", counts=n)
    if n["tests"] == 0 or rc == 5:
        return result("FAIL", "no test is marked gpu", "all pass", counts=n)
    if passed == 0:
        return result("FAIL", figure + ": none ran on this GPU", "all pass", counts=n)
    return result("OK", figure, "all pass", counts=n)


# ---------------------------------------------------------------------------------------------
# 2, 3. Training through Ray Train


def measured_loop(out_dir: str) -> Callable[[dict[str, Any]], None]:
    """medgpt's ``train_loop_per_worker``, and after it, on every rank, what only the worker can
    see: the allocator's peak, the process group's backend and one all-reduce over it (with one
    GPU the loop itself never communicates). Ray pickles this closure by value."""

    def loop(config: dict[str, Any]) -> None:
        import json
        from pathlib import Path

        import ray.train
        import ray.train.torch
        import torch
        import torch.distributed as dist

        from medgpt.testing import peak_rss_mib
        from medgpt.training import train_loop_per_worker

        train_loop_per_worker(config)
        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
        device = ray.train.torch.get_device()
        rec: dict[str, Any] = {"rank": rank, "world": world, "device": str(device),
                               "peak_rss_mib": peak_rss_mib()}  # fmt: skip
        if device.type == "cuda":
            rec["gpu"] = torch.cuda.get_device_name(device)
            rec["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        if dist.is_initialized():
            rec["backend"] = str(dist.get_backend())
            t = torch.ones(1, device=device)
            dist.all_reduce(t)
            rec["all_reduce_ok"] = float(t.item()) == float(world)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec))

    return loop


def train_overrides(ctx: Ctx, strategy: str, data: Path, name: str) -> dict[str, Any]:
    """Step 2's and 3's recipe changes: a short run into the work folder, evaluated and
    checkpointed once at its end, no text samples."""
    common = {
        "train.data_dir": str(data),
        "job.storage_path": str(ctx.work / "runs"),
        "job.name": name,
        "job.strategy": strategy,
        "job.max_failures": 0,
        "train.sample_tokens": 0,
        "train.keep_checkpoints": 1,
    }
    if ctx.cpu:
        workers, mb, seq, accum, steps = 2, 4, 64, 1, 8
        return common | {
            "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 64,
            "train.seq_len": seq, "train.micro_batch_size": mb,
            "train.batch_tokens": mb * seq * workers * accum, "train.max_steps": steps,
            "train.warmup_steps": 1, "train.eval_every": steps, "train.checkpoint_every": steps,
            "train.eval_batches": 2, "train.log_every": 4, "train.threads_per_worker": 1,
            "job.num_workers": workers, "job.cpus_per_worker": 1, "job.use_gpu": False,
        }  # fmt: skip
    workers = ctx.gpus
    mb, seq, accum, steps = 16, 1024, 4, 40  # the recipe's micro-batch; 64k tokens per GPU-step
    cpus = max(1, min(8, ((os.cpu_count() or 2) - 2) // workers))
    return common | {
        "train.seq_len": seq, "train.micro_batch_size": mb,
        "train.batch_tokens": mb * seq * workers * accum, "train.max_steps": steps,
        "train.warmup_steps": 5, "train.eval_every": steps, "train.checkpoint_every": steps,
        "train.eval_batches": 2 * workers, "train.log_every": 10, "train.compile": True,
        "job.num_workers": workers, "job.cpus_per_worker": cpus, "job.use_gpu": True,
    }  # fmt: skip


def train_recipe(ctx: Ctx, overrides: dict[str, Any]) -> Any:
    """configs/medquad-124m.yaml (GPU) or configs/tiny-cpu.yaml (CPU) with ``overrides``, read
    as `medgpt train --config ... --set ...` reads them."""
    from medgpt.config import Override, Recipe, apply_overrides, load_yaml

    base = REPO / "configs" / ("tiny-cpu.yaml" if ctx.cpu else "medquad-124m.yaml")
    data = load_yaml(base, skip=list(overrides))
    return Recipe.from_dict(
        apply_overrides(data, [Override(k, v, f"{k}={v}") for k, v in overrides.items()])
    )


def warm_steps(ctx: Ctx) -> int:
    """Steps left out of the medians: compilation and autotuning on a GPU, start-up on a CPU."""
    return 2 if ctx.cpu else 10


def step_train(ctx: Ctx, strategy: str) -> dict:
    import medgpt.launch as launch
    from medgpt.training import compile_problem

    data = data_dir(ctx)
    name = f"gpu-check-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = train_overrides(ctx, strategy, data, name)
    recipe = train_recipe(ctx, overrides)
    job = recipe.job
    mem_dir = ctx.work / "train-memory" / name
    problem = None if ctx.cpu else compile_problem()
    print(f"recipe: {json.dumps(recipe.to_dict(), indent=1)}", flush=True)
    # The real driver (validation, Ray, MLflow, TorchTrainer) around the real loop; the wrapper
    # only adds readings after it.
    launch.train_loop_per_worker = measured_loop(str(mem_dir))
    t0 = time.perf_counter()
    res = launch.train(recipe)
    wall = time.perf_counter() - t0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=res.mlflow_tracking_uri)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(res.mlflow_run_id, key))

    skip = warm_steps(ctx)
    tps_all, mfu_all = history("tokens_per_s"), history("mfu")
    tps = [v for s, v in tps_all if s > skip]
    mfu = [v for s, v in mfu_all if s > skip]
    if not tps or not mfu:
        return result("FAIL", f"no tokens_per_s/mfu metrics after step {skip} in MLflow run "
                      f"{res.mlflow_run_id} ({len(tps_all)} recorded)")  # fmt: skip
    ranks = [json.loads(p.read_text()) for p in sorted(mem_dir.glob("rank*.json"))]
    tps_med, mfu_med = statistics.median(tps), statistics.median(mfu)
    backend = ",".join(sorted({r.get("backend", "none") for r in ranks})) or "?"
    workers = job.num_workers
    figure = f"{tps_med:,.0f} tokens/s, MFU {100 * mfu_med:.1f}%"
    from medgpt.model import count_params

    shape = recipe.model
    precision = (
        "fp32"
        if ctx.cpu
        else "bf16 autocast, " + ("torch.compile" if problem is None else f"EAGER: {problem}")
    )
    val = res.final_val_loss
    notes = [
        f"{count_params(shape, non_embedding=False) / 1e6:.1f}M params ({shape.n_layer} x "
        f"{shape.n_embd}), {workers} worker(s), {backend}, {precision}",
        f"median of steps {skip + 1}-{recipe.train.max_steps} at "
        f"{recipe.train.batch_tokens:,} tokens/step; run {wall:.0f} s; final val_loss "
        + ("-" if val is None else f"{val:.3f}"),
    ]
    if strategy == "fsdp" and workers == 1:
        notes.append("one worker: nothing to shard, the loop ran unsharded (FSDP needs 2+ GPUs)")
    if ctx.cpu:
        rss = max((r["peak_rss_mib"] for r in ranks), default=float("nan"))
        memory = f"{rss:,.0f} MiB RSS/worker"
    else:
        peak = max((r.get("max_memory_allocated", 0) for r in ranks), default=0)
        memory = f"{peak / GIB:.2f} GiB GPU/worker"
    status, target = "OK", ""
    if len(ranks) != workers:
        status = "FAIL"
        notes.append(f"only {len(ranks)} of {workers} workers wrote their readings")
    if not all(r.get("all_reduce_ok") for r in ranks):
        status = "FAIL"
        notes.append(f"the all-reduce over {backend} after training gave a wrong sum")
    if not ctx.cpu and backend != "nccl":
        status = "FAIL"
        notes.append(f"process group backend {backend}, expected nccl")
    if strategy == "ddp":
        applies = any(g in ctx.gpu_name.upper() for g in MFU_TARGET_GPUS)
        if ctx.cpu:
            target = f"(GPU: MFU >= {MFU_TARGET:.0%} on H100/H200)"
        elif applies:
            target = f"MFU >= {MFU_TARGET:.0%}"
            if mfu_med < MFU_TARGET:
                status = "FAIL"
                notes.append(f"MFU below the {MFU_TARGET:.0%} target")
        else:
            target = f"n/a on {ctx.gpu_name} (MFU >= {MFU_TARGET:.0%} is for H100/H200)"
    else:
        target = "runs (no MFU target)"
    return result(status, figure, target, memory, notes=notes, tokens_per_s=tps_med, mfu=mfu_med,
                  workers=workers, backend=backend, compile_problem=problem, seconds=wall,
                  memory_bytes=max((r.get("max_memory_allocated", 0) for r in ranks), default=0),
                  overrides=overrides)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4. medgpt plan


def run_plan(sets: dict[str, Any], storage: Path) -> tuple[int, str, str]:
    """`medgpt plan --config configs/medquad-124m.yaml --set ... --gpu PLAN_GPU`: (exit status,
    its output, the verdict line)."""
    medgpt = Path(sys.executable).parent / "medgpt"
    cmd = [str(medgpt), "plan", "--config", str(REPO / "configs" / "medquad-124m.yaml"),
           "--storage", str(storage), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
           "--gpu", PLAN_GPU]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=50, check=False)
    print(proc.stdout + proc.stderr, flush=True)
    verdicts = [line.strip() for line in proc.stdout.splitlines()
                if line.startswith(("fits:", "does not fit:"))]  # fmt: skip
    return proc.returncode, proc.stdout, verdicts[-1] if verdicts else ""


def step_plan(ctx: Ctx) -> dict:
    storage = ctx.work / "plan"
    rc, _, verdict = run_plan({**XL, "train.activation_checkpointing": "true"}, storage)
    target = f"gpt2-xl, micro-batch 16 x 1024, act. checkpointing: fits {PLAN_GPU}"
    notes = []
    # The planner against a measurement: step 2's run (same shape and micro-batch, no
    # activation checkpointing), if it ran in this work folder.
    ddp = ctx.work / "results" / "train_ddp.json"
    if not ctx.cpu and ddp.is_file():
        measured = json.loads(ddp.read_text())
        if measured.get("memory_bytes"):
            _, _, v124 = run_plan({"job.num_workers": measured["workers"]}, storage)
            notes.append(f"124M recipe plan: {v124 or '?'}; step 2 measured "
                         f"{measured['memory_bytes'] / GIB:.1f} GiB (max_memory_allocated, "
                         "torch.compile)")  # fmt: skip
    if not verdict:
        return result("FAIL", f"medgpt plan exited {rc} without a verdict line", target)
    status = "OK" if rc == 0 and verdict.startswith("fits:") else "FAIL"
    return result(status, verdict, target, notes=notes)


# ---------------------------------------------------------------------------------------------
# 5. Engine vs HF generate


def prompt_ids(n: int) -> list[int]:
    from medgpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary(PROMPT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def decode_rate(generate: Callable[[list[int], int], list[int]], sync: Callable[[], None],
                ids: list[int], n: int, rounds: int) -> tuple[float, list[int]]:  # fmt: skip
    """Median over ``rounds`` of (n - 1) / (t_n - t_1): decode tokens/s without the prefill."""
    generate(ids, min(8, n))  # warm-up: kernels, allocator, first-call paths
    rates, tokens = [], []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        tokens = generate(ids, n)
        sync()
        t_n = time.perf_counter() - t0
        t_1s = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate(ids, 1)
            sync()
            t_1s.append(time.perf_counter() - t0)
        rates.append((n - 1) / max(t_n - statistics.median(t_1s), 1e-9))
    return statistics.median(rates), tokens


def step_decode(ctx: Ctx) -> dict:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from medgpt.checkpoint import load_model
    from medgpt.generation import Engine, SamplingParams
    from medgpt.hf import save_hf_gpt2

    hf_logging.disable_progress_bar()
    device = torch.device("cpu" if ctx.cpu else "cuda")
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    n, rounds = (32, 3) if ctx.cpu else (128, 3)
    if ctx.cpu:
        # One thread: on a small CPU shared with other work, two threads' OpenMP barriers made
        # the engine's small steps 50x slower in turns, which says nothing about the plumbing.
        torch.set_num_threads(1)
    ids = prompt_ids(32)
    ckpt = random_checkpoint(ctx)
    hf_dir = ctx.work / "models" / f"random-{ctx.mode}-hf"
    if not (hf_dir / "config.json").is_file():
        save_hf_gpt2(load_model(ckpt), hf_dir, overwrite=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    reset_peak()
    model: Any = load_model(ckpt, device=device).to(dtype=dtype)
    engine: Any = Engine(model, max_batch_size=1)

    def gen_engine(x: list[int], k: int) -> list[int]:
        return engine.generate(x, SamplingParams(max_new_tokens=k, temperature=0))["token_ids"]

    ours, ours_tokens = decode_rate(gen_engine, sync, ids, n, rounds)
    ours_mem = ctx.peak_memory()
    fast = engine.fast_linear
    engine = model = None  # freed before the baseline loads: each peak is its own
    reset_peak()
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=dtype).to(device).eval()

    @torch.no_grad()
    def gen_hf(x: list[int], k: int) -> list[int]:
        t = torch.tensor([x], device=device)
        out = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=k,
                          min_new_tokens=k, do_sample=False, use_cache=True,
                          pad_token_id=hf.config.eos_token_id)  # fmt: skip
        return out[0, len(x) :].tolist()

    base, hf_tokens = decode_rate(gen_hf, sync, ids, n, rounds)
    hf_mem = ctx.peak_memory()
    ratio = ours / base
    same = next(
        (i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=False)) if a != b), n
    )
    figure = f"Engine {ours:,.0f} vs HF {base:,.0f} tokens/s = {ratio:.2f}x"
    target = f"(GPU: >= {DECODE_TARGET}x)" if ctx.cpu else f">= {DECODE_TARGET}x"
    # On the CPU one process's peak RSS covers both.
    memory = f"{hf_mem} (both)" if ctx.cpu else f"{ours_mem} / {hf_mem}"
    dtype_name = str(dtype).removeprefix("torch.")
    where = f"cpu, {torch.get_num_threads()} thread" if ctx.cpu else torch.cuda.get_device_name()
    notes = [f"batch 1, greedy, {len(ids)}-token prompt, {n} new tokens, {dtype_name} on "
             f"{where}, median of {rounds} rounds" + ("" if ctx.cpu else "; peak: Engine / HF"),
             f"engine fast_linear={fast}; greedy tokens agree for the first {same} of {n}"]  # fmt: skip
    status = "OK"
    if not ctx.cpu and ratio < DECODE_TARGET:
        status = "FAIL"
        notes.append(f"below the {DECODE_TARGET}x target")
    return result(status, figure, target, memory, notes=notes, engine_tokens_per_s=ours,
                  hf_tokens_per_s=base, ratio=ratio)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 6. A Serve replica


def step_serve(ctx: Ctx) -> dict:
    import requests
    import yaml

    from medgpt.demo import wait_http

    ckpt = random_checkpoint(ctx)
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    args = raw["applications"][0]["args"]
    # One replica; on the CPU half a core, so it fits a 2-CPU test cluster.
    args.update({"num_cpus": 0.5 if ctx.cpu else 2, "min_replicas": 1, "max_replicas": 1})
    config = ctx.work / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    medgpt = Path(sys.executable).parent / "medgpt"
    cmd = [str(medgpt), "serve", "--config", str(config), "--checkpoint", str(ckpt),
           "--storage-path", str(ctx.work / "serve-store"), "--port", str(port),
           "--num-gpus", "0" if ctx.cpu else "1", "--device", "cpu" if ctx.cpu else "cuda"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    # Same process group as this step: a step that runs out of time is killed with it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ)
    t0 = time.perf_counter()
    stopped = False
    try:
        wait_http(f"{url}/healthz", TIMEOUTS[ctx.mode]["serve"] - 30,
                  alive=lambda: proc.poll() is None)  # fmt: skip
        ready_s = time.perf_counter() - t0
        card = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        body = {"prompt": "Asthma is", "max_tokens": 16, "temperature": 0}
        t1 = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        latency = time.perf_counter() - t1
        out = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        text = (out.get("choices") or [{}])[0].get("text")
        tokens = (out.get("usage") or {}).get("completion_tokens", 0)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        print(f"/v1/completions -> {r.status_code} {json.dumps(out)[:500]}", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
            stopped = True
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    notes = [f"replica on {card.get('device')} ({card.get('dtype')}), ready in {ready_s:.0f} s, "
             f"engine {health.get('finished')}; stopped by Ctrl-C: "
             f"{'yes' if stopped else 'no (killed)'}"]  # fmt: skip
    figure = f"HTTP {r.status_code}, {tokens} tokens in {latency:.2f} s"
    want_device = "cpu" if ctx.cpu else "cuda"
    status = "OK"
    if r.status_code != 200 or not isinstance(text, str) or tokens < 1:
        status = "FAIL"
        notes.append(f"expected 200 with text, got {r.status_code}: {r.text[:200]}")
    if not str(card.get("device", "")).startswith(want_device):
        status = "FAIL"
        notes.append(f"the replica runs on {card.get('device')}, expected {want_device}")
    if not stopped:
        status = "FAIL"
        notes.append("medgpt serve did not stop within 60 s of Ctrl-C")
    return result(status, figure, "200 + text", notes=notes, text=text)


STEP_FUNCS: dict[str, Callable[[Ctx], dict]] = {
    "gpu_tests": step_gpu_tests,
    "train_ddp": lambda ctx: step_train(ctx, "ddp"),
    "train_fsdp": lambda ctx: step_train(ctx, "fsdp"),
    "plan_xl": step_plan,
    "decode": step_decode,
    "serve": step_serve,
}


def run_step_here(name: str, ctx: Ctx, out: Path) -> int:
    """The child side: run one step, write its result (or its error) as JSON."""
    try:
        res = STEP_FUNCS[name](ctx)
    except BaseException as e:  # a step's failure is its result
        traceback.print_exc()
        line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        res = result("FAIL", f"{type(e).__name__}: {line}"[:300])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: Ray, one subprocess per step, the summary


class Cluster:
    """A private Ray head for the Ray steps (unless RAY_ADDRESS names one), started when the
    first Ray step needs it and stopped at the end."""

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus
        self.temp: Path | None = None
        self.error: str | None = None
        self.external = bool(os.environ.get("RAY_ADDRESS"))

    def ensure(self) -> str | None:
        """None when a cluster is reachable through RAY_ADDRESS, else why not."""
        if self.external or self.temp is not None or self.error:
            return self.error
        from medgpt.testing.ray_cluster import export_auth_env, make_temp_dir, start_head

        t0 = time.perf_counter()
        export_auth_env()  # token auth, and faster Train polling, for the head and every child
        # The tests' 30 s for a worker group to start is short for a first CUDA import on a
        # fresh machine.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "180"
        self.temp = make_temp_dir("gpucheck-")
        try:
            head = start_head(self.temp, num_cpus=self.num_cpus)
        except Exception as e:
            self.error = f"Ray did not start: {str(e).strip().splitlines()[-1]}"
            return self.error
        os.environ["RAY_ADDRESS"] = head["address"]
        os.environ["RAY_API_SERVER_ADDRESS"] = head["dashboard"]
        print(f"Ray head at {head['address']} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return None

    def stop(self) -> None:
        if self.temp is None:
            return
        from medgpt.testing.ray_cluster import stop_test_clusters

        stop_test_clusters(grace_s=5.0, marker=str(self.temp).encode())
        shutil.rmtree(self.temp, ignore_errors=True)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            os.environ.pop(key, None)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT the step's process group (Ctrl-C: Serve and Ray drivers shut down), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step_child(name: str, args: argparse.Namespace, work: Path) -> dict:
    """One step in its own process (and process group), killed when out of time."""
    out = work / "results" / f"{name}.json"
    out.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    limit = round(TIMEOUTS["cpu" if args.cpu else "gpu"][name] * args.timeout_scale)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_step", name, "--work", str(work),
           *(["--cpu"] if args.cpu else [])]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except BaseException:  # Ctrl-C here: the step's own session would not get it
            stop_group(proc)
            raise
    seconds = time.perf_counter() - t0
    if timed_out:
        res = result("FAIL", f"timed out after {limit} s")
    elif out.is_file():
        res = json.loads(out.read_text())
    else:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        res = result("FAIL", f"step exited {proc.returncode} without a result: "
                     f"{(tail or ['(no output)'])[-1][:200]}")  # fmt: skip
    res["seconds"] = seconds
    res["log"] = str(log)
    res["limit_s"] = limit
    return res


def machine_line(cpu: bool) -> str:
    import platform

    import torch

    from medgpt.testing.bench import cpu_name

    parts = [f"torch {torch.__version__}", f"Python {platform.python_version()}",
             f"{cpu_name()} ({os.cpu_count()} cores)"]  # fmt: skip
    if not cpu:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.insert(0, f"{len(names)} x {names[0]}, CUDA {torch.version.cuda}")
    return ", ".join(parts)


def print_summary(results: dict[str, dict], cpu: bool, seconds: float) -> None:
    """One screen: per step its status, title and time; its figure, target and peak memory;
    its notes (and the log of a failed step)."""
    mode = "CPU mode: plumbing only, these are not GPU figures" if cpu else "GPU mode"
    print(f"\n== GPU check summary ({mode}; {seconds:.0f} s) ==")
    for i, (name, title) in enumerate(STEPS, 1):
        r = results.get(name)
        if r is None:
            print(f"SKIP  {i} {title}: not selected (--only)")
            continue
        print(f"{r['status']:<6}{i} {title}  ({r['seconds']:.0f} s of {r['limit_s']} s)")
        line = r["figure"]
        if r.get("target"):
            line += f"   target: {r['target']}"
        if r.get("memory"):
            line += f"   peak {r['memory']}"
        print(f"{'':<8}{line}")
        for note in r.get("notes", []):
            print(f"{'':<8}{note}")
        if r["status"] == "FAIL":
            print(f"{'':<8}log: {r['log']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU: the plumbing only")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep run folders, models and data")
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(n for n, _ in STEPS)}")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--timeout-scale", type=float, default=1.0,
                    help="multiply every step's time limit (a slow or busy machine)")  # fmt: skip
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="medgpt-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args._step:
        return run_step_here(
            args._step, Ctx(args.cpu, work), work / "results" / f"{args._step}.json"
        )

    names = [n for n, _ in STEPS]
    selected = names
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(selected) - set(names))
        if unknown:
            ap.error(f"--only: unknown step {unknown[0]!r} (allowed: {', '.join(names)})")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        why = ("this torch has no CUDA support (a CPU wheel): install a CUDA build, e.g. "
               "`make setup TORCH_SPEC=torch==2.13.0` from PyPI's default index"
               if torch.version.cuda is None else "no CUDA device is visible")  # fmt: skip
        print(f"gpu_check: {why}; `--cpu` checks the plumbing on a CPU", file=sys.stderr)
        return 2
    # A tracking server or object store from the caller's shell would receive the check's runs.
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MEDGPT_STORAGE"):
        os.environ.pop(var, None)
    print(f"medgpt GPU check ({'CPU mode' if args.cpu else 'GPU mode'}): {machine_line(args.cpu)}")
    print(f"work folder: {work} (logs in {work / 'logs'})", flush=True)
    cluster = Cluster(num_cpus=2 if args.cpu else (os.cpu_count() or 2))
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    try:
        for i, (name, title) in enumerate(STEPS, 1):
            if name not in selected:
                continue
            print(f"[{i}/{len(STEPS)}] {title}", flush=True)
            problem = cluster.ensure() if name in RAY_STEPS else None
            if problem:
                results[name] = result("FAIL", problem) | {"seconds": 0.0, "log": "-",
                                                           "limit_s": 0}  # fmt: skip
            else:
                results[name] = run_step_child(name, args, work)
            r = results[name]
            print(f"      {r['status']}: {r['figure']} ({r['seconds']:.0f} s)", flush=True)
    finally:
        cluster.stop()
        if not args.keep:
            for sub in ("runs", "models", "data", "serve-store", "plan", "train-memory"):
                shutil.rmtree(work / sub, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print_summary(results, args.cpu, seconds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mode": "cpu" if args.cpu else "gpu", "seconds": seconds,
                                         "machine": machine_line(args.cpu), "steps": results},
                                        indent=2, default=str) + "\n")  # fmt: skip
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no step failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
