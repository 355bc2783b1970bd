# Two entry points of the set-up contract: `make demo` and `make test`.
# Both create .venv from requirements.txt when it is missing (or older than requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	$(PY) -m cromss_jax.demo --out $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(DEMO_DIR)
