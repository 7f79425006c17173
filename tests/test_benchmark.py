"""The multiple-choice benchmark (medgpt.benchmark, `medgpt evaluate --task medquad-mc`): items
only from held-out documents, seeded distractors of the same question type, log-likelihoods
equal to a direct forward pass, acc/acc_norm with intervals, the gate, MLflow, the lm-eval
export, lm-eval task files as frozen item sets (`--task FILE.yaml`), and bad input (exit 2,
nothing written)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medgpt.benchmark import (
    NO_SOURCE,
    PROMPT,
    Benchmark,
    BenchmarkConfig,
    Item,
    SplitRule,
    accuracies,
    build_benchmark,
    check_tasks,
    cut_option,
    export_lm_eval,
    load_task_file,
    loglikelihoods,
    unigram_loglikelihoods,
    wilson,
)
from medgpt.checkpoint import save_checkpoint
from medgpt.cli import main
from medgpt.config import ConfigError, ModelConfig
from medgpt.data.prepare import PrepareConfig, clean_text, prepare, split_of
from medgpt.data.sources import SourceSpec
from medgpt.errors import DataError
from medgpt.model import GPT
from medgpt.testing import own_lines
from medgpt.testing.qa import DISEASES, TYPES, medquad_folder
from medgpt.testing.qa import answer_text as _answer
from medgpt.testing.qa import medquad_xml as _xml
from medgpt.tokenizer import N_VOCAB, get_tokenizer

MEDQUAD = Path(__file__).resolve().parents[2] / "shared/data/medquad"


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic MedQuAD folder, a dataset prepared from it (half held out) and a tiny
    checkpoint that says it was trained on that dataset."""
    root = tmp_path_factory.mktemp("qa")
    src = medquad_folder(root / "medquad")
    data = root / "data"
    prepare(PrepareConfig(sources=[str(src)], out=str(data), val_fraction=0.5, seed=5),
            progress=False)  # fmt: skip
    ckpt = save_checkpoint(root / "ckpt" / "step-000010", _model(64, seed=1),
                           {"step": 10, "val_loss": 9.0, "data_dir": str(data)})  # fmt: skip
    return {"src": src, "data": data, "ckpt": ckpt, "root": root}


def _model(block_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)).eval()


def _rule(seed: int = 5, val_fraction: float = 0.5) -> SplitRule:
    return SplitRule(seed=seed, val_fraction=val_fraction, dedupe=True, origin="test")


def _build(src: Path | list[SourceSpec], rule: SplitRule | None = None, **cfg) -> Benchmark:
    specs = src if isinstance(src, list) else [SourceSpec(uri=str(src))]
    return build_benchmark("medquad-mc", specs, rule or _rule(), BenchmarkConfig(**cfg))


def _evaluate(*args) -> int:
    return main(["evaluate", "--quiet", "--no-samples", *map(str, args)])


# --- items -------------------------------------------------------------------------------------


def test_items_come_from_held_out_documents_with_typed_distractors(qa) -> None:
    bench = _build(qa["src"], answer_tokens=200)
    enc = get_tokenizer()
    # Every pair of the folder, with its split as medgpt prepare decides it.
    pairs = {}
    for i, d in enumerate(DISEASES):
        site = ("GARD", "GHR")[i % 2]
        split = split_of(f"medquad:{site}:{i:07d}_1", 5, 0.5)
        for t in TYPES:
            pairs[f"What are the {t} of {d} ?"] = (split, t, d)
    answers = {}  # answer text -> (split, type, disease)
    rng = random.Random(0)
    for d in DISEASES:
        for t in TYPES:
            answers[_answer(rng, d, t)] = pairs[f"What are the {t} of {d} ?"]
    held = [q for q, (s, _, _) in pairs.items() if s == "val"]
    assert 0 < len(held) < len(pairs)
    assert sorted(it.question for it in bench.items) == sorted(held)
    for it in bench.items:
        _, qtype, disease = pairs[it.question]
        assert it.qtype == qtype and len(it.choices) == 4 and len(set(it.choices)) == 4
        assert answers[it.choices[it.gold]][2] == disease  # its own answer
        for j, c in enumerate(it.choices):
            split, t, d = answers[c]
            assert split == "val" and t == qtype  # held out, and of the same type
            assert j == it.gold or d != disease  # a distractor comes from another document
        assert it.prompt == f"Question: {it.question}\nAnswer:"
    assert bench.description["items"] == len(held)
    assert {it.gold for it in bench.items} == {0, 1, 2, 3}  # the answer is not always first
    # Every option is its own continuation's text: encoding it again gives the same tokens.
    for text, toks in bench.continuations.items():
        assert enc.encode_ordinary(" " + text) == toks


def test_items_are_seeded_and_deterministic(qa) -> None:
    a, b = _build(qa["src"]), _build(qa["src"])
    assert a.items == b.items and a.description["items_hash"] == b.description["items_hash"]
    other = _build(qa["src"], seed=1)
    assert [i.question for i in other.items] == [i.question for i in a.items]
    assert [i.choices for i in other.items] != [i.choices for i in a.items]


