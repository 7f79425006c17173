"""Corpus -> token shards (medgpt.data.prepare) and the `medgpt prepare` command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import medgpt.data.prepare as prep
from medgpt.cli import main
from medgpt.data.prepare import (
    INDEX_DTYPE,
    PrepareConfig,
    PrepareResult,
    clean_text,
    prepare,
)
from medgpt.data.sources import SourceSpec
from medgpt.errors import ConfigError, DataError
from medgpt.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
MEDQUAD = Path(__file__).resolve().parents[2] / "shared/data/medquad"
EOT = 50256
EOT_TEXT = "<|endoftext|>"


# --- helpers -----------------------------------------------------------------------------------


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def write_txt_folder(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i:05d}.txt").write_text(t, encoding="utf-8")
    return folder


def run(sources, out: Path, **options) -> PrepareResult:
    srcs = [s if isinstance(s, SourceSpec) else str(s) for s in sources]
    return prepare(PrepareConfig(sources=srcs, out=str(out), **options), progress=False)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def tokens_of(out: Path, split: str) -> np.ndarray:
    shards = manifest_of(out)["splits"][split]["shards"]
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in shards]
    return np.concatenate(parts) if parts else np.empty(0, dtype="<u2")


def docs_of(out: Path, split: str) -> list[str]:
    """Decode a split back into its documents (the stream is EOT doc EOT doc ...)."""
    toks = tokens_of(out, split)
    assert toks[0] == EOT
    text = get_tokenizer().decode(toks.tolist())
    assert text.startswith(EOT_TEXT)
    return text[len(EOT_TEXT) :].split(EOT_TEXT)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder (hidden ones too) with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def note(i: int) -> str:
    """A small distinct document with messy whitespace to clean."""
    return (
        f"Patient  {i}\t has\r\nfever   and cough since day {i * 7 % 31}.\n\n\n\n"
        f"   Follow-up in {i % 9 + 1} weeks.  "
    )


def clean_note(i: int) -> str:
    return (
        f"Patient {i} has\nfever and cough since day {i * 7 % 31}.\n\n"
        f"Follow-up in {i % 9 + 1} weeks."
    )


@pytest.fixture
def corpus(tmp_path) -> tuple[list[Path], list[str]]:
    """Two sources (a folder of .txt and a .jsonl) and their cleaned documents, in order."""
    folder = write_txt_folder(tmp_path / "src" / "notes", [note(i) for i in range(30)])
    jsonl = write_jsonl(
        tmp_path / "src" / "qa.jsonl",
        [f"Q{i}: what helps a cough? A: honey, rest ({i})." for i in range(30)],
    )
    cleaned = [clean_note(i) for i in range(30)] + [
        f"Q{i}: what helps a cough? A: honey, rest ({i})." for i in range(30)
    ]
    return [folder, jsonl], cleaned


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory) -> Path:
    """3000 tiny distinct documents in one .jsonl (several tokenizer batches)."""
    path = tmp_path_factory.mktemp("many") / "many.jsonl"
    return write_jsonl(
        path, [f"note {i}: pulse {60 + i % 40}, temp {36 + i % 5}.{i % 10}" for i in range(3000)]
    )


def open_files_under(folder: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    found = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


# --- output layout -----------------------------------------------------------------------------


def test_output_layout_and_manifest(tmp_path, corpus):
    sources, cleaned = corpus
    out = tmp_path / "out"
    m = run(sources, out, shard_tokens=64, val_fraction=0.3, seed=5)

    assert m.status == "written"
    assert m.seconds > 0 and m.out == str(out) and m.manifest_path == out / "manifest.json"
    disk = manifest_of(out)
    # The result carries the manifest exactly as written: nothing of the run's own mixed in.
    assert m.manifest == disk
    assert disk["format"] == "medgpt-token-shards"
    assert disk["format_version"] == 2
    assert disk["dtype"] == "uint16"
    assert disk["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": EOT}
    assert disk["documents_read"] == 60
    assert disk["dropped"] == {"empty": 0, "duplicate": 0}
    assert len(disk["content_hash"]) == 64
    int(disk["content_hash"], 16)

    expected_files = {"manifest.json"}
    for split in ("train", "val"):
        info = disk["splits"][split]
        shards = info["shards"]
        assert [s["file"] for s in shards] == [f"{split}_{i:04d}.bin" for i in range(len(shards))]
        assert len(shards) > 1, f"{split} should span several 64-token shards"
        assert all(s["tokens"] == 64 for s in shards[:-1])
        assert 1 <= shards[-1]["tokens"] <= 64
        assert sum(s["tokens"] for s in shards) == info["tokens"]
        for s in shards:
            data = (out / s["file"]).read_bytes()
            assert len(data) == 2 * s["tokens"]  # uint16
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
            expected_files.add(s["file"])
        toks = tokens_of(out, split)
        assert toks.max() <= EOT
        assert int((toks == EOT).sum()) == info["documents"]
        # The document index: one record per document, at its EOT, naming its source.
        index = np.fromfile(out / info["index"]["file"], dtype=INDEX_DTYPE)
        assert info["index"]["file"] == f"{split}_index.bin"
        assert info["index"]["documents"] == len(index) == info["documents"]
        assert hashlib.sha256(index.tobytes()).hexdigest() == info["index"]["sha256"]
        expected_files.add(info["index"]["file"])
        assert index["start"].tolist() == np.flatnonzero(toks == EOT).tolist()
        names = [disk["sources"][i] for i in index["source"]]
        for name in disk["per_source"]:
            assert names.count(name) == disk["per_source"][name][split]["documents"]
        # per-source counts add up to the split totals
        assert sum(v[split]["documents"] for v in disk["per_source"].values()) == info["documents"]
        assert sum(v[split]["tokens"] for v in disk["per_source"].values()) == info["tokens"]
    assert {p.name for p in out.iterdir()} == expected_files  # no staging folder left
    assert set(disk["per_source"]) == {"notes", "qa.jsonl"}
    assert (
        disk["per_source"]["notes"]["train"]["documents"]
        + disk["per_source"]["notes"]["val"]["documents"]
        == 30
    )

    # Tokens decode back to the cleaned documents, each split in input order.
    train, val = docs_of(out, "train"), docs_of(out, "val")
    assert sorted(train + val) == sorted(cleaned)
    assert train == [d for d in cleaned if d in set(train)]
    assert val == [d for d in cleaned if d in set(val)]
    assert len(train) == disk["splits"]["train"]["documents"]
    assert len(val) == disk["splits"]["val"]["documents"]


def test_tokens_are_gpt2_encoding_of_each_document(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, shard_tokens=50, val_fraction=0.3)
    enc = get_tokenizer()
    expected = []
    for doc in docs_of(out, "train"):
        expected += [EOT, *enc.encode_ordinary(doc)]
    assert tokens_of(out, "train").tolist() == expected


def test_literal_endoftext_in_a_document_is_ordinary_text(tmp_path):
    texts = [f"doc {i}" for i in range(40)] + ["before <|endoftext|> after"]
    out = tmp_path / "out"
    m = run([write_jsonl(tmp_path / "c.jsonl", texts)], out, val_fraction=0.3)
    n_eot = sum(int((tokens_of(out, s) == EOT).sum()) for s in ("train", "val"))
    assert (
        n_eot
        == m.manifest["splits"]["train"]["documents"] + m.manifest["splits"]["val"]["documents"]
        == 41
    )


# --- cleaning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb\rc", "a\nb\nc"),
        ("  x \t\t y   z\t", "x y z"),
        ("p1\n\n\n\n\np2", "p1\n\np2"),
        ("p1\n   \n\t\n \np2", "p1\n\np2"),
        ("p1\n\np2", "p1\n\np2"),
        ("\n\n  \t\r\n", ""),
        ("    indented\n\tcode", "indented\ncode"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_empty_and_duplicate_documents_dropped_and_counted(tmp_path):
    filler = [f"filler document number {i}" for i in range(40)]
    texts = ["alpha beta", "   \n\t ", "alpha   beta\r\n", "", "gamma", "alpha beta", *filler]
    src = write_txt_folder(tmp_path / "c", texts)

    m = run([src], tmp_path / "dedup", val_fraction=0.3)
    assert m.manifest["documents_read"] == 46
    assert m.manifest["dropped"] == {"empty": 2, "duplicate": 2}
    assert (
        m.manifest["splits"]["train"]["documents"] + m.manifest["splits"]["val"]["documents"] == 42
    )
    docs = docs_of(tmp_path / "dedup", "train") + docs_of(tmp_path / "dedup", "val")
    assert docs.count("alpha beta") == 1
    assert "" not in docs

    m = run([src], tmp_path / "keep", val_fraction=0.3, dedupe=False)
    assert m.manifest["dropped"] == {"empty": 2, "duplicate": 0}
    assert (
        m.manifest["splits"]["train"]["documents"] + m.manifest["splits"]["val"]["documents"] == 44
    )
    docs = docs_of(tmp_path / "keep", "train") + docs_of(tmp_path / "keep", "val")
    assert docs.count("alpha beta") == 3
    # duplicates share a split (the split is decided by the text)
    assert docs_of(tmp_path / "keep", "train").count("alpha beta") in (0, 3)


# --- split -------------------------------------------------------------------------------------


def test_split_is_deterministic_and_seeded(tmp_path, corpus):
    sources, _ = corpus
    run(sources, tmp_path / "a", seed=1, val_fraction=0.3)
    run(sources, tmp_path / "b", seed=1, val_fraction=0.3)
    run(sources, tmp_path / "c", seed=2, val_fraction=0.3)

    assert (tmp_path / "a/manifest.json").read_bytes() == (
        tmp_path / "b/manifest.json"
    ).read_bytes()
    assert docs_of(tmp_path / "a", "val") == docs_of(tmp_path / "b", "val")
    assert set(docs_of(tmp_path / "a", "val")) != set(docs_of(tmp_path / "c", "val"))
    for out in (tmp_path / "a", tmp_path / "c"):
        train, val = set(docs_of(out, "train")), set(docs_of(out, "val"))
        assert train and val
        assert not train & val


def test_val_share_is_near_val_fraction(tmp_path, many_docs):
    m = run([many_docs], tmp_path / "out", val_fraction=0.1, seed=3)
    n_train, n_val = (
        m.manifest["splits"]["train"]["documents"],
        m.manifest["splits"]["val"]["documents"],
    )
    assert n_train + n_val == 3000
    assert 0.08 < n_val / 3000 < 0.12
    assert not set(docs_of(tmp_path / "out", "train")) & set(docs_of(tmp_path / "out", "val"))


def test_medquad_groups_stay_in_one_split(tmp_path):
    root = tmp_path / "medquad" / "3_GHR_QA"
    root.mkdir(parents=True)
    for f in range(40):
        pairs = "".join(
            f'<QAPair pid="{k}"><Question qid="{f}-{k}">What is topic {f} question {k} ?</Question>'
            f"<Answer>Topic {f} answer {k}.</Answer></QAPair>"
            for k in range(3)
        )
        (root / f"{f:07d}.xml").write_text(
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Document id="{f:07d}" source="GHR">'
            f"<QAPairs>{pairs}</QAPairs></Document>",
            encoding="utf-8",
        )
    out = tmp_path / "out"
    m = run([tmp_path / "medquad"], out, val_fraction=0.3, seed=11)
    assert set(m.manifest["per_source"]) == {"GHR"}
    split_of_topic: dict[int, set[str]] = {}
    for split in ("train", "val"):
        for doc in docs_of(out, split):
            topic = int(doc.split("topic ")[1].split(" ")[0])
            split_of_topic.setdefault(topic, set()).add(split)
    assert len(split_of_topic) == 40
    assert all(len(s) == 1 for s in split_of_topic.values()), split_of_topic
    assert {next(iter(s)) for s in split_of_topic.values()} == {"train", "val"}
    assert m.manifest["splits"]["train"]["documents"] % 3 == 0
    assert m.manifest["splits"]["val"]["documents"] % 3 == 0


def test_parallel_tokenisation_is_identical(tmp_path, many_docs):
    run([many_docs], tmp_path / "w1", workers=1, shard_tokens=1000)
    run([many_docs], tmp_path / "w2", workers=2, shard_tokens=1000)
    a, b = snapshot(tmp_path / "w1"), snapshot(tmp_path / "w2")
    assert len(a) > 10
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}


# --- reruns ------------------------------------------------------------------------------------


def test_byte_identical_output_in_two_folders(tmp_path, corpus):
    sources, _ = corpus
    run(sources, tmp_path / "one", shard_tokens=64, val_fraction=0.3)
    run(sources, tmp_path / "two", shard_tokens=64, val_fraction=0.3)
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    # The manifest does not embed the output path, so it is byte-identical too.
    assert "one" not in (tmp_path / "one/manifest.json").read_text(encoding="utf-8")
    assert {k: v[0] for k, v in one.items()} == {k: v[0] for k, v in two.items()}
    assert "manifest.json" in one


def test_rerun_into_same_folder_is_unchanged(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out"
    first = run(sources, out, shard_tokens=64, val_fraction=0.3)
    before = snapshot(out)
    again = run(sources, out, shard_tokens=64, val_fraction=0.3)
    assert again.status == "unchanged"
    assert again.manifest["content_hash"] == first.manifest["content_hash"]
    assert snapshot(out) == before  # bytes and mtimes
    assert not list(out.glob(".staging-*"))


def test_dataset_of_an_older_format_is_rebuilt_in_place(tmp_path, corpus):
    # A folder prepared by an older medgpt (format 1, no document index) with the same recipe
    # is upgraded by running prepare again, without --overwrite.
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, shard_tokens=64, val_fraction=0.3)
    manifest = manifest_of(out)
    manifest["format_version"] = 1
    for split in ("train", "val"):
        (out / manifest["splits"][split].pop("index")["file"]).unlink()
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    m = run(sources, out, shard_tokens=64, val_fraction=0.3)
    assert m.status == "written"
    assert manifest_of(out)["format_version"] == 2
    assert (out / "val_index.bin").is_file()


def test_stale_staging_folder_is_swept(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, val_fraction=0.3)
    stale = out / ".staging-xyz"
    stale.mkdir()
    (stale / "train_0000.bin").write_bytes(b"\x00\x01" * 10)
    m = run(sources, out, val_fraction=0.3)
    assert m.status == "unchanged"
    assert not stale.exists()

    fresh = tmp_path / "fresh"
    (fresh / ".staging-abc").mkdir(parents=True)
    run(sources, fresh, val_fraction=0.3)
    assert not (fresh / ".staging-abc").exists()
    assert (fresh / "manifest.json").is_file()


# --- atomicity ---------------------------------------------------------------------------------


def interrupting_reader(out: Path, n_before: int, saw_shards: list[int]):
    """A read_source that yields n_before documents, then is interrupted (Ctrl-C)."""

    def fake(spec):
        for i in range(n_before):
            yield prep.Document(f"document {i} of an interrupted run", "fake")
        saw_shards.append(len(list(out.glob(".staging-*/*.bin"))))
        raise KeyboardInterrupt

    return fake


@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "existing-empty-folder"])
def test_interrupted_run_leaves_the_folder_as_it_was(tmp_path, monkeypatch, existed):
    out = tmp_path / "out"
    if existed:
        out.mkdir()
    saw: list[int] = []
    monkeypatch.setattr(prep, "read_source", interrupting_reader(out, 3000, saw))
    with pytest.raises(KeyboardInterrupt):
        run(["fake.jsonl"], out, workers=1, shard_tokens=500)
    assert saw and saw[0] > 0, "shards should have been written before the interruption"
    if existed:  # it was there before: kept, and empty
        assert out.is_dir() and list(out.iterdir()) == []
    else:
        assert not out.exists()


def good_then_broken(src: Path, broken: str, n_good: int = 3000) -> Path:
    """A source folder whose first file has ``n_good`` documents (enough to write shards)
    and whose second, b.jsonl, is ``broken``."""
    src.mkdir()
    write_jsonl(src / "a.jsonl", [f"good document {i}" for i in range(n_good)])
    (src / "b.jsonl").write_text(broken, encoding="utf-8")
    return src


def test_failing_source_leaves_nothing(tmp_path):
    src = good_then_broken(tmp_path / "src", '{"text": "fine"}\n{"text": broken}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        run([src], out, shard_tokens=500, workers=1)
    assert f"{src / 'b.jsonl'}:2:" in str(e.value)
    assert not out.exists()


def test_failed_build_leaves_no_open_files(tmp_path):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd (Linux) to list open files")
    src = good_then_broken(tmp_path / "src", "{broken\n")
    with pytest.raises(DataError) as e:
        run([src], tmp_path / "out", shard_tokens=500, workers=1)
    # While the error is still alive (as it is when prepare() cleans up its staging folder, and
    # in any caller that keeps it), the shard files of the aborted build must already be closed:
    # an open file keeps the staging folder from being removed on Windows and leaks descriptors.
    assert "malformed JSON" in str(e.value)
    assert open_files_under(tmp_path) == []


def test_failed_overwrite_keeps_previous_dataset(tmp_path, corpus, monkeypatch):
    sources, _ = corpus
    out = tmp_path / "out"
    good = run(sources, out, shard_tokens=64, val_fraction=0.3, seed=1)
    before = snapshot(out)

    bad = good_then_broken(tmp_path / "bad", "not json\n", n_good=2000)
    with pytest.raises(DataError, match="malformed JSON"):
        run([bad], out, shard_tokens=64, val_fraction=0.3, seed=2, overwrite=True, workers=1)
    assert snapshot(out) == before

    saw: list[int] = []
    monkeypatch.setattr(prep, "read_source", interrupting_reader(out, 3000, saw))
    with pytest.raises(KeyboardInterrupt):
        run(sources, out, shard_tokens=64, val_fraction=0.3, seed=3, overwrite=True, workers=1)
    assert saw[0] > 0
    assert snapshot(out) == before
    assert manifest_of(out)["content_hash"] == good.manifest["content_hash"]


# --- output folder conflicts -------------------------------------------------------------------


def test_folder_with_other_dataset_is_refused(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, val_fraction=0.3, seed=1, shard_tokens=64)
    before = snapshot(out)

    with pytest.raises(DataError, match=r"different dataset \(recipe differs in: seed\)"):
        run(sources, out, val_fraction=0.3, seed=2, shard_tokens=64)
    with pytest.raises(DataError, match=r"recipe differs in: sources"):
        run(sources[:1], out, val_fraction=0.3, seed=1, shard_tokens=64)
    with pytest.raises(DataError, match="--overwrite"):
        run(sources, out, val_fraction=0.3, seed=1, shard_tokens=32)
    assert snapshot(out) == before


def test_overwrite_replaces_dataset(tmp_path, corpus):
    sources, cleaned = corpus
    out = tmp_path / "out"
    old = run(sources, out, val_fraction=0.3, seed=1, shard_tokens=32)
    n_old_files = len(list(out.iterdir()))
    new = run(sources, out, val_fraction=0.3, seed=2, shard_tokens=256, overwrite=True)
    assert new.status == "written"
    assert new.manifest["content_hash"] != old.manifest["content_hash"]
    disk = manifest_of(out)
    assert disk["recipe"]["seed"] == 2
    assert disk["recipe"]["shard_tokens"] == 256
    listed = {s["file"] for sp in ("train", "val") for s in disk["splits"][sp]["shards"]}
    listed |= {disk["splits"][sp]["index"]["file"] for sp in ("train", "val")}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}  # old shards gone
    assert len(listed) + 1 < n_old_files
    assert sorted(docs_of(out, "train") + docs_of(out, "val")) == sorted(cleaned)


def test_changed_input_same_recipe_needs_overwrite(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [f"document {i}" for i in range(40)])
    out = tmp_path / "out"
    run([src], out, val_fraction=0.3)
    before = snapshot(out)
    write_jsonl(src, [f"document {i} (edited)" for i in range(40)])
    with pytest.raises(DataError, match="different input") as e:
        run([src], out, val_fraction=0.3)
    assert "--overwrite" in str(e.value)
    assert snapshot(out) == before
    assert not list(out.glob(".staging-*"))
    m = run([src], out, val_fraction=0.3, overwrite=True)
    assert m.status == "written"
    assert all(d.endswith("(edited)") for d in docs_of(out, "train"))


def test_overwrite_with_new_recipe_but_same_shards_updates_manifest(tmp_path):
    # dedupe off changes the recipe but not the shards (no duplicates in this corpus).
    src = write_jsonl(tmp_path / "c.jsonl", [f"document {i}" for i in range(40)])
    out = tmp_path / "out"
    run([src], out, val_fraction=0.3)
    m = run([src], out, val_fraction=0.3, dedupe=False, overwrite=True)
    assert m.manifest["recipe"]["dedupe"] is False
    assert manifest_of(out)["recipe"]["dedupe"] is False, (
        "manifest on disk still has the old recipe"
    )
    # ... so that the same recipe is accepted again without --overwrite
    assert run([src], out, val_fraction=0.3, dedupe=False).status == "unchanged"


def test_folder_with_unrelated_files_is_refused(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="not empty") as e:
        run(sources, out, val_fraction=0.3)
    assert "notes.txt" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # even next to a dataset, and even with --overwrite
    out2 = tmp_path / "out2"
    run(sources, out2, val_fraction=0.3)
    (out2 / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt"):
        run(sources, out2, val_fraction=0.3, seed=9, overwrite=True)
    assert (out2 / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_out_is_a_file(tmp_path, corpus):
    sources, _ = corpus
    out = tmp_path / "out.bin"
    out.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder") as e:
        run(sources, out, val_fraction=0.3)
    assert str(out) in str(e.value)
    assert out.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "not a readable medgpt manifest"), ("[]", "manifest")],
    ids=["unreadable", "not-an-object"],
)
def test_bad_manifest_is_refused(tmp_path, corpus, text, match):
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, val_fraction=0.3)
    (out / "manifest.json").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        run(sources, out, val_fraction=0.3)


def test_unreadable_manifest_is_replaced_with_overwrite(tmp_path, corpus):
    # The error for an unreadable manifest says "remove the folder or pass --overwrite".
    sources, _ = corpus
    out = tmp_path / "out"
    run(sources, out, val_fraction=0.3)
    (out / "manifest.json").write_text("{not json", encoding="utf-8")
    m = run(sources, out, val_fraction=0.3, overwrite=True)
    assert m.status == "written"
    assert manifest_of(out)["content_hash"] == m.manifest["content_hash"]


# --- too little data ---------------------------------------------------------------------------


def test_empty_corpus(tmp_path):
    src = write_txt_folder(tmp_path / "c", ["", "   ", "\n\t\n", "\r\n"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="empty corpus") as e:
        run([src], out)
    assert str(src) in str(e.value)
    assert "dropped 4 empty" in str(e.value)
    assert not out.exists()


def test_split_without_documents(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", ["A single short note about asthma."])
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"the val split got no documents out of 1 \(val_fraction 0.05\)"
    ):
        run([src], out, val_fraction=0.05)
    assert not out.exists()


# --- PrepareConfig -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"val_fraction": 0}, "val_fraction"),
        ({"val_fraction": 1}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"shard_tokens": 0}, "shard_tokens"),
        ({"workers": -1}, "workers"),
        ({"sources": []}, "sources"),
        ({"out": ""}, "out"),
    ],
)
def test_prepare_config_validation(options, key):
    kwargs = {"sources": ["c.jsonl"], "out": "out", **options}
    with pytest.raises(ConfigError) as e:
        PrepareConfig(**kwargs)
    assert str(e.value).startswith(f"{key}:")


def test_prepare_config_unknown_key():
    with pytest.raises(ConfigError) as e:
        PrepareConfig.from_dict({"sources": ["c.jsonl"], "out": "o", "shard_size": 10})
    msg = str(e.value)
    assert "unknown key shard_size" in msg
    for allowed in (
        "dedupe",
        "out",
        "overwrite",
        "seed",
        "shard_tokens",
        "sources",
        "val_fraction",
        "workers",
    ):
        assert allowed in msg


def test_prepare_config_unknown_source_key():
    with pytest.raises(ConfigError) as e:
        PrepareConfig.from_dict({"sources": [{"uri": "c.jsonl", "field": "body"}], "out": "o"})
    assert "unknown key sources[0].field" in str(e.value)
    assert "text_field" in str(e.value)


def test_prepare_config_wrong_type():
    with pytest.raises(ConfigError, match="seed: expected int"):
        PrepareConfig.from_dict({"sources": ["c.jsonl"], "out": "o", "seed": "7"})


def test_prepare_config_source_mappings_from_dict():
    cfg = PrepareConfig.from_dict(
        {
            "sources": ["a.jsonl", {"uri": "b.jsonl", "text_field": "body", "name": "bee"}],
            "out": "o",
        }
    )
    assert cfg.specs == [
        SourceSpec(uri="a.jsonl"),
        SourceSpec(uri="b.jsonl", text_field="body", name="bee"),
    ]


def test_prepare_config_source_mapping_is_not_silently_dropped():
    # The class docstring says sources entries are "URIs or SourceSpec mappings": a mapping
    # passed to the constructor must be used (or rejected), never ignored.
    try:
        cfg = PrepareConfig(sources=["a.jsonl", {"uri": "b.jsonl", "text_field": "body"}], out="o")
    except ConfigError:
        return
    assert [s.uri for s in cfg.specs] == ["a.jsonl", "b.jsonl"]
    assert [s["uri"] for s in cfg.recipe()["sources"]] == ["a.jsonl", "b.jsonl"]


# --- command line ------------------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "prepare" in capsys.readouterr().out

    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--source", "--out", "--config", "--val-fraction", "--no-dedupe", "--overwrite"):
        assert flag in out


def test_console_script_help():
    script = Path(sys.executable).with_name("medgpt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "medgpt.cli"]
    proc = subprocess.run([*cmd, "prepare", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--source" in proc.stdout and "--out" in proc.stdout


def test_cli_prepare_prints_summary(tmp_path, corpus, capsys):
    sources, _ = corpus
    out = tmp_path / "out"
    argv = ["prepare", "--out", str(out), "--val-fraction", "0.3"]
    for s in sources:
        argv += ["--source", str(s)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "written" in stdout
    assert "notes" in stdout and "qa.jsonl" in stdout
    assert manifest_of(out)["content_hash"][:16] in stdout

    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_yaml_config_with_per_source_options(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [f"body text {i}" for i in range(40)], field="body")
    out = tmp_path / "out"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"sources:\n  - uri: {jsonl}\n    text_field: body\n    name: notes\n"
        f"out: {out}\nval_fraction: 0.3\nseed: 7\nshard_tokens: 64\n",
        encoding="utf-8",
    )
    assert main(["prepare", "--config", str(cfg), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    m = manifest_of(out)
    assert m["recipe"]["seed"] == 7
    assert m["recipe"]["shard_tokens"] == 64
    assert m["recipe"]["sources"][0]["text_field"] == "body"
    assert list(m["per_source"]) == ["notes"]
    assert sorted(docs_of(out, "train") + docs_of(out, "val")) == sorted(
        f"body text {i}" for i in range(40)
    )

    # flags override the recipe; sources and their options stay from the recipe
    out2 = tmp_path / "out2"
    argv = [
        "prepare",
        "--config",
        str(cfg),
        "--out",
        str(out2),
        "--seed",
        "9",
        "--shard-tokens",
        "128",
    ]
    assert main([*argv, "--quiet", "--no-dedupe"]) == 0
    m2 = manifest_of(out2)
    assert (m2["recipe"]["seed"], m2["recipe"]["shard_tokens"], m2["recipe"]["dedupe"]) == (
        9,
        128,
        False,
    )
    assert m2["recipe"]["val_fraction"] == 0.3
    assert list(m2["per_source"]) == ["notes"]

    # --source replaces the recipe's sources, --text-field applies to them
    out3 = tmp_path / "out3"
    assert (
        main(
            [
                "prepare",
                "--config",
                str(cfg),
                "--out",
                str(out3),
                "--source",
                str(jsonl),
                "--text-field",
                "body",
                "--quiet",
            ]
        )
        == 0
    )
    m3 = manifest_of(out3)
    assert m3["recipe"]["sources"][0]["name"] is None
    assert list(m3["per_source"]) == ["c.jsonl"]


def test_cli_missing_out(tmp_path, capsys):
    assert main(["prepare", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "medgpt prepare: error: missing --out (or 'out' in --config)\n"


def test_cli_missing_source(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "missing --source" in capsys.readouterr().err


def test_cli_keyboard_interrupt(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(prep, "read_source", interrupting_reader(out, 10, []))
    assert main(["prepare", "--source", "x.jsonl", "--out", str(out), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()


def _bad(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """argv (after `prepare`, without --out) for one bad input, and a fragment of the error."""
    if case == "missing path":
        return ["--source", str(tmp_path / "nope")], "no such file or directory"
    if case == "non-utf8 txt":
        (tmp_path / "a.txt").write_bytes(b"caf\xe9")
        return ["--source", str(tmp_path / "a.txt")], f"{tmp_path / 'a.txt'}: not UTF-8"
    if case == "non-utf8 jsonl":
        (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
        return ["--source", str(tmp_path / "a.jsonl")], f"{tmp_path / 'a.jsonl'}:2: not UTF-8"
    if case == "malformed json":
        (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{oops\n', encoding="utf-8")
        return ["--source", str(tmp_path / "a.jsonl")], f"{tmp_path / 'a.jsonl'}:3: malformed JSON"
    if case == "json list":
        (tmp_path / "a.jsonl").write_text("[1, 2]\n", encoding="utf-8")
        return ["--source", str(tmp_path / "a.jsonl")], "expected a JSON object"
    if case == "no text field":
        write_jsonl(tmp_path / "a.jsonl", ["x"], field="body")
        return ["--source", str(tmp_path / "a.jsonl")], "fields present: body"
    if case == "csv column":
        (tmp_path / "a.csv").write_text("id,body\n1,x\n", encoding="utf-8")
        return ["--source", str(tmp_path / "a.csv"), "--text-field", "note"], "columns: id, body"
    if case == "parquet column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
        return ["--source", str(tmp_path / "a.parquet")], "no column 'text'"
    if case == "malformed xml":
        (tmp_path / "a.xml").write_text("<Document>\n<QAPairs>\n</Document>\n", encoding="utf-8")
        return ["--source", str(tmp_path / "a.xml")], f"{tmp_path / 'a.xml'}:3: malformed XML"
    if case == "xml root":
        (tmp_path / "a.xml").write_text("<html/>", encoding="utf-8")
        return ["--source", str(tmp_path / "a.xml")], "expected <Document>"
    if case == "ftp":
        return ["--source", "ftp:x"], "unknown source scheme 'ftp:'"
    if case == "builtin":
        return ["--source", "builtin:nope"], "unknown builtin corpus"
    if case == "hf empty":
        return ["--source", "hf:"], "needs a dataset name"
    if case == "pdf":
        (tmp_path / "a.pdf").write_bytes(b"%PDF")
        return ["--source", str(tmp_path / "a.pdf")], "unsupported file type '.pdf'"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return ["--source", str(tmp_path / "empty")], "no readable files"
    if case == "question without answer":
        return ["--source", "a.jsonl", "--question-field", "q"], "question_field and answer_field"
    if case == "template":
        argv = ["--source", "a.jsonl", "--question-field", "q", "--answer-field", "a"]
        return [*argv, "--template", "Q: {question}"], "template"
    if case == "val fraction":
        return ["--source", "a.jsonl", "--val-fraction", "1"], "val_fraction"
    if case == "unknown yaml key":
        (tmp_path / "r.yaml").write_text("sources: [a.jsonl]\nshard_size: 5\n", encoding="utf-8")
        return ["--config", str(tmp_path / "r.yaml")], "unknown key shard_size (allowed: "
    if case == "bad yaml":
        (tmp_path / "r.yaml").write_text("sources: [a.jsonl\n", encoding="utf-8")
        return ["--config", str(tmp_path / "r.yaml")], "not valid YAML"
    if case == "missing yaml":
        return ["--config", str(tmp_path / "nope.yaml")], "config file not found"
    if case == "empty corpus":
        (tmp_path / "e.txt").write_text("  \n", encoding="utf-8")
        return ["--source", str(tmp_path / "e.txt")], "empty corpus"
    if case == "text field without source":
        (tmp_path / "r.yaml").write_text("sources: [a.jsonl]\n", encoding="utf-8")
        return ["--config", str(tmp_path / "r.yaml"), "--text-field", "x"], "need --source"
    raise AssertionError(case)


BAD_CASES = [
    "missing path",
    "non-utf8 txt",
    "non-utf8 jsonl",
    "malformed json",
    "json list",
    "no text field",
    "csv column",
    "parquet column",
    "malformed xml",
    "xml root",
    "ftp",
    "builtin",
    "hf empty",
    "pdf",
    "empty folder",
    "question without answer",
    "template",
    "val fraction",
    "unknown yaml key",
    "bad yaml",
    "missing yaml",
    "empty corpus",
    "text field without source",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    argv, fragment = _bad(tmp_path, case)
    out = tmp_path / "out"
    assert main(["prepare", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("medgpt prepare: error: "), err
    assert fragment in err
    assert not out.exists()


def test_cli_out_is_a_file(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [f"doc {i}" for i in range(40)])
    (tmp_path / "out").write_text("x", encoding="utf-8")
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medgpt prepare: error: --out ") and "not a folder" in err
    assert err.count("\n") == 1


def test_cli_bad_flag_value_exits_2_naming_flag_key_and_type(tmp_path, capsys):
    argv = ["prepare", "--source", "a.jsonl", "--out", str(tmp_path / "o")]
    assert main([*argv, "--seed", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "medgpt prepare: error: --seed: seed: expected int, got 'abc'\n"
    # A range the dataclass checks names the key, as the same key in a recipe would.
    assert main([*argv, "--val-fraction", "2"]) == 2
    assert "val_fraction: must be in (0, 1), got 2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an unknown flag is still argparse's
        main([*argv, "--sed", "3"])
    assert e.value.code == 2


def test_jobs_script(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [f"a clinical note {i}" for i in range(40)])
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/prepare_data.py",
            "--source",
            str(src),
            "--out",
            str(out),
            "--val-fraction",
            "0.3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "written" in proc.stdout
    m = manifest_of(out)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40


# --- real data ---------------------------------------------------------------------------------


def test_real_medquad(tmp_path):
    if not MEDQUAD.is_dir():
        pytest.skip(f"real MedQuAD sample not found at {MEDQUAD}")
    out = tmp_path / "medquad"
    m = run([MEDQUAD], out).manifest
    assert {"CancerGov", "GARD", "GHR"} <= set(m["per_source"])
    assert m["splits"]["train"]["tokens"] > 1_000_000
    assert m["splits"]["val"]["tokens"] > 10_000
    assert m["documents_read"] > 10_000
    assert (out / "manifest.json").is_file()
