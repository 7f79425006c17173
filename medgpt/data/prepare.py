"""Corpus → token shards: read, clean, deduplicate, split by document, tokenize, shard.

Output folder::

    OUT/train_0000.bin ...   uint16 little-endian GPT-2 token ids, ``shard_tokens`` per file
    OUT/val_0000.bin ...
    OUT/train_index.bin      per document: int64 start offset in the split's token stream and
    OUT/val_index.bin        int64 source id (position in the manifest's ``sources`` list)
    OUT/manifest.json        recipe, counts per split and per source, shard sha256, content hash

The index is what lets evaluation score whole documents and break the loss down per source
(e.g. per MedQuAD site) without re-reading the corpus.

Every document is preceded by GPT-2's end-of-text token, so the stream starts with EOT and
documents never run into each other. The split is decided per document from a seeded hash of
its split group (or its text), so it is deterministic, streams, and never puts the same
document in both splits. Memory stays bounded: documents are processed in small batches and
shards are written incrementally; only the deduplication set (16 bytes of hash per kept
document) grows with the corpus.

Writes are atomic: shards go to a staging folder inside OUT, and ``manifest.json`` is renamed
into place last, so an interrupted run leaves no manifest (and the next run sweeps the
staging folder). The same inputs and recipe give byte-identical output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medgpt.config import ConfigError, from_mapping, option
from medgpt.data.sources import Document, SourceSpec, read_source
from medgpt.errors import DataError
from medgpt.tokenizer import EOT_ID, N_VOCAB, TOKENIZER_NAME, get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "medgpt-token-shards"
FORMAT_VERSION = 2  # 2: document index files
SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits
INDEX_DTYPE = np.dtype([("start", "<i8"), ("source", "<i8")])
_STAGING_PREFIX = ".staging-"
_SHARD_RE = re.compile(r"^(train|val)_(\d{4,}|index)\.bin$")


@dataclasses.dataclass
class PrepareConfig:
    """What ``medgpt prepare`` builds. ``sources`` entries are URIs or SourceSpec mappings."""

    sources: list[SourceSpec | str] = option(  # noqa: RUF009 - a dataclasses.field
        flag="--source",
        help="a corpus, repeatable: a file or folder (.txt .md .jsonl .csv .parquet, MedQuAD "
        ".xml), builtin:icd10cm, or hf:NAME[:split] (needs network)",
    )
    out: str = option(flag="--out", help="output folder for shards and manifest.json")
    val_fraction: float = option(
        0.05, flag="--val-fraction", help="share of documents for validation (0.05)"
    )
    seed: int = option(1337, flag="--seed", help="seed of the train/val split (1337)")
    shard_tokens: int = option(  # 100 MB per shard
        50_000_000, flag="--shard-tokens", help="tokens per shard file (50000000)"
    )
    dedupe: bool = option(True, flag="--no-dedupe", help="keep exact duplicate documents")
    workers: int = option(  # tokenizer threads; 0 = one per core
        0, flag="--workers", help="tokenizer threads, 0 = all cores (0)"
    )
    overwrite: bool = option(
        False, flag="--overwrite", help="replace a different dataset already in --out"
    )

    def __post_init__(self) -> None:
        specs: list[SourceSpec | str] = []
        for i, s in enumerate(self.sources):
            if isinstance(s, str):
                specs.append(SourceSpec(uri=s))
            elif isinstance(s, Mapping):
                specs.append(from_mapping(SourceSpec, s, prefix=f"sources[{i}]."))
            elif isinstance(s, SourceSpec):
                specs.append(s)
            else:
                raise ConfigError(f"sources[{i}]: expected a URI or a mapping, got {s!r}")
        self.sources = specs
        if not self.sources:
            raise ConfigError("sources: give at least one source")
        if not self.out:
            raise ConfigError("out: must name an output folder")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise ConfigError(f"shard_tokens: must be >= 1, got {self.shard_tokens}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 = all cores), got {self.workers}")

    @property
    def specs(self) -> list[SourceSpec]:
        return [s for s in self.sources if isinstance(s, SourceSpec)]

    def recipe(self) -> dict[str, Any]:
        """Everything that determines the output besides the input files' contents."""
        return {
            "tokenizer": TOKENIZER_NAME,
            "sources": [dataclasses.asdict(s) for s in self.specs],
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "shard_tokens": self.shard_tokens,
            "dedupe": self.dedupe,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareConfig:
        return from_mapping(cls, data)


_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise whitespace: unify newlines, collapse runs of spaces/tabs (including leading
    indentation, which in XML/HTML-derived text is markup, not content) to one space, and keep
    at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def split_of(key: str, seed: int, val_fraction: float) -> str:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


class _ShardWriter:
    """Appends tokens of one split to fixed-size shard files, hashing as it writes."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.tokens = 0

    def _open_next(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open_next()
            take = min(len(tokens) - pos, self.shard_tokens - self._in_shard)
            chunk = tokens[pos : pos + take].tobytes()
            assert self._file is not None
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.tokens += take
            pos += take

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _IndexWriter:
    """Appends one (start, source id) record per document of one split."""

    def __init__(self, folder: Path, split: str) -> None:
        self.name = f"{split}_index.bin"
        self._file = open(folder / self.name, "wb")  # noqa: SIM115 - closed in finish/abort
        self._hash = hashlib.sha256()
        self.documents = 0

    def write(self, start: int, source: int) -> None:
        record = np.array([(start, source)], dtype=INDEX_DTYPE).tobytes()
        self._file.write(record)
        self._hash.update(record)
        self.documents += 1

    def finish(self) -> dict[str, Any]:
        self._file.close()
        return {"file": self.name, "documents": self.documents, "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        self._file.close()


def _batched(
    docs: Iterable[tuple[Document, str]], size: int
) -> Iterator[list[tuple[Document, str]]]:
    batch: list[tuple[Document, str]] = []
    for item in docs:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_out_dir(out: Path, cfg: PrepareConfig) -> dict[str, Any] | None:
    """Refuse an output folder holding something else; return its manifest if it has one."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return None
    for stale in out.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
    manifest_path = out / MANIFEST
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name != MANIFEST and not _SHARD_RE.match(p.name) and not p.name.startswith(".")
    )
    if not manifest_path.exists():
        if foreign or any(_SHARD_RE.match(p.name) for p in out.iterdir()):
            raise DataError(
                f"--out {out} is not empty and holds no {MANIFEST} "
                f"(found {', '.join(foreign[:3]) or 'shards without a manifest'}); "
                "choose an empty or new folder"
            )
        return None
    if foreign:
        raise DataError(
            f"--out {out} holds files that are not part of a dataset: {', '.join(foreign[:3])}"
        )
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        problem = None if isinstance(old, dict) and old.get("format") == FORMAT else "not ours"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        old, problem = None, str(e)
    if problem is None and old.get("format_version") != FORMAT_VERSION:
        return {}  # an older layout of (possibly) the same data: rebuilt and replaced below
    if problem is not None:
        if cfg.overwrite:
            return {}  # replaced wholesale below
        raise DataError(
            f"{manifest_path}: not a readable medgpt manifest ({problem}); remove the folder "
            "or pass --overwrite"
        )
    assert isinstance(old, dict)
    if old.get("recipe") != cfg.recipe() and not cfg.overwrite:
        diff = [k for k in cfg.recipe() if (old.get("recipe") or {}).get(k) != cfg.recipe()[k]]
        raise DataError(
            f"--out {out} already holds a different dataset (recipe differs in: "
            f"{', '.join(diff) or 'format'}); choose another folder or pass --overwrite"
        )
    return old