def test_nothing_of_the_training_split_is_a_question_or_an_option(tmp_path) -> None:
    """Pairs sharing a question or an answer with a training-split pair are left out, and a
    training answer is never a distractor."""
    rule = _rule(seed=2)
    rows, train_answers = [], set()
    for i in range(60):
        q, a = f"What causes condition {i} ?", f"Condition {i} is caused by factor {i % 7}."
        rows.append({"question": q, "answer": a})
    # The split of a jsonl record is decided by its rendered text, as in medgpt prepare.
    text = lambda r: clean_text(f"Question: {r['question']}\nAnswer: {r['answer']}")  # noqa: E731
    split = {r["question"]: split_of(text(r), rule.seed, rule.val_fraction) for r in rows}
    train = [r for r in rows if split[r["question"]] == "train"]
    held = [r for r in rows if split[r["question"]] == "val"]
    assert len(train) > 5 and len(held) > 5
    # Held-out records repeating a training question, and a training answer.
    for make in (
        lambda k: {"question": train[0]["question"], "answer": f"A new answer, take {k}."},
        lambda k: {"question": f"A new question, take {k} ?", "answer": train[1]["answer"]},
    ):
        k = 0
        while split_of(text(make(k)), rule.seed, rule.val_fraction) != "val":
            k += 1
        rows.append(make(k))
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = SourceSpec(uri=str(path), question_field="question", answer_field="answer")
    bench = build_benchmark("medquad-mc", [spec], rule, BenchmarkConfig())
    train_answers = {r["answer"] for r in train}
    train_questions = {r["question"] for r in train}
    for it in bench.items:
        assert it.question not in train_questions
        assert not set(it.choices) & train_answers
    held_q = {r["question"] for r in held}
    assert {it.question for it in bench.items} == held_q  # the repeats are left out
    assert bench.description["left_out_shared_with_training"] == 2
    assert all(it.qtype is None for it in bench.items)  # untyped: distractors from any answer


@pytest.mark.slow
def test_real_medquad_items_match_the_prepared_split(tmp_path) -> None:
    """On the real MedQuAD sample: the items are exactly the held-out pairs of a dataset
    prepared from it (read back from its shards), minus those sharing a question or answer
    with its train split; no option is a training answer."""
    if not MEDQUAD.is_dir():
        pytest.skip(f"real MedQuAD sample not found at {MEDQUAD}")
    from medgpt.evaluation import prepared_documents

    data = tmp_path / "medquad"
    prepare(PrepareConfig(sources=[str(MEDQUAD)], out=str(data)), progress=False)
    enc = get_tokenizer()

    def pairs(split: str) -> list[tuple[str, str]]:
        out = []
        for _, toks in prepared_documents(data, split).documents:
            text = enc.decode(toks[1:].tolist())
            q, _, a = text.removeprefix("Question: ").partition("\nAnswer: ")
            out.append((q, a))
        return out

    train, val = pairs("train"), pairs("val")
    from medgpt.data.loader import read_manifest

    rule = SplitRule.from_manifest(read_manifest(data), data, "test")
    bench = _build(MEDQUAD, rule, small_types="any")
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    train_q, train_a = {norm(q) for q, _ in train}, {norm(a) for _, a in train}
    expected = {q for q, a in val if norm(q) not in train_q and norm(a) not in train_a}
    assert {it.question for it in bench.items} == expected
    cut = {cut_option(enc, a, 64)[0]: a for _, a in val}
    for it in bench.items:
        for c in it.choices:
            assert c in cut and norm(cut[c]) not in train_a
    d = bench.description
    assert d["items"] == len(bench.items) > 400
    assert d["held_out_pairs"] == len(val)
    assert {"GARD", "GHR", "CancerGov"} <= {it.source for it in bench.items}
    assert {"symptoms", "treatment", "causes"} <= set(d["items_per_type"])
    print(f"real MedQuAD: {d['items']} items from {d['held_out_pairs']} held-out pairs")


def test_small_question_types(tmp_path) -> None:
    """A type with too few held-out answers for K distractors: an error naming the type and
    its count by default; 'any' widens its pool, 'skip' leaves its questions out."""
    src = medquad_folder(tmp_path / "mq", types=("symptoms", "treatment"))
    rng = random.Random(1)
    rare = tmp_path / "mq" / "1_GARD_QA" / "rare.xml"  # two 'stages' answers in all
    rare.write_text(_xml("GARD", "rare", [("stages", "What are the stages of X ?",
                                           _answer(rng, "X", "stages"))]))  # fmt: skip
    (tmp_path / "mq" / "1_GARD_QA" / "rare2.xml").write_text(
        _xml(
            "GARD", "rare2", [("stages", "What are the stages of Y ?", _answer(rng, "Y", "stages"))]
        )
    )
    rule = _rule(val_fraction=0.999)  # everything held out
    with pytest.raises(DataError) as e:
        _build(src, rule)
    msg = str(e.value)
    assert "'stages' (2 held-out answers, 2 of its questions short)" in msg
    assert "--small-types any" in msg and "\n" not in msg
    wide = _build(src, rule, small_types="any")
    assert wide.description["types_widened_to_any_answer"] == {"stages": 2}
    staged = [it for it in wide.items if it.qtype == "stages"]
    assert len(staged) == 2 and all(len(set(it.choices)) == 4 for it in staged)
    skipped = _build(src, rule, small_types="skip")
    assert skipped.description["types_skipped"] == {"stages": 2}
    assert len(skipped.items) == len(wide.items) - 2
    assert _build(src, rule, distractors=1).description["items_per_type"]["stages"] == 2


