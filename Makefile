# The two commands: `make pipeline` (set up, run the whole pipeline through the Prefect flow on the
# embedded default) and `make test` (set up, run the test suite). `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stages run `python -m tasks.<stage>` through dvc: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Offline, the Prefect server's telemetry only fails (and logs an error each time).
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup pipeline repro test bench status clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

pipeline: setup
	$(BIN)/condenser run

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900

bench: setup
	$(BIN)/python bench/pipeline.py

status: setup
	$(BIN)/condenser status

clean:
	rm -rf $(VENV)
