# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv if missing, then trains the default experiment
#   make test   creates .venv if missing, then runs the default test suite
# `make` (or `make help`) lists every target: the text after `##` on its line.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := mtneuro_lab tests benchmarks train.py evaluate.py .ci
export PYTHONHASHSEED := 0
.DEFAULT_GOAL := help

.PHONY: help env run test test-slow test-all bench lint format check-size clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)  ## create .venv (editable install with the dev tools) if missing

# The first run: ROI-C1 supervised on the embedded phantom, sized for a laptop CPU (see README).
run: $(STAMP)  ## train + test the default experiment (experiment=quickstart, phantom data)
	$(PY) train.py experiment=quickstart $(ARGS)

# lint first (ruff, then mypy: slower on a fresh clone, before .mypy_cache exists); two xdist workers (CLI runs are in-process, tests/conftest.py run_inproc)
test: $(STAMP) lint  ## lint, then the default test suite on 2 workers (ARGS=... for pytest)
	$(PY) -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP)  ## only the tests marked slow (full training runs, big sweeps)
	$(PY) -m pytest -q -n 2 -m slow $(ARGS)

test-all: $(STAMP)  ## every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

bench: $(STAMP)  ## every benchmark; figures go into docs/ (see docs/benchmarks.md)
	$(PY) -m benchmarks.run_all $(ARGS)

lint: $(STAMP)  ## ruff check + ruff format --check + mypy (what the pre-commit hooks run)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

format: $(STAMP)  ## ruff format, then ruff check --fix (safe fixes only)
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

check-size:  ## refuse tracked or staged files over 500 KB (run products and data stay out of git)
	@{ git ls-files; git diff --cached --name-only --diff-filter=AM; } | sort -u | tr '\n' '\0' | xargs -0 $(PYTHON) .ci/check_large_files.py --max-kb 500

clean:  ## delete outputs/, the phantom cache .cache/, .pytest_cache/ and .mypy_cache/
	rm -rf outputs .cache .pytest_cache .mypy_cache
