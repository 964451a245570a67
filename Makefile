# The two commands a fresh clone needs: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test dev lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/rivya-pipeline demo

test: setup
	$(BIN)/ruff check .
	.ci/ensure-chromium
	$(BIN)/pytest

dev: setup
	$(BIN)/rivya-pipeline dev

bench: setup
	$(BIN)/rivya-pipeline bench all

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .dagster_home .demo test-output
