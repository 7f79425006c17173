"""The decoding engine: cached decoding equals recompute, batching does not change results,
continuous admission, stop strings, limits, cancellation, streaming text."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from medgpt.config import ModelConfig
from medgpt.generation import (
    Engine,
    QueueFull,
    SamplingParams,
    complete,
    filter_logits,
    sample_batch,
)
from medgpt.kv_cache import SDPA
from medgpt.model import GPT
from medgpt.tokenizer import EOT_ID, get_tokenizer

PROMPTS = [
    "Diabetes mellitus is",
    "Asthma",
    "The patient presents with chest pain and shortness of breath",
    "Hypertension: treatment options include",
    "A",
    "Symptoms of migraine with aura are",
]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    # Sharper than a fresh init (weights scaled up) so sampling is not uniform noise and
    # greedy has clear winners.
    m = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96))
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)
    return m.eval()


def _drain(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_work:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


def test_cached_greedy_equals_full_recompute(model) -> None:
    enc = get_tokenizer()
    for prompt in PROMPTS:
        ids = enc.encode_ordinary(prompt)
        ref: list[int] = []
        with torch.no_grad():
            seq = list(ids)
            for _ in range(30):
                logits, _ = model(torch.tensor([seq]))
                tok = int(logits[0, -1].argmax())
                if tok == EOT_ID:
                    break
                ref.append(tok)
                seq.append(tok)
        out = Engine(model, max_batch_size=1).generate(
            prompt, SamplingParams(max_new_tokens=30, temperature=0)
        )
        assert out["token_ids"] == ref, prompt


def _params(i: int) -> SamplingParams:
    variants = [
        SamplingParams(max_new_tokens=25, temperature=0),
        SamplingParams(max_new_tokens=40, temperature=0.9, seed=1),
        SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, seed=2),
        SamplingParams(max_new_tokens=33, temperature=0.7, top_p=0.8, seed=3),
        SamplingParams(max_new_tokens=50, temperature=1.0, top_k=5, top_p=0.9, seed=4),
        SamplingParams(max_new_tokens=7, temperature=0.5, seed=5),
    ]
    return variants[i % len(variants)]


@pytest.fixture(scope="module")
def solo(model) -> list[dict]:
    """Each of PROMPTS with _params(i), run alone on a one-row engine."""
    return [Engine(model, 1).generate(p, _params(i)) for i, p in enumerate(PROMPTS)]


def test_batched_equals_solo_and_requests_join_mid_batch(model, solo) -> None:
    engine = Engine(model, max_batch_size=3)  # fewer rows than requests: admission mid-run
    for i, p in enumerate(PROMPTS[:4]):
        engine.submit(f"r{i}", p, _params(i))
    events: dict[str, list] = {}
    late_submitted = False
    order = []
    while engine.has_work:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
            if ev.finished:
                order.append(ev.request_id)
        if not late_submitted and len(events) >= 3:  # the batch is running: two more arrive
            for i in (4, 5):
                engine.submit(f"r{i}", PROMPTS[i], _params(i))
            late_submitted = True
    for i in range(len(PROMPTS)):
        evs = events[f"r{i}"]
        assert [t for e in evs for t in e.token_ids] == solo[i]["token_ids"], i
        assert "".join(e.text for e in evs) == solo[i]["text"]
        assert evs[-1].finished and evs[-1].finish_reason == solo[i]["finish_reason"]
        assert all(not e.finished for e in evs[:-1])
    # The short late request (r5, 7 tokens) left before the long early ones (r1, r4).
    assert order.index("r5") < order.index("r4")


def test_same_seed_same_text_other_seed_other_text(model) -> None:
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=42)
    a = Engine(model, 2).generate("Asthma", p)
    b = Engine(model, 4).generate("Asthma", p)
    c = Engine(model, 2).generate(
        "Asthma", SamplingParams(max_new_tokens=30, temperature=1.0, seed=43)
    )
    assert a == b
    assert a["token_ids"] != c["token_ids"]


def test_streamed_text_is_the_decoded_tokens(model) -> None:
    enc = get_tokenizer()
    for seed in range(8):
        engine = Engine(model, 2)
        engine.submit("x", "Fever", SamplingParams(max_new_tokens=60, temperature=1.5, seed=seed))
        evs = _drain(engine)["x"]
        tokens = [t for e in evs for t in e.token_ids]
        assert "".join(e.text for e in evs) == enc.decode(tokens)


def test_max_new_tokens_is_honoured(model) -> None:
    engine = Engine(model, 2)
    engine.submit("a", "Asthma", SamplingParams(max_new_tokens=5, temperature=0))
    engine.submit("b", "Fever", SamplingParams(max_new_tokens=1, temperature=0))
    ev = _drain(engine)
    for rid, n in (("a", 5), ("b", 1)):
        last = ev[rid][-1]
        if last.finish_reason == "length":
            assert last.completion_tokens == n
        else:  # end-of-text came first
            assert last.finish_reason == "stop" and last.completion_tokens < n


def test_stop_strings_end_the_text_before_them(model) -> None:
    free = Engine(model, 1).generate(PROMPTS[2], SamplingParams(max_new_tokens=40, temperature=0))
    text = free["text"]
    assert len(text) > 20
    stop = text[10:14]
    first = text.find(stop)
    for stops in ((stop,), ("never-occurs", stop)):
        engine = Engine(model, 2)
        engine.submit("s", PROMPTS[2], SamplingParams(max_new_tokens=40, temperature=0, stop=stops))
        evs = _drain(engine)["s"]
        streamed = "".join(e.text for e in evs)
        assert streamed == text[:first]
        assert evs[-1].finish_reason == "stop"
        assert all(stop not in e.text for e in evs)


def test_cancel_a_running_and_a_waiting_request(model) -> None:
    engine = Engine(model, max_batch_size=1)
    engine.submit("run", "Asthma", SamplingParams(max_new_tokens=80, temperature=0.8, seed=1))
    engine.submit("wait", "Fever", SamplingParams(max_new_tokens=80, temperature=0.8, seed=2))
    engine.step()
    engine.step()
    engine.cancel("run")
    engine.cancel("wait")
    ev = _drain(engine)
    assert ev["run"][-1].finish_reason == "cancelled"
    assert ev["wait"][-1].finish_reason == "cancelled"
    stats = engine.stats()
    assert not engine.has_work and (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["finished"] == {"cancelled": 2}
    # The rows are free again and the ids reusable.
    assert engine.generate("Asthma", SamplingParams(max_new_tokens=3, temperature=0))["text"]


def test_limits_and_bad_parameters(model) -> None:
    engine = Engine(model, max_batch_size=1, max_queue=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        engine.submit("long", "word " * 90, SamplingParams(max_new_tokens=10))
    engine.submit("a", "x", SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.submit("a", "y", SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit("b", "y", SamplingParams(max_new_tokens=2))
    for kwargs, field in (
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"stop": ("",)}, "stop"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_empty_prompt_starts_from_end_of_text(model) -> None:
    out = Engine(model, 1).generate("", SamplingParams(max_new_tokens=5, temperature=0))
    assert out["prompt_tokens"] == 1


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it.
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 0, 0.4)).tolist() == [False, True, True, True]
    assert not torch.isinf(filter_logits(logits, 0, 1.0)).any()


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0, 30.0])  # flat (full sort) to peaked
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_same_set_as_a_full_sort(scale: float, top_p: float) -> None:
    # filter_logits looks at the top 64 / 1,024 first; the set must be the one a sort of the
    # whole vocabulary gives.
    torch.manual_seed(int(scale * 10) + int(top_p * 1000))
    logits = torch.randn(50257) * scale
    probs = torch.softmax(logits.double(), -1)
    sorted_p, order = torch.sort(probs, descending=True)
    want = set(order[(sorted_p.cumsum(-1) - sorted_p) < top_p].tolist())
    got = set(torch.nonzero(~torch.isinf(filter_logits(logits, 0, top_p))).flatten().tolist())
    assert got == want and len(got) >= 1


def test_sampling_follows_the_distribution(model) -> None:
    # Rough check that inverse-CDF sampling draws from softmax(logits / T): token frequencies
    # over many seeds track the probabilities.
    from medgpt.generation import sample_token

    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    counts = [0, 0, 0]
    for seed in range(3000):
        gen = torch.Generator().manual_seed(seed)
        counts[sample_token(logits, SamplingParams(temperature=1.0), gen)] += 1
    assert [round(c / 3000, 1) for c in counts] == [0.6, 0.3, 0.1]


MIXED = [  # one row of each kind the engine batches together
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.5, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.5),
]


def test_a_batch_samples_each_row_as_it_would_alone() -> None:
    from medgpt.generation import sample_batch, sample_token

    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), 50257) * 4
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(MIXED))]
        batched = sample_batch(logits, MIXED, gens)
        alone = [
            sample_token(logits[i], p, torch.Generator().manual_seed(seed * 10 + i))
            for i, p in enumerate(MIXED)
        ]
        assert batched == alone
        # Each generator gave exactly one draw (none for greedy rows): the next is the same
        # as a fresh generator's second.
        for i, (g, p) in enumerate(zip(gens, MIXED, strict=True)):
            fresh = torch.Generator().manual_seed(seed * 10 + i)
            if p.temperature:
                torch.rand((), generator=fresh, dtype=torch.float64)
            assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=fresh))
    assert batched[0] == int(logits[0].argmax()) and batched[4] == int(logits[4].argmax())


def test_a_batch_rejects_params_that_do_not_match_its_rows() -> None:
    from medgpt.generation import sample_batch

    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"logits \(B, V\) and B params and generators"):
        sample_batch(torch.zeros(2, 10), [SamplingParams()], [gen])
    with pytest.raises(ValueError, match=r"logits \(B, V\) and B params and generators"):
        sample_batch(torch.zeros(2, 10), [SamplingParams()] * 2, [gen])
    with pytest.raises(ValueError, match=r"logits \(B, V\) and B params and generators"):
        sample_batch(torch.zeros(10), [SamplingParams()], [gen])


def test_complete_keeps_its_contract(model) -> None:
    text = complete(
        model, "Asthma " * 200, max_new_tokens=20, seed=3
    )  # prompt longer than the context
    assert isinstance(text, str)
    assert complete(model, "Asthma", 10, seed=3) == complete(model, "Asthma", 10, seed=3)


def test_the_cache_grows_without_changing_results(model, solo) -> None:
    # A cache that starts at 4 positions doubles as sequences grow; tokens are unchanged.
    engine = Engine(model, max_batch_size=3, initial_cache_len=4)
    for i, p in enumerate(PROMPTS):
        engine.submit(f"r{i}", p, _params(i))
    events, seen = _drain_watching(engine)
    for i in range(len(PROMPTS)):
        assert [t for e in events[f"r{i}"] for t in e.token_ids] == solo[i]["token_ids"], i
    assert 4 < max(st["cache_positions"] for st in seen) <= 96
    assert engine.stats()["cache_bytes"] == 0  # idle again: the memory is given back


# Keys and values of one position, all layers, fp32: 2 x n_layer x n_embd x 4 bytes.
BYTES_PER_POSITION = 2 * 2 * 32 * 4
CONTEXT = 96


def _drain_watching(engine: Engine) -> tuple[dict[str, list], list[dict]]:
    """_drain, plus the engine's stats after every step."""
    events: dict[str, list] = {}
    seen = []
    while engine.has_work:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        seen.append(engine.stats())
    return events, seen


