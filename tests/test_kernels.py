"""The CPU decode kernels as torch operators (medgpt.kernels): same numbers as F.linear and
SDPA, batch-invariant rows, checks in C++ that refuse bad tensors before touching memory, the
engine's own module tree over the caller's Parameters, and a clean fall-back, with its reason,
wherever the kernels cannot be had."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medgpt import kernels
from medgpt.config import ModelConfig
from medgpt.generation import Engine, SamplingParams, complete, sample_batch
from medgpt.kernels import MAX_ROWS, SmallBatchLinear, uses_kernel_linears, with_kernel_linears
from medgpt.kv_cache import KERNEL, SDPA, DecodeRows, KVCache
from medgpt.model import GPT
from medgpt.quantize import is_quantized, quantize_int8
from medgpt.testing import REPO

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason=f"kernel unavailable: {kernels.unavailable_reason()}"
)


def _layer(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    return layer


def test_kernel_builds_on_this_machine() -> None:
    # CI machines are x86-64 with AVX2 and a compiler: there the fall-back would hide a
    # broken build, so this one insists.
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert torch.ops.medgpt.small_linear.default is kernels._state["linear"]


# --- small_linear ----------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("n_in", [8, 13, 96, 768])
@pytest.mark.parametrize("n_out", [1, 3, 4, 5, 9, 50])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(n_in: int, n_out: int, bias: bool) -> None:
    base = _layer(n_in, n_out, bias)
    fast = SmallBatchLinear(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 7, MAX_ROWS):
            x = torch.randn(rows, n_in)
            want = F.linear(x, base.weight, base.bias)
            torch.testing.assert_close(fast(x), want)
            torch.testing.assert_close(kernels.small_linear(x, base.weight, base.bias), want)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch() -> None:
    # Bit for bit: this is what keeps a request's tokens the same alone and in a batch.
    fast = SmallBatchLinear(_layer(768, 2304))
    x = torch.randn(MAX_ROWS, 768)
    with torch.no_grad():
        batched = fast(x)
        for rows in (1, 2, 5, 8):
            assert torch.equal(fast(x[:rows]), batched[:rows])
        for r in range(MAX_ROWS):
            assert torch.equal(fast(x[r : r + 1])[0], batched[r])


@needs_kernel
def test_small_linear_keeps_leading_dimensions_and_empty_inputs() -> None:
    layer = _layer(16, 8)
    x = torch.randn(2, 3, 16)
    y = kernels.small_linear(x, layer.weight.detach(), layer.bias.detach())
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias).detach())
    assert kernels.small_linear(torch.empty(0, 16), layer.weight.detach()).shape == (0, 8)


@needs_kernel
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(2, 16).double(), torch.randn(8, 16), None), "x must be float32, got Double"),
        ((torch.randn(2, 16), torch.randn(8, 16).half(), None), "weight must be float32"),
        ((torch.randn(2, 16), torch.randn(8, 16), torch.randn(8).double()), "bias must be float32"),
        ((torch.randn(16, 2).t(), torch.randn(8, 16), None), "x must be contiguous"),
        ((torch.randn(2, 16), torch.randn(16, 8).t(), None), "weight must be contiguous"),
        ((torch.randn(2, 15), torch.randn(8, 16), None), r"last dimension \(15\) must equal"),
        ((torch.randn(2, 16), torch.randn(8, 16), torch.randn(9)), r"bias must have shape \(8\)"),
        ((torch.randn(2, 16), torch.randn(128), None), "weight must be 2-D"),
        ((torch.tensor(1.0), torch.randn(8, 16), None), "at least one dimension"),
    ],
)
def test_small_linear_refuses_bad_tensors_from_cpp(args, message: str) -> None:
    with pytest.raises(RuntimeError, match=rf"medgpt::small_linear: .*{message}"):
        torch.ops.medgpt.small_linear(*args)


@needs_kernel
def test_small_linear_refuses_other_devices() -> None:
    # Only a CPU implementation is registered: the dispatcher refuses a meta tensor before
    # the C++ function runs, naming the operator.
    with pytest.raises(RuntimeError, match="medgpt::small_linear"):
        kernels.small_linear(torch.randn(2, 16, device="meta"), torch.randn(8, 16))


@needs_kernel
def test_uses_the_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _layer(16, 8)
    fast = SmallBatchLinear(base)
    calls: list[int] = []
    real = kernels._state["linear"]

    def counting(x, w, b):  # rows of each call that reaches the operator
        calls.append(x.numel() // x.shape[-1])
        return real(x, w, b)

    monkeypatch.setitem(kernels._state, "linear", counting)
    x = torch.randn(MAX_ROWS + 1, 16)
    want = F.linear(x, base.weight, base.bias)
    with torch.no_grad():
        torch.testing.assert_close(fast(x[:3]), want[:3])
        # Leading dimensions count as rows: a (1, 2, K) prefill input takes the kernel too.
        torch.testing.assert_close(fast(x[None, :2]), want[None, :2])
        assert calls == [3, 2]
        # Too many rows, a strided input, float64, a wrong width: F.linear (and its error).
        torch.testing.assert_close(fast(x), want)
        strided = x[:, :16].t().contiguous().t()[:2]
        torch.testing.assert_close(fast(strided), want[:2])
        y64 = SmallBatchLinear(_layer(16, 8).double())(x[:2].double())
        assert y64.dtype == torch.float64
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            fast(torch.randn(2, 15))
    assert calls == [3, 2]
    # With autograd on, gradients flow exactly as through nn.Linear.
    ref_layer = copy.deepcopy(base)
    xg = x[:2].clone().requires_grad_()
    fast(xg).sum().backward()
    xb = x[:2].clone().requires_grad_()
    ref_layer(xb).sum().backward()
    torch.testing.assert_close(xg.grad, xb.grad)
    torch.testing.assert_close(fast.weight.grad, ref_layer.weight.grad)
    assert calls == [3, 2]


# --- the engine's module tree ----------------------------------------------------------------


def _tiny() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)
    return GPT(cfg).eval()


def _structure(model: nn.Module) -> list[tuple[str, type, bool]]:
    return [(n, type(m), m.training) for n, m in model.named_modules()]


def _parameters(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]


@needs_kernel
def test_kernel_linears_share_every_parameter_and_leave_the_model_alone() -> None:
    model = _tiny().train()
    before, params = _structure(model), _parameters(model)
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fast = with_kernel_linears(model).eval()
    assert sum(type(m) is SmallBatchLinear for m in fast.modules()) == n_linear == 2 * 4 + 1
    assert _parameters(fast) == params  # the same Parameter objects, nothing copied
    assert fast.lm_head.weight is fast.transformer.wte.weight
    assert list(fast.state_dict()) == keys
    assert _structure(model) == before and model.training
    # deepcopy and pickling (Ray ships models between processes) still work.
    clone = copy.deepcopy(fast)
    assert isinstance(clone.lm_head, SmallBatchLinear)
    assert clone.lm_head.weight is clone.transformer.wte.weight
    # And back: plain layers over the same Parameters, which fast_linear=False relies on.
    plain = kernels.with_plain_linears(fast)
    assert sum(type(m) is nn.Linear for m in plain.modules()) == n_linear
    assert _parameters(plain) == params and plain.lm_head.weight is plain.transformer.wte.weight
    assert not Engine(fast, 1, fast_linear=False).fast_linear
    assert uses_kernel_linears(fast)  # the engine changed nothing


@needs_kernel
def test_the_engine_never_changes_the_model_it_is_handed() -> None:
    model = _tiny().train()
    before, params = _structure(model), _parameters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    params_s = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)
    engine = Engine(model, max_batch_size=2)
    assert engine.fast_linear and engine.model is not model
    out = engine.generate("Asthma is", params_s)
    for _ in range(2):  # a batch step too
        engine.submit(f"r{_}", "Fever and", params_s)
    while engine.has_work:
        engine.step()
    assert _structure(model) == before and model.training
    assert _parameters(model) == params
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # Bit-identical to what the engine did when it swapped the caller's layers in place: a
    # model swapped that way by hand (deep copy), decoding with the kernel's attention.
    swapped = copy.deepcopy(model).eval()
    for module in list(swapped.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, SmallBatchLinear(child))
    ids = engine.encode("Asthma is")
    cache = KVCache(swapped.config, 1, 32)
    gen = torch.Generator().manual_seed(params_s.seed)
    tokens, pos = [], len(ids)
    with torch.no_grad():
        logits = swapped.prefill([ids], [0], cache)
        for _ in range(len(out["token_ids"])):
            tokens.append(sample_batch(logits, [params_s], [gen])[0])
            step = torch.tensor([tokens[-1]]), torch.tensor([pos])
            logits = swapped.decode_step(*step, cache, KERNEL)
            pos += 1
    assert tokens == out["token_ids"]


def test_complete_leaves_the_model_as_it_was() -> None:
    # Training prints sample completions from the model it is training.
    model = _tiny().train()
    before, params = _structure(model), _parameters(model)
    complete(model, "Asthma is", max_new_tokens=4)
    assert _structure(model) == before and _parameters(model) == params
    assert model.lm_head.weight is model.transformer.wte.weight


# --- decode_attention ------------------------------------------------------------------------


@needs_kernel
def test_decode_step_with_the_kernel_matches_the_plain_model() -> None:
    plain = _tiny()
    fast = with_kernel_linears(plain)
    caches = [KVCache(plain.config, 3, 32) for _ in range(2)]
    prompt = torch.randint(0, 50257, (3, 5))
    idx = torch.randint(0, 50257, (3,))
    pos = torch.tensor([5, 5, 5])
    with torch.no_grad():
        for m, c in zip((plain, fast), caches, strict=True):
            m.features(prompt, kv_cache=c)
        a = plain.decode_step(idx, pos, caches[0])
        b = fast.decode_step(idx, pos, caches[1], KERNEL)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for ka, kb in zip(caches[0].k, caches[1].k, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)


def _attention_case(B: int = 5, rows: int = 7, H: int = 3, T: int = 40, D: int = 20):
    """qkv and caches for a decode step whose rows sit at different positions (0, T - 1 and
    two rows at the same one included); D is not a multiple of 8, so the tails run too."""
    torch.manual_seed(1)
    qkv = torch.randn(B, 3, H, D)
    k, v = torch.randn(rows, H, T, D), torch.randn(rows, H, T, D)
    pos = torch.tensor([0, 5, T - 1, 17, 17][:B])
    return qkv, k, v, pos


@needs_kernel
def test_decode_attention_matches_sdpa_over_each_rows_own_positions() -> None:
    qkv, k, v, pos = _attention_case()
    k_ref, v_ref = k.clone(), v.clone()
    with torch.no_grad():
        got = kernels.decode_attention(qkv, k, v, pos)
        want = DecodeRows(pos, int(pos.max()), 3, 40).attend(qkv, k_ref, v_ref)
    assert got.shape == (5, 3, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The new keys and values are where the plain path puts them, and nothing else moved.
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k[1, :, 5], qkv[1, 1]) and torch.equal(v[2, :, 39], qkv[2, 2])


@needs_kernel
def test_decode_attention_gives_a_row_the_same_numbers_in_any_batch() -> None:
    qkv, k, v, pos = _attention_case()
    with torch.no_grad():
        batched = kernels.decode_attention(qkv, k.clone(), v.clone(), pos)
        for b in range(5):
            alone = kernels.decode_attention(
                qkv[b : b + 1].contiguous(),
                k[b : b + 1].clone(),
                v[b : b + 1].clone(),
                pos[b : b + 1],
            )
            assert torch.equal(alone[0], batched[b]), b


def _bad_attention_calls():
    qkv, k, v, pos = _attention_case()
    return [
        ((qkv, k, v, torch.tensor([0, 5, 40, 1, 1])), r"positions must be in 0\.\.39.*got 40"),
        ((qkv, k, v, torch.tensor([0, -1, 3, 1, 1])), r"positions must be in 0\.\.39.*got -1"),
        ((qkv.double(), k, v, pos), "qkv must be float32, got Double"),
        ((qkv, k.double(), v, pos), "k_cache must be float32"),
        ((qkv, k, v[:, :, :30], pos), "v_cache must be contiguous"),
        ((qkv, k, v[:, :, :30].contiguous(), pos), "v_cache must have k_cache's shape"),
        ((qkv, k, v, pos.int()), "positions must be int64, got Int"),
        ((qkv, k[:4], v[:4], pos), "fewer than qkv's batch of 5"),
        ((qkv, k, v, pos[:4]), r"positions must have shape \(5\)"),
        ((qkv.transpose(0, 1).contiguous().transpose(0, 1), k, v, pos), "qkv must be contiguous"),
        ((qkv[:, :2].contiguous(), k, v, pos), r"qkv must be \(batch, 3, n_head, head_dim\)"),
        ((qkv[:, :, :2].contiguous(), k, v, pos), "n_head and head_dim"),
        ((qkv, k[0], v[0], pos), r"k_cache must be \(rows, n_head, max_len, head_dim\)"),
    ]


@needs_kernel
@pytest.mark.parametrize("case", range(len(_bad_attention_calls())))
def test_decode_attention_refuses_bad_tensors_from_cpp_and_writes_nothing(case: int) -> None:
    args, message = _bad_attention_calls()[case]
    before = [t.clone() for t in args]
    with pytest.raises(RuntimeError, match=rf"medgpt::decode_attention: .*{message}"):
        torch.ops.medgpt.decode_attention(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, before, strict=True))


@needs_kernel
def test_decode_attention_refuses_other_devices() -> None:
    qkv, k, v, pos = _attention_case()
    with pytest.raises(RuntimeError, match="medgpt::decode_attention"):
        kernels.decode_attention(qkv.to("meta"), k.to("meta"), v.to("meta"), pos.to("meta"))


@needs_kernel
def test_decode_step_with_rows_at_different_positions_matches_the_plain_model() -> None:
    """Continuous batching: the kernel's attention (each row over its own positions) against
    the plain model's SDPA with a mask, logits and caches, over several steps."""
    plain = _tiny()
    fast = with_kernel_linears(plain)
    lengths = [3, 9, 1, 6]
    caches = [KVCache(plain.config, 4, 32) for _ in range(2)]
    with torch.no_grad():
        for m, c in zip((plain, fast), caches, strict=True):
            for r, n in enumerate(lengths):
                m.features(torch.arange(100, 100 + n)[None], kv_cache=c.row(r))
        pos = torch.tensor(lengths)
        for _ in range(4):
            idx = torch.randint(0, 50257, (4,))
            a = plain.decode_step(idx, pos, caches[0], SDPA)
            b = fast.decode_step(idx, pos, caches[1], KERNEL)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            pos = pos + 1
    for ka, kb in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)


