# Everything a fresh machine needs: `make demo` runs the pipeline on phantom data, `make test` the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: install test test-fast lint demo clean

# torch==2.13.0 first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  # everything but the DeepSpeed launches and SAM training (tests marked slow)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh

clean:
	rm -rf work/demo