def test_too_few_answers_overall_and_bad_settings(tmp_path) -> None:
    src = medquad_folder(tmp_path / "mq", diseases=DISEASES[:3], types=("symptoms",))
    with pytest.raises(DataError, match="only 3 distinct held-out answers"):
        _build(src, _rule(val_fraction=0.999), small_types="any")
    with pytest.raises(ConfigError, match=r"distractors: must be >= 1"):
        BenchmarkConfig(distractors=0)
    with pytest.raises(ConfigError, match="small_types: 'some' \\(allowed: error, any, skip\\)"):
        BenchmarkConfig(small_types="some")


def test_cut_option_stays_on_token_boundaries() -> None:
    enc = get_tokenizer()
    for text in ("Short.", "A " * 200, "Fièvre café naïve " * 40, "数据" * 100, "x\n\ny " * 80):
        opt, toks = cut_option(enc, text.strip(), 16)
        assert 1 <= len(toks) <= 16 or len(enc.encode_ordinary(" " + text.strip())) <= 16
        assert enc.encode_ordinary(" " + opt) == toks
        assert text.strip().startswith(opt)


# --- scoring -------------------------------------------------------------------------------------


def _direct(model: GPT, prompt: str, option: str) -> float:
    """Summed log-probabilities of the option's tokens, one plain forward pass, the sequence
    cut from the left to the model's context."""
    enc = get_tokenizer()
    ctx, cont = enc.encode_ordinary(prompt), enc.encode_ordinary(" " + option)
    seq = torch.tensor([*ctx, *cont][-(model.config.block_size + 1) :])
    with torch.no_grad():
        logits, _ = model(seq[None, :-1])
    logp = torch.log_softmax(logits[0].double(), -1)
    n = len(cont)
    targets = seq[-n:]
    return float(logp[torch.arange(len(seq) - 1 - n, len(seq) - 1), targets].sum())


@pytest.mark.parametrize(("block", "batch_tokens"), [(64, 8192), (64, 1), (24, 100)])
def test_loglikelihoods_equal_a_direct_forward_pass(qa, block, batch_tokens) -> None:
    bench = _build(qa["src"], answer_tokens=12)
    bench.items = bench.items[:6]
    model = _model(block, seed=3)
    got = loglikelihoods(model, bench, torch.device("cpu"), batch_tokens, head_chunk=7)
    for it, ll in zip(bench.items, got, strict=True):
        want = [_direct(model, it.prompt, c) for c in it.choices]
        assert ll == pytest.approx(want, abs=1e-4)
    if block == 24:  # prompt + option exceed the context: the prompt lost tokens on the left
        enc = get_tokenizer()
        assert len(enc.encode_ordinary(bench.items[0].prompt)) + 12 > 24


def _favouring(token: int, seed: int = 0) -> GPT:
    """A model whose every position predicts ``token`` almost surely: the final LayerNorm
    outputs a constant vector that only ``token``'s embedding points along."""
    model = _model(64, seed)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        v = torch.zeros(32)
        v[0] = 1.0
        model.transformer.ln_f.bias.copy_(v)
        wte = model.transformer.wte.weight
        wte[:, 0] = 0.0
        wte[token, 0] = 40.0
    return model


def test_a_model_that_knows_the_answer_scores_1_and_one_that_prefers_a_distractor_0() -> None:
    enc = get_tokenizer()
    fav = enc.encode_ordinary(" fever")[0]
    items, continuations = [], {}
    for i in range(12):
        gold_text = " ".join(["fever"] * (3 + i % 3))
        wrong = [f"cough cough cough cough {i}{j}" for j in range(3)]
        choices = wrong[:]
        choices.insert(i % 4, gold_text)
        items.append(Item(f"i{i}", "S", "symptoms", f"Q{i} ?", tuple(choices), i % 4))
        for c in choices:
            continuations[c] = enc.encode_ordinary(" " + c)
    cfg = BenchmarkConfig(answer_tokens=16)
    bench = Benchmark("medquad-mc", cfg, items, {"items_hash": "x"}, continuations,
                      np.zeros(N_VOCAB, dtype=np.int64))  # fmt: skip
    lls = loglikelihoods(_favouring(fav), bench, torch.device("cpu"))
    r = accuracies(bench, lls)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0 and r["items"] == 12
    assert r["per_type"]["symptoms"]["acc"] == 1.0
    cough = enc.encode_ordinary(" cough")[0]
    r = accuracies(bench, loglikelihoods(_favouring(cough), bench, torch.device("cpu")))
    assert r["acc"] == 0.0 and r["acc_norm"] == 0.0
    # The unigram baseline with counts that favour the answer's token.
    counts = np.ones(N_VOCAB, dtype=np.int64)
    counts[fav] = 10**6
    assert accuracies(bench, unigram_loglikelihoods(bench, counts))["acc"] == 1.0


