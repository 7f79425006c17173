"""The decode kernel (medgpt.fastlinear): same numbers as F.linear, batch-invariant rows,
drop-in for the model's layers, and a clean fall-back where it cannot be built."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medgpt import fastlinear
from medgpt.config import ModelConfig
from medgpt.fastlinear import MAX_ROWS, SmallBatchLinear, restore_linear, use_fast_linear
from medgpt.generation import Engine, SamplingParams
from medgpt.model import GPT, KVCache, _DecodeRows
from medgpt.quantize import is_quantized, quantize_int8
from tests.conftest import REPO

needs_kernel = pytest.mark.skipif(
    fastlinear.kernel() is None, reason=f"kernel unavailable: {fastlinear.unavailable_reason()}"
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
    assert fastlinear.kernel() is not None, fastlinear.unavailable_reason()
    assert fastlinear.unavailable_reason() is None


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
            torch.testing.assert_close(fast(x), F.linear(x, base.weight, base.bias))


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
def test_uses_the_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _layer(16, 8)
    fast = SmallBatchLinear(base)
    calls: list[int] = []
    real = fastlinear._state["fn"]

    def counting(*args):  # the kernel's rows argument
        calls.append(args[4])
        return real(*args)

    monkeypatch.setitem(fastlinear._state, "fn", counting)
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


def _tiny() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)
    return GPT(cfg).eval()


@needs_kernel
def test_swapping_keeps_parameters_tied_and_the_checkpoint_format() -> None:
    model = _tiny()
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert use_fast_linear(model) == n_linear == 2 * 4 + 1
    assert model.lm_head.weight is model.transformer.wte.weight
    assert list(model.state_dict()) == keys
    # deepcopy and pickling (Ray ships models between processes) still work.
    clone = copy.deepcopy(model)
    assert isinstance(clone.lm_head, SmallBatchLinear)
    assert clone.lm_head.weight is clone.transformer.wte.weight
    assert use_fast_linear(model) == 0  # nothing left to swap
    assert restore_linear(model) == n_linear
    assert all(not isinstance(m, SmallBatchLinear) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight


@needs_kernel
def test_decode_step_with_the_kernel_matches_the_plain_model() -> None:
    plain = _tiny()
    fast = copy.deepcopy(plain)
    use_fast_linear(fast)
    caches = [KVCache(plain.config, 3, 32) for _ in range(2)]
    prompt = torch.randint(0, 50257, (3, 5))
    idx = torch.randint(0, 50257, (3,))
    pos = torch.tensor([5, 5, 5])
    with torch.no_grad():
        for m, c in zip((plain, fast), caches, strict=True):
            m.features(prompt, kv_cache=c)
        a = plain.decode_step(idx, pos, caches[0])
        b = fast.decode_step(idx, pos, caches[1])
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
        got = fastlinear.decode_attention(qkv, k, v, pos)
        want = _DecodeRows(pos, int(pos.max()), 3, 40, fast=False).attend(qkv, k_ref, v_ref)
    assert got is not None and got.shape == (5, 3, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The new keys and values are where the plain path puts them, and nothing else moved.
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k[1, :, 5], qkv[1, 1]) and torch.equal(v[2, :, 39], qkv[2, 2])


@needs_kernel
def test_decode_attention_gives_a_row_the_same_numbers_in_any_batch() -> None:
    qkv, k, v, pos = _attention_case()
    with torch.no_grad():
        batched = fastlinear.decode_attention(qkv, k.clone(), v.clone(), pos)
        for b in range(5):
            alone = fastlinear.decode_attention(
                qkv[b : b + 1].contiguous(),
                k[b : b + 1].clone(),
                v[b : b + 1].clone(),
                pos[b : b + 1],
            )
            assert torch.equal(alone[0], batched[b]), b


@needs_kernel
def test_decode_attention_refuses_what_it_cannot_do_and_writes_nothing() -> None:
    qkv, k, v, pos = _attention_case()
    k0, v0 = k.clone(), v.clone()
    with torch.no_grad():
        for bad in ([0, 5, 40, 1, 1], [0, -1, 3, 1, 1]):
            with pytest.raises(ValueError, match=r"positions must be in 0\.\.39"):
                fastlinear.decode_attention(qkv, k, v, torch.tensor(bad))
        assert torch.equal(k, k0) and torch.equal(v, v0)
        # Not its case: the caller falls back to SDPA.
        assert fastlinear.decode_attention(qkv.double(), k.double(), v.double(), pos) is None
        assert fastlinear.decode_attention(qkv, k[:, :, :30], v[:, :, :30], pos) is None
        assert fastlinear.decode_attention(qkv, k, v, pos.int()) is None
        assert fastlinear.decode_attention(qkv, k[:4], v[:4], pos) is None  # fewer cache rows
    assert fastlinear.decode_attention(qkv, k, v, pos) is None  # autograd on
    assert torch.equal(k, k0) and torch.equal(v, v0)


@needs_kernel
def test_decode_step_with_rows_at_different_positions_matches_the_plain_model() -> None:
    """Continuous batching: the kernel's attention (each row over its own positions) against
    the plain model's SDPA with a mask, logits and caches, over several steps."""
    plain = _tiny()
    fast = copy.deepcopy(plain)
    use_fast_linear(fast)
    lengths = [3, 9, 1, 6]
    caches = [KVCache(plain.config, 4, 32) for _ in range(2)]
    with torch.no_grad():
        for m, c in zip((plain, fast), caches, strict=True):
            for r, n in enumerate(lengths):
                m.features(torch.arange(100, 100 + n)[None], kv_cache=c.row(r))
        pos = torch.tensor(lengths)
        for _ in range(4):
            idx = torch.randint(0, 50257, (4,))
            a = plain.decode_step(idx, pos, caches[0])
            b = fast.decode_step(idx, pos, caches[1])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            pos = pos + 1
    for ka, kb in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)


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
    fast = _tiny()
    use_fast_linear(fast)
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
    out_fast = fast.generate("Asthma is", params)
    plain = Engine(model, max_batch_size=2, fast_linear=False)
    assert not plain.fast_linear and not any(
        isinstance(m, SmallBatchLinear) for m in model.modules()
    )
    out_plain = plain.generate("Asthma is", params)
    assert out_fast["token_ids"] == out_plain["token_ids"]
    # An int8 copy of a model an Engine has swapped is still fully quantised.
    Engine(model, max_batch_size=1)
    q = quantize_int8(model)
    assert is_quantized(q) and not any(isinstance(m, SmallBatchLinear) for m in q.modules())
    assert not Engine(q, max_batch_size=1).fast_linear


