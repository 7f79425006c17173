"""The HTTP contract of the model server, shared by Ray Serve and the web front.

Request bodies, every limit, the error body and SSE framing live here and only here: the
Serve deployment (``medgpt.serving``) and the Flask page (``web.app``) both parse and check a
body with :func:`parse_body` / :func:`validate`, so a request is accepted or refused the same
way, with the same message, whichever server it reaches first. The web front applies tighter
limits only by passing the named ones below (``PAGE_*``).

This module imports neither torch nor Ray (a test enforces it): the web front uses it without
loading a model, and it starts in milliseconds.
"""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at
# run time.
import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

__all__ = [
    "DEFAULT_MAX_TOKENS_CAP",
    "MAX_BODY_BYTES",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_PROMPT_CHARS",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "PAGE_MAX_BODY_BYTES",
    "PAGE_MAX_PROMPT_CHARS",
    "RETRY_AFTER_S",
    "SEED_LIMIT",
    "ApiError",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerateRequest",
    "TokenizeRequest",
    "error_body",
    "parse_body",
    "parse_json",
    "sse",
    "validate",
]

# --- limits ---------------------------------------------------------------------------------------

MAX_BODY_BYTES = 64 * 1024  # any request body the model server reads, chunked or not
MAX_PROMPT_CHARS = 20_000
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_N = 8  # completions per /v1/completions request
MAX_LOGPROBS = 5  # alternatives per token in /v1/completions' logprobs (OpenAI's limit)
SEED_LIMIT = 2**63  # seeds are 63-bit: torch.Generator.manual_seed takes them
DEFAULT_MAX_TOKENS_CAP = 512  # the serve config's max_tokens_cap unless it says otherwise
RETRY_AFTER_S = 2  # what a client is told to wait when the server is full
# Token ids a prompt may name: GPT-2's vocabulary (the model's embedding may be padded past it,
# but ids there decode to nothing). The one tokenizer medgpt serves (medgpt.tokenizer).
VOCAB_SIZE = 50257
MAX_PROMPT_TOKENS = 8192  # a token-id prompt or a /detokenize body at most
MAX_JSON_DEPTH = 32  # bodies are flat objects; deeper nesting is refused before parsing

# The page is a human typing a prompt: bodies stay small, and every valid one fits its limit.
PAGE_MAX_PROMPT_CHARS = 4000
PAGE_MAX_BODY_BYTES = 16 * 1024

# What each field allows, in the words of the error message ("temperature: must be ...").
_ALLOWED = {
    "prompt": "a non-empty string",
    "tokens": f"a list of token ids (whole numbers from 0 to {VOCAB_SIZE - 1})",
    "add_special_tokens": "true or false",
    "temperature": "a number from 0 to 2",
    "top_k": "a whole number >= 0 (0 = off)",
    "top_p": "a number above 0 and at most 1",
    "seed": "a whole number >= 0 and below 2**63, or null",
    "n": f"a whole number from 1 to {MAX_N}",
    "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}',
    "user": "a string",
    "model": "a model id (GET /v1/models), or null",
    "logprobs": f"a whole number from 0 to {MAX_LOGPROBS} (alternatives per token), or null",
    "echo": "true or false",
}
# OpenAI fields medgpt does not implement: accepted at their default (what many clients send
# whether or not they use them) or null, anything else refused naming the field.
# Field -> (its default, as the error message spells what is accepted).
_DEFAULT_ONLY: dict[str, tuple[Any, str]] = {
    "frequency_penalty": (0, "0 (or null)"),
    "presence_penalty": (0, "0 (or null)"),
    "best_of": (1, "1 (or null)"),
    "logit_bias": ({}, "{} (or null)"),
    "suffix": (None, "null"),
}
_ALLOWED.update({k: f"{spelled}, the default: other values are not supported"
                 for k, (_, spelled) in _DEFAULT_ONLY.items()})  # fmt: skip
_STOP_RULE = f"at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_CHARS} characters"


# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI's error body with ``status``; ``param`` names the field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error shape, which the ``openai`` client turns into its exception's message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def sse(data: Any) -> str:
    """One server-sent event: ``data: <json>`` (or a bare string such as ``[DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- parsing --------------------------------------------------------------------------------------


def _too_deep(raw: str, limit: int) -> bool:
    """Whether brackets nest deeper than ``limit`` outside strings. Checked before
    ``json.loads``, whose recursion would otherwise fail (RecursionError) or cost stack on
    bodies like ``[[[[...]]]]``."""
    depth, in_string, escaped = 0, False, False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def parse_json(raw: bytes) -> Any:
    """A request body → its JSON value, or :class:`ApiError` 400. Refuses what Python's
    ``json`` would let through but no JSON client means: NaN and Infinity, bytes that are not
    UTF-8, nesting deeper than any medgpt body."""
    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid JSON (not UTF-8)") from None
    if _too_deep(text, MAX_JSON_DEPTH):
        raise ApiError(400, f"the body is not valid JSON here: nested deeper than {MAX_JSON_DEPTH}")

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None


# --- request bodies -------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True)


def _check_prompt(prompt: str, info: ValidationInfo) -> str:
    if not prompt.strip():
        raise ValueError("must not be empty")
    limit = (info.context or {}).get("max_prompt_chars", MAX_PROMPT_CHARS)
    if len(prompt) > limit:
        raise ValueError(f"at most {limit} characters (this one has {len(prompt)})")
    return prompt


def _check_ids(ids: list[int], what: str = "") -> list[int]:
    if not ids and not what:
        raise ValueError("must not be empty")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise ValueError(f"at most {MAX_PROMPT_TOKENS} token ids (this one has {len(ids)})")
    bad = next((t for t in ids if not 0 <= t < VOCAB_SIZE), None)
    if bad is not None:
        raise ValueError(f"token ids are whole numbers from 0 to {VOCAB_SIZE - 1} (got {bad})")
    return ids


def _check_stops(items: list[str]) -> list[str]:
    if len(items) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"must be {_STOP_RULE}")
    return items


def _cap(info: ValidationInfo) -> int:
    return int((info.context or {}).get("max_tokens_cap", DEFAULT_MAX_TOKENS_CAP))


def _check_tokens(value: int, info: ValidationInfo) -> int:
    cap = _cap(info)
    # /v1/completions' echo scores the prompt: max_tokens 0 asks for that alone. ``echo`` is
    # declared before ``max_tokens``, so it has been read (and checked) by now.
    if info.field_name == "max_tokens" and info.data.get("echo") is True:
        if not 0 <= value <= cap:
            raise ValueError(f"must be a whole number from 0 to {cap} (0: score the prompt only)")
    elif value == 0 and info.field_name == "max_tokens":
        raise ValueError(
            f"0 is allowed only with echo: true (scoring the prompt); otherwise a whole number "
            f"from 1 to {cap}"
        )
    elif not 1 <= value <= cap:
        raise ValueError(f"must be a whole number from 1 to {cap}")
    return value


class _Body(BaseModel):
    """What both request bodies check the same way; each names its own fields and defaults
    (``check_fields=False``: a validator applies to whichever of its fields a body has)."""

    model_config = _STRICT

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt(cls, v: Any, info: ValidationInfo) -> Any:
        # OpenAI's prompt forms: a string, token ids, or a list of either (one here).
        one = v
        if isinstance(v, list) and v and not isinstance(v[0], int):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            one = v[0]
        if isinstance(one, list):
            _check_ids(one)
        else:
            _check_prompt(one, info)
        return v

    @field_validator("max_tokens", "max_new_tokens", check_fields=False)
    @classmethod
    def _tokens(cls, v: int, info: ValidationInfo) -> int:
        return _check_tokens(v, info)

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        _check_stops([v] if isinstance(v, str) else list(v or []))
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        stop = getattr(self, "stop", None)
        return (stop,) if isinstance(stop, str) else tuple(stop or ())


class CompletionRequest(_Body):
    """``POST /v1/completions``: OpenAI's legacy completions body, the fields medgpt honours,
    and those it does not (``_DEFAULT_ONLY``) accepted at their defaults only.

    ``logprobs`` N returns each token's log-probability and the N most likely tokens at its
    position; ``echo`` puts the prompt in front of the text (and its tokens in front of the
    logprobs, the first one null); ``max_tokens`` 0 with ``echo`` scores the prompt alone."""

    # A string, token ids (what lm-eval sends by default, with the remote tokenizer), or a
    # list of one of either.
    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    echo: bool = False  # before max_tokens: its check reads echo
    max_tokens: int = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    best_of: int | None = 1
    logit_bias: dict[str, Any] | None = None
    suffix: str | None = None

    @field_validator(*_DEFAULT_ONLY)
    @classmethod
    def _default_only(cls, v: Any, info: ValidationInfo) -> Any:
        default, spelled = _DEFAULT_ONLY[str(info.field_name)]
        if v is None or v == default:
            return v
        got = json.dumps(v)
        got = got if len(got) <= 40 else got[:37] + "..."
        raise ValueError(f"only the default {spelled} is supported (got {got})")

    @property
    def the_prompt(self) -> str | list[int]:
        """The one prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return p  # type: ignore[return-value]
        return p[0]  # type: ignore[return-value]


