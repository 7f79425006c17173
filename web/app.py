"""The prompt page: a thin Flask front over the Ray Serve HTTP API.

``GET /`` is the page (Jinja template + static JS/CSS, no build step). ``POST /api/generate``
and ``POST /api/generate/stream`` (SSE) are validated here and forwarded to Serve's
``/generate`` and ``/generate/stream``; ``GET /api/model`` is the served model's identity
(from Serve's ``/v1/models``); ``GET /healthz`` reports this front and the model server.

This module never imports torch or the model: it only speaks HTTP to Serve, so it starts in
a fraction of a second and runs anywhere (``python web/app.py``, ``medgpt web``, or
``gunicorn 'web.app:create_app()'`` in production).

Security: the page renders model output as text only (``textContent``), every response
carries a Content-Security-Policy without inline scripts or styles, bodies are capped
(``MAX_CONTENT_LENGTH``), debug is off, errors are one-line JSON (never a stack trace), and
``MEDGPT_WEB_API_KEY`` guards the /api routes when the page is exposed beyond localhost.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import ipaddress
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import requests
import urllib3
from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from medgpt.api import (
    DEFAULT_MAX_TOKENS_CAP,
    MAX_STOP_STRINGS,
    PAGE_MAX_BODY_BYTES,
    PAGE_MAX_PROMPT_CHARS,
    ApiError,
    GenerateRequest,
    error_body,
    parse_json,
    sse,
)
from medgpt.api import validate as api_validate
from medgpt.config import from_mapping, parse_scalar
from medgpt.errors import ConfigError
from web.flags import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SERVE_URL, add_arguments

log = logging.getLogger("medgpt.web")


# The page's limits are the protocol's, tighter ones named there (medgpt.api): every valid body
# fits the body limit, and a bad one is answered here, in Serve's words, without a round trip.
LIMITS: dict[str, Any] = {
    "prompt_max_chars": PAGE_MAX_PROMPT_CHARS,
    "temperature": [0.0, 2.0],
    "top_k_min": 0,
    "top_p": [0.0, 1.0],  # (0, 1]
    "max_new_tokens": [1, DEFAULT_MAX_TOKENS_CAP],
    "max_stop_strings": MAX_STOP_STRINGS,
}
# What the page starts with (Serve's own defaults differ slightly: top_p 1.0).
DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_new_tokens": 64}
EXAMPLES = [
    "ICD-10-CM Chapter 9: Diseases of the circulatory system (I00-I99)\n",
    "J45 Asthma\n",
    "E11 Type 2 diabetes mellitus\n",
    "Question: What are the symptoms of iron deficiency anemia?\nAnswer:",
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Serve's headers naming the version that answered (medgpt.serving.deployment.Loaded).
LINEAGE_HEADERS = ("X-Medgpt-Model", "X-Medgpt-Lineage")


def _respond(err: ApiError) -> Response:
    resp = jsonify(err.body())
    resp.status_code = err.status
    resp.headers.update(err.headers)
    return resp


# --- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass
class WebSettings:
    """The page's settings. Each has an environment variable (``ENV``) and a ``create_app``
    key (its name in upper case, Flask's convention); read through medgpt's one config
    parser, so a bad value is refused the way a bad recipe key is."""

    serve_url: str = DEFAULT_SERVE_URL
    api_key: str | None = None  # when set, the /api routes require it
    connect_timeout: float = 3.0
    # Between two reads from Serve (a whole answer for /api/generate, one token for the
    # stream): generous, since a busy server queues requests before the first token.
    read_timeout: float = 60.0
    max_content_length: int = PAGE_MAX_BODY_BYTES

    ENV: ClassVar[dict[str, str]] = {
        "serve_url": "MEDGPT_SERVE_URL",
        "api_key": "MEDGPT_WEB_API_KEY",
        "connect_timeout": "MEDGPT_WEB_CONNECT_TIMEOUT",
        "read_timeout": "MEDGPT_WEB_READ_TIMEOUT",
        "max_content_length": "MEDGPT_WEB_MAX_BODY",
    }

    def __post_init__(self) -> None:
        self.serve_url = self.serve_url.rstrip("/")
        if not self.serve_url.startswith(("http://", "https://")):
            raise ConfigError(f"serve_url: {self.serve_url!r}: expected http://HOST:PORT")
        for name in ("connect_timeout", "read_timeout", "max_content_length"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")


def load_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The app's Flask config: explicit ``overrides`` (``create_app`` keys) win over
    environment variables, which win over the defaults. An error names where the bad value
    came from (``MEDGPT_WEB_READ_TIMEOUT='soon': ...``)."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, var in WebSettings.ENV.items():
        raw = os.environ.get(var)
        if raw:  # numbers are written as text in the environment: read them as YAML does
            data[name] = raw if name in ("serve_url", "api_key") else parse_scalar(raw)
            origin[name] = f"{var}={raw!r}"
    for key, value in (overrides or {}).items():
        data[key.lower()] = value
        origin[key.lower()] = f"{key}={value!r}"
    try:
        settings = from_mapping(WebSettings, data)
    except ConfigError as e:
        field = str(e).split(":", 1)[0].removeprefix("unknown key ").split(" ", 1)[0]
        where = origin.get(field)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return {k.upper(): v for k, v in dataclasses.asdict(settings).items()}


# --- validation ----------------------------------------------------------------------------------


def validate(body: Any) -> dict[str, Any]:
    """A /api/generate body → the body for Serve, or :class:`ApiError` (400) naming the field.
    Only fields given are forwarded; Serve fills in its defaults."""
    req = api_validate(GenerateRequest, body, max_prompt_chars=PAGE_MAX_PROMPT_CHARS)
    return req.model_dump(exclude_unset=True)


def _read_limited(limit: int) -> bytes:
    """The body, refused with 413 once past ``limit`` bytes, declared or chunked: a chunked
    body has no Content-Length to check up front, so it is cut off while being read."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request is too large (limit {limit} bytes).")
    # werkzeug bounds this stream by the Content-Length, or by MAX_CONTENT_LENGTH for a
    # chunked body (413 past it), and gives an empty one when the request has neither.
    stream = request.stream
    data = b""
    while chunk := stream.read(min(8192, limit + 1 - len(data))):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"The request is too large (limit {limit} bytes).")
    return data


