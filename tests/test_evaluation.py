"""The readiness gate: exact held-out loss, reports, exit codes, and the MLflow registry
(real MLflow on a sqlite store in a temporary folder)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medgpt.checkpoint import SERVING_FILES, save_checkpoint, serving_sha256
from medgpt.cli import main
from medgpt.config import ModelConfig
from medgpt.data.prepare import PrepareConfig, prepare
from medgpt.evaluation import (
    EvalConfig,
    plan_windows,
    prepared_documents,
    score_documents,
)
from medgpt.hf import save_hf_gpt2
from medgpt.model import GPT
from medgpt.testing import own_lines
from medgpt.tokenizer import EOT_ID, get_tokenizer

WORDS = [
    "patient",
    "presents",
    "with",
    "chronic",
    "cough",
    "fever",
    "dyspnea",
    "hypertension",
    "diabetes",
    "insulin",
    "renal",
    "failure",
    "cardiac",
    "murmur",
    "stroke",
    "aphasia",
    "seizure",
    "migraine",
    "aura",
    "therapy",
    "dose",
    "daily",
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sources of short and long documents, and a dataset prepared from them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    cardio = _jsonl(root / "cardio.jsonl", [_text(rng, rng.randint(3, 60)) for _ in range(24)])
    neuro = _jsonl(root / "neuro.jsonl", [_text(rng, rng.randint(3, 90)) for _ in range(24)])
    data = root / "data"
    prepare(
        PrepareConfig(sources=[str(cardio), str(neuro)], out=str(data), val_fraction=0.5, seed=3),
        progress=False,
    )
    return {"cardio": cardio, "neuro": neuro, "data": data, "root": root}


def _model(block_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)).eval()


def _checkpoint(path: Path, model: GPT, **meta) -> Path:
    return save_checkpoint(path, model, {"step": 10, "val_loss": 9.5, **meta})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "step-000010", _model(256))


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test names its own store; a developer's MLFLOW_TRACKING_URI must not leak in.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _evaluate(*args: str | Path) -> int:
    return main(["evaluate", "--quiet", "--no-samples", *map(str, args)])


# --- windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2, 5, 16])
def test_windows_score_every_target_once_with_enough_context(block: int) -> None:
    for n in range(0, 70):
        for stride in range(1, block + 3):
            seen: list[int] = []
            for i, w in enumerate(plan_windows(n, block, stride)):
                assert 0 <= w.start < w.end <= n - 1
                assert w.end - w.start <= block
                assert 1 <= w.scored <= w.end - w.start
                targets = range(w.end - w.scored + 1, w.end + 1)
                if i > 0:  # every later target sees at least block - stride + 1 tokens
                    assert min(t - w.start for t in targets) >= block - min(stride, block) + 1
                seen.extend(targets)
            assert seen == list(range(1, n)), (n, block, stride)


def test_windows_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        plan_windows(10, 0, 1)
    with pytest.raises(ValueError):
        plan_windows(10, 4, 0)


# --- exact loss -------------------------------------------------------------------------------


def _direct(model: GPT, docs: list[tuple[str, np.ndarray]]) -> dict[str, tuple[float, int]]:
    """Summed NLL and token count per source, one plain forward per document."""
    out: dict[str, tuple[float, int]] = {}
    with torch.no_grad():
        for source, toks in docs:
            t = torch.from_numpy(toks.astype(np.int64))
            _, loss = model(t[None, :-1], t[None, 1:])
            nll, n = out.get(source, (0.0, 0))
            out[source] = (nll + float(loss) * (len(toks) - 1), n + len(toks) - 1)
    return out


def test_loss_equals_direct_computation_per_source(corpus, ckpt, tmp_path) -> None:
    from medgpt.checkpoint import load_model

    model = load_model(ckpt)
    docs = list(prepared_documents(corpus["data"], "val").documents)
    assert max(len(t) for _, t in docs) <= 256  # every document fits: one forward each
    direct = _direct(model, docs)

    out = tmp_path / "report"
    assert (
        _evaluate("--checkpoint", ckpt, "--data", corpus["data"], "--no-mlflow", "--out", out) == 0
    )
    report = json.loads((out / "report.json").read_text())
    m = report["model"]
    total_nll = sum(v[0] for v in direct.values())
    total_n = sum(v[1] for v in direct.values())
    assert m["tokens"] == total_n
    assert m["loss"] == pytest.approx(total_nll / total_n, abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    assert set(m["per_source"]) == {"cardio.jsonl", "neuro.jsonl"}
    for name, (nll, n) in direct.items():
        assert m["per_source"][name]["tokens"] == n
        assert m["per_source"][name]["loss"] == pytest.approx(nll / n, abs=1e-5)
    manifest = json.loads((corpus["data"] / "manifest.json").read_text())
    assert m["documents"] == manifest["splits"]["val"]["documents"]
    assert report["data"]["content_hash"] == manifest["content_hash"]


def test_long_document_every_token_scored_once_with_full_context(tmp_path) -> None:
    block = 16
    model = _model(block, seed=1)
    enc = get_tokenizer()
    rng = random.Random(3)
    toks = np.array([EOT_ID, *enc.encode_ordinary(_text(rng, 80))], dtype=np.int64)
    assert len(toks) > 4 * block

    # Reference: each target predicted from the (at most block) tokens right before it.
    ref = []
    with torch.no_grad():
        for t in range(1, len(toks)):
            ctx = torch.from_numpy(toks[max(0, t - block) : t])[None]
            logits, _ = model(ctx)
            ref.append(-torch.log_softmax(logits[0, -1], -1)[toks[t]].item())

    full = score_documents([model], [("doc", toks)], EvalConfig(stride=1), torch.device("cpu"))
    s = full[0].per_source["doc"]
    assert s.tokens == len(toks) - 1 and s.documents == 1
    assert s.loss == pytest.approx(sum(ref) / len(ref), abs=1e-5)

    # A coarser stride still scores each token exactly once (less context for some of them).
    for stride in (3, 8, 16, 100):
        half = score_documents(
            [model], [("doc", toks)], EvalConfig(stride=stride), torch.device("cpu")
        )
        assert half[0].per_source["doc"].tokens == len(toks) - 1


def test_result_does_not_depend_on_batching(corpus, ckpt) -> None:
    from medgpt.checkpoint import load_model

    model = load_model(ckpt)
    losses = []
    for batch_tokens, head_chunk in ((1, 1), (100, 7), (100_000, 4096)):
        docs = prepared_documents(corpus["data"], "val").documents
        cfg = EvalConfig(batch_tokens=batch_tokens, head_chunk=head_chunk)
        losses.append(score_documents([model], docs, cfg, torch.device("cpu"))[0].total.loss)
    # fp32 matmuls of different shapes round differently; the float64 sums do not drift.
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert losses[2] == pytest.approx(losses[0], abs=1e-6)


def test_raw_source_is_tokenised_on_the_fly_and_left_untouched(corpus, ckpt, tmp_path) -> None:
    from medgpt.checkpoint import load_model
    from medgpt.data.prepare import clean_text

    src = corpus["cardio"]
    before = (src.read_bytes(), sorted(p.name for p in src.parent.iterdir()))
    out = tmp_path / "r"
    assert _evaluate("--checkpoint", ckpt, "--data", src, "--no-mlflow", "--out", out) == 0
    assert (src.read_bytes(), sorted(p.name for p in src.parent.iterdir())) == before
    report = json.loads((out / "report.json").read_text())
    enc = get_tokenizer()
    docs = [
        (
            "cardio.jsonl",
            np.array([EOT_ID, *enc.encode_ordinary(clean_text(json.loads(line)["text"]))]),
        )
        for line in src.read_text().splitlines()
    ]
    (nll, n) = _direct(load_model(ckpt), docs)["cardio.jsonl"]
    assert report["model"]["tokens"] == n
    assert report["model"]["loss"] == pytest.approx(nll / n, abs=1e-5)
    assert report["data"]["kind"] == "source" and len(report["data"]["content_hash"]) == 64


# --- baselines, report files --------------------------------------------------------------------


def test_baseline_hf_folder_scored_on_the_same_tokens(corpus, ckpt, tmp_path, capsys) -> None:
    base = _model(64, seed=5)
    hf = save_hf_gpt2(base, tmp_path / "hf-base")
    other = _checkpoint(tmp_path / "other", _model(128, seed=6))
    out = tmp_path / "rep"
    rc = _evaluate(
        "--checkpoint", ckpt, "--data", corpus["data"], "--baseline", hf, "--baseline", other,
        "--no-mlflow", "--out", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [b["kind"] for b in report["baselines"]] == ["hf-gpt2", "medgpt-checkpoint"]
    assert all(b["tokens"] == report["model"]["tokens"] for b in report["baselines"])
    docs = list(prepared_documents(corpus["data"], "val").documents)
    direct = _direct(base, docs) if max(len(t) for _, t in docs) <= 64 else None
    if direct is not None:  # the base model's context covers every document
        nll = sum(v[0] for v in direct.values())
        assert report["baselines"][0]["loss"] == pytest.approx(
            nll / report["model"]["tokens"], abs=1e-5
        )
    md = (out / "report.md").read_text()
    assert "baseline 1" in md and "baseline 2" in md and "loss (baseline 2)" in md
    assert (out / "per_source_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "baseline 1" in printed and "baseline 2" in printed


def test_samples_are_fixed_by_seed(corpus, ckpt, tmp_path) -> None:
    reports = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        args = ["evaluate", "--quiet", "--checkpoint", str(ckpt), "--data", str(corpus["data"])]
        assert main([*args, "--no-mlflow", "--out", str(out)]) == 0
        reports.append(json.loads((out / "report.json").read_text())["model"]["samples"])
    assert reports[0] == reports[1] and len(reports[0]) == 4
    assert all(s["completion"] for s in reports[0])


def test_report_folder_holding_other_files_is_refused(corpus, ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert (
        _evaluate("--checkpoint", ckpt, "--data", corpus["data"], "--no-mlflow", "--out", out) == 2
    )
    assert "not an evaluation report folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging folder left behind


# --- the gate without a registry ------------------------------------------------------------------


def test_gate_pass_and_fail_exit_codes(corpus, ckpt, tmp_path, capsys) -> None:
    base = ["--checkpoint", ckpt, "--data", corpus["data"], "--no-mlflow"]
    assert _evaluate(*base, "--out", tmp_path / "a", "--max-loss", "20") == 0
    out = capsys.readouterr().out
    loss = json.loads((tmp_path / "a/report.json").read_text())["model"]["loss"]
    assert f"PASS: loss {loss:.4f} <= 20.0" in out
    assert _evaluate(*base, "--out", tmp_path / "b", "--max-loss", "1.5") == 1
    out = capsys.readouterr().out
    assert f"FAIL: loss {loss:.4f} > 1.5" in out
    report = json.loads((tmp_path / "b/report.json").read_text())
    assert report["gate"] == {"max_loss": 1.5, "loss": loss, "passed": False}


# --- bad input: exit 2, one line, nothing registered ------------------------------------------------


def _bad_vocab(tmp: Path) -> Path:
    return _checkpoint(
        tmp / "small-vocab", GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=1000))
    )


def _other_tokenizer(tmp: Path) -> Path:
    ck = _checkpoint(tmp / "other-tok", _model(32))
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "tokenizer": "cl100k_base"}))
    return ck


def _corrupt_weights(tmp: Path) -> Path:
    ck = _checkpoint(tmp / "corrupt", _model(32))
    data = bytearray((ck / "model.safetensors").read_bytes())
    (ck / "model.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    return ck


def _empty_source(tmp: Path) -> Path:
    return _jsonl(tmp / "blank.jsonl", ["   ", "\n"])


BAD_INPUTS = {
    "missing checkpoint": (lambda t: t / "nope", None, "no such checkpoint"),
    "tokenizer differs": (_other_tokenizer, None, "tokenizer 'cl100k_base'"),
    "vocabulary too small": (_bad_vocab, None, "1000 ids"),
    "corrupted safetensors": (_corrupt_weights, None, "model.safetensors: cannot read weights"),
    "empty evaluation data": (None, _empty_source, "empty"),
    "run folder without checkpoints": (
        lambda t: (t / "run").mkdir() or t / "run",
        None,
        "without medgpt checkpoints",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_registers_nothing(case, corpus, ckpt, tmp_path, capsys) -> None:
    make_ckpt, make_data, message = BAD_INPUTS[case]
    checkpoint = make_ckpt(tmp_path) if make_ckpt else ckpt
    data = make_data(tmp_path) if make_data else corpus["data"]
    store = tmp_path / "store"
    rc = _evaluate(
        "--checkpoint", checkpoint, "--data", data, "--storage", store,
        "--max-loss", "100", "--register", "--out", tmp_path / "report",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("medgpt evaluate: error:") and message in err
    assert len(own_lines(err)) == 1 and "Traceback" not in err
    assert not (tmp_path / "report").exists()
    assert not (store / "mlflow.db").exists() or _registered(store) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--register"], "--register needs --max-loss"),
        (["--max-loss", "-1"], "max_loss: must be a positive"),
        (["--split", "test"], "split: 'test' (allowed: train, val)"),
        (["--stride", "0"], "stride: must be >= 1"),
        (["--device", "tpu"], "device: 'tpu' (allowed: auto, cpu, cuda, cuda:N)"),
        (["--alias", "v3", "--max-loss", "9"], "reserved"),
        (["--model-name", "bad name"], "model_name: 'bad name'"),
    ],
)
def test_bad_flags_exit_2(flags, message, corpus, ckpt, tmp_path, capsys) -> None:
    rc = _evaluate("--checkpoint", ckpt, "--data", corpus["data"], "--storage", tmp_path, *flags)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_a_gpu_is_a_clear_error(corpus, ckpt, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = _evaluate(
        "--checkpoint", ckpt, "--data", corpus["data"], "--no-mlflow", "--device", "cuda"
    )
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


# --- resolving checkpoints: run folders and MLflow runs ----------------------------------------------


def test_run_folder_resolves_to_its_best_checkpoint(corpus, tmp_path) -> None:
    from medgpt.checkpoint import best_in_run

    run = tmp_path / "run"
    _checkpoint(run / "step-000010", _model(32), val_loss=5.0, step=10)
    best = _checkpoint(run / "step-000020", _model(32), val_loss=4.0, step=20)
    _checkpoint(run / "step-000030", _model(32), val_loss=4.5, step=30)
    assert best_in_run(run) == best
    # The result file medgpt.launch writes wins over the scan.
    (run / "medgpt-result.json").write_text(
        json.dumps({"best_checkpoint": str(run / "step-000030")})
    )
    assert best_in_run(run) == run / "step-000030"
    out = tmp_path / "rep"
    assert (
        _evaluate("--checkpoint", run, "--data", corpus["data"], "--no-mlflow", "--out", out) == 0
    )
    assert json.loads((out / "report.json").read_text())["model"]["path"] == str(
        run / "step-000030"
    )


def test_mlflow_run_id_resolves_to_the_logged_checkpoint(corpus, ckpt, tmp_path) -> None:
    from medgpt.tracking import start_or_resume_run

    store = tmp_path / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    store.mkdir()
    run_id, _ = start_or_resume_run(uri, "medgpt", "train-x", {}, {})
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifacts(run_id, str(ckpt), "model/checkpoint")
    for spec in (run_id, f"runs:/{run_id}", f"runs:/{run_id}/model/checkpoint"):
        out = tmp_path / f"rep-{len(spec)}"
        assert (
            _evaluate(
                "--checkpoint", spec, "--data", corpus["data"], "--storage", store, "--out", out
            )
            == 0
        )
        report = json.loads((out / "report.json").read_text())
        assert serving_sha256(report["model"]["path"]) == serving_sha256(ckpt)
    assert _evaluate("--checkpoint", "f" * 32, "--data", corpus["data"], "--storage", store) == 2


# --- MLflow record and registry ------------------------------------------------------------------------


def _registered(store: Path) -> list[tuple[str, str]]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return sorted(
        (m.name, str(v.version))
        for m in client.search_registered_models()
        for v in client.search_model_versions(f"name = '{m.name}'")
    )


@pytest.fixture(scope="module")
def registry(corpus, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store where a FAIL was tried, then two checkpoints passed the gate in turn."""
    root = tmp_path_factory.mktemp("registry")
    store = root / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    from medgpt.tracking import start_or_resume_run

    train_run, _ = start_or_resume_run(uri, "medgpt", "train-a", {}, {})
    first = _checkpoint(
        root / "a" / "step-000010",
        _model(256, seed=11),
        mlflow_run_id=train_run,
        data_manifest_hash="abc123",
    )
    second = _checkpoint(root / "b" / "step-000020", _model(256, seed=12))
    common = ["--data", str(corpus["data"]), "--storage", str(store), "--register"]
    rc_fail = _evaluate("--checkpoint", first, *common, "--max-loss", "0.5", "--out", root / "fail")
    after_fail = _registered(store)
    rc1 = _evaluate("--checkpoint", first, *common, "--max-loss", "50", "--out", root / "r1")
    rc2 = _evaluate("--checkpoint", second, *common, "--max-loss", "50", "--out", root / "r2")
    return {
        "store": store, "uri": uri, "first": first, "second": second, "train_run": train_run,
        "rc": (rc_fail, rc1, rc2), "after_fail": after_fail, "root": root,
    }  # fmt: skip


