# The README's two commands: `make dev` runs the whole system, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: dev test lint migrate bench docs clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

dev: $(BIN)/.installed
	$(BIN)/bridgepost dev

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check shared services tests bench

migrate: $(BIN)/.installed
	$(BIN)/bridgepost migrate

# Regenerates docs/api/*.json and docs/configuration.md from the code (tests/test_docs.py checks them).
docs: $(BIN)/.installed
	$(BIN)/python -m shared.apidocs

# Every benchmark, then bench/results/REPORT.md (figures vs targets). `make bench QUICK=1`: a smoke run.
bench: $(BIN)/.installed
	$(BIN)/python bench/signup.py $(if $(QUICK),--quick)
	$(BIN)/python bench/latency.py $(if $(QUICK),--quick)
	$(BIN)/python bench/campaign.py $(if $(QUICK),--quick)
	$(BIN)/python bench/report.py

clean:
	rm -rf var .pytest_cache
