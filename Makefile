# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# /opt/wheels holds the CPU torch wheel on our machines; elsewhere pip falls back to the index.
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test lint clean

$(VENV)/.base: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e ".[dev]"
	@touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PIP) -e ".[demo]"
	@touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/vtprune demo

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
