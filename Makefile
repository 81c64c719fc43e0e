# Commands for a newcomer (README.md, "Quick start"):
#   make demo       — run every loss on an example batch with each available backend (the main job)
#   make test       — the whole test suite (what CI runs; about 15 min on an idle 2-core machine)
#   make test-fast  — without the tests marked `slow` (tests/conftest.py): 2 min of CPU time, run it
#                     before pushing
# They create $(VENV) when it is absent, install the dependencies into it and the package in editable
# mode (building the C++ extension kdkernels._C).
#
# torch: an environment that already has torch keeps it (never reinstalled or replaced). Otherwise
# $(TORCH_SPEC) is installed, from PyPI plus $(TORCH_INDEX_URL) when set. Examples:
#   make test                                             # CI: .venv with the pinned versions below
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   # CPU-only torch wheel (no CUDA libraries)
#   make test PY=/opt/conda/bin/python                    # reuse that Python's torch (venv sees its packages)
#   make test VENV=$$CONDA_PREFIX                         # install into an existing environment
PY              ?= python3
VENV            ?= .venv
VPY             := $(VENV)/bin/python
TORCH_SPEC      ?= torch==2.13.0
# an extra package index for the torch wheel, e.g. PyTorch's CPU wheel index https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# the other pins that work together on CPU machines (docs/install.md)
PINS            := triton==3.6.0 numpy==2.3.5 pytest ninja pybind11 "setuptools>=64" wheel matplotlib
# with a torch that is kept: the same packages unpinned (pip leaves installed ones as they are)
DEPS            := "triton>=3.6" numpy pytest ninja pybind11 "setuptools>=64" wheel matplotlib
STAMP           := $(VENV)/.kdkernels-installed
PYTEST          := TRITON_INTERPRET=1 $(VPY) -m pytest -q -ra
export MAX_JOBS ?= 2

# a new venv sees the packages of a Python the user points at with PY=... when that Python has torch
SYSTEM_SITE = $(if $(filter command line environment,$(origin PY)),$(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo --system-site-packages))
TORCH_INDEX = $(if $(strip $(TORCH_INDEX_URL)),--extra-index-url $(TORCH_INDEX_URL))

.PHONY: demo test test-fast install clean

$(VENV)/.deps:
	@if [ ! -x $(VPY) ]; then \
	    echo "kdkernels: creating $(VENV) from $(PY) $(SYSTEM_SITE)"; \
	    $(PY) -m venv $(SYSTEM_SITE) $(VENV) && $(VPY) -m pip install -q --upgrade pip || exit 1; \
	fi
	@if $(VPY) -c "import torch" >/dev/null 2>&1; then \
	    echo "kdkernels: keeping the torch already installed: $$($(VPY) -c 'import torch; print(torch.__version__, "at", torch.__file__)')"; \
	    echo 'kdkernels: installing only what is missing: $(DEPS)'; \
	    $(VPY) -m pip install -q $(DEPS); \
	else \
	    echo 'kdkernels: installing $(TORCH_SPEC) $(TORCH_INDEX) and $(PINS)'; \
	    $(VPY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX) && $(VPY) -m pip install -q $(PINS); \
	fi
	touch $@

$(STAMP): $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	KDKERNELS_REQUIRE_EXT=$${KDKERNELS_REQUIRE_EXT:-0} $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m benchmarks.run --suite quick

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# removes the environment only when it is the default .venv (never an environment given with VENV=...)
clean:
	rm -rf $(if $(filter file,$(origin VENV)),$(VENV),$(VENV)/.deps $(STAMP)) build *.egg-info kdkernels/*.so