def test_fail_never_registers_and_pass_moves_champion(registry) -> None:
    from mlflow.tracking import MlflowClient

    assert registry["rc"] == (1, 0, 0)
    assert registry["after_fail"] == []
    assert _registered(registry["store"]) == [("medgpt", "1"), ("medgpt", "2")]
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert str(client.get_model_version_by_alias("medgpt", "champion").version) == "2"
    v1 = client.get_model_version("medgpt", "1")
    assert v1.tags["checkpoint_sha256"] == serving_sha256(registry["first"])
    assert v1.tags["training_run_id"] == registry["train_run"]
    assert v1.tags["data_manifest_hash"] == "abc123"
    r1 = json.loads((registry["root"] / "r1/report.json").read_text())
    assert float(v1.tags["eval_loss"]) == pytest.approx(r1["model"]["loss"], abs=1e-6)
    assert r1["registered"]["version"] == "1" and r1["registered"]["alias"] == "champion"
    assert "git_commit" in v1.tags or not (Path(__file__).parents[1] / ".git").exists()
    # The passing gate record medgpt promote requires, and the champion's history.
    assert v1.tags["gate"] == "PASS" and v1.tags["gate.max_loss"] == "50.0"
    assert v1.tags["gate.run_id"] == r1["mlflow"]["run_id"]
    from medgpt.registry import alias_history

    assert alias_history(client, "medgpt", "champion") == ["1", "2"]


