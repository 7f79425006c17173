"""Serving follows the registry: promote and rollback (the gate record, the alias history,
damaged artifacts refused before anything changes), and a replica rolling out the version its
alias names — beside the old one or drained — while streams in flight finish on the version
they started with. The replica is built in this process, as Serve builds it (no Ray); the
Serve app under load is in tests/test_serve_rollout.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from medgpt import registry
from medgpt.cli import main
from medgpt.testing import own_lines
from medgpt.testing.rollout import GATED, register_version
from medgpt.tracking import mlflow_client, tracking_uri_for


def _register(store: Path, root: Path, seed: int, tags: dict[str, str]) -> str:
    return register_version(store, root, seed, tags)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Versions 1 and 2 gated, 3 without a gate record, 4 gated with a damaged artifact; the
    champion alias then set back to version 1 (history: 1)."""
    root = tmp_path_factory.mktemp("rollout")
    store = root / "store"
    store.mkdir()
    uri = tracking_uri_for(str(store), None)
    v1 = _register(store, root, 1, GATED)
    v2 = _register(store, root, 2, GATED)
    v3 = _register(store, root, 3, {"eval_loss": "10.5"})
    before = set(store.rglob("model.safetensors"))
    v4 = _register(store, root, 4, GATED)
    (damaged,) = set(store.rglob("model.safetensors")) - before
    damaged.write_bytes(damaged.read_bytes()[:-64] + b"\0" * 64)
    client = mlflow_client(uri)
    client.set_registered_model_alias("medgpt", "champion", v1)
    registry._set_history(client, "medgpt", "champion", [v1])
    assert (v1, v2, v3, v4) == ("1", "2", "3", "4")
    return {"store": store, "uri": uri, "root": root}


@pytest.fixture(autouse=True)
def _champion_is_version_1(request: pytest.FixtureRequest) -> None:
    """Every test starts from the champion on version 1 (history: 1), whatever an earlier
    one left."""
    if "store" not in request.fixturenames:
        return
    store = request.getfixturevalue("store")
    client = mlflow_client(store["uri"])
    client.set_registered_model_alias("medgpt", "champion", "1")
    registry._set_history(client, "medgpt", "champion", ["1"])


def _alias(store: dict) -> str | None:
    return registry.alias_version(store["uri"], "medgpt", "champion")


def _cli(store: dict, *args: str) -> int:
    return main([args[0], *args[1:], "--storage", str(store["store"])])


# --- promote and rollback ------------------------------------------------------------------


