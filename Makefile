# One command each on a fresh machine: the venv is created and the package installed on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo cluster-demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependencies change; the install is editable, so code changes need nothing.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bastion demo

# Redis, an origin and three gateways following one pushed config (docs/cluster.md).
cluster-demo: $(STAMP)
	$(BIN)/python -m bastion.demo.cluster $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Bastion next to nginx under wrk (installs nginx and wrk with apt-get when missing).
# Options: make bench BENCH_ARGS='--rounds 5 --duration 20s'
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
