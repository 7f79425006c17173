"""Corpus readers (medgpt.data.sources): every source is a stream of Documents, and every problem
with the input is a DataError/ConfigError naming the file (and line)."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medgpt.data.sources import SourceSpec, icd10cm_xml_path, read_source
from medgpt.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
MEDQUAD = Path(__file__).resolve().parents[2] / "shared/data/medquad"


def read(uri: str | Path, **options) -> list:
    return list(read_source(SourceSpec(uri=str(uri), **options)))


def texts(uri: str | Path, **options) -> list[str]:
    return [d.text for d in read(uri, **options)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def medquad_xml(source: str, doc_id: str, pairs: list[tuple[str, str | None]]) -> str:
    """A file in MedQuAD's layout; an answer of None leaves the <Answer> element out."""
    body = []
    for i, (q, a) in enumerate(pairs, start=1):
        answer = "" if a is None else f"\n\t\t\t<Answer>{a}</Answer>"
        body.append(
            f'\t<QAPair pid="{i}">\n\t\t\t<Question qid="{doc_id}-{i}" qtype="information">'
            f"{q}</Question>{answer}\n\t</QAPair>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Document id="{doc_id}" source="{source}" url="https://example.org/{doc_id}">\n'
        f"<Focus>{doc_id}</Focus>\n<QAPairs>\n" + "\n".join(body) + "\n</QAPairs>\n</Document>\n"
    )


# --- plain text --------------------------------------------------------------------------------


def test_text_folder_one_document_per_file_sorted_recursive(tmp_path):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("beta", encoding="utf-8")
    (root / "a.md").write_text("# alpha\n\nfirst", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("gamma", encoding="utf-8")
    (root / "sub" / "d.txt").write_bytes("\ufeffdelta with BOM".encode())
    # Not part of the corpus: hidden files and folders, README/LICENSE, unsupported types.
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git" / "x.txt").write_text("git internals", encoding="utf-8")
    (root / "README.md").write_text("about this corpus", encoding="utf-8")
    (root / "LICENSE.txt").write_text("license text", encoding="utf-8")
    (root / "sub" / "readme.txt").write_text("nested readme", encoding="utf-8")
    (root / "scan.pdf").write_bytes(b"%PDF-1.4")

    docs = read(root)

    assert [d.text for d in docs] == ["# alpha\n\nfirst", "beta", "gamma", "delta with BOM"]
    assert {d.source for d in docs} == {"notes"}
    assert all(d.group is None for d in docs)


def test_readme_named_directly_is_read(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("read me anyway", encoding="utf-8")
    assert texts(readme) == ["read me anyway"]


def test_source_name_overrides_label(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    assert [d.source for d in read(tmp_path / "a.txt", name="clinic")] == ["clinic"]
    assert [d.source for d in read(tmp_path / "a.txt")] == ["a.txt"]


# --- jsonl -------------------------------------------------------------------------------------


def test_jsonl_default_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"text": "one", "id": 1}\n\n   \n{"text": "two"}\n{"text": null}\n{"text": "three"}\n',
        encoding="utf-8",
    )
    docs = read(path)
    assert [d.text for d in docs] == ["one", "two", "three"]
    assert {d.source for d in docs} == {"c.jsonl"}


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"body": "first note", "text": "ignored"}, {"body": "second"}]
    )
    assert texts(path, text_field="body") == ["first note", "second"]


def test_jsonl_question_answer_template_skips_unanswered(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"q": "  What is fever? ", "a": " A raised temperature.\n", "x": 1},
            {"q": "Unanswered?", "a": ""},
            {"q": "Whitespace answer?", "a": "   "},
            {"q": "Null answer?", "a": None},
            {"q": "What is a cough?", "a": "A reflex."},
        ],
    )
    assert texts(
        path, question_field="q", answer_field="a", template="Q: {question}\nA: {answer}"
    ) == [
        "Q: What is fever?\nA: A raised temperature.",
        "Q: What is a cough?\nA: A reflex.",
    ]
    # The default template is MedQuAD's rendering.
    assert texts(path, question_field="q", answer_field="a")[0] == (
        "Question: What is fever?\nAnswer: A raised temperature."
    )


# --- csv / parquet -----------------------------------------------------------------------------


