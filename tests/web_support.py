"""What the web tests share: a real Serve app on a tiny checkpoint (on the session's Ray
cluster), and the Flask app on a real HTTP port in a background thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.conftest import wait_for

MODEL_ID = "step-000007"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            "max_batch_size": 4, "threads": 1}  # fmt: skip
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
def web_server(config: Mapping[str, Any]) -> Iterator[str]:
    """The Flask app behind werkzeug's threaded server on a free port (as `medgpt web` runs
    it); yields its URL."""
    from werkzeug.serving import make_server

    from web.app import create_app

    port = free_port()
    server = make_server("127.0.0.1", port, create_app(config), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def closed_port_url() -> str:
    """A URL nothing listens on (the backend-down case)."""
    return f"http://127.0.0.1:{free_port()}"


def serve_stats(serve_url: str) -> dict:
    return requests.get(f"{serve_url}/healthz", timeout=10).json()
