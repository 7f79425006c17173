"""Multiple-choice questions built from held-out question-answer pairs (the task ``medquad-mc``).

Items. Each question of the evaluation split of a QA source (a MedQuAD folder, or jsonl / csv /
parquet / hf: records with question and answer fields) becomes an item: its own answer and K
distractors (default 3) drawn from the answers of *other* held-out documents to questions of
the same type (MedQuAD's ``qtype``: symptoms, treatment, causes, ...; any other answer where
the source labels no types). A document is in the evaluation split exactly when ``medgpt
prepare`` put it there: the same cleaning, duplicate rule, split group and seeded hash
(:func:`medgpt.data.prepare.split_of`), with the seed and validation share of the dataset the
model was trained on. A held-out pair whose question or answer also occurs in a training-split
pair is left out, so nothing of the training split is ever a question, an answer or a
distractor. The draw is seeded per item (the task seed and the item's id), so the same source
and settings give the same items. A question type with too few held-out answers for K
distractors is an error (``small_types: any`` draws its distractors from every answer instead,
``skip`` leaves its questions out).

Prompt. ``Question: {question}\\nAnswer:`` and the option as its continuation, `` {option}``:
the template the training corpus renders QA pairs with, with no end-of-text token in front
(what lm-evaluation-harness and a served model get). Options are cut to ``answer_tokens``
GPT-2 tokens (64), the same budget for every option, at a token boundary where the cut text
encodes back to the same tokens; the cut text *is* the option, so an exported lm-eval task
(:func:`export_lm_eval`) holds the same strings. A prompt and option longer than the model's
context lose tokens from the left of the prompt, as lm-eval truncates.

Scores. Each option's log-likelihood is the sum of its tokens' log-probabilities after the
prompt (float64). ``acc`` picks the option with the highest sum; ``acc_norm`` the highest sum
per character of the option string: lm-evaluation-harness's two accuracies (its code divides
by ``len(choice)``; bytes and characters coincide for ASCII text). Ties go to the first option,
as numpy's argmax does. Intervals are Wilson score intervals at 95%. Beside them: chance,
1/(K+1), and a model-free baseline scoring each option by its add-one smoothed unigram
log-likelihood under the training corpus's token counts, ranked the same two ways.

Task files. ``--task FILE.yaml`` scores a frozen item set instead: an lm-evaluation-harness
``multiple_choice`` task in the shape :func:`export_lm_eval` writes (``dataset_path: json``
over a local ``.jsonl``, ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` naming fields
of the docs). Its docs are the items as they are, with no split rule and no distractor draw, so
a later checkpoint is scored on exactly the items an earlier one was, whatever the data became
since. Anything lm-eval would compute (``!function``, templates, ``process_docs``, few-shot) is
refused: the prompt, the options and the gold index must be fields. The unigram baseline needs
the training split's token counts of the model's prepared dataset, and is absent without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgpt.config import ConfigError, option
from medgpt.errors import DataError
from medgpt.fsutil import staged_dir
from medgpt.tokenizer import N_VOCAB, TOKENIZER_NAME, get_tokenizer

if TYPE_CHECKING:  # torch only where a model is scored: sweep files name tasks without it
    import torch

    from medgpt.model import GPT

# Built-in tasks: name -> what it is. `--task` names them; the metrics are <name>_acc etc.
TASKS: dict[str, str] = {
    "medquad-mc": "multiple choice on held-out MedQuAD-style question-answer pairs",
}
SMALL_TYPES = ("error", "any", "skip")
PROMPT = "Question: {question}\nAnswer:"
DELIMITER = " "  # between the prompt and an option: lm-eval's default target_delimiter
UNTYPED = "(untyped)"  # the per-type key of questions whose source labels no type
NO_SOURCE = "(no source)"  # the per-source key of a task file's docs without a `source`
TASK_FILE_SUFFIXES = (".yaml", ".yml")
Z95 = 1.959963984540054
# Rows per output-head matmul on a CPU at most: measured here (2 cores, AVX2), 128 rows of
# GPT-2's 50,257 logits (25 MB) score 3x faster than 512 (100 MB), whose buffers are mapped
# and unmapped for every chunk.
CPU_HEAD_CHUNK = 128
# Tokens counted for the unigram baseline at most: a sample of a large corpus is enough for
# unigram frequencies, and counting billions of tokens would cost more than the benchmark.
MAX_COUNTED_TOKENS = 200_000_000


def is_task_file(name: Any) -> bool:
    """Whether a ``--task`` names an lm-eval task file rather than a built-in task."""
    return isinstance(name, str) and name.lower().endswith(TASK_FILE_SUFFIXES)


def check_tasks(names: Iterable[str]) -> list[str]:
    """The tasks, each once, in order: built-in names, or lm-eval task files, read and checked
    in full here so that a bad file is refused before a model is loaded (or a sweep trained).
    An unknown name, or two tasks whose metrics would share a prefix, is a ConfigError."""
    out: list[str] = []
    files: set[Path] = set()
    prefixes: dict[str, str] = {}  # metric prefix -> the task given for it
    for n in names:
        if is_task_file(n):
            f = read_task_file(n)
            if f.path in files:
                continue
            files.add(f.path)
            name = f.name
        elif n in TASKS:
            if n in out:
                continue
            name = n
        else:
            raise ConfigError(
                f"unknown task {n!r} (allowed: {', '.join(TASKS)}) and not a task file "
                f"(allowed: an lm-eval task, a path ending in {' or '.join(TASK_FILE_SUFFIXES)})"
            )
        p = metric_prefix(name)
        if p in prefixes:
            raise ConfigError(
                f"duplicate task name: {n} is task {name!r}, and {prefixes[p]} gives the same "
                f"metrics ({p}_acc, ...); give the tasks distinct names (a task file's `task:`)"
            )
        prefixes[p] = n
        out.append(n)
    return out


def metric_prefix(task: str) -> str:
    """``medquad-mc`` -> ``medquad_mc``: the prefix of the task's metrics."""
    return task.replace("-", "_")


