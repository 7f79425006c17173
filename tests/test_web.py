"""The web front (web/app.py) with Flask's test client against a real Serve app on a tiny
checkpoint, over real HTTP where streaming and disconnects matter, and against backends that
are down, silent or failing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from flask import Flask

from medgpt.errors import ConfigError
from medgpt.testing import REPO, free_port, own_lines, wait_for
from medgpt.testing.serving import (
    MODEL_ID,
    closed_port_url,
    serve_app,
    serve_stats,
    tiny_checkpoint,
    web_server,
)
from web.app import CSP, check_bind, create_app


@pytest.fixture(scope="module")
def serve_url(ray_cluster, tmp_path_factory) -> str:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("web-ckpt"))
    storage = tmp_path_factory.mktemp("web-store")
    with serve_app(ray_cluster["address"], ckpt, storage, "web-unit") as url:
        yield url


@pytest.fixture(scope="module")
def app(serve_url) -> Flask:
    return create_app({"SERVE_URL": serve_url, "READ_TIMEOUT": 30})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def web_url(serve_url) -> str:
    with web_server({"SERVE_URL": serve_url, "READ_TIMEOUT": 30}) as url:
        yield url


def _events(raw: bytes | str) -> list[dict]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# --- the page and the headers ---------------------------------------------------------------------


def test_page_has_the_notice_controls_and_no_inline_code(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert "Not medical advice." in html and "machine-generated" in html
    for ident in ("prompt", "temperature", "top_k", "top_p", "max_new_tokens", "seed",
                  "generate", "stop", "output", "model", "backend"):  # fmt: skip
        assert f'id="{ident}"' in html, ident
    assert 'class="example"' in html
    # The CSP forbids inline code: every script has a src, no style attributes.
    assert "<script>" not in html and "style=" not in html and "onclick" not in html
    assert r.headers["Content-Security-Policy"] == CSP
    assert "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/static/app.js", "/static/app.css"):
        s = client.get(path)
        assert s.status_code == 200 and s.headers["Content-Security-Policy"] == CSP
        s.close()


def test_output_is_only_ever_set_as_text() -> None:
    js = (REPO / "web" / "static" / "app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "outerHTML" not in js
    assert "document.write" not in js and "eval(" not in js
    assert "outCompletion.textContent +=" in js


def test_debug_is_off(app) -> None:
    assert app.debug is False and app.config["PROPAGATE_EXCEPTIONS"] is False


# --- through to Serve -----------------------------------------------------------------------------


def test_model_identity_and_health(client) -> None:
    card = client.get("/api/model").get_json()
    assert card["id"] == MODEL_ID and card["val_loss"] == 3.25 and card["step"] == 7
    assert card["context_length"] == 1024 and card["registry_version"] is None
    assert "checkpoint" not in card  # a local path is none of the page's business
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "ok" and body["frontend"] == "ok"
    assert body["backend"]["status"] == "ok" and body["backend"]["model"] == MODEL_ID
    assert body["backend"]["running"] >= 0


def test_generate_equals_serve(client, serve_url) -> None:
    body = {"prompt": "Asthma is", "max_new_tokens": 24, "temperature": 0.9, "seed": 3}
    direct = requests.post(f"{serve_url}/generate", json=body, timeout=60).json()
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    out = r.get_json()
    assert out["text"] == direct["text"] and out["completion_tokens"] == direct["completion_tokens"]
    lineage = out["model"].pop("lineage")
    assert out["model"] == {"id": MODEL_ID, "registry_version": None, "val_loss": 3.25,
                            "eval_loss": None}  # fmt: skip
    assert lineage["model"] == MODEL_ID and lineage["registry_version"] is None
    assert r.headers["X-Medgpt-Model"] == MODEL_ID  # Serve's lineage headers, relayed
    assert f"model={MODEL_ID}" in r.headers["X-Medgpt-Lineage"]
    assert set(out) >= {"prompt_tokens", "finish_reason", "seconds", "ttft_s", "tokens_per_s"}


def test_stream_relays_serve_events(client) -> None:
    body = {"prompt": "Fever and", "max_new_tokens": 30, "temperature": 1.0, "seed": 11}
    whole = client.post("/api/generate", json=body).get_json()
    r = client.post("/api/generate/stream", json=body)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    events = _events(r.get_data())
    assert "".join(e.get("text", "") for e in events) == whole["text"]
    assert events[-1]["done"] is True
    assert events[-1]["completion_tokens"] == whole["completion_tokens"]
    assert events[-1]["model"]["id"] == MODEL_ID
    assert events[0] == {"model": events[-1]["model"]}  # which version answers, first
    assert r.headers["X-Medgpt-Model"] == MODEL_ID


def test_stream_is_not_buffered(web_url) -> None:
    """Over real HTTP: the first token reaches the client long before the generation ends."""
    body = {"prompt": "Once", "max_new_tokens": 400, "temperature": 1.0, "top_k": 0, "seed": 1}
    t0 = time.perf_counter()
    arrivals: list[tuple[float, dict]] = []
    with requests.post(f"{web_url}/api/generate/stream", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                arrivals.append((time.perf_counter() - t0, json.loads(line[6:])))
    first = next(t for t, e in arrivals if e.get("text"))
    done_at, done = arrivals[-1]
    assert done["done"] and done["completion_tokens"] == 400
    assert done_at > 0.3, "too fast to tell streaming from buffering"
    assert first < done_at / 3, (first, done_at)
    # Tokens arrive spread over the generation, not in a burst at the end.
    middle = [t for t, e in arrivals if e.get("text") and done_at / 3 < t < 2 * done_at / 3]
    assert len(middle) > 10, len(middle)


def test_closing_the_stream_cancels_the_generation(web_url, serve_url) -> None:
    before = serve_stats(serve_url)["finished"].get("cancelled", 0)
    body = {"prompt": "Once", "max_new_tokens": 500, "temperature": 1.0, "seed": 2}
    r = requests.post(f"{web_url}/api/generate/stream", json=body, stream=True, timeout=60)
    lines = r.iter_lines()
    assert next(line for line in lines if line)  # the first token arrived
    r.close()
    wait_for(
        lambda: serve_stats(serve_url)["finished"].get("cancelled", 0) > before,
        30,
        "Serve to cancel the abandoned generation",
    )
    assert serve_stats(serve_url)["running"] == 0


# --- bad input ------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "  \n "}, "prompt", "must not be empty"),
    ({"temperature": 1}, "prompt", "missing field 'prompt'"),
    ({"prompt": 42}, "prompt", "must be a string"),
    ({"prompt": "x" * 4001}, "prompt", "at most 4000 characters"),
    ({"prompt": "x", "temperature": 5}, "temperature", "from 0 to 2"),
    ({"prompt": "x", "temperature": -0.1}, "temperature", "from 0 to 2"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "from 0 to 2"),
    ({"prompt": "x", "temperature": True}, "temperature", "from 0 to 2"),
    ({"prompt": "x", "top_k": -1}, "top_k", ">= 0"),
    ({"prompt": "x", "top_k": 2.5}, "top_k", "whole number"),
    ({"prompt": "x", "top_p": 0}, "top_p", "above 0"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "at most 1"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens", "from 1 to 512"),
    ({"prompt": "x", "max_new_tokens": 513}, "max_new_tokens", "from 1 to 512"),
    ({"prompt": "x", "max_new_tokens": 10.0}, "max_new_tokens", "whole number"),
    ({"prompt": "x", "seed": -1}, "seed", ">= 0"),
    ({"prompt": "x", "seed": 2**63}, "seed", ">= 0"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": "a"}, "stop", "a list"),
    ({"prompt": "x", "max_tokens": 5}, "max_tokens", "unknown field 'max_tokens'"),
]


@pytest.mark.parametrize("route", ["/api/generate", "/api/generate/stream"])
@pytest.mark.parametrize(("body", "param", "message"), BAD_BODIES)
def test_invalid_bodies_are_400_naming_the_field(client, route, body, param, message) -> None:
    r = client.post(route, json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    err = r.get_json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert message in err["message"], err


def test_valid_edge_values_pass(client) -> None:
    body = {"prompt": "x", "temperature": 0, "top_k": 0, "top_p": 1, "max_new_tokens": 1,
            "seed": None, "stop": ["\n\n"]}  # fmt: skip
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["completion_tokens"] == 1


def test_serve_validation_errors_pass_through(client) -> None:
    """Serve knows the model's context; its 400 reaches the user with its own message."""
    body = {"prompt": "word " * 700, "max_new_tokens": 512}
    for route in ("/api/generate", "/api/generate/stream"):
        r = client.post(route, json=body)
        assert r.status_code == 400, r.get_data(as_text=True)
        err = r.get_json()["error"]
        assert err["param"] == "max_new_tokens" and "exceeds the model's context" in err["message"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "message"),
    [
        ("{not json", "application/json", 400, "not valid JSON"),
        ("", "application/json", 400, "body is empty"),
        ("[1, 2]", "application/json", 400, "must be a JSON object"),
        ('"prompt"', "application/json", 400, "must be a JSON object"),
        ('{"prompt": "x", "temperature": NaN}', "application/json", 400, "not valid JSON"),
        (b'{"prompt": "\xff"}', "application/json", 400, "not valid JSON"),
        ('{"prompt": "x"}', "text/plain", 415, "Content-Type: application/json"),
        ("prompt=x", "application/x-www-form-urlencoded", 415, "application/json"),
    ],
)
def test_malformed_bodies(client, data, content_type, status, message) -> None:
    for route in ("/api/generate", "/api/generate/stream"):
        r = client.post(route, data=data, content_type=content_type)
        assert r.status_code == status, r.get_data(as_text=True)
        assert message in r.get_json()["error"]["message"]


