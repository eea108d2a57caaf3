# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv if missing, then trains the default experiment
#   make test   creates .venv if missing, then runs the default test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: env run test test-slow test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

# The default experiment on the embedded phantom (quickstart = CPU-sized epochs, see README).
run: $(STAMP)
	$(PY) train.py experiment=quickstart $(ARGS)

# lint (a second) first; two xdist workers: most tests are CLI subprocesses whose start-up is single-threaded
test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check mtneuro_lab tests benchmarks train.py evaluate.py
	$(PY) -m ruff format --check mtneuro_lab tests benchmarks train.py evaluate.py

clean:
	rm -rf outputs .cache .pytest_cache
