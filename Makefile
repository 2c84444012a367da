# The two quick-start commands: `make demo` and `make test`. Both create .venv on
# first use. torch is pinned only here: 2.13.0 is the CPU wheel on our boxes; GPU
# users can `pip install torch` from their CUDA index before `make`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/tiny

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-hf lint bench clean

$(BIN)/alignline: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/alignline

install: $(BIN)/alignline

demo: install
	$(BIN)/alignline pipeline --config configs/pipeline/tiny.yaml --run-dir $(RUN_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

# transformers' own common model tests against our model (downloads the installed version's sdist once into
# .cache/hf-battery/; needs the package registry). Not part of `make test`. About 2 minutes on 2 cores.
test-hf: install
	$(BIN)/python -m pytest tests -m hf_battery -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf runs .pytest_cache .cache/hf-battery