def task_metrics() -> dict[str, str]:
    """Every metric a task reports that can rank models: name -> task."""
    return {f"{metric_prefix(t)}_{m}": t for t in TASKS for m in ("acc", "acc_norm")}


@dataclasses.dataclass
class BenchmarkConfig:
    """How the multiple-choice items are built (``medgpt evaluate --task``)."""

    qa_data: list[str] = option(  # noqa: RUF009 - a dataclasses.field
        default_factory=list,
        flag="--qa-data",
        help="question-answer source of the task, repeatable: a MedQuAD folder, or "
        ".jsonl/.csv/.parquet with question and answer fields (default: the QA sources of the "
        "dataset the model was trained on)",
    )
    distractors: int = option(
        3, flag="--distractors", help="wrong answers per question, K >= 1 (3; --choices K+1)"
    )
    answer_tokens: int = option(
        64, flag="--answer-tokens", help="tokens each option is cut to, the same for all (64)"
    )
    seed: int = option(0, flag="--task-seed", help="seed of the distractor draw (0)")
    small_types: str = option(
        "error",
        flag="--small-types",
        help="a question type with too few answers for K distractors: error | any (draw "
        "from every answer) | skip (leave its questions out) (error)",
    )
    question_field: str = option(
        "question", flag="--qa-question-field", help="question field of --qa-data records"
    )
    answer_field: str = option(
        "answer", flag="--qa-answer-field", help="answer field of --qa-data records"
    )
    type_field: str = option(
        "qtype", flag="--qa-type-field", help="question-type field of --qa-data records (qtype)"
    )

    def __post_init__(self) -> None:
        if self.distractors < 1:
            raise ConfigError(
                f"distractors: must be >= 1 (K wrong answers, K + 1 choices), got "
                f"{self.distractors}"
            )
        if self.answer_tokens < 1:
            raise ConfigError(f"answer_tokens: must be >= 1, got {self.answer_tokens}")
        if self.small_types not in SMALL_TYPES:
            raise ConfigError(
                f"small_types: {self.small_types!r} (allowed: {', '.join(SMALL_TYPES)})"
            )
        for name in ("question_field", "answer_field"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must name a field")
        if any(not u for u in self.qa_data):
            raise ConfigError("qa_data: a source must not be empty")

    @property
    def choices(self) -> int:
        return self.distractors + 1


# ---------------------------------------------------------------------------------------------
# Which documents are held out


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How ``medgpt prepare`` split the model's training corpus: the seed, the validation share,
    the duplicate rule, and the recipe's sources (their templates decide the split key of
    records without a group). ``origin`` says where it was read, for the report."""

    seed: int
    val_fraction: float
    dedupe: bool
    origin: str
    sources: tuple[Any, ...] = ()  # SourceSpec of the dataset's recipe
    data_dir: str | None = None  # the prepared dataset (its train split has the unigram counts)

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], data_dir: str | Path, origin: str
    ) -> SplitRule:
        from medgpt.config import from_mapping
        from medgpt.data.sources import SourceSpec

        recipe = manifest.get("recipe") or {}
        specs = []
        for s in recipe.get("sources") or []:
            try:
                specs.append(from_mapping(SourceSpec, s) if isinstance(s, dict) else SourceSpec(s))
            except ConfigError:
                continue  # a source this medgpt no longer reads cannot be a QA source here
        return cls(
            seed=int(recipe.get("seed", 1337)),
            val_fraction=float(recipe.get("val_fraction", 0.05)),
            dedupe=bool(recipe.get("dedupe", True)),
            origin=origin,
            sources=tuple(specs),
            data_dir=str(Path(data_dir).resolve()),
        )

    @classmethod
    def defaults(cls) -> SplitRule:
        from medgpt.data.prepare import PrepareConfig

        fields = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
        return cls(
            seed=int(fields["seed"]),
            val_fraction=float(fields["val_fraction"]),
            dedupe=bool(fields["dedupe"]),
            origin="medgpt prepare's defaults (no dataset manifest of the model was found)",
        )

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "dedupe": self.dedupe,
            "from": self.origin,
            "data_dir": self.data_dir,
        }


def _is_qa_capable(spec: Any) -> bool:
    if spec.is_qa:
        return True
    if spec.scheme is not None:
        return False
    p = Path(spec.uri)
    return p.suffix.lower() == ".xml" or not p.suffix  # a MedQuAD file or folder


def _locate(uri: str, data_dir: str | None) -> Path | None:
    """A source path of a manifest, which is relative to where ``medgpt prepare`` ran: from
    here, else from the dataset folder's parents."""
    p = Path(uri).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    if p.exists():
        return p.resolve()
    if data_dir is not None:
        for base in Path(data_dir).resolve().parents:
            if (base / p).exists():
                return (base / p).resolve()
    return None