def _tokens(events: list) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_the_cache_has_rows_only_for_running_requests_and_shrinks(model) -> None:
    long_p = SamplingParams(max_new_tokens=80, temperature=0.8, seed=1)
    short_p = SamplingParams(max_new_tokens=20, temperature=0.8, seed=2)
    solo_long = Engine(model, 1).generate("Asthma", long_p)
    solo_short = Engine(model, 1).generate("Fever", short_p)
    engine = Engine(model, max_batch_size=4, initial_cache_len=8)
    assert engine.stats()["cache_bytes"] == 0  # nothing is allocated before a request arrives
    engine.submit("long", "Asthma", long_p)
    events: dict[str, list] = {}
    seen = []
    while "long" not in events or not events["long"][-1].finished:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        seen.append(engine.stats())
        if len(events["long"]) == 70:  # near its end, a short request joins
            engine.submit("short", "Fever", short_p)
    # One row while the long request ran alone, and no more positions than it can reach
    # (prompt 2 + 80 new tokens - 1), not max_batch_size rows.
    assert seen[0]["cache_rows"] == 1
    assert max(st["cache_positions"] for st in seen) == 2 + 80 - 1
    assert max(st["cache_rows"] for st in seen) == 2
    # The long request has left: the short one alone holds far fewer positions.
    after = engine.step()
    st = engine.stats()
    assert st["running"] == 1 and st["cache_rows"] == 1
    assert st["cache_positions"] <= 2 + 20 - 1
    assert st["cache_bytes"] == st["cache_positions"] * BYTES_PER_POSITION
    rest, _ = _drain_watching(engine)
    assert _tokens(events["long"]) == solo_long["token_ids"]
    short = events["short"] + [e for e in after if e.request_id == "short"] + rest["short"]
    assert _tokens(short) == solo_short["token_ids"]
    assert engine.stats()["cache_bytes"] == 0 and engine.stats()["cache_rows"] == 0


