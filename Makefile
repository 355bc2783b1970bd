# Entry points of the set-up contract: `make demo` and `make test` (and `make test-fast`).
# Each creates .venv from requirements.txt (+ requirements-test.txt for the tests) when it is
# missing or older than those files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv venv-test clean bench-gpu

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
# one worker, see tests/pretrain_run.py). Work goes out in collection order, which
# tests/conftest.py starts with the longest tests.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: venv-test
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS) tests

# Everything but the tests marked slow (those that compile a real model, train, or run a chain
# of subprocesses: more than ~2 s each on 2 cores).
test-fast: venv-test
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

# The GPU figures of docs/PERFORMANCE.md ('Next: GPU'), as one script: run on a GPU host whose
# Python has jax with its CUDA plugin and this repository's other requirements
# (`make bench-gpu BENCH_PY=python3`). The pipeline runs generate and convert 64 locations first.
BENCH_PY ?= $(PY)
BENCH_STEP := $(BENCH_PY) -m cromss_jax.benchmark step --encoder resnet50 --batch 128 --size 256 \
	--tile 264 --dtype bf16
bench-gpu:
	$(BENCH_STEP) --fusion mid --steps 20
	$(BENCH_STEP) --fusion late --steps 20
	$(BENCH_STEP) --fusion mid --steps 30 --feed pipeline --locations 64
	$(BENCH_PY) -m cromss_jax.benchmark input --locations 64 --input_batch 128 --input_batches 10

clean:
	rm -rf $(DEMO_DIR)
