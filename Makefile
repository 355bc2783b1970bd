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

# The whole suite, in two processes (TEST_WORKERS=1 for one; the two shared-run modules stay on
# one worker, see tests/pretrain_run.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: venv-test
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS) tests

# Everything but the tests marked slow (real-model training runs, subprocess chains).
test-fast: venv-test
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(DEMO_DIR)
