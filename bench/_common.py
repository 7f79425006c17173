"""What the serving benchmarks share. Importing it puts the repository on ``sys.path`` (the
benchmarks run as ``python bench/NAME.py`` from a checkout, without installing medgpt)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def peak_rss_mib() -> float:
    """This process's peak resident memory (``ru_maxrss``) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB here


def decode_kernel_missing(consequence: str) -> bool:
    """True, having said why on stderr, when medgpt's CPU decode kernels cannot be had;
    ``consequence`` says what that means for the benchmark."""
    from medgpt import kernels

    if kernels.available():
        return False
    print(f"the decode kernel is unavailable ({kernels.unavailable_reason()}): {consequence}",
          file=sys.stderr)  # fmt: skip
    return True
