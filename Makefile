# One target per job; CI and people call the same ones.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run install install-gateway test test-fast check bench clean

run:            ## install everything, prepare the model, start vLLM and the gateway in front of it
	./scripts/quickstart.sh

install:        ## the gateway, vLLM's build for this machine, and the default model's package
	./scripts/install.sh

install-gateway:  ## the gateway alone (enough for the simulator-backed tests)
	./scripts/install.sh --no-vllm

test: install   ## every test: unit, integration (simulator), real vLLM engine, browser
	./scripts/system-deps.sh
	$(PY) -m pytest -q tests

test-fast: install-gateway  ## unit and simulator-backed integration tests only
	$(PY) -m pytest -q tests/unit tests/integration

check:          ## lint and types
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tools
	$(PY) -m mypy

bench:          ## the standard benchmark scenarios; report in bench-results/
	./scripts/bench_all.sh bench-results/latest

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache test-artifacts
