# Entry points of the set-up contract: `make demo` and `make test` (and `make test-fast`).
# Each creates .venv from requirements.txt (+ requirements-test.txt for the tests) when it is
# missing or older than those files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv venv-test clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

demo: venv
	$(PY) -m cromss_jax.demo --out $(DEMO_DIR)

# The whole suite (about 10 minutes on 2 CPU cores).
test: venv-test
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Everything but the tests marked slow (real-model training runs, subprocess chains).
test-fast: venv-test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(DEMO_DIR)
