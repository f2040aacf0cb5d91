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
	@# headless Chromium for the web-chat browser test (Debian package; installed only as root when missing)
	@if [ "$$(id -u)" = 0 ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || echo "chromium not installed: browser test will skip"; fi
	touch $@

demo: setup
	$(PY) -m llmkit pull smollm2-135m-instruct
	$(PY) -m llmkit serve

test: setup
	$(PY) -m llmkit pull smollm2-135m-instruct
	$(PY) -m llmkit pull gemma-3-270m --quiet
	$(VENV)/bin/ruff check .
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-output