@dataclasses.dataclass
class PrepareResult:
    """What :func:`prepare` did: the manifest (exactly what ``manifest.json`` holds), whether
    it wrote the folder or found it already up to date, and how long it took."""

    manifest: dict[str, Any]
    status: str  # "written" | "unchanged" (identical output already there)
    seconds: float
    out: str

    @property
    def manifest_path(self) -> Path:
        return Path(self.out) / MANIFEST


def prepare(cfg: PrepareConfig, progress: bool | None = None) -> PrepareResult:
    """Build the token shards and manifest described by ``cfg``."""
    out = Path(cfg.out)
    old_manifest = _check_out_dir(out, cfg)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    started = time.perf_counter()
    try:
        manifest = _build(cfg, staging, progress)
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        if old_manifest == manifest:
            # Same recipe, same input: the folder already holds these exact bytes.
            shutil.rmtree(staging)
            status = "unchanged"
        else:
            if old_manifest and not cfg.overwrite:
                # The recipe matched (checked up front), so the input files changed.
                raise DataError(
                    f"--out {out} already holds a dataset built from different input "
                    f"(content hash {old_manifest.get('content_hash', '?')[:12]} != "
                    f"{manifest['content_hash'][:12]}); choose another folder or pass --overwrite"
                )
            _install(staging, out, manifest_bytes)
            status = "written"
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    return PrepareResult(manifest, status, time.perf_counter() - started, cfg.out)