def qa_sources(rule: SplitRule, cfg: BenchmarkConfig, task: str) -> list[Any]:
    """The QA sources of a task as SourceSpecs: ``cfg.qa_data``, read the way the dataset's
    recipe read the same path when it has it (its template decides split keys), else the QA
    sources of the recipe itself."""
    from medgpt.data.sources import SourceSpec

    def same(spec: Any, path: Path) -> bool:
        found = _locate(spec.uri, rule.data_dir) if spec.scheme is None else None
        return found is not None and found == path.resolve()

    if cfg.qa_data:
        out = []
        for uri in cfg.qa_data:
            mine = SourceSpec(uri=uri)
            match = None
            if mine.scheme is None and Path(uri).exists():
                match = next((s for s in rule.sources if same(s, Path(uri))), None)
            if match is not None and match.is_qa:
                out.append(dataclasses.replace(match, uri=uri))
            elif match is not None:
                out.append(
                    dataclasses.replace(
                        match,
                        uri=uri,
                        question_field=cfg.question_field,
                        answer_field=cfg.answer_field,
                    )
                )
            else:
                out.append(
                    SourceSpec(
                        uri=uri, question_field=cfg.question_field, answer_field=cfg.answer_field
                    )
                )
        return out
    found, missing = [], []
    for spec in rule.sources:
        if not _is_qa_capable(spec):
            continue
        path = _locate(spec.uri, rule.data_dir) if spec.scheme is None else None
        if spec.scheme is None and path is None:
            missing.append(spec.uri)
            continue
        found.append(dataclasses.replace(spec, uri=str(path)) if path is not None else spec)
    if not found:
        names = ", ".join(s.uri for s in rule.sources) or "no recorded sources"
        why = f" ({', '.join(missing)} not found from here)" if missing else ""
        raise ConfigError(
            f"{task}: no question-answer source: {rule.origin} was prepared from {names}{why}; "
            "give --qa-data (a MedQuAD folder, or .jsonl/.csv/.parquet with question and answer "
            "fields)"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Items


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: its options (cut to the token budget) and the index of its own answer."""

    id: str
    source: str
    qtype: str | None
    question: str
    choices: tuple[str, ...]
    gold: int
    query: str | None = None  # a task file's prompt, as it is; None: PROMPT with the question

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question) if self.query is None else self.query

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "qtype": self.qtype,
            "question": self.question,
            "query": self.prompt,
            "choices": list(self.choices),
            "gold": self.gold,
        }


@dataclasses.dataclass
class _Pair:
    id: str
    source: str
    group: str
    qtype: str | None
    question: str
    qnorm: str
    option: str  # the answer cut to the budget
    tokens: list[int]  # the option's continuation tokens (with the delimiter)


@dataclasses.dataclass
class Benchmark:
    """A task's items and what describes them (the report's ``data`` of the task)."""

    task: str
    config: BenchmarkConfig
    items: list[Item]
    description: dict[str, Any]
    continuations: dict[str, list[int]]  # option text -> its tokens (" " + option)
    # Token counts of the training-split documents of the QA sources: the unigram baseline's
    # counts when the model's prepared dataset is not at hand.
    qa_train_counts: np.ndarray
    task_file: str | None = None  # the lm-eval task file of a frozen item set

    @property
    def choices(self) -> int | None:
        """The number of options of every item; None when a task file's items differ."""
        sizes = {len(it.choices) for it in self.items}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess: the mean of 1/choices over the items."""
        if self.choices is not None or not self.items:
            return 1.0 / (self.choices or self.config.choices)
        return math.fsum(1.0 / len(it.choices) for it in self.items) / len(self.items)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps(it.to_json(), sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _digest(*parts: str, size: int = 8) -> bytes:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=size).digest()


def cut_option(enc: Any, answer: str, budget: int) -> tuple[str, list[int]]:
    """``answer`` cut to at most ``budget`` tokens of its continuation `` answer``, at a token
    boundary whose text encodes back to the same tokens (a cut inside a character, or one BPE
    would merge differently, moves one token shorter); returns the option text (without the
    delimiter) and its continuation tokens."""
    tokens = enc.encode_ordinary(DELIMITER + answer)
    if len(tokens) <= budget:
        return answer, tokens
    order = [*range(budget, 0, -1), *range(budget + 1, len(tokens))]
    for n in order:
        try:
            text = enc.decode_bytes(tokens[:n]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.startswith(DELIMITER) and len(text) > 1 and enc.encode_ordinary(text) == tokens[:n]:
            return text[len(DELIMITER) :], tokens[:n]
    return answer, tokens


def _shuffled(rng: random.Random, pool: Sequence[int]) -> Iterable[int]:
    """``pool``'s members in a random order, drawn lazily (Fisher-Yates on a copy): an item
    needs a few of a large pool, and all of a small one in the worst case."""
    a = list(pool)
    for k in range(len(a)):
        r = rng.randrange(k, len(a))
        a[k], a[r] = a[r], a[k]
        yield a[k]


def _draw(
    rng: random.Random,
    pairs: list[_Pair],
    me: _Pair,
    candidates: Sequence[int],
    have: list[int],
    k: int,
) -> list[int]:
    """Add to ``have`` up to ``k`` distractors for ``me`` from ``candidates``, in a seeded
    random order: never from its own document, never another answer to the same question,
    never an option text already among the choices."""
    taken = {me.option, *(pairs[j].option for j in have)}
    for j in _shuffled(rng, candidates):
        if len(have) == k:
            break
        o = pairs[j]
        if o.group == me.group or o.qnorm == me.qnorm or o.option in taken:
            continue
        have.append(j)
        taken.add(o.option)
    return have


def build_benchmark(
    task: str,
    specs: list[Any],
    rule: SplitRule,
    cfg: BenchmarkConfig,
    count_tokens: bool = True,
) -> Benchmark:
    """Read the QA sources, keep the held-out pairs, draw the distractors. ``count_tokens``:
    count the tokens of the sources' training-split documents (the unigram baseline's counts
    when the model's prepared dataset is not at hand). A source named in ``cfg.qa_data``
    without any question-answer pair is an error; of the sources taken from a dataset's recipe
    (a folder may hold other documents too), only all of them having none is."""
    from medgpt.data.prepare import clean_text, split_of
    from medgpt.data.sources import read_source

    enc = get_tokenizer()
    seen: set[bytes] = set()
    train_q: set[str] = set()
    train_a: set[str] = set()
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    held: list[tuple[Any, str, str, str]] = []  # (document, group, question, answer)
    read = duplicates = 0
    per_source_read: dict[str, int] = defaultdict(int)
    for spec in specs:
        pairs = 0
        for doc in read_source(spec, type_field=cfg.type_field):
            text = clean_text(doc.text)
            if not text:
                continue
            if rule.dedupe:
                h = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if h in seen:
                    duplicates += 1
                    continue
                seen.add(h)
            if doc.question is None or doc.answer is None:
                continue  # a document of the corpus that is not a question-answer pair
            q, a = clean_text(doc.question), clean_text(doc.answer)
            if not q or not a:
                continue
            pairs += 1
            read += 1
            per_source_read[doc.source] += 1
            key = doc.group if doc.group is not None else text
            if split_of(key, rule.seed, rule.val_fraction) == "train":
                train_q.add(_norm(q))
                train_a.add(_norm(a))
                if count_tokens:
                    counts += np.bincount(enc.encode_ordinary(text), minlength=N_VOCAB)
                continue
            held.append((doc, key, q, a))
        if pairs == 0 and cfg.qa_data:
            raise DataError(
                f"{task}: {spec.uri}: no question-answer pairs (a MedQuAD folder, or records "
                f"with fields {cfg.question_field!r} and {cfg.answer_field!r}: "
                "--qa-question-field/--qa-answer-field)"
            )

    if read == 0:
        raise DataError(
            f"{task}: no question-answer pairs in {', '.join(s.uri for s in specs)}; give "
            "--qa-data (a MedQuAD folder, or records with question and answer fields)"
        )
    pairs_out: list[_Pair] = []
    in_training = 0
    kept: set[tuple[str, str]] = set()
    cut_cache: dict[str, tuple[str, list[int]]] = {}
    for doc, group, q, a in held:
        qn, an = _norm(q), _norm(a)
        if qn in train_q or an in train_a:
            in_training += 1
            continue
        if (qn, an) in kept:
            continue
        kept.add((qn, an))
        if a not in cut_cache:
            cut_cache[a] = cut_option(enc, a, cfg.answer_tokens)
        opt, toks = cut_cache[a]
        pairs_out.append(
            _Pair(
                id=_digest(doc.source, q, a).hex(),
                source=doc.source,
                group=group,
                qtype=doc.qtype,
                question=q,
                qnorm=qn,
                option=opt,
                tokens=toks,
            )
        )
    if not pairs_out:
        where = ", ".join(s.uri for s in specs)
        raise DataError(
            f"{task}: no held-out questions in {where}: {read} pairs read, "
            f"{read - len(held)} in the training split, {in_training} sharing a question or "
            "answer with it"
        )
    pairs_out.sort(key=lambda p: p.id)  # the order of reading does not matter

    by_type: dict[str | None, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs_out):
        by_type[p.qtype].append(i)
    everyone = list(range(len(pairs_out)))
    K = cfg.distractors
    items: list[Item] = []
    short: dict[str, list[int]] = {}  # type -> [held-out answers, questions short of K]
    widened: dict[str, int] = defaultdict(int)
    skipped: dict[str, int] = defaultdict(int)
    for p in pairs_out:
        rng = random.Random(int.from_bytes(_digest(str(cfg.seed), p.id), "big"))
        pool = by_type[p.qtype] if p.qtype is not None else everyone
        chosen = _draw(rng, pairs_out, p, pool, [], K)
        if len(chosen) < K and p.qtype is not None:
            if cfg.small_types == "any":
                chosen = _draw(rng, pairs_out, p, everyone, chosen, K)
                widened[p.qtype] += 1
            elif cfg.small_types == "skip":
                skipped[p.qtype] += 1
                continue
            else:
                short.setdefault(p.qtype, [len(pool), 0])[1] += 1
                continue
        if len(chosen) < K:
            raise DataError(
                f"{task}: only {len(pairs_out)} distinct held-out answers from "
                f"{len({x.group for x in pairs_out})} documents: too few for {K} distractors "
                "per question; lower --distractors or give more question-answer data"
            )
        options = [pairs_out[j].option for j in chosen]
        gold = rng.randrange(K + 1)
        options.insert(gold, p.option)
        items.append(Item(p.id, p.source, p.qtype, p.question, tuple(options), gold))
    if short:
        listed = ", ".join(
            f"{t!r} ({n} held-out answers, {q} of its questions short)"
            for t, (n, q) in sorted(short.items())
        )
        raise DataError(
            f"{task}: too few answers of a question type for {K} distractors from other "
            f"documents: {listed}; --small-types any draws their distractors from every answer, "
            "--small-types skip leaves their questions out, or lower --distractors"
        )
    if not items:
        raise DataError(f"{task}: every question was skipped (--small-types skip)")

    continuations = {p.option: p.tokens for p in pairs_out}
    type_counts: dict[str, int] = defaultdict(int)
    for it in items:
        type_counts[it.qtype or UNTYPED] += 1
    description = {
        "sources": [s.uri for s in specs],
        "split": rule.describe(),
        "pairs_read": read,
        "pairs_read_per_source": dict(sorted(per_source_read.items())),
        "duplicates_dropped": duplicates,
        "held_out_pairs": len(held),
        "left_out_shared_with_training": in_training,
        "items": len(items),
        "items_per_type": dict(sorted(type_counts.items())),
        "small_types": cfg.small_types,
        "types_widened_to_any_answer": dict(sorted(widened.items())),
        "types_skipped": dict(sorted(skipped.items())),
    }
    bench = Benchmark(task, cfg, items, description, continuations, counts)
    description["items_hash"] = bench.content_hash()
    return bench


# ---------------------------------------------------------------------------------------------
# Task files: frozen item sets in lm-eval's format

# The keys of the shape export_lm_eval writes. Whatever else lm-eval supports would have medgpt
# compute the prompt, the options or the gold index; lm_eval itself runs those tasks.
TASK_FILE_REQUIRED = (
    "task",
    "output_type",
    "dataset_path",
    "dataset_kwargs",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
)
TASK_FILE_OPTIONAL = (
    "test_split",
    "validation_split",
    "target_delimiter",
    "metric_list",
    "metadata",
)
DOC_SUFFIXES = (".jsonl", ".json")
_DIRECT = (
    "medgpt scores tasks whose fields name the prompt, the options and the gold index directly "
    "(lm_eval itself runs any task against a served model: see the README)"
)
_FIELD = re.compile(r"([A-Za-z_]\w*)|\{\{\s*([A-Za-z_]\w*)\s*\}\}")  # name | {{name}}


class _Function(str):
    """The value of a ``!function`` tag: Python that lm-eval would import, and medgpt refuses."""


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """A task file, read and checked: where it is, its name, and its docs as items."""

    path: Path
    sha256: str
    name: str
    data_file: Path
    data_sha256: str
    split: str
    fields: dict[str, Any]  # doc_to_text, doc_to_choice, doc_to_target: field names (or a list)
    metadata: Any
    items: list[Item]


def _short(value: Any, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def _check_choices(choices: Any, at: str, error: type[Exception]) -> None:
    why = None
    if not isinstance(choices, list):
        why = f"got {_short(choices)}"
    elif len(choices) < 2:
        why = f"got {len(choices)} option"
    elif not all(isinstance(c, str) and c.strip() for c in choices):
        why = "an option is empty or not text"
    elif len(set(choices)) < len(choices):
        why = "an option repeats"
    if why is not None:
        raise error(
            f"{at}: the choices must be a list of at least 2 distinct non-empty strings ({why})"
        )


def _field_of(path: Path, key: str, value: Any, literal_list: bool = False) -> Any:
    """The doc field a doc_to_* key names (a bare name or ``{{name}}``); with ``literal_list``
    a list is itself every doc's choices."""
    if isinstance(value, _Function):
        raise ConfigError(f"{path}: {key}: !function {value}: Python is not run; {_DIRECT}")
    if literal_list and isinstance(value, list):
        _check_choices(value, f"{path}: {key}", ConfigError)
        return list(value)
    m = _FIELD.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(
            f"{path}: {key}: {_short(value)} (allowed: a field of the docs, bare or as "
            f'"{{{{field}}}}"); {_DIRECT}'
        )
    return m.group(1) or m.group(2)


