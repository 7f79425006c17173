"""Finding and stopping the processes of a service that daemonizes (Ray) by a marker in their
command lines, and the process groups of services started here.

Ray's ``ray start`` returns after forking its GCS, raylet, dashboard and workers, and retitles
the workers, so neither a pid nor a process name identifies them: a private temp dir does,
since every Ray process is started with it on its command line, and workers descend from them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while ``pid`` exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


# Put into the environment of a service's start command (with the marker as its value): the
# processes it forks keep it even when their command line does not show the marker (Ray's client
# server, which outlives `ray start` as a child of init).
MARKER_ENV = "MEDGPT_PROCESS_MARKER"


def marked_pids(marker: bytes) -> list[int]:
    """The processes whose command line contains ``marker`` or whose MARKER_ENV starts with
    it, and their descendants."""
    marked, parent = set(), {}
    tagged = MARKER_ENV.encode() + b"=" + marker
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in cmd:
            marked.add(int(entry.name))
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # another user's process
            continue
        if any(var.startswith(tagged) for var in environ.split(b"\0")):
            marked.add(int(entry.name))
    # Ray retitles its workers (the marker leaves their command line): take descendants.
    changed = True
    while changed:
        extra = {pid for pid, pp in parent.items() if pp in marked and pid not in marked}
        changed = bool(extra)
        marked |= extra
    return sorted(marked)


def stop_marked(marker: bytes, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, every process :func:`marked_pids` finds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = marked_pids(marker)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in marked_pids(marker) if alive(p)]
        if not pids:
            return


def stop_group(pid: int, grace_s: float = 10.0) -> None:
    """Stop the process group led by ``pid`` (a service started with ``start_new_session``):
    SIGTERM, then SIGKILL after ``grace_s``. Its children (a server's workers) go with it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
