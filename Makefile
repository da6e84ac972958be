# Two commands, each doing all of its own set-up:
#   make conformance   the conformance suite (pytest -m xpu) on the best available device
#   make test          the project's own tests and the suite, without the long training tests
# Options: XPU=cuda:0 PYTEST_ARGS="--model-config tiny" PYTHON=python3.11
PYTHON ?= python3
XPU ?= auto
PYTEST_ARGS ?=
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: conformance test clean

conformance: $(STAMP)
	$(VPY) -m pytest -m xpu --xpu $(XPU) $(PYTEST_ARGS)

# The project's tests, then the tiny conformance run on cpu-alt (the CPU with other real kernels):
# a correct device that is not the baseline must pass, which the CPU compared with itself cannot show.
test: $(STAMP)
	$(VPY) -m pytest -m "not training" $(PYTEST_ARGS)
	$(VPY) -m pytest -m xpu --xpu cpu-alt --model-config tiny --report-dir=reports/cpu-alt $(PYTEST_ARGS)

# The venv sees the system's site-packages so that a vendor's own torch build is used; torch is
# installed only when missing, and an existing torch is pinned so pip never replaces it.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 9))' || { echo "error: Python 3.9 or newer is required ($(PYTHON))" >&2; exit 1; }
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(VPY) -c 'import torch' 2>/dev/null; then \
	    $(VPY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt; \
	    echo "using the installed $$(cat $(VENV)/constraints.txt)"; \
	else : > $(VENV)/constraints.txt; fi
	$(VPY) -m pip install --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis reports