def _docs(data: Path, text: str) -> Iterable[tuple[str, int, Any]]:
    """(where, number, doc) of each doc: a line of JSON Lines, or an element of a .json array."""
    if data.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            docs = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{data}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, doc in enumerate(docs, 1):
            yield f"item {i}", i, doc
        return
    # Not str.splitlines: the export writes U+2028 and friends unescaped inside strings.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{data}: line {n}: not valid JSON ({e.msg})") from None
        yield f"line {n}", n, doc


def _doc_item(doc: Any, at: str, number: int, fields: dict[str, Any], task: Path) -> Item:
    if not isinstance(doc, dict):
        raise DataError(f"{at}: expected a JSON object (a doc), got {type(doc).__name__}")

    def get(key: str) -> Any:
        name = fields[key]
        if name not in doc:
            raise DataError(f"{at}: no field {name!r} ({key} of {task.name})")
        return doc[name]

    def optional(name: str) -> str | None:
        value = doc.get(name)
        if value is not None and not (isinstance(value, str) and value):
            raise DataError(f"{at}: {name}: {_short(value)} (allowed: non-empty text or null)")
        return value

    prompt = get("doc_to_text")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{at}: {fields['doc_to_text']}: {_short(prompt)} (allowed: the prompt, non-empty text)"
        )
    literal = isinstance(fields["doc_to_choice"], list)
    choices = fields["doc_to_choice"] if literal else get("doc_to_choice")
    _check_choices(
        choices, f"{at}: {'doc_to_choice' if literal else fields['doc_to_choice']}", DataError
    )
    gold = get("doc_to_target")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(
            f"{at}: {fields['doc_to_target']}: {_short(gold)} (allowed: the index of the gold "
            f"option, an integer from 0 to {len(choices) - 1})"
        )
    ident = doc.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise DataError(f"{at}: id: {_short(ident)} (allowed: text or an integer)")
    question = doc.get("question")
    return Item(
        id=str(ident),
        source=optional("source") or NO_SOURCE,
        qtype=optional("qtype"),
        question=question if isinstance(question, str) else prompt,
        choices=tuple(choices),
        gold=gold,
        query=prompt,
    )


