#!/usr/bin/env bash
# The project's GPU check, for a machine with a CUDA GPU, torch installed and
# no internet:  bash bench/gpu_check.sh OUTDIR   (or: make gpu-check OUT=OUTDIR)
# Builds the extension in place, prints build_info(), runs the CUDA tests by family
# (each family in its own process), the rest of the suite, the past-2^31 tests,
# compute-sanitizer memcheck over small CUDA test runs, the GPU benchmarks and the
# model demo on the GPU. Logs and the results JSON go to OUTDIR.
# Knobs: SKIP_BUILD=1 (reuse the extension the previous call built), SKIP_SMOKE=1,
# SMOKE_FAMILIES, SMOKE_JOBS (default 4), SMOKE_TIMEOUT (s, per family), SKIP_TESTS=1,
# TESTS=paths, TEST_MARK (default "not cuda" after the family runs), PYTEST_ARGS,
# PYTEST_K (a -k expression), SKIP_LARGE=1, SKIP_SANITIZER=1, SANITIZE_FAMILIES="quant
# moe moe-v1 gemm gemm-v2 gemm-v3 gemm-ws fp8-v2 fp8-tma fp8-ws int8-v1 attention attention-v2
# attention-v3 attention-bwd-v2 attention-bwd-v3" (the -vN runs: that generation forced), SKIP_BENCH=1,
# BENCH (default "core ws variants"), QUANT_BENCH_ARGS=--ab (v1/v2 A/B only),
# MOE_BENCH_ARGS (default --profile),
# SKIP_DEMO=1, PROFILE=1 (ncu, PROFILE_TARGETS); DSK_DIGITS_CSV=digits.csv.gz where
# scikit-learn is missing.
#
# One call does not fit a 10-minute device command. Calls that do (each its own OUT;
# session 6 on an H100: 1. took 2.2 min without the demo, 2. ran out at 9.4 min with two
# memcheck families left, 3. took 8 min with the demo; since then more families and
# benchmark runs were added, hence the splits of 2 and 3):
#   1. build + the CUDA tests split into families, each in its own process (a kernel
#      that faults poisons its process's CUDA context, one that hangs stalls it), SMOKE_JOBS
#      at a time, so one broken kernel cannot hide the others' results, + the demo:
#      TORCH_CUDA_ARCH_LIST=9.0a SMOKE_JOBS=5 SMOKE_TIMEOUT=120 SKIP_TESTS=1 SKIP_LARGE=1
#      SKIP_SANITIZER=1 SKIP_BENCH=1 bash bench/gpu_check.sh OUT (session 6's families took
#      8-41 s each; a family of a new kernel that deadlocks, e.g. on an mbarrier of the
#      warp-specialized pipelines, then costs 2 minutes, not 7)
#   2a. SKIP_BUILD=1 SKIP_SMOKE=1 SKIP_TESTS=1 SKIP_BENCH=1 SKIP_DEMO=1
#      SANITIZE_FAMILIES="ws-warp-arrivals ws-cluster-warp-arrivals attention-bwd-dq-bulk" (past 2^31 and memcheck of the
#      newest kernels; session 9 ran memcheck on gemm-ws fp8-ws ws-cluster attention-bwd-v3), 2b. the same with SKIP_LARGE=1 and SANITIZE_FAMILIES="gemm-cluster
#      gemm-deep-prefetch fp8-cluster fp8-tma gemm-skip-empty", 2c. SANITIZE_FAMILIES="moe-pdl
#      gemm attention-v2"
#   3a. SKIP_BUILD=1 SKIP_SMOKE=1 SKIP_TESTS=1 SKIP_LARGE=1 SKIP_SANITIZER=1 SKIP_DEMO=1
#      BENCH=core (benchmarks and the generations' A/B), 3b. the same with BENCH=ws, 3c. BENCH=variants
#   4. SKIP_BUILD=1 SKIP_SMOKE=1 SKIP_TESTS=1 SKIP_LARGE=1 SKIP_SANITIZER=1 SKIP_BENCH=1
#      SKIP_DEMO=1 PROFILE=1 (ncu over bench/profile_targets.py; PROFILE_TARGETS picks)
# All of them do not fit a session's 30 minutes of device time. The order that decides
# the most open targets first: 1 (SKIP_DEMO=1; which new kernels are right), 3b (the
# warp-specialized GEMM/FP8 numbers, first with DSK_WS_WARP_ARRIVALS=1, and the attention
# backward with DSK_ATTENTION_BWD_DQ_BULK=1), 3a (the
# defaults), 2a (memcheck of the kernels that passed), then 3c, 4, 2b, 2c, the demo.
# Session 9 ran 1, 3b, 3a and memcheck of gemm-ws fp8-ws ws-cluster attention-bwd-v3
# (bench/results/session9-h100/README.md).
# The device tool returns few files: tar OUT.
# SMOKE_FAMILIES picks families of step 1 (default: all, listed in smoke_family below);
# the whole suite in one process (CPU tests too) is the tests step (SKIP_TESTS=0).
# A machine kept warm between calls keeps the build (ignored build outputs stay).
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
if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (SKIP_BUILD=1)"
elif ! DSK_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import json, deepseek_kernels as d; print(json.dumps(d.build_info(), indent=1))" | tee "$OUT/build_info.json"

