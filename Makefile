# Two commands do all the set-up: `make demo` and `make test` (both create or reuse .venv idempotently).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch this machine kind serves from disk; a GPU box keeps whatever torch it already has.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast demo demo-quick bench clean

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

demo: setup
	$(PY) -m kd_pipeline.demo --out demo_out

demo-quick: setup
	$(PY) -m kd_pipeline.demo --out demo_out_quick --quick

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf demo_out demo_out_quick .pytest_cache
