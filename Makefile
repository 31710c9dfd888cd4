# `make quickstart` and `make test` set everything up on a fresh machine in a virtualenv in .venv.
# The tests need torch: its CPU build is installed first (an unpinned torch would pull a
# multi-GB CUDA build), then mpt_jax with its test extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNTIME_STAMP := $(VENV)/.runtime-stamp

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: setup quickstart test lint format
setup: $(STAMP)

# the main job: prepare the built-in corpus (once), train experiments/quickstart.yaml, export to HF
quickstart: $(RUNTIME_STAMP)
	$(BIN)/mpt-jax train experiments/quickstart.yaml --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
