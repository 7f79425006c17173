"""Runs last (file name): it drives Serve on the shared cluster from a subprocess. `medgpt serve` end to end: a subprocess deploys serve/config.yaml's app on the session's
Ray cluster, answers HTTP, and shuts Serve down on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
import yaml

from medgpt.checkpoint import save_checkpoint
from medgpt.config import ModelConfig
from medgpt.model import GPT
from tests.conftest import REPO, wait_for
from tests.test_serve import _free_port

pytestmark = pytest.mark.slow


def test_medgpt_serve_runs_the_config_app(ray_cluster, tmp_path) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck", GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32)), {})
    port = _free_port()
    medgpt = Path(sys.executable).parent / "medgpt"
    # The shipped config asks 2 CPUs per replica: the whole test cluster. Half a CPU here.
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    raw["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [str(medgpt), "serve", "--config", str(config), "--checkpoint", str(ckpt),
           "--storage-path", str(tmp_path), "--port", str(port)]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return requests.get(f"{url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, 180, "medgpt serve to answer", interval=0.5)
        out = requests.post(f"{url}/generate", json={"prompt": "Asthma", "max_new_tokens": 5})
        assert out.status_code == 200 and out.json()["model"]["id"] == "ck"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
            log.close()
        # Whatever the subprocess left running on the shared cluster goes, so later tests get
        # its CPUs back.
        import ray
        from ray import serve

        ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
        serve.shutdown()
    text = (tmp_path / "serve.log").read_text()
    assert f"serving {ckpt} at {url}" in text
