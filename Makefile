# Two commands for a newcomer on a fresh CPU machine:
#   make demo   — run every loss on an example batch with each available backend (the main job)
#   make test   — the test suite (what CI runs)
# Both create .venv if absent and install the pinned CPU dependencies (see ../shared/spec/ci.md).
# A GPU user installs against their own CUDA torch instead: see README.md, "Install".
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
# the CPU pins that work together (ci.md); torch 2.13.0+cpu comes from the local wheel
PINS    := torch==2.13.0 triton==3.6.0 numpy==2.3.5 pytest ninja pybind11 "setuptools>=64" wheel matplotlib
STAMP   := $(VENV)/.kdkernels-installed
export MAX_JOBS ?= 2

.PHONY: demo test install clean

$(VENV)/.deps:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(PINS)
	touch $@

$(STAMP): $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	KDKERNELS_REQUIRE_EXT=$${KDKERNELS_REQUIRE_EXT:-0} $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m benchmarks.run --suite quick

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) build *.egg-info kdkernels/*.so
