"""Helpers the test suite and the benchmarks share (ports, waiting, memory readings).

They live in the package, not under ``tests/`` or ``bench/``, so that both import them the
same way from an installed medgpt, with no ``sys.path`` edits and no test module importing
another. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import re
import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["REPO", "free_port", "own_lines", "peak_rss_mib", "wait_for"]

# The checkout this medgpt is imported from (the editable install the tests and benchmarks run
# against): they find serve/config.yaml, data/ and runs/ there, and start subprocesses in it.
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); after ``timeout``
    seconds, ``TimeoutError`` naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` on Linux. Not ``ru_maxrss``
    there: Linux keeps it across exec, so a spawned worker would report at least its parent's
    memory at the time it started (measured: 814 MiB for a child whose own peak was 15)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB here


# Ray prints its workers' log lines on the driver's stderr from a background thread, each
# prefixed "(ActorName pid=N)" (in cyan on a terminal), whenever a driver is connected in this
# process: a Serve replica's access log can land in the middle of another test's capture.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\([^()]*pid=\d+[^()]*\)")


def own_lines(text: str) -> list[str]:
    """The non-empty lines of captured output that this process printed itself (Ray's
    forwarded worker lines left out)."""
    return [line for line in text.splitlines() if line.strip() and not _RAY_FORWARDED.match(line)]
