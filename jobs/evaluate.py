"""Readiness gate as a Ray job: ``ray job submit -- python jobs/evaluate.py --checkpoint ...``.

Exit status: 0 PASS (or no --max-loss), 1 FAIL, 2 bad input. Same flags as ``medgpt evaluate``.
"""

import sys

from medgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
