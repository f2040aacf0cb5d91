# llmkit: `make demo` sets up and runs the main job on the default model; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m llmkit pull smollm2-135m-instruct
	$(PY) -m llmkit serve

test: setup
	$(PY) -m llmkit pull smollm2-135m-instruct
	$(VENV)/bin/ruff check .
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-output