def _json_body() -> Any:
    if request.mimetype != "application/json":
        raise ApiError(415, "send the body as JSON with Content-Type: application/json")
    return parse_json(_read_limited(current_app.config["MAX_CONTENT_LENGTH"]))


# --- the proxy -----------------------------------------------------------------------------------


def _upstream(method: str, path: str, body: Any = None, stream: bool = False) -> requests.Response:
    cfg = current_app.config
    url = f"{cfg['SERVE_URL']}{path}"
    connect, read = cfg["CONNECT_TIMEOUT"], cfg["READ_TIMEOUT"]
    try:
        return requests.request(method, url, json=body, stream=stream, timeout=(connect, read))
    except requests.ConnectTimeout:
        raise ApiError(
            503,
            f"The model server did not accept a connection within {connect:g} s. "
            "Is it running (medgpt serve)?",
            kind="backend_unavailable",
        ) from None
    except requests.ReadTimeout:
        raise ApiError(
            504,
            f"The model server did not answer within {read:g} s; try again, or ask for "
            "fewer tokens.",
            kind="backend_timeout",
        ) from None
    except requests.ConnectionError:
        raise ApiError(
            503,
            "The model server is not reachable. Start it (medgpt serve) and try again.",
            kind="backend_unavailable",
        ) from None
    except requests.RequestException as e:
        log.warning("request to %s failed: %r", url, e)
        raise ApiError(502, "The model server could not be asked.", kind="bad_gateway") from None


