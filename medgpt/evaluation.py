"""Held-out evaluation and the readiness gate.

The loss is measured per document, the way the model is used: each document starts at its
end-of-text token and is scored at its full length, never running into its neighbours. A
document longer than the model's context is cut into windows of ``block_size`` tokens that
advance by ``stride``; each window scores only the targets no earlier window scored, so every
token is scored exactly once and, after the first window, with at least
``block_size - stride`` tokens of context. ``stride = 1`` gives every token the full context
(slowest); the default, half the context, is the usual trade-off.

The mean is over tokens (not documents or batches), accumulated in float64, so it does not
depend on batch size or order. Per-source figures come from the dataset's document index
(``medgpt prepare``) or from the reader of a raw source.

Tasks (``--task``, :mod:`medgpt.benchmark`) score the same models on benchmarks beside the loss:
``medquad-mc`` builds multiple-choice questions from the held-out question-answer pairs of the
model's training corpus (or ``--qa-data``), and an lm-eval task file (``--task FILE.yaml``)
scores a frozen item set as it is; the gate can require an accuracy (``--min-accuracy``, on
acc_norm) as well as, or instead of, a loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medgpt.benchmark import CPU_HEAD_CHUNK, Benchmark, BenchmarkConfig, SplitRule
from medgpt.checkpoint import resolve_device
from medgpt.config import ConfigError
from medgpt.errors import DataError
from medgpt.fsutil import staged_dir
from medgpt.model import GPT
from medgpt.tokenizer import EOT_ID, N_VOCAB, TOKENIZER_NAME

# Fixed prompts and seeds: sample completions of two evaluations are comparable.
SAMPLE_PROMPTS = (
    "Diabetes mellitus is",
    "What are the symptoms of asthma?",
    "Hypertension can be treated with",
    "Acute bronchitis",
)
SAMPLE_SEED = 1234


@dataclasses.dataclass
class EvalConfig:
    """How ``medgpt evaluate`` scores a model (see the module docstring)."""

    stride: int | None = None  # None = half the model's context
    batch_tokens: int = 8192  # padded tokens per forward pass
    head_chunk: int = 512  # rows per output-head matmul: bounds the logits to ~100 MB
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sample_tokens: int = 48
    samples: bool = True

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ConfigError(
                f"stride: must be >= 1 (or unset for half the context), got {self.stride}"
            )
        if self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens: must be >= 1, got {self.batch_tokens}")
        if self.head_chunk < 1:
            raise ConfigError(f"head_chunk: must be >= 1, got {self.head_chunk}")
        if self.sample_tokens < 1:
            raise ConfigError(f"sample_tokens: must be >= 1, got {self.sample_tokens}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} (allowed: auto, cpu, cuda, cuda:N)")


# ---------------------------------------------------------------------------------------------
# Windows


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs ``tokens[start:end]``, targets ``tokens[start + 1:end + 1]``; the last ``scored``
    targets count."""

    start: int
    end: int
    scored: int


def plan_windows(n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """Windows covering the targets 1..n_tokens-1 of a document exactly once."""
    if block_size < 1 or stride < 1:
        raise ValueError("block_size and stride must be >= 1")
    last = n_tokens - 1  # index of the last target
    if last < 1:
        return []
    if last <= block_size:
        return [Window(0, last, last)]
    stride = min(stride, block_size)
    windows = [Window(0, block_size, block_size)]
    done = block_size  # targets 1..done are scored
    while done < last:
        end = min(done + stride, last)
        windows.append(Window(end - block_size, end, end - done))
        done = end
    return windows


# ---------------------------------------------------------------------------------------------
# Documents


@dataclasses.dataclass
class EvalData:
    """Documents to score: (source name, tokens starting with EOT), plus what describes them."""

    description: dict[str, Any]
    documents: Iterable[tuple[str, np.ndarray]]
    total_targets: int | None = None  # for the progress bar, when known up front


def prepared_documents(data_dir: str | Path, split: str = "val") -> EvalData:
    """The documents of one split of a prepared dataset, memory-mapped."""
    from medgpt.data.loader import TokenShards
    from medgpt.data.prepare import INDEX_DTYPE

    shards = TokenShards(data_dir, split)
    manifest = shards.manifest
    info = manifest["splits"][split]
    index_path = Path(data_dir) / info["index"]["file"]
    if not index_path.is_file():
        raise DataError(f"{index_path}: document index listed in the manifest is missing")
    if index_path.stat().st_size != info["documents"] * INDEX_DTYPE.itemsize:
        raise DataError(
            f"{index_path}: wrong size for {info['documents']} documents; prepare again"
        )
    index = np.memmap(index_path, dtype=INDEX_DTYPE, mode="r") if info["documents"] else None
    names = manifest.get("sources") or []

    def docs() -> Iterator[tuple[str, np.ndarray]]:
        if index is None:
            return
        starts = [int(s) for s in index["start"]] + [shards.n_tokens]
        for i, sid in enumerate(index["source"]):
            a, b = starts[i], starts[i + 1]
            if not 0 <= a < b <= shards.n_tokens:
                raise DataError(f"{index_path}: document {i} spans [{a}, {b}); prepare again")
            name = names[int(sid)] if 0 <= int(sid) < len(names) else f"source-{int(sid)}"
            yield name, shards.read(a, b - a)

    return EvalData(
        description={
            "kind": "prepared",
            "path": str(Path(data_dir).resolve()),
            "split": split,
            "content_hash": manifest["content_hash"],
            "tokenizer": manifest.get("tokenizer", {}),
        },
        documents=docs(),
        total_targets=info["tokens"] - info["documents"],
    )


def source_documents(uris: list[str]) -> EvalData:
    """Documents read and tokenised on the fly from any source ``medgpt prepare`` accepts
    (cleaned the same way, duplicates kept; nothing is written anywhere)."""
    from medgpt.data.prepare import clean_text
    from medgpt.data.sources import SourceSpec, read_source
    from medgpt.tokenizer import get_tokenizer

    specs = [SourceSpec(uri=u) for u in uris]
    enc = get_tokenizer()
    digest = hashlib.sha256()
    description: dict[str, Any] = {
        "kind": "source",
        "sources": list(uris),
        "tokenizer": {"name": TOKENIZER_NAME, "n_vocab": N_VOCAB, "eot": EOT_ID},
    }

    def docs() -> Iterator[tuple[str, np.ndarray]]:
        for spec in specs:
            for doc in read_source(spec):
                text = clean_text(doc.text)
                if not text:
                    continue
                arr = np.array([EOT_ID, *enc.encode_ordinary(text)], dtype=np.int64)
                digest.update(arr.astype("<u2").tobytes())
                yield doc.source, arr
        # Known only once everything was read: a hash of exactly the tokens scored.
        description["content_hash"] = digest.hexdigest()

    return EvalData(description=description, documents=docs())


def load_eval_data(data: list[str], split: str = "val") -> EvalData:
    """A prepared dataset folder (its ``split``), or one or more raw sources."""
    from medgpt.data.prepare import MANIFEST

    if not data:
        raise ConfigError("give the evaluation data: a prepared dataset folder or a source")
    prepared = [d for d in data if (Path(d) / MANIFEST).is_file()]
    if prepared:
        if len(data) > 1:
            raise ConfigError(
                f"{prepared[0]} is a prepared dataset: evaluate it alone (raw sources may be "
                "combined, prepared datasets may not)"
            )
        return prepared_documents(prepared[0], split)
    return source_documents(list(data))


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass
class SourceScore:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0
    documents: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": perplexity(self.loss),
            "tokens": self.tokens,
            "documents": self.documents,
        }


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@dataclasses.dataclass
class Scores:
    per_source: dict[str, SourceScore]
    seconds: float

    @property
    def total(self) -> SourceScore:
        t = SourceScore()
        for s in self.per_source.values():
            t.nll += s.nll
            t.tokens += s.tokens
            t.documents += s.documents
        return t