def read_task_file(path: str | Path) -> TaskFile:
    """Read and check an lm-eval task file and its docs (see the module docstring): each
    problem is one line naming the file (and the doc's line) and what is allowed, a
    ConfigError for the YAML and a DataError for the docs."""
    import yaml

    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(
            f"task file {path}: not found (a --task ending in "
            f"{' or '.join(TASK_FILE_SUFFIXES)} names an lm-eval task file)"
        )
    raw = p.read_bytes()
    loader = type("TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: _Function(ld.construct_scalar(node)))
    try:
        spec = yaml.load(raw.decode("utf-8"), Loader=loader)
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{p}: not valid YAML ({problem}{where})") from None
    allowed = TASK_FILE_REQUIRED + TASK_FILE_OPTIONAL
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{p}: expected a mapping of lm-eval task keys ({', '.join(allowed)}), "
            f"got {type(spec).__name__}"
        )
    for key in spec:  # before the missing keys: an `include:` would explain them all
        if key not in allowed:
            raise ConfigError(
                f"{p}: {key}: not supported (allowed: {', '.join(allowed)}); {_DIRECT}"
            )
    for key in TASK_FILE_REQUIRED:
        if key not in spec:
            raise ConfigError(
                f"{p}: no {key!r} (a task file needs {', '.join(TASK_FILE_REQUIRED)})"
            )
    name = spec["task"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ConfigError(
            f"{p}: task: {_short(name)} (allowed: a name of letters, digits, '_', '.', '-')"
        )
    if spec["output_type"] != "multiple_choice":
        raise ConfigError(
            f"{p}: output_type: {_short(spec['output_type'])}: medgpt scores "
            "multiple-choice tasks (allowed: multiple_choice)"
        )
    if spec["dataset_path"] != "json":
        raise ConfigError(
            f"{p}: dataset_path: {_short(spec['dataset_path'])} (allowed: json, "
            "a local file named by dataset_kwargs.data_files)"
        )
    delimiter = spec.get("target_delimiter", DELIMITER)
    if delimiter != DELIMITER:
        raise ConfigError(
            f"{p}: target_delimiter: {_short(delimiter)} (allowed: ' ', the "
            "delimiter medgpt scores every option after)"
        )
    metrics = spec.get("metric_list") or []
    for m in metrics if isinstance(metrics, list) else [metrics]:
        metric = m.get("metric") if isinstance(m, dict) else m
        if metric not in ("acc", "acc_norm"):
            raise ConfigError(
                f"{p}: metric_list: {_short(metric)} (allowed: acc, acc_norm, what medgpt computes)"
            )
    fields = {
        "doc_to_text": _field_of(p, "doc_to_text", spec["doc_to_text"]),
        "doc_to_choice": _field_of(p, "doc_to_choice", spec["doc_to_choice"], literal_list=True),
        "doc_to_target": _field_of(p, "doc_to_target", spec["doc_to_target"]),
    }
    # lm-eval scores the test split when the task has one, else the validation split.
    split_key = "test_split" if spec.get("test_split") is not None else "validation_split"
    split = spec.get(split_key)
    if not isinstance(split, str):
        raise ConfigError(
            f"{p}: no test_split or validation_split naming a split (allowed: the split of "
            "dataset_kwargs.data_files to score, e.g. test_split: test)"
        )
    kwargs = spec["dataset_kwargs"]
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if not isinstance(files, dict) or len(kwargs) != 1:
        raise ConfigError(
            f"{p}: dataset_kwargs: {_short(kwargs)} (allowed: data_files, a "
            "mapping of split to a local .jsonl or .json file)"
        )
    uri = files.get(split)
    if not isinstance(uri, str) or not uri.lower().endswith(DOC_SUFFIXES):
        raise ConfigError(
            f"{p}: dataset_kwargs.data_files.{split}: {_short(uri)} (allowed: a "
            f"local .jsonl or .json file, for {split_key}: {split})"
        )
    rel = Path(uri).expanduser()
    tried = [rel] if rel.is_absolute() else [p.parent / rel, Path.cwd() / rel]
    data = next((t.resolve() for t in tried if t.is_file()), None)
    if data is None:
        where = "" if rel.is_absolute() else f" (relative to {p.parent} or the working directory)"
        raise DataError(f"{p}: data file {uri} not found{where}")
    body = data.read_bytes()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{data}: not UTF-8 text") from None
    items = [_doc_item(d, f"{data}: {at}", n, fields, p) for at, n, d in _docs(data, text)]
    if not items:
        raise DataError(f"{data}: no docs (one JSON object per line, the {split} split of {p})")
    return TaskFile(
        path=p,
        sha256=hashlib.sha256(raw).hexdigest(),
        name=name,
        data_file=data,
        data_sha256=hashlib.sha256(body).hexdigest(),
        split=split,
        fields=fields,
        # Recorded in report.json: YAML's dates and the like as text.
        metadata=json.loads(json.dumps(spec.get("metadata"), default=str)),
        items=items,
    )


def load_task_file(path: str | Path, enc: Any = None) -> Benchmark:
    """A task file's docs as a benchmark: the items exactly as they are, each option's tokens
    `` option`` in ``enc`` (GPT-2's by default, as for the built-in task)."""
    f = read_task_file(path)
    enc = enc if enc is not None else get_tokenizer()
    continuations = {c: enc.encode_ordinary(DELIMITER + c) for it in f.items for c in it.choices}
    # Nothing is cut or drawn: the config records the longest option (what a model's context
    # must hold beside a prompt token) and the most choices.
    cfg = BenchmarkConfig(
        answer_tokens=max(len(t) for t in continuations.values()),
        distractors=max(len(it.choices) for it in f.items) - 1,
    )
    per_type: dict[str, int] = defaultdict(int)
    for it in f.items:
        per_type[it.qtype or UNTYPED] += 1
    description = {
        "task_file": str(f.path),
        "task_file_sha256": f.sha256,
        "data_file": str(f.data_file),
        "data_file_sha256": f.data_sha256,
        "lm_eval_split": f.split,
        "fields": f.fields,
        "metadata": f.metadata,
        "items": len(f.items),
        "items_per_type": dict(sorted(per_type.items())),
    }
    bench = Benchmark(
        f.name,
        cfg,
        f.items,
        description,
        continuations,
        np.zeros(0, dtype=np.int64),
        task_file=str(f.path),
    )
    description["items_hash"] = bench.content_hash()
    return bench


# ---------------------------------------------------------------------------------------------
# Scoring


def context_tokens(enc: Any, item: Item) -> list[int]:
    return enc.encode_ordinary(item.prompt)


def loglikelihoods(
    model: GPT,
    bench: Benchmark,
    device: torch.device,
    batch_tokens: int = 8192,
    head_chunk: int = 512,
) -> list[np.ndarray]:
    """Per item, each option's summed log-likelihood (float64) after the item's prompt.

    Every (prompt, option) pair is one sequence; one that does not fit the context keeps its
    last ``block_size + 1`` tokens (the option always fits: ``answer_tokens`` < block size).
    Sequences are batched longest first, right-padded (causal attention ignores the padding),
    and the output head runs on the option positions only."""
    import torch

    if device.type == "cpu":
        head_chunk = min(head_chunk, CPU_HEAD_CHUNK)
    with torch.no_grad():
        return _loglikelihoods(model, bench, device, batch_tokens, head_chunk)


def _loglikelihoods(
    model: GPT, bench: Benchmark, device: torch.device, batch_tokens: int, head_chunk: int
) -> list[np.ndarray]:
    import torch
    import torch.nn.functional as F

    model.eval()
    block = model.config.block_size
    if bench.config.answer_tokens >= block:
        raise ConfigError(
            f"--answer-tokens {bench.config.answer_tokens}: the model's context is {block} "
            "tokens; the option budget must be smaller"
        )
    enc = get_tokenizer()
    requests: list[tuple[int, int, np.ndarray, int]] = []  # (item, option, sequence, n scored)
    for i, it in enumerate(bench.items):
        ctx = context_tokens(enc, it)
        for c, choice in enumerate(it.choices):
            cont = bench.continuations[choice]
            seq = np.array([*ctx, *cont][-(block + 1) :], dtype=np.int64)
            requests.append((i, c, seq, len(cont)))
    out = [np.zeros(len(it.choices), dtype=np.float64) for it in bench.items]
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    batch: list[int] = []

    def run(batch: list[int]) -> None:
        T = max(len(requests[r][2]) - 1 for r in batch)
        x = np.zeros((len(batch), T), dtype=np.int64)
        y = np.full((len(batch), T), -1, dtype=np.int64)
        for row, r in enumerate(batch):
            _, _, seq, n = requests[r]
            L = len(seq) - 1
            x[row, :L] = seq[:-1]
            y[row, L - n : L] = seq[L - n + 1 :]
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y).to(device)
        hidden = model.features(xt)
        rows, cols = torch.nonzero(yt >= 0, as_tuple=True)
        lp = torch.empty(len(rows), dtype=torch.float64, device=device)
        for a in range(0, len(rows), head_chunk):
            r_, c_ = rows[a : a + head_chunk], cols[a : a + head_chunk]
            logits = model.lm_head(hidden[r_, c_]).float()
            lp[a : a + len(r_)] = -F.cross_entropy(logits, yt[r_, c_], reduction="none").double()
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, rows, lp)
        for row, value in enumerate(sums.tolist()):
            i, c, _, _ = requests[batch[row]]
            out[i][c] = value

    for r in order:
        longest = len(requests[batch[0]][2]) - 1 if batch else len(requests[r][2]) - 1
        if batch and (len(batch) + 1) * longest > batch_tokens:
            run(batch)
            batch = []
        batch.append(r)
    if batch:
        run(batch)
    return out


