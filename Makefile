# Every target sets itself up on a fresh machine: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-all bench bench-core clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# torch is pinned so that pip takes the CPU build; an unpinned torch pulls several GB of CUDA.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' || echo "torch not installed: its baselines will be skipped"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/rnnjax demo

# The fast tier: 3 minutes or less on 2 CPU cores once .venv is installed. Compiling is the
# cost, one core each: a worker per core, which takes tests file by file and takes over the other's
# when it runs out (worksteal), so that one long file does not leave a core idle.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist worksteal

test: $(VENV)/.installed
	$(PYTEST) -m "not slow"

# Everything, the slow tier and the thorough hypothesis profile included (12 minutes or less); CI runs it.
test-all: $(VENV)/.installed
	HYPOTHESIS_PROFILE=thorough $(PYTEST)

# The whole suite, accuracy up to 1e8 steps included: about 5 to 10 minutes on 2 CPU cores.
bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/suite.py
	$(BIN)/python benchmarks/flax_module.py

# The 10,000-step sequence and the accuracy check only (about 2 minutes); its results are not kept in git.
bench-core: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/suite.py --lengths 10000 --batches 1 8 --no-memory-check --out benchmarks/results/core

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info benchmarks/results/core
