"""Engine events → HTTP response bodies: OpenAI's completions objects and the page's
``/generate`` protocol.

Plain functions and small accumulators, no Ray, no torch and no asyncio, so each shape is unit
tested on its own (tests/test_api.py). An event is anything with the fields of
:class:`medgpt.generation.Event`: ``text``, ``token_ids``, ``finished``, ``finish_reason``, and
for a request that asked for them ``logprobs`` and ``prompt_logprobs`` (lists of objects with
the fields of :class:`medgpt.generation.TokenLogprob`).

Log-probabilities are OpenAI's legacy completions format: ``choices[i].logprobs`` is
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one entry per token, with
``echo`` the prompt's tokens first (the first one's logprob and alternatives null). A token's
string is its bytes decoded alone, as OpenAI shows them: part of a character split across
tokens comes out as U+FFFD, and two such tokens among a position's alternatives can share a
string (the more likely one is kept). ``top_logprobs`` holds the N most likely tokens and, as
OpenAI documents, the chosen token as well when it is not among them (N + 1 entries). End of
text, when it ends a completion, is the last entry (``<|endoftext|>``, at the end of the text).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol


class EventLike(Protocol):
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


class TokenLogprobLike(Protocol):
    token: int
    logprob: float | None
    top: list[tuple[int, float]]
    offset: int


def _token_text(token: int) -> str:
    from medgpt.tokenizer import token_text

    return token_text(token)


def _logprobs() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def add_logprobs(
    out: dict[str, list],
    entries: Iterable[TokenLogprobLike],
    shift: int = 0,
    token_text: Callable[[int], str] = _token_text,
) -> dict[str, list]:
    """Append ``entries`` to ``out`` (OpenAI's logprobs object), their text offsets moved by
    ``shift`` characters (the echoed prompt in front of a completion); returns ``out``."""
    for e in entries:
        out["tokens"].append(token_text(e.token))
        out["token_logprobs"].append(e.logprob)
        if e.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top: dict[str, float] = {}
            for t, lp in e.top:
                top.setdefault(token_text(t), lp)
            top.setdefault(token_text(e.token), e.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(e.offset + shift)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Completion:
    """One ``/v1/completions`` request's ``n`` choices over one prompt of ``prompt_tokens``;
    :meth:`chunk` for a stream, :meth:`add` then :meth:`body` otherwise.

    ``echo`` is the prompt's text when the request echoes it: each choice's text (its first
    chunk's, in a stream) starts with it. ``logprobs`` is the request's N (None: no
    logprobs); the events then carry the entries, turned into strings by ``token_text``."""

    def __init__(
        self,
        model_id: str,
        prompt_tokens: int,
        n: int = 1,
        created: int | None = None,
        *,
        echo: str | None = None,
        logprobs: int | None = None,
        token_text: Callable[[int], str] = _token_text,
        system_fingerprint: str | None = None,
    ) -> None:
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()) if created is None else created,
            "model": model_id,
            # OpenAI's field for "which backend configuration answered": here the version,
            # its training run and its data (medgpt.serving.deployment.Loaded.fingerprint).
            "system_fingerprint": system_fingerprint,
        }
        self.prompt_tokens = prompt_tokens * n  # OpenAI counts the prompt once per choice
        self.completion_tokens = 0
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.echo = echo
        self.token_text = token_text
        self.logprobs = [_logprobs() for _ in range(n)] if logprobs is not None else None
        self.started = [False] * n

    def add(self, index: int, ev: EventLike) -> tuple[str, dict[str, list] | None]:
        """Take ``ev`` into choice ``index``; returns what it added: its text and its logprobs
        (the echoed prompt and its tokens in front of the choice's first event's)."""
        text = ev.text
        piece = _logprobs() if self.logprobs is not None else None
        if not self.started[index]:
            self.started[index] = True
            if self.echo is not None:
                text = self.echo + text
                if piece is not None:
                    prompt = getattr(ev, "prompt_logprobs", None) or ()
                    add_logprobs(piece, prompt, 0, self.token_text)
        if piece is not None and self.logprobs is not None:
            # The engine counts a completion's offsets from its own first character.
            shift = len(self.echo or "")
            add_logprobs(piece, getattr(ev, "logprobs", None) or (), shift, self.token_text)
            for key, values in piece.items():
                self.logprobs[index][key].extend(values)
        self.texts[index] += text
        self.completion_tokens += len(ev.token_ids)
        if ev.finished:
            self.reasons[index] = ev.finish_reason
        return text, piece

    def chunk(self, index: int, ev: EventLike) -> dict[str, Any] | None:
        """The stream chunk for ``ev`` of choice ``index``, with the logprobs of the tokens
        whose text it carries (text offsets count from the choice's first character); None
        when there is nothing to say (tokens held back while they may still become a stop
        string)."""
        text, piece = self.add(index, ev)
        if not (text or ev.finished or (piece and piece["tokens"])):
            return None
        choice = {
            "text": text,
            "index": index,
            "logprobs": piece,
            "finish_reason": ev.finish_reason if ev.finished else None,
        }
        return {**self.head, "choices": [choice]}

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``."""
        return {**self.head, "choices": [], "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        logprobs = self.logprobs or [None] * len(self.texts)
        choices = [
            {"text": t, "index": i, "logprobs": lp, "finish_reason": r}
            for i, (t, r, lp) in enumerate(zip(self.texts, self.reasons, logprobs, strict=True))
        ]
        return {**self.head, "choices": choices, "usage": self.usage()}


# The model card's fields that every /generate answer repeats: which model answered.
ANSWER_MODEL_FIELDS = ("id", "registry_version", "val_loss", "eval_loss", "lineage")


class Generation:
    """One ``/generate`` request: the text so far, and the summary the page shows (tokens,
    time to first token, speed, which model answered). Times come from ``clock``."""

    def __init__(
        self, card: Mapping[str, Any], prompt_tokens: int, clock: Any = time.perf_counter
    ) -> None:
        self.model = {k: card.get(k) for k in ANSWER_MODEL_FIELDS}
        self.prompt_tokens = prompt_tokens
        self.clock = clock
        self.t0 = clock()
        self.ttft: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.parts: list[str] = []

    def add(self, ev: EventLike) -> None:
        if ev.token_ids and self.ttft is None:
            self.ttft = self.clock() - self.t0
        self.completion_tokens += len(ev.token_ids)
        self.parts.append(ev.text)
        if ev.finished:
            self.finish_reason = ev.finish_reason

    def summary(self) -> dict[str, Any]:
        seconds = self.clock() - self.t0
        n = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "finish_reason": self.finish_reason,
            "seconds": round(seconds, 4),
            "ttft_s": None if self.ttft is None else round(self.ttft, 4),
            "tokens_per_s": round(n / seconds, 2) if seconds > 0 else None,
            "model": dict(self.model),
        }

    def events(self, ev: EventLike) -> list[dict[str, Any]]:
        """The SSE payloads ``/generate/stream`` sends for ``ev``: its text, then on the last
        event the summary with ``done: true``."""
        self.add(ev)
        out: list[dict[str, Any]] = [{"text": ev.text}] if ev.text else []
        if ev.finished:
            out.append({"done": True, **self.summary()})
        return out

    def body(self) -> dict[str, Any]:
        return {"text": "".join(self.parts), **self.summary()}
