"""Running the page: gunicorn by default, werkzeug's development server behind a flag.

gunicorn's threaded workers (``gthread``) hold one thread per open stream, parse HTTP with
strict framing (a request with both Content-Length and chunked Transfer-Encoding is refused),
and are what the page runs on in production too. Its own refusals, for requests that never
reach Flask (a malformed request line, conflicting or oversized headers), are rewritten here
as the same JSON error body as every other answer, with a 4xx status.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask

from medgpt.api import error_body

DEFAULT_WORKERS = 1
DEFAULT_THREADS = 32  # concurrent requests a worker serves; each stream holds one


def _json_write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with a JSON body. Its 501 (a Transfer-Encoding it does
    not implement) is the client's fault as far as this page goes: 400."""
    from gunicorn import util

    if status_int == 501:
        status_int, reason = 400, "Bad Request"
    body = json.dumps(error_body(mesg or reason, "invalid_request_error")).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


def run_gunicorn(
    app: Flask, host: str, port: int, workers: int = DEFAULT_WORKERS, threads: int = DEFAULT_THREADS
) -> None:
    """Serve ``app`` with gunicorn in this process (its arbiter) until SIGINT/SIGTERM."""
    import gunicorn.util
    from gunicorn.app.base import BaseApplication

    # Workers are forked from this process and inherit the replacement.
    gunicorn.util.write_error = _json_write_error
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {
        "bind": [bind],
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        # A stream can stay open as long as a generation runs; gthread's timeout is the
        # worker's heartbeat, not a request's, so it does not cut streams.
        "timeout": 60,
        "graceful_timeout": 5,  # Ctrl-C: open streams get this long to end
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        # Tighter than gunicorn's defaults: the page's requests are small.
        "limit_request_line": 4094,
        "limit_request_fields": 64,
        "limit_request_field_size": 8190,
    }

    class PageServer(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return app

    PageServer().run()


def run_development(app: Flask, host: str, port: int) -> None:
    """werkzeug's threaded server (``--dev``): for debugging the page, not for users."""
    from werkzeug.serving import run_simple

    run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)
