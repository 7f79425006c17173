"""The Serve application on the session's real Ray cluster, over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from medgpt.checkpoint import load_model, save_checkpoint
from medgpt.config import ModelConfig
from medgpt.generation import Engine, SamplingParams
from medgpt.model import GPT
from medgpt.testing import free_port, wait_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # Context 1024 so a long generation takes a while (cancellation is observable).
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=1024))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(6)
    path = tmp_path_factory.mktemp("serve") / "step-000007"
    return save_checkpoint(path, model, {"step": 7, "val_loss": 3.25, "mlflow_run_id": "abc"})


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoint, tmp_path_factory) -> dict:
    import ray
    from ray import serve

    from medgpt.serving import app_builder, build_app

    ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    storage = tmp_path_factory.mktemp("serve-store")
    args = {"checkpoint": str(checkpoint), "storage_path": str(storage), "max_tokens_cap": 600,
            "max_batch_size": 8, "threads": 1, "num_cpus": 1}  # fmt: skip
    serve.run(app_builder(args), name="medgpt", route_prefix="/", blocking=False)
    # A second, tiny-capacity app for backpressure: one running request, nobody waiting.
    busy = {**args, "max_batch_size": 1, "max_queue": 0, "num_cpus": 0.25}
    serve.run(build_app(busy, name="Busy"), name="busy", route_prefix="/busy", blocking=False)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return all(
                requests.get(f"{url}{p}/healthz", timeout=2).status_code == 200
                for p in ("", "/busy")
            )
        except requests.RequestException:
            return False

    wait_for(ready, 180, "Serve apps to answer /healthz", interval=0.5)
    yield {"url": url, "checkpoint": checkpoint}
    serve.delete("busy")
    serve.delete("medgpt")
    serve.shutdown()


def _solo(checkpoint: Path, prompt: str, params: SamplingParams) -> str:
    return Engine(load_model(checkpoint), 1).generate(prompt, params)["text"]


def _sse(resp: requests.Response) -> list:
    out = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_model_card(server) -> None:
    health = requests.get(f"{server['url']}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "step-000007"
    card = requests.get(f"{server['url']}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == "step-000007" and card["training_run_id"] == "abc"
    assert card["val_loss"] == 3.25 and card["step"] == 7 and card["context_length"] == 1024


def test_completion_matches_the_engine_and_is_seeded(server) -> None:
    body = {"prompt": "Asthma is", "max_tokens": 20, "temperature": 0.9, "seed": 5}
    a = requests.post(f"{server['url']}/v1/completions", json=body, timeout=60).json()
    assert "choices" in a, a
    b = requests.post(f"{server['url']}/v1/completions", json=body, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    expected = _solo(server["checkpoint"], "Asthma is", SamplingParams(20, 0.9, 0, 1.0, 5))
    assert a["choices"][0]["text"] == expected
    assert a["object"] == "text_completion" and a["model"] == "step-000007"
    assert a["usage"]["prompt_tokens"] == 3
    assert a["usage"]["total_tokens"] == 3 + a["usage"]["completion_tokens"]
    assert a["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_equals_non_streaming(server) -> None:
    body = {"prompt": "Fever and", "max_tokens": 30, "temperature": 1.0, "seed": 9, "n": 2}
    whole = requests.post(f"{server['url']}/v1/completions", json=body, timeout=60).json()
    with requests.post(
        f"{server['url']}/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        stream=True,
        timeout=60,
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(resp)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]["usage"]
    assert usage == whole["usage"]
    for i in range(2):
        parts = [c["choices"][0] for c in chunks[:-2] if c["choices"][0]["index"] == i]
        assert "".join(p["text"] for p in parts) == whole["choices"][i]["text"]
        assert parts[-1]["finish_reason"] == whole["choices"][i]["finish_reason"]
        assert all(p["finish_reason"] is None for p in parts[:-1])
    assert whole["choices"][0]["text"] != whole["choices"][1]["text"]  # seeds 9 and 10


def test_openai_client(server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="step-000007", prompt="Diabetes", max_tokens=12, seed=3)
    assert out.choices[0].text and out.usage.completion_tokens >= 1
    stream = client.completions.create(
        model="step-000007", prompt="Diabetes", max_tokens=12, seed=3, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text
    assert [m.id for m in client.models.list()] == ["step-000007"]
    assert client.models.retrieve("step-000007").id == "step-000007"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("medgpt/1")  # a registry id: NAME/VERSION, slash and all
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="step-000007", prompt="x", temperature=5)


def _direct_logprobs(checkpoint: Path, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the checkpoint's model over ``tokens`` in one plain forward pass."""
    model = load_model(checkpoint).eval()
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_scoring_with_the_openai_client(server) -> None:
    """completions.create(logprobs=5, echo=True, max_tokens=0): the prompt back, each of its
    tokens with the model's own log-probability and top 5 (the first token null)."""
    import openai

    from medgpt.tokenizer import get_tokenizer, token_text

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    prompt = "Asthma is a chronic disease of the airways."
    out = client.completions.create(
        model="step-000007", prompt=prompt, logprobs=5, echo=True, max_tokens=0
    )
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    ids = get_tokenizer().encode_ordinary(prompt)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    ref = _direct_logprobs(server["checkpoint"], ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4), i
        values, top = ref[i - 1].topk(5)
        expected = {token_text(t): v for t, v in zip(top.tolist(), values.tolist(), strict=True)}
        got = lp.top_logprobs[i]
        # The true top 5, and the prompt's token besides when it is not among them.
        assert set(got) == set(expected) | {lp.tokens[i]}, i
        assert [got[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-4)


def test_streamed_logprobs_with_the_openai_client(server) -> None:
    """A sampled completion with logprobs and echo, streamed and not: the chunks' logprobs
    add up to the body's, which are the engine's alone and the model's own."""
    import openai

    from medgpt.tokenizer import token_text

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    args = {"model": "step-000007", "prompt": "Fever and", "max_tokens": 20, "temperature": 0.9,
            "seed": 4, "logprobs": 3, "echo": True}  # fmt: skip
    whole = client.completions.create(**args).choices[0]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**args, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
            for key in merged:
                merged[key] += getattr(chunk.choices[0].logprobs, key)
    assert text == whole.text and text.startswith("Fever and")
    for key in merged:
        assert merged[key] == getattr(whole.logprobs, key), key
    solo = Engine(load_model(server["checkpoint"]), 1).generate(
        "Fever and", SamplingParams(20, 0.9, 0, 1.0, 4, logprobs=3, prompt_logprobs=True)
    )
    entries = solo["prompt_logprobs"] + solo["logprobs"]
    assert whole.logprobs.tokens == [token_text(e.token) for e in entries]
    assert whole.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in entries[1:]])
    assert whole.text == "Fever and" + solo["text"]
    ids = [e.token for e in entries]
    ref = _direct_logprobs(server["checkpoint"], ids)
    direct = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert whole.logprobs.token_logprobs[1:] == pytest.approx(direct, abs=1e-4)