def unigram_loglikelihoods(bench: Benchmark, counts: np.ndarray) -> list[np.ndarray]:
    """Per item, each option's log-likelihood under add-one smoothed unigram frequencies."""
    counts = counts.astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(float(counts.sum()) + len(counts))
    return [
        np.array([float(logp[bench.continuations[c]].sum()) for c in it.choices])
        for it in bench.items
    ]


def train_token_counts(data_dir: str | Path) -> tuple[np.ndarray, int]:
    """Token counts of a prepared dataset's train split (its first MAX_COUNTED_TOKENS tokens)
    and how many tokens were counted."""
    from medgpt.data.loader import TokenShards

    shards = TokenShards(data_dir, "train")
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    counted = 0
    step = 1 << 24
    for m in shards.maps:
        for a in range(0, len(m), step):
            take = min(step, len(m) - a, MAX_COUNTED_TOKENS - counted)
            if take <= 0:
                return counts, counted
            counts += np.bincount(m[a : a + take], minlength=N_VOCAB)[:N_VOCAB]
            counted += take
    return counts, counted


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _accuracy(hits: Sequence[bool]) -> dict[str, Any]:
    n, k = len(hits), int(sum(hits))
    return {"value": k / n if n else math.nan, "ci95": list(wilson(k, n)), "correct": k}


