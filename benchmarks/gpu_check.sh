#!/usr/bin/env bash
# Everything fercuda checks on a GPU machine, in one run of at most ~8 minutes:
#   build (FORCE_CUDA=1, in place) -> whole test suite on CUDA -> compute-sanitizer memcheck and
#   racecheck on a small Canny subset -> every benchmarks/bench_*_gpu.py (pytest-benchmark) ->
#   FERNet training throughput (fused vs plain) and, where FER2013 travels along, a short training run.
# Results (logs, JUnit XML, benchmark JSON) go to $OUT if set, else ./gpu_results; a short
# table comes last. A failing stage is reported and the next one still runs; the exit status is
# non-zero if any stage failed.
#
# Benchmark modules: each bench_*_gpu.py is a pytest-benchmark module; the table prints the
# `table` string of each benchmark's extra_info (or its median host time if it has none).
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python3, else python3), GPU_CHECK_BUDGET_S
# (total seconds, default 470), TORCH_CUDA_ARCH_LIST (default 9.0). Kornia is installed from
# wheels in .whl/ when present (the GPU machine has no network).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
RESULTS=${OUT:-$ROOT/gpu_results}
mkdir -p "$RESULTS"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

STAGES=()
FAILED=0

# stage NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, time left), logs to
# $RESULTS/NAME.log, records ok / FAILED / TIMEOUT / SKIPPED.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    STAGES+=("$name: SKIPPED (time budget spent)")
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 15 "$RESULTS/$name.log"
  if [ $rc -eq 0 ]; then
    STAGES+=("$name: ok (${dt}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    STAGES+=("$name: TIMEOUT after ${dt}s (log: $RESULTS/$name.log)")
    FAILED=1
  else
    STAGES+=("$name: FAILED rc=$rc (${dt}s, log: $RESULTS/$name.log)")
    FAILED=1
  fi
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" - <<'EOF'
import json, platform, torch, triton
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import cv2; info["cv2"] = cv2.__version__
except ImportError:
    pass
try:
    import kornia; info["kornia"] = kornia.__version__
except ImportError:
    info["kornia"] = None
print(json.dumps(info))
EOF
}

# Kornia from carried wheels, into a private folder (not the machine's environment).
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$RESULTS/kornia_install.log" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    STAGES+=("kornia wheels: installed")
  else
    STAGES+=("kornia wheels: install FAILED (log: $RESULTS/kornia_install.log)")
  fi
else
  STAGES+=("kornia wheels: none in .whl/ (kornia comparisons skipped unless installed)")
fi

export PY
stage environment 30 bash -c "$(declare -f environment); environment"
cp "$RESULTS/environment.log" "$RESULTS/environment.txt" 2>/dev/null || true

stage build 200 env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace

stage tests 150 "$PY" -m pytest tests -q -rfE -p no:cacheprovider --junitxml="$RESULTS/tests.xml"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SUBSET=(tests/test_canny_cuda.py -q -p no:cacheprovider -k test_small_cases_for_sanitizers)
stage memcheck 75 "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -m pytest "${SUBSET[@]}"
stage racecheck 75 "$SANITIZER" --tool racecheck --error-exitcode 99 "$PY" -m pytest "${SUBSET[@]}"

for bench in benchmarks/bench_*_gpu.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  stage "$name" 120 "$PY" -m pytest "$bench" -q -p no:cacheprovider --benchmark-json="$RESULTS/$name.json"
done

# Training throughput of the fused FERNet against the plain-PyTorch one (random batches).
stage fernet_throughput 60 env FERCUDA_BENCH_DEVICE=cuda FERCUDA_BENCH_ROUNDS=20 "$PY" -m pytest \
  benchmarks/bench_fernet_train.py -q -s -p no:cacheprovider --benchmark-json="$RESULTS/bench_fernet_train.json"

# A short real training run where the FER2013 images travel with the tree (the folder layout
# under FERCUDA_FER2013, default .fer2013/ in the repository, which git ignores).
FER=${FERCUDA_FER2013:-$ROOT/.fer2013}
if [ -d "$FER/train" ]; then
  stage fernet_train 150 "$PY" -m fercuda.cli train --data "$FER" --time-limit 2 --device cuda \
    --out "$RESULTS/fernet_run" --no-progress
else
  STAGES+=("fernet_train: SKIPPED (no FER2013 folder at $FER)")
fi

echo
echo "=== summary ($(($(date +%s) - START))s, results in $RESULTS)"
"$PY" - "$RESULTS" <<'EOF' || echo "(no benchmark table)"
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("bench_*.json")):
    for b in json.loads(path.read_text()).get("benchmarks", []):
        line = b.get("extra_info", {}).get("table")
        if line is None:
            line = f"median host time {b['stats']['median'] * 1e3:.3f} ms"
        print(f"{b['name']}: {line}")
EOF
for s in "${STAGES[@]}"; do echo "  $s"; done
exit $FAILED
