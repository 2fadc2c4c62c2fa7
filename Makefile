# One target per job; CI and people call the same ones.
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST_VENV ?= .venv-latest

.PHONY: run install install-gateway lock test test-fast test-latest check bench clean

run:            ## install everything, prepare the model, start vLLM and the gateway in front of it
	./scripts/quickstart.sh

install:        ## the gateway, vLLM's build for this machine, and the default model's package
	./scripts/install.sh

install-gateway:  ## the gateway alone (enough for the simulator-backed tests)
	./scripts/install.sh --no-vllm

lock:           ## regenerate constraints.txt, the versions every install and image uses
	./scripts/lock.sh

test: install   ## every test: unit, integration (simulator), real vLLM engine, browser, container
	@echo "[test] every test, about 20 minutes on 2 cores (the real vLLM engine starts several times)"
	./scripts/system-deps.sh
	$(PY) -m pytest -q tests

test-fast: install-gateway  ## unit and simulator-backed integration tests only
	$(PY) -m pytest -q tests/unit tests/integration

test-latest:    ## the newest versions pyproject allows, gateway only, in $(LATEST_VENV) (not in CI)
	VLLM_GATEWAY_VENV=$(CURDIR)/$(LATEST_VENV) ./scripts/install.sh --no-vllm --latest
	$(LATEST_VENV)/bin/python -m pytest -q tests/unit tests/integration \
		--deselect tests/unit/test_lock.py::test_installed_versions_are_the_locked_ones

check:          ## lint, format and types (mypy --strict over src, tools and tests)
	$(PY) -m ruff check src tools tests scripts
	$(PY) -m ruff format --check src tools tests scripts
	$(PY) -m mypy

bench:          ## the standard benchmark scenarios; report in bench-results/
	./scripts/bench_all.sh bench-results/latest

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache test-artifacts
