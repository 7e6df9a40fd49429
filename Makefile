# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= /tmp/xlm_demo
# Empty DATA = the toy corpus the demo generates; DATA=../shared/data/multi30k = real text.
DATA ?=
ARGS ?=
# Test processes: compiling is mostly single-threaded, so two overlap well even on 2 cores. Whole
# files go to one process (module fixtures are built once), the longest files first
# (tests/conftest.py: SLOWEST_FIRST; --no-loadscope-reorder keeps that order). TEST_WORKERS=0
# runs in this process.
TEST_WORKERS ?= 2
# The demo and the tests run on the CPU (the test extras bring libtpu, to *compile* for TPU slices
# in tests/test_aot.py; JAX would otherwise try to open a TPU). `make demo JAX_PLATFORMS=` lets
# JAX pick an accelerator.
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

.PHONY: demo test lint clean-venv

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m xlm_jax.main --config=configs/demo.py --workdir=$(WORKDIR) \
		$(if $(DATA),--config.data.root=$(DATA)) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check xlm_jax configs tests launch
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