# --- packed prefill --------------------------------------------------------------------------


def _prefill_alone(model: GPT, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
    """Each prompt through features() into its own row, as the Engine did before packing."""
    out = []
    for r, p in enumerate(prompts):
        hidden = model.features(torch.tensor([p]), kv_cache=cache.row(r))
        out.append(model.lm_head(hidden[:, -1])[0])
    return torch.stack(out)


# Lengths 1 to 60, 121 tokens in all: one pack within MAX_ROWS, as the Engine makes them.
PACK = [list(range(100, 100 + n)) for n in (5, 1, 60, 17, 38)]


@needs_kernel
def test_a_packed_prefill_gives_each_prompt_exactly_its_numbers_alone() -> None:
    fast = with_kernel_linears(_tiny())
    alone, packed = (KVCache(fast.config, len(PACK), 64) for _ in range(2))
    rows = [3, 0, 4, 1, 2]  # any rows, not only in order
    with torch.no_grad():
        want = _prefill_alone(fast, [PACK[rows.index(r)] for r in range(5)], alone)
        got = fast.prefill(PACK, rows, packed)
    for i, r in enumerate(rows):
        assert torch.equal(got[i], want[r]), i
    for ka, kb, va, vb in zip(alone.k, packed.k, alone.v, packed.v, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_a_packed_prefill_matches_the_plain_model() -> None:
    plain = _tiny()  # F.linear throughout: equal up to float rounding
    alone, packed = (KVCache(plain.config, len(PACK), 64) for _ in range(2))
    with torch.no_grad():
        want = _prefill_alone(plain, PACK, alone)
        got = plain.prefill(PACK, list(range(len(PACK))), packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for ka, kb in zip(alone.k, packed.k, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)


def test_a_packed_prefill_rejects_what_it_cannot_place() -> None:
    model = _tiny()
    cache = KVCache(model.config, 2, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="one non-empty prompt per cache row"):
        model.prefill([[1, 2], []], [0, 1], cache)
    with torch.no_grad(), pytest.raises(ValueError, match="one non-empty prompt per cache row"):
        model.prefill([[1, 2], [3]], [0], cache)
    with torch.no_grad(), pytest.raises(ValueError, match="exceeds the cache of 16"):
        model.prefill([list(range(17))], [0], cache)


@needs_kernel
def test_the_engine_packs_admitted_prompts_only_with_the_kernel(monkeypatch) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=256)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)  # peaked enough that rounding would show
    calls: list[int] = []
    real = GPT.prefill

    def counting(self, prompts, rows, kv_cache):  # passes that pack more than one prompt
        if len(prompts) > 1:
            calls.append(sum(len(p) for p in prompts))
        return real(self, prompts, rows, kv_cache)

    monkeypatch.setattr(GPT, "prefill", counting)
    params = [SamplingParams(max_new_tokens=6, temperature=0.9, seed=i) for i in range(5)]
    # 60 + 60 + 60 + 10 + 200 tokens: packs of 60+60, 60+10, and the long one alone.
    prompts = [list(range(1000, 1060))] * 3 + [list(range(7, 17)), list(range(300, 500))]
    solo = [
        Engine(model, 1).generate(p, s)["token_ids"] for p, s in zip(prompts, params, strict=True)
    ]
    assert calls == []  # one prompt at a time: nothing to pack
    for fast, pack in ((True, True), (False, True), (True, False)):
        calls.clear()
        engine = Engine(model, max_batch_size=5, fast_linear=fast, pack_prefill=pack)
        for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
            engine.submit(f"r{i}", p, s)
        tokens: dict[str, list[int]] = {}
        while engine.has_work:
            for ev in engine.step():
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert calls == ([120, 70] if fast and pack else [])
        if fast:  # bit-identical rows: the same samples as alone
            assert [tokens[f"r{i}"] for i in range(5)] == solo


@needs_kernel
def test_engine_uses_the_kernel_and_can_be_told_not_to() -> None:
    model = _tiny()
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)
    fast = Engine(model, max_batch_size=2)
    assert fast.fast_linear and fast.stats()["fast_linear"] is True
    assert fast.decode_backend is KERNEL
    out_fast = fast.generate("Asthma is", params)
    plain = Engine(model, max_batch_size=2, fast_linear=False)
    assert not plain.fast_linear and plain.decode_backend is SDPA
    assert not any(isinstance(m, SmallBatchLinear) for m in plain.model.modules())
    out_plain = plain.generate("Asthma is", params)
    assert out_fast["token_ids"] == out_plain["token_ids"]
    # An int8 copy of a model an Engine has run is fully quantised; its engine stays on SDPA.
    q = quantize_int8(model)
    assert is_quantized(q) and not any(isinstance(m, SmallBatchLinear) for m in q.modules())
    q_engine = Engine(q, max_batch_size=1)
    assert not q_engine.fast_linear and q_engine.decode_backend is SDPA


