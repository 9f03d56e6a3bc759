# Set-up and the two commands of the README. Every target builds .venv itself when needed.
#   make demo   - the whole pipeline on the embedded data (shards -> pretrain -> eval -> export)
#   make test   - ruff, the docs site (mkdocs build --strict) and the test suite (what CI runs)
# TORCH_SPEC picks the torch build: the default is the CPU wheel these CPU machines carry;
# on a GPU machine use e.g. `make demo TORCH_SPEC=torch` (PyPI's Linux wheel bundles CUDA),
# or install your cluster's torch into .venv first (pip skips torch when one already satisfies).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/selfsup demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --site-dir "$$(mktemp -d)"  # not --quiet: it hides the warnings --strict counts
	$(BIN)/pytest -q -ra --durations=15 -n 2 --dist loadgroup -m "not system"  # two workers (tests/conftest.py)
	$(BIN)/pytest -q -ra --durations=10 -m system  # namespaces and SLURM daemons, alone

test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -m "not slow and not slurm"

docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
