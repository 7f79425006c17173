"""Train a GPT on Ray Train (same flags as `medgpt train`).

ray job submit --working-dir . -- python jobs/train.py --config configs/tiny-cpu.yaml
"""

import sys

from medgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