def test_a_model_with_another_tokenizer_is_refused() -> None:
    from medgpt.benchmark import check_tokenizer

    check_tokenizer("medquad-mc", "m", "gpt2", N_VOCAB)
    with pytest.raises(DataError, match=r"model uses tokenizer 'cl100k_base'.*task medquad-mc"):
        check_tokenizer("medquad-mc", "m", "cl100k_base", 100_277)
    with pytest.raises(DataError, match="with 1000 ids"):
        check_tokenizer("medquad-mc", "m", "gpt2", 1000)


def test_acc_norm_is_per_character_and_ties_go_first() -> None:
    items = [
        Item("a", "S1", "t", "q", ("x", "yyyyyyyy"), 0),  # acc picks 0, acc_norm picks 1
        Item("b", "S2", None, "q", ("x", "y"), 1),  # a tie: both pick 0
    ]
    bench = Benchmark("medquad-mc", BenchmarkConfig(distractors=1), items, {}, {}, np.zeros(1))
    r = accuracies(bench, [np.array([-2.0, -3.0]), np.array([-1.0, -1.0])])
    assert r["acc"] == 0.5 and r["acc_norm"] == 0.0
    assert r["per_source"]["S1"]["acc"] == 1.0 and r["per_type"]["(untyped)"]["acc"] == 0.0
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))
    assert bench.chance == 0.5


# --- medgpt evaluate --task -------------------------------------------------------------------------