step "CUDA tests by family, each in its own process (${SMOKE_JOBS:-4} at a time)"
# family -> test file, -k expression, optional VAR=value (a forced kernel). Together
# the families hold every `-m cuda` test but tests/test_large.py (its own step);
# the newest kernels' families come first.
smoke_family() {
  case $1 in
    attention-fwd-v3) echo "tests/test_attention.py|v3 and not bwd_v3 and not bwd_v1_v2|" ;;
    attention-bwd-v3) echo "tests/test_attention.py|bwd_v3 or bwd_v1_v2|" ;;
    attention-bwd-dq-bulk) echo "tests/test_attention.py|bwd_v3 or bwd_auto or bwd_v1_v2|DSK_ATTENTION_BWD_DQ_BULK=1" ;;
    attention-bwd-v2) echo "tests/test_attention.py|bwd_v2|" ;;
    attention) echo "tests/test_attention.py|not v3 and not bwd_v2|" ;;
    gemm-v3) echo "tests/test_gemm.py|v3|" ;;
    gemm-tc) echo "tests/test_gemm.py|(tensor_core or int8 or versions or fp8_grouped_gemm_cuda) and not v3|" ;;
    gemm-v3-cp-async) echo "tests/test_gemm.py|v3 or versions|DSK_GEMM_TMA=0" ;;
    fp8-plain) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_WARP_SPECIALIZED=0" ;;
    fp8-tma) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_TMA=1" ;;
    fp8-deep-prefetch) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_DEEP_PREFETCH=1" ;;
    fp8-cluster) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_CLUSTER=1" ;;
    gemm-skip-empty) echo "tests/test_gemm.py|v3 or versions or auto or grouped|DSK_GEMM_SKIP_EMPTY_ROWS=1" ;;
    gemm-cluster) echo "tests/test_gemm.py|v3 or versions or auto|DSK_GEMM_CLUSTER=1" ;;
    gemm-deep-prefetch) echo "tests/test_gemm.py|v3 or versions or auto|DSK_GEMM_DEEP_PREFETCH=1" ;;
    gemm-ws) echo "tests/test_gemm.py|v3 or versions or auto or grouped|DSK_GEMM_WARP_SPECIALIZED=1" ;;
    fp8-ws) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_FMA_PROMOTION=0" ;;  # the contract's promotion
    gemm-ws-cluster) echo "tests/test_gemm.py|v3 or versions or auto|DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1" ;;
    fp8-ws-cluster) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_FMA_PROMOTION=0 DSK_FP8_CLUSTER=1" ;;
    ws-warp-arrivals) echo "tests/test_gemm.py|v3 or versions or auto or grouped or tensor_core|DSK_GEMM_WARP_SPECIALIZED=1 DSK_WS_WARP_ARRIVALS=1" ;;
    ws-cluster-warp-arrivals) echo "tests/test_gemm.py|v3 or versions or auto or tensor_core|DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_FP8_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1" ;;
    fp8-ws-fma-cluster) echo "tests/test_gemm.py|tensor_core or fp8_grouped_gemm_cuda|DSK_FP8_CLUSTER=1" ;;  # the default kernel in clusters
    moe-pdl) echo "tests/test_moe.py tests/test_cuda_graphs.py|gating or moe|DSK_MOE_PDL=1" ;;
    attention-bwd-unordered) echo "tests/test_attention.py|bwd_kernels_match_reference and bwd_v2|DSK_ATTENTION_BWD_UNORDERED=1" ;;
    gemm) echo "tests/test_gemm.py|not v3 and not tensor_core and not int8 and not versions and not fp8_grouped_gemm_cuda|" ;;
    moe-v2) echo "tests/test_moe.py|v2|" ;;
    moe) echo "tests/test_moe.py|not v2|" ;;
    quant) echo "tests/test_quant.py||" ;;
    graphs) echo "tests/test_cuda_graphs.py||" ;;
    rest) echo "tests/test_model.py tests/test_distributed.py tests/test_build.py tests/test_dynamic_shapes.py tests/test_nn_modules.py tests/test_eager_autograd.py||" ;;
    *) return 1 ;;
  esac
}
SMOKE_ALL="ws-warp-arrivals ws-cluster-warp-arrivals attention-bwd-dq-bulk attention-bwd-v3 gemm-ws fp8-ws gemm-ws-cluster fp8-ws-cluster fp8-ws-fma-cluster fp8-plain gemm-cluster gemm-deep-prefetch fp8-tma fp8-deep-prefetch fp8-cluster gemm-skip-empty moe-pdl attention-bwd-unordered attention-fwd-v3 attention-bwd-v2 gemm-v3 gemm-tc moe-v2 graphs attention gemm moe quant rest gemm-v3-cp-async"
smoke_run() {  # one family, in the background's own process; its summary line goes to smoke-NAME.sum
  local spec files kexpr envs
  spec=$(smoke_family "$1") || { echo "$1: unknown family" >"$OUT/smoke-$1.sum"; return; }
  IFS='|' read -r files kexpr envs <<<"$spec"
  local t0=$SECONDS
  rm -f "$OUT/smoke-$1.sum"
  # CPU threads shared out: the fp64 references run on the host, SMOKE_JOBS processes at once.
  # shellcheck disable=SC2086
  timeout -k 10 ${SMOKE_TIMEOUT:-420} env OMP_NUM_THREADS=$(( $(nproc) / ${SMOKE_JOBS:-4} > 0 ? $(nproc) / ${SMOKE_JOBS:-4} : 1 )) \
    $envs $PY -m pytest $files -m cuda ${kexpr:+-k "$kexpr"} -q -rfEs -p no:cacheprovider \
    --maxfail=${SMOKE_MAXFAIL:-10} >"$OUT/smoke-$1.log" 2>&1
  local rc=$?
  local verdict=ok
  case $rc in
    0) ;;
    5) verdict="ok (no tests selected)" ;;
    124) verdict="TIMED OUT (a hang?)" ;;
    *) verdict="FAILED (rc $rc)" ;;
  esac
  echo "$1: $verdict in $((SECONDS - t0)) s | $(grep -E '[0-9]+ (passed|failed|error|skipped)' "$OUT/smoke-$1.log" | tail -1)" \
    >"$OUT/smoke-$1.sum"
}
if [ "${SKIP_SMOKE:-0}" = 1 ]; then echo "skipped (SKIP_SMOKE=1)"; else
  fams=${SMOKE_FAMILIES:-$SMOKE_ALL}
  running=0
  for fam in $fams; do
    smoke_run "$fam" &
    running=$((running + 1))
    if [ $running -ge ${SMOKE_JOBS:-4} ]; then wait -n; running=$((running - 1)); fi
  done
  wait
  for fam in $fams; do
    [ -f "$OUT/smoke-$fam.sum" ] || echo "$fam: no result (killed?)" >"$OUT/smoke-$fam.sum"
    tee -a "$OUT/smoke.log" <"$OUT/smoke-$fam.sum"
    grep -q ": ok" "$OUT/smoke-$fam.sum" || { status=1; grep -E "^(FAILED|ERROR)|Error|error:" "$OUT/smoke-$fam.log" 2>/dev/null | head -5; }
  done
