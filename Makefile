# The two commands a newcomer needs: `make run` (the demo) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit integration bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	./scripts/system-deps.sh

venv: $(STAMP)

run: $(STAMP) system-deps
	$(BIN)/repstage-mesh demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy repstage_mesh

test: $(STAMP) system-deps lint
	$(BIN)/pytest -q -ra

unit: $(STAMP)
	$(BIN)/pytest -q tests

integration: $(STAMP) system-deps
	$(BIN)/pytest -q integration

bench: $(STAMP) system-deps
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
