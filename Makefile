# The two quick-start commands: `make demo` and `make test`. Both create .venv on first use and
# install exact versions from lock/requirements.txt (what CI tested is what you get). GPU users
# install CUDA torch 2.13.0 into .venv first; the lock then pins everything else (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := lock/requirements.txt
PIP_VERSION := 26.3
RUN_DIR ?= runs/tiny
# The extras the quick start installs and the lock pins: the test tools, plus GGUF export (llama.cpp),
# serving and lm-evaluation-harness, which the pipeline's export/evaluate stages and the suite use.
# `pip install alignline` alone stays without them.
EXTRAS := dev gguf serve eval
comma := ,
space := $() $()

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-hf mutation deps-latest lock lint bench clean

$(BIN)/alignline: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q -c $(LOCK) torch
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[$(subst $(space),$(comma),$(EXTRAS))]'
	touch $(BIN)/alignline

install: $(BIN)/alignline

demo: install
	$(BIN)/alignline pipeline --config configs/pipeline/tiny.yaml --run-dir $(RUN_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

# About 90 s: the library and model tests, no stage trainings, Prefect or subprocesses.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not hf_battery" -q

# transformers' own common model tests against our model (downloads the installed version's sdist once
# into .cache/hf-battery/; needs the package registry). About 2 minutes on 2 cores.
test-hf: install
	$(BIN)/python -m pytest tests -m hf_battery -p no:cacheprovider

# Mutation testing of our PPO (alignline/rl/) against its fast tests; config in pyproject [tool.mutmut],
# accepted survivors in tests/mutation_survivors.md. mutmut is a tool, not a dependency: installed into
# .venv on first use, not in the lock. Writes mutants/ (results cached there; `rm -rf mutants` to redo).
MUTMUT_VERSION := 3.8.1
mutation: install
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q mutmut==$(MUTMUT_VERSION)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run
	$(BIN)/mutmut results

# The newest releases the registry serves, upper bounds ignored, in a throwaway venv.
deps-latest: install
	$(BIN)/python tools/deps_latest.py

# Recompile the lock after changing dependencies in pyproject.toml.
lock: install
	$(BIN)/uv pip compile pyproject.toml $(EXTRAS:%=--extra %) --universal --python-version 3.11 \
		--constraint lock/torch.txt -o $(LOCK) -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf runs .pytest_cache .venv-latest .cache/hf-battery mutants
