# Tightwad. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TIGHTWAD := $(VENV)/bin/tightwad
CACHE ?= $(HOME)/.cache/tightwad
PIN := images/llama.cpp/pin.env
LLAMA_CPP_PYTHON_VERSION := $(shell sed -n 's/^LLAMA_CPP_PYTHON_VERSION=//p' $(PIN))
PYTEST_ARGS ?=

.PHONY: help
help: ## this list
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# -- set-up -----------------------------------------------------------------------

$(VENV)/.installed: pyproject.toml $(PIN)
	@echo "→ Python environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The bindings are built with LLAMA_BUILD=OFF and load the pinned libllama,
	@# so llama.cpp is compiled once (by `make llama`), not twice.
	images/llama.cpp/build.sh --fetch-only
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q \
	  "$(CACHE)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz"
	$(PY) -m pip install -q -e '.[dev,verifier]'
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create the Python environment (.venv)

.PHONY: llama
llama: ## build the pinned llama.cpp (cached in ~/.cache/tightwad)
	images/llama.cpp/build.sh

.PHONY: models
models: venv ## fetch and check the real GGUF models and write the tiny test pairs
	$(TIGHTWAD) models fetch --tiny

# -- running ----------------------------------------------------------------------

.PHONY: up
up: venv llama models ## start draft, verifier and proxy locally (ports 8081, 8090, 8088)
	$(TIGHTWAD) local up

.PHONY: down
down: ## stop what `make up` started
	$(TIGHTWAD) local down

.PHONY: ps
ps: ## show what `make up` started
	$(TIGHTWAD) local ps

# -- checks -----------------------------------------------------------------------

.PHONY: test
test: venv llama models ## run the whole test suite against real llama.cpp servers
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## static checks
	$(VENV)/bin/ruff check proxy orchestrator tests

.PHONY: bench-verifier
bench-verifier: venv llama models ## verify latency (1, 4, 16 drafted) against llama-server generating as many
	$(PY) tests/bench_verifier.py
