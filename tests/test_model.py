"""The GPT module: loss, KV cache, parameter/FLOP counts, training behaviour (HF GPT-2
conversion: tests/test_hf.py; the tiny models both use: medgpt.testing.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgpt.config import ModelConfig
from medgpt.kv_cache import KVCache
from medgpt.model import GPT, count_params, flops_per_token
from medgpt.testing.models import BLOCK, VOCAB, random_ids, tiny_config, tiny_gpt

transformers = pytest.importorskip("transformers")


# --- loss ----------------------------------------------------------------------------------


def test_loss_matches_cross_entropy_by_hand() -> None:
    model = tiny_gpt(seed=3)
    x = random_ids(2, 16, seed=3)
    y = random_ids(2, 16, seed=4)
    logits, loss = model(x, y)
    assert loss is not None and loss.ndim == 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    by_hand = -logp.gather(-1, y.unsqueeze(-1)).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)))
    # Without targets: no loss, same logits.
    logits2, loss2 = model(x)
    assert loss2 is None
    assert torch.equal(logits, logits2)


def test_loss_ignores_minus_one() -> None:
    model = tiny_gpt(seed=3)
    x = random_ids(2, 16, seed=3)
    y = random_ids(2, 16, seed=4)
    y_masked = y.clone()
    y_masked[0, :5] = -1
    y_masked[1, 10:] = -1
    logits, loss = model(x, y_masked)
    keep = y_masked != -1
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    by_hand = -picked[keep].mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5
    # The ignored positions really are left out: the full mean differs.
    assert abs(loss.item() - (-picked.mean()).item()) > 1e-4


# --- KV cache ------------------------------------------------------------------------------


def test_kv_cache_matches_full_recompute() -> None:
    model = tiny_gpt(seed=5)
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache(model.config, batch_size=2)
        pieces = [model(ids[:, :5], kv_cache=cache)[0]]  # prefill
        assert cache.pos == 5
        pieces.append(model(ids[:, 5:12], kv_cache=cache)[0])  # a chunk after a prefix
        assert cache.pos == 12
        for t in range(12, 24):  # then one token at a time
            pieces.append(model(ids[:, t : t + 1], kv_cache=cache)[0])
        assert cache.pos == 24
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)

    # reset() starts over on the same buffers.
    cache.reset()
    with torch.no_grad():
        again, _ = model(ids[:, :3], kv_cache=cache)
    torch.testing.assert_close(again, full[:, :3], atol=1e-5, rtol=0)


def test_kv_cache_short_max_len() -> None:
    model = tiny_gpt(seed=6)
    ids = random_ids(2, 10, seed=6)
    cache = KVCache(model.config, batch_size=2, max_len=10)
    with torch.no_grad():
        full, _ = model(ids)
        a, _ = model(ids[:, :4], kv_cache=cache)
        b, _ = model(ids[:, 4:10], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_overflow_raises() -> None:
    model = tiny_gpt()
    cache = KVCache(model.config, batch_size=2, max_len=8)
    ids = random_ids(2, 10)
    with torch.no_grad():
        model(ids[:, :6], kv_cache=cache)
        with pytest.raises(ValueError, match="exceeds"):
            model(ids[:, 6:9], kv_cache=cache)
        assert cache.pos == 6  # the failed call left the cache as it was
        model(ids[:, 6:8], kv_cache=cache)
        assert cache.pos == 8
        with pytest.raises(ValueError):
            model(ids[:, 8:9], kv_cache=cache)


def test_kv_cache_longer_than_block_size_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCache(tiny_config(), batch_size=1, max_len=BLOCK + 1)


def test_sequence_longer_than_block_size_raises() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match=str(BLOCK)):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    model(torch.zeros(1, BLOCK, dtype=torch.long))  # exactly the context is fine


def test_greedy_decoding_cache_equals_recompute() -> None:
    model = tiny_gpt(seed=7)
    prompt = random_ids(2, 6, seed=7)
    steps = 10
    with torch.no_grad():
        # Full recompute.
        seq = prompt
        for _ in range(steps):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        slow = seq[:, prompt.shape[1] :]
        # With the cache.
        cache = KVCache(model.config, batch_size=2)
        logits, _ = model(prompt, kv_cache=cache)
        toks = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            logits, _ = model(nxt, kv_cache=cache)
        fast = torch.cat(toks, dim=1)
    assert fast.shape == (2, steps)
    assert fast.tolist() == slow.tolist()
    assert len(set(fast.flatten().tolist())) > 1  # not a degenerate constant output


# --- counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": False},
        {"n_layer": 3, "n_head": 4, "n_embd": 48, "block_size": 16, "vocab_size": 1000},
        {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 5, "vocab_size": 7, "bias": False},
    ],
)
def test_num_params_matches_count_params(overrides: dict) -> None:
    cfg = tiny_config(**overrides)
    model = GPT(cfg)
    by_hand = sum(p.numel() for p in set(model.parameters()))
    assert model.num_params(non_embedding=False) == count_params(cfg, non_embedding=False)
    assert model.num_params(non_embedding=False) == by_hand
    assert model.num_params() == count_params(cfg) == by_hand - cfg.block_size * cfg.n_embd


@pytest.mark.parametrize(
    ("preset", "total"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_param_counts(preset: str, total: int) -> None:
    cfg = ModelConfig.preset(preset)
    assert count_params(cfg, non_embedding=False) == total
    assert count_params(cfg) == total - cfg.block_size * cfg.n_embd
    if preset in ("gpt2", "gpt2-medium"):
        # On the meta device: shapes only, no memory or init time.
        with torch.device("meta"):
            model = GPT(cfg)
        assert model.num_params(non_embedding=False) == total


def test_medium_count_matches_transformers() -> None:
    cfg = ModelConfig.preset("gpt2-medium")
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        )
    assert hf.num_parameters() == count_params(cfg, non_embedding=False)


@pytest.mark.parametrize("seq_len", [1, 64, 1024])
def test_flops_per_token(seq_len: int) -> None:
    for cfg in (tiny_config(), ModelConfig.preset("gpt2"), tiny_config(bias=False)):
        expected = 6 * count_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * seq_len
        assert flops_per_token(cfg, seq_len) == expected
    gpt2 = ModelConfig.preset("gpt2")
    assert flops_per_token(gpt2) == flops_per_token(gpt2, gpt2.block_size)


# --- training behaviour ------------------------------------------------------------------------


def test_dropout_train_vs_eval() -> None:
    model = tiny_gpt(dropout=0.2)
    ids = random_ids(2, 16)
    model.train()
    a, _ = model(ids)
    b, _ = model(ids)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c, _ = model(ids)
        d, _ = model(ids)
    assert torch.equal(c, d)
    # With dropout 0, train mode is deterministic too.
    plain = tiny_gpt(dropout=0.0).train()
    assert torch.equal(plain(ids)[0], plain(ids)[0])


def test_gradients_reach_every_parameter() -> None:
    model = tiny_gpt(seed=8).train()
    x = random_ids(2, BLOCK, seed=8)
    y = random_ids(2, BLOCK, seed=9)
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_weights_tied() -> None:
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once
