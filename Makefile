# The two commands a fresh clone needs: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test soak dev workers lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/rivya-pipeline demo

test: lint
	.ci/ensure-chromium
	$(BIN)/pytest

# Daemon deaths and lost PostgreSQL/RabbitMQ connections on real processes, minutes each (README "When things fail").
soak: setup
	$(BIN)/pytest -m soak

dev: setup
	$(BIN)/rivya-pipeline dev

# Warm Celery workers for a DAGSTER_HOME on deploy/celery/dagster.yaml (deploy/celery/README.md); next to `make dev`.
workers: setup
	$(BIN)/rivya-pipeline workers

bench: setup
	$(BIN)/rivya-pipeline bench all

# The static checks `make test` runs before the tests: lint, formatting, types, and that Dagster loads the definitions.
# pyright runs the release pinned in pyproject.toml, so its "newer version available" lookup is switched off; dg is
# told the venv it runs in, or it warns that the project's .venv is not the active one.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright --pythonpath $(BIN)/python
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg check defs

clean:
	rm -rf $(VENV) .dagster_home .demo test-output
