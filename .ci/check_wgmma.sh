#!/usr/bin/env bash
# The Hopper kernels overlap wgmma with other work only if ptxas keeps their
# wgmma asynchronous: it reports C7514-C7517 ("wgmma ... serialized", "warpgroup.wait
# is injected") when the code lets it not. Compiles the files holding wgmma
# kernels for sm_90a with ptxas -v and fails on any such report.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
if [ ! -x "$NVCC" ]; then echo "check_wgmma: no nvcc, skipped"; exit 0; fi
out=$(mktemp -d)
status=0
# The .cu files that issue wgmma themselves or through a kernel header they include.
files=$(for f in csrc/*/*.cu; do
  for h in "$f" $(sed -n 's/^#include "\(.*_kernel\.cuh\)"/csrc\/\1/p' "$f"); do
    if grep -q "wgmma_m64" "$h"; then echo "$f"; break; fi
  done
done)
for f in $files; do
  "$NVCC" -std=c++17 -O3 -Icsrc -DDSK_WITH_CUDA --expt-relaxed-constexpr \
    -gencode arch=compute_90a,code=sm_90a -Xptxas -v -c "$f" -o "$out/$(basename "$f").o" \
    >"$out/$(basename "$f").log" 2>&1 &
done
wait
for log in "$out"/*.log; do
  if grep -q "C751[4-7]" "$log"; then
    echo "check_wgmma: $(basename "$log" .log): wgmma serialized by ptxas:"; grep "C751[4-7]" "$log"; status=1
  fi
done
[ $status = 0 ] && echo "check_wgmma: no wgmma serialization in $(ls "$out"/*.log | wc -l) files"
rm -rf "$out"
exit $status
