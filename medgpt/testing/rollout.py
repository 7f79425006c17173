"""What the rollout tests and benchmark share: registered versions of a fresh model
(:func:`register_version`), and streaming clients (:class:`StreamLoad`): N threads, each
sending the next ``POST /v1/completions`` (``stream: true``) as soon as its previous one ended,
recording per request when it started and ended, whether it ended whole (``[DONE]`` after a
finish reason), and which version answered (the ``X-Medgpt-Model`` header and every chunk's
``model``)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import requests

__all__ = ["GATED", "Answer", "StreamLoad", "percentile", "register_version"]

# A passing gate record (what medgpt evaluate --register writes), for versions made here.
GATED = {"gate": "PASS", "gate.max_loss": "50", "eval_loss": "10.5"}


def register_version(
    store: Path, root: Path, seed: int, tags: dict[str, str], **model: int
) -> str:
    """A version of "medgpt" (the alias champion moved to it) carrying a fresh random-init
    checkpoint (``torch.manual_seed(seed)``; ``model`` overrides the small default shape),
    its training run and data hash ``data{seed:04d}`` in its metadata. Returns the version."""
    import torch

    from medgpt import registry
    from medgpt.checkpoint import save_checkpoint
    from medgpt.config import ModelConfig
    from medgpt.model import GPT
    from medgpt.tracking import start_or_resume_run, tracking_uri_for

    uri = tracking_uri_for(str(store), None)
    run, _ = start_or_resume_run(uri, "medgpt", f"train-{seed}", {}, {})
    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256, **model}
    meta = {"step": 10, "val_loss": 9.5, "mlflow_run_id": run,
            "data_manifest_hash": f"data{seed:04d}"}  # fmt: skip
    ckpt = save_checkpoint(root / f"run-{seed}" / "step-000010", GPT(ModelConfig(**shape)), meta)
    return registry.register_checkpoint(uri, ckpt, run, "medgpt", "champion", tags)["version"]


@dataclasses.dataclass
class Answer:
    start: float  # time.monotonic() just before the POST
    end: float = 0.0
    ttft: float | None = None
    status: int | None = None
    model: str | None = None  # the header's
    chunk_models: set[str] = dataclasses.field(default_factory=set)
    finish_reason: str | None = None
    done: bool = False  # "[DONE]" arrived
    tokens: int = 0  # text chunks
    error: str | None = None

    @property
    def whole(self) -> bool:
        return (
            self.status == 200
            and self.done
            and self.finish_reason in ("length", "stop")
            and self.chunk_models == {self.model}
            and self.error is None
        )

    @property
    def latency(self) -> float:
        return self.end - self.start


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


class StreamLoad:
    """``clients`` threads streaming completions from ``url`` until :meth:`stop`."""

    def __init__(self, url: str, clients: int = 8, max_tokens: int = 24, model: str | None = None):
        self.url = url.rstrip("/")
        self.clients = clients
        self.max_tokens = max_tokens
        self.model = model
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> StreamLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 120) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                raise RuntimeError("a streaming client did not finish its request")
        return self.answers

    def _client(self, i: int) -> None:
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            body = {"prompt": f"Patient {i}-{n}: fever and", "max_tokens": self.max_tokens,
                    "temperature": 0.8, "seed": i * 100_000 + n, "stream": True}  # fmt: skip
            if self.model:
                body["model"] = self.model
            n += 1
            a = Answer(start=time.monotonic())
            try:
                self._one(session, body, a)
            except (requests.RequestException, ValueError) as e:
                a.error = f"{type(e).__name__}: {e}"
            a.end = time.monotonic()
            with self._lock:
                self.answers.append(a)

    def _one(self, session: requests.Session, body: dict[str, Any], a: Answer) -> None:
        with session.post(f"{self.url}/v1/completions", json=body, stream=True, timeout=120) as r:
            a.status = r.status_code
            a.model = r.headers.get("X-Medgpt-Model")
            if r.status_code != 200:
                a.error = r.text[:200]
                return
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    a.done = True
                    break
                chunk = json.loads(data)
                a.chunk_models.add(chunk.get("model"))
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        a.tokens += 1
                        if a.ttft is None:
                            a.ttft = time.monotonic() - a.start
                    if c.get("finish_reason"):
                        a.finish_reason = c["finish_reason"]