def test_evaluation_is_logged_to_the_training_run(registry) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"])
    run = client.get_run(registry["train_run"])
    # The training run was still RUNNING: logging and registering did not end it.
    assert run.info.status == "RUNNING"
    r1 = json.loads((registry["root"] / "r1/report.json").read_text())
    assert r1["mlflow"] == {
        "tracking_uri": registry["uri"],
        "run_id": registry["train_run"],
        "training_run": True,
    }
    history = client.get_metric_history(registry["train_run"], "eval_loss")
    assert r1["model"]["loss"] in [m.value for m in history]
    assert "eval_loss.neuro.jsonl" in run.data.metrics
    arts = [a.path for a in client.list_artifacts(registry["train_run"], "evaluation")]
    assert "evaluation/r1" in arts and "evaluation/fail" in arts
    assert {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(registry["train_run"], "evaluation/r1")} == {
        "report.json", "report.md", "per_source_loss.png",
    }  # fmt: skip
    # The second checkpoint has no training run in this store: a separate evaluation run.
    r2 = json.loads((registry["root"] / "r2/report.json").read_text())
    assert r2["mlflow"]["training_run"] is False
    eval_run = client.get_run(r2["mlflow"]["run_id"])
    assert eval_run.data.tags["eval.gate"] == "PASS"
    assert client.get_experiment(eval_run.info.experiment_id).name == "medgpt-evaluation"


