"""bench/gpu_check.py --cpu end to end: every step of the GPU check runs its plumbing on the CPU
(tiny model, gloo, a CPU Serve replica) on the session's Ray cluster, and the summary lists
every step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medgpt.testing import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "bench" / "gpu_check.py"


def _steps() -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no side effects: it only defines the steps
    return module.STEPS


def _shutdown_serve(address: str) -> None:
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True)
    serve.shutdown()


def test_gpu_check_cpu_mode_runs_every_step(ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    # Serve keeps a running instance's HTTP options: one left by an earlier test would put the
    # check's replica on that test's port (see test_serve_cli.py).
    _shutdown_serve(ray_cluster["address"])
    summary = tmp_path / "summary.json"
    # The session's cluster, so that the script starts no second one.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"],
           "RAY_API_SERVER_ADDRESS": ray_cluster["dashboard"]}  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--cpu", "--work", str(tmp_path / "work"),
             "--json", str(summary)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        _shutdown_serve(ray_cluster["address"])
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-4000:]}\n{proc.stderr[-3000:]}"
    screen = out[out.index("== GPU check summary") :]
    for i, (_name, title) in enumerate(_steps(), 1):
        assert f"{i} {title}" in screen, (title, screen)
    steps = json.loads(summary.read_text())["steps"]
    assert [n for n, _ in _steps()] == list(steps)
    # Without CUDA the GPU tests are reported, skipped; every other step ran and passed.
    assert steps["gpu_tests"]["status"] == "SKIP", steps["gpu_tests"]
    assert steps["gpu_tests"]["counts"]["failures"] == steps["gpu_tests"]["counts"]["errors"] == 0
    for name in ("train_ddp", "train_fsdp", "plan_xl", "decode", "serve"):
        assert steps[name]["status"] == "OK", (name, steps[name])
    assert steps["train_ddp"]["tokens_per_s"] > 0 and steps["train_ddp"]["mfu"] > 0
    assert steps["train_fsdp"]["workers"] == 2 and steps["train_fsdp"]["backend"] == "gloo"
    assert steps["decode"]["engine_tokens_per_s"] > 0 and steps["decode"]["hf_tokens_per_s"] > 0
    assert steps["plan_xl"]["figure"].startswith("fits:")
    assert "no step failed" in out
    # Run folders, models and data are removed; the logs stay.
    assert not (tmp_path / "work" / "runs").exists()
    assert (tmp_path / "work" / "logs" / "train_ddp.log").is_file()