def _relay_error(resp: requests.Response) -> ApiError:
    """Serve's answer when it is not a 200: its own message where it has one (validation
    errors name the field), never its body verbatim otherwise."""
    try:
        err = resp.json()["error"]
        message, param, kind = str(err["message"]), err.get("param"), str(err.get("type"))
    except (ValueError, KeyError, TypeError):
        err = None
    finally:
        resp.close()
    status = resp.status_code
    if err is not None and status in (400, 404, 413, 422):
        return ApiError(status if status != 422 else 400, message, param, kind)
    if status in (429, 503):
        retry = resp.headers.get("Retry-After", "2")
        return ApiError(
            503,
            "The model server is busy; try again in a few seconds."
            if err is None
            else f"{message} (the model server is busy)",
            kind="server_overloaded",
            headers={"Retry-After": retry if retry.isdigit() else "2"},
        )
    if status == 404:
        return ApiError(
            502,
            f"The model server at {current_app.config['SERVE_URL']} has no medgpt application "
            "(HTTP 404). Is MEDGPT_SERVE_URL right?",
            kind="bad_gateway",
        )
    detail = f": {message}" if err is not None else ""
    return ApiError(502, f"The model server failed (HTTP {status}){detail}", kind="bad_gateway")


def _relay_stream(resp: requests.Response, read_timeout: float) -> Iterator[bytes]:
    """Serve's SSE bytes, forwarded as they arrive (one read per chunk: no buffering). When
    the browser goes away the server closes this generator, which closes the connection to
    Serve, which cancels the generation there."""
    try:
        for chunk in resp.iter_content(chunk_size=None):
            if chunk:
                yield chunk
    except requests.RequestException as e:
        timed_out = e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError)
        message = (
            f"The model server sent nothing for {read_timeout:g} s; the generation was abandoned."
            if timed_out
            else "The connection to the model server was lost during the generation."
        )
        kind = "backend_timeout" if timed_out else "backend_unavailable"
        yield ("\n\n" + sse(error_body(message, kind))).encode()
    finally:
        resp.close()