def test_evaluate_with_the_task_report_gate_and_mlflow(qa, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    out = tmp_path / "rep"
    args = ["--checkpoint", qa["ckpt"], "--data", qa["data"], "--storage", store,
            "--task", "medquad-mc", "--answer-tokens", "16"]  # fmt: skip
    rc = _evaluate(*args, "--out", out, "--min-accuracy", "0", "--max-loss", "20", "--register")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads((out / "report.json").read_text())
    t = report["tasks"]["medquad-mc"]
    assert t["choices"] == 4 and t["chance"] == 0.25 and t["items"] > 20
    assert t["data"]["split"]["from"] == f"the model's training data {qa['data']}"
    assert t["data"]["split"]["seed"] == 5 and t["data"]["split"]["val_fraction"] == 0.5
    m = t["model"]
    assert 0 <= m["acc"] <= 1 and m["acc_ci95"][0] <= m["acc"] <= m["acc_ci95"][1]
    assert set(m["per_source"]) == {"GARD", "GHR"} and set(m["per_type"]) == set(TYPES)
    assert sum(v["items"] for v in m["per_type"].values()) == t["items"]
    u = t["unigram_baseline"]
    assert u["counts_from"].startswith("the train split of") and u["tokens"] > 100
    assert report["gate"]["passed"] is True and report["gate"]["accuracy"] == {
        "medquad-mc": m["acc_norm"]
    }
    assert f"PASS: loss {report['model']['loss']:.4f} <= 20.0; medquad-mc acc_norm" in printed
    md = (out / "report.md").read_text()
    assert "## medquad-mc" in md and "unigram baseline (no model)" in md and "chance (1/4)" in md
    assert "### medquad-mc per question type" in md and "\\nAnswer:" in md
    assert (out / "medquad_mc_per_source.png").read_bytes()[:4] == b"\x89PNG"

    # The same numbers through the API, without the report, and in MLflow.
    from medgpt.evaluation import score_checkpoints

    again = score_checkpoints([str(qa["ckpt"])], ["medquad-mc"], BenchmarkConfig(answer_tokens=16),
                              [str(qa["data"])], storage_path=str(store))  # fmt: skip
    assert again == [{"medquad_mc_acc": pytest.approx(m["acc"]),
                      "medquad_mc_acc_norm": pytest.approx(m["acc_norm"])}]  # fmt: skip
    client = MlflowClient(tracking_uri=report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["medquad_mc_acc"] == pytest.approx(m["acc"])
    assert run.data.metrics["medquad_mc_acc_norm"] == pytest.approx(m["acc_norm"])
    assert run.data.metrics["medquad_mc_chance"] == 0.25
    assert "medquad_mc_acc_norm.GARD" in run.data.metrics
    assert "medquad_mc_acc_norm.type.symptoms" in run.data.metrics
    assert run.data.tags["eval.tasks"] == "medquad-mc"
    registered = client.get_model_version("medgpt", report["registered"]["version"])
    assert float(registered.tags["medquad_mc_acc_norm"]) == pytest.approx(m["acc_norm"], abs=1e-6)

    # An accuracy the random model cannot reach: FAIL, exit 1.
    rc = _evaluate(*args, "--out", tmp_path / "fail", "--min-accuracy", "0.99", "--no-mlflow")
    assert rc == 1
    assert "FAIL: medquad-mc acc_norm" in capsys.readouterr().out


def test_export_lm_eval_task_matches_the_items(qa, tmp_path) -> None:
    out, export = tmp_path / "rep", tmp_path / "lm-eval"
    rc = _evaluate("--checkpoint", qa["ckpt"], "--data", qa["data"], "--no-mlflow", "--out", out,
                   "--task", "medquad-mc", "--choices", "3", "--answer-tokens", "16",
                   "--export-lm-eval", export)  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in export.iterdir()) == ["medquad_mc.jsonl", "medquad_mc.yaml"]
    cfg = yaml.safe_load((export / "medquad_mc.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["task"] == "medquad_mc"
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == (
        "query", "choices", "gold",
    )  # fmt: skip
    assert cfg["target_delimiter"] == " " and cfg["test_split"] == "test"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(export / "medquad_mc.jsonl")
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    docs = [json.loads(line) for line in (export / "medquad_mc.jsonl").read_text().splitlines()]
    bench = _build(qa["src"], distractors=2, answer_tokens=16)
    assert [d["id"] for d in docs] == [it.id for it in bench.items]
    for d, it in zip(docs, bench.items, strict=True):
        assert d["query"] == PROMPT.format(question=it.question) == it.prompt
        assert d["choices"] == list(it.choices) and d["gold"] == it.gold
    report = json.loads((out / "report.json").read_text())
    t = report["tasks"]["medquad-mc"]
    assert t["lm_eval_export"] == str(export) and t["choices"] == 3
    assert cfg["metadata"]["items_hash"] == t["data"]["items_hash"]
    # A second export replaces the first.
    assert export_lm_eval([bench], export) == export
    assert sorted(p.name for p in export.iterdir()) == ["medquad_mc.jsonl", "medquad_mc.yaml"]


# --- task files: frozen item sets ---------------------------------------------------------------


def _task_file(
    folder: Path,
    docs: list | None = None,
    lines: list[str] | None = None,
    text: str | None = None,
    extra: str = "",
    **keys,
) -> Path:
    """``folder/frozen.yaml`` over ``folder/frozen.jsonl`` in the shape medgpt exports; ``keys``
    replace the YAML's keys (None drops one), ``extra`` is YAML text added to them, ``lines``
    the jsonl's lines, ``text`` the whole YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    if docs is None:
        docs = [{"query": f"Question: q{i} ?\nAnswer:", "choices": [f"yes {i}", f"no {i}", "maybe"],
                 "gold": i % 3} for i in range(6)]  # fmt: skip
    if lines is None:
        lines = [json.dumps(d) for d in docs]
    (folder / "frozen.jsonl").write_text("".join(f"{line}\n" for line in lines))
    spec = {
        "task": "frozen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "frozen.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metadata": {"version": 1.0},
    }
    for k, v in keys.items():
        if v is None:
            spec.pop(k)
        else:
            spec[k] = v
    path = folder / "frozen.yaml"
    path.write_text(yaml.safe_dump(spec) + extra if text is None else text)
    return path


def test_frozen_export_scores_exactly_the_built_in_items(qa, tmp_path) -> None:
    """The round trip: the built-in task's export, scored as a task file on the same checkpoint,
    gives the same acc, acc_norm, baseline and breakdowns; the report records the file."""
    from medgpt import tracking
    from medgpt.evaluation import task_metrics

    export = tmp_path / "frozen"
    common = ["--checkpoint", qa["ckpt"], "--data", qa["data"], "--no-mlflow"]
    assert _evaluate(*common, "--out", tmp_path / "built", "--task", "medquad-mc",
                     "--answer-tokens", "16", "--export-lm-eval", export) == 0  # fmt: skip
    built = json.loads((tmp_path / "built" / "report.json").read_text())["tasks"]["medquad-mc"]
    task = export / "medquad_mc.yaml"
    out = tmp_path / "file"
    assert _evaluate(*common, "--out", out, "--task", task, "--min-accuracy", "0",
                     "--export-lm-eval", tmp_path / "again") == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["medquad_mc"]  # the YAML's task name
    frozen = report["tasks"]["medquad_mc"]
    for key in ("items", "choices", "chance"):
        assert frozen[key] == built[key]
    for key in ("acc", "acc_norm", "acc_ci95", "acc_norm_ci95"):
        assert frozen["model"][key] == built["model"][key]
        assert frozen["unigram_baseline"][key] == built["unigram_baseline"][key]
    for key in ("per_source", "per_type"):
        assert frozen["model"][key] == built["model"][key]
    d = frozen["data"]
    assert d["task_file"] == str(task)
    assert d["task_file_sha256"] == hashlib.sha256(task.read_bytes()).hexdigest()
    assert d["items_hash"] == built["data"]["items_hash"]  # the same items, byte for byte
    assert frozen["unigram_baseline"]["counts_from"] == f"the train split of {qa['data']}"
    assert report["gate"] == {"min_accuracy": 0.0, "accuracy_metric": "acc_norm",
                              "accuracy": {"medquad_mc": frozen["model"]["acc_norm"]},
                              "passed": True}  # fmt: skip
    md = (out / "report.md").read_text()
    assert "## medquad_mc: multiple choice on the frozen items of" in md and "chance (1/4)" in md
    assert (out / "medquad_mc_per_source.png").is_file()
    metrics = task_metrics("medquad_mc", frozen, tracking.metric_key)
    assert metrics["medquad_mc_acc_norm"] == frozen["model"]["acc_norm"]
    assert "medquad_mc_unigram_acc_norm" in metrics and "medquad_mc_acc_norm.GARD" in metrics
    # A re-export of a task file writes its items again, unchanged.
    again = tmp_path / "again" / "medquad_mc.jsonl"
    assert again.read_text() == (export / "medquad_mc.jsonl").read_text()


def test_task_file_without_a_prepared_dataset(qa, tmp_path, capsys) -> None:
    """Docs without id/source/qtype, choices of different numbers: chance is the mean of
    1/choices; without the model's prepared dataset the unigram baseline is absent."""
    from medgpt.evaluation import score_checkpoints, task_metrics

    docs = [{"query": f"Question: q{i} ?\nAnswer:", "gold": i % 2,
             "choices": [f"a{i}", f"b{i}", "c", "d"][: 2 + i % 3]} for i in range(9)]  # fmt: skip
    task = _task_file(tmp_path / "task", docs=docs)
    ck = save_checkpoint(tmp_path / "bare", _model(64), {"step": 1})
    notes = tmp_path / "notes.txt"
    notes.write_text("Fever and cough are common symptoms of a cold.")
    out = tmp_path / "rep"
    assert _evaluate("--checkpoint", ck, "--data", notes, "--no-mlflow", "--out", out,
                     "--task", task, "--min-accuracy", "0") == 0  # fmt: skip
    printed = capsys.readouterr().out
    t = json.loads((out / "report.json").read_text())["tasks"]["frozen"]
    assert t["unigram_baseline"] is None and "no unigram baseline" in printed
    assert t["choices"] is None and t["choices_range"] == [2, 4] and "2-4 choices" in printed
    assert t["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert list(t["model"]["per_source"]) == [NO_SOURCE] and list(t["model"]["per_type"]) == [
        "(untyped)"
    ]
    assert t["data"]["metadata"] == {"version": 1.0}
    md = (out / "report.md").read_text()
    assert "no unigram baseline" in md and "chance (mean of 1/choices)" in md
    metrics = task_metrics("frozen", t)
    assert "frozen_acc_norm" in metrics and not any("unigram" in k for k in metrics)
    # How a sweep ranks trials by a task: the same items, the same accuracies.
    got = score_checkpoints([str(ck)], [str(task)], BenchmarkConfig(), [str(notes)],
                            storage_path=str(tmp_path / "store"))  # fmt: skip
    assert got == [{"frozen_acc": pytest.approx(t["model"]["acc"]),
                    "frozen_acc_norm": pytest.approx(t["model"]["acc_norm"])}]  # fmt: skip


def test_task_file_fields_splits_and_paths(tmp_path, monkeypatch) -> None:
    """Fields bare or as {{field}}, a literal list of choices, the validation split, a data file
    found beside the YAML or else from the working directory, a .json array, blank lines; ids
    are line numbers where the docs have none; the same file twice is one task."""
    lines = [json.dumps({"prompt": "Is it?", "label": 1, "id": "x1", "source": "S", "qtype": "t"}),
             "", json.dumps({"prompt": "Was it?", "label": 0})]  # fmt: skip
    task = _task_file(tmp_path / "a", lines=lines, doc_to_text="{{ prompt }}",
                      doc_to_choice=["yes", "no"], doc_to_target="{{label}}", test_split=None,
                      validation_split="validation",
                      dataset_kwargs={"data_files": {"validation": "frozen.jsonl"}})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    bench = load_task_file(task)
    assert [(it.id, it.source, it.qtype, it.prompt, it.choices, it.gold) for it in bench.items] == [
        ("x1", "S", "t", "Is it?", ("yes", "no"), 1),
        ("3", NO_SOURCE, None, "Was it?", ("yes", "no"), 0),
    ]
    enc = get_tokenizer()
    assert bench.continuations == {c: enc.encode_ordinary(" " + c) for c in ("yes", "no")}
    assert bench.chance == 0.5 and bench.description["lm_eval_split"] == "validation"
    # A relative data file not beside the YAML: from the working directory.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.json").write_text(json.dumps(
        [{"query": "Q?", "choices": ["x", "y", "z"], "gold": 2}]))  # fmt: skip
    other = _task_file(tmp_path / "b", dataset_kwargs={"data_files": {"test": "docs/d.json"}})
    bench = load_task_file(other)
    assert bench.description["data_file"] == str(tmp_path / "docs" / "d.json")
    assert [(it.id, it.gold) for it in bench.items] == [("1", 2)]
    assert check_tasks([str(task), str(tmp_path / "a" / "." / "frozen.yaml"), "medquad-mc"]) == [
        str(task), "medquad-mc",
    ]  # fmt: skip


def test_default_qa_source_from_the_manifest_and_raw_qa_data(qa, tmp_path) -> None:
    # A checkpoint without training data: the task uses --data's manifest and its sources.
    ck = save_checkpoint(tmp_path / "bare", _model(64), {"step": 1})
    out = tmp_path / "a"
    assert _evaluate("--checkpoint", ck, "--data", qa["data"], "--no-mlflow", "--out", out,
                     "--task", "medquad-mc", "--answer-tokens", "16") == 0  # fmt: skip
    t = json.loads((out / "report.json").read_text())["tasks"]["medquad-mc"]
    assert t["data"]["split"]["from"] == f"the evaluation data {qa['data']}"
    assert t["data"]["sources"] == [str(qa["src"])]
    # Raw data and a jsonl QA file: prepare's default split; counts from its own train split.
    notes = tmp_path / "notes.txt"
    notes.write_text("Fever and cough are common symptoms of a cold.")
    rows = [{"question": f"What is item {i} ?", "answer": f"Item {i} is thing {i * 7}.",
             "qtype": ("a", "b")[i % 2]} for i in range(400)]  # fmt: skip
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "b"
    assert _evaluate("--checkpoint", ck, "--data", notes, "--no-mlflow", "--out", out,
                     "--task", "medquad-mc", "--qa-data", path, "--answer-tokens", "16",
                     "--qa-question-field", "question") == 0  # fmt: skip
    t = json.loads((out / "report.json").read_text())["tasks"]["medquad-mc"]
    assert t["data"]["split"]["seed"] == 1337 and "defaults" in t["data"]["split"]["from"]
    assert set(t["model"]["per_type"]) == {"a", "b"}
    assert t["unigram_baseline"]["counts_from"].startswith("the training-split documents")
    assert 0 < t["items"] < 400 * 0.2


def _qa_missing_fields(tmp: Path) -> list[str]:
    p = tmp / "bad.jsonl"
    p.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    return ["--qa-data", str(p)]


def _other_tokenizer(tmp: Path) -> list[str]:
    ck = save_checkpoint(tmp / "other-tok", _model(64), {"step": 1})
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "tokenizer": "cl100k_base"}))
    return ["--checkpoint", str(ck)]


