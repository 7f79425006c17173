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

.PHONY: setup quickstart demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/medgpt quickstart

# The champion (models:/medgpt@champion) on Ray Serve at :8000 in the background, then the
# prompt page at http://127.0.0.1:5000 once Serve answers; Ctrl-C stops both. `medgpt serve`
# must stop with SIGINT (on SIGTERM Ray's core aborts and leaves processes behind), but a
# script's `&` makes it ignore SIGINT: DETACH restores it, in a session of its own so that
# Ctrl-C reaches it once, through the trap.
DEMO_SERVE_URL := http://127.0.0.1:8000
DETACH := $(BIN)/python -c "import os, signal, sys; os.setsid(); \
	signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
demo: $(STAMP)
	@$(DETACH) $(BIN)/medgpt serve & pid=$$!; \
	trap 'kill -INT $$pid 2>/dev/null; wait $$pid' EXIT INT TERM; \
	echo "waiting for the model server at $(DEMO_SERVE_URL) ..."; \
	until $(BIN)/python -c "import urllib.request as u; u.urlopen('$(DEMO_SERVE_URL)/healthz', timeout=2)" 2>/dev/null; do \
		kill -0 $$pid 2>/dev/null || { echo "medgpt serve stopped (see above)" >&2; exit 1; }; sleep 1; \
	done; \
	echo "open http://127.0.0.1:5000 (Ctrl-C stops the page and the model server)"; \
	$(BIN)/medgpt web --serve-url $(DEMO_SERVE_URL)

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