# --- the app -------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The Flask app. ``config`` keys (environment fallbacks): ``SERVE_URL``
    (``MEDGPT_SERVE_URL``, default http://127.0.0.1:8000), ``API_KEY``
    (``MEDGPT_WEB_API_KEY``: when set, /api routes need it in ``X-API-Key`` or
    ``Authorization: Bearer``), ``CONNECT_TIMEOUT`` / ``READ_TIMEOUT`` in seconds
    (``MEDGPT_WEB_CONNECT_TIMEOUT`` 3, ``MEDGPT_WEB_READ_TIMEOUT`` 60), ``MAX_CONTENT_LENGTH``
    in bytes (``MEDGPT_WEB_MAX_BODY``, 16 KiB)."""
    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.config.update(load_config(config))
    app.config.update(DEBUG=False, PROPAGATE_EXCEPTIONS=False)
    app.json.sort_keys = False

    @app.before_request
    def _check_key() -> Response | None:
        key = app.config["API_KEY"]
        if not key or not request.path.startswith("/api/"):
            return None
        given = request.headers.get("X-API-Key", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given and hmac.compare_digest(given.encode(), str(key).encode()):
            return None
        return _respond(
            ApiError(
                401,
                "This page needs an API key: enter it above (sent as the X-API-Key header).",
                kind="authentication_error",
            )
        )

    @app.after_request
    def _headers(resp: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(name, value)
        if request.path.startswith("/api/") or request.path == "/healthz":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> Response:
        return _respond(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        if status == 413:
            message = f"The request is too large (limit {app.config['MAX_CONTENT_LENGTH']} bytes)."
        elif status == 405:
            allowed = ", ".join(m for m in e.valid_methods or [] if m not in ("HEAD", "OPTIONS"))
            message = f"{request.method} is not allowed on {request.path} (use {allowed})"
        elif status == 404:
            message = f"no such page: {request.path}"
        else:
            message = f"{e.name}"
        err = ApiError(status, message, kind="invalid_request_error")
        resp = _respond(err)
        if status == 405 and e.valid_methods:
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        # Logged with its traceback for the operator; the user gets one line.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _respond(
            ApiError(
                500, f"Internal error in the web front ({type(e).__name__}).", kind="server_error"
            )
        )

    @app.get("/")
    def index() -> str:
        return render_template(
            "index.html",
            limits=LIMITS,
            defaults=DEFAULTS,
            examples=EXAMPLES,
            api_key_required=bool(app.config["API_KEY"]),
        )

    @app.get("/healthz")
    def healthz() -> Response:
        """200 whenever this front answers; ``backend`` says whether Serve does."""
        backend: dict[str, Any]
        try:
            resp = requests.get(
                f"{app.config['SERVE_URL']}/healthz",
                timeout=(app.config["CONNECT_TIMEOUT"], min(app.config["READ_TIMEOUT"], 5.0)),
            )
            if resp.status_code == 200:
                data = resp.json()
                backend = {"status": "ok", "model": data.get("model")}
                for key in ("running", "waiting"):
                    if key in data:
                        backend[key] = data[key]
            else:
                backend = {"status": "error", "message": f"HTTP {resp.status_code}"}
        except requests.Timeout:
            backend = {"status": "down", "message": "no answer within the timeout"}
        except (requests.RequestException, ValueError):
            backend = {"status": "down", "message": "not reachable"}
        status = "ok" if backend["status"] == "ok" else "degraded"
        return jsonify({"status": status, "frontend": "ok", "backend": backend})

    @app.get("/api/model")
    def model() -> Response:
        resp = _upstream("GET", "/v1/models")
        if resp.status_code != 200:
            raise _relay_error(resp)
        try:
            card = resp.json()["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ApiError(
                502, "The model server sent no model card.", kind="bad_gateway"
            ) from None
        keys = ("id", "registry_version", "registry_aliases", "val_loss", "eval_loss", "step",
                "context_length", "training_run_id", "int8", "lineage")  # fmt: skip
        return jsonify({k: card.get(k) for k in keys})

    def _lineage(upstream: Any, out: Response) -> Response:
        # Which version answered (Serve's headers), passed on as they came.
        for name in LINEAGE_HEADERS:
            if name in upstream.headers:
                out.headers[name] = upstream.headers[name]
        return out

    @app.post("/api/generate")
    def generate() -> Response:
        body = validate(_json_body())
        resp = _upstream("POST", "/generate", body)
        if resp.status_code != 200:
            raise _relay_error(resp)
        try:
            out = jsonify(resp.json())
        except ValueError:
            raise ApiError(502, "The model server sent no JSON.", kind="bad_gateway") from None
        return _lineage(resp, out)

    @app.post("/api/generate/stream")
    def generate_stream() -> Response:
        body = validate(_json_body())
        resp = _upstream("POST", "/generate/stream", body, stream=True)
        if resp.status_code != 200:
            resp.content  # noqa: B018 - read the (small) error body before closing
            raise _relay_error(resp)
        out = _lineage(
            resp,
            Response(
                _relay_stream(resp, app.config["READ_TIMEOUT"]),
                mimetype="text/event-stream",
                headers=STREAM_HEADERS,
            ),
        )
        # Also when the client leaves before the first chunk (the generator never started).
        out.call_on_close(resp.close)
        return out

    return app


# --- running it ----------------------------------------------------------------------------------


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the page beyond this machine without an API key."""
    if not _is_loopback(host) and not api_key:
        raise ConfigError(
            f"refusing to listen on {host} without an API key: set MEDGPT_WEB_API_KEY (the "
            "/api routes then require it), or listen on 127.0.0.1"
        )


def run(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    serve_url: str | None = None,
    dev: bool = False,
    workers: int | None = None,
    threads: int | None = None,
) -> int:
    """Serve the page until interrupted: with gunicorn (web/server.py), or with werkzeug's
    development server when ``dev`` is set."""
    from web import server

    overrides = {"SERVE_URL": serve_url} if serve_url else {}
    app = create_app(overrides)
    check_bind(host, app.config["API_KEY"])
    _check_port(host, port)
    shown = f"[{host}]" if ":" in host else host
    how = "werkzeug development server" if dev else "gunicorn"
    print(
        f"medgpt web: http://{shown}:{port} -> model server {app.config['SERVE_URL']} "
        f"({how}; Ctrl-C stops)",
        flush=True,
    )
    if dev:
        server.run_development(app, host, port)
    else:
        server.run_gunicorn(
            app, host, port, workers or server.DEFAULT_WORKERS, threads or server.DEFAULT_THREADS
        )
    return 0


def _check_port(host: str, port: int) -> None:
    """One line when the address cannot be had (gunicorn would retry for 5 s, then exit with
    its own log lines)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def build_parser(prog: str = "web/app.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The medgpt prompt page (Flask).")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args.host, args.port, args.serve_url, args.dev, args.workers, args.threads)
    except ConfigError as e:
        print(f"web: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