# --- building, caching, falling back ---------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


_REPORT = """
    import os
    from medgpt import kernels
    from medgpt.config import ModelConfig
    from medgpt.generation import Engine, SamplingParams
    from medgpt.model import GPT

    print("reason:", kernels.unavailable_reason())
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    e = Engine(m, max_batch_size=1)
    print("fast:", e.fast_linear, e.decode_backend.name)
    out = e.generate("Fever", SamplingParams(max_new_tokens=3, temperature=0))
    print("tokens:", len(out["token_ids"]))
    cache = os.environ["MEDGPT_KERNEL_CACHE"]
    print("files:", sorted(os.listdir(cache)) if os.path.isdir(cache) else None)
"""


def test_a_failed_build_falls_back_to_f_linear_and_leaves_nothing(tmp_path) -> None:
    cache = tmp_path / "kernels"
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache), CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert "reason: /bin/false failed to build ops.cpp" in r.stdout
    assert "fast: False sdpa" in r.stdout and "tokens: 3" in r.stdout
    assert "files: []" in r.stdout  # no half-built library left for the next process


def test_no_compiler_falls_back_with_the_reason(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_REPORT)],
        cwd=REPO,
        env={**env, "PATH": str(tmp_path), "MEDGPT_KERNEL_CACHE": str(tmp_path / "k")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert "reason: no C++ compiler found (set CXX)" in r.stdout
    assert "fast: False sdpa" in r.stdout and "tokens: 3" in r.stdout


def test_an_unwritable_cache_falls_back_with_the_reason(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(blocker / "kernels"))
    assert r.returncode == 0, r.stderr
    assert "reason: cannot write the kernel cache" in r.stdout and "MEDGPT_KERNEL_CACHE" in r.stdout
    assert "fast: False sdpa" in r.stdout and "tokens: 3" in r.stdout


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"MEDGPT_KERNELS": "off"}, "disabled by MEDGPT_KERNELS=off"),
        ({"MEDGPT_KERNELS": "0"}, "disabled by MEDGPT_KERNELS=0"),
        ({"MEDGPT_FAST_LINEAR": "0"}, "disabled by MEDGPT_FAST_LINEAR=0"),  # the older name
    ],
)
def test_disabled_by_environment(tmp_path, setting: dict[str, str], reason: str) -> None:
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(tmp_path / "k"), **setting)
    assert r.returncode == 0, r.stderr
    assert f"reason: {reason}" in r.stdout and "fast: False sdpa" in r.stdout
    assert "files: None" in r.stdout


