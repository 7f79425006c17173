"""medgpt.storage against a real S3-compatible store (the session's SeaweedFS): checked
uploads, staged downloads, the probe, and the errors a user sees for a wrong bucket, key or
endpoint."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from medgpt import storage
from medgpt.storage import StorageError

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket_uri(stack_env) -> str:
    return f"s3://medgpt/tests/{uuid.uuid4().hex[:8]}"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_then_download_is_identical(bucket_uri, tmp_path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3 << 20))  # several chunks of the upload stream
    (src / "sub" / "b.json").write_text('{"x": 1}')
    (src / "empty").write_bytes(b"")
    written = storage.upload_dir(src, bucket_uri)
    assert written == (3 << 20) + len('{"x": 1}')
    assert storage.list_dirs(bucket_uri) == ["sub"]
    out = storage.download_dir(bucket_uri, tmp_path / "out")
    assert _tree(out) == _tree(src)
    only = storage.download_dir(bucket_uri, tmp_path / "only", only=["a.bin"])
    assert sorted(_tree(only)) == ["a.bin"]
    storage.delete_dir(bucket_uri)
    assert not storage.exists(bucket_uri)


def test_missing_things_are_named(bucket_uri, tmp_path) -> None:
    with pytest.raises(StorageError, match="no such folder"):
        storage.download_dir(f"{bucket_uri}/nothing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.*")), "a staged download was left behind"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket_uri}/nothing.json")
    storage.write_bytes(f"{bucket_uri}/f/one", b"1")
    with pytest.raises(StorageError, match="missing two"):
        storage.download_dir(f"{bucket_uri}/f", tmp_path / "y", only=["one", "two"])


def _files(uri: str) -> list[str]:
    import pyarrow.fs

    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.File]


def test_probe_passes_and_leaves_nothing(bucket_uri) -> None:
    storage.probe(bucket_uri)
    assert _files(bucket_uri) == [], "the probe object stayed"


def test_wrong_key_and_dead_endpoint_are_clear(stack_env, monkeypatch, bucket_uri) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=rf"{bucket_uri}.*write failed.*endpoint"):
        storage.probe(bucket_uri)
    from medgpt.testing import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"write failed .endpoint http://127.0.0.1"):
        storage.write_bytes(f"{bucket_uri}/x", b"x")


def test_bad_scheme_is_one_line() -> None:
    with pytest.raises(StorageError, match="nope://x/y: cannot open this storage"):
        storage.resolve("nope://x/y")


def test_retries_then_gives_up_naming_attempts() -> None:
    calls: list[int] = []
    retried: list[float] = []

    def fail() -> None:
        calls.append(1)
        raise StorageError("s3://b/k: upload failed")

    with pytest.raises(StorageError, match=r"gave up after 3 attempts.*upload failed"):
        storage.with_retries(fail, "ckpt", attempts=3, first_delay_s=0.01,
                             on_retry=lambda n, e, d: retried.append(d))  # fmt: skip
    assert len(calls) == 3 and retried == [0.01, 0.02]
    box = iter([StorageError("once"), None])

    def flaky() -> str:
        e = next(box)
        if e:
            raise e
        return "ok"

    assert storage.with_retries(flaky, "x", attempts=2, first_delay_s=0.01) == "ok"