def test_oversize_body_is_413_json(client, web_url) -> None:
    big = json.dumps({"prompt": "x" * 20_000})
    r = client.post("/api/generate", data=big, content_type="application/json")
    assert r.status_code == 413 and "too large" in r.get_json()["error"]["message"]
    # And over a real socket, where the body is refused before it is read.
    r = requests.post(f"{web_url}/api/generate/stream", data=big,
                      headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == 413 and "limit 16384 bytes" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_are_json(client) -> None:
    r = client.get("/api/nope")
    assert r.status_code == 404 and r.get_json()["error"]["message"] == "no such page: /api/nope"
    r = client.get("/api/generate")
    assert r.status_code == 405 and "use POST" in r.get_json()["error"]["message"]
    assert "POST" in r.headers["Allow"]
    r = client.delete("/api/model")
    assert r.status_code == 405 and r.mimetype == "application/json"


def test_an_unexpected_error_is_one_line_json_without_a_trace(serve_url) -> None:
    app = create_app({"SERVE_URL": serve_url})

    @app.get("/api/boom")
    def boom():
        raise RuntimeError("secret internals /etc/passwd")

    r = app.test_client().get("/api/boom")
    assert r.status_code == 500
    text = r.get_data(as_text=True)
    assert "Traceback" not in text and "secret" not in text and "passwd" not in text
    assert r.get_json()["error"]["message"] == "Internal error in the web front (RuntimeError)."


# --- backends that are down, silent or failing ----------------------------------------------------


def test_backend_down_is_503_json_fast() -> None:
    app = create_app({"SERVE_URL": closed_port_url(), "CONNECT_TIMEOUT": 2})
    c = app.test_client()
    for method, route, body in [
        ("post", "/api/generate", {"prompt": "x"}),
        ("post", "/api/generate/stream", {"prompt": "x"}),
        ("get", "/api/model", None),
    ]:
        t0 = time.perf_counter()
        r = getattr(c, method)(route, json=body)
        assert time.perf_counter() - t0 < 2
        assert r.status_code == 503, r.get_data(as_text=True)
        err = r.get_json()["error"]
        assert err["type"] == "backend_unavailable" and "not reachable" in err["message"]
    health = c.get("/healthz")
    assert health.status_code == 200
    assert health.get_json() == {
        "status": "degraded",
        "frontend": "ok",
        "backend": {"status": "down", "message": "not reachable"},
    }


@pytest.fixture
def silent_backend():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_silent_backend_times_out_within_the_read_timeout(silent_backend) -> None:
    c = create_app({"SERVE_URL": silent_backend, "READ_TIMEOUT": 0.5}).test_client()
    for route in ("/api/generate", "/api/generate/stream"):
        t0 = time.perf_counter()
        r = c.post(route, json={"prompt": "x"})
        assert time.perf_counter() - t0 < 3
        assert r.status_code == 504
        err = r.get_json()["error"]
        assert err["type"] == "backend_timeout" and "0.5 s" in err["message"]
    assert c.get("/healthz").get_json()["backend"]["status"] == "down"


@pytest.fixture(scope="module")
def fake_serve():
    """A stand-in for Serve's failure modes that a healthy Serve app cannot be made to show:
    plain-text backpressure, a 500, a missing route, a stream cut off mid-generation, a
    stream that stalls."""
    fake = Flask("fake_serve")
    from flask import Response

    @fake.post("/busy/generate")
    def busy():
        return Response("Request dropped due to backpressure", 503, {"Retry-After": "7"})

    @fake.post("/broken/generate")
    def broken():
        body = {"error": {"message": "internal error (ValueError)", "type": "server_error"}}
        return Response(json.dumps(body), 500, mimetype="application/json")

    @fake.post("/cut/generate/stream")
    def cut():
        from flask import request

        # Shut the socket itself, as a dying replica does. Raising an error in the generator
        # is not the same: Werkzeug takes a ConnectionError for a client that left and keeps
        # the connection open, so the client would wait for its read timeout instead.
        sock = request.environ["werkzeug.socket"]

        def events():
            yield 'data: {"text": "Asthma"}\n\n'
            yield 'data: {"text": " is"}\n\n'
            sock.shutdown(socket.SHUT_RDWR)

        return Response(events(), mimetype="text/event-stream")

    @fake.post("/stall/generate/stream")
    def stall():
        def events():
            yield 'data: {"text": "Asthma"}\n\n'
            time.sleep(3)
            yield 'data: {"done": true}\n\n'

        return Response(events(), mimetype="text/event-stream")

    from werkzeug.serving import make_server

    port = free_port()
    server = make_server("127.0.0.1", port, fake, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def test_serve_failures_become_readable_errors(fake_serve) -> None:
    def post(prefix: str, route: str = "/api/generate", **cfg):
        app = create_app({"SERVE_URL": f"{fake_serve}/{prefix}", **cfg})
        return app.test_client().post(route, json={"prompt": "x"})

    r = post("busy")
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert r.get_json()["error"] == {"message": "The model server is busy; try again in a few "
                                     "seconds.", "type": "server_overloaded", "param": None,
                                     "code": None}  # fmt: skip
    r = post("broken")
    assert r.status_code == 502
    assert r.get_json()["error"]["message"] == (
        "The model server failed (HTTP 500): internal error (ValueError)"
    )
    r = post("missing")
    assert r.status_code == 502 and "has no medgpt application" in r.get_json()["error"]["message"]
    r = post("cut", "/api/generate/stream")
    events = _events(r.get_data())
    assert [e.get("text") for e in events[:2]] == ["Asthma", " is"]
    assert events[-1]["error"]["type"] == "backend_unavailable"
    assert "lost during the generation" in events[-1]["error"]["message"]
    r = post("stall", "/api/generate/stream", READ_TIMEOUT=0.5)
    events = _events(r.get_data())
    assert events[0] == {"text": "Asthma"} and events[-1]["error"]["type"] == "backend_timeout"


# --- the API key, binding, entry points -----------------------------------------------------------


def test_api_key_guards_only_the_api_routes(serve_url) -> None:
    c = create_app({"SERVE_URL": serve_url, "API_KEY": "s3cret"}).test_client()
    page = c.get("/")
    assert page.status_code == 200 and 'data-api-key-required="true"' in page.get_data(True)
    assert c.get("/healthz").status_code == 200
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}):
        r = c.get("/api/model", headers=headers)
        assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
        r = c.post("/api/generate", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401
    assert c.get("/api/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/api/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_listening_beyond_localhost_needs_a_key(capsys, monkeypatch) -> None:
    from medgpt.cli import main

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "key")
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ConfigError, match="MEDGPT_WEB_API_KEY"):
            check_bind(host, None)
    monkeypatch.delenv("MEDGPT_WEB_API_KEY", raising=False)
    assert main(["web", "--host", "0.0.0.0", "--serve-url", closed_port_url()]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # Ray's replica logs may precede it
    assert lines[-1].startswith("medgpt web: error: refusing to listen on 0.0.0.0")


def test_bad_settings_are_one_line_errors(monkeypatch) -> None:
    monkeypatch.setenv("MEDGPT_WEB_READ_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="MEDGPT_WEB_READ_TIMEOUT='soon'"):
        create_app()
    monkeypatch.setenv("MEDGPT_WEB_READ_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="MEDGPT_WEB_READ_TIMEOUT='0': read_timeout: must be"):
        create_app()
    monkeypatch.delenv("MEDGPT_WEB_READ_TIMEOUT")
    with pytest.raises(ConfigError, match="expected http://HOST:PORT"):
        create_app({"SERVE_URL": "localhost:8000"})
    with pytest.raises(ConfigError, match=r"unknown key serve \(allowed: api_key, "):
        create_app({"SERVE": "http://x"})


def test_env_configures_the_app(monkeypatch) -> None:
    monkeypatch.setenv("MEDGPT_SERVE_URL", "http://10.0.0.1:8123/")
    monkeypatch.setenv("MEDGPT_WEB_API_KEY", "k")
    monkeypatch.setenv("MEDGPT_WEB_MAX_BODY", "1000")
    app = create_app()
    assert app.config["SERVE_URL"] == "http://10.0.0.1:8123"
    assert app.config["API_KEY"] == "k" and app.config["MAX_CONTENT_LENGTH"] == 1000


def test_the_web_package_never_imports_torch_or_the_model() -> None:
    code = (
        "import sys, web.app; web.app.create_app(); "
        "bad = [m for m in ('torch', 'medgpt.model', 'medgpt.generation', 'ray') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def _start(cmd: list[str], url: str, tmp_path: Path, env: dict | None = None, stop_signal=None):
    log = open(tmp_path / "web.log", "w")  # noqa: SIM115 - closed by the caller's stop()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})  # fmt: skip

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "web.log").read_text()[-3000:]
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop() -> str:
        proc.send_signal(stop_signal or signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            log.close()
        return (tmp_path / "web.log").read_text()

    try:
        wait_for(up, 60, f"{cmd[:2]} to answer", interval=0.2)
    except BaseException:
        stop()
        raise
    return stop


@pytest.mark.parametrize(
    ("entry", "server"),
    [("python web/app.py", "gunicorn"), ("medgpt web", "gunicorn"),
     ("medgpt web --dev", "werkzeug development server")],
)  # fmt: skip
def test_entry_points_serve_the_page(serve_url, tmp_path, entry, server) -> None:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    head = [sys.executable, "web/app.py"] if entry.startswith("python") else [
        str(bin_dir / "medgpt"), "web"]  # fmt: skip
    head += ["--dev"] if entry.endswith("--dev") else []
    url = f"http://127.0.0.1:{port}"
    stop = _start([*head, "--port", str(port), "--serve-url", serve_url], url, tmp_path)
    try:
        assert "Not medical advice." in requests.get(url, timeout=10).text
        r = requests.get(f"{url}/api/model", timeout=10)
        assert r.json()["id"] == MODEL_ID
        assert ("gunicorn" in r.headers.get("Server", "")) == (server == "gunicorn"), r.headers
    finally:
        out = stop()
    assert f"medgpt web: {url} -> model server {serve_url} ({server}; Ctrl-C stops)" in out


def test_a_port_in_use_is_one_line(tmp_path, capsys) -> None:
    from web.app import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc = main(["--port", str(s.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen on 127.0.0.1:" in err and len(own_lines(err)) == 1


def test_gunicorn_serves_and_streams(serve_url, tmp_path) -> None:
    """The production command from the README, streaming unbuffered through gthread workers."""
    port = free_port()
    gunicorn = Path(sys.executable).parent / "gunicorn"
    cmd = [str(gunicorn), "-w", "2", "-k", "gthread", "--threads", "8",
           "-b", f"127.0.0.1:{port}", "web.app:create_app()"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # SIGINT: gunicorn's quick shutdown (a graceful one waited out its 30 s graceful timeout
    # here after the test's keep-alive requests).
    stop = _start(cmd, url, tmp_path, {"MEDGPT_SERVE_URL": serve_url}, signal.SIGINT)
    try:
        body = {"prompt": "Once", "max_new_tokens": 300, "temperature": 1.0, "seed": 4}
        t0 = time.perf_counter()
        with requests.post(f"{url}/api/generate/stream", json=body, stream=True,
                           timeout=60) as r:  # fmt: skip
            stamps = [(time.perf_counter() - t0, line) for line in r.iter_lines() if line]
        first, end = stamps[0][0], stamps[-1][0]
        assert b'"done": true' in stamps[-1][1]
        assert first < end / 3, (first, end)
    finally:
        stop()