def test_csv_column_with_quoted_multiline_fields(tmp_path):
    path = tmp_path / "notes.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "note", "extra"])
        w.writerow([1, "line one\nline two", "a"])
        w.writerow([2, 'He said "hi", twice', "b"])
        w.writerow([3, "plain", "c"])
    assert texts(path, text_field="note") == ["line one\nline two", 'He said "hi", twice', "plain"]


def test_csv_question_answer_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat?,That.\nNone?,\n", encoding="utf-8")
    assert texts(path, question_field="question", answer_field="answer") == [
        "Question: What?\nAnswer: That."
    ]


def test_parquet_column(tmp_path):
    path = tmp_path / "notes.parquet"
    table = pa.table({"id": [1, 2, 3], "body": ["first", None, "third"]})
    pq.write_table(table, path)
    docs = read(path, text_field="body")
    assert [d.text for d in docs] == ["first", "third"]
    assert {d.source for d in docs} == {"notes.parquet"}


# --- MedQuAD -----------------------------------------------------------------------------------


@pytest.fixture
def medquad_dir(tmp_path):
    root = tmp_path / "medquad"
    (root / "1_CancerGov_QA").mkdir(parents=True)
    (root / "2_GARD_QA").mkdir()
    (root / "1_CancerGov_QA" / "0000001_1.xml").write_text(
        medquad_xml(
            "CancerGov",
            "0000001_1",
            [
                ("What is (are) Leukemia ?", "\n      Leukemia is a cancer.\n   "),
                ("Who is at risk for Leukemia ?", ""),
                ("What are the symptoms of Leukemia ?", "Fever and bruising."),
                ("What causes Leukemia ?", None),
            ],
        ),
        encoding="utf-8",
    )
    (root / "1_CancerGov_QA" / "0000001_2.xml").write_text(
        medquad_xml("CancerGov", "0000001_2", [("What is Lymphoma ?", "A cancer of lymphocytes.")]),
        encoding="utf-8",
    )
    (root / "2_GARD_QA" / "0000002_1.xml").write_text(
        medquad_xml("GARD", "0000002_1", [("What is Alport syndrome ?", "A kidney disease.")]),
        encoding="utf-8",
    )
    (root / "readme.txt").write_text("MedQuAD: 47,457 question-answer pairs", encoding="utf-8")
    (root / "LICENSE.txt").write_text("CC BY 4.0", encoding="utf-8")
    return root


def test_medquad_one_document_per_answered_pair(medquad_dir):
    docs = read(medquad_dir)

    assert [d.text for d in docs] == [
        "Question: What is (are) Leukemia ?\nAnswer: Leukemia is a cancer.",
        "Question: What are the symptoms of Leukemia ?\nAnswer: Fever and bruising.",
        "Question: What is Lymphoma ?\nAnswer: A cancer of lymphocytes.",
        "Question: What is Alport syndrome ?\nAnswer: A kidney disease.",
    ]
    assert [d.source for d in docs] == ["CancerGov", "CancerGov", "CancerGov", "GARD"]
    # Pairs of one file share a group; different files never do.
    assert docs[0].group == docs[1].group
    assert len({docs[0].group, docs[2].group, docs[3].group}) == 3
    assert all(d.group for d in docs)


