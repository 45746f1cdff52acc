#!/usr/bin/env bash
# Everything fercuda checks on a GPU machine, in one command that fits one device call (10 min):
# environment -> build (FORCE_CUDA=1, sm_90; data unpacked and Triton / torch.compile caches warmed
# beside it) -> GPU benchmarks (Canny, dwconv, FERNet training throughput) -> a short FER2013
# training run -> the GPU tests (pytest-xdist, a timeout per test) -> compute-sanitizer memcheck,
# racecheck, initcheck. Per-stage caps add up to 540 s; results are rewritten in $OUT as they come
# (summary.txt, benchmarks.json, tests.xml, logs.tar.gz). benchmarks/gpu_check.py holds the stages;
# BENCHMARKS.md ("GPU: how to run the check") the device call.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # here: the same stages, GPU work in CPU or skipped form
#
# PYTHON picks the interpreter (default: the GPU machine's /opt/torch/.venv, else ./.venv, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3
  elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
  else PY=$(command -v python3)
  fi
fi
export PYTHON=$PY PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