def accuracies(bench: Benchmark, lls: list[np.ndarray]) -> dict[str, Any]:
    """acc and acc_norm with their intervals, overall, per source and per question type."""
    acc, norm = [], []
    for it, ll in zip(bench.items, lls, strict=True):
        lengths = np.array([float(len(c)) for c in it.choices])
        acc.append(int(np.argmax(ll)) == it.gold)
        norm.append(int(np.argmax(ll / lengths)) == it.gold)

    def block(idx: list[int]) -> dict[str, Any]:
        a = _accuracy([acc[i] for i in idx])
        b = _accuracy([norm[i] for i in idx])
        return {
            "items": len(idx),
            "acc": a["value"],
            "acc_ci95": a["ci95"],
            "acc_norm": b["value"],
            "acc_norm_ci95": b["ci95"],
        }

    by_source: dict[str, list[int]] = defaultdict(list)
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(bench.items):
        by_source[it.source].append(i)
        by_type[it.qtype or UNTYPED].append(i)
    return {
        **block(list(range(len(bench.items)))),
        "per_source": {k: block(v) for k, v in sorted(by_source.items())},
        "per_type": {k: block(v) for k, v in sorted(by_type.items())},
    }


def score_model(
    model: GPT, bench: Benchmark, device: torch.device, batch_tokens: int, head_chunk: int
) -> dict[str, Any]:
    """A model's accuracies on the benchmark, with its scoring speed."""
    t0 = time.perf_counter()
    lls = loglikelihoods(model, bench, device, batch_tokens, head_chunk)
    seconds = time.perf_counter() - t0
    return {
        **accuracies(bench, lls),
        "seconds": seconds,
        "items_per_s": len(bench.items) / seconds if seconds else None,
    }