def test_question_answer_documents_keep_the_pair_and_its_type(medquad_dir, tmp_path):
    # MedQuAD labels each question's type; QA records carry it in a field named by the reader.
    docs = read(medquad_dir)
    assert [(d.question, d.answer, d.qtype) for d in docs[:2]] == [
        ("What is (are) Leukemia ?", "Leukemia is a cancer.", "information"),
        ("What are the symptoms of Leukemia ?", "Fever and bruising.", "information"),
    ]
    rows = [{"q": " Why? ", "a": " Because. ", "kind": "causes"}, {"q": "How?", "a": "So."}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = SourceSpec(uri=str(path), question_field="q", answer_field="a")
    got = [(d.question, d.answer, d.qtype) for d in read_source(spec, type_field="kind")]
    assert got == [("Why?", "Because.", "causes"), ("How?", "So.", None)]
    assert [d.qtype for d in read_source(spec)] == [None, None]  # no type field asked for
    table = pa.table({"q": ["Why?"], "a": ["Because."], "kind": ["causes"]})
    pq.write_table(table, tmp_path / "qa.parquet")
    spec = SourceSpec(uri=str(tmp_path / "qa.parquet"), question_field="q", answer_field="a")
    assert [d.qtype for d in read_source(spec, type_field="kind")] == ["causes"]
    assert [d.question for d in read(tmp_path / "qa.parquet", text_field="q")] == [None]


def test_medquad_single_file_and_custom_template(medquad_dir):
    path = medquad_dir / "2_GARD_QA" / "0000002_1.xml"
    assert texts(path, question_field="q", answer_field="a", template="{question} -> {answer}") == [
        "What is Alport syndrome ? -> A kidney disease."
    ]


def test_real_medquad_sample():
    if not MEDQUAD.is_dir():
        pytest.skip(f"real MedQuAD sample not found at {MEDQUAD}")
    docs = read(MEDQUAD)
    sites = {d.source for d in docs}
    assert {"CancerGov", "GARD", "GHR"} <= sites
    assert len(sites) >= 5
    assert len(docs) > 10_000
    bad = [
        d.text[:80] for d in docs if not d.text.startswith("Question:") or "\nAnswer:" not in d.text
    ]
    assert bad == []


# --- builtin:icd10cm ---------------------------------------------------------------------------


def test_builtin_icd10cm_documents():
    docs = read("builtin:icd10cm")
    assert len(docs) > 1000
    first = docs[0].text
    assert first.startswith("ICD-10-CM Chapter 1: Certain infectious and parasitic diseases")
    assert "Section: Intestinal infectious diseases (A00-A09)" in first
    assert "A00 Cholera" in first
    assert "A00.0 Cholera due to Vibrio cholerae" in first
    assert docs[0].source == "icd10cm"
    # One document per three-character category: no two share a first code line.
    heads = [d.text.split("\n")[3].split(" ")[0] for d in docs]
    assert len(set(heads)) == len(heads)
    assert "E11" in heads and "J45" in heads


def test_builtin_icd10cm_streams():
    spec = SourceSpec(uri="builtin:icd10cm")
    stream = read_source(spec)
    assert inspect.isgenerator(stream)
    icd10cm_xml_path()  # the package import (which parses its own data) is not the reader's cost

    t0 = time.perf_counter()
    first3 = list(itertools.islice(read_source(spec), 3))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_all = sum(1 for _ in read_source(spec))
    t_all = time.perf_counter() - t0

    assert [d.text.split("\n")[3][:3] for d in first3] == ["A00", "A01", "A02"]
    assert n_all > 1000
    assert t_first < t_all / 3, f"3 documents took {t_first:.3f} s, all {n_all} took {t_all:.3f} s"


# --- hf: offline -------------------------------------------------------------------------------


def test_hf_source_offline_fails_with_one_line(tmp_path):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("the 'datasets' package (medgpt[hf]) is not installed")
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("medgpt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "medgpt.cli"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    proc = subprocess.run(
        [*cmd, "prepare", "--source", "hf:some/dataset", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("medgpt prepare: error: ")
    assert "some/dataset" in lines[0]
    assert "network" in lines[0].lower() or "offline" in lines[0].lower()
    assert not out.exists()


# --- bad input ---------------------------------------------------------------------------------


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# (file name, its bytes or None for no file, read options, what the error says, where: after
# the path, e.g. ":2:" for line 2, and further fragments of the message)
BAD_FILES = [
    pytest.param("nope.jsonl", None, {}, "no such file", "", [], id="missing"),
    pytest.param("latin1.txt", b"caf\xe9", {}, "UTF-8", "", ["0xe9"], id="non-utf8-text"),
    pytest.param("c.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, "UTF-8", ":2:", [],
                 id="non-utf8-jsonl-line"),
    pytest.param("c.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n', {},
                 "malformed JSON", ":3:", [], id="malformed-json-line"),
    pytest.param("c.jsonl", b'{"text": "a"}\n["text", "b"]\n', {},
                 "expected a JSON object, got list", ":2:", [], id="jsonl-line-not-an-object"),
    pytest.param("c.jsonl", _jsonl({"body": "x", "id": 7}), {}, "'text'", ":1:",
                 ["fields present: body, id"], id="jsonl-without-text-field"),
    pytest.param("qa.jsonl", _jsonl({"q": "What?", "answer": "x"}),
                 {"question_field": "q", "answer_field": "a"}, "no field 'a'", "",
                 ["fields present: q, answer"], id="jsonl-without-answer-field"),
    pytest.param("c.jsonl", _jsonl({"text": "ok"}, {"text": 42}), {},
                 "must be a string, got int", ":2:", [], id="jsonl-text-not-a-string"),
    pytest.param("c.csv", b"id,body\n1,hello\n", {}, "no column 'text'", "",
                 ["columns: id, body"], id="csv-without-column"),
    pytest.param("c.parquet", _parquet(pa.table({"id": [1], "body": ["x"]})), {},
                 "no column 'text'", "", ["id, body"], id="parquet-without-column"),
    pytest.param("c.parquet", b"this is not parquet", {}, "not a readable Parquet file", "", [],
                 id="unreadable-parquet"),
    pytest.param("0001.xml", b"<Document>\n<QAPairs>\n<QAPair>\n</Document>\n", {},
                 "malformed XML", ":4:", [], id="malformed-xml"),
    pytest.param("feed.xml", b"<rss><channel/></rss>", {},
                 r"root element <rss>, expected <Document>", "", [], id="xml-root-not-document"),
    pytest.param("paper.pdf", b"%PDF-1.4", {}, r"unsupported file type '\.pdf'", "", [],
                 id="unsupported-file-type"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "options", "match", "where", "also"), BAD_FILES)
def test_bad_file_is_a_data_error_naming_the_place(
    tmp_path, name, content, options, match, where, also
):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read(path, **options)
    message = str(e.value)
    assert f"{path}{where}" in message
    for fragment in also:
        assert fragment in message


def test_xml_error_in_folder_names_the_bad_file(medquad_dir):
    bad = medquad_dir / "2_GARD_QA" / "0000002_2.xml"
    bad.write_text("<Document>\n<QAPairs>\n", encoding="utf-8")
    stream = read_source(SourceSpec(uri=str(medquad_dir)))
    good = list(itertools.islice(stream, 4))  # everything before the bad file streams out
    assert len(good) == 4
    with pytest.raises(DataError) as e:
        next(stream)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("ftp:x", "unknown source scheme 'ftp:'"),
        ("builtin:nope", "unknown builtin corpus 'builtin:nope'"),
        ("hf:", "hf source needs a dataset name"),
        ("hf::train", "hf source needs a dataset name"),
    ],
)
def test_bad_source_uri(uri, fragment):
    with pytest.raises(ConfigError) as e:
        SourceSpec(uri=uri)
    assert fragment in str(e.value)


def test_unknown_scheme_lists_allowed():
    with pytest.raises(ConfigError) as e:
        SourceSpec(uri="ftp:x")
    assert "builtin:icd10cm" in str(e.value)
    assert "hf:NAME" in str(e.value)


def test_unsupported_file_type_given_directly(tmp_path):
    path = tmp_path / "paper.pdf"
    path.write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError, match=r"unsupported file type '\.pdf'") as e:
        read(path)
    assert str(path) in str(e.value)


def test_folder_without_supported_files(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "paper.pdf").write_bytes(b"%PDF-1.4")
    (root / "README.txt").write_text("only a readme", encoding="utf-8")
    with pytest.raises(DataError, match="no readable files") as e:
        read(root)
    assert str(root) in str(e.value)
    assert ".jsonl" in str(e.value)


def test_question_field_without_answer_field():
    with pytest.raises(ConfigError, match="question_field and answer_field"):
        SourceSpec(uri="qa.jsonl", question_field="q")
    with pytest.raises(ConfigError, match="question_field and answer_field"):
        SourceSpec(uri="qa.jsonl", answer_field="a")


@pytest.mark.parametrize(
    "template", ["Q: {question}", "{answer} only", "{question} {answer} {extra}"]
)
def test_bad_template(template):
    with pytest.raises(ConfigError, match="template"):
        SourceSpec(uri="qa.jsonl", question_field="q", answer_field="a", template=template)


def test_empty_uri():
    with pytest.raises(ConfigError, match="uri"):
        SourceSpec(uri="")
