"""Corpus readers: every source is a stream of :class:`Document`s.

A source is named by a URI-like string:

* a path to a file or folder: ``.txt``/``.md`` (one document per file), ``.jsonl`` (one per
  line: a text field, or a question/answer pair rendered with a template), ``.csv`` and
  ``.parquet`` (a text column), ``.xml`` (MedQuAD documents); folders are walked recursively in
  sorted order, so a MedQuAD checkout is just a folder;
* ``builtin:icd10cm``: the ICD-10-CM tabular list shipped by the ``simple-icd-10-cm`` package;
* ``hf:NAME[:split]``: a Hugging Face dataset through ``datasets`` (needs network).

Readers stream: nothing holds a whole corpus in memory. Every problem with the input raises a
:class:`DataError` naming the file (and line) and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from medgpt.config import ConfigError, option
from medgpt.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".csv", ".parquet", ".xml")
SCHEMES = ("builtin", "hf")
BUILTINS = ("icd10cm",)
DEFAULT_QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str  # label for per-source statistics (e.g. a MedQuAD site)
    group: str | None = None  # documents sharing a group always land in the same split
    # A question-answer pair (MedQuAD, or a record rendered with question/answer fields): the
    # pair as read, stripped, and its question type where the source labels one (MedQuAD's
    # qtype: symptoms, treatment, ...). The multiple-choice benchmark builds its items from
    # these; prepare uses only the text.
    question: str | None = None
    answer: str | None = None
    qtype: str | None = None


@dataclasses.dataclass
class SourceSpec:
    """One corpus and how to read it."""

    uri: str
    # The flags of `medgpt prepare` apply these to every --source given.
    text_field: str = option(  # jsonl field / csv or parquet column / hf column
        "text", flag="--text-field", help="jsonl field / csv or parquet column with the text"
    )
    question_field: str | None = option(  # with answer_field: render a QA pair with template
        None, flag="--question-field", help="with --answer-field: render question/answer pairs"
    )
    answer_field: str | None = option(None, flag="--answer-field", help="see --question-field")
    template: str = option(
        DEFAULT_QA_TEMPLATE, flag="--template", help="QA template with {question} and {answer}"
    )
    name: str | None = None  # label in the manifest; default derived from uri

    def __post_init__(self) -> None:
        if not self.uri:
            raise ConfigError("uri: must not be empty")
        if (self.question_field is None) != (self.answer_field is None):
            raise ConfigError("question_field and answer_field: give both or neither")
        if "{question}" not in self.template or "{answer}" not in self.template:
            raise ConfigError(
                f"template: must contain {{question}} and {{answer}}, got {self.template!r}"
            )
        try:
            self.template.format(question="", answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"template: only {{question}} and {{answer}} may be used ({e!r})"
            ) from None
        scheme = self.scheme
        if scheme is not None and scheme not in SCHEMES:
            raise ConfigError(
                f"unknown source scheme {scheme + ':'!r} in {self.uri!r} "
                f"(allowed: a file or folder path, builtin:{'|'.join(BUILTINS)}, hf:NAME[:split])"
            )
        if scheme == "builtin" and self.uri.split(":", 1)[1] not in BUILTINS:
            raise ConfigError(
                f"unknown builtin corpus {self.uri!r} (allowed: "
                f"{', '.join('builtin:' + b for b in BUILTINS)})"
            )
        if scheme == "hf" and not self.uri.split(":", 2)[1]:
            raise ConfigError(f"hf source needs a dataset name: hf:NAME[:split], got {self.uri!r}")

    @property
    def scheme(self) -> str | None:
        head, sep, _ = self.uri.partition(":")
        # "C:\..." style drive letters and plain paths have no scheme.
        if not sep or len(head) < 2 or "/" in head or "\\" in head or head.startswith("."):
            return None
        return head

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.scheme is not None:
            return self.uri.split(":", 1)[1].replace(":", "/")
        return Path(self.uri).name or self.uri

    @property
    def is_qa(self) -> bool:
        return self.question_field is not None


def read_source(spec: SourceSpec, type_field: str | None = None) -> Iterator[Document]:
    """Stream the documents of one source (raw text; cleaning happens in prepare).

    ``type_field``: for question/answer records (jsonl, csv, parquet, hf), the field holding a
    question type, read into :attr:`Document.qtype` where a record has it (MedQuAD files label
    their questions themselves)."""
    if spec.scheme == "builtin":
        yield from read_icd10cm(spec)
        return
    if spec.scheme == "hf":
        yield from read_hf(spec, type_field)
        return
    path = Path(spec.uri)
    if not path.exists():
        raise DataError(f"no such file or directory: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        usable = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
        if not usable:
            raise DataError(
                f"{path}: no readable files (looked for {', '.join(SUPPORTED_SUFFIXES)})"
            )
        for f in usable:
            yield from _read_file(f, spec, type_field)
    else:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                f"(allowed: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        yield from _read_file(path, spec, type_field)


# Files that describe a corpus rather than belong to it (MedQuAD ships readme.txt and
# LICENSE.txt next to its XML folders); skipped when walking a folder, read if named directly.
_NOT_CORPUS = ("readme", "license", "licence", "copying", "notice")


def _hidden(p: Path, root: Path) -> bool:
    if p.stem.lower() in _NOT_CORPUS:
        return True
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _read_file(path: Path, spec: SourceSpec, type_field: str | None) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield Document(_read_utf8(path), spec.label)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, spec, type_field)
    elif suffix == ".csv":
        yield from _read_csv(path, spec, type_field)
    elif suffix == ".parquet":
        yield from _read_parquet(path, spec, type_field)
    elif suffix == ".xml":
        yield from read_medquad_file(path, spec)


def _not_utf8(path: Path, e: UnicodeDecodeError, line: int | None = None) -> DataError:
    where = f"{path}:{line}" if line is not None else str(path)
    bad = e.object[e.start : e.start + 1].hex()
    return DataError(
        f"{where}: not UTF-8 text (byte 0x{bad} at offset {e.start}); convert the file to UTF-8"
    )


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _render(
    record: dict, spec: SourceSpec, where: str, type_field: str | None = None
) -> Document | None:
    """The document of one record; None for a QA pair without an answer (skipped, like
    MedQuAD's) or a record without text."""
    if spec.is_qa:
        assert spec.question_field is not None and spec.answer_field is not None
        for f in (spec.question_field, spec.answer_field):
            if f not in record:
                raise DataError(
                    f"{where}: no field {f!r} (fields present: {', '.join(map(str, record)) or 'none'})"
                )
        q, a = record[spec.question_field], record[spec.answer_field]
        if a is None or (isinstance(a, str) and not a.strip()):
            return None
        if not isinstance(q, str) or not isinstance(a, str):
            raise DataError(
                f"{where}: fields {spec.question_field!r}/{spec.answer_field!r} must be strings"
            )
        label = record.get(type_field) if type_field else None
        qtype = (str(label).strip() or None) if label is not None else None
        q, a = q.strip(), a.strip()
        text = spec.template.format(question=q, answer=a)
        return Document(text, spec.label, question=q, answer=a, qtype=qtype)
    if spec.text_field not in record:
        raise DataError(
            f"{where}: no field {spec.text_field!r} "
            f"(fields present: {', '.join(map(str, record)) or 'none'})"
        )
    text = record[spec.text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {spec.text_field!r} must be a string, got {type(text).__name__}"
        )
    return Document(text, spec.label)


def _read_jsonl(path: Path, spec: SourceSpec, type_field: str | None) -> Iterator[Document]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, lineno) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            doc = _render(record, spec, f"{path}:{lineno}", type_field)
            if doc is not None:
                yield doc


