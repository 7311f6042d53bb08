# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

.PHONY: all venv test lint demo bench browser wheel-test clean-venv

all: test

# the editable install maps the package's modules when it is made: a new or moved module needs a re-install
MODULES := $(VENV)/.modules-$(shell find vitx_fast -name '*.py' 2>/dev/null | sort | cksum | cut -d' ' -f1)

$(MODULES):
	@rm -f $(VENV)/.modules-* $(STAMP)
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml Makefile CMakeLists.txt $(MODULES)
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch/torchvision pinned: these releases install from the machine's local wheels (an unpinned torch pulls GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	# --no-build-isolation: the native module builds against this environment
	$(PY) -m pip install -q --no-build-isolation -e ".[test,data,serve,ray]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# the web page's test drives Debian's chromium with Playwright (no browser download); installed here when apt can,
# otherwise that one test skips and says why
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed and could not be: the browser test will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check vitx_fast tests benchmarks

# the wheel as a user installs it: built, installed without extras into a fresh venv, `vitx` run outside the tree
wheel-test: $(STAMP)
	PY=$(abspath $(PY)) bash tests/wheel/check_wheel.sh

demo: $(STAMP)
	$(VENV)/bin/vitx demo --out gallery

bench: $(STAMP)
	$(PY) benchmarks/bench_explainers.py

clean-venv:
	rm -rf $(VENV)
