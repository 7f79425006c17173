"""Int8 quantisation for CPU serving: logits stay close to float32, the engine and the scorer
run on the quantised model, and the float32 model passed in is left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from medgpt.config import ModelConfig
from medgpt.evaluation import EvalConfig, score_documents
from medgpt.generation import Engine, SamplingParams
from medgpt.kv_cache import KVCache
from medgpt.model import GPT
from medgpt.quantize import is_quantized, quantize_int8, weight_bytes
from medgpt.tokenizer import EOT_ID, get_tokenizer

QLinear = torch.ao.nn.quantized.dynamic.Linear

# Tolerances, from 10 seeds of this tiny model (measured: relative error 1.6-1.9%, largest
# element 0.08-0.10 on logits of std 0.9): the relative L2 error of the logits, and the
# largest absolute difference of any logit.
REL_TOL = 0.04
ABS_TOL = 0.2


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96))
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)  # sharper logits: greedy has clear winners
    return m.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[GPT, GPT]:
    model = _model()
    return model, quantize_int8(model)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    rel = float((a - b).norm() / b.norm())
    worst = float((a - b).abs().max())
    assert rel < REL_TOL, f"relative error {rel:.4f}"
    assert worst < ABS_TOL, f"max abs difference {worst:.4f}"


def test_module_types_change_and_embedding_stays_fp32(pair) -> None:
    fp32, q = pair
    assert is_quantized(q) and not is_quantized(fp32)
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert isinstance(q.lm_head, QLinear)
    for block in q.transformer.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(lin, QLinear)
            assert lin.weight().dtype == torch.qint8
    assert type(q.transformer.wte) is nn.Embedding
    assert q.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(q.transformer.wte.weight, fp32.transformer.wte.weight)
    # The head is an int8 copy of the (tied) embedding matrix.
    head = q.lm_head.weight().dequantize()
    assert torch.allclose(head, fp32.transformer.wte.weight, atol=0.02 * 8)
    wb, qb = weight_bytes(fp32), weight_bytes(q)
    # A quarter of the bytes, plus 8 bytes of scale and zero point per row and float32 biases
    # (which weigh a lot at width 32; ~0.26 for GPT-2 124M).
    assert qb["linear"] < 0.4 * wb["linear"]


def test_original_model_is_not_modified() -> None:
    model = _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert q is not model
    assert not is_quantized(model)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inplace_converts_the_model_itself() -> None:
    model = _model(2)
    assert quantize_int8(model, inplace=True) is model
    assert is_quantized(model)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(model)


def test_logits_close_to_fp32(pair) -> None:
    fp32, q = pair
    idx = torch.randint(50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = fp32(idx)
        got, _ = q(idx)
    _close(got, ref)


def test_cached_prefill_and_decode_step_close_to_fp32(pair) -> None:
    fp32, q = pair
    prompt = torch.randint(50257, (1, 12), generator=torch.Generator().manual_seed(1))
    nxt = torch.tensor([11, 22])
    outs = []
    with torch.no_grad():
        for m in (fp32, q):
            cache = KVCache(m.config, 2)
            pre, _ = m(prompt, kv_cache=cache.row(0))
            m(prompt[:, :7], kv_cache=cache.row(1))
            step = m.decode_step(nxt, torch.tensor([12, 7]), cache)
            outs.append((pre, step))
    _close(outs[1][0], outs[0][0])
    _close(outs[1][1], outs[0][1])


def test_engine_greedy_generation_runs(pair) -> None:
    fp32, q = pair
    enc = get_tokenizer()
    params = SamplingParams(max_new_tokens=20, temperature=0)
    out_q = Engine(q, max_batch_size=2).generate("Diabetes mellitus is", params)
    out_f = Engine(fp32, max_batch_size=2).generate("Diabetes mellitus is", params)
    assert out_q["finish_reason"] in ("length", "stop")
    assert 1 <= len(out_q["token_ids"]) <= 20
    assert all(0 <= t < 50257 and t != EOT_ID for t in out_q["token_ids"])
    assert out_q["text"] == enc.decode(out_q["token_ids"])
    # Greedy picks are the argmax of logits within 2% of fp32's: the first one agrees.
    assert out_q["token_ids"][0] == out_f["token_ids"][0]


def test_engine_sampling_batch_runs(pair) -> None:
    _, q = pair
    engine = Engine(q, max_batch_size=2)
    for i, prompt in enumerate(("Asthma", "Hypertension: treatment", "A")):
        engine.submit(f"r{i}", prompt, SamplingParams(max_new_tokens=8, seed=i))
    finished = set()
    while engine.has_work:
        finished |= {ev.request_id for ev in engine.step() if ev.finished}
    assert finished == {"r0", "r1", "r2"}


def test_score_documents_close_to_fp32(pair) -> None:
    fp32, q = pair
    rng = np.random.default_rng(0)
    docs = [("a", np.array([EOT_ID, *rng.integers(0, 50000, n)])) for n in (30, 150, 5)]
    fs, qs = score_documents([fp32, q], docs, EvalConfig(stride=48), torch.device("cpu"),
                             progress=False)  # fmt: skip
    assert qs.total.tokens == fs.total.tokens == 30 + 150 + 5
    assert abs(qs.total.loss - fs.total.loss) / fs.total.loss < 0.01


def test_refuses_non_float32() -> None:
    with pytest.raises(TypeError):
        quantize_int8(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(_model().to(torch.bfloat16))