def _read_csv(path: Path, spec: SourceSpec, type_field: str | None) -> Iterator[Document]:
    # The csv module needs text: decode lazily line by line so memory stays bounded and a bad
    # byte is reported with its line number.
    def lines() -> Iterator[str]:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e, lineno) from None

    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(lines())
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (expected a header row)")
    needed = [spec.question_field, spec.answer_field] if spec.is_qa else [spec.text_field]
    for col in needed:
        if col not in header:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(header)})")
    try:
        for row in reader:
            doc = _render(row, spec, f"{path}:{reader.line_num}", type_field)
            if doc is not None:
                yield doc
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _read_parquet(path: Path, spec: SourceSpec, type_field: str | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for bad files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    needed = [spec.question_field, spec.answer_field] if spec.is_qa else [spec.text_field]
    for col in needed:
        if col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(columns)})")
    if spec.is_qa and type_field and type_field in columns and type_field not in needed:
        needed = [*needed, type_field]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=needed):
        for record in batch.to_pylist():
            row += 1
            doc = _render(record, spec, f"{path}: row {row}", type_field)
            if doc is not None:
                yield doc


# --- MedQuAD -------------------------------------------------------------------------------


def read_medquad_file(path: Path, spec: SourceSpec) -> Iterator[Document]:
    """One document per question/answer pair; pairs without an answer are skipped.

    The source label is the site the pair comes from (the ``source`` attribute, e.g.
    ``CancerGov``); all pairs of one XML file share a split group, so a topic's questions never
    straddle train and validation. The question's ``qtype`` attribute is its question type.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, _ = e.position
        raise DataError(f"{path}:{line}: malformed XML ({e})") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if root.tag != "Document":
        raise DataError(
            f"{path}: not a MedQuAD file (root element <{root.tag}>, expected <Document>)"
        )
    site = root.get("source") or path.parent.name
    group = f"medquad:{site}:{root.get('id') or path.stem}"
    for pair in root.iterfind("./QAPairs/QAPair"):
        question = pair.find("Question")
        q = question.text if question is not None else None
        a = pair.findtext("Answer")
        if not q or not q.strip() or not a or not a.strip():
            continue
        q, a = q.strip(), a.strip()
        assert question is not None
        qtype = (question.get("qtype") or "").strip() or None
        yield Document(
            spec.template.format(question=q, answer=a),
            spec.name or site,
            group,
            question=q,
            answer=a,
            qtype=qtype,
        )


# --- ICD-10-CM -----------------------------------------------------------------------------

_ICD_NOTE_LABELS = {
    "inclusionTerm": "Inclusion terms",
    "includes": "Includes",
    "excludes1": "Excludes1",
    "excludes2": "Excludes2",
    "codeFirst": "Code first",
    "codeAlso": "Code also",
    "useAdditionalCode": "Use additional code",
    "notes": "Note",
    "sevenChrNote": "7th character note",
}


def icd10cm_xml_path() -> Path:
    # find_spec locates the package without importing it: its import parses the whole XML
    # into memory (seconds), and we only need the file.
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:icd10cm needs the 'simple-icd-10-cm' package (pip install simple-icd-10-cm)"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted((pkg_dir / "data").glob("*tabular*.xml"))
    if not found:
        raise DataError("simple-icd-10-cm is installed but ships no tabular XML file")
    return found[-1]


def _icd_diag_lines(diag: ET.Element) -> Iterator[str]:
    # No indentation: the codes themselves carry the hierarchy (A01 > A01.0 > A01.00), and
    # cleaning strips leading whitespace anyway.
    yield f"{diag.findtext('name', '').strip()} {diag.findtext('desc', '').strip()}"
    for child in diag:
        if child.tag in _ICD_NOTE_LABELS:
            notes = [n.text.strip() for n in child.iter("note") if n.text and n.text.strip()]
            if notes:
                yield f"{_ICD_NOTE_LABELS[child.tag]}: {'; '.join(notes)}"
        elif child.tag == "sevenChrDef":
            ext = [
                f"{e.get('char')} {e.text.strip()}"
                for e in child.iter("extension")
                if e.text and e.text.strip()
            ]
            if ext:
                yield f"7th characters: {'; '.join(ext)}"
    for sub in diag.findall("diag"):
        yield from _icd_diag_lines(sub)


def read_icd10cm(spec: SourceSpec) -> Iterator[Document]:
    """One document per three-character category, with its chapter and section as context.

    Streams the 10 MB XML with iterparse, clearing each category once rendered.
    """
    path = icd10cm_xml_path()
    chapter = section = chapter_no = ""
    stack: list[str] = []
    label = spec.name or "icd10cm"
    for event, elem in ET.iterparse(path, events=("start", "end")):
        if event == "start":
            stack.append(elem.tag)
            continue
        stack.pop()
        parent = stack[-1] if stack else None
        if elem.tag == "name" and parent == "chapter":
            chapter_no = (elem.text or "").strip()
        elif elem.tag == "desc" and parent == "chapter":
            chapter = f"Chapter {chapter_no}: {(elem.text or '').strip()}"
        elif elem.tag == "desc" and parent == "section":
            section = (elem.text or "").strip()
        elif elem.tag == "diag" and parent == "section":
            head = [f"ICD-10-CM {chapter}", f"Section: {section}", ""]
            yield Document("\n".join(head + list(_icd_diag_lines(elem))), label)
            elem.clear()
        elif elem.tag == "chapter":
            elem.clear()


# --- Hugging Face datasets -----------------------------------------------------------------


def read_hf(spec: SourceSpec, type_field: str | None = None) -> Iterator[Document]:
    _, name, *rest = spec.uri.split(":", 2)
    split = rest[0] if rest and rest[0] else "train"
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(
            f"{spec.uri}: hf: sources need the 'datasets' package (pip install 'medgpt[hf]')"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # offline, unknown dataset, bad split: one clear message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{spec.uri}: cannot load Hugging Face dataset {name!r} split {split!r} "
            f"({msg}); hf: sources need network access to the hub — offline, export the "
            "data to .jsonl/.parquet and pass the file"
        ) from None
    if first is None:
        return
    for i, record in enumerate(itertools.chain([first], it), start=1):
        doc = _render(record, spec, f"{spec.uri}: row {i}", type_field)
        if doc is not None:
            yield doc
