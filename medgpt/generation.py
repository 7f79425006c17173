"""Decoding: sampling and a continuous-batching engine over the KV cache (no Ray, no HTTP).

The :class:`Engine` owns one batched KV cache with a row per running request (at most
``max_batch_size``). Each :meth:`Engine.step` admits waiting requests (prefilling each prompt
straight into a free row; prompts admitted together share a pass where that changes no
result, see ``_packs``), then decodes one token for every running request in a single
forward pass, each row at its own position. A request that finishes leaves at once and its row
is reused by the next one, so nobody waits for the longest request in a batch. Requests are
submitted and cancelled from any thread; ``step`` runs in one thread at a time (the server runs
it off its event loop).

The cache is sized for the requests that are running, not for the worst case: rows are added
as requests join; positions grow by doublings of ``initial_cache_len`` but never beyond the
longest sequence a running request can reach (prompt + ``max_new_tokens``); it shrinks when it
holds more than twice what the running set needs, and is freed when the engine goes idle.
``kv_cache_tokens`` bounds it: a request waits in the queue (first come, first served) while
admitting it would make rows x positions, reserved for every running request's longest possible
sequence, exceed the budget. A request alone always starts, so the cache holds at most
max(budget, one full-context row) positions, plus one old layer tensor while it is resized.

On the CPU in float32 the engine runs its own module tree over the caller's Parameters
(:func:`medgpt.kernels.with_kernel_linears`: nothing copied, the caller's model unchanged) whose
linear layers are :class:`medgpt.kernels.SmallBatchLinear`, and decodes with the kernel's
attention (:data:`medgpt.kv_cache.KERNEL`) (``fast_linear=True``, the default): decoding
multiplies a few rows by each weight matrix, a shape MKL runs on one core; see that module.
The kernels are built and loaded by the thread that constructs the engine: construct it, warm
it up and step it in one thread (one OpenMP pool).

Any other device or dtype (a GPU replica's bfloat16 or float16 weights; bfloat16 on the CPU in
tests) runs ``F.linear`` and SDPA with the KV cache in the weights' dtype; logits are sampled in
float32 whatever it is.

Sampling is per request: temperature (0 = greedy), top-k, top-p and a seed that drives that
request's own generator, so the same seed and prompt give the same text whether the request
ran alone or beside others. Text is streamed as it becomes valid UTF-8; stop strings are
held back until they can no longer match, and are not part of the output.

Scoring is per request too (``SamplingParams.logprobs``, ``prompt_logprobs``): each generated
token's log-probability and the N most likely tokens at its position, and with
``prompt_logprobs`` the same for every prompt token after the first, from the prefill — which
then keeps the hidden states of every prompt position (:meth:`GPT.prefill_features`) and
applies the head to a few hundred positions at a time. ``max_new_tokens`` 0 is the prefill
alone (pure scoring). Requests that ask for neither run exactly as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from medgpt import kernels
from medgpt.kernels import MAX_ROWS
from medgpt.kv_cache import KERNEL, SDPA, KVCache
from medgpt.model import GPT
from medgpt.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

MAX_STOP_STRINGS = 4
# Prompt positions whose logits exist at once while a prompt is scored (prompt_logprobs):
# 256 x GPT-2's 50,257 float32 logits are 51 MB, and as much again for their log-softmax.
SCORE_ROWS = 256


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()
    # Scoring: each generated token's log-probability and the N most likely tokens at its
    # position (None = no scoring); with prompt_logprobs also the prompt's tokens' (the
    # first has none: nothing comes before it).
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if self.max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens: must be >= 0 (0 = the prefill alone), got {self.max_new_tokens}"
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs: must be >= 0 or None, got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs: needs logprobs (the alternatives per token)")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: must be in [0, 2], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (V,) with everything outside the top-k / nucleus set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits.double(), dim=-1)
        # Only the most likely tokens are ever kept: look at the top 64, then 1,024, and sort
        # everything only when those do not hold top_p of the mass. A trained model's nucleus
        # is mostly a few dozen tokens; a full sort of GPT-2's vocabulary takes 4.4 ms a row
        # here, a topk of 64 0.2 ms.
        n = probs.numel()
        for k in (min(64, n), min(1024, n), n):
            top, order = torch.topk(probs, k) if k < n else torch.sort(probs, descending=True)
            before = top.cumsum(-1) - top
            if before[-1] + top[-1] >= top_p:
                break
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = order[before < top_p]
        out = torch.full_like(logits, float("-inf"))
        out[keep] = logits[keep]
        logits = out
    return logits


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token for each row of last-position logits (B, V): row i with ``params[i]`` and
    one draw from ``generators[i]`` (drawn in row order, so a generator may serve several
    rows).

    Inverse-CDF sampling in float64 from one uniform draw per row. Every operation works row
    by row, and a row's result does not depend on the other rows (tests check), so a request
    samples the same token alone or in any batch. Batched because row by row the softmax and
    cumulative sum over GPT-2's vocabulary took 3.8 ms of a 60 ms decode step at batch 8
    here, together 2.0 ms (``bench/serve_decode_step.py``)."""
    if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != len(params):
        raise ValueError("sample_batch takes logits (B, V) and B params and generators")
    # A bfloat16/float16 model's logits are sampled in float32 (softmax in float64), as a
    # float32 model's are: the same arithmetic whatever the weights' dtype.
    logits = logits.float()
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            tokens[i] = t
    drawn = [i for i, p in enumerate(params) if p.temperature != 0]
    if drawn:
        rows = logits if len(drawn) == len(params) else logits[drawn]
        temps = [[params[i].temperature] for i in drawn]
        scaled = rows / torch.tensor(temps, dtype=torch.float32, device=rows.device)
        for j, i in enumerate(drawn):
            if params[i].top_k or params[i].top_p < 1.0:
                scaled[j] = filter_logits(scaled[j], params[i].top_k, params[i].top_p)
        cdf = torch.softmax(scaled, dim=-1, dtype=torch.float64).cumsum_(-1)
        u = [torch.rand((), generator=generators[i], dtype=torch.float64).item() for i in drawn]
        at = torch.tensor(u, dtype=torch.float64, device=rows.device).unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, at, right=True).clamp_(max=cdf.shape[1] - 1)
        for i, t in zip(drawn, picked.squeeze(1).tolist(), strict=True):
            tokens[i] = t
    return tokens


