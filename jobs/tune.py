"""Hyperparameter sweep as a Ray job: ``ray job submit -- python jobs/tune.py --config ...``.

Exit status: 0 done (gate PASS or no gate), 1 gate FAIL, 2 bad input. Same flags as
``medgpt tune``.
"""

import sys

from medgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