def _file_task(**kw) -> Callable[[Path], list[str]]:
    """A BAD case: ``--task`` naming a task file written with ``kw`` (see _task_file)."""
    return lambda t: ["--task", str(_task_file(t / "task", **kw))]


def _two_files_one_name(tmp: Path) -> list[str]:
    return ["--task", str(_task_file(tmp / "a")), "--task", str(_task_file(tmp / "b"))]


def _busy_export(tmp: Path) -> list[str]:
    (tmp / "busy").mkdir()
    (tmp / "busy" / "mine.txt").write_text("x")
    return ["--export-lm-eval", str(tmp / "busy")]


BAD = {
    "unknown task": (lambda t: ["--task", "pubmedqa"], "unknown task 'pubmedqa' (allowed: medquad-mc)"),
    "K < 1": (lambda t: ["--distractors", "0"], "distractors: must be >= 1"),
    "one choice": (lambda t: ["--choices", "1"], "--choices 1: must be >= 2"),
    "choices and distractors disagree": (
        lambda t: ["--choices", "3", "--distractors", "3"], "disagree",
    ),
    "QA file without the fields": (_qa_missing_fields, "no field 'question'"),
    "tokenizer differs": (_other_tokenizer, "tokenizer 'cl100k_base'"),
    "too few answers of a type": (
        lambda t: ["--distractors", "30"], "too few answers of a question type for 30",
    ),
    "budget beyond the context": (lambda t: ["--answer-tokens", "64"], "context of 64 tokens"),
    "export folder holds other files": (_busy_export, "is not an lm-eval task folder"),
    "min-accuracy out of range": (lambda t: ["--min-accuracy", "1.5"], "min_accuracy: must be"),
    "task file missing": (
        lambda t: ["--task", str(t / "nowhere.yml")], "nowhere.yml: not found",
    ),
    "task file not YAML": (_file_task(text="task: [frozen\n"), "frozen.yaml: not valid YAML"),
    "task file not a mapping": (_file_task(text="- a\n- b\n"), "frozen.yaml: expected a mapping"),
    "task file output_type": (
        _file_task(output_type="generate_until"),
        "output_type: 'generate_until': medgpt scores multiple-choice tasks (allowed: "
        "multiple_choice)",
    ),
    "task file without a key": (_file_task(doc_to_target=None), "frozen.yaml: no 'doc_to_target'"),
    "task file !function": (
        _file_task(extra="process_docs: !function u.docs\n"),
        "frozen.yaml: process_docs: not supported",
    ),
    "task file doc_to_text a !function": (
        _file_task(doc_to_text=None, extra="doc_to_text: !function u.text\n"),
        "doc_to_text: !function u.text: Python is not run; medgpt scores tasks whose fields name "
        "the prompt, the options and the gold index directly",
    ),
    "task file template": (
        _file_task(doc_to_text="Question: {{question}}\nAnswer:"),
        "frozen.yaml: doc_to_text: 'Question: {{question}}\\nAnswer:' (allowed: a field",
    ),
    "task file delimiter": (
        _file_task(target_delimiter="\n"), "target_delimiter: '\\n' (allowed: ' '",
    ),
    "task file fewshot": (_file_task(num_fewshot=5), "frozen.yaml: num_fewshot: not supported"),
    "task file data missing": (
        _file_task(dataset_kwargs={"data_files": {"test": "gone.jsonl"}}),
        "frozen.yaml: data file gone.jsonl not found",
    ),
    "task file csv data": (
        _file_task(dataset_kwargs={"data_files": {"test": "docs.csv"}}),
        "data_files.test: 'docs.csv' (allowed: a local .jsonl or .json file",
    ),
    "task file bad jsonl line": (
        _file_task(lines=['{"query": "Q", "choices": ["a", "b"], "gold": 0}', '{"query": ']),
        "frozen.jsonl: line 2: not valid JSON",
    ),
    "task file doc without the fields": (
        _file_task(docs=[{"query": "Q", "choices": ["a", "b"]}]),
        "frozen.jsonl: line 1: no field 'gold' (doc_to_target of frozen.yaml)",
    ),
    "task file one choice": (
        _file_task(docs=[{"query": "Q", "choices": ["a"], "gold": 0}]),
        "frozen.jsonl: line 1: choices: the choices must be a list of at least 2 distinct",
    ),
    "task file repeated choice": (
        _file_task(docs=[{"query": "Q", "choices": ["a", "a"], "gold": 0}]), "an option repeats",
    ),
    "task file gold out of range": (
        _file_task(docs=[{"query": "Q", "choices": ["a", "b"], "gold": 2}]),
        "line 1: gold: 2 (allowed: the index of the gold option, an integer from 0 to 1)",
    ),
    "task file gold not an integer": (
        _file_task(docs=[{"query": "Q", "choices": ["a", "b"], "gold": "1"}]), "gold: '1'",
    ),
    "task files with one name": (_two_files_one_name, "duplicate task name"),
    "task file named like the built-in": (
        lambda t: ["--task", "medquad-mc", "--task", str(_task_file(t / "x", task="medquad_mc"))],
        "gives the same metrics (medquad_mc_acc, ...)",
    ),
    "task file with an item option": (
        lambda t: [*_file_task()(t), "--distractors", "2"], "--distractors: only for the built-in",
    ),
    "task file option beyond the context": (
        _file_task(docs=[{"query": "Q", "choices": [" ".join(["a"] * 80), "b"], "gold": 0}]),
        "its longest option is 80 tokens and",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, qa, tmp_path, capsys) -> None:
    make, message = BAD[case]
    extra = make(tmp_path)
    task = [] if "--task" in extra else ["--task", "medquad-mc", "--answer-tokens", "16"]
    base = ["--checkpoint", str(qa["ckpt"])] if "--checkpoint" not in extra else []
    store = tmp_path / "store"
    rc = _evaluate(*base, "--data", qa["data"], "--storage", store, *task, *extra,
                   "--out", tmp_path / "report", "--max-loss", "100", "--register")  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("medgpt evaluate: error:") and message in err, err
    assert len(own_lines(err)) == 1 and "Traceback" not in err
    assert not (tmp_path / "report").exists()
    assert not list(store.rglob("model.safetensors"))  # nothing registered


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-accuracy", "0.3"], "--min-accuracy needs --task"),
        (["--qa-data", "x.jsonl"], "--qa-data: need --task"),
        (["--export-lm-eval", "dir"], "--export-lm-eval: need --task"),
        (["--register", "--task", "medquad-mc"], "--register needs --max-loss or --min-accuracy"),
    ],
)
def test_task_flags_without_a_task(flags, message, qa, tmp_path, capsys) -> None:
    rc = _evaluate("--checkpoint", qa["ckpt"], "--data", qa["data"], "--storage", tmp_path, *flags)
    assert rc == 2
    assert message in capsys.readouterr().err