def test_registering_moves_the_alias_and_keeps_its_history(tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    uri = tracking_uri_for(str(store), None)
    a = _register(store, tmp_path, 7, GATED)
    b = _register(store, tmp_path, 8, GATED)
    client = mlflow_client(uri)
    assert registry.alias_history(client, "medgpt", "champion") == [a, b]
    assert registry.alias_version(uri, "medgpt", "champion") == b


def test_promote_a_gated_version_then_roll_back(store, capsys) -> None:
    assert _alias(store) == "1"
    assert _cli(store, "promote", "--version", "2") == 0
    assert "medgpt@champion: version 1 -> 2" in capsys.readouterr().out
    assert _alias(store) == "2"
    assert _cli(store, "promote", "--version", "2") == 0  # again: nothing moves
    assert "already names version 2" in capsys.readouterr().out
    assert _cli(store, "rollback") == 0
    assert "medgpt@champion: version 2 -> 1" in capsys.readouterr().out
    assert _alias(store) == "1"
    # Nothing before version 1: refused, exit 1, the alias as it was.
    assert _cli(store, "rollback") == 1
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no earlier version is recorded" in err[0], err
    assert _alias(store) == "1"
    client = mlflow_client(store["uri"])
    assert registry.alias_history(client, "medgpt", "champion") == ["1"]


@pytest.mark.parametrize(
    ("version", "rc", "message"),
    [
        ("3", 1, "no passing gate record (no 'gate' tag); gate it first: medgpt evaluate"),
        ("4", 1, "downloaded checkpoint hash"),  # the damaged artifact
        ("99", 2, "has no version 99 (versions: 1, 2, 3, 4)"),
    ],
)
def test_a_version_that_may_not_be_champion_changes_nothing(store, capsys, version, rc, message):
    assert _alias(store) == "1"
    history = registry.alias_history(mlflow_client(store["uri"]), "medgpt", "champion")
    assert _cli(store, "promote", "--version", version) == rc
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    if rc == 1:
        assert err[0].startswith("refused: ") and err[0].endswith("medgpt@champion is unchanged")
    assert _alias(store) == "1"
    assert registry.alias_history(mlflow_client(store["uri"]), "medgpt", "champion") == history


def test_promote_without_a_registry_or_a_reachable_server(tmp_path, store, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["promote", "--version", "1", "--storage", str(empty)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    # The alias moves; a Serve app that cannot be told is a warning (it polls the alias).
    assert _cli(store, "promote", "--version", "2", "--serve-url", "http://127.0.0.1:9") == 0
    captured = capsys.readouterr()
    assert "version 1 -> 2" in captured.out
    assert "warning: could not reach http://127.0.0.1:9/admin/refresh" in captured.err
    assert _cli(store, "rollback") == 0
    capsys.readouterr()


@pytest.mark.parametrize("version", ["two", "0", "-1", "1.5", ""])
def test_a_version_that_is_not_a_number_is_argparse_s_error(store, capsys, version) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli(store, "promote", "--version", version)
    assert exc.value.code == 2
    err = own_lines(capsys.readouterr().err)
    assert f"argument --version: {version!r} is not a registry version" in err[-1], err
    assert _alias(store) == "1"


def test_an_app_that_will_not_refresh_is_named_with_its_reason(store, capsys) -> None:
    """An app serving a fixed checkpoint answers /admin/refresh with 400 and says why; promote
    passes that on (the alias has moved all the same)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medgpt.api.protocol import error_body

    reason = "this app serves /ckpt, not a models:/NAME@ALIAS it could follow"

    class Fixed(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server calls it by this name
            body = json.dumps(error_body(reason)).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Fixed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _cli(store, "promote", "--version", "2", "--serve-url", url) == 0
    finally:
        server.shutdown()
    captured = capsys.readouterr()
    assert "version 1 -> 2" in captured.out
    (line,) = own_lines(captured.err)
    assert line.startswith(f"warning: {url}/admin/refresh answered 400: {reason}"), line
    assert _alias(store) == "2"


# --- a replica following its alias ---------------------------------------------------------


async def _replica(store: dict, tmp: Path, **cfg: Any) -> Any:
    from medgpt.serving.deployment import MedgptServer

    cls = MedgptServer.func_or_class
    replica = cls.__new__(cls)
    config = {"checkpoint": "models:/medgpt@champion", "storage_path": str(store["store"]),
              "threads": 1, "follow_poll_s": 30, **cfg}  # fmt: skip
    await cls.__init__(replica, config)  # Serve's ingress wrapper has an async __init__
    return replica


def _stop(replica: Any) -> None:
    replica._stop.set()
    replica._wake.set()
    if replica._follower is not None:
        replica._follower.cancel()
    replica._stepper.join(timeout=30)


async def _until(cond, seconds: float = 60) -> None:
    for _ in range(int(seconds * 20)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def _generate(replica: Any, n: int, prompt: str = "Asthma") -> Any:
    from medgpt.api import GenerateRequest

    body = GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0)
    return asyncio.ensure_future(replica.generate_body(body))


async def _long_running(replica: Any, n: int) -> Any:
    """A generation that is decoding (its first tokens out) when this returns, on an engine
    slowed to 20 ms a step (a fake clock, not a fake engine: the steps are real), so that it
    is still decoding while the next version loads, whatever the machine's speed."""
    import time

    engine = replica.current.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]
    task = _generate(replica, n)
    await _until(lambda: engine.stats()["running"] == 1)
    return task


# Serve's ingress wrapper has an async __del__, which only a replica's shutdown awaits.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine .*ASGIIngressWrapper.__del__' was never awaited"
)


@pytest.mark.parametrize("mode", ["beside", "drain"])
def test_a_replica_rolls_out_what_the_alias_names(store, tmp_path, mode) -> None:
    """In flight on version 1 when the alias moves to 2: that stream finishes whole on 1, the
    next requests get 2 (beside: at once; drained: once 1 finished, waiting meanwhile), and 1
    is freed."""

    async def run() -> None:
        replica = await _replica(store, tmp_path, rollout=mode)
        try:
            assert replica.current.model_id == "medgpt-v1"
            solo = {k: v for k, v in (await _generate(replica, 30, "Fever")).items()
                    if k in ("text", "completion_tokens")}  # fmt: skip
            slow = await _long_running(replica, 200)
            registry.promote(store["uri"], "medgpt", "champion", "2",
                             store["store"] / "downloads")  # fmt: skip
            assert (await replica.refresh()).status_code == 202
            if mode == "beside":
                await _until(lambda: replica.current.model_id == "medgpt-v2")
                assert not slow.done()  # version 2 came in while 1 was still decoding
                fresh = await _generate(replica, 30, "Fever")
                assert fresh["model"]["id"] == "medgpt-v2"
                assert fresh["model"]["lineage"]["data_hash"] == "data0002"
                assert fresh["text"] != solo["text"]  # other weights, other greedy text
            else:
                await _until(lambda: not replica._admit.is_set())
                waiting = _generate(replica, 30, "Fever")  # waits for the swap
                await asyncio.sleep(0.3)
                assert not waiting.done()
                fresh = await waiting
                assert fresh["model"]["id"] == "medgpt-v2"
                assert slow.done()  # drained first
            old = await slow
            assert old["model"]["id"] == "medgpt-v1" and old["completion_tokens"] == 200
            assert old["finish_reason"] == "length"
            await _until(lambda: not replica.retiring)
            health = await replica.healthz()
            assert health["versions_loaded"] == ["medgpt-v2"], health
            assert health["rollout"]["state"] == "idle" and health["rollout"]["mode"] == mode
            # Rolling back: version 1 again, the same greedy text as before.
            registry.rollback(store["uri"], "medgpt", "champion", store["store"] / "downloads")
            await replica.refresh()
            await _until(lambda: replica.current.model_id == "medgpt-v1" and not replica.retiring)
            again = await _generate(replica, 30, "Fever")
            assert {k: again[k] for k in solo} == solo
        finally:
            _stop(replica)

    asyncio.run(run())


def test_a_replica_keeps_serving_when_the_alias_names_a_damaged_version(store, tmp_path) -> None:
    """Moved around medgpt promote (straight in MLflow) to the damaged version 4: the replica
    refuses it (hash check), says why in /healthz, and serves version 1 on; it does not retry
    version 4 at every poll."""

    async def run() -> None:
        replica = await _replica(store, tmp_path, follow_poll_s=0.2)
        client = mlflow_client(store["uri"])
        try:
            client.set_registered_model_alias("medgpt", "champion", "4")
            await _until(lambda: replica.rollout.get("state") == "refused")
            health = await replica.healthz()
            assert health["model"] == "medgpt-v1" and "hash" in health["rollout"]["error"]
            out = await _generate(replica, 5)
            assert out["model"]["id"] == "medgpt-v1" and out["completion_tokens"] == 5
            assert list(replica._failed) == ["4"]
        finally:
            client.set_registered_model_alias("medgpt", "champion", "1")
            _stop(replica)

    asyncio.run(run())


def test_lineage_on_every_answer(store, tmp_path) -> None:
    """The OpenAI body's model and system_fingerprint, the headers, /generate's model and the
    first event of /generate/stream name the version, its training run and its data."""
    from starlette.requests import Request

    def request(body: dict) -> Request:
        raw = json.dumps(body).encode()

        async def receive() -> dict:
            return {"type": "http.request", "body": raw, "more_body": False}

        return Request({"type": "http", "method": "POST", "headers": []}, receive)

    async def run() -> None:
        replica = await _replica(store, tmp_path)
        try:
            lineage = replica.current.lineage
            assert lineage["registry_version"] == "medgpt/1"
            assert lineage["data_hash"] == "data0001" and lineage["training_run_id"]
            resp = await replica.completions(request({"prompt": "Gout", "max_tokens": 3}))
            body = json.loads(resp.body)
            assert body["model"] == "medgpt-v1"
            run = lineage["training_run_id"]
            assert body["system_fingerprint"] == f"medgpt-v1+run.{run[:12]}+data.data0001"
            assert resp.headers["x-medgpt-model"] == "medgpt-v1"
            assert f"training_run_id={run}" in resp.headers["x-medgpt-lineage"]
            # The registry name (and name@alias) work as model ids across versions.
            for model in ("medgpt", "medgpt@champion", "medgpt-v1"):
                r = await replica.completions(request({"prompt": "Gout", "max_tokens": 1,
                                                       "model": model}))  # fmt: skip
                assert json.loads(r.body)["model"] == "medgpt-v1"
            stream = await replica.generate_stream(request({"prompt": "Gout",
                                                            "max_new_tokens": 3}))  # fmt: skip
            first = await anext(stream.body_iterator)
            assert json.loads(first.removeprefix("data: "))["model"]["lineage"] == lineage
            async for _ in stream.body_iterator:
                pass
        finally:
            _stop(replica)

    asyncio.run(run())
