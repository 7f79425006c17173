"""What the Serve and page tests share: a real Serve app on a tiny checkpoint (on a running
Ray cluster), and the page as `medgpt web` runs it (gunicorn, in a process of its own).
torch and Ray are imported only by the functions that need them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from medgpt.testing import free_port, wait_for

MODEL_ID = "step-000007"
# create_app's config keys → the environment variables `medgpt web` reads them from.
_ENV = {"SERVE_URL": "MEDGPT_SERVE_URL", "API_KEY": "MEDGPT_WEB_API_KEY",
        "CONNECT_TIMEOUT": "MEDGPT_WEB_CONNECT_TIMEOUT", "READ_TIMEOUT": "MEDGPT_WEB_READ_TIMEOUT",
        "MAX_CONTENT_LENGTH": "MEDGPT_WEB_MAX_BODY"}  # fmt: skip


def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer model with a 1024-token context (long generations take a while, so
    streaming and stopping are observable); sharpened embeddings make its text less uniform."""
    import torch

    from medgpt.checkpoint import save_checkpoint
    from medgpt.config import ModelConfig
    from medgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=1024))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(6)
    meta = {"step": 7, "val_loss": 3.25, "mlflow_run_id": "abc"}
    return save_checkpoint(folder / MODEL_ID, model, meta)


@contextmanager
def serve_app(ray_address: str, checkpoint: Path | str, storage: Path, name: str) -> Iterator[str]:
    """Serve's HTTP proxy on a free port with the medgpt app under ``/<name>``; yields the app's
    base URL (what the web front calls MEDGPT_SERVE_URL) and shuts Serve down afterwards."""
    import ray
    from ray import serve

    from medgpt.serving import app_builder

    ray.init(address=ray_address, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"checkpoint": str(checkpoint), "storage_path": str(storage), "max_tokens_cap": 512,
            "max_batch_size": 4, "threads": 1, "num_cpus": 1}  # fmt: skip
    serve.run(app_builder(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}/{name}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 180, f"the Serve app {name!r} to answer /healthz", interval=0.5)
        yield url
    finally:
        serve.delete(name)
        serve.shutdown()


@contextmanager
def web_server(config: Mapping[str, Any], dev: bool = False) -> Iterator[str]:
    """The page as `medgpt web` serves it (gunicorn; werkzeug with ``dev``) on a free port,
    configured through its environment variables; yields its URL. Stopped with SIGINT, as
    Ctrl-C stops it."""
    port = free_port()
    env = {**os.environ, **{_ENV[k]: str(v) for k, v in config.items()}}
    medgpt = Path(sys.executable).parent / "medgpt"
    cmd = [str(medgpt), "web", "--port", str(port), *(["--dev"] if dev else [])]
    # A file, not a pipe: nobody reads a pipe while tests run, and a full one would block
    # gunicorn's logging (one warning per malformed request in the fuzz).
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"medgpt web exited: {log.read().decode()[-2000:]}")
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, 60, "medgpt web to answer", interval=0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def closed_port_url() -> str:
    """A URL nothing listens on (the backend-down case)."""
    return f"http://127.0.0.1:{free_port()}"


def serve_stats(serve_url: str) -> dict:
    return requests.get(f"{serve_url}/healthz", timeout=10).json()
