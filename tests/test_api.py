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
from medgpt.serving.responses import Completion, Generation, add_logprobs


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
        ({"prompt": {"a": 1}}, "prompt", "a string, a list of token ids, or a list of one of these"),
        ({"prompt": "x", "n": 9}, "n", "from 1 to 8"),
        ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4"),
        ({"prompt": "x", "stop": 3}, "stop", "a string, or a list of"),
        ({"prompt": "x", "bogus": 1}, "bogus", "unknown field 'bogus' (allowed: prompt, "),
        # Scoring fields.
        ({"prompt": "x", "logprobs": 6}, "logprobs", "logprobs: must be a whole number from 0 to 5"),
        ({"prompt": "x", "logprobs": -1}, "logprobs", "from 0 to 5 (alternatives per token), or null"),
        ({"prompt": "x", "logprobs": True}, "logprobs", "from 0 to 5"),
        ({"prompt": "x", "logprobs": 1.5}, "logprobs", "from 0 to 5"),
        ({"prompt": "x", "logprobs": "5"}, "logprobs", "from 0 to 5"),
        ({"prompt": "x", "echo": "yes"}, "echo", "echo: must be true or false"),
        ({"prompt": "x", "echo": 1}, "echo", "echo: must be true or false"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "0 is allowed only with echo: true"),
        ({"prompt": "x", "max_tokens": 0, "echo": False}, "max_tokens", "only with echo"),
        ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens", "from 0 to 512"),
        ({"prompt": "x", "max_tokens": 513, "echo": True}, "max_tokens", "from 0 to 512"),
        ({"prompt": "x", "max_tokens": 0.0, "echo": True}, "max_tokens", "(0 with echo: true)"),
        # OpenAI fields medgpt does not implement: only their defaults.
        ({"prompt": "x", "best_of": 2}, "best_of", "best_of: only the default 1 (or null) is supported (got 2)"),
        ({"prompt": "x", "best_of": 0}, "best_of", "only the default 1"),
        ({"prompt": "x", "best_of": True}, "best_of", "best_of: must be 1 (or null), the default"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty: only the default 0 (or null) is supported (got 0.5)"),
        ({"prompt": "x", "frequency_penalty": "0"}, "frequency_penalty", "must be 0 (or null), the default: other values are not supported"),
        ({"prompt": "x", "presence_penalty": -2}, "presence_penalty", "presence_penalty: only the default 0"),
        ({"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias", "logit_bias: only the default {} (or null) is supported"),
        ({"prompt": "x", "logit_bias": [1]}, "logit_bias", "logit_bias: must be {} (or null), the default"),
        ({"prompt": "x", "suffix": "!"}, "suffix", "suffix: only the default null is supported (got \"!\")"),
        ({"prompt": "x", "suffix": ""}, "suffix", "only the default null"),
    ],
)  # fmt: skip
def test_completion_bodies_are_refused_naming_the_field(body, param, message) -> None:
    err = _refused(CompletionRequest, body)
    assert err.param == param and message in err.message, err.message
    assert "\n" not in err.message


def test_scoring_fields_and_openai_defaults_are_accepted() -> None:
    """What lm-evaluation-harness's local-completions sends to score, what the openai client
    sends for a pure scoring call, and OpenAI's fields at their defaults (or null)."""
    lm_eval = {"model": "m", "prompt": "Q: fever? A: yes", "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    req = validate(CompletionRequest, lm_eval)
    assert (req.logprobs, req.echo, req.max_tokens) == (1, True, 1)
    req = validate(CompletionRequest, {"prompt": "x", "logprobs": 5, "echo": True, "max_tokens": 0})
    assert (req.logprobs, req.echo, req.max_tokens) == (5, True, 0)
    assert validate(CompletionRequest, {"prompt": "x", "logprobs": 0}).logprobs == 0
    plain = validate(CompletionRequest, {"prompt": "x"})
    assert (plain.logprobs, plain.echo, plain.max_tokens) == (None, False, 16)
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "best_of": 1, "logit_bias": {},
                "suffix": None}  # fmt: skip
    nulls = {"frequency_penalty": None, "presence_penalty": None, "best_of": None,
             "logit_bias": None, "logprobs": None}  # fmt: skip
    for extra in (defaults, nulls, {"frequency_penalty": -0.0}):
        assert validate(CompletionRequest, {"prompt": "x", **extra}).the_prompt == "x"


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
    logprobs: list | None = None
    prompt_logprobs: list | None = None


@dataclass
class Lp:  # medgpt.generation.TokenLogprob's fields
    token: int
    logprob: float | None
    top: list[tuple[int, float]]
    offset: int


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
    card = {"id": "m", "registry_version": 3, "val_loss": 1.5, "eval_loss": None, "extra": 1,
            "lineage": {"model": "m", "training_run_id": "r1"}}  # fmt: skip
    gen = Generation(card, prompt_tokens=2, clock=lambda: next(ticks))
    assert gen.events(Ev("Hi", [1, 2])) == [{"text": "Hi"}]
    last = gen.events(Ev("", [3], True, "length"))
    assert last == [{"done": True, "prompt_tokens": 2, "completion_tokens": 3,
                     "finish_reason": "length", "seconds": 2.0, "ttft_s": 0.5,
                     "tokens_per_s": 1.5,
                     "model": {"id": "m", "registry_version": 3, "val_loss": 1.5,
                               "eval_loss": None,
                               "lineage": {"model": "m", "training_run_id": "r1"}}}]  # fmt: skip
    assert gen.body()["text"] == "Hi"


