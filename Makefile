# The two commands: `make pipeline` (set up, run the whole pipeline through the Prefect flow on the
# embedded default) and `make test` (set up, run the test suite). `.ci/run` calls `make test`.
# Setup installs the exact versions pinned in requirements.lock (not a fresh resolve of the
# pyproject.toml ranges: a different resolve changed every training stage's results). To bump
# versions on purpose: `make lock` (see the lock target), review the diff, `make clean setup`.
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
BIN := $(abspath $(VENV))/bin
# Stages run `python -m tasks.<stage>` through dvc: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Offline, the Prefect server's telemetry only fails (and logs an error each time).
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup lock pipeline repro test bench status clean

# pip at the locked version, then every locked package, then the project itself without resolving
# anything (--no-build-isolation: built with the locked setuptools, no unpinned build deps).
# Last, the venv must be exactly the lock: pip installs an unlocked package silently when the lock
# misses one, and an in-place update keeps packages a new lock dropped (then: make clean setup).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -i '^pip==' $(LOCK) || echo pip)"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@grep -v -e '^#' -e '^$$' $(LOCK) | LC_ALL=C sort > $(VENV)/.lock-pins
	@$(BIN)/python -m pip freeze --all --exclude-editable | LC_ALL=C sort | diff -u $(VENV)/.lock-pins - \
	  || { echo "$(VENV) differs from $(LOCK) (diff above: - locked, + installed); run: make clean setup" >&2; exit 1; }
	touch $@

setup: $(VENV)/.installed

# `make lock` regenerates $(LOCK) from a fresh resolve of pyproject.toml ('.[test]', newest versions
# the ranges allow today) in a throwaway venv, pinning every package (transitive ones, pip and
# setuptools included) with `pip freeze --all --exclude-editable`. Only for deliberate bumps: review
# the diff (torch must stay 2.13.0+cpu), `make clean setup`, rerun tests and pipeline, commit.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp" $(LOCK).tmp' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[test]'; \
	{ printf '%s\n' \
	  '# requirements.lock: the exact environment `make setup` installs (every package, transitive ones,' \
	  '# pip and setuptools included; the project itself is installed afterwards with --no-deps).' \
	  '# pyproject.toml keeps the version ranges (the library contract); this file pins the set verified' \
	  '# here, so a fresh clone trains bit-for-bit like the machine that made it.' \
	  '#' \
	  "# Made by \`make lock\`: pip install -e '.[test]' in a fresh venv, then" \
	  '# `pip freeze --all --exclude-editable`. torch is the local CPU wheel from the find-links dir' \
	  '# /opt/wheels (torch==2.13.0+cpu); never let it resolve to the CUDA build.'; \
	  "$$tmp/venv/bin/python" -c 'import datetime, platform; print(f"# Resolved {datetime.date.today()}, CPython {platform.python_version()}, {platform.system().lower()} {platform.machine()}.")'; \
	  printf '%s\n' \
	  '#' \
	  '# Do not edit by hand. To bump versions deliberately: `make lock` (fresh resolve of pyproject.toml' \
	  '# in a scratch venv, rewrites this file), review the diff, then `make clean setup` and rerun the' \
	  '# pipeline/tests before committing the new lock.'; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable; } > $(LOCK).tmp; \
	mv $(LOCK).tmp $(LOCK); echo "wrote $(LOCK): $$(grep -c '^[^#]' $(LOCK)) pins"

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
