"""The champion in front of people on one machine: Ray Serve and the prompt page, side by
side, until Ctrl-C — for ``medgpt demo``, ``make demo`` and the quickstart's last step.

This module owns the processes: the Serve app in this process (on RAY_ADDRESS, the Ray this
process already joined, or a local one it starts), the page in a child process of its own
(Flask never shares a process with Ray or torch), and stopping all of it, leaving nothing
behind, whether Ctrl-C or SIGTERM ends it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from medgpt.errors import MedgptError

SERVE_START_TIMEOUT_S = 300  # a replica downloads (models:/) and loads the model first
WEB_START_TIMEOUT_S = 60


def wait_http(url: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until ``url`` answers; :class:`MedgptError` after ``timeout_s`` or as soon as
    ``alive()`` says the process that should answer has gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if alive is not None and not alive():
                raise MedgptError(f"{url}: the server stopped before it answered") from None
            time.sleep(0.5)
    raise MedgptError(f"{url} did not answer within {timeout_s:.0f} s")


def serve_with_page(
    checkpoint: str,
    storage_path: str,
    serve_port: int = 8000,
    web_port: int = 5000,
    serve_cpus: float | None = None,
    started: float | None = None,
) -> int:
    """Serve ``checkpoint`` and run the page beside it until Ctrl-C (or SIGTERM); then stop
    the page, Serve, and the local Ray this process started. ``started`` (a perf_counter
    reading) makes the ready line say how long the whole run took to get there."""
    import signal

    import ray
    from ray import serve

    from medgpt.serving import deploy

    t0 = time.perf_counter() if started is None else started

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ray Train's fit may have left its own SIGINT handler installed (it aborts a training
    # run, which is over), and on SIGTERM Ray's core aborts without cleaning up: both stop us
    # here instead.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = None
    try:
        overrides = {"checkpoint": checkpoint, "storage_path": storage_path, "num_cpus": serve_cpus}
        serve_url = deploy(overrides=overrides, port=serve_port)
        wait_http(f"{serve_url}/healthz", SERVE_START_TIMEOUT_S)
        # A session of its own, so that Ctrl-C reaches the page only through us.
        web = subprocess.Popen(
            [sys.executable, "-m", "medgpt.cli", "web", "--port", str(web_port),
             "--serve-url", serve_url],
            start_new_session=True,
        )  # fmt: skip
        page = f"http://127.0.0.1:{web_port}"
        wait_http(f"{page}/healthz", WEB_START_TIMEOUT_S, alive=lambda: web.poll() is None)
        print(f"ready in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"open {page}  (Ctrl-C stops the page, the model server and Ray)", flush=True)
        while web.poll() is None:
            time.sleep(0.5)
        raise MedgptError(f"the prompt page stopped (exit status {web.returncode})")
    except KeyboardInterrupt:
        print("stopping the page, Serve and Ray ...", flush=True)
        return 0
    finally:
        if web is not None and web.poll() is None:
            web.send_signal(signal.SIGINT)
            try:
                web.wait(10)
            except subprocess.TimeoutExpired:
                web.kill()
                web.wait()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", flush=True)