@torch.no_grad()
def score_documents(
    models: list[GPT],
    documents: Iterable[tuple[str, np.ndarray]],
    cfg: EvalConfig,
    device: torch.device,
    total_targets: int | None = None,
    progress: bool | None = None,
) -> list[Scores]:
    """Score every model on the same documents in one pass over the data (so raw sources are
    read and tokenised once). Returns one Scores per model."""
    for m in models:
        m.eval()
    results = [defaultdict(SourceScore) for _ in models]
    plans = [(m.config.block_size, cfg.stride or max(1, m.config.block_size // 2)) for m in models]
    seconds = [0.0] * len(models)
    bar = tqdm(
        total=total_targets,
        unit=" tok",
        unit_scale=True,
        desc="evaluating",
        disable=None if progress is None else not progress,
    )
    pending: list[tuple[str, np.ndarray]] = []
    pending_tokens = 0
    # Documents are gathered in groups of about 16 forward passes' worth, so windows of
    # similar length batch together (less padding) while memory stays bounded.
    group_tokens = 16 * cfg.batch_tokens

    def flush() -> None:
        nonlocal pending_tokens
        if not pending:
            return
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            _score_group(model, pending, plans[i], cfg, device, results[i])
            seconds[i] += time.perf_counter() - t0
        bar.update(sum(len(toks) - 1 for _, toks in pending))
        pending.clear()
        pending_tokens = 0

    try:
        for source, toks in documents:
            if len(toks) < 2:
                continue  # a document with no text after its EOT has nothing to score
            if int(toks.max()) >= min(m.config.vocab_size for m in models):
                raise DataError(
                    f"token id {int(toks.max())} is outside the model's vocabulary "
                    f"({min(m.config.vocab_size for m in models)} ids): data and model use "
                    "different tokenizers"
                )
            pending.append((source, toks))
            pending_tokens += len(toks)
            if pending_tokens >= group_tokens:
                flush()
        flush()
    finally:
        bar.close()
    return [Scores(dict(sorted(r.items())), s) for r, s in zip(results, seconds, strict=True)]


def _score_group(
    model: GPT,
    docs: list[tuple[str, np.ndarray]],
    plan: tuple[int, int],
    cfg: EvalConfig,
    device: torch.device,
    out: dict[str, SourceScore],
) -> None:
    block_size, stride = plan
    items: list[tuple[int, Window]] = []  # (document number, window)
    for d, (source, toks) in enumerate(docs):
        out[source].documents += 1
        items.extend((d, w) for w in plan_windows(len(toks), block_size, stride))
    items.sort(key=lambda it: it[1].end - it[1].start, reverse=True)
    batch: list[tuple[int, Window]] = []
    for item in items:
        longest = batch[0][1].end - batch[0][1].start if batch else item[1].end - item[1].start
        if batch and (len(batch) + 1) * longest > cfg.batch_tokens:
            _score_batch(model, docs, batch, cfg, device, out)
            batch = []
        batch.append(item)
    if batch:
        _score_batch(model, docs, batch, cfg, device, out)


def _score_batch(
    model: GPT,
    docs: list[tuple[str, np.ndarray]],
    batch: list[tuple[int, Window]],
    cfg: EvalConfig,
    device: torch.device,
    out: dict[str, SourceScore],
) -> None:
    T = max(w.end - w.start for _, w in batch)
    x = np.zeros((len(batch), T), dtype=np.int64)  # right padding: causal attention ignores it
    y = np.full((len(batch), T), -1, dtype=np.int64)
    for r, (d, w) in enumerate(batch):
        toks = docs[d][1]
        n = w.end - w.start
        x[r, :n] = toks[w.start : w.end]
        y[r, n - w.scored : n] = toks[w.end - w.scored + 1 : w.end + 1]
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    hidden = model.features(xt)
    rows, cols = torch.nonzero(yt >= 0, as_tuple=True)
    nll = torch.empty(len(rows), dtype=torch.float64, device=device)
    # On a CPU, chunks of at most CPU_HEAD_CHUNK rows: several times faster (benchmark.py).
    chunk = min(cfg.head_chunk, CPU_HEAD_CHUNK) if device.type == "cpu" else cfg.head_chunk
    for a in range(0, len(rows), chunk):
        r, c = rows[a : a + chunk], cols[a : a + chunk]
        logits = model.lm_head(hidden[r, c]).float()
        nll[a : a + len(r)] = F.cross_entropy(logits, yt[r, c], reduction="none").double()
    per_row = torch.zeros(len(batch), dtype=torch.float64, device=device)
    per_row.index_add_(0, rows, nll)
    for r, value in enumerate(per_row.tolist()):
        d, w = batch[r]
        score = out[docs[d][0]]
        score.nll += value
        score.tokens += w.scored


def sample_completions(model: GPT, max_new_tokens: int) -> list[dict[str, Any]]:
    from medgpt.generation import complete

    return [
        {
            "prompt": p,
            "seed": SAMPLE_SEED + i,
            "completion": complete(model, p, max_new_tokens, 0.8, 40, SAMPLE_SEED + i),
        }
        for i, p in enumerate(SAMPLE_PROMPTS)
    ]


# ---------------------------------------------------------------------------------------------
# The job: resolve, score, report, record, gate, register


@dataclasses.dataclass
class GateRequest:
    """Everything ``medgpt evaluate`` was asked to do."""

    checkpoint: str
    data: list[str]
    split: str = "val"
    baselines: list[str] = dataclasses.field(default_factory=list)
    max_loss: float | None = None
    register: bool = False
    model_name: str = "medgpt"
    alias: str = "champion"
    out: str | None = None  # report folder; default <storage>/evaluations/<label>-<time>
    storage_path: str = "runs"  # where the default MLflow store, reports and downloads live
    tracking_uri: str | None = None
    experiment: str = "medgpt-evaluation"  # for evaluations of checkpoints without a run
    mlflow: bool = True
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    tasks: list[str] = dataclasses.field(default_factory=list)  # benchmarks: medgpt.benchmark
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    min_accuracy: float | None = None  # the gate on every task's acc_norm
    export_lm_eval: str | None = None  # folder for the tasks' items as lm-eval tasks

    def __post_init__(self) -> None:
        from medgpt.benchmark import check_tasks
        from medgpt.data.prepare import SPLITS

        if self.split not in SPLITS:
            raise ConfigError(f"split: {self.split!r} (allowed: {', '.join(SPLITS)})")
        if self.max_loss is not None and not (self.max_loss > 0 and math.isfinite(self.max_loss)):
            raise ConfigError(f"max_loss: must be a positive number of nats, got {self.max_loss}")
        self.tasks = check_tasks(self.tasks)
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ConfigError(
                f"min_accuracy: must be a fraction in [0, 1], got {self.min_accuracy}"
            )
        if self.min_accuracy is not None and not self.tasks:
            raise ConfigError("--min-accuracy needs --task: the accuracy of which benchmark?")
        if self.export_lm_eval is not None and not self.tasks:
            raise ConfigError("--export-lm-eval needs --task: the items of which benchmark?")
        if self.register and self.max_loss is None and self.min_accuracy is None:
            raise ConfigError(
                "--register needs --max-loss or --min-accuracy: only a model that passed the "
                "gate is registered"
            )
        if self.register and not self.mlflow:
            raise ConfigError("--register needs MLflow (drop --no-mlflow)")
        for field, value in (("model_name", self.model_name), ("alias", self.alias)):
            if not value or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", value):
                raise ConfigError(
                    f"{field}: {value!r} (allowed: letters, digits, '_', '.', '-'; "
                    "starting with a letter or digit)"
                )
        if re.fullmatch(r"v\d+|latest", self.alias):
            raise ConfigError(f"alias: {self.alias!r} is reserved by MLflow (use e.g. champion)")


@dataclasses.dataclass
class Candidate:
    """A model to score, where it came from, and what is known about its training."""

    label: str
    spec: str
    path: Path
    model: GPT
    kind: str  # medgpt-checkpoint | hf-gpt2
    meta: dict[str, Any]
    tokenizer: str
    registry: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        from medgpt.model import count_params

        return {
            "label": self.label,
            "spec": self.spec,
            "path": str(self.path),
            "kind": self.kind,
            "step": self.meta.get("step"),
            "train_val_loss": self.meta.get("val_loss"),
            "mlflow_run_id": self.meta.get("mlflow_run_id"),
            "data_manifest_hash": self.meta.get("data_manifest_hash"),
            "params": count_params(self.model.config, non_embedding=False),
            "block_size": self.model.config.block_size,
            "registry": self.registry,
        }


def load_candidate(
    label: str, spec: str, uri: str, cache_dir: Path, device: torch.device
) -> Candidate:
    from medgpt.checkpoint import is_checkpoint, load_model, read_config, read_meta
    from medgpt.hf import load_hf_gpt2
    from medgpt.registry import resolve_checkpoint

    path, registry = resolve_checkpoint(spec, uri, cache_dir)
    if is_checkpoint(path):
        _, raw = read_config(path)
        model = load_model(path, device=device)
        return Candidate(
            label,
            spec,
            path,
            model,
            "medgpt-checkpoint",
            read_meta(path),
            str(raw.get("tokenizer")),
            registry,
        )
    # An HF GPT-2 folder: the tokenizer is GPT-2's by construction of load_hf_gpt2's checks.
    model = load_hf_gpt2(path).to(device)
    return Candidate(label, spec, path, model, "hf-gpt2", {}, TOKENIZER_NAME, registry)


def check_compatible(c: Candidate, data: EvalData) -> None:
    tok = data.description.get("tokenizer", {})
    if c.tokenizer != tok.get("name") or int(tok.get("n_vocab", 0)) > c.model.config.vocab_size:
        raise DataError(
            f"{c.spec}: model uses tokenizer {c.tokenizer!r} with {c.model.config.vocab_size} ids, "
            f"the data was tokenized with {tok.get('name')!r} ({tok.get('n_vocab')} ids); "
            "evaluate on data prepared for this model"
        )


# ---------------------------------------------------------------------------------------------
# Tasks: the benchmarks of medgpt.benchmark, scored beside the loss


@dataclasses.dataclass
class PreparedTask:
    """A task's items, with the token counts of its model-free unigram baseline (None: no
    baseline, for a task file scored without the model's prepared dataset)."""

    bench: Benchmark
    counts: np.ndarray | None
    counts_from: str | None
    counted_tokens: int


def split_rule_for(model: Candidate, data: EvalData) -> SplitRule:
    """How the model's training corpus was split into train and validation: the manifest of
    the dataset its checkpoint was trained on (when it is here and its hash matches the
    checkpoint's), else that of ``--data`` when it is a prepared dataset, else prepare's
    defaults. Which one was used goes into the report."""
    from medgpt.data.loader import read_manifest
    from medgpt.data.prepare import MANIFEST

    trained_on = model.meta.get("data_dir")
    if trained_on and (Path(trained_on) / MANIFEST).is_file():
        try:
            manifest = read_manifest(trained_on)
        except DataError:
            manifest = None
        wanted = model.meta.get("data_manifest_hash")
        if manifest is not None and wanted in (None, manifest.get("content_hash")):
            return SplitRule.from_manifest(
                manifest, trained_on, f"the model's training data {trained_on}"
            )
    if data.description.get("kind") == "prepared":
        path = data.description["path"]
        return SplitRule.from_manifest(read_manifest(path), path, f"the evaluation data {path}")
    return SplitRule.defaults()


def check_task_models(
    names: list[str],
    cfg: BenchmarkConfig,
    candidates: list[Candidate],
    files: Iterable[Benchmark] = (),
) -> None:
    """Every model can be scored on the tasks: GPT-2's tokenizer, room for an option (the
    budget of the built-in tasks, the longest option of each task file in ``files``)."""
    from medgpt.benchmark import check_tokenizer, is_task_file

    for name in names:
        for c in candidates:
            check_tokenizer(name, c.spec, c.tokenizer, c.model.config.vocab_size)
    for c in candidates:
        block = c.model.config.block_size
        if any(not is_task_file(n) for n in names) and cfg.answer_tokens >= block:
            raise ConfigError(
                f"--answer-tokens {cfg.answer_tokens}: {c.spec} has a context of {block} "
                "tokens; the option budget must be smaller"
            )
        for b in files:
            if b.config.answer_tokens >= block:
                raise ConfigError(
                    f"{b.task_file}: its longest option is {b.config.answer_tokens} tokens and "
                    f"{c.spec} has a context of {block}; every option must be shorter"
                )


def prepare_tasks(
    names: list[str],
    cfg: BenchmarkConfig,
    candidates: list[Candidate],
    data: EvalData,
    export: Path | None = None,
    log: Any = print,
) -> list[PreparedTask]:
    """Check the models against the tasks, then build each task's items and its baseline's
    counts: everything that can refuse the input happens here, before any scoring."""
    if not names:
        return []
    from medgpt.benchmark import (
        build_benchmark,
        check_export_dir,
        is_task_file,
        load_task_file,
        qa_sources,
        train_token_counts,
    )

    # A task file is its items: no QA source, no split rule, nothing drawn.
    files = {n: load_task_file(n) for n in names if is_task_file(n)}
    check_task_models(names, cfg, candidates, files.values())
    if export is not None:
        check_export_dir(export)
    rule = split_rule_for(candidates[0], data)
    counts: np.ndarray | None = None
    counted, counts_from = 0, ""
    if rule.data_dir is not None:
        counts, counted = train_token_counts(rule.data_dir)
        counts_from = f"the train split of {rule.data_dir}"
    out = []
    for name in names:
        if name in files:
            bench = files[name]
            log(f"{bench.task}: {len(bench.items):,} items of the task file {bench.task_file}")
            # Without the training split's counts there is no corpus to take a baseline from.
            out.append(PreparedTask(bench, counts, counts_from or None, counted))
            continue
        specs = qa_sources(rule, cfg, name)
        log(f"{name}: items from {', '.join(s.uri for s in specs)} (held out as in {rule.origin})")
        bench = build_benchmark(name, specs, rule, cfg, count_tokens=counts is None)
        if counts is None:
            own = bench.qa_train_counts
            out.append(
                PreparedTask(
                    bench,
                    own,
                    "the training-split documents of the question-answer sources",
                    int(own.sum()),
                )
            )
        else:
            out.append(PreparedTask(bench, counts, counts_from, counted))
    return out


def score_task(
    task: PreparedTask,
    candidates: list[Candidate],
    cfg: EvalConfig,
    device: torch.device,
    log: Any = print,
) -> dict[str, Any]:
    """A task's entry of report.json: every model's accuracies, the unigram baseline, chance."""
    from medgpt.benchmark import TASKS, accuracies, method, score_model, unigram_loglikelihoods

    b = task.bench
    sizes = [len(it.choices) for it in b.items]
    log(f"{b.task}: scoring {len(b.items):,} items x {choices_text(min(sizes), max(sizes))}")
    models = [
        {"label": c.label, "spec": c.spec, **score_model(c.model, b, device, cfg.batch_tokens,
                                                          cfg.head_chunk)}
        for c in candidates
    ]  # fmt: skip
    unigram = None
    if task.counts is not None:
        unigram = {
            "counts_from": task.counts_from,
            "tokens": task.counted_tokens,
            **accuracies(b, unigram_loglikelihoods(b, task.counts)),
        }
    return {
        "task": b.task,
        "about": TASKS[b.task]
        if b.task_file is None
        else f"multiple choice on the frozen items of {b.task_file}",
        "items": len(b.items),
        "choices": b.choices,  # None: a task file whose items have different numbers
        "choices_range": [min(sizes), max(sizes)],
        "chance": b.chance,
        "method": method(b),
        "data": b.description,
        "model": models[0],
        "baselines": models[1:],
        # None: a task file scored without the model's prepared dataset (no training counts).
        "unigram_baseline": unigram,
        "lm_eval_export": None,
    }


def decide_gate(
    max_loss: float | None,
    min_accuracy: float | None,
    loss: float,
    task_reports: dict[str, Any],
) -> dict[str, Any] | None:
    """report.json's ``gate``: every threshold given must hold (acc_norm of every task)."""
    if max_loss is None and min_accuracy is None:
        return None
    gate: dict[str, Any] = {}
    passed = True
    if max_loss is not None:
        gate.update(max_loss=max_loss, loss=loss)
        passed = passed and loss <= max_loss
    if min_accuracy is not None:
        accuracy = {t: r["model"]["acc_norm"] for t, r in task_reports.items()}
        gate.update(min_accuracy=min_accuracy, accuracy_metric="acc_norm", accuracy=accuracy)
        passed = passed and all(v >= min_accuracy for v in accuracy.values())
    gate["passed"] = passed
    return gate


def task_metrics(name: str, entry: dict[str, Any], key: Any = str) -> dict[str, float]:
    """A task's MLflow metrics: ``<task>_acc``, ``<task>_acc_norm`` (and its interval), the
    unigram baseline and chance, acc_norm per source, per question type and per baseline
    model. ``key`` makes a metric name of text (tracking.metric_key)."""
    from medgpt.benchmark import metric_prefix

    p = metric_prefix(name)
    m, u = entry["model"], entry["unigram_baseline"]
    out = {
        f"{p}_acc": m["acc"],
        f"{p}_acc_norm": m["acc_norm"],
        f"{p}_acc_norm_ci_low": m["acc_norm_ci95"][0],
        f"{p}_acc_norm_ci_high": m["acc_norm_ci95"][1],
        f"{p}_items": float(entry["items"]),
        f"{p}_chance": entry["chance"],
    }
    if u is not None:
        out.update({f"{p}_unigram_acc": u["acc"], f"{p}_unigram_acc_norm": u["acc_norm"]})
    for source, v in m["per_source"].items():
        out[key(f"{p}_acc_norm.{source}")] = v["acc_norm"]
    for qtype, v in m["per_type"].items():
        out[key(f"{p}_acc_norm.type.{qtype}")] = v["acc_norm"]
    for b in entry["baselines"]:
        out[key(f"{p}_acc_norm.{b['label']}")] = b["acc_norm"]
    return out


def score_checkpoints(
    checkpoints: list[str],
    tasks: list[str],
    cfg: BenchmarkConfig,
    data: list[str],
    eval_cfg: EvalConfig | None = None,
    storage_path: str = "runs",
    tracking_uri: str | None = None,
) -> list[dict[str, float]]:
    """Each checkpoint's ``<task>_acc`` and ``<task>_acc_norm`` on items built once (held out
    as in the first checkpoint's training data, ``data`` the fallback): how a sweep ranks its
    trials by a task. One model in memory at a time."""
    from medgpt import tracking
    from medgpt.benchmark import check_tasks, metric_prefix, score_model

    eval_cfg = eval_cfg or EvalConfig()
    tasks = check_tasks(tasks)
    storage = Path(storage_path).resolve()
    uri = tracking.tracking_uri_for(str(storage), tracking_uri)
    device = resolve_device(eval_cfg.device)
    ev = load_eval_data(data)
    prepared: list[PreparedTask] | None = None
    out = []
    for spec in checkpoints:
        c = load_candidate("model", spec, uri, storage / "downloads", device)
        if prepared is None:
            prepared = prepare_tasks(tasks, cfg, [c], ev, log=lambda *_: None)
        else:
            check_task_models(tasks, cfg, [c], [t.bench for t in prepared if t.bench.task_file])
        metrics: dict[str, float] = {}
        for t in prepared:
            s = score_model(c.model, t.bench, device, eval_cfg.batch_tokens, eval_cfg.head_chunk)
            p = metric_prefix(t.bench.task)
            metrics[f"{p}_acc"] = s["acc"]
            metrics[f"{p}_acc_norm"] = s["acc_norm"]
        out.append(metrics)
    return out


@dataclasses.dataclass(frozen=True)
class GateOutcome:
    """The gate's verdict: ``loss`` (nats/token) against ``max_loss`` and, with tasks, each
    task's acc_norm (``accuracy``, by task) against ``min_accuracy``; either may be absent."""

    passed: bool
    max_loss: float | None = None
    loss: float | None = None
    min_accuracy: float | None = None
    accuracy: dict[str, float] | None = None

    def conditions(self) -> list[tuple[str, bool]]:
        """Each threshold as text (``loss 4.5000 <= 5.0``) and whether it held."""
        out = []
        if self.max_loss is not None and self.loss is not None:
            ok = self.loss <= self.max_loss
            out.append((f"loss {self.loss:.4f} {'<=' if ok else '>'} {self.max_loss}", ok))
        if self.min_accuracy is not None:
            for task, acc in (self.accuracy or {}).items():
                ok = acc >= self.min_accuracy
                op = ">=" if ok else "<"
                out.append((f"{task} acc_norm {acc:.4f} {op} {self.min_accuracy}", ok))
        return out

    def summary(self) -> str:
        """``PASS: loss 4.5000 <= 5.0; medquad-mc acc_norm 0.3100 >= 0.3``."""
        return f"{'PASS' if self.passed else 'FAIL'}: " + "; ".join(c for c, _ in self.conditions())


@dataclasses.dataclass(frozen=True)
class ModelScore:
    """One scored model's headline numbers (the report's ``model`` or a ``baselines`` entry;
    the full entry, per-source scores and samples included, stays in the report's data)."""

    label: str
    spec: str
    path: str
    kind: str
    loss: float
    perplexity: float
    tokens: int
    documents: int


@dataclasses.dataclass(frozen=True)
class Registration:
    """The registry version a PASS became (or, ``reused``, already was) and the alias moved."""

    name: str
    version: str
    alias: str
    model_uri: str
    run_id: str
    reused: bool = False


@dataclasses.dataclass(frozen=True)
class MlflowRecord:
    """The MLflow run the evaluation was logged to (the checkpoint's training run if known)."""

    tracking_uri: str
    run_id: str
    training_run: bool


def _typed(cls: type, entry: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in entry.items() if k in names})


@dataclasses.dataclass
class GateReport:
    """What :func:`run_gate` did. ``data`` is report.json's content, unchanged (other tools
    read that file); the properties are typed views of it."""

    data: dict[str, Any]
    report_dir: str

    @property
    def gate(self) -> GateOutcome | None:
        g = self.data.get("gate")
        return None if g is None else _typed(GateOutcome, g)

    @property
    def passed(self) -> bool | None:
        """The verdict; None when no gate was asked for."""
        return None if self.gate is None else self.gate.passed

    @property
    def exit_status(self) -> int:
        """0 on PASS or without a gate, 1 on FAIL."""
        return 1 if self.passed is False else 0

    @property
    def model(self) -> ModelScore:
        return _typed(ModelScore, self.data["model"])

    @property
    def baselines(self) -> list[ModelScore]:
        return [_typed(ModelScore, b) for b in self.data["baselines"]]

    @property
    def mlflow(self) -> MlflowRecord | None:
        m = self.data.get("mlflow")
        return None if m is None else _typed(MlflowRecord, m)

    @property
    def registered(self) -> Registration | None:
        r = self.data.get("registered")
        return None if r is None else _typed(Registration, r)

    @property
    def markdown(self) -> Path:
        return Path(self.report_dir) / "report.md"

    @property
    def tasks(self) -> dict[str, Any]:
        """The tasks' entries of report.json, by task name (empty without ``--task``)."""
        return self.data.get("tasks") or {}


def run_gate(req: GateRequest, progress: bool | None = None, log: Any = print) -> GateReport:
    """Score, write the report, record it in MLflow, apply the gate, register on PASS.

    ``GateReport.passed`` decides the exit status."""
    from medgpt import preflight, registry, tracking

    storage = Path(req.storage_path).resolve()
    # Resolving models:/ and run references reads MLflow even when nothing is to be recorded.
    uri = tracking.tracking_uri_for(str(storage), req.tracking_uri)
    # Evaluation runs in this process: the checkpoint's storage and the server, from here.
    preflight.check_local(req.checkpoint if "://" in req.checkpoint else None, uri, write=False)
    cache = storage / "downloads"
    device = resolve_device(req.eval.device)
    data = load_eval_data(req.data, req.split)
    main = load_candidate("model", req.checkpoint, uri, cache, device)
    if req.register and main.kind != "medgpt-checkpoint":
        raise ConfigError(f"{req.checkpoint}: only medgpt checkpoints can be registered")
    candidates = [main] + [
        load_candidate(
            f"baseline {i + 1}" if len(req.baselines) > 1 else "baseline", b, uri, cache, device
        )
        for i, b in enumerate(req.baselines)
    ]
    for c in candidates:
        check_compatible(c, data)
    out = _report_dir(req, storage, main)
    _check_report_dir(out)  # before the work, not after it
    export = Path(req.export_lm_eval).resolve() if req.export_lm_eval else None
    tasks = prepare_tasks(req.tasks, req.benchmark, candidates, data, export, log)

    log(f"evaluating {main.path} on {describe_data(data.description)} ({device})")
    started = time.perf_counter()
    scores = score_documents(
        [c.model for c in candidates],
        data.documents,
        req.eval,
        device,
        data.total_targets,
        progress,
    )
    total = scores[0].total
    if total.tokens == 0:
        raise DataError(
            f"empty evaluation data: no tokens to score in {describe_data(data.description)}"
        )
    results = []
    for c, s in zip(candidates, scores, strict=True):
        t = s.total
        results.append(
            {
                **c.describe(),
                "loss": t.loss,
                "perplexity": perplexity(t.loss),
                "tokens": t.tokens,
                "documents": t.documents,
                "seconds": s.seconds,
                "tokens_per_s": t.tokens / s.seconds if s.seconds else None,
                "per_source": {k: v.as_dict() for k, v in s.per_source.items()},
                "samples": sample_completions(c.model, req.eval.sample_tokens)
                if req.eval.samples
                else [],
            }
        )
    task_reports = {t.bench.task: score_task(t, candidates, req.eval, device, log) for t in tasks}
    gate = decide_gate(req.max_loss, req.min_accuracy, total.loss, task_reports)
    report: dict[str, Any] = {
        "format": "medgpt-evaluation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data.description,
        "method": {
            "unit": "nats per token (mean over every scored token)",
            "stride": req.eval.stride,
            "batch_tokens": req.eval.batch_tokens,
            "device": str(device),
        },
        "model": results[0],
        "baselines": results[1:],
        "gate": gate,
        "registered": None,
        "mlflow": None,
        "seconds": time.perf_counter() - started,
    }
    if tasks:
        report["tasks"] = task_reports
    if export is not None:
        from medgpt.benchmark import export_lm_eval

        export_lm_eval([t.bench for t in tasks], export)
        for r in task_reports.values():
            r["lm_eval_export"] = str(export)
    write_report(report, out)

    if req.mlflow:
        run_id, is_training_run = tracking.evaluation_run(
            uri, main.meta.get("mlflow_run_id"), req.experiment, f"eval-{out.name}"
        )
        metrics = {
            "eval_loss": total.loss,
            "eval_perplexity": perplexity(total.loss),
            "eval_tokens": float(total.tokens),
        }
        for name, v in results[0]["per_source"].items():
            metrics[tracking.metric_key(f"eval_loss.{name}")] = v["loss"]
        for b in results[1:]:
            metrics[tracking.metric_key(f"eval_loss.{b['label']}")] = b["loss"]
        for name, r in task_reports.items():
            metrics.update(task_metrics(name, r, tracking.metric_key))
        tags = {"eval.checkpoint": str(main.path), "eval.data": describe_data(data.description)}
        if task_reports:
            tags["eval.tasks"] = ",".join(task_reports)
        if gate is not None:
            tags["eval.gate"] = "PASS" if gate["passed"] else "FAIL"
            if req.max_loss is not None:
                tags["eval.max_loss"] = str(req.max_loss)
            if req.min_accuracy is not None:
                tags["eval.min_accuracy"] = str(req.min_accuracy)
        report["mlflow"] = {"tracking_uri": uri, "run_id": run_id, "training_run": is_training_run}
        if gate is not None and gate["passed"] and req.register:
            report["registered"] = registry.register_checkpoint(
                uri,
                main.path,
                run_id,
                req.model_name,
                req.alias,
                tags={
                    **_version_tags(main, total.loss, data.description, task_reports),
                    **_gate_tags(req, run_id),
                },
            )
        write_report(report, out)
        tracking.log_evaluation(uri, run_id, metrics, tags, out)
    return GateReport(report, str(out))


def _gate_tags(req: GateRequest, run_id: str) -> dict[str, str]:
    """The passing gate record a version carries (what ``medgpt promote`` requires)."""
    from medgpt.registry import GATE_TAG

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {GATE_TAG: "PASS", "gate.run_id": run_id, "gate.time": stamp}
    if req.max_loss is not None:
        tags["gate.max_loss"] = str(req.max_loss)
    if req.min_accuracy is not None:
        tags["gate.min_accuracy"] = str(req.min_accuracy)
    return tags


def _version_tags(
    c: Candidate, loss: float, data: dict[str, Any], task_reports: dict[str, Any]
) -> dict[str, str]:
    from medgpt import tracking
    from medgpt.benchmark import metric_prefix

    tags = {
        **{
            f"{metric_prefix(t)}_acc_norm": f"{r['model']['acc_norm']:.6f}"
            for t, r in task_reports.items()
        },
        "eval_loss": f"{loss:.6f}",
        "eval_data": describe_data(data),
        "eval_data_hash": str(data.get("content_hash", "")),
        "val_loss": str(c.meta.get("val_loss", "")),
        "data_manifest_hash": str(c.meta.get("data_manifest_hash", "")),
        "training_run_id": str(c.meta.get("mlflow_run_id", "")),
        "step": str(c.meta.get("step", "")),
    }
    commit = tracking.git_commit()
    if commit:
        tags["git_commit"] = commit
    return {k: v for k, v in tags.items() if v}


def describe_data(d: dict[str, Any]) -> str:
    if d.get("kind") == "prepared":
        return f"{d['path']} ({d['split']} split)"
    return ", ".join(d.get("sources", []))


def _report_dir(req: GateRequest, storage: Path, c: Candidate) -> Path:
    if req.out:
        return Path(req.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{c.path.parent.name}-{c.path.name}")[:80]
    return storage / "evaluations" / f"{name}-{stamp}"


# ---------------------------------------------------------------------------------------------
# Report files

REPORT_FILES = ("report.json", "report.md", "per_source_loss.png")


def _check_report_dir(out: Path) -> None:
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())
    ):
        raise ConfigError(f"--out {out}: exists and is not an evaluation report folder")


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write report.json, report.md and per_source_loss.png (and a task's
    ``<task>_per_source.png``) into ``out`` atomically (a staging folder renamed into place; a
    previous report there is replaced)."""
    _check_report_dir(out)
    from medgpt.benchmark import metric_prefix

    with staged_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        per_source_png(report, tmp / "per_source_loss.png")
        for name in report.get("tasks") or {}:
            task_png(report, name, tmp / f"{metric_prefix(name)}_per_source.png")
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else "–"


def render_markdown(report: dict[str, Any]) -> str:
    models = [report["model"], *report["baselines"]]
    data = report["data"]
    lines = [
        f"# Evaluation of {report['model']['path']}",
        "",
        f"Data: {describe_data(data)} — {report['model']['documents']:,} documents, "
        f"{report['model']['tokens']:,} scored tokens, content hash "
        f"`{str(data.get('content_hash', ''))[:16]}`. Loss in nats per token, every token "
        "scored once.",
        "",
        "| model | loss | perplexity | step | params | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        lines.append(
            f"| {m['label']}: `{m['spec']}` | {_fmt(m['loss'])} | {_fmt(m['perplexity'], 2)} | "
            f"{m.get('step') if m.get('step') is not None else '–'} | {m['params']:,} | "
            f"{_fmt(m.get('tokens_per_s'), 0)} |"
        )
    gate = report.get("gate")
    if gate:
        outcome = _typed(GateOutcome, gate)
        verdict = "PASS" if outcome.passed else "FAIL"
        lines += ["", f"**Gate: {verdict}** — " + "; ".join(c for c, _ in outcome.conditions())]
    reg = report.get("registered")
    if reg:
        lines += ["", f"Registered as `{reg['model_uri']}`, alias `{reg['alias']}`."]
    lines += ["", "## Per source", ""]
    header = "| source | documents | tokens | " + " | ".join(f"loss ({m['label']})" for m in models)
    lines += [header + " |", "|---|---:|---:|" + "---:|" * len(models)]
    for name, s in report["model"]["per_source"].items():
        losses = " | ".join(_fmt(m["per_source"].get(name, {}).get("loss")) for m in models)
        lines.append(f"| {name} | {s['documents']:,} | {s['tokens']:,} | {losses} |")
    for name, entry in (report.get("tasks") or {}).items():
        lines += render_task_markdown(name, entry)
    for m in models:
        if m.get("samples"):
            lines += ["", f"## Samples ({m['label']}; temperature 0.8, top-k 40, fixed seeds)", ""]
            for s in m["samples"]:
                text = " ".join(s["completion"].split())
                lines.append(f"- **{s['prompt']}** {text}")
    return "\n".join(lines) + "\n"


def _ci(values: list[float]) -> str:
    lo, hi = values
    return f"{lo:.3f}–{hi:.3f}" if math.isfinite(lo) else "–"


def choices_text(fewest: int, most: int) -> str:
    """``4 choices``, or ``2-5 choices`` for a task file whose items differ."""
    return f"{most} choices" if fewest == most else f"{fewest}-{most} choices"


def render_task_markdown(name: str, entry: dict[str, Any]) -> list[str]:
    """A task's section of report.md: the accuracies beside chance and the baseline, then
    acc_norm per source and per question type."""
    d, m = entry["data"], entry["method"]
    scorers = [entry["model"], *entry["baselines"]]
    unigram = entry["unigram_baseline"]
    fewest, most = entry["choices_range"]
    if "task_file" in d:
        about = (
            f"{entry['items']:,} questions with {choices_text(fewest, most)} "
            f"each: the frozen items of `{d['task_file']}` (sha256 {d['task_file_sha256'][:12]}, "
            f"items hash {d['items_hash'][:12]}), scored as they are. Prompt: each doc's "
            f"`{d['fields']['doc_to_text']}` field, each option its continuation."
        )
    else:
        about = (
            f"{entry['items']:,} questions with {entry['choices']} choices each, from "
            f"{', '.join(d['sources'])}: {d['pairs_read']:,} question-answer pairs read, "
            f"{d['held_out_pairs']:,} held out (seed {d['split']['seed']}, validation share "
            f"{d['split']['val_fraction']}, as in {d['split']['from']}), "
            f"{d['left_out_shared_with_training']:,} of them left out for sharing a question or "
            "an answer with the training split. Prompt `Question: {question}\\nAnswer:`, each "
            f"option its continuation, cut to {m['answer_tokens']} tokens."
        )
    baseline = (
        "no unigram baseline: no prepared training split of the model was found (give --data "
        "a prepared dataset)"
        if unigram is None
        else "Baseline: add-one smoothed unigram log-likelihood under "
        f"{unigram['counts_from']} ({unigram['tokens']:,} tokens)"
    )
    lines = [
        "",
        f"## {name}: {entry['about']}",
        "",
        f"{about} acc: the option with the highest summed log-likelihood; acc_norm: the highest "
        f"per character (lm-eval's); 95% Wilson intervals. {baseline}.",
        "",
        "| scorer | acc | 95% CI | acc_norm | 95% CI | items/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in scorers:
        lines.append(
            f"| {s['label']}: `{s['spec']}` | {_fmt(s['acc'])} | {_ci(s['acc_ci95'])} | "
            f"{_fmt(s['acc_norm'])} | {_ci(s['acc_norm_ci95'])} | {_fmt(s.get('items_per_s'), 1)} |"
        )
    if unigram is not None:
        lines.append(
            f"| unigram baseline (no model) | {_fmt(unigram['acc'])} | {_ci(unigram['acc_ci95'])} "
            f"| {_fmt(unigram['acc_norm'])} | {_ci(unigram['acc_norm_ci95'])} | – |"
        )
    guess = f"1/{entry['choices']}" if entry["choices"] is not None else "mean of 1/choices"
    lines.append(f"| chance ({guess}) | {_fmt(entry['chance'])} | – | "
                 f"{_fmt(entry['chance'])} | – | – |")  # fmt: skip
    for title, key in (("source", "per_source"), ("question type", "per_type")):
        heads = " | ".join(f"acc_norm ({s['label']})" for s in scorers)
        lines += [
            "",
            f"### {name} per {title}",
            "",
            f"| {title} | items | {heads} | acc_norm (unigram) |",
            "|---|---:|" + "---:|" * (len(scorers) + 1),
        ]
        for group, v in entry["model"][key].items():
            accs = " | ".join(_fmt(s[key].get(group, {}).get("acc_norm")) for s in scorers)
            uni = (unigram or {}).get(key, {}).get(group, {}).get("acc_norm")
            lines.append(f"| {group} | {v['items']:,} | {accs} | {_fmt(uni)} |")
    if entry.get("lm_eval_export"):
        lines += ["", f"Exported as an lm-evaluation-harness task: `{entry['lm_eval_export']}`."]
    return lines


def task_png(report: dict[str, Any], name: str, path: Path, max_sources: int = 30) -> Path:
    """acc_norm per source of every model and the unigram baseline, with chance (and the
    gate's min_accuracy) as lines."""
    from medgpt.plots import figure

    entry = report["tasks"][name]
    unigram = entry["unigram_baseline"]
    scorers = [
        *((f"{s['label']} ({_fmt(s['acc_norm'], 3)})", s) for s in
          [entry["model"], *entry["baselines"]]),
        *([(f"unigram baseline ({_fmt(unigram['acc_norm'], 3)})", unigram)] if unigram else []),
    ]  # fmt: skip
    per = entry["model"]["per_source"]
    names = sorted(per, key=lambda n: -per[n]["items"])[:max_sources]
    names.sort()
    size = (8, 1.4 + 0.35 * len(names) * max(1, len(scorers) * 0.6))
    with figure(path, size, dpi=100) as ax:
        _grouped_bars(
            ax,
            [(label, [s["per_source"].get(n, {}).get("acc_norm", math.nan) for n in names])
             for label, s in scorers],
            [f"{n[:34]} ({per[n]['items']})" for n in names],
        )  # fmt: skip
        ax.axvline(
            entry["chance"], color="gray", ls=":", lw=1, label=f"chance {entry['chance']:.2f}"
        )
        gate = report.get("gate") or {}
        if gate.get("min_accuracy") is not None:
            ax.axvline(gate["min_accuracy"], color="crimson", ls="--", lw=1,
                       label=f"gate {gate['min_accuracy']}")  # fmt: skip
        ax.set_xlim(0, 1)
        ax.set_xlabel("acc_norm")
        ax.set_title(f"{name}: accuracy per source ({entry['items']} items)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return path


def _grouped_bars(ax: Any, series: list[tuple[str, list[float]]], labels: list[str]) -> None:
    """Horizontal bars, one group per label (top to bottom), one bar per series in a group."""
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.barh([j + i * height for j in range(len(labels))], values, height=height, label=name)
    ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()


def per_source_png(report: dict[str, Any], path: Path, max_sources: int = 30) -> Path:
    from medgpt.plots import figure

    models = [report["model"], *report["baselines"]]
    per = report["model"]["per_source"]
    names = sorted(per, key=lambda n: -per[n]["tokens"])[:max_sources]
    names.sort()
    size = (8, 1.2 + 0.35 * len(names) * max(1, len(models) * 0.6))
    with figure(path, size, dpi=100) as ax:
        _grouped_bars(
            ax,
            [(f"{m['label']} ({_fmt(m['loss'], 3)})",
              [m["per_source"].get(n, {}).get("loss", math.nan) for n in names])
             for m in models],
            [n[:40] for n in names],
        )  # fmt: skip
        gate = report.get("gate")
        if gate and gate.get("max_loss") is not None:
            ax.axvline(
                gate["max_loss"], color="crimson", ls="--", lw=1, label=f"gate {gate['max_loss']}"
            )
        ax.set_xlabel("loss (nats/token)")
        ax.set_title("held-out loss per source", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return path
