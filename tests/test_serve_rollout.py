"""The champion rolled out under load: a Serve app of two replicas following
models:/medgpt@champion on the session's real Ray cluster, 8 streaming clients for 60 s while
`medgpt promote` and then `medgpt rollback` move the alias and tell the app."""

from __future__ import annotations

import time

import pytest
import requests

from medgpt.cli import main
from medgpt.testing import free_port, wait_for
from medgpt.testing.rollout import GATED, StreamLoad, register_version

# Big enough that a version left in memory shows: ~70 MB of weights beside ~450 MB of runtime.
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128}


def _replicas(url: str, want: int = 2, tries: int = 200) -> dict[str, dict]:
    """Each replica's /healthz (requests land on either; asked until all answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        h = requests.get(f"{url}/healthz", timeout=10).json()
        seen[h["replica"]] = h
        if len(seen) == want:
            break
    assert len(seen) == want, seen.keys()
    return seen


@pytest.mark.slow
def test_promote_then_rollback_under_load(ray_cluster, tmp_path, capsys) -> None:
    import ray
    from ray import serve

    from medgpt.serving import build_app

    store = tmp_path / "store"
    store.mkdir()
    assert register_version(store, tmp_path, 1, GATED, **SHAPE) == "1"
    v2 = register_version(store, tmp_path, 2, GATED, **SHAPE)
    assert main(["rollback", "--storage", str(store)]) == 0  # champion: version 1
    ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # A long poll: only the immediate path (promote telling the app) can make the test pass.
    cfg = {"checkpoint": "models:/medgpt@champion", "storage_path": str(store), "threads": 1,
           "num_cpus": 0.5, "min_replicas": 2, "max_replicas": 2, "max_batch_size": 8,
           "follow_poll_s": 300}  # fmt: skip
    serve.run(build_app(cfg, name="Champion"), name="champion", route_prefix="/",
              blocking=False)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), 180, "the champion app")
        load = StreamLoad(url, clients=8, max_tokens=24, model="medgpt").start()
        time.sleep(12)
        before = {k: h["rss_mib"] for k, h in _replicas(url).items()}
        t_promote = time.monotonic()
        assert main(["promote", "--version", v2, "--storage", str(store), "--serve-url", url,
                     "--wait", "60"]) == 0  # fmt: skip
        t_promoted = time.monotonic()
        out = capsys.readouterr().out
        assert f"{url} serves version {v2}" in out, out
        # Both replicas, not only the one the refresh reached (the coordinator told the other).
        wait_for(lambda: {h["model"] for h in _replicas(url).values()} == {"medgpt-v2"}, 30,
                 "both replicas on version 2")  # fmt: skip
        time.sleep(18)
        t_rollback = time.monotonic()
        assert main(["rollback", "--storage", str(store), "--serve-url", url, "--wait", "60"]) == 0
        t_rolled = time.monotonic()
        wait_for(lambda: {h["model"] for h in _replicas(url).values()} == {"medgpt-v1"}, 30,
                 "both replicas back on version 1")  # fmt: skip
        time.sleep(max(0.0, 60 - (time.monotonic() - load.answers[0].start)))
        answers = load.stop()
        wait_for(lambda: all(h["versions_loaded"] == ["medgpt-v1"]
                             for h in _replicas(url).values()), 60, "version 2 freed")  # fmt: skip
        after = {k: h["rss_mib"] for k, h in _replicas(url).items()}
        # A version with damaged artifacts: promote refuses it before anything changes, and
        # the app serves on with the champion it has.
        files = set(store.rglob("model.safetensors"))
        assert register_version(store, tmp_path, 3, GATED, **SHAPE) == "3"
        assert main(["rollback", "--storage", str(store)]) == 0  # registering moved the alias
        capsys.readouterr()
        (damaged,) = set(store.rglob("model.safetensors")) - files
        damaged.write_bytes(damaged.read_bytes()[:-4096])
        assert main(["promote", "--version", "3", "--storage", str(store), "--serve-url", url]) == 1
        assert "refused: medgpt version 3" in capsys.readouterr().err
        assert {h["model"] for h in _replicas(url).values()} == {"medgpt-v1"}
        r = requests.post(f"{url}/v1/completions", json={"prompt": "Gout", "max_tokens": 4},
                          timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "medgpt-v1"
    finally:
        serve.delete("champion")
        serve.shutdown()

    broken = [a for a in answers if not a.whole]
    assert not broken, broken[:3]
    assert len(answers) > 40
    assert all(a.tokens >= 1 for a in answers)
    # Each answer names the version that was champion when it started: before the alias
    # moved, v1; once promote returned (the app serving v2), v2; in between, either.
    for a in answers:
        if a.start > t_rolled or a.end < t_promote:
            assert a.model == "medgpt-v1", a
        elif t_promoted < a.start and a.end < t_rollback:
            assert a.model == "medgpt-v2", a
        else:
            assert a.model in ("medgpt-v1", "medgpt-v2"), a
    seen = {a.model for a in answers}
    assert seen == {"medgpt-v1", "medgpt-v2"}
    for replica, mib in after.items():
        assert abs(mib - before[replica]) <= 0.10 * before[replica], (replica, before, after)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_drained_replicas_roll_one_at_a_time(ray_cluster, tmp_path, capsys) -> None:
    """rollout: drain (two versions do not fit): each replica finishes its streams, frees the
    old version and loads the new one while new requests wait; the app's coordinator lets one
    replica at a time do it, so the other keeps serving. No answer fails."""
    import ray
    from ray import serve

    from medgpt.serving import build_app

    store = tmp_path / "store"
    store.mkdir()
    assert register_version(store, tmp_path, 1, GATED) == "1"
    assert register_version(store, tmp_path, 2, GATED) == "2"
    assert main(["rollback", "--storage", str(store)]) == 0
    ray.init(address=ray_cluster["address"], ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = {"checkpoint": "models:/medgpt@champion", "storage_path": str(store), "threads": 1,
           "num_cpus": 0.5, "min_replicas": 2, "max_replicas": 2, "follow_poll_s": 300,
           "rollout": "drain"}  # fmt: skip
    serve.run(build_app(cfg, name="Drained"), name="drained", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), 180, "the drained app")
        load = StreamLoad(url, clients=4, max_tokens=48, model="medgpt").start()
        time.sleep(3)
        assert main(["promote", "--version", "2", "--storage", str(store), "--serve-url", url,
                     "--wait", "60"]) == 0  # fmt: skip
        wait_for(lambda: {h["model"] for h in _replicas(url).values()} == {"medgpt-v2"}, 60,
                 "both replicas on version 2")  # fmt: skip
        time.sleep(2)
        answers = load.stop()
        states = {k: h["rollout"] for k, h in _replicas(url).items()}
    finally:
        serve.delete("drained")
        serve.shutdown()
    capsys.readouterr()
    assert not [a for a in answers if not a.whole]
    spans = sorted((s["drain_started"], s["swapped_at"]) for s in states.values())
    assert all(s["mode"] == "drain" for s in states.values()), states
    assert spans[0][1] <= spans[1][0], spans  # one replica after the other
    assert {a.model for a in answers} == {"medgpt-v1", "medgpt-v2"}