def test_complete_leaves_the_model_as_it_was() -> None:
    # Training prints sample completions from the model it is training.
    from medgpt.generation import complete

    model = _tiny()
    complete(model, "Asthma is", max_new_tokens=4)
    assert all(type(m) is not SmallBatchLinear for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


_REPORT = """
    import os
    from medgpt import fastlinear
    from medgpt.config import ModelConfig
    from medgpt.generation import Engine, SamplingParams
    from medgpt.model import GPT

    print("reason:", fastlinear.unavailable_reason())
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    e = Engine(m, max_batch_size=1)
    print("fast:", e.fast_linear)
    out = e.generate("Fever", SamplingParams(max_new_tokens=3, temperature=0))
    print("tokens:", len(out["token_ids"]))
    cache = os.environ["MEDGPT_KERNEL_CACHE"]
    print("files:", sorted(os.listdir(cache)) if os.path.isdir(cache) else None)
"""


def test_a_failed_build_falls_back_to_f_linear_and_leaves_nothing(tmp_path) -> None:
    cache = tmp_path / "kernels"
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache), CC="/bin/false")
    assert r.returncode == 0, r.stderr
    assert "reason: /bin/false failed to build small_linear.c, decode_attention.c" in r.stdout
    assert "fast: False" in r.stdout and "tokens: 3" in r.stdout
    assert "files: []" in r.stdout  # no half-built library left for the next process


def test_an_unwritable_cache_falls_back_with_the_reason(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(blocker / "kernels"))
    assert r.returncode == 0, r.stderr
    assert "reason: cannot write the kernel cache" in r.stdout and "MEDGPT_KERNEL_CACHE" in r.stdout
    assert "fast: False" in r.stdout and "tokens: 3" in r.stdout


def test_disabled_by_environment(tmp_path) -> None:
    r = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(tmp_path / "k"), MEDGPT_FAST_LINEAR="0")
    assert r.returncode == 0, r.stderr
    assert "reason: disabled by MEDGPT_FAST_LINEAR=0" in r.stdout and "fast: False" in r.stdout
    assert "files: None" in r.stdout


@needs_kernel
def test_builds_once_into_the_cache(tmp_path) -> None:
    cache = tmp_path / "kernels"
    first = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert "reason: None" in first.stdout and "fast: True" in first.stdout
    (built,) = list(cache.iterdir())
    assert built.name.startswith("medgpt_kernels-") and built.suffix == ".so"
    mtime = built.stat().st_mtime_ns
    # A second process loads the library it finds; a missing compiler does not matter then.
    second = _python(_REPORT, MEDGPT_KERNEL_CACHE=str(cache), CC="/bin/false")
    assert "fast: True" in second.stdout, second.stderr
    assert [p.name for p in cache.iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == mtime
