# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first
# (idempotent: a stamp keyed on pyproject.toml + scripts/setup.sh skips work when nothing changed).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean-demo

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh "$(DEMO_DIR)"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf "$(DEMO_DIR)"