def test_a_library_that_does_not_load_falls_back_with_the_reason(tmp_path) -> None:
    # A cache entry that is not a shared library (a disk filled mid-copy, another tool's file):
    # the reason names it, and nothing is rebuilt over it behind the user's back.
    r = _python(
        "import os; from medgpt import kernels; p = kernels.library_path(); "
        "p.parent.mkdir(parents=True); p.write_bytes(b'not an ELF file'); "
        "print('reason:', kernels.unavailable_reason())",
        MEDGPT_KERNEL_CACHE=str(tmp_path / "k"),
    )
    assert r.returncode == 0, r.stderr
    assert "reason: loading " in r.stdout and "medgpt_kernels-" in r.stdout
    assert " failed: " in r.stdout


def test_not_x86_64_with_avx2_and_fma_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one check that cannot be run for real here: on an ARM machine platform.machine()
    # says so, and the loader must stop before the compiler is called.
    monkeypatch.delenv("MEDGPT_KERNELS", raising=False)
    monkeypatch.delenv("MEDGPT_FAST_LINEAR", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert kernels._load() == "this CPU is not x86-64 with AVX2 and FMA"


@needs_kernel
def test_builds_once_into_the_cache(tmp_path) -> None:
    cache = tmp_path / "kernels"
    first = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert "reason: None" in first.stdout and "fast: True kernel" in first.stdout
    (built,) = list(cache.iterdir())  # no temporary file left beside it
    assert built.name.startswith("medgpt_kernels-") and built.suffix == ".so"
    mtime = built.stat().st_mtime_ns
    # A second process loads the library it finds; a missing compiler does not matter then.
    second = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache), CXX="/bin/false", PATH="/nowhere")
    assert "fast: True kernel" in second.stdout, second.stderr
    assert [p.name for p in cache.iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == mtime
