# The two commands a newcomer needs: `make demo` (main job) and `make test` (test suite).
# Each creates .venv on first use and installs what it needs (torch pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

$(VENV)/.installed: setup.py pyproject.toml constraints.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 setuptools wheel ninja numpy
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pjd demo --out out/demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --out bench_out

.PHONY: install demo test bench
