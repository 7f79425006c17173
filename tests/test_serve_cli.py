"""`medgpt serve` end to end: a subprocess deploys serve/config.yaml's app on the session's
Ray cluster, answers HTTP, and shuts Serve down on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from medgpt.checkpoint import save_checkpoint
from medgpt.config import ModelConfig
from medgpt.demo import wait_http
from medgpt.errors import MedgptError
from medgpt.model import GPT
from medgpt.testing import REPO, free_port

pytestmark = pytest.mark.slow


def _shutdown_serve(address: str) -> None:
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True)
    serve.shutdown()


@pytest.fixture
def serve_to_itself(ray_cluster: dict[str, Any]) -> Iterator[None]:
    """Serve is one instance per cluster, and `serve.start` keeps a running instance's HTTP
    options: a Serve left by an earlier test would put the subprocess's app on that test's
    port. So none runs before the test, and whatever the subprocess leaves is shut down after
    it, so later tests find the cluster's CPUs free whatever order they run in."""
    _shutdown_serve(ray_cluster["address"])
    yield
    _shutdown_serve(ray_cluster["address"])


def test_medgpt_serve_runs_the_config_app(serve_to_itself, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck", GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32)), {})
    port = free_port()
    medgpt = Path(sys.executable).parent / "medgpt"
    # The shipped config asks 2 CPUs per replica: the whole test cluster. Half a CPU here (the
    # replica's Ray options are app args: medgpt.serving.config.ServeConfig).
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    raw["applications"][0]["args"]["num_cpus"] = 0.5
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [str(medgpt), "serve", "--config", str(config), "--checkpoint", str(ckpt),
           "--storage-path", str(tmp_path), "--port", str(port)]  # fmt: skip
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ)  # fmt: skip
    try:
        try:
            wait_http(f"{url}/healthz", 180, alive=lambda: proc.poll() is None)
        except MedgptError as e:
            pytest.fail(f"{e}\n{log_path.read_text()[-3000:]}")
        out = requests.post(f"{url}/generate", json={"prompt": "Asthma", "max_new_tokens": 5})
        assert out.status_code == 200 and out.json()["model"]["id"] == "ck"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert f"serving {ckpt} at {url}" in log_path.read_text()