@pytest.mark.parametrize("ref", ["models:/medgpt@champion", "models:/medgpt/2", "models:/medgpt/1"])
def test_registry_round_trip_gives_the_exact_files(registry, ref, tmp_path) -> None:
    from medgpt.registry import fetch_registered

    folder, info = fetch_registered(registry["uri"], ref, tmp_path / "cache")
    original = registry["first"] if ref.endswith("/1") else registry["second"]
    for name in SERVING_FILES:
        assert (folder / name).read_bytes() == (original / name).read_bytes(), name
    assert sorted(p.name for p in folder.iterdir()) == sorted(SERVING_FILES)  # no train state
    assert info["tags"]["checkpoint_sha256"] == serving_sha256(original)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((original / "model.safetensors").read_bytes()).hexdigest()


def test_evaluating_a_registry_uri(registry, corpus, tmp_path) -> None:
    out = tmp_path / "rep"
    args = ["--data", corpus["data"], "--storage", registry["store"], "--out", out]
    assert _evaluate("--checkpoint", "models:/medgpt@champion", *args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["registry"]["version"] == "2"
    r2 = json.loads((registry["root"] / "r2/report.json").read_text())
    assert report["model"]["loss"] == pytest.approx(r2["model"]["loss"], abs=1e-9)


def test_registry_uri_in_a_fresh_process_touches_only_the_named_store(registry, corpus, tmp_path):
    # A new process has no MLflow URIs set globally; nothing may fall back to ./mlflow.db.
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "medgpt.cli", "evaluate", "--quiet", "--no-samples",
        "--checkpoint", "models:/medgpt/1", "--data", str(corpus["data"]),
        "--tracking-uri", registry["uri"], "--storage", str(tmp_path / "s"), "--no-mlflow",
        "--out", str(tmp_path / "rep"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Downloading artifacts" not in proc.stderr  # --quiet silences MLflow's bars too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "s"]
    r1 = json.loads((registry["root"] / "r1/report.json").read_text())
    assert json.loads((tmp_path / "rep/report.json").read_text())["model"]["loss"] == pytest.approx(
        r1["model"]["loss"], abs=1e-9
    )


def test_tampered_registry_artifact_is_refused(registry, corpus, tmp_path, capsys) -> None:
    # Damage the stored copy of version 1 in the local artifact store.
    stored = [
        p
        for p in registry["store"].rglob("model.safetensors")
        if "artifacts/checkpoint" in p.as_posix() and "downloads" not in p.parts
    ]
    assert stored
    snapshot = {p: p.read_bytes() for p in stored}
    try:
        for p in stored:
            p.write_bytes(p.read_bytes()[:-8] + b"\x00" * 8)
        rc = _evaluate(
            "--checkpoint", "models:/medgpt/1", "--data", corpus["data"],
            "--tracking-uri", registry["uri"], "--storage", tmp_path,  # a fresh download cache
        )  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "hash" in err and "damaged" in err, err
        assert not (tmp_path / "downloads/registry/medgpt/1").exists()
    finally:
        for p, data in snapshot.items():
            p.write_bytes(data)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("models:/nosuch@champion", "no registered model named 'nosuch'"),
        ("models:/medgpt@staging", "has no alias 'staging' (aliases: champion)"),
        ("models:/medgpt/9", "has no version 9 (versions: 1, 2)"),
        ("models:/medgpt", "bad registry URI"),
    ],
)
def test_unknown_registry_references(registry, corpus, ref, message, capsys) -> None:
    before = _registered(registry["store"])
    rc = _evaluate(
        "--checkpoint",
        ref,
        "--data",
        corpus["data"],
        "--storage",
        registry["store"],
        "--max-loss",
        "50",
        "--register",
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert _registered(registry["store"]) == before


def test_pyfunc_loads_and_completes(registry) -> None:
    import mlflow

    from medgpt.tracking import using

    with using(registry["uri"]):
        model = mlflow.pyfunc.load_model("models:/medgpt@champion")
    out = model.predict(["Asthma is", "Fever"], params={"max_new_tokens": 5, "seed": 1})
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_gating_the_same_files_again_reuses_their_version(registry, corpus, capsys) -> None:
    """A rerun (quickstart, sweep) must not pile up copies: the version that already carries
    these files gets the alias; champion stays where it was."""
    from mlflow.tracking import MlflowClient

    before = _registered(registry["store"])
    capsys.readouterr()
    rc = _evaluate(
        "--checkpoint", registry["first"], "--data", str(corpus["data"]), "--storage",
        str(registry["store"]), "--register", "--max-loss", "50", "--alias", "staging",
        "--out", registry["root"] / "again",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "already registered as models:/medgpt/1 (same checkpoint files)" in out
    assert _registered(registry["store"]) == before
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert str(client.get_model_version_by_alias("medgpt", "staging").version) == "1"
    assert str(client.get_model_version_by_alias("medgpt", "champion").version) == "2"