def token_logprobs(
    logits: torch.Tensor, targets: Sequence[int], top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For each row b of logits (B, V): the log-probability of ``targets[b]`` and the ``top``
    most likely tokens with theirs, most likely first.

    The model's own distribution: the log-softmax of the raw logits, before temperature,
    top-k and top-p shape the sampling — what OpenAI's and vLLM's ``logprobs`` report by
    default. In float32 whatever the weights' dtype, as sampling is. A target's value and its
    entry among the top ones come from the same tensor: equal when it is the most likely
    (clients such as lm-evaluation-harness compare them to tell a greedy continuation)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long, device=lp.device).unsqueeze(1)
    chosen = lp.gather(1, index).squeeze(1).tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen]
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
    tops = [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return chosen, tops


def sample_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token from last-position logits (V,) with this request's generator."""
    return sample_batch(logits.unsqueeze(0), [params], [gen])[0]


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    gen = generator or torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4)))
    params = SamplingParams(temperature=temperature, top_k=top_k)
    return torch.tensor(sample_batch(logits, [params] * len(logits), [gen] * len(logits)))


@dataclasses.dataclass
class TokenLogprob:
    """One token as scoring reports it."""

    token: int
    logprob: float | None  # None for the prompt's first token: nothing before it predicts it
    top: list[tuple[int, float]]  # the N most likely tokens at its position, most likely first
    # Where its text starts, in characters: in the generated text (or in the prompt's, for a
    # prompt token). Tokens that share a character split across them share its offset, and
    # end-of-text, which has no text, sits at the end.
    offset: int


