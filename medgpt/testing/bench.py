"""What the benchmarks in bench/ share: a spawned worker per measured method, memory and
machine readings, turn-taking between methods, and the lines and JSON they report with.

torch is imported only by the functions that need it, so a benchmark's parent process can
import this before deciding what to load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from medgpt.testing import peak_rss_mib

__all__ = [
    "Worker",
    "cpu_name",
    "decode_kernel_missing",
    "dump_json",
    "fmt_load",
    "in_fresh_process",
    "in_turn",
    "model_bench_parser",
    "peak_rss_mib",
    "reporting_errors",
    "rss_now_mib",
    "set_threads",
    "write_json",
]

R = TypeVar("R")
T = TypeVar("T")


class Worker:
    """One measured method in its own spawned interpreter, running ``target(conn, *args)``.

    Spawned, not forked: a fork would inherit the parent's memory and torch state, and then
    neither the peak RSS nor the allocator would be the method's own. The two sides exchange
    ``(kind, payload)`` pairs; the worker sends ``("error", traceback)`` when it fails (see
    ``reporting_errors``), which ``call`` raises here with the method's ``label``.
    """

    def __init__(self, label: str, target: Callable[..., None], *args: Any) -> None:
        self.label = label
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self._proc.start()
        child.close()

    def call(self, command: str | None = None) -> Any:
        """Send ``command`` (none: just wait for what the worker sends next) and return the
        payload of the worker's answer."""
        if command is not None:
            self._conn.send(command)
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"{self.label} worker exited (code {self._proc.exitcode}); out of memory?"
            ) from None
        if kind == "error":
            raise RuntimeError(f"{self.label} worker failed:\n{payload}")
        return payload

    def close(self) -> None:
        self._conn.close()
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()


@contextmanager
def reporting_errors(conn: Connection) -> Iterator[None]:
    """The worker side of ``Worker``: an exception in the block goes to the parent as its
    traceback (the parent raises it), and the pipe is closed either way."""
    try:
        yield
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn: Callable[..., R], *args: Any) -> R:
    """Call ``fn(*args)`` in a new spawned interpreter and return its result (errors re-raise)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def in_turn(methods: Sequence[T], round_no: int) -> list[T]:
    """``methods`` starting with a different one each round, so that neither always runs first
    (warm caches, turbo clocks) or always right after the other."""
    k = round_no % len(methods)
    return [*methods[k:], *methods[:k]]


def model_bench_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The flags of a benchmark that times one medgpt model preset in this process: --size,
    --rounds (default ``rounds``), --threads, --json; ``doc``'s first paragraph describes it."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size", default="gpt2", help="ModelConfig preset (default gpt2, 124M)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (0 or None: torch's default); returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def rss_now_mib() -> float:
    """Current resident set size (Linux /proc), to separate import cost from model cost."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_load(load: Sequence[float]) -> str:
    """A ``os.getloadavg()`` reading, with the core count it is to be read against."""
    return " ".join(f"{x:.2f}" for x in load) + f" (1/5/15 min, {os.cpu_count()} cores)"


def decode_kernel_missing(consequence: str) -> bool:
    """True, having said why on stderr, when medgpt's CPU decode kernels cannot be had;
    ``consequence`` says what that means for the benchmark."""
    from medgpt import kernels

    if kernels.available():
        return False
    print(f"the decode kernel is unavailable ({kernels.unavailable_reason()}): {consequence}",
          file=sys.stderr)  # fmt: skip
    return True


def write_json(path: Path, args: argparse.Namespace, **results: Any) -> None:
    """The benchmark's flags (paths as strings) and ``results`` as a JSON file, with the peak
    RSS, load average and thread count every benchmark reports beside its numbers."""
    import torch

    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **results,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }
    dump_json(path, record)


def dump_json(path: Path, record: dict[str, Any]) -> None:
    """Write a benchmark's ``record`` to ``path`` (its folder made if need be), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
