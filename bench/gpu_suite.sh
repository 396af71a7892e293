#!/usr/bin/env bash
# The GPU suite on a bare GPU machine: build the extension, run every test (the `cuda`-marked ones
# included), compute-sanitizer memcheck on small cases (racecheck and synccheck on the CUDA fast
# path and the calibration kernels), then the benchmarks.
#   bash bench/gpu_suite.sh OUT_DIR [STAGE ...]
# STAGE: build tests memcheck bench (the default: all four), sweep (bench/calibration_sweep.py on
# both backends, to calibration_sweep.txt), linear (bench/linear_focal_loss.py at
# 8192 tokens, H = 4096, V = 128256, bf16, gamma = 0 against eager, torch.compile and Liger's fused
# linear cross entropy, to linear_focal_loss.txt) and profile (Nsight Compute sections of the
# kernels in bench/profile_case.py, one shape per class of row length, to logs/ncu.txt and a
# digest in summary.txt). The bench stage times every step as called and replayed from a CUDA
# graph (BENCH_ARGS=--no-graph halves it).
# Each stage has a time limit (seconds: BUILD_S, TESTS_S, MEMCHECK_S, BENCH_S, SWEEP_S, LINEAR_S,
# PROFILE_S), cut to what is left of TOTAL_S (default 560) for the whole call, so that one call
# ends inside the device tool's 10 minutes with its results written; a stage with under 30 s left
# is skipped.
# The whole test suite no longer fits one call beside the build: TEST_ARGS picks what the tests
# stage runs (pytest arguments, default "tests"), e.g. the GPU files in one call and the rest in
# another; BENCH_ARGS (bench/gpu_bench.py --help) and PROFILE_ARGS (bf16, fp32, 65536x100, ...)
# split the benchmark and the profile the same way. A call on a machine without the extension
# built (a fresh one: the build is git-ignored and does not travel) builds it first.
# CALIBKERNELS_CUDA_ARCHS defaults to this GPU's own architecture (one target: a faster build).
# Logs go to OUT_DIR/logs.tar.gz (the device tool returns at most 8 files); summary.txt and the
# benchmark tables stay beside it.
# Copy OUT_DIR to bench/results/<date>-<gpu>/ and commit it; `python bench/auto_backend.py` on it
# gives backend="auto"'s thresholds (tests/test_auto_backend.py holds them to the newest run).
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/gpu_suite.sh OUT_DIR [build tests memcheck bench]}")
shift
stages=${*:-build tests memcheck bench}
mkdir -p "$out/logs"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
if [[ -z "${CALIBKERNELS_CUDA_ARCHS:-}" ]]; then
  CALIBKERNELS_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" \
    2>/dev/null || echo 90)
  export CALIBKERNELS_CUDA_ARCHS
fi
# the extension is git-ignored: a fresh machine has none, so any stage but build needs one first
if [[ " $stages " != *" build "* ]] && ! compgen -G "calibkernels/_C*.so" >/dev/null; then
  stages="build $stages"
fi
status=0
deadline=$(( $(date +%s) + ${TOTAL_S:-560} - 15 ))  # 15 s kept for the tar at the end
has() { [[ " $stages " == *" $1 "* ]]; }
stage() { echo "== $1 ($(date +%T))" | tee -a "$out/summary.txt"; }
# limit SECONDS: the stage's limit, cut to the time left before the deadline
limit() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? left : $1 )); }
# room STAGE: true if the stage has 30 s or more, else it is skipped (noted in the summary)
room() {
  (( $(limit 30) >= 30 )) && return 0
  echo "== $1 skipped: no time left in TOTAL_S" | tee -a "$out/summary.txt"; status=1; return 1
}

# Wheels the image lacks (liger-kernel, expecttest) may travel in .whl/ (git-ignored, carried).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    >"$out/logs/wheels.log" 2>&1 || status=1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if has build && room build; then
  stage build
  nvidia-smi >"$out/logs/nvidia-smi.txt" 2>&1
  if ! timeout -k 15 "$(limit "${BUILD_S:-300}")" $PY -m pip install --no-build-isolation --no-deps -e . \
      >"$out/logs/build.log" 2>&1; then
    tail -40 "$out/logs/build.log"; echo "build failed" | tee -a "$out/summary.txt"; status=1
    stages=""
  fi
