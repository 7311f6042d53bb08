# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

.PHONY: all venv test demo bench clean-venv

all: test

$(STAMP): pyproject.toml Makefile CMakeLists.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch/torchvision pinned: these releases install from the machine's local wheels (an unpinned torch pulls GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	# --no-build-isolation: the native module builds against this environment
	$(PY) -m pip install -q --no-build-isolation -e ".[test,data]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/vitx demo --out gallery

bench: $(STAMP)
	$(PY) benchmarks/bench_explainers.py

clean-venv:
	rm -rf $(VENV)
