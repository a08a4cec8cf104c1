# CaloForge: every target creates/refreshes the virtualenv it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export ORT_DISABLE_TELEMETRY := 1
export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: venv quickstart test test-fast lint bench clean

# torch first, pinned to the CPU build on this machine; deepspeed builds against the installed torch
# (no build isolation, otherwise pip would pull a multi-GB CUDA torch into its build env).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/caloforge quickstart

test: $(STAMP)
	CALOFORGE_PYTEST_HARD_EXIT=1 $(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	CALOFORGE_PYTEST_HARD_EXIT=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check caloforge tests benchmarks
	$(VENV)/bin/ruff format --check caloforge tests benchmarks

# CPU benchmarks (tables + benchmarks/results/*.json); GPU figures: benchmarks/gpu_session.sh on a GPU host.
# The data-efficiency study runs its --quick grid here (about a minute); the CPU study (benchmarks/adaptation.py
# without --quick) takes over an hour on 2 cores: docs/adaptation.md. The fidelity benchmark runs its CPU
# budget (20 minutes of training plus about 20 of evaluation: docs/evaluation.md); `make bench FIDELITY_ARGS=--quick`
# makes it a smoke run.
BENCHES := simulator loader model evaluation export pretrain_scaling
FIDELITY_ARGS := --points 6
bench: $(STAMP)
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py $(BENCH_ARGS) || exit 1; done
	$(PY) benchmarks/adaptation.py --quick
	$(PY) benchmarks/fidelity.py $(FIDELITY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