@dataclasses.dataclass
class Event:
    """What one step produced for one request."""

    request_id: str
    text: str  # new text, possibly empty (an incomplete UTF-8 character, a held-back stop)
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # With SamplingParams.logprobs: the generated tokens whose text starts in what has been
    # streamed so far and was not reported before (so held-back and incomplete characters'
    # tokens come with the text they make; tokens cut off by a stop string never come), and
    # end-of-text on the last event when it ended the request. None without logprobs.
    logprobs: list[TokenLogprob] | None = None
    # With prompt_logprobs, on the request's first event: every prompt token's.
    prompt_logprobs: list[TokenLogprob] | None = None


def _decode_more(pending: bytes) -> tuple[str, bytes]:
    """The text that ``pending`` bytes complete, and the bytes of an incomplete last character
    kept for the next token; bytes that can never be UTF-8 become U+FFFD."""
    try:
        return pending.decode("utf-8"), b""
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":  # wait for the rest of the character
            return pending[: e.start].decode("utf-8"), pending[e.start :]
        return pending.decode("utf-8", errors="replace"), b""


def text_offsets(enc: Any, tokens: Sequence[int]) -> list[int]:
    """Where each token's text starts in the text the tokens decode to (streamed as the
    engine streams it): see :attr:`TokenLogprob.offset`."""
    offsets, length, pending = [], 0, b""
    for token in tokens:
        offsets.append(length)
        text, pending = _decode_more(pending + enc.decode_single_token_bytes(token))
        length += len(text)
    return offsets


class _Sequence:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.request_id, self.prompt, self.params = request_id, prompt, params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8)) >> 1
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.generated: list[int] = []
        self.row = -1
        self.pending = b""  # bytes of an incomplete UTF-8 character
        self.text = ""  # all text decoded so far (stop strings included)
        self.emitted = 0  # characters of self.text already streamed
        self.last = -1  # the token to feed next
        self.submitted = time.perf_counter()
        # Cache positions this request can ever occupy: the last token sampled is never fed
        # (and with max_new_tokens 0 the prompt's are all).
        self.reserve = max(len(prompt), len(prompt) + params.max_new_tokens - 1)
        self.scored: list[TokenLogprob] = []  # logprobs not yet reported (see Event.logprobs)
        self.prompt_scored: list[TokenLogprob] | None = None  # until the first event takes it

    @property
    def position(self) -> int:  # where self.last goes in the cache
        return len(self.prompt) + len(self.generated) - 1


