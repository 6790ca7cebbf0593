# The two commands a newcomer runs (see README): `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-install lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: setup
	$(BIN)/convoy generate --max-tokens 48 "def fibonacci(n):" "import os"

lint: setup
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

# convoy installed as a user gets it (a wheel in a clean venv, not editable) imports from
# site-packages and compiles its CPU kernels there; see scripts/check_install.sh.
test-install: setup
	VENV_PYTHON=$(BIN)/python scripts/check_install.sh

# The suite checks the CPU paths (float32, convoy's kernels), so GPUs are hidden from it;
# tests/test_cuda.py then checks the CUDA path where a GPU is present (it skips elsewhere).
test: lint test-install
	CUDA_VISIBLE_DEVICES= $(BIN)/pytest -q
	$(BIN)/pytest -q tests/test_cuda.py
