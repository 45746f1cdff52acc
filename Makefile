# Two entry points: `make compare` (kernel comparisons against OpenCV, kornia and PyTorch)
# and `make test` (the whole test suite). Each sets up .venv and builds fercuda first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: compare test build clean compat

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(VPY) -m pip install --no-build-isolation --no-deps -e .

compare: build
	$(VPY) -m fercuda.compare

test: build
	$(VPY) -m pytest tests

clean:
	rm -rf build fercuda/*.so *.egg-info

# `make compat`: the suite against the versions of the GPU machine (Python 3.12, torch 2.11.0,
# triton 3.6.0), in .venv-compat, on a git worktree of HEAD in build/compat/src, so the in-place
# build of .venv (fercuda/_C*.so, build/temp) is never touched. Only committed code is tested.
# COMPAT_USE_CUDA=0 skips the CUDA sources (a CUDA build takes long on few cores);
# PYTEST_ARGS adds pytest options, e.g. PYTEST_ARGS=-x.
# pyenv's shim refuses python3.12 where 3.12 is installed but not selected: take its binary.
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
COMPAT_TORCH ?= 2.11.0
COMPAT_TRITON ?= 3.6.0
COMPAT_USE_CUDA ?= 1
COMPAT_VENV := $(CURDIR)/.venv-compat
COMPAT_VPY := $(COMPAT_VENV)/bin/python
COMPAT_DEPS := $(COMPAT_VENV)/.deps-$(COMPAT_TORCH)-$(COMPAT_TRITON)
COMPAT_SRC := build/compat/src
FERCUDA_FER2013 ?= $(abspath $(CURDIR)/../shared/data/fer2013)

$(COMPAT_VPY):
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)

$(COMPAT_DEPS): requirements-dev.txt | $(COMPAT_VPY)
	mkdir -p build/compat
	grep -v '^torch==' requirements-dev.txt > build/compat/requirements.txt
	$(COMPAT_VPY) -m pip install torch==$(COMPAT_TORCH) triton==$(COMPAT_TRITON) -r build/compat/requirements.txt
	touch $@

compat: $(COMPAT_DEPS)
	git worktree prune
	if [ -e $(COMPAT_SRC)/.git ]; then git -C $(COMPAT_SRC) checkout -q -f --detach $$(git rev-parse HEAD); \
	else git worktree add -f --detach $(COMPAT_SRC) HEAD; fi
	git -C $(COMPAT_SRC) clean -fdq
	@echo "compat: commit $$(git -C $(COMPAT_SRC) rev-parse HEAD), $$($(COMPAT_VPY) -c 'import platform, torch, triton; print("Python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)')"
	cd $(COMPAT_SRC) && USE_CUDA=$(COMPAT_USE_CUDA) $(COMPAT_VPY) -m pip install --no-build-isolation --no-deps -e .
	cd $(COMPAT_SRC) && FERCUDA_FER2013=$(FERCUDA_FER2013) $(COMPAT_VPY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

# `make gpu-data`: FER2013 (../shared/data/fer2013, or FERCUDA_FER2013) packed into
# .fer2013/fer2013.tar.gz, git-ignored: the path a device call carries for the training run and
# the real-image Canny benchmark of benchmarks/gpu_check.sh (BENCHMARKS.md, "GPU: how to run").
.PHONY: gpu-data
gpu-data:
	$(PYTHON) benchmarks/pack_fer2013.py