def test_a_budget_makes_a_long_request_wait_and_both_finish_as_alone(model) -> None:
    pa = SamplingParams(max_new_tokens=60, temperature=0.9, seed=11)
    pb = SamplingParams(max_new_tokens=60, temperature=0.9, seed=12)
    solo_a = Engine(model, 1).generate("Asthma", pa)
    solo_b = Engine(model, 1).generate("Fever", pb)
    budget = 100  # one request needs 2 + 60 - 1 = 61 positions; two need 122
    engine = Engine(model, max_batch_size=4, kv_cache_tokens=budget, initial_cache_len=16)
    engine.submit("a", "Asthma", pa)
    engine.submit("b", "Fever", pb)  # accepted, not refused: it waits
    events, seen = _drain_watching(engine)
    assert (seen[0]["running"], seen[0]["waiting"]) == (1, 1)
    # b started only once a had finished, and both gave what they give alone.
    a_done = next(i for i, st in enumerate(seen) if st["finished"].get("length") == 1)
    assert all(st["waiting"] == 1 for st in seen[:a_done])
    assert all(st["running"] <= 1 for st in seen)
    assert _tokens(events["a"]) == solo_a["token_ids"]
    assert _tokens(events["b"]) == solo_b["token_ids"]
    assert events["b"][-1].finish_reason == "length"


