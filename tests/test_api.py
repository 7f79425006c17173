"""medgpt.api: the one HTTP contract of Serve and the web front, checked without a server,
and the translation of engine events into response bodies (medgpt.serving.responses)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from medgpt.api import (
    MAX_BODY_BYTES,
    PAGE_MAX_PROMPT_CHARS,
    ApiError,
    CompletionRequest,
    GenerateRequest,
    error_body,
    parse_body,
    parse_json,
    sse,
    validate,
)
from medgpt.serving.responses import Completion, Generation


def _refused(model, body, **limits) -> ApiError:
    with pytest.raises(ApiError) as e:
        validate(model, body, **limits)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": ""}, "prompt", "prompt: must not be empty"),
        ({"prompt": 42}, "prompt", "prompt: must be a string (got 42)"),
        ({"temperature": 1}, "prompt", "missing field 'prompt'"),
        ({"prompt": "x", "temperature": 10**400}, "temperature", "from 0 to 2 (got 1000"),
        ({"prompt": "x", "temperature": True}, "temperature", "from 0 to 2 (got true)"),
        ({"prompt": "x", "top_p": 0}, "top_p", "above 0 and at most 1"),
        ({"prompt": "x", "top_k": -1}, "top_k", ">= 0"),
        ({"prompt": "x", "seed": 2**63}, "seed", ">= 0 and below 2**63"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens", "from 1 to 512"),
        ({"prompt": "x", "max_new_tokens": 2.0}, "max_new_tokens", "from 1 to 512"),
        ({"prompt": "x", "stop": "a"}, "stop", "must be a list of at most 4"),
        ({"prompt": "x", "stop": [""]}, "stop", "at most 4 non-empty strings"),
        ({"prompt": "x", "stop": ["y" * 65]}, "stop", "up to 64 characters"),
        ({"prompt": "x", "max_tokens": 3}, "max_tokens", "unknown field 'max_tokens' (allowed: "),
    ],
)
def test_generate_bodies_are_refused_naming_the_field(body, param, message) -> None:
    err = _refused(GenerateRequest, body)
    assert err.param == param and message in err.message, err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error",
                                    "param": param, "code": None}}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "exactly one prompt"),
        ({"prompt": {"a": 1}}, "prompt", "a string or a list of one string"),
        ({"prompt": "x", "n": 9}, "n", "from 1 to 8"),
        ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4"),
        ({"prompt": "x", "stop": 3}, "stop", "a string, or a list of"),
        ({"prompt": "x", "best_of": 2}, "best_of", "unknown field 'best_of'"),
    ],
)
def test_completion_bodies_are_refused_naming_the_field(body, param, message) -> None:
    err = _refused(CompletionRequest, body)
    assert err.param == param and message in err.message, err.message


def test_limits_are_parameters_of_one_declaration() -> None:
    """The page's tighter prompt cap and a server's max_tokens_cap go through the same
    models; only the numbers differ."""
    long = "x" * (PAGE_MAX_PROMPT_CHARS + 1)
    assert validate(GenerateRequest, {"prompt": long}).prompt == long
    err = _refused(GenerateRequest, {"prompt": long}, max_prompt_chars=PAGE_MAX_PROMPT_CHARS)
    assert f"at most {PAGE_MAX_PROMPT_CHARS} characters" in err.message
    err = _refused(CompletionRequest, {"prompt": "x", "max_tokens": 601}, max_tokens_cap=600)
    assert err.message == "max_tokens: must be a whole number from 1 to 600"
    ok = validate(CompletionRequest, {"prompt": ["x"], "stop": "\n", "max_tokens": 600},
                  max_tokens_cap=600)  # fmt: skip
    assert ok.the_prompt == "x" and ok.stops == ("\n",)


def test_only_given_fields_are_set() -> None:
    req = validate(GenerateRequest, {"prompt": "x", "seed": None})
    assert req.model_dump(exclude_unset=True) == {"prompt": "x", "seed": None}
    assert req.temperature == 0.8 and req.top_k == 40  # Serve's defaults


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "the body is empty"),
        (b"   ", "the body is empty"),
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b'{"prompt": "x", "temperature": NaN}', "not valid JSON"),
        (b'{"prompt": "x", "temperature": -Infinity}', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
        (b'{"a": ' * 1000 + b"1" + b"}" * 1000, "nested deeper than"),
    ],
)
def test_unparsable_bodies(raw, message) -> None:
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    assert e.value.status == 400 and message in e.value.message


def test_brackets_inside_strings_are_not_nesting() -> None:
    body = json.dumps({"prompt": "[[[{{{" * 100 + '\\"]]]'}).encode()
    assert parse_body(GenerateRequest, body).prompt.startswith("[[[{{{")
    with pytest.raises(ApiError, match="the body must be a JSON object"):
        parse_body(GenerateRequest, b"[1, 2]")
    assert MAX_BODY_BYTES == 64 * 1024


def test_sse_framing_and_error_body() -> None:
    assert sse({"text": "a"}) == 'data: {"text": "a"}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert error_body("busy", "server_overloaded")["error"]["type"] == "server_overloaded"


def test_the_protocol_imports_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, medgpt.api, medgpt.serving.responses, web.app; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


# --- engine events → bodies --------------------------------------------------------------------


@dataclass
class Ev:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None


def test_completion_stream_and_body_agree() -> None:
    events = [(0, Ev("A", [1])), (1, Ev("", [2])), (1, Ev("B", [3])), (0, Ev("", [], True, "stop")),
              (1, Ev("C", [4], True, "length"))]  # fmt: skip
    streamed = Completion("m/1", prompt_tokens=3, n=2, created=7)
    chunks = [c for i, ev in events if (c := streamed.chunk(i, ev)) is not None]
    whole = Completion("m/1", prompt_tokens=3, n=2, created=7)
    for i, ev in events:
        whole.add(i, ev)
    body = whole.body()
    assert [c["choices"][0]["text"] for c in chunks] == ["A", "B", "", "C"]  # held-back: none
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop", "length"]
    assert [ch["text"] for ch in body["choices"]] == ["A", "BC"]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert streamed.usage_chunk()["usage"] == body["usage"] and body["model"] == "m/1"
    assert body["object"] == "text_completion" and body["created"] == 7
    assert body["id"].startswith("cmpl-") and streamed.usage_chunk()["choices"] == []


def test_generation_events_and_summary() -> None:
    ticks = iter([0.0, 0.5, 2.0, 2.0])
    card = {"id": "m", "registry_version": 3, "val_loss": 1.5, "eval_loss": None, "extra": 1}
    gen = Generation(card, prompt_tokens=2, clock=lambda: next(ticks))
    assert gen.events(Ev("Hi", [1, 2])) == [{"text": "Hi"}]
    last = gen.events(Ev("", [3], True, "length"))
    assert last == [{"done": True, "prompt_tokens": 2, "completion_tokens": 3,
                     "finish_reason": "length", "seconds": 2.0, "ttft_s": 0.5,
                     "tokens_per_s": 1.5,
                     "model": {"id": "m", "registry_version": 3, "val_loss": 1.5,
                               "eval_loss": None}}]  # fmt: skip
    assert gen.body()["text"] == "Hi"