class Engine:
    """Continuous batching over one KV cache. See the module docstring."""

    def __init__(
        self,
        model: GPT,
        max_batch_size: int = 8,
        max_queue: int | None = None,
        initial_cache_len: int = 256,
        kv_cache_tokens: int | None = None,
        fast_linear: bool = True,
        pack_prefill: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if kv_cache_tokens is not None and (
            isinstance(kv_cache_tokens, bool)
            or not isinstance(kv_cache_tokens, int)
            or kv_cache_tokens < 1
        ):
            raise ValueError(
                "kv_cache_tokens: must be a whole number of token positions >= 1 (rows x "
                f"positions over the whole cache), or None for no limit; got {kv_cache_tokens!r}"
            )
        self.device = next(model.parameters()).device
        # The cache is allocated in the weights' dtype (bfloat16 / float16 on a GPU replica);
        # an int8 model's first parameter is its float32 embedding.
        dtype = self.dtype = next(model.parameters()).dtype
        # The engine's own module tree over the caller's Parameters (no weight copied): its
        # eval() and swapped layers never reach the model it was handed, which a trainer may
        # still be training. The kernel's layers give F.linear's results to float32 rounding;
        # training-mode calls and long prefills still go through F.linear.
        use_kernel = fast_linear and self.device.type == "cpu" and dtype == torch.float32
        if use_kernel:
            self.model = kernels.with_kernel_linears(model).eval()
        else:  # F.linear throughout, even for a model whose layers were swapped by hand
            self.model = kernels.with_plain_linears(model).eval()
        # False where the kernels are unavailable or nothing was swapped (an int8 model).
        self.fast_linear = kernels.uses_kernel_linears(self.model)
        # The decode step's attention goes with the linear layers: the kernel's with theirs.
        self.decode_backend = KERNEL if self.fast_linear else SDPA
        self.pack_prefill = pack_prefill  # see _packs; False = every prompt alone (a baseline)
        self.max_len = model.config.block_size
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.kv_cache_tokens = kv_cache_tokens
        # Positions grow in doublings of this: a full-context row costs GPT-2 124M 75 MB.
        self.initial_cache_len = max(1, min(initial_cache_len, self.max_len))
        # No rows until a request arrives; see _fit_cache.
        self.cache = KVCache(model.config, 0, self.initial_cache_len, self.device, dtype)
        # (rows, positions, bytes), set under the lock after each resize: stats() must not
        # read the cache's lists while step() is swapping their tensors.
        self._cache_shape = (0, self.initial_cache_len, 0)
        self._cache_peak = 0
        self.enc = get_tokenizer()
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._cancelled: set[str] = set()
        self._running: list[_Sequence] = []  # row i of the cache is self._running[i]
        self._ids: set[str] = set()
        self.finished: dict[str, int] = {}  # finish reason -> count, for health and tests

    # -- called from any thread -------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        # "<|endoftext|>" in a prompt is the document boundary, as Hugging Face's GPT-2
        # tokenizer and OpenAI's API read it (and lm-eval, which asks for the eos token's id).
        return self.enc.encode(prompt, allowed_special={EOT_TOKEN}, disallowed_special=())

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> int:
        """Queue a request; returns its prompt length in tokens. An empty prompt starts from
        end-of-text (an unconditional sample)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = ids or [EOT_ID]
        if len(ids) + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                f"the model's context of {self.max_len} tokens"
            )
        with self._lock:
            if request_id in self._ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            # max_queue counts requests that must wait for a batch row to free up.
            free_rows = self.max_batch_size - len(self._running)
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + free_rows:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._ids.add(request_id)
            self._waiting.append(_Sequence(request_id, ids, params))
        return len(ids)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._ids:
                self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._cancelled)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "finished": dict(self.finished),
                "cache_rows": self._cache_shape[0],
                "cache_positions": self._cache_shape[1],
                "cache_bytes": self._cache_shape[2],
                "cache_peak_bytes": self._cache_peak,  # also counts the overlap while resizing
                "kv_cache_tokens": self.kv_cache_tokens,
                "fast_linear": self.fast_linear,
                "dtype": str(self.dtype).removeprefix("torch."),
            }

    # -- the step loop (one thread at a time) -----------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [s for s in self._waiting if s.request_id in cancelled]
            for seq in dropped:
                self._waiting.remove(seq)
        events.extend(self._finish(seq, "cancelled") for seq in dropped)
        # Cancelled rows go first, so their room can be given to waiting requests at once.
        for seq in [s for s in self._running if s.request_id in cancelled]:
            self._release(seq)
            events.append(self._finish(seq, "cancelled"))
        with self._lock:
            admitted = self._admit()
        decoding = list(self._running)
        if decoding or admitted:
            needed = max([s.position + 1 for s in decoding] + [len(s.prompt) for s in admitted])
            longest = max(s.reserve for s in decoding + admitted)
            self._fit_cache(len(decoding) + len(admitted), needed, longest)
        if decoding:
            idx = torch.tensor([s.last for s in decoding], device=self.device)
            pos = torch.tensor([s.position for s in decoding], device=self.device)
            logits = self.model.decode_step(idx, pos, self.cache, self.decode_backend)
            events.extend(self._advance_all(decoding, logits))
        for seq in admitted:  # prefill: the prompt goes straight into a free cache row
            seq.row = len(self._running)
            self._running.append(seq)
        for pack in self._packs(admitted):
            prompts, rows = [seq.prompt for seq in pack], [seq.row for seq in pack]
            if any(seq.params.prompt_logprobs for seq in pack):
                logits = self._prefill_scoring(pack, rows)
            else:
                logits = self.model.prefill(prompts, rows, self.cache)
            events.extend(self._advance_prefilled(pack, logits))
        # Idle: give the memory back (not while requests wait: the next step needs it again).
        if not self._running and not self._waiting:
            self._fit_cache(0, 0, 0)
        return events

    def _packs(self, admitted: list[_Sequence]) -> list[list[_Sequence]]:
        """Admitted requests grouped for prefill, one model.prefill pass per group:
        consecutive prompts whose tokens together fit the decode kernel's rows share a pass,
        which reads each weight matrix once for all of them. Eight 30-token prompts at GPT-2
        124M: ~490 ms in two passes against ~720 ms one by one, here. Only with the kernel,
        whose rows come out the same in any batch: a packed prompt then samples exactly what
        it would alone. Elsewhere (F.linear, int8's per-tensor activation scale) every prompt
        goes alone."""
        if not (self.fast_linear and self.pack_prefill):
            return [[seq] for seq in admitted]
        packs: list[list[_Sequence]] = []
        tokens = MAX_ROWS + 1
        for seq in admitted:
            if tokens + len(seq.prompt) > MAX_ROWS:
                packs.append([])
                tokens = 0
            packs[-1].append(seq)
            tokens += len(seq.prompt)
        return packs

    def _prefill_scoring(self, pack: list[_Sequence], rows: list[int]) -> torch.Tensor:
        """model.prefill for a pack with a request that scores its prompt: the hidden states of
        every position, each scoring prompt's turned into its prompt_scored, and the last
        positions' logits (the same numbers as prefill's, which applies ln_f to those rows
        alone) for the pack's next tokens."""
        feats = self.model.prefill_features([seq.prompt for seq in pack], rows, self.cache)
        ends = list(itertools.accumulate(len(seq.prompt) for seq in pack))
        for seq, end in zip(pack, ends, strict=True):
            if seq.params.prompt_logprobs:
                seq.prompt_scored = self._score_prompt(seq, feats[end - len(seq.prompt) : end])
        last = torch.tensor(ends, device=feats.device) - 1
        return self.model.lm_head(feats[last])

    def _score_prompt(self, seq: _Sequence, feats: torch.Tensor) -> list[TokenLogprob]:
        """Every prompt token's logprob from the prompt's final hidden states (n, n_embd): the
        position before a token predicts it, so the first token has none."""
        prompt, top = seq.prompt, seq.params.logprobs or 0
        offsets = text_offsets(self.enc, prompt)
        out = [TokenLogprob(prompt[0], None, [], 0)]
        for start in range(0, len(prompt) - 1, SCORE_ROWS):
            end = min(start + SCORE_ROWS, len(prompt) - 1)
            targets = prompt[start + 1 : end + 1]
            chosen, tops = token_logprobs(self.model.lm_head(feats[start:end]), targets, top)
            out.extend(
                TokenLogprob(t, c, alt, offsets[start + 1 + j])
                for j, (t, c, alt) in enumerate(zip(targets, chosen, tops, strict=True))
            )
        return out

    def _advance_prefilled(self, pack: list[_Sequence], logits: torch.Tensor) -> list[Event]:
        """The pack's first tokens; a request with max_new_tokens 0 ends with its prefill."""
        if all(seq.params.max_new_tokens for seq in pack):
            return self._advance_all(pack, logits)
        events: list[Event] = []
        for seq in pack:
            if not seq.params.max_new_tokens:
                self._release(seq)
                events.append(self._finish(seq, "length"))
        going = [i for i, seq in enumerate(pack) if seq.params.max_new_tokens]
        if going:
            events.extend(self._advance_all([pack[i] for i in going], logits[going]))
        return events

    def _admit(self) -> list[_Sequence]:
        # Strictly first come, first served: letting short requests overtake a long one that
        # does not fit could keep it waiting for ever under steady load.
        rows = len(self._running)
        longest = max((s.reserve for s in self._running), default=0)
        admitted: list[_Sequence] = []
        while self._waiting and rows < self.max_batch_size:
            # Every row has the same number of positions, so a long request costs all rows.
            longest_after = max(longest, self._waiting[0].reserve)
            budget = self.kv_cache_tokens
            if rows and budget is not None and (rows + 1) * longest_after > budget:
                break
            admitted.append(self._waiting.popleft())
            rows, longest = rows + 1, longest_after
        return admitted

    def _fit_cache(self, rows: int, needed: int, longest: int) -> None:
        """Size the cache for ``rows`` running requests whose current sequences need
        ``needed`` positions and can reach at most ``longest``."""
        have_rows, have_len = self.cache.batch_size, self.cache.max_len
        fit = self.initial_cache_len
        while fit < needed:
            fit *= 2
        # Capped at ``longest``: rows x longest is what admission checked against the budget.
        fit = min(fit, longest, self.max_len) if rows else self.initial_cache_len
        if have_rows < rows or have_len < needed:
            target = (rows, max(fit, min(have_len, longest)))
        elif have_rows * have_len > 2 * rows * fit:
            # Twice what is needed (not any excess), so that rows freed by requests that leave
            # are reused by the next ones instead of being reallocated at every change.
            target = (rows, fit)
        else:
            return
        before = self.cache.nbytes
        peak = self.cache.resize(*target)
        with self._lock:
            self._cache_shape = (*target, self.cache.nbytes)
            self._cache_peak = max(self._cache_peak, peak)
        if self.cache.nbytes < before and self.device.type == "cpu":
            _trim_heap()

    def _advance_all(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[Event]:
        tokens = sample_batch(logits, [s.params for s in seqs], [s.gen for s in seqs])
        scores = self._token_scores(seqs, logits, tokens)
        return [
            self._advance(seq, token, score)
            for seq, token, score in zip(seqs, tokens, scores, strict=True)
        ]

    @staticmethod
    def _token_scores(
        seqs: list[_Sequence], logits: torch.Tensor, tokens: list[int]
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """(logprob, top) of each sampled token, for the rows that ask for logprobs."""
        want = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        scores: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(seqs)
        if not want:
            return scores
        rows = logits if len(want) == len(seqs) else logits[want]
        top = max(seqs[i].params.logprobs or 0 for i in want)
        chosen, tops = token_logprobs(rows, [tokens[i] for i in want], top)
        for j, i in enumerate(want):
            scores[i] = (chosen[j], tops[j][: seqs[i].params.logprobs])
        return scores

    def _advance(
        self, seq: _Sequence, token: int, score: tuple[float, list] | None = None
    ) -> Event:
        if token == EOT_ID:
            self._release(seq)
            return self._finish(seq, "stop", flush=True, eot=score)
        seq.generated.append(token)
        seq.last = token
        if score is not None:  # its text starts where the text decoded so far ends
            seq.scored.append(TokenLogprob(token, score[0], score[1], len(seq.text)))
        text, seq.pending = _decode_more(seq.pending + self.enc.decode_single_token_bytes(token))
        seq.text += text
        stop_at = self._find_stop(seq)
        if stop_at is not None:
            seq.text = seq.text[:stop_at]
            self._release(seq)
            return self._finish(seq, "stop", tokens=[token])
        if len(seq.generated) >= seq.params.max_new_tokens or seq.position >= self.max_len:
            self._release(seq)
            return self._finish(seq, "length", tokens=[token], flush=True)
        # Stream what can no longer become part of a stop string.
        hold = self._held_back(seq)
        new = seq.text[seq.emitted : len(seq.text) - hold]
        seq.emitted += len(new)
        return Event(
            seq.request_id,
            new,
            [token],
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated),
            logprobs=self._reported(seq, seq.emitted),
            prompt_logprobs=self._prompt_reported(seq),
        )

    @staticmethod
    def _reported(seq: _Sequence, upto: int) -> list[TokenLogprob] | None:
        """The scored tokens whose text starts before character ``upto``, taken off the
        sequence's list."""
        if seq.params.logprobs is None:
            return None
        n = 0
        while n < len(seq.scored) and seq.scored[n].offset < upto:
            n += 1
        out, seq.scored = seq.scored[:n], seq.scored[n:]
        return out

    @staticmethod
    def _prompt_reported(seq: _Sequence) -> list[TokenLogprob] | None:
        """The prompt's scores, for the request's first event only."""
        out, seq.prompt_scored = seq.prompt_scored, None
        return out

    @staticmethod
    def _find_stop(seq: _Sequence) -> int | None:
        hits = [
            i
            for i in (seq.text.find(s, max(0, seq.emitted - len(s))) for s in seq.params.stop)
            if i >= 0
        ]
        return min(hits) if hits else None

    @staticmethod
    def _held_back(seq: _Sequence) -> int:
        hold = 0
        for s in seq.params.stop:
            for n in range(min(len(s) - 1, len(seq.text) - seq.emitted), 0, -1):
                if seq.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _release(self, seq: _Sequence) -> None:
        """Free the sequence's cache row, moving the last running row into it."""
        if seq.row < 0:
            return
        last = self._running.pop()
        if last is not seq:
            self.cache.move_row(last.row, seq.row)
            last.row = seq.row
            self._running[seq.row] = last
        seq.row = -1

    def _finish(
        self,
        seq: _Sequence,
        reason: str,
        tokens: list[int] | None = None,
        flush: bool = False,
        eot: tuple[float, list] | None = None,
    ) -> Event:
        if flush and seq.pending:
            seq.text += seq.pending.decode("utf-8", errors="replace")
            seq.pending = b""
        new = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        logprobs = self._reported(seq, len(seq.text))
        # What is left began after a stop string, or in bytes a cancellation cut off.
        seq.scored = []
        if logprobs is not None and eot is not None:
            logprobs.append(TokenLogprob(EOT_ID, eot[0], eot[1], len(seq.text)))
        with self._lock:
            self._ids.discard(seq.request_id)
            self.finished[reason] = self.finished.get(reason, 0) + 1
        return Event(
            seq.request_id,
            new,
            tokens or [],
            True,
            reason,
            len(seq.prompt),
            len(seq.generated),
            logprobs,
            self._prompt_reported(seq),
        )

    def generate(self, prompt: str | list[int], params: SamplingParams) -> dict[str, Any]:
        """Run one request to completion on this engine (no other requests must be using it
        from another thread). Returns text, token ids and the finish reason (and with
        ``params.logprobs`` the :class:`TokenLogprob` lists ``logprobs`` and
        ``prompt_logprobs``)."""
        rid = f"solo-{os.urandom(6).hex()}"
        n_prompt = self.submit(rid, prompt, params)
        text, tokens, scored = [], [], []
        prompt_scored = None
        while True:
            for ev in self.step():
                if ev.request_id == rid:
                    text.append(ev.text)
                    tokens.extend(ev.token_ids)
                    scored.extend(ev.logprobs or [])
                    prompt_scored = prompt_scored or ev.prompt_logprobs
                    if ev.finished:
                        out = {
                            "text": "".join(text),
                            "token_ids": tokens,
                            "finish_reason": ev.finish_reason,
                            "prompt_tokens": n_prompt,
                        }
                        if params.logprobs is not None:
                            out["logprobs"] = scored
                            out["prompt_logprobs"] = prompt_scored
                        return out


def _trim_heap() -> None:
    """Give freed heap memory back to the operating system, where the C library can.

    glibc serves blocks below its mmap threshold (which rises up to 32 MB as large blocks are
    freed) from heaps it rarely shrinks: a released cache's layer tensors would otherwise stay
    resident (measured: ~26 MB of 43 MB after one 300-token request at GPT-2 124M)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit (the server answers 503 + Retry-After)."""


def complete(
    model: GPT,
    prompt: str,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """The text the model appends to ``prompt`` (stops at end-of-text or the context end).

    A long prompt keeps its last tokens, and the budget shrinks to what the context allows."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt)[-(model.config.block_size - 1) :] or [EOT_ID]
    budget = min(max_new_tokens, model.config.block_size - len(ids))
    # The Engine runs its own module tree: the model (perhaps being trained) is not changed.
    engine = Engine(model, max_batch_size=1)
    params = SamplingParams(max_new_tokens=budget, temperature=temperature, top_k=top_k, seed=seed)
    return engine.generate(ids, params)["text"]
