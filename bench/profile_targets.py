"""The kernels still short of their targets, one call each inside an NVTX range
named "profile", for Nsight Compute (the GPU check's profile step):

    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \\
        --csv --page details python bench/profile_targets.py [--targets gemm fp8 ...] > ncu.csv
    python bench/profile_targets.py --summarize ncu.csv

Each target runs twice outside the range first (warm-up: kernel selection, lazy
module loading, allocator), then once inside it, so ncu replays exactly the
kernels of one call. The shapes are the targets' (issues 3-5):

    gemm, gemm_gelu      bf16 4096^3 (auto: wgmma v3 on an H100), plain and bias + gelu
    grouped              bf16 grouped GEMM, 65,536 rows over 256 experts, N 2048, K 7168
    fp8                  FP8 block-scaled 4096 x 7168 x 16384 (the default: warp-specialized)
    gating               MoE gating, T 8192, E 256, k 8, groups 8 / 4
    attention_fwd        cross-attention forward, B 8, H 16, D 128, Lq 1024, Lk 4096
    attention_bwd        its backward (auto: v3 on an H100); attention_bwd_v1, _v2, _v3 the
                         same with backward v1, v2, v3

--summarize prints duration, SM and memory throughput and occupancy per kernel
from ncu's CSV (its full sections stay in the file).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from typing import Callable, Dict, List

import torch

TARGETS = ["gemm", "gemm_gelu", "grouped", "fp8", "gating", "attention_fwd", "attention_bwd",
           "attention_bwd_v1", "attention_bwd_v2", "attention_bwd_v3"]


def _target(name: str) -> Callable[[], object]:
    """Inputs of one target, and the call to profile."""
    import deepseek_kernels as dk

    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(bf16)

    if name in ("gemm", "gemm_gelu"):
        a, w, b = randn(4096, 4096), randn(4096, 4096, scale=4096 ** -0.5), randn(4096)
        if name == "gemm":
            return lambda: dk.gemm(a, w)
        return lambda: dk.gemm(a, w, b, activation="gelu")
    if name == "grouped":
        rows, e, n, k = 65536, 256, 2048, 7168
        from bench_gemm import _balanced_offsets  # the benchmark's expert loads (bench/ is on sys.path)

        x, ws = randn(rows, k), randn(e, n, k, scale=k ** -0.5)
        offsets = _balanced_offsets(rows, e, dev)
        return lambda: dk.grouped_gemm(x, ws, offsets)
    if name == "fp8":
        m, n, k = 4096, 7168, 16384
        qa, sa = dk.quantize_fp8(torch.randn(m, k, device=dev, generator=g), (1, 128))
        qw, sw = dk.quantize_fp8(torch.randn(n, k, device=dev, generator=g) * k ** -0.5, (128, 128))
        return lambda: dk.fp8_gemm(qa, sa, qw, sw)
    if name == "gating":
        logits = randn(8192, 256)
        return lambda: dk.moe_topk_gating(logits, 8, n_group=8, topk_group=4)
    if name.startswith("attention"):
        q = randn(8, 1024, 16, 128)
        kv = [randn(8, 4096, 16, 128) for _ in range(2)]
        if name == "attention_fwd":
            return lambda: dk.cross_attention(q, *kv)
        out, lse = dk.cross_attention(q, *kv, return_lse=True)
        dout = torch.randn_like(out)
        version = {"attention_bwd_v1": 1, "attention_bwd_v2": 2, "attention_bwd_v3": 3}.get(name, 4)

        # The backward op itself, on this thread: autograd would run it on its
        # device thread, outside the NVTX range ncu filters on.
        def backward():
            with dk.ops.cuda_kernel_choice("_attention_cuda_bwd_kernel", version):
                return torch.ops.deepseek_kernels.cross_attention_backward(dout, q, *kv, out, lse)
        return backward
    raise AssertionError(name)  # every name in TARGETS is handled above


def run(targets: List[str]) -> None:
    for name in targets:
        call = _target(name)
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"profiled: {name}", file=sys.stderr, flush=True)
        del call
        torch.cuda.empty_cache()


# ncu's details page: the metrics the summary shows, by (section-independent) name.
SUMMARY = OrderedDict([
    ("Duration", "time"),
    ("Compute (SM) Throughput", "SM %"),
    ("Memory Throughput", "mem %"),
    ("DRAM Throughput", "DRAM %"),
    ("Achieved Occupancy", "occupancy %"),
    ("Registers Per Thread", "regs"),
])


def summarize(path: str) -> str:
    """A table of one row per profiled kernel launch from ncu's --csv --page details output."""
    rows: Dict[str, Dict[str, str]] = OrderedDict()
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own log lines are not CSV
    for rec in csv.DictReader(lines):
        key = f"{rec.get('ID', '?')} {rec.get('Kernel Name', '?')}"
        metric = rec.get("Metric Name")
        if metric in SUMMARY:
            unit = rec.get("Metric Unit", "")
            # The first of a name wins: "Memory Throughput" is a percentage in
            # SpeedOfLight and bytes per second in MemoryWorkloadAnalysis.
            rows.setdefault(key, {}).setdefault(SUMMARY[metric], f"{rec.get('Metric Value', '')} {unit}".strip())
    if not rows:
        return f"{path}: no kernel metrics found"
    cols = list(SUMMARY.values())
    out = []
    for key, vals in rows.items():
        ident, kernel = key.split(" ", 1)
        kernel = kernel if len(kernel) <= 70 else kernel[:67] + "..."
        out.append(f"{ident:>4} {kernel:<70} " + "  ".join(f"{c}: {vals.get(c, '-')}" for c in cols))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="*", default=TARGETS, choices=TARGETS)
    ap.add_argument("--summarize", metavar="NCU_CSV", help="print the summary of an ncu CSV and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not torch.cuda.is_available():
        print("profile_targets: needs a CUDA GPU", file=sys.stderr)
        return 2
    run(args.targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