def test_lm_evaluation_harness_scoring_request(server) -> None:
    """The body lm-eval's local-completions sends for a log-likelihood, read the way its
    parse_logprobs reads the answer: the continuation's summed logprob (the last token is
    the one generated) and whether it is the greedy one."""
    from medgpt.tokenizer import get_tokenizer

    context, continuation = "Question: what causes asthma? Answer:", " inflammation"
    enc = get_tokenizer()
    ctx, cont = enc.encode_ordinary(context), enc.encode_ordinary(continuation)
    body = {"model": "step-000007", "prompt": context + continuation, "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    r = requests.post(f"{server['url']}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ctx) + len(cont) + 1  # end-of-text too, were it sampled
    scored, tops = lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1]
    total = sum(scored)
    greedy = all(t == max(top.values()) for t, top in zip(scored, tops, strict=True))
    ref = _direct_logprobs(server["checkpoint"], ctx + cont)
    pos = range(len(ctx), len(ctx) + len(cont))
    assert total == pytest.approx(sum(ref[i - 1, (ctx + cont)[i]].item() for i in pos), abs=1e-3)
    assert greedy == all(int(ref[i - 1].argmax()) == (ctx + cont)[i] for i in pos)


def test_token_id_prompts_score_like_their_text(server) -> None:
    """OpenAI's token-id prompt forms (ids, a list of one list of ids) give the text prompt's
    answer, echo text and logprobs included."""
    from medgpt.tokenizer import get_tokenizer

    text = "Question: what causes gout? Answer: uric acid"
    ids = get_tokenizer().encode_ordinary(text)
    base = {"max_tokens": 3, "logprobs": 2, "echo": True, "temperature": 0}
    answers = []
    for prompt in (text, ids, [ids]):
        r = requests.post(f"{server['url']}/v1/completions", json={**base, "prompt": prompt},
                          timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        answers.append(r.json())
    for a in answers[1:]:
        assert a["choices"][0]["text"] == answers[0]["choices"][0]["text"]
        assert a["choices"][0]["logprobs"] == answers[0]["choices"][0]["logprobs"]
        assert a["usage"] == answers[0]["usage"]
    assert answers[0]["choices"][0]["text"].startswith(text)


def test_an_app_on_a_fixed_checkpoint_refuses_refresh_with_its_reason(server) -> None:
    """The real route behind tests/test_rollout.py's stand-in: a 400 naming the checkpoint,
    which medgpt promote passes on as it is."""
    from medgpt.rollout import notify_serve

    r = requests.post(f"{server['url']}/admin/refresh", timeout=30)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith(f"this app serves {server['checkpoint']}, not a models:/"), message
    served, _, what = notify_serve(server["url"], "1", wait_s=5)
    assert not served
    assert what == f"{server['url']}/admin/refresh answered 400: {message}"


def test_tokenizer_routes_serve_lm_evals_remote_tokenizer(server) -> None:
    """vLLM's /tokenizer_info, /tokenize and /detokenize, as lm-eval's remote tokenizer
    detects and uses them (the real lm_eval code): no tokenizer files on the client."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    from medgpt.tokenizer import EOT_ID, get_tokenizer

    url, enc = server["url"], get_tokenizer()
    info = requests.get(f"{url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
    text = "Anemia: fatigue, pallor<|endoftext|>Gout"
    r = requests.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False})
    body = r.json()
    assert body["tokens"] == enc.encode(text, allowed_special="all"), body
    assert EOT_ID in body["tokens"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    r = requests.post(f"{url}/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": text}
    assert requests.post(f"{url}/tokenize", json={"prompt": ""}).json()["tokens"] == []

    assert check_remote_tokenizer_support(f"{url}/v1/completions")
    tok = RemoteTokenizer(f"{url}/v1/completions")
    assert tok.eos_token_id == EOT_ID and tok.bos_token_id == EOT_ID
    assert tok.encode("Question: fever?") == enc.encode_ordinary("Question: fever?")
    assert tok.decode(enc.encode_ordinary("héllo wörld")) == "héllo wörld"

    for route, bad, param in [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": []}, "messages"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [1, 50257]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ]:
        r = requests.post(f"{url}{route}", json=bad, timeout=10)
        assert r.status_code in (400, 404), (route, bad, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param in err["message"], (route, bad, err)


@pytest.mark.slow
def test_lm_evaluation_harness_scores_the_exported_task_like_medgpt_evaluate(
    server, tmp_path
) -> None:
    """The independent scorer: the real lm_eval CLI, local-completions against this Serve app
    (its defaults: the server's tokenizer, token-id prompts), on the task medgpt evaluate
    exported, gets medgpt evaluate's acc and acc_norm, and each option's log-likelihood."""
    import os
    import subprocess
    import sys

    from medgpt.benchmark import BenchmarkConfig, SplitRule, build_benchmark, loglikelihoods
    from medgpt.cli import main
    from medgpt.data.prepare import PrepareConfig, prepare
    from medgpt.data.sources import SourceSpec
    from medgpt.testing.qa import DISEASES, medquad_folder

    src = medquad_folder(tmp_path / "medquad", diseases=DISEASES[:24])
    data, out, export = tmp_path / "data", tmp_path / "report", tmp_path / "lm-eval"
    prepare(PrepareConfig(sources=[str(src)], out=str(data), val_fraction=0.5, seed=5),
            progress=False)  # fmt: skip
    rc = main(["evaluate", "--quiet", "--no-samples", "--no-mlflow", "--checkpoint",
               str(server["checkpoint"]), "--data", str(data), "--out", str(out), "--task",
               "medquad-mc", "--answer-tokens", "24", "--export-lm-eval", str(export)])  # fmt: skip
    assert rc == 0
    ours = json.loads((out / "report.json").read_text())["tasks"]["medquad-mc"]

    results = tmp_path / "lm-eval-results"
    model_args = (f"model=step-000007,base_url={server['url']}/v1/completions,max_length=1024,"
                  "num_concurrent=4")  # fmt: skip
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           model_args, "--include_path", str(export), "--tasks", "medquad_mc", "--output_path",
           str(results), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "remote tokenizer" in proc.stderr.lower(), proc.stderr[-4000:]
    theirs = json.loads(next(results.rglob("results_*.json")).read_text())
    r = theirs["results"]["medquad_mc"]
    assert r["acc,none"] == pytest.approx(ours["model"]["acc"], abs=1e-9)
    assert r["acc_norm,none"] == pytest.approx(ours["model"]["acc_norm"], abs=1e-9)
    assert theirs["n-samples"]["medquad_mc"]["effective"] == ours["items"]

    # Item by item: lm-eval's log-likelihoods (from the server's logprobs) are medgpt's own
    # batched forward's.
    samples = [json.loads(line) for f in results.rglob("samples_medquad_mc_*.jsonl")
               for line in f.read_text().splitlines()]  # fmt: skip
    rule = SplitRule(seed=5, val_fraction=0.5, dedupe=True, origin="test")
    bench = build_benchmark("medquad-mc", [SourceSpec(uri=str(src))], rule,
                            BenchmarkConfig(answer_tokens=24))  # fmt: skip
    lls = loglikelihoods(load_model(server["checkpoint"]).eval(), bench, torch.device("cpu"))
    mine = {it.id: ll for it, ll in zip(bench.items, lls, strict=True)}
    assert sorted(s["doc"]["id"] for s in samples) == sorted(mine)
    for s in samples:
        got = [float(resp[0]) for resp in s["filtered_resps"]]
        assert got == pytest.approx(list(mine[s["doc"]["id"]]), abs=2e-3), s["doc"]["id"]


def test_generate_and_generate_stream(server) -> None:
    body = {"prompt": "Hypertension", "max_new_tokens": 25, "temperature": 0, "top_k": 0}
    out = requests.post(f"{server['url']}/generate", json=body, timeout=60).json()
    assert out["text"] == _solo(server["checkpoint"], "Hypertension", SamplingParams(25, 0))
    assert out["model"]["id"] == "step-000007" and out["model"]["val_loss"] == 3.25
    assert out["completion_tokens"] >= 1 and out["seconds"] > 0 and out["ttft_s"] is not None
    with requests.post(f"{server['url']}/generate/stream", json=body, stream=True, timeout=60) as r:
        events = _sse(r)
    assert "".join(e.get("text", "") for e in events) == out["text"]
    assert events[-1]["done"] and events[-1]["completion_tokens"] == out["completion_tokens"]


def test_many_concurrent_streams_each_equal_their_solo_output(server) -> None:
    prompts = [f"Patient {i} presents with" for i in range(12)]

    def stream(i: int) -> str:
        body = {"prompt": prompts[i], "max_new_tokens": 40, "temperature": 1.0, "top_k": 50,
                "seed": 100 + i}  # fmt: skip
        with requests.post(
            f"{server['url']}/generate/stream", json=body, stream=True, timeout=120
        ) as r:
            assert r.status_code == 200
            return "".join(e.get("text", "") for e in _sse(r))

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(stream, range(12)))
    for i, text in enumerate(got):
        solo = _solo(server["checkpoint"], prompts[i], SamplingParams(40, 1.0, 50, 1.0, 100 + i))
        assert text == solo, i


BAD_BODIES = [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "word " * 1000, "max_tokens": 100}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [15, 50257]}, "prompt"),  # past GPT-2's vocabulary
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [5] * 1030, "max_tokens": 1}, "max_tokens"),  # ids over the context
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "word " * 1030, "max_tokens": 0, "echo": True}, "max_tokens"),  # over the context
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_invalid_completion_bodies_are_400_naming_the_field(server, body, param) -> None:
    r = requests.post(f"{server['url']}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param in err["message"]


@pytest.mark.parametrize(
    ("data", "headers", "status", "message"),
    [
        ("{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        ("[1, 2]", {"content-type": "application/json"}, 400, "JSON object"),
        ("x" * 70_000, {"content-type": "application/json"}, 413, "over 65536 bytes"),
    ],
)
def test_malformed_bodies(server, data, headers, status, message) -> None:
    for route in ("/v1/completions", "/generate"):
        r = requests.post(f"{server['url']}{route}", data=data, headers=headers, timeout=30)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_generate_validation_names_the_field(server) -> None:
    r = requests.post(f"{server['url']}/generate", json={"prompt": "x", "max_new_tokens": 601})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens"
    r = requests.post(f"{server['url']}/generate/stream", json={"prompt": "x", "oops": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "oops"
    assert r.json()["error"]["message"].startswith("unknown field 'oops' (allowed: prompt, ")


def test_routing_errors_are_openai_error_bodies(server) -> None:
    url = server["url"]
    r = requests.get(f"{url}/v1/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such route: /v1/nope"
    r = requests.get(f"{url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "use POST" in r.json()["error"]["message"], r.text
    r = requests.get(f"{url}/v1/models/step-000007", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "step-000007"


def test_a_chunked_body_is_cut_off_at_the_limit(server) -> None:
    """No Content-Length to check up front: the body is refused while it is read."""
    from medgpt.api import MAX_BODY_BYTES

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    r = requests.post(f"{server['url']}/generate", data=chunks(), timeout=30,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and f"over {MAX_BODY_BYTES} bytes" in r.json()["error"]["message"]


def _finished(url: str) -> dict:
    return requests.get(f"{url}/healthz", timeout=10).json()["finished"]


def test_disconnect_cancels_the_generation(server) -> None:
    url = server["url"]
    before = _finished(url).get("cancelled", 0)
    body = {"prompt": "Once", "max_new_tokens": 600, "temperature": 1.0, "seed": 1}
    r = requests.post(f"{url}/generate/stream", json=body, stream=True, timeout=60)
    lines = r.iter_lines()
    assert next(line for line in lines if line)  # the first token arrived
    r.close()
    wait_for(lambda: _finished(url).get("cancelled", 0) > before, 30, "the cancellation")
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["running"] == 0


def test_backpressure_is_503_with_retry_after(server) -> None:
    url = f"{server['url']}/busy"
    body = {"prompt": "Once", "max_new_tokens": 600, "temperature": 1.0, "seed": 2}
    with requests.post(f"{url}/generate/stream", json=body, stream=True, timeout=60) as first:
        lines = first.iter_lines()  # keep a reference: a collected iterator closes the stream
        assert next(line for line in lines if line)  # it holds the only batch row
        second = requests.post(
            f"{url}/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=30
        )
        assert second.status_code == 503, second.text
        assert second.headers["Retry-After"] == "2"
        assert second.json()["error"]["type"] == "server_overloaded"
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=5).json()["running"] == 0, 30, "idle")
    ok = requests.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.slow
def test_replica_killed_under_load_recovers(server, checkpoint, tmp_path) -> None:
    import os
    import signal

    import ray
    from ray import serve
    from ray.util.state import list_actors

    from medgpt.serving import build_app

    cfg = {"checkpoint": str(checkpoint), "storage_path": str(tmp_path), "threads": 1,
           "min_replicas": 2, "max_replicas": 2, "health_check_period_s": 1, "num_cpus": 0.25}
    serve.run(build_app(cfg, name="Pair"), name="pair", route_prefix="/pair", blocking=False)
    url = f"{server['url']}/pair"
    wait_for(lambda: _ok(f"{url}/healthz"), 120, "the pair app")
    results: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/generate", json={"prompt": "Asthma", "max_new_tokens": 30},
                                  timeout=30)  # fmt: skip
                results.append(r.status_code)
            except requests.RequestException as e:
                results.append(type(e).__name__)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    victims = [a for a in actors if "Pair" in (a.class_name or "")]
    assert len(victims) == 2, [a.class_name for a in actors]
    os.kill(victims[0].pid, signal.SIGKILL)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a request hung"
    assert results.count(200) > 10
    # Requests on the killed replica fail fast; none hangs, and service comes back.
    wait_for(lambda: _ok(f"{url}/healthz"), 60, "recovery")
    assert (
        requests.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 3}).status_code
        == 200
    )
    wait_for(
        lambda: serve.status().applications["pair"].status == "RUNNING", 60, "2 healthy replicas"
    )
    serve.delete("pair")
    del ray


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_metrics_are_exported_through_ray(server) -> None:
    import ray

    requests.post(f"{server['url']}/generate", json={"prompt": "Asthma", "max_new_tokens": 8})
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}

    def exported() -> str | None:
        for port in ports:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.RequestException:
                continue
            if "medgpt_generated_tokens" in text and "medgpt_time_to_first_token_s" in text:
                return text
        return None

    text = wait_for(exported, 60, "medgpt metrics on Ray's Prometheus endpoint", interval=2)
    for name in ("medgpt_inter_token_latency_s", "medgpt_request_latency_s", "medgpt_batch_size"):
        assert name in text, name


# Serve's ingress wrapper has an async __del__, which only a replica's shutdown awaits.
@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__' was never awaited")
def test_the_replica_does_all_its_torch_work_in_the_engine_thread(
    server, tmp_path, monkeypatch
) -> None:
    """Every thread that starts OpenMP regions gets a libgomp pool of its own, and with two
    pools the runtime stopped spinning at barriers (see MedgptServer.__init__): loading, the
    warm-up and every step must run in the one engine thread. The replica class is built here
    in the test process, as Serve builds it in a replica, with spies on those three calls."""
    import asyncio

    import medgpt.checkpoint
    from medgpt.api import GenerateRequest
    from medgpt.serving.deployment import MedgptServer

    seen: dict[str, set[str]] = {"load_model": set(), "generate": set(), "step": set()}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name].add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(medgpt.checkpoint, "load_model", spy("load_model", load_model))
    monkeypatch.setattr(Engine, "generate", spy("generate", Engine.generate))
    monkeypatch.setattr(Engine, "step", spy("step", Engine.step))
    cls = MedgptServer.func_or_class
    config = {"checkpoint": str(server["checkpoint"]), "storage_path": str(tmp_path), "threads": 1}

    async def serve_one() -> dict:
        replica = cls.__new__(cls)
        await cls.__init__(replica, config)  # Serve's ingress wrapper has an async __init__
        try:
            body = GenerateRequest(prompt="Asthma", max_new_tokens=3, temperature=0)
            return await replica.generate_body(body)
        finally:
            replica._stop.set()
            replica._wake.set()
            replica._stepper.join(timeout=30)

    out = asyncio.run(serve_one())
    assert out["completion_tokens"] == 3
    assert seen == {"load_model": {"medgpt-engine"}, "generate": {"medgpt-engine"},
                    "step": {"medgpt-engine"}}  # fmt: skip