fi

if has tests && room tests; then
  stage tests
  # -v: each result is logged as it comes, so a stage cut short still names its failures
  # ${TEST_ARGS} unquoted: pytest arguments, word by word; 2 threads a worker (16 cores shared)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 15 "$(limit "${TESTS_S:-420}")" \
    $PY -m pytest ${TEST_ARGS:-tests} -v -p no:cacheprovider -rfEs \
    -n "${TEST_WORKERS:-14}" --durations=10 --junitxml="$out/logs/tests.xml" \
    >"$out/logs/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$out/logs/tests.log" | sort -u | head -40 \
    | tee -a "$out/summary.txt"
  tail -1 "$out/logs/tests.log" | tee -a "$out/summary.txt"
fi

if has memcheck && room memcheck; then
  stage memcheck
  # no caching allocator: every tensor its own cudaMalloc, so a read past its end is reported
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 15 "$(limit "${MEMCHECK_S:-180}")" \
    compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY bench/memcheck_case.py >"$out/logs/memcheck.log" 2>&1 || status=1
  tail -3 "$out/logs/memcheck.log" | tee -a "$out/summary.txt"
  for tool in racecheck synccheck; do  # the fast path's cluster reductions, the tickets
    room $tool || break
    timeout -k 15 "$(limit "${MEMCHECK_S:-180}")" compute-sanitizer --tool $tool --error-exitcode 3 \
      $PY bench/memcheck_case.py sparse >"$out/logs/$tool.log" 2>&1 || status=1
    echo "$tool: $(tail -1 "$out/logs/$tool.log")" | tee -a "$out/summary.txt"
  done
fi

if has bench && room bench; then
  stage bench
  timeout -k 15 "$(limit "${BENCH_S:-420}")" $PY bench/gpu_bench.py --out "$out" ${BENCH_ARGS:-} \
    >"$out/logs/bench.log" 2>&1 || status=1
  tail -5 "$out/logs/bench.log" | tee -a "$out/summary.txt"
fi

if has sweep && room sweep; then
  stage sweep
  for backend in cuda triton; do  # 100 temperatures from one read against the paper's 100 passes
    timeout -k 15 "$(limit "${SWEEP_S:-120}")" $PY bench/calibration_sweep.py --device cuda --rounds 5 \
      --backend $backend >>"$out/calibration_sweep.txt" 2>&1 || status=1
  done
  tee -a "$out/summary.txt" <"$out/calibration_sweep.txt"
fi

if has linear && room linear; then
  stage linear
  timeout -k 15 "$(limit "${LINEAR_S:-300}")" $PY bench/linear_focal_loss.py --device cuda --dtype bfloat16 \
    --gamma 0 --n 8192 --h 4096 --v 128256 --rounds 10 \
    --paths eager,compile,linear_focal_loss,liger >"$out/linear_focal_loss.txt" 2>&1 || status=1
  tee -a "$out/summary.txt" <"$out/linear_focal_loss.txt"
fi

if has profile && room profile; then
  stage profile
  # --clock-control none: measure the card as found (never change its clocks).
  # The warm-up launches at N = 64 are profiled too (cheap); the digest lists every launch.
  timeout -k 15 "$(limit "${PROFILE_S:-400}")" ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section InstructionStats --kernel-name regex:'focal_loss|calibration' --launch-count 400 \
    $PY bench/profile_case.py ${PROFILE_ARGS:-} >"$out/logs/ncu.txt" 2>&1 || status=1
  grep -E "^profile |^  [A-Za-z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread|Executed Instructions  |Warp Cycles Per Issued" \
    "$out/logs/ncu.txt" | cut -c1-140 >>"$out/summary.txt"
fi

echo "== done ($(date +%T)), status $status" | tee -a "$out/summary.txt"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
exit $status