def method(bench: Benchmark) -> dict[str, Any]:
    cfg = bench.config
    scoring = {
        "acc": "the option with the highest summed log-likelihood of its tokens",
        "acc_norm": "the option with the highest summed log-likelihood per character of the "
        "option (lm-evaluation-harness's acc_norm)",
        "ties": "the first option",
        "interval": "Wilson score interval, 95%",
        "baseline": "add-one smoothed unigram log-likelihood of the option's tokens under the "
        "training corpus's token counts, ranked the same two ways",
    }
    if bench.task_file is not None:
        return {
            "prompt": f"each doc's {bench.description['fields']['doc_to_text']!r} field, as it is",
            "continuation": DELIMITER + "{option}",
            "end_of_text_prefix": False,
            "items": f"the docs of {bench.task_file} as they are: no split rule, no distractor "
            "draw",
            "longest_option_tokens": cfg.answer_tokens,
            **scoring,
        }
    return {
        "prompt": PROMPT,
        "continuation": DELIMITER + "{option}",
        "end_of_text_prefix": False,
        "answer_tokens": cfg.answer_tokens,
        "distractors": cfg.distractors,
        "choices": cfg.choices,
        "seed": cfg.seed,
        "distractor_pool": "answers of other held-out documents to questions of the same type "
        f"(small types: {cfg.small_types}); any answer for untyped questions",
        **scoring,
    }


def check_tokenizer(task: str, spec: str, tokenizer: str, vocab_size: int) -> None:
    if tokenizer != TOKENIZER_NAME or vocab_size < N_VOCAB:
        raise DataError(
            f"{spec}: model uses tokenizer {tokenizer!r} with {vocab_size} ids; task {task} is "
            f"tokenized with {TOKENIZER_NAME!r} ({N_VOCAB} ids)"
        )


# ---------------------------------------------------------------------------------------------
# The lm-evaluation-harness export


def lm_eval_name(task: str) -> str:
    return metric_prefix(task)


def check_export_dir(out: Path) -> None:
    """Refuse a folder that holds something other than an earlier export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any(out.glob("*.yaml")))):
        raise ConfigError(f"--export-lm-eval {out}: exists and is not an lm-eval task folder")


def lm_eval_config(bench: Benchmark, data_file: Path) -> dict[str, Any]:
    """The lm-eval task of a benchmark whose items are in ``data_file``: fields of the items
    named directly (no templates), the default " " target delimiter."""
    return {
        "task": lm_eval_name(bench.task),
        "dataset_path": "json",
        # lm-eval hands these to datasets.load_dataset, which resolves relative paths from the
        # working directory: the absolute path of the file in the final folder.
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": DELIMITER,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {
            "version": 1.0,
            "medgpt_task": bench.task,
            "items": len(bench.items),
            "items_hash": bench.description["items_hash"],
            **(
                {
                    "answer_tokens": bench.config.answer_tokens,
                    "distractors": bench.config.distractors,
                }
                if bench.task_file is None
                else {"task_file": bench.task_file}  # a re-export of a frozen item set
            ),
        },
    }


def export_lm_eval(benches: Sequence[Benchmark], out: str | Path) -> Path:
    """Write the items of each benchmark as a local lm-evaluation-harness task into ``out``,
    atomically (staged, then renamed; an earlier export there is replaced): ``<name>.jsonl``,
    one item per line (``query`` the prompt, ``choices`` the options, ``gold`` the index of
    the answer), and ``<name>.yaml`` (``output_type: multiple_choice`` over those fields), so
    that lm-eval's acc and acc_norm are ours on the same items. ``<name>`` is the task's name
    with ``_`` for ``-``; run it with ``lm_eval --include_path OUT --tasks <name> ...``."""
    import yaml

    target = Path(out).resolve()
    check_export_dir(target)
    with staged_dir(target) as tmp:
        for bench in benches:
            name = lm_eval_name(bench.task)
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for it in bench.items:
                    f.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")
            header = (
                f"# {bench.task}: {len(bench.items)} multiple-choice items written by medgpt "
                f"evaluate.\n# lm_eval --include_path {target} --tasks {name} --model ...\n"
            )
            body = yaml.safe_dump(
                lm_eval_config(bench, target / f"{name}.jsonl"),
                sort_keys=False,
                allow_unicode=True,
            )
            (tmp / f"{name}.yaml").write_text(header + body, encoding="utf-8")
    return target
