#!/usr/bin/env bash
# The project's GPU check, for a machine with a CUDA GPU, torch installed and
# no internet:  bash bench/gpu_check.sh OUTDIR   (or: make gpu-check OUT=OUTDIR)
# Builds the extension in place, prints build_info(), runs the CUDA tests (and
# the rest of the suite), compute-sanitizer memcheck over a small CUDA test
# run, and the GPU benchmarks. Logs and the results JSON go to OUTDIR.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "build"
# Build with the system C++ compiler when there is one: a toolchain of its own
# (e.g. /opt/gcc) may link parts of a different libstdc++ into the extension,
# which then crashes against the libstdc++ that torch loads. DSK_CXX overrides.
if [ -n "${DSK_CXX:-}" ]; then export CXX=$DSK_CXX
elif [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
echo "CXX=${CXX:-c++} ($(${CXX:-c++} --version | head -1))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if ! DSK_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import json, deepseek_kernels as d; print(json.dumps(d.build_info(), indent=1))" | tee "$OUT/build_info.json"

step "tests (CUDA and CPU)"
$PY -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "compute-sanitizer memcheck (small CUDA test run)"
if command -v compute-sanitizer >/dev/null; then
  timeout ${SANITIZER_TIMEOUT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    $PY -m pytest tests/test_quant.py -q -p no:cacheprovider -m cuda \
      -k "matches_reference and not 1024 or nonfinite or bad_inputs or agree" >"$OUT/sanitizer.log" 2>&1
  rc=$?
  timeout ${SANITIZER_TIMEOUT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    $PY -m pytest tests/test_moe.py -q -p no:cacheprovider -m cuda \
      -k "matches_reference or shapes or nonfinite or empty or agree" >"$OUT/sanitizer-moe.log" 2>&1
  rc_moe=$?
  tail -3 "$OUT/sanitizer-moe.log"
  [ $rc_moe = 0 ] || { echo "SANITIZER (moe) FAILED (rc $rc_moe)"; status=1; }
  timeout ${SANITIZER_TIMEOUT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    $PY -m pytest tests/test_gemm.py -q -p no:cacheprovider -m cuda \
      -k "not 1000 and not 1032" >"$OUT/sanitizer-gemm.log" 2>&1
  rc_gemm=$?
  tail -3 "$OUT/sanitizer-gemm.log"
  [ $rc_gemm = 0 ] || { echo "SANITIZER (gemm) FAILED (rc $rc_gemm)"; status=1; }
  tail -5 "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | sort | uniq -c
  [ $rc = 0 ] || { echo "SANITIZER FAILED (rc $rc)"; status=1; }
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
fi

step "benchmarks"
[ "${SKIP_BENCH:-0}" = 1 ] && { echo "skipped (SKIP_BENCH=1)"; exit $status; }
$PY bench/bench_quant.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1
$PY bench/bench_moe.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-moe.log" | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || status=1
$PY bench/bench_gemm.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-gemm.log" | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "done: status $status"
exit $status
