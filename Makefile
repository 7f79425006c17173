# Two commands for a fresh machine (each creates .venv and installs on first use):
#   make quickstart   the main job on the embedded defaults
#   make test         ruff + the whole test suite, slow end-to-end cases included (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medgpt-installed
# The CPU wheel on these machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/medgpt quickstart

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
