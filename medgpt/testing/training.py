"""Training runs the Ray tests share: the tiny recipe, a longer variant for runs that are
interrupted, a `medgpt train` driver in its own process, and what a run has registered."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from medgpt.testing import REPO

__all__ = ["LONG", "registered_steps", "run_on_gloo", "start_driver", "tiny_recipe"]

# Overrides for a run long enough to stop, kill or shrink mid-way and still have steps left.
LONG = {"train.max_steps": 24, "train.checkpoint_every": 6, "train.eval_every": 6}


def tiny_recipe(data_dir: Path, storage: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A recipe whose steps take milliseconds: the Ray tests check plumbing, not learning.
    ``overrides`` are ``"section.field": value`` pairs."""
    recipe: dict[str, Any] = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64},
        "train": {
            "data_dir": str(data_dir),
            "seq_len": 32,
            "micro_batch_size": 4,
            "batch_tokens": 256,
            "max_steps": 6,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "sample_tokens": 4,
            "sample_prompts": ["Question: What is diabetes?\nAnswer:"],
        },
        "job": {"name": name, "storage_path": str(storage), "num_workers": 2},
    }
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        recipe[section][field] = value
    return recipe


def start_driver(recipe: dict[str, Any], folder: Path, name: str) -> subprocess.Popen:
    """`medgpt train` on ``recipe`` in its own process (and session, so a test can kill its
    whole group), attached to the cluster RAY_ADDRESS names; its output goes to
    ``folder/<name>.log``."""
    import yaml

    cfg = folder / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    with open(folder / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "medgpt.cli", "train", "--config", str(cfg)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )


def registered_steps(run_dir: Path) -> list[str]:
    """The checkpoints (``step-NNNNNN``) Ray Train has registered for the run in ``run_dir``:
    only those survive a crash (FIELD-NOTES), so a fault test waits for one before killing."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return sorted(set(re.findall(r"step-\d{6}", snap.read_text())))
    except OSError:  # not written yet, or being replaced
        return []


def _gloo_rank(rank: int, world: int, port: int, recipe: dict, out: str, resume: str | None):
    """One rank of :func:`run_on_gloo` (a torch.multiprocessing entry: importable, top level)."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from medgpt.config import Recipe
    from medgpt.training import _Ctx, run_loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    folder = Path(out)

    class Checkpoint:
        @contextlib.contextmanager
        def as_directory(self):
            yield resume

    def keep(metrics, checkpoint_dir, step) -> None:
        if checkpoint_dir is not None:  # rank 0 only
            shutil.copytree(checkpoint_dir, folder / f"step-{step:06d}")
            shutil.rmtree(checkpoint_dir.parent)

    try:
        ctx = _Ctx(rank, world, torch.device("cpu"))
        loop = run_loop(
            Recipe.from_dict(recipe), ctx, None, Checkpoint() if resume else None, keep,
            wrap=DistributedDataParallel,
        )  # fmt: skip
        history = list(loop)
        if rank == 0:
            (folder / "metrics.json").write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


def run_on_gloo(
    recipe: dict[str, Any], world: int, out: Path, resume: Path | None = None
) -> list[dict[str, Any]]:
    """``training.run_loop`` on ``world`` CPU processes joined by gloo, without Ray (plain
    DDP, or FSDP as the recipe says): rank 0's checkpoints are copied to ``out/step-NNNNNN``;
    returns rank 0's reported metrics. ``resume``: a checkpoint folder every rank starts from."""
    import torch.multiprocessing as mp

    from medgpt.testing import free_port

    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), recipe, str(out), str(resume) if resume else None)
    mp.spawn(_gloo_rank, args=args, nprocs=world)
    return json.loads((out / "metrics.json").read_text())