class GenerateRequest(_Body):
    """``POST /generate`` and ``/generate/stream``: the page's body (Serve's defaults)."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: list[str] = Field(default_factory=list)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's body, what lm-eval's remote tokenizer sends): the text's
    token ids. ``add_special_tokens`` is accepted and changes nothing: GPT-2 adds none."""

    model_config = _STRICT

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        # The empty string is text too (no tokens), unlike a prompt to complete.
        return _check_prompt(v, info) if v else v


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text."""

    model_config = _STRICT

    tokens: list[int]
    model: str | None = None

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[int]) -> list[int]:
        return _check_ids(v, "tokens")


Req = TypeVar("Req", bound=BaseModel)


def _describe(model: type[BaseModel], err: Mapping[str, Any], context: Mapping[str, Any]) -> ApiError:
    """pydantic's first error → one line naming the top-level field and what it allows."""
    loc = [str(p) for p in err.get("loc", ())]
    param = loc[0] if loc else None  # unions add member names after the field
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return ApiError(400, f"unknown field {param!r} (allowed: {allowed})", param)
    if kind == "missing":
        return ApiError(400, f"missing field {param!r}", param)
    if param is None:
        return ApiError(400, "the body must be a JSON object")
    if kind == "value_error":  # our own validators: their message is the rule
        msg = str(err.get("ctx", {}).get("error", err.get("msg", "invalid value")))
        return ApiError(400, f"{param}: {msg}", param)
    if param in ("max_tokens", "max_new_tokens"):
        what = f"a whole number from 1 to {context.get('max_tokens_cap', DEFAULT_MAX_TOKENS_CAP)}"
        if model is CompletionRequest:
            what += " (0 with echo: true)"
    elif param == "stop":
        what = (
            f"a list of {_STOP_RULE}"
            if model is GenerateRequest
            else f"a string, or a list of {_STOP_RULE}"
        )
    elif param == "prompt" and kind.endswith("_type"):
        what = (
            "a string"
            if model is not CompletionRequest
            else "a string, a list of token ids, or a list of one of these"
        )
    else:
        what = _ALLOWED.get(param, "a valid value")
    got = json.dumps(err.get("input"), default=str)
    got = got if len(got) <= 40 else got[:37] + "..."
    return ApiError(400, f"{param}: must be {what} (got {got})", param)


def validate(
    model: type[Req],
    data: Any,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> Req:
    """A parsed JSON body → the request ``model``, or :class:`ApiError` 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    context = {"max_tokens_cap": max_tokens_cap, "max_prompt_chars": max_prompt_chars}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise _describe(model, errors[0] if errors else {}, context) from None


def parse_body(model: type[Req], raw: bytes, **limits: int) -> Req:
    """Raw body bytes → the request ``model`` (:func:`parse_json` then :func:`validate`)."""
    return validate(model, parse_json(raw), **limits)

