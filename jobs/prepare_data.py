"""Prepare token shards from medical corpora (same flags as `medgpt prepare`).

python jobs/prepare_data.py --source builtin:icd10cm --out data/icd10cm
ray job submit --working-dir . -- python jobs/prepare_data.py --source ... --out /abs/path
"""

import sys

from medgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
