# Two commands, each doing all of its own set-up:
#   make conformance   the conformance suite (pytest -m xpu) on the best available device
#   make test          the project's own tests and the suite, without the long training tests
#   make test-oldest   the oldest supported stack (Python 3.8, torch 1.12.1) in .venv-oldest
#   make lint          ruff (pyproject.toml's [tool.ruff]: line length 120, errors, unused names, import order)
# Options: XPU=cuda:0 PYTEST_ARGS="--model-config tiny" PYTHON=python3.11
PYTHON ?= python3
XPU ?= auto
PYTEST_ARGS ?=
VENV ?= .venv
VPY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
# Requirements installed before the project where the venv sees no torch (default: the newest release).
TORCH ?=
OLDEST_TORCH := torch==1.12.1 torchvision==0.13.1 numpy<2
# Lines of a .pth file that add every site folder PYTHON sees (a virtualenv's, a conda env's, the user's)
# to the venv after its own, with the .pth files found there (a vendor plugin installed in develop mode).
SITE_PTH := import sys; [print("import site; site.addsitedir(" + repr(p) + ")") for p in sys.path \
	if p.rstrip("/").endswith(("site-packages", "dist-packages"))]

# A .pth line, read after the editable install's own (``_`` sorts before ``d``), that puts the suite's finder
# first: its packages (fixtures, markers, ...) then win over PyPI packages of the same names in site-packages.
FIRST_PTH := import sys; [sys.meta_path.insert(0, sys.meta_path.pop(sys.meta_path.index(f))) for f in \
	[f for f in sys.meta_path if getattr(f, "__module__", "").startswith("__editable___detr_conformance")]]

.PHONY: conformance test test-oldest _oldest lint clean

lint: $(STAMP)
	$(VPY) -m ruff check .

conformance: $(STAMP)
	$(VPY) -m pytest -m xpu --xpu $(XPU) $(PYTEST_ARGS)

# The project's tests, then the tiny conformance runs on cpu-alt (the CPU with other real kernels) and
# cpu-splitk (its reductions in split-K and blocked orders), then the CPU's eager run beside Inductor's compiled one:
# a correct device that is not the baseline must pass, which the CPU compared with itself cannot show.
test: $(STAMP)
	$(VPY) -m pytest -m "not training" $(PYTEST_ARGS)
	$(VPY) -m pytest -m xpu --xpu cpu-alt --model-config tiny --report-dir=reports/cpu-alt $(PYTEST_ARGS)
	$(VPY) -m pytest -m xpu --xpu cpu-splitk --model-config tiny --report-dir=reports/cpu-splitk $(PYTEST_ARGS)
	$(VPY) -m pytest -m xpu --xpu cpu --compile inductor --model-config tiny --benchmark-skip \
	    --expectations examples/inductor_cpu_expectations.txt --report-dir=reports/compiled $(PYTEST_ARGS)

# The oldest supported pair, as a vendor's Kunlunxin R300 stack has it: the compat tests and the tiny
# conformance run on cpu-alt. Python 3.8 is python3.8 on PATH where it runs (a pyenv shim may not),
# else the newest of pyenv's 3.8 builds.
test-oldest:
	@py=; for c in python3.8 $$(ls -d $$HOME/.pyenv/versions/3.8*/bin/python 2>/dev/null | sort -rV); do \
	    if "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; then py="$$c"; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	    echo "error: test-oldest needs Python 3.8: python3.8 on PATH, or pyenv install 3.8" >&2; exit 1; fi; \
	$(MAKE) --no-print-directory _oldest VENV=.venv-oldest PYTHON="$$py" TORCH='$(OLDEST_TORCH)'

_oldest: $(STAMP)
	$(VPY) -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)'
	$(VPY) -m pytest tests/test_compat.py -q -p no:cacheprovider $(PYTEST_ARGS)
	$(VPY) -m pytest -m xpu --xpu cpu-alt --model-config tiny --report-dir=reports/oldest $(PYTEST_ARGS)

# The venv sees the site-packages of PYTHON, whether system, virtualenv or conda, so that a vendor's own
# torch build is used: torch is installed only when missing, and an existing torch and torchvision are
# pinned so pip never replaces them. A venv made by another Python is made again. The project is built
# in the venv (no build isolation): an isolated build would still see an old setuptools through the
# .pth file, and PEP 660's editable install needs setuptools 64.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 8))' || { echo "error: Python 3.8 or newer is required ($(PYTHON))" >&2; exit 1; }
	@want="$$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
	if [ -d $(VENV) ] && [ "$$(cat $(VENV)/.python 2>/dev/null)" != "$$want" ]; then \
	    echo "$(VENV) was not made by $$want: making it again"; rm -rf $(VENV); fi; \
	test -x $(VPY) || { $(PYTHON) -m venv --system-site-packages $(VENV) && echo "$$want" > $(VENV)/.python; }
	$(PYTHON) -c '$(SITE_PTH)' > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/vendor-site.pth"
	printf '%s\n' '$(FIRST_PTH)' > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/detr-conformance-first.pth"
	@if [ -n "$(TORCH)" ] && ! $(VPY) -c 'import torch' 2>/dev/null; then \
	    echo $(VPY) -m pip install --disable-pip-version-check $(foreach r,$(TORCH),'$(r)'); \
	    $(VPY) -m pip install --disable-pip-version-check $(foreach r,$(TORCH),'$(r)'); fi
	@if $(VPY) -c 'import torch' 2>/dev/null; then \
	    $(VPY) -c 'import importlib.util; \
	    [print(m + "==" + importlib.import_module(m).__version__.split("+")[0]) for m in ("torch", "torchvision") \
	     if importlib.util.find_spec(m)]' > $(VENV)/constraints.txt; \
	    echo "using the installed $$(tr '\n' ' ' < $(VENV)/constraints.txt)"; \
	else : > $(VENV)/constraints.txt; fi
	$(VPY) -m pip install --disable-pip-version-check -c $(VENV)/constraints.txt 'setuptools>=64' wheel
	$(VPY) -m pip install --disable-pip-version-check -c $(VENV)/constraints.txt --no-build-isolation -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .venv-oldest .pytest_cache .hypothesis reports
