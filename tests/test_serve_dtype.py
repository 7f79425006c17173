"""The replica's ``dtype`` setting: the float32 checkpoint is cast on the replica's device, the
engine and its KV cache follow, and the model card says what it serves. The replica class is
built in this process, as Serve builds it in a replica (no Ray cluster needed). The half
precision replica needs CUDA (ServeConfig refuses it on the CPU): those tests are marked
``gpu`` and skip without a CUDA device."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from medgpt.checkpoint import save_checkpoint
from medgpt.config import ModelConfig
from medgpt.generation import Engine, SamplingParams
from medgpt.model import GPT

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["Diabetes mellitus is", "Asthma", "A"]


def _model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96))
    with torch.no_grad():  # clear greedy winners: tokens do not hinge on half rounding
        m.transformer.wte.weight.mul_(8)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dtype") / "step-000003"
    return save_checkpoint(path, _model(), {"step": 3})


def _weights_on_disk(path: Path) -> set[torch.dtype]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (not a dict)


def _greedy(engine: Engine, n: int = 8) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return [engine.generate(p, params)["token_ids"] for p in PROMPTS]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_replica_loader_casts_the_weights_and_leaves_the_file_float32(
    checkpoint, dtype
) -> None:
    """What the replica does after loading, here on the CPU (which ServeConfig would refuse
    for a half dtype; the loader does what it is told)."""
    from medgpt.serving.deployment import load_replica_model

    ref = _model()
    model = load_replica_model(str(checkpoint), "cpu", dtype)
    want = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert model.lm_head.weight is model.transformer.wte.weight  # the head stays tied
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q.to(want)), name  # the float32 values, rounded once
    assert _weights_on_disk(checkpoint) == {torch.float32}
    assert load_replica_model(str(checkpoint), "cpu").transformer.wte.weight.dtype == torch.float32


async def _replica(config: dict[str, Any]) -> Any:
    from medgpt.serving.deployment import MedgptServer

    cls = MedgptServer.func_or_class
    replica = cls.__new__(cls)
    await cls.__init__(replica, config)  # Serve's ingress wrapper has an async __init__
    return replica


def _stop(replica: Any) -> None:
    replica._stop.set()
    replica._wake.set()
    replica._stepper.join(timeout=30)


def _serve(config: dict[str, Any], prompt: str, n: int) -> tuple[Any, dict, dict, dict]:
    """A replica built from ``config``: it, its model card, /healthz and one greedy /generate."""
    from medgpt.api import GenerateRequest

    async def run() -> tuple[Any, dict, dict, dict]:
        replica = await _replica(config)
        try:
            body = GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0)
            out = await replica.generate_body(body)
            return replica, (await replica.models())["data"][0], await replica.healthz(), out
        finally:
            _stop(replica)

    return asyncio.run(run())


# Serve's ingress wrapper has an async __del__, which only a replica's shutdown awaits.
@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__' was never awaited")
def test_a_cpu_replica_serves_float32_and_says_so(checkpoint, tmp_path) -> None:
    config = {"checkpoint": str(checkpoint), "storage_path": str(tmp_path), "threads": 1,
              "fast_linear": False}  # fmt: skip
    replica, card, health, out = _serve(config, "Asthma", 4)
    assert card["dtype"] == "float32" and card["device"] == "cpu", card
    assert health["dtype"] == "float32" and health["status"] == "ok", health
    assert replica.engine.cache.k[0].dtype == torch.float32
    assert out["completion_tokens"] == 4


@pytest.mark.gpu
@CUDA
@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__' was never awaited")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_gpu_replica_serves_half_precision(checkpoint, tmp_path, dtype) -> None:
    config = {"checkpoint": str(checkpoint), "storage_path": str(tmp_path), "threads": 1,
              "num_gpus": 1, "dtype": dtype}  # fmt: skip
    want = getattr(torch, dtype)
    replica, card, health, out = _serve(config, "Asthma", 8)
    assert card["dtype"] == dtype and card["device"].startswith("cuda"), card
    assert health["dtype"] == dtype and health["status"] == "ok", health
    assert card["fast_linear"] is False  # the CPU kernels are not used on a GPU
    engine = replica.engine
    assert engine.device.type == "cuda" and engine.dtype == want
    assert {p.dtype for p in engine.model.parameters()} == {want}
    assert all(t.dtype == want and t.is_cuda for t in (*engine.cache.k, *engine.cache.v))
    # The same greedy tokens as the float32 checkpoint on the CPU (clear winners: see _model).
    ref = Engine(_model(), max_batch_size=1, fast_linear=False)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    assert out["completion_tokens"] == 8
    assert out["text"] == ref.generate("Asthma", params)["text"], out
    assert _weights_on_disk(checkpoint) == {torch.float32}


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_engine_on_cuda_matches_float32(dtype) -> None:
    """The engine on a GPU: batched decoding in half precision gives the float32 tokens (on a
    model with clear winners) and the cache is allocated in the weights' dtype on the GPU."""
    fp32 = _model().to("cuda")
    half = _model().to("cuda", dtype=dtype)
    engine = Engine(half, max_batch_size=len(PROMPTS))
    assert engine.stats()["dtype"] == str(dtype).removeprefix("torch.")
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for i, p in enumerate(PROMPTS):
        engine.submit(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_work:
        for ev in engine.step():
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert all(t.dtype == dtype and t.is_cuda for t in engine.cache.k)
    ref = _greedy(Engine(fp32, max_batch_size=1), 12)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == ref
    # Seeded sampling on the GPU: the generators are the CPU's, so it is reproducible.
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=2)
    assert engine.generate("Asthma", sampled) == engine.generate("Asthma", sampled)