fi

step "tests (${TESTS:-tests}, in one process)"
if [ "${SKIP_TESTS:-0}" = 1 ]; then echo "skipped (SKIP_TESTS=1)"; else
  # A bounded run: a kernel that hangs (e.g. a new one waiting on a barrier) fails the step.
  # After the family runs, the CPU tests (TEST_MARK overrides, "" for everything).
  [ "${SKIP_SMOKE:-0}" = 1 ] && mark=${TEST_MARK-} || mark=${TEST_MARK-not cuda}
  timeout ${TEST_TIMEOUT:-540} $PY -m pytest ${TESTS:-tests} ${mark:+-m "$mark"} ${PYTEST_ARGS:-} \
    ${PYTEST_K:+-k "$PYTEST_K"} -q -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

step "past 2^31 elements (CUDA cases of tests/test_large.py)"
if [ "${SKIP_LARGE:-0}" = 1 ]; then echo "skipped (SKIP_LARGE=1)"; else
  DSK_LARGE_TESTS=1 $PY -m pytest tests/test_large.py -q -rs -p no:cacheprovider -k cuda 2>&1 | tee "$OUT/tests-large.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

step "compute-sanitizer memcheck (small CUDA test runs)"
# One small run per op family; SANITIZE_FAMILIES picks a subset.
sanitize() {  # name, test file, -k expression, then optional VAR=value (e.g. a forced kernel)
  if [ ! -f "$2" ]; then return; fi
  timeout ${SANITIZER_TIMEOUT:-300} env "${@:4}" compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    $PY -m pytest "$2" -q -p no:cacheprovider -m cuda -k "$3" >"$OUT/sanitizer-$1.log" 2>&1
  local rc=$?
  echo "$1: $(grep -E 'passed|failed' "$OUT/sanitizer-$1.log" | tail -1) | $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$1.log" | sort -u | tr '\n' ' ')"
  [ $rc = 0 ] || { echo "SANITIZER ($1) FAILED (rc $rc)"; status=1; }
}
if [ "${SKIP_SANITIZER:-0}" = 1 ]; then echo "skipped (SKIP_SANITIZER=1)"
elif command -v compute-sanitizer >/dev/null; then
  # The *-v2 runs force the newer kernel generation of a family for every test.
  for fam in ${SANITIZE_FAMILIES:-ws-warp-arrivals ws-cluster-warp-arrivals attention-bwd-dq-bulk gemm-ws fp8-ws ws-cluster attention-bwd-v3 gemm-cluster gemm-deep-prefetch fp8-cluster fp8-tma gemm-skip-empty moe-pdl quant moe moe-v1 gemm gemm-v2 gemm-v3 fp8-v2 int8-v1 attention attention-v2 attention-v3 attention-bwd-v2}; do
    case $fam in
      quant) sanitize quant tests/test_quant.py "matches_reference and not 1024 or nonfinite or bad_inputs or agree" ;;
      moe) sanitize moe tests/test_moe.py "matches_reference or shapes or nonfinite or empty or agree" ;;
      moe-pdl) sanitize moe-pdl tests/test_moe.py "matches_reference or shapes or nonfinite or empty or agree" DSK_MOE_PDL=1 ;;
      moe-v1) sanitize moe-v1 tests/test_moe.py "matches_reference or shapes or nonfinite or empty or agree" DSK_MOE_KERNEL=v1 ;;
      gemm) sanitize gemm tests/test_gemm.py "${SANITIZE_K_GEMM:-not 8192 and not large}" ;;
      gemm-v3) sanitize gemm-v3 tests/test_gemm.py "v3 or versions" ;;  # TMA and wgmma (forced by the tests)
      gemm-v2) sanitize gemm-v2 tests/test_gemm.py "${SANITIZE_K_GEMM:-not 8192 and not large} and not fp8" DSK_GEMM_KERNEL=v2 ;;
      fp8-v2) sanitize fp8-v2 tests/test_gemm.py "tensor_core or fp8_grouped_gemm_cuda" ;;  # they select v2
      gemm-skip-empty) sanitize gemm-skip-empty tests/test_gemm.py "v3 or versions or auto" DSK_GEMM_SKIP_EMPTY_ROWS=1 ;;
      gemm-cluster) sanitize gemm-cluster tests/test_gemm.py "v3 or versions or auto" DSK_GEMM_CLUSTER=1 ;;
      gemm-ws) sanitize gemm-ws tests/test_gemm.py "v3 or versions or auto or grouped" DSK_GEMM_WARP_SPECIALIZED=1 ;;
      fp8-ws) sanitize fp8-ws tests/test_gemm.py "tensor_core or fp8_grouped_gemm_cuda" DSK_FP8_FMA_PROMOTION=0 ;;
      # the warp-specialized kernels releasing stages per warp, alone and in clusters
      ws-warp-arrivals) sanitize ws-warp-arrivals tests/test_gemm.py "v3 or versions or auto or tensor_core" DSK_GEMM_WARP_SPECIALIZED=1 DSK_WS_WARP_ARRIVALS=1 ;;
      ws-cluster-warp-arrivals) sanitize ws-cluster-warp-arrivals tests/test_gemm.py "v3 or versions or auto or tensor_core" DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_FP8_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1 ;;
      fp8-plain) sanitize fp8-plain tests/test_gemm.py "tensor_core or fp8_grouped_gemm_cuda" DSK_FP8_WARP_SPECIALIZED=0 ;;
      # clusters for plain GEMMs (FP8: the default kernel, fused promotion)
      ws-cluster) sanitize ws-cluster tests/test_gemm.py "v3 or versions or auto or tensor_core" DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_FP8_CLUSTER=1 ;;
      # both variants at once: plain GEMMs run cluster + deep, grouped ones deep only
      gemm-deep-prefetch) sanitize gemm-deep-prefetch tests/test_gemm.py "v3 or versions or auto" DSK_GEMM_CLUSTER=1 DSK_GEMM_DEEP_PREFETCH=1 ;;
      fp8-tma) sanitize fp8-tma tests/test_gemm.py "tensor_core or fp8_grouped_gemm_cuda" DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_TMA=1 ;;
      fp8-cluster) sanitize fp8-cluster tests/test_gemm.py "tensor_core or fp8_grouped_gemm_cuda" DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_CLUSTER=1 ;;  # grouped: deep only
      int8-v1) sanitize int8-v1 tests/test_gemm.py "int8" DSK_INT8_KERNEL=v1 ;;
      attention) sanitize attention tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" ;;
      attention-v2) sanitize attention-v2 tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" DSK_ATTENTION_KERNEL=v2 ;;
      attention-v3) sanitize attention-v3 tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" DSK_ATTENTION_KERNEL=v3 ;;
      attention-bwd-v2) sanitize attention-bwd-v2 tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" DSK_ATTENTION_BWD_KERNEL=v2 ;;
      attention-bwd-dq-bulk) sanitize attention-bwd-dq-bulk tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" DSK_ATTENTION_BWD_KERNEL=v3 DSK_ATTENTION_BWD_DQ_BULK=1 ;;
      attention-bwd-v3) sanitize attention-bwd-v3 tests/test_attention.py "${SANITIZE_K_ATTENTION:-not 4097 and not large}" DSK_ATTENTION_BWD_KERNEL=v3 ;;
    esac
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
fi

