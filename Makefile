# Two commands do all the set-up: `make demo` and `make test` (both create or reuse .venv idempotently).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch this machine kind serves from disk; a GPU box keeps whatever torch it already has.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# The accelerator is left alone where an NVIDIA GPU is visible (DeepSpeed then picks CUDA, runs use bf16); only
# without one is DeepSpeed told up front that it is on the CPU. `DS_ACCELERATOR=cpu make ...` still forces the CPU.
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast test-gpu demo demo-quick repro bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# deepspeed builds from source and imports torch in setup.py: no build isolation (it would fetch a CUDA torch).
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

# The GPU tier alone (skipped, with the reason, without CUDA).
test-gpu: setup
	$(PY) -m pytest -q tests -m gpu

demo: setup
	$(PY) -m kd_pipeline.demo --out demo_out

demo-quick: setup
	$(PY) -m kd_pipeline.demo --out demo_out_quick --quick

# The controlled 5-seed experiment (kd_pipeline/repro/design.py); hours on 2 CPU cores, resumable: run it again.
repro: setup
	$(PY) -m kd_pipeline.repro --out repro_out --results bench/results/repro_cpu.json

bench: setup
	$(PY) -m bench.run_all

# One prepared device check (about 8 minutes on one H100/H200): the GPU tier, the CUDA benchmarks and stage-1 MFU,
# written to bench/results/*_cuda.json.
gpu-check: setup
	$(PY) -m bench.gpu_check

clean:
	rm -rf demo_out demo_out_quick repro_out .pytest_cache
