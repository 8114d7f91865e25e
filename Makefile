# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench lint typecheck torture clean

setup:
	@bash scripts/bootstrap.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(PY) -m gateway.demo

bench: setup
	$(PY) -m bench

# Long fault, attack and fuzz runs (make test runs the same scenarios in a short configuration).
torture: setup
	AGW_TORTURE=long $(PY) -m pytest -q -p no:cacheprovider tests/torture

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy hsm gateway/protocol

typecheck: lint

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