# Token ids → strings for the logprobs tests (medgpt.tokenizer.token_text in the server).
WORDS = {1: "Fe", 2: "ver", 3: " is", 4: " hot", 5: " cold", 6: ".", 7: "\ufffd", 8: "!"}


def _scored_events() -> tuple[list[tuple[int, Ev]], str]:
    """Two choices over the prompt "Fever": choice 0 streams " is", then " hot" is held back
    (a stop string could start there) and comes with " cold"; choice 1 ends after "." by
    end-of-text."""
    prompt = [Lp(1, None, [], 0), Lp(2, -2.5, [(3, -0.5), (2, -2.5)], 2)]
    events = [
        (0, Ev(" is", [3], logprobs=[Lp(3, -0.25, [(3, -0.25), (4, -1.5)], 0)],
               prompt_logprobs=prompt)),
        (1, Ev(".", [6], logprobs=[Lp(6, -3.0, [(3, -0.5), (8, -0.75)], 0)],
               prompt_logprobs=prompt)),
        (0, Ev("", [4], logprobs=[])),  # held back: its token comes with its text
        (1, Ev("", [], True, "stop", logprobs=[Lp(50256, -0.1, [(50256, -0.1)], 1)])),
        (0, Ev(" hot cold", [5], True, "length", logprobs=[Lp(4, -1.5, [(3, -0.25), (4, -1.5)], 3),
                                                      Lp(5, -4.0, [(3, -0.5), (7, -0.5)], 7)])),
    ]  # fmt: skip
    return events, "Fever"


def _text(t: int) -> str:
    return WORDS.get(t, "<|endoftext|>")


def test_completion_logprobs_in_openais_format_with_echo() -> None:
    events, prompt = _scored_events()
    whole = Completion("m", 2, n=2, created=1, echo=prompt, logprobs=2, token_text=_text)
    for i, ev in events:
        whole.add(i, ev)
    body = whole.body()
    c0, c1 = body["choices"]
    assert c0["text"] == "Fever is hot cold" and c1["text"] == "Fever."
    assert c0["logprobs"] == {
        "tokens": ["Fe", "ver", " is", " hot", " cold"],
        "token_logprobs": [None, -2.5, -0.25, -1.5, -4.0],
        # The N most likely, most likely first, and the chosen token when it is not among
        # them; the prompt's first token has none.
        "top_logprobs": [None, {" is": -0.5, "ver": -2.5}, {" is": -0.25, " hot": -1.5},
                         {" is": -0.25, " hot": -1.5}, {" is": -0.5, "\ufffd": -0.5, " cold": -4.0}],
        "text_offset": [0, 2, 5, 8, 12],
    }  # fmt: skip
    assert c1["logprobs"]["tokens"] == ["Fe", "ver", ".", "<|endoftext|>"]
    assert c1["logprobs"]["text_offset"] == [0, 2, 5, 6]  # end-of-text sits at the end
    assert c1["logprobs"]["top_logprobs"][2] == {" is": -0.5, "!": -0.75, ".": -3.0}
    # The offsets are where each token's text is in the choice's text.
    for choice in (c0, c1):
        lp = choice["logprobs"]
        for token, at in zip(lp["tokens"], lp["text_offset"], strict=True):
            if token != "<|endoftext|>":
                assert choice["text"][at : at + len(token)] == token
    assert body["usage"]["completion_tokens"] == 4  # end-of-text is not counted, as before


def test_streamed_logprobs_add_up_to_the_body() -> None:
    events, prompt = _scored_events()
    streamed = Completion("m", 2, n=2, created=1, echo=prompt, logprobs=2, token_text=_text)
    chunks = [c for i, ev in events if (c := streamed.chunk(i, ev)) is not None]
    whole = Completion("m", 2, n=2, created=1, echo=prompt, logprobs=2, token_text=_text)
    for i, ev in events:
        whole.add(i, ev)
    body = whole.body()
    assert len(chunks) == 4  # the held-back event says nothing
    for i in range(2):
        parts = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert parts[0]["text"].startswith(prompt)  # the echo comes with the first chunk
        assert "".join(p["text"] for p in parts) == body["choices"][i]["text"]
        merged = add_logprobs({"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}, [])  # fmt: skip
        for p in parts:
            for key in merged:
                merged[key] += p["logprobs"][key]
        assert merged == body["choices"][i]["logprobs"]


def test_echo_without_logprobs_and_logprobs_without_echo() -> None:
    events, prompt = _scored_events()
    echo_only = Completion("m", 2, n=2, echo=prompt)
    plain = Completion("m", 2, n=2, logprobs=2, token_text=_text)
    for i, ev in events:
        echo_only.add(i, ev)
        plain.add(i, ev)
    assert [c["text"] for c in echo_only.body()["choices"]] == ["Fever is hot cold", "Fever."]
    assert all(c["logprobs"] is None for c in echo_only.body()["choices"])
    c0 = plain.body()["choices"][0]
    assert c0["text"] == " is hot cold"
    assert c0["logprobs"]["tokens"] == [" is", " hot", " cold"]
    assert c0["logprobs"]["text_offset"] == [0, 3, 7]  # counted from the completion's start


def test_token_strings_are_each_tokens_bytes_decoded_alone() -> None:
    from medgpt.serving.responses import add_logprobs as add
    from medgpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary("naïve 😀")
    out = add({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
              [Lp(t, -1.0, [], i) for i, t in enumerate(ids)])  # fmt: skip
    assert out["tokens"][0] == "na" and "\ufffd" in "".join(out["tokens"])  # the emoji's bytes
    assert out["top_logprobs"] == [{t: -1.0} for t in out["tokens"]]
