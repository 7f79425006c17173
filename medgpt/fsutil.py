"""Files and folders: written so that they appear whole or not at all, read with an error
that names the file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medgpt.errors import MedgptError


@contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; when the block ends without an error it
    replaces ``out`` (a folder already there is removed first), otherwise it is deleted.

    The staging folder sits in ``out``'s parent, so the final rename stays on one file system
    and a reader never sees a half-written folder under ``out``'s name. A dot-name keeps it out
    of globs such as ``step-*`` while it is being written."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(
    path: Path,
    error: type[MedgptError],
    missing: str = "missing",
) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (its message starting with the path) when the
    file is missing (``missing`` says what that means), not JSON, or not an object. Checkpoint
    folders and Hugging Face model folders (:mod:`medgpt.hf`) are read with it."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
