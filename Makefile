# Two entry points: `make compare` (kernel comparisons against OpenCV, kornia and PyTorch)
# and `make test` (the whole test suite). Each sets up .venv and builds fercuda first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: compare test build clean

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

# `make gpu-data`: FER2013 (../shared/data/fer2013, or FERCUDA_FER2013) packed into
# .fer2013/fer2013.tar.gz, git-ignored: the path a device call carries for the training run and
# the real-image Canny benchmark of benchmarks/gpu_check.sh (BENCHMARKS.md, "GPU: how to run").
.PHONY: gpu-data
gpu-data:
	$(PYTHON) benchmarks/pack_fer2013.py
