#!/usr/bin/env bash
# The GPU suite, one command on a bare GPU machine: build the extension, run every test (the
# `cuda`-marked ones included), compute-sanitizer memcheck on small cases, then the benchmarks.
#   bash bench/gpu_suite.sh OUT_DIR        (e.g. "$OUT" on the device machine)
# Copy OUT_DIR to bench/results/<date>-<gpu>/ and commit it.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

# Wheels the image lacks (liger-kernel) may travel in bench/wheels/.
if ls bench/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index bench/wheels/*.whl >"$out/wheels.log" 2>&1 || status=1
fi

echo "== build" | tee "$out/summary.txt"
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "build failed" | tee -a "$out/summary.txt"; exit 1
fi
nvidia-smi >"$out/nvidia-smi.txt" 2>&1

echo "== tests" | tee -a "$out/summary.txt"
$PY -m pytest tests -q -p no:cacheprovider -rfEs --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1 \
  || status=1
tail -3 "$out/tests.log" | tee -a "$out/summary.txt"

echo "== compute-sanitizer memcheck" | tee -a "$out/summary.txt"
compute-sanitizer --tool memcheck --error-exitcode 3 $PY bench/memcheck_case.py \
  >"$out/memcheck.log" 2>&1 || status=1
tail -3 "$out/memcheck.log" | tee -a "$out/summary.txt"

echo "== benchmarks" | tee -a "$out/summary.txt"
$PY bench/gpu_bench.py --out "$out" >"$out/bench.log" 2>&1 || status=1
tail -5 "$out/bench.log" | tee -a "$out/summary.txt"
exit $status