def _install(staging: Path, out: Path, manifest_bytes: bytes) -> None:
    # Manifest first out, last in: at every instant either no manifest or a complete dataset.
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if _SHARD_RE.match(p.name):
            p.unlink()
    for p in sorted(staging.iterdir()):
        os.replace(p, out / p.name)
    tmp = staging / MANIFEST
    tmp.write_bytes(manifest_bytes)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    staging.rmdir()


def _build(cfg: PrepareConfig, folder: Path, progress: bool | None) -> dict[str, Any]:
    enc = get_tokenizer()
    writers = {s: _ShardWriter(folder, s, cfg.shard_tokens) for s in SPLITS}
    indexes = {s: _IndexWriter(folder, s) for s in SPLITS}
    source_ids: dict[str, int] = {}  # in order of first appearance: deterministic
    per_source: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    )
    dropped = {"empty": 0, "duplicate": 0}
    seen: set[bytes] = set()
    read = 0

    def kept() -> Iterator[tuple[Document, str]]:
        nonlocal read
        for spec in cfg.specs:
            for doc in read_source(spec):
                read += 1
                text = clean_text(doc.text)
                if not text:
                    dropped["empty"] += 1
                    continue
                if cfg.dedupe:
                    h = hashlib.blake2b(text.encode(), digest_size=16).digest()
                    if h in seen:
                        dropped["duplicate"] += 1
                        continue
                    seen.add(h)
                key = doc.group if doc.group is not None else text
                yield (
                    Document(text, doc.source, doc.group),
                    split_of(key, cfg.seed, cfg.val_fraction),
                )

    def encode(batch: list[tuple[Document, str]]) -> list[np.ndarray]:
        # tiktoken releases the GIL while encoding, so threads tokenize in parallel.
        out = []
        for doc, _ in batch:
            ids = enc.encode_ordinary(doc.text)
            arr = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
            arr[0] = EOT_ID
            arr[1:] = ids
            out.append(arr)
        return out

    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(unit=" docs", desc="tokenizing", disable=None if progress is None else not progress)
    pending: list[tuple[list[tuple[Document, str]], Future[list[np.ndarray]]]] = []

    def drain(block_until: int) -> None:
        while len(pending) > block_until:
            batch, fut = pending.pop(0)
            for (doc, split), arr in zip(batch, fut.result(), strict=True):
                sid = source_ids.setdefault(doc.source, len(source_ids))
                indexes[split].write(writers[split].tokens, sid)
                writers[split].write(arr)
                stats = per_source[doc.source][split]
                stats["documents"] += 1
                stats["tokens"] += len(arr)
            bar.update(len(batch))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for batch in _batched(kept(), 256):
                pending.append((batch, pool.submit(encode, batch)))
                drain(2 * workers)  # bounded: at most 2 batches per thread in flight
            drain(0)
        except BaseException:
            for w in [*writers.values(), *indexes.values()]:
                w.abort()
            raise
        finally:
            bar.close()
            for _, fut in pending:
                fut.cancel()
    splits = {}
    for s in SPLITS:
        shards = writers[s].finish()
        docs = sum(v[s]["documents"] for v in per_source.values())
        index = indexes[s].finish()
        assert index["documents"] == docs
        splits[s] = {
            "documents": docs,
            "tokens": writers[s].tokens,
            "shards": shards,
            "index": index,
        }
    total_docs = sum(splits[s]["documents"] for s in SPLITS)
    names = ", ".join(s.uri for s in cfg.specs)
    if total_docs == 0:
        raise DataError(
            f"empty corpus: no documents in {names} "
            f"(read {read}, dropped {dropped['empty']} empty and {dropped['duplicate']} duplicate)"
        )
    for s in SPLITS:
        if splits[s]["documents"] == 0:
            raise DataError(
                f"the {s} split got no documents out of {total_docs} "
                f"(val_fraction {cfg.val_fraction}); add documents or change --val-fraction"
            )
    content = hashlib.sha256()
    for s in SPLITS:
        for shard in splits[s]["shards"]:
            content.update(f"{shard['file']} {shard['tokens']} {shard['sha256']}\n".encode())
        index = splits[s]["index"]
        content.update(f"{index['file']} {index['documents']} {index['sha256']}\n".encode())
    content.update(json.dumps(list(source_ids)).encode())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": TOKENIZER_NAME, "n_vocab": N_VOCAB, "eot": EOT_ID},
        "dtype": "uint16",
        "recipe": cfg.recipe(),
        "splits": splits,
        "per_source": {k: per_source[k] for k in sorted(per_source)},
        "sources": list(source_ids),
        "documents_read": read,
        "dropped": dropped,
        "content_hash": content.hexdigest(),
    }