step "benchmarks (${BENCH:-core ws variants})"
# BENCH picks the sets: core (quant, MoE, GEMM, attention, and the GEMM and attention
# A/B of the kernel generations), ws (the warp-specialized GEMM/FP8 variants) and
# variants (the other opt-in variants' runs and A/B runs); they do not fit one
# 10-minute call: BENCH=core, BENCH=ws, then BENCH=variants.
bench_set() { case " ${BENCH:-core ws variants} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# bench_gemm.py with a variant's variables set: NAME, "VAR=value ...", the lines to show
# (a grep -E pattern of table rows; "" for the last lines), then bench_gemm.py's
# arguments. Results go to OUT/gemm-NAME, the log to OUT/bench-gemm-NAME.log.
gemm_variant_bench() {
  local name=$1 envs=$2 rows=$3
  shift 3
  mkdir -p "$OUT/gemm-$name"
  # shellcheck disable=SC2086
  env $envs $PY bench/bench_gemm.py --device cuda "$@" --out "$OUT/gemm-$name" >"$OUT/bench-gemm-$name.log" 2>&1
  local rc=$?
  if [ -n "$rows" ]; then grep -E "$rows" "$OUT/bench-gemm-$name.log" | tail -8; else tail -8 "$OUT/bench-gemm-$name.log"; fi
  [ $rc = 0 ] || status=1
}
# The attention A/B (bench_attention.py --ab) with a variant's variables set: NAME,
# "VAR=value ..."; results to OUT/attention-NAME, the log to OUT/bench-attention-ab-NAME.log.
attention_variant_bench() {
  mkdir -p "$OUT/attention-$1"
  # shellcheck disable=SC2086
  env $2 $PY bench/bench_attention.py --device cuda --ab --out "$OUT/attention-$1" >"$OUT/bench-attention-ab-$1.log" 2>&1
  local rc=$?
  tail -6 "$OUT/bench-attention-ab-$1.log"
  [ $rc = 0 ] || status=1
}
SMALL_GEMM_ROWS="--square 1024 --int8 1024 1024 1024"  # the default grouped and FP8 shapes, small others
if [ "${SKIP_BENCH:-0}" = 1 ]; then echo "skipped (SKIP_BENCH=1)"; else
  if bench_set core; then
    $PY bench/bench_quant.py --device cuda ${QUANT_BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    $PY bench/bench_moe.py --device cuda ${MOE_BENCH_ARGS:---profile} --out "$OUT" 2>&1 | tee "$OUT/bench-moe.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    for b in gemm attention host; do
      [ -f bench/bench_$b.py ] || continue
      $PY bench/bench_$b.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-$b.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    # bf16 GEMM v1 / v2 / v3 (wgmma + TMA) / cuBLAS side by side.
    $PY bench/bench_gemm.py --device cuda --ab --out "$OUT" 2>&1 | tee "$OUT/bench-gemm-ab.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # Attention forward v1 / v2 / v3 and backward v1 / v2 / v3 / SDPA flash side by side.
    $PY bench/bench_attention.py --device cuda --ab --out "$OUT" 2>&1 | tee "$OUT/bench-attention-ab.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
  if bench_set ws; then
    # The warp-specialized persistent v3 kernels (DSK_*_WARP_SPECIALIZED=1), alone and in
    # clusters (DSK_*_CLUSTER=1): the bf16 A/B, then the grouped (DeepSeek-V3 expert shapes,
    # also skipping empty warpgroups) and FP8 rows. The v3_variant column says what ran.
    # First the stages released per warp (DSK_WS_WARP_ARRIVALS=1), alone and in
    # clusters, bf16 and FP8: the suspect of the clusters' slowdown in session 9.
    gemm_variant_bench ab-ws-warp-arrivals "DSK_GEMM_WARP_SPECIALIZED=1 DSK_WS_WARP_ARRIVALS=1" "" --ab
    gemm_variant_bench ab-ws-cluster-warp-arrivals "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1" "" --ab
    gemm_variant_bench fp8-warp-arrivals "DSK_WS_WARP_ARRIVALS=1" "^fp8" $SMALL_GEMM_ROWS
    gemm_variant_bench fp8-cluster-warp-arrivals "DSK_WS_WARP_ARRIVALS=1 DSK_FP8_CLUSTER=1" "^fp8" $SMALL_GEMM_ROWS
    # Attention backward v3 adding dQ by bulk reductions (DSK_ATTENTION_BWD_DQ_BULK=1): its A/B.
    attention_variant_bench dq-bulk "DSK_ATTENTION_BWD_DQ_BULK=1"
    gemm_variant_bench ab-ws "DSK_GEMM_WARP_SPECIALIZED=1" "" --ab
    gemm_variant_bench ab-ws-cluster "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1" "" --ab
    gemm_variant_bench ws-rows "DSK_GEMM_WARP_SPECIALIZED=1 DSK_FP8_FMA_PROMOTION=0" "^(grouped|fp8)" \
      $SMALL_GEMM_ROWS
    gemm_variant_bench ws-skip-cluster-rows "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_SKIP_EMPTY_ROWS=1
      DSK_FP8_FMA_PROMOTION=0 DSK_FP8_CLUSTER=1" "^(grouped|fp8)" $SMALL_GEMM_ROWS
    # FP8's default (warp-specialized, fused promotion) in clusters, and FP8 v3 without
    # warp specialization (the default until session 9): the fp8 rows.
    gemm_variant_bench fp8-plain "DSK_FP8_WARP_SPECIALIZED=0" "^fp8" $SMALL_GEMM_ROWS --grouped 4096 8 256 256
    gemm_variant_bench fp8-ws-fma-cluster "DSK_FP8_CLUSTER=1" "^fp8" $SMALL_GEMM_ROWS \
      --grouped 4096 8 256 256
  fi
  if bench_set variants; then
    # Gating with its later kernels as programmatic dependent launches (DSK_MOE_PDL=1, opt-in).
    mkdir -p "$OUT/moe-pdl"
    DSK_MOE_PDL=1 $PY bench/bench_moe.py --device cuda --profile --no-ref --no-compile --out "$OUT/moe-pdl" 2>&1 \
      | tee "$OUT/bench-moe-pdl.log" | grep -A6 "^stage"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # The first MoE gating kernels (v1; v2 is the default), timed the same way (own results file).
    mkdir -p "$OUT/moe-v1"
    DSK_MOE_KERNEL=v1 $PY bench/bench_moe.py --device cuda ${MOE_BENCH_ARGS:---profile} --out "$OUT/moe-v1" 2>&1 \
      | tee "$OUT/bench-moe-v1.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # Below a wave of v3's 128x256 tiles (1024^3: a quarter wave on an H100, 2048^3 about one),
    # where auto runs v1: the data for auto's threshold.
    gemm_variant_bench ab-small "" "" --ab --square 1024 2048
    # The opt-in GEMM experiments in one run (independent rows): FP8 v3 with TMA loads
    # (DSK_FP8_TMA=1: the fp8 rows) and v3 skipping empty warpgroups
    # (DSK_GEMM_SKIP_EMPTY_ROWS=1: the grouped rows); small bf16/int8 shapes.
    gemm_variant_bench experiments "DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_TMA=1 DSK_GEMM_SKIP_EMPTY_ROWS=1" "^(grouped|fp8)" $SMALL_GEMM_ROWS
    # v3's opt-in variants, the same A/B each: clusters of two CTAs multicasting B
    # (DSK_GEMM_CLUSTER=1), copies a tile further ahead (DSK_GEMM_DEEP_PREFETCH=1), both.
    gemm_variant_bench ab-cluster "DSK_GEMM_CLUSTER=1" "" --ab
    gemm_variant_bench ab-deep "DSK_GEMM_DEEP_PREFETCH=1" "" --ab
    gemm_variant_bench ab-cluster-deep "DSK_GEMM_CLUSTER=1 DSK_GEMM_DEEP_PREFETCH=1" "" --ab
    # FP8 v3's other opt-in variants (each turns TMA on): every stage ahead
    # (DSK_FP8_DEEP_PREFETCH=1), clusters multicasting W (DSK_FP8_CLUSTER=1): the fp8 rows.
    gemm_variant_bench fp8-deep "DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_DEEP_PREFETCH=1" "^fp8" $SMALL_GEMM_ROWS --grouped 4096 8 256 256
    gemm_variant_bench fp8-cluster "DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_CLUSTER=1" "^fp8" $SMALL_GEMM_ROWS --grouped 4096 8 256 256
    # bf16 v3 with cp.async copies instead of TMA (DSK_GEMM_TMA=0), the same A/B.
    gemm_variant_bench ab-cp-async "DSK_GEMM_TMA=0" "" --ab
    # Backward v2 with its dq adds in any order (DSK_ATTENTION_BWD_UNORDERED=1, not
    # deterministic): what the deterministic turns cost.
    attention_variant_bench bwd-unordered "DSK_ATTENTION_BWD_UNORDERED=1"
  fi
fi

step "Nsight Compute profiles of the kernels short of their targets (PROFILE=1)"
# One call of each target (bench/profile_targets.py) under ncu, clocks left alone;
# the full sections go to ncu*.csv, a summary per kernel to the log.
if [ "${PROFILE:-0}" != 1 ]; then echo "skipped (PROFILE=1 runs it)"
elif ! command -v ncu >/dev/null; then echo "ncu not found: skipped"
else
  NCU="ncu --clock-control none --nvtx --nvtx-include profile/ --section SpeedOfLight --section Occupancy
       --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --csv --page details"
  # shellcheck disable=SC2086
  timeout ${PROFILE_TIMEOUT:-420} $NCU $PY bench/profile_targets.py ${PROFILE_TARGETS:+--targets $PROFILE_TARGETS} \
    >"$OUT/ncu.csv" 2>"$OUT/ncu.err" || { echo "ncu run failed (rc $?)"; tail -5 "$OUT/ncu.err"; status=1; }
  # shellcheck disable=SC2086
  DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_TMA=1 timeout ${PROFILE_TIMEOUT:-420} $NCU $PY bench/profile_targets.py --targets fp8 \
    >"$OUT/ncu-fp8-tma.csv" 2>"$OUT/ncu-fp8-tma.err" || { echo "ncu run (FP8 TMA) failed"; status=1; }
  # The GEMM and FP8 v3 opt-in variants together: clusters and deep prefetch.
  # shellcheck disable=SC2086
  DSK_GEMM_CLUSTER=1 DSK_GEMM_DEEP_PREFETCH=1 DSK_FP8_WARP_SPECIALIZED=0 DSK_FP8_CLUSTER=1 timeout ${PROFILE_TIMEOUT:-420} \
    $NCU $PY bench/profile_targets.py --targets gemm fp8 \
    >"$OUT/ncu-variants.csv" 2>"$OUT/ncu-variants.err" || { echo "ncu run (variants) failed"; status=1; }
  # The warp-specialized persistent kernels in clusters (they take precedence over deep prefetch).
  # shellcheck disable=SC2086
  DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_FP8_CLUSTER=1 timeout ${PROFILE_TIMEOUT:-420} \
    $NCU $PY bench/profile_targets.py --targets gemm fp8 \
    >"$OUT/ncu-ws.csv" 2>"$OUT/ncu-ws.err" || { echo "ncu run (warp-specialized) failed"; status=1; }
  for f in ncu ncu-fp8-tma ncu-variants ncu-ws; do
    echo "-- $f"; $PY bench/profile_targets.py --summarize "$OUT/$f.csv" | tee "$OUT/$f-summary.txt"
  done
fi

step "model: the demo on the GPU"
if [ "${SKIP_DEMO:-0}" = 1 ]; then echo "skipped (SKIP_DEMO=1)"; else
  $PY -m model.train --device cuda --precision bf16 --out "$OUT/demo" --no-progress 2>&1 | tee "$OUT/demo.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

step "done: status $status"
exit $status