def test_the_cache_stays_within_its_budget_under_load(model, solo) -> None:
    budget = 150
    engine = Engine(model, max_batch_size=4, kv_cache_tokens=budget, initial_cache_len=8)
    for i, p in enumerate(PROMPTS):
        engine.submit(f"r{i}", p, _params(i))
    events, seen = _drain_watching(engine)
    for i in range(len(PROMPTS)):
        assert _tokens(events[f"r{i}"]) == solo[i]["token_ids"], i
    assert max(st["running"] for st in seen) > 1  # the budget still lets requests share
    assert all(st["cache_rows"] * st["cache_positions"] <= budget for st in seen)
    # Including the moment a resize holds an old layer tensor beside the new cache.
    assert engine.stats()["cache_peak_bytes"] <= (budget + CONTEXT) * BYTES_PER_POSITION


def test_a_request_larger_than_the_budget_still_runs_alone(model) -> None:
    p = SamplingParams(max_new_tokens=50, temperature=0.8, seed=3)
    solo = Engine(model, 1).generate("Asthma", p)
    engine = Engine(model, max_batch_size=4, kv_cache_tokens=10)
    engine.submit("big", "Asthma", p)
    engine.submit("next", "Fever", SamplingParams(max_new_tokens=5, temperature=0))
    events, seen = _drain_watching(engine)
    assert _tokens(events["big"]) == solo["token_ids"]
    assert events["next"][-1].finished
    assert all(st["running"] <= 1 for st in seen)
    assert engine.stats()["cache_peak_bytes"] <= (10 + CONTEXT) * BYTES_PER_POSITION


@pytest.mark.parametrize("bad", [0, -5, 2.5, "100", True])
def test_the_budget_knob_is_validated(model, bad) -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens: must be a whole number"):
        Engine(model, kv_cache_tokens=bad)


def test_the_serve_config_validates_the_budget() -> None:
    from medgpt.errors import ConfigError
    from medgpt.serving import ServeConfig

    assert ServeConfig.from_dict({"kv_cache_tokens": 2048}).kv_cache_tokens == 2048
    for bad in (0, -1, 2.5, "many"):
        with pytest.raises(ConfigError, match="kv_cache_tokens"):
            ServeConfig.from_dict({"kv_cache_tokens": bad})


