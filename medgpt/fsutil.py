"""Writing folders so that they appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
