# Two commands for a fresh machine (each creates .venv and installs on first use):
#   make quickstart   the main job on the embedded defaults, ending with the champion served
#   make test         ruff + the whole test suite, slow end-to-end cases included (what CI runs)
# and after the quickstart, `make demo`: the champion on Ray Serve + the prompt page.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medgpt-installed
# The CPU wheel on these machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup quickstart demo test test-fast lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/medgpt quickstart

# The champion (models:/medgpt@champion) on Ray Serve at :8000 and the prompt page at
# http://127.0.0.1:5000 beside it; Ctrl-C stops both (medgpt/demo.py owns the processes).
demo: $(STAMP)
	$(BIN)/medgpt demo

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: lint
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

# The GPU check (bench/gpu_check.py, docs/benchmarks.md): CUDA tests, 124M training (DDP, FSDP),
# the gpt2-xl plan, decode vs HF generate and a GPU Serve replica, against their targets; a few
# minutes on one GPU, exit 1 if a step failed. GPU_CHECK_ARGS=--cpu checks the plumbing on a CPU.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