# --- weights in half precision (a GPU replica's dtype setting) -----------------------------
# Production refuses half precision on a CPU replica (ServeConfig: these CPUs run it far slower
# than float32); the Engine itself takes any dtype, which lets the CPU tests prove the plumbing
# on the generic path (F.linear + SDPA) that a GPU replica runs.
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_weights_decode_with_a_cache_of_their_dtype(model, dtype) -> None:
    half = copy.deepcopy(model).to(dtype=dtype)
    assert half.lm_head.weight is half.transformer.wte.weight  # still tied after the cast
    engine = Engine(half, max_batch_size=2, initial_cache_len=4)
    assert not engine.fast_linear and engine.decode_backend is SDPA  # the kernels are fp32
    assert engine.stats()["dtype"] == str(dtype).removeprefix("torch.")
    assert all(t.dtype == dtype for t in (*engine.cache.k, *engine.cache.v))
    # The fixture's model has clear greedy winners (top-2 margins >= 0.27 against half
    # rounding of <= 0.03 here): its tokens are the float32 model's.
    ref = Engine(model, max_batch_size=1)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.submit(f"r{i}", prompt, params)
    events, seen = _drain_watching(engine)
    for i, prompt in enumerate(PROMPTS[:4]):
        assert _tokens(events[f"r{i}"]) == ref.generate(prompt, params)["token_ids"], prompt
    # The cache grew (from 4 positions) and shrank in the weights' dtype: half fp32's bytes.
    assert max(st["cache_positions"] for st in seen) > 4
    for st in seen:
        assert (
            st["cache_bytes"] == st["cache_rows"] * st["cache_positions"] * BYTES_PER_POSITION // 2
        )
    assert all(t.dtype == dtype for t in (*engine.cache.k, *engine.cache.v))
    # Seeded sampling works on half logits and stays reproducible.
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=4)
    a, b = engine.generate("Asthma", sampled), engine.generate("Asthma", sampled)
    assert a == b and len(a["token_ids"]) >= 1


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_logits_follow_float32_within_rounding(dtype, monkeypatch) -> None:
    """Every step's logits of a batch decoded in half precision (rows at different positions,
    prompts prefilled into the cache) against the float32 model's full recompute of the same
    tokens: equal to half rounding. A wrong cache row or position would be off by far more."""
    torch.manual_seed(0)
    ref = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96))
    with torch.no_grad():  # varied greedy tokens and sampled text, not one repeated token
        ref.transformer.wte.weight.mul_(2)
        ref.transformer.wpe.weight.mul_(4)
    ref.eval()
    half = copy.deepcopy(ref).to(dtype=dtype)
    steps: list[tuple[list[int], torch.Tensor]] = []
    advance = Engine._advance_all

    def spy(self, seqs, logits):
        steps.extend(
            (s.prompt + s.generated, row.clone()) for s, row in zip(seqs, logits, strict=True)
        )
        return advance(self, seqs, logits)

    monkeypatch.setattr(Engine, "_advance_all", spy)
    engine = Engine(half, max_batch_size=3)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.submit(f"r{i}", prompt, SamplingParams(max_new_tokens=10, temperature=0.8, seed=i))
    events = _drain(engine)
    assert len({t for i in range(3) for t in _tokens(events[f"r{i}"])}) > 5
    assert len(steps) >= 3 * 5
    worst = 0.0
    with torch.no_grad():
        for context, logits in steps:
            assert logits.dtype == dtype  # the forward ran in half
            full = ref(torch.tensor([context]))[0][0, -1]
            worst = max(worst, float((logits.float() - full).abs().max() / full.abs().max()))
    assert worst < 0.03, worst  # measured here: 0.008 (bfloat16), 0.001 (float16)


def test_half_logits_are_sampled_as_their_float32_values() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 4
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0),
    ]

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(4)]

    for dtype in HALF:
        low = logits.to(dtype)
        assert sample_batch(low, params, gens()) == sample_batch(low.float(), params, gens())


# --- scoring: logprobs, prompt logprobs, max_new_tokens 0 --------------------------------------


