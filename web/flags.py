"""The page's command-line flags, for ``web/app.py`` and ``medgpt web`` alike. Only argparse
is imported here, so the ``medgpt`` command builds its parser without loading Flask."""

from __future__ import annotations

import argparse

DEFAULT_SERVE_URL = "http://127.0.0.1:8000"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (%(default)s); any other needs MEDGPT_WEB_API_KEY",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (%(default)s)")
    p.add_argument(
        "--serve-url",
        help=f"the Ray Serve HTTP endpoint (MEDGPT_SERVE_URL, else {DEFAULT_SERVE_URL})",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="werkzeug's development server instead of gunicorn (debugging only)",
    )
    p.add_argument("--workers", type=int, help="gunicorn worker processes (1)")
    p.add_argument("--threads", type=int, help="threads per worker: concurrent requests (32)")
