"""Run storage that is a local folder or object storage (``s3://``, ``gs://``, ...).

Everything goes through pyarrow's filesystems, the ones Ray Train itself writes checkpoints
with, so one set of settings reaches both: for S3 the usual AWS environment variables
(``AWS_ENDPOINT_URL`` for an S3-compatible server, keys or an instance role), for GCS the
application-default credentials.

Writes are checked: pyarrow reports a failed upload only when the stream is closed, and a
stream closed by the garbage collector swallows the error (Ray Train's own checkpoint upload
then logs "Checkpoint successfully created" for a folder of missing files). So every write here
closes its stream explicitly and compares the stored sizes with the local ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar

from medgpt.errors import MedgptError

T = TypeVar("T")

# A checkpoint upload is tried this many times, with delays doubling from the first: ~75 s in
# all rides out an object store restart or a short network partition, and no more GPU time than
# that is spent waiting before the run fails (and Ray's own retries take over).
UPLOAD_ATTEMPTS = int(os.environ.get("MEDGPT_STORAGE_ATTEMPTS", "5"))
UPLOAD_FIRST_DELAY_S = float(os.environ.get("MEDGPT_STORAGE_RETRY_S", "5"))
_CHUNK = 8 << 20


class StorageError(MedgptError):
    """Object storage that cannot be reached, read or written; names the URI and the cause."""


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI or a local path."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def endpoint_note() -> str:
    """Where S3 requests go, for error messages."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {url})" if url else ""


def _message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def resolve(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path of ``uri``."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for schemes
        raise StorageError(f"{uri}: cannot open this storage ({_message(e)})") from None
    return streaming(fs), path


def streaming(fs: Any) -> Any:
    """``fs``, or for S3 the same store with uploads sent part by part as they are written:
    pyarrow's default (background writes) queues the parts in memory without bound, ~800 MB
    more for a 1 GB file (bench/cluster_storage.py), where this adds ~8 MB at the same speed.
    The endpoint and credentials come from the environment, as they did for ``fs``."""
    import pyarrow.fs

    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    extra = {"endpoint_override": endpoint} if endpoint else {}
    return pyarrow.fs.S3FileSystem(region=fs.region, background_writes=False, **extra)


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"{uri}: not reachable{endpoint_note()}: {_message(e)}") from None


def list_dirs(uri: str) -> list[str]:
    """The names of the folders directly under ``uri``."""
    import pyarrow.fs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{uri}: cannot list{endpoint_note()}: {_message(e)}") from None
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "nosuchkey" in str(e).lower():
            raise FileNotFoundError(uri) from None
        raise StorageError(f"{uri}: read failed{endpoint_note()}: {_message(e)}") from None


def _write_stream(fs: Any, path: str, chunks: Iterator[bytes]) -> int:
    size = 0
    out = fs.open_output_stream(path)
    try:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
    except BaseException:
        # Abort rather than commit a partial object (and keep the write's own error).
        with contextlib.suppress(OSError):
            out.abort() if hasattr(out, "abort") else out.close()
        raise
    out.close()  # an upload failure surfaces here, not in a destructor
    return size


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    try:
        _write_stream(fs, path, iter([data]))
    except OSError as e:
        raise StorageError(f"{uri}: write failed{endpoint_note()}: {_message(e)}") from None


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def upload_dir(src: str | os.PathLike[str], uri: str) -> int:
    """Copy the files of local folder ``src`` to ``uri``, checking every stored size. Returns
    the bytes written."""
    fs, root = resolve(uri)
    return upload_to(fs, root, src, uri)


def upload_to(fs: Any, root: str, src: str | os.PathLike[str], uri: str) -> int:
    """:func:`upload_dir` into an open pyarrow filesystem (``uri`` names it in errors)."""
    import pyarrow.fs

    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    total = 0
    try:
        for p in files:
            rel = p.relative_to(src).as_posix()
            total += _write_stream(fs, f"{root}/{rel}", _file_chunks(p))
        stored = {
            i.path[len(root) + 1 :]: i.size
            for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
            if i.type == pyarrow.fs.FileType.File
        }
    except OSError as e:
        raise StorageError(f"{uri}: upload failed{endpoint_note()}: {_message(e)}") from None
    for p in files:
        rel = p.relative_to(src).as_posix()
        if stored.get(rel) != p.stat().st_size:
            raise StorageError(
                f"{uri}/{rel}: stored size {stored.get(rel)} != local {p.stat().st_size} "
                "(the upload did not complete)"
            )
    return total


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "not found" not in str(e).lower():
            raise StorageError(f"{uri}: delete failed{endpoint_note()}: {_message(e)}") from None


def download_dir(
    uri: str, dst: str | os.PathLike[str], only: Collection[str] | None = None
) -> Path:
    """Copy the folder at ``uri`` (or, with ``only``, those of its top-level files) to local
    ``dst``; it appears whole (staged, then renamed) and an existing ``dst`` is replaced."""
    import pyarrow.fs

    fs, root = resolve(uri)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such folder") from None
        files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
        if only is not None:
            files = [i for i in files if i.path[len(root) + 1 :] in only]
            missing = sorted(set(only) - {i.path[len(root) + 1 :] for i in files})
            if missing:
                raise StorageError(f"{uri}: missing {', '.join(missing)}")
        if not files:
            raise StorageError(f"{uri}: no such folder (or it is empty)")
        for i in files:
            rel = i.path[len(root) + 1 :]
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(i.path) as f, open(out, "wb") as w:
                while chunk := f.read(_CHUNK):
                    w.write(chunk)
            if out.stat().st_size != i.size:
                raise StorageError(f"{uri}/{rel}: read {out.stat().st_size} of {i.size} bytes")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except OSError as e:
        raise StorageError(f"{uri}: download failed{endpoint_note()}: {_message(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def probe(uri: str) -> None:
    """Write, read back and delete a small object under ``uri``: the storage is reachable and
    writable with this process's credentials. Raises StorageError otherwise."""
    name = join(uri, f".medgpt-probe-{uuid.uuid4().hex}")
    payload = b"medgpt storage probe\n"
    write_bytes(name, payload)
    try:
        if read_bytes(name) != payload:
            raise StorageError(f"{uri}: wrote a probe object but read back different bytes")
    except FileNotFoundError:
        raise StorageError(f"{uri}: a probe object written here cannot be read back") from None
    fs, path = resolve(name)
    with contextlib.suppress(OSError):  # a leftover probe object does no harm
        fs.delete_file(path)


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = UPLOAD_ATTEMPTS,
    first_delay_s: float = UPLOAD_FIRST_DELAY_S,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """``fn()``, tried ``attempts`` times with doubling delays on StorageError; the last error
    is raised with how often and how long it was tried."""
    delay, started = first_delay_s, time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError as e:
            if attempt == attempts:
                raise StorageError(
                    f"{what}: gave up after {attempts} attempts over "
                    f"{time.monotonic() - started:.0f} s: {e}"
                ) from None
            if on_retry is not None:
                on_retry(attempt, e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