def _direct_logprobs(model: GPT, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's own full forward pass (no cache, no engine, F.linear and
    SDPA): row j is the distribution of the token at position j + 1."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def _check_scores(model: GPT, prompt_ids: list[int], out: dict, top: int, echo: bool) -> None:
    """Every reported logprob and its top alternatives equal the direct forward's."""
    scored = out["logprobs"]
    # Every generated token is reported, end-of-text too when it ended the request.
    assert [e.token for e in scored][: len(out["token_ids"])] == out["token_ids"]
    assert len(scored) == len(out["token_ids"]) + (out["finish_reason"] == "stop")
    tokens = prompt_ids + [e.token for e in scored]
    ref = _direct_logprobs(model, tokens)
    entries = list(enumerate(scored, start=len(prompt_ids)))
    if echo:
        prompt = out["prompt_logprobs"]
        assert [e.token for e in prompt] == prompt_ids
        assert prompt[0].logprob is None and prompt[0].top == [] and prompt[0].offset == 0
        entries = list(enumerate(prompt))[1:] + entries
    else:
        assert out["prompt_logprobs"] is None
    assert entries
    for pos, e in entries:
        row = ref[pos - 1]
        assert e.logprob == pytest.approx(row[tokens[pos]].item(), abs=1e-4), pos
        values, ids = row.topk(top)
        assert [t for t, _ in e.top] == ids.tolist(), pos
        assert [v for _, v in e.top] == pytest.approx(values.tolist(), abs=1e-4), pos
        if e.top and e.top[0][0] == e.token:  # the same number when it is the most likely
            assert e.top[0][1] == e.logprob


SCORED = [
    # (prompt, params): sampled, greedy, prompt only, no alternatives, a one-token prompt.
    (PROMPTS[2], SamplingParams(12, 0.9, seed=7, logprobs=5, prompt_logprobs=True)),
    (PROMPTS[0], SamplingParams(9, 0, logprobs=2)),
    (PROMPTS[3], SamplingParams(0, logprobs=3, prompt_logprobs=True)),
    (PROMPTS[5], SamplingParams(6, 1.2, top_k=10, seed=3, logprobs=0, prompt_logprobs=True)),
    ("A", SamplingParams(4, 0.7, seed=1, logprobs=1, prompt_logprobs=True)),
]


@pytest.mark.parametrize("fast_linear", [True, False], ids=["kernel", "F.linear"])
def test_logprobs_are_the_models_log_softmax_alone_and_in_a_batch(model, solo, fast_linear):
    """Scored requests alone, then all of them admitted together beside the ordinary
    requests of PROMPTS (one packed prefill with the kernel; one prompt a pass without) and
    one more joining mid-batch: every logprob and top-N is the direct forward's, the scored
    requests sample what they do alone, and the ordinary ones what they do without them."""
    enc = get_tokenizer()
    alone = [Engine(model, 1, fast_linear=fast_linear).generate(p, sp) for p, sp in SCORED]
    engine = Engine(model, max_batch_size=12, fast_linear=fast_linear)
    packs: list[int] = []  # prompts per prefill pass that kept every position
    features = engine.model.prefill_features

    def spy(prompts: list[list[int]], *args: object) -> torch.Tensor:
        packs.append(len(prompts))
        return features(prompts, *args)

    engine.model.prefill_features = spy
    for i, (p, sp) in enumerate(SCORED):
        engine.submit(f"s{i}", p, sp)
    for i, p in enumerate(PROMPTS):
        engine.submit(f"r{i}", p, _params(i))
    events: dict[str, list] = {}
    for ev in engine.step():  # everything admitted in one step
        events.setdefault(ev.request_id, []).append(ev)
    late = SamplingParams(10, 0, logprobs=4, prompt_logprobs=True)
    engine.submit("late", PROMPTS[1], late)
    for rid, evs in _drain(engine).items():
        events.setdefault(rid, []).extend(evs)
    jobs = [*SCORED, (PROMPTS[1], late)]
    for i, (prompt, sp) in enumerate(jobs):
        evs = events["late" if i == len(SCORED) else f"s{i}"]
        out = {
            "token_ids": _tokens(evs),
            "text": "".join(e.text for e in evs),
            "finish_reason": evs[-1].finish_reason,
            "logprobs": [x for e in evs for x in e.logprobs],
            "prompt_logprobs": evs[0].prompt_logprobs,
        }
        assert all(e.prompt_logprobs is None for e in evs[1:])
        ids = enc.encode_ordinary(prompt)
        _check_scores(model, ids, out, sp.logprobs, sp.prompt_logprobs)
        if i < len(SCORED):
            assert out["token_ids"] == alone[i]["token_ids"], i
            _check_scores(model, ids, alone[i], sp.logprobs, sp.prompt_logprobs)
        if sp.max_new_tokens == 0:
            assert out["token_ids"] == [] and out["finish_reason"] == "length"
            assert len(evs) == 1 and evs[0].finished and evs[0].logprobs == []
        # An event reports the tokens whose text starts in what was streamed by then.
        streamed = 0
        for e in evs:
            streamed += len(e.text)
            assert all(x.offset < streamed or x.token == EOT_ID for x in e.logprobs)
    # Packed with the kernel (scored and ordinary prompts in one pass), alone without it.
    assert max(packs) > 1 if engine.fast_linear else set(packs) == {1}
    if engine.fast_linear:  # same rows in any batch: the ordinary requests did not notice
        for i in range(len(PROMPTS)):
            assert _tokens(events[f"r{i}"]) == solo[i]["token_ids"], i
    assert all(e.logprobs is None and e.prompt_logprobs is None
               for i in range(len(PROMPTS)) for e in events[f"r{i}"])  # fmt: skip


