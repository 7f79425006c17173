"""Engine events → HTTP response bodies: OpenAI's completions objects and the page's
``/generate`` protocol.

Plain functions and small accumulators, no Ray, no torch and no asyncio, so each shape is unit
tested on its own (tests/test_serve_responses.py). An event is anything with the fields of
:class:`medgpt.generation.Event`: ``text``, ``token_ids``, ``finished``, ``finish_reason``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol


class EventLike(Protocol):
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Completion:
    """One ``/v1/completions`` request's ``n`` choices over one prompt of ``prompt_tokens``;
    :meth:`chunk` for a stream, :meth:`add` then :meth:`body` otherwise."""

    def __init__(
        self, model_id: str, prompt_tokens: int, n: int = 1, created: int | None = None
    ) -> None:
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()) if created is None else created,
            "model": model_id,
        }
        self.prompt_tokens = prompt_tokens * n  # OpenAI counts the prompt once per choice
        self.completion_tokens = 0
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n

    def add(self, index: int, ev: EventLike) -> None:
        self.texts[index] += ev.text
        self.completion_tokens += len(ev.token_ids)
        if ev.finished:
            self.reasons[index] = ev.finish_reason

    def chunk(self, index: int, ev: EventLike) -> dict[str, Any] | None:
        """The stream chunk for ``ev`` of choice ``index``; None when there is nothing to
        say (tokens held back while they may still become a stop string)."""
        self.add(index, ev)
        if not (ev.text or ev.finished):
            return None
        choice = {
            "text": ev.text,
            "index": index,
            "logprobs": None,
            "finish_reason": ev.finish_reason if ev.finished else None,
        }
        return {**self.head, "choices": [choice]}

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``."""
        return {**self.head, "choices": [], "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        choices = [
            {"text": t, "index": i, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(self.texts, self.reasons, strict=True))
        ]
        return {**self.head, "choices": choices, "usage": self.usage()}


# The model card's fields that every /generate answer repeats: which model answered.
ANSWER_MODEL_FIELDS = ("id", "registry_version", "val_loss", "eval_loss")


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