def test_a_long_prompt_is_scored_in_chunks(model, monkeypatch) -> None:
    """The head runs over SCORE_ROWS prompt positions at a time; the chunks change nothing."""
    import medgpt.generation as generation

    prompt = " ".join(PROMPTS)
    sp = SamplingParams(3, 0, logprobs=2, prompt_logprobs=True)
    whole = Engine(model, 1).generate(prompt, sp)
    monkeypatch.setattr(generation, "SCORE_ROWS", 7)
    chunked = Engine(model, 1).generate(prompt, sp)
    ids = get_tokenizer().encode_ordinary(prompt)
    assert len(ids) > 3 * 7
    _check_scores(model, ids, chunked, 2, True)
    a, b = chunked["prompt_logprobs"][1:], whole["prompt_logprobs"][1:]
    assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-5)
    assert [[t for t, _ in e.top] for e in a] == [[t for t, _ in e.top] for e in b]


def test_prompt_offsets_cut_the_prompt_into_its_tokens(model) -> None:
    """A token that decodes alone starts at its offset; a character split across tokens
    starts at the offset of those that complete it."""
    from medgpt.tokenizer import token_text

    prompt = "Fièvre: 39 °C — 😀 naïve 🩺"
    out = Engine(model, 1).generate(prompt, SamplingParams(0, logprobs=0, prompt_logprobs=True))
    ids = get_tokenizer().encode_ordinary(prompt)
    offsets = [e.offset for e in out["prompt_logprobs"]]
    assert [e.token for e in out["prompt_logprobs"]] == ids
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(prompt)
    split = 0
    for i, t in enumerate(ids):
        text = token_text(t)
        # Part of a character comes out as U+FFFD: what comes before it is at the offset.
        split += "\ufffd" in text
        whole = text.split("\ufffd")[0]
        assert prompt[offsets[i] : offsets[i] + len(whole)] == whole, i
    assert split >= 3  # the emoji really were split
    # The tokens that end 🩺 (4 bytes in 3 tokens) start where it does.
    assert offsets[-2:] == [len(prompt) - 1] * 2
    assert out["text"] == "" and out["token_ids"] == [] and out["finish_reason"] == "length"


def test_stop_strings_cut_the_logprobs_with_the_text(model) -> None:
    sp = SamplingParams(40, 0, logprobs=1)
    free = Engine(model, 1).generate(PROMPTS[2], sp)
    stop = free["text"][10:14]
    cut = Engine(model, 1).generate(PROMPTS[2], dataclasses.replace(sp, stop=(stop,)))
    text = cut["text"]
    assert cut["finish_reason"] == "stop" and text == free["text"][: free["text"].find(stop)]
    # The tokens whose text starts before the stop string, no more: those of the free run.
    kept = [e for e in free["logprobs"] if e.offset < len(text)]
    assert [(e.token, e.logprob, e.offset) for e in cut["logprobs"]] == [
        (e.token, e.logprob, e.offset) for e in kept
    ]
    assert len(cut["logprobs"]) < len(cut["token_ids"])  # the stop string's tokens are gone
