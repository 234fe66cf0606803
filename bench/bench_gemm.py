#!/usr/bin/env python
"""Benchmark the GEMM family against PyTorch's own (cuBLAS / CPU BLAS) in the same run.

Rows (ours vs the peer a PyTorch user would write):

  gemm               dk.gemm(a, w)                       vs torch.matmul(a, w.T)
  gemm+bias+gelu     dk.gemm(a, w, b, activation="gelu") vs F.gelu(F.linear(a, w, b))
  grouped            dk.grouped_gemm(x, W, offsets)      vs one torch.mm of the same total size
                     (the issue's bar) and the per-expert loop of matmuls; on CUDA also
                     with the v2 and v3 kernels forced ("grouped v2", "grouped v3")
  int8               dk.int8_gemm (W8A8, bf16 out)       vs torch._int_mm + scaling (where available)

Every implementation is checked against an fp64 reference before it is timed
(ours within 2x the peer's error). TFLOP/s and % of the bf16 (CUDA) / fp32 (CPU)
matmul peak measured in the same run; medians. The bf16/fp32 grouped rows add
ours_GB/s (the E weights, x and the output, each moved once), floor_ms (the
roofline: max(FLOPs / matmul peak, bytes / copy bandwidth), both measured in
the run) and x_of_floor = floor_ms / ours_ms: at the DeepSeek-V3 shape the E
weights are 7.5 GB, so the floor sits near the one-GEMM peer's time.

    python bench/bench_gemm.py --device cuda   # H100: 4096^3, 8192^3, DeepSeek-V3 expert shapes
    python bench/bench_gemm.py --device cpu    # small shapes

  fp8                dk.fp8_gemm (1x128 / 128x128 block scales) vs torch._scaled_mm row-wise
                     (where available) and a bf16 matmul
  fp8 grouped        dk.fp8_grouped_gemm at the grouped shape vs our bf16 grouped_gemm and
                     one matmul of the same total size
  fp8 v2/v3, fp8 grouped v2/v3   (CUDA) the same with the FP8 tensor-core kernels
                     (v2: mma.sync, v3: wgmma, the default), after checking them against
                     the exact kernel (v1) the "fp8" rows time
  int8 v2            (CUDA) the INT8 tensor-core kernel (the default), after checking it
                     bitwise against dp4a (v1, the "int8" row)

Results go to ``bench/results/gemm-<device_name>.json``.

    python bench/bench_gemm.py --device cuda --ab   # our CUDA GEMM v1 vs v2 vs v3 vs cuBLAS, < 30 s

--ab times only the bf16 GEMM (4096^3 and 8192^3, plain and bias + gelu) with
our three CUDA kernel generations and torch.matmul / F.gelu(F.linear) side by
side in one process (the private op ``_gemm_cuda_kernel`` switches kernels
between calls; DSK_GEMM_KERNEL sets the starting one). v2 is checked first:
bitwise equal to v1 for the plain GEMM, and within 2x the peer's error against
fp64 for both (v3, wgmma: that error criterion only); a kernel that fails is not timed. Results go to
``<out>/<device_name>-gemm-ab.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # see bench_moe.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))

import timer as T  # noqa: E402

CONFIGS = {
    # (M, N, K) square problems; grouped: (routed rows, experts, N, K); int8: (M, N, K)
    "cuda": dict(square=[4096, 8192], dtype="bf16", grouped=(8192 * 8, 256, 2048, 7168),
                 int8=(4096, 4096, 4096), fp8=(4096, 7168, 16384)),
    "cpu": dict(square=[256, 512], dtype="fp32", grouped=(2048, 16, 256, 256),
                int8=(256, 256, 256), fp8=(64, 128, 256)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["op", "shape", "dtype", "ours_ms", "peer_ms", "x_vs_peer", "ours_TFLOP/s", "%matmul_peak",
           "peer2_ms", "x_vs_peer2", "ours_GB/s", "floor_ms", "x_of_floor", "v3_variant"]


def _err(x, want):
    return (x.double() - want).abs().max().item()


def _check(name, ours, peer, want, checks):
    """ours within 2x the peer's error against fp64 (+ a few fp32 ulps of the scale)."""
    floor = 8 * torch.finfo(torch.float32).eps * max(want.abs().max().item(), 1.0)
    e, pe = _err(ours, want), _err(peer, want)
    checks[name] = bool(e <= 2 * pe + floor)
    print(f"check  : {name}: ours err {e:.3g}, peer err {pe:.3g} -> {checks[name]}", flush=True)


def _balanced_offsets(rows, experts, device):
    """Routed rows split over experts with a realistic imbalance (seeded)."""
    g = torch.Generator().manual_seed(0)
    load = torch.rand(experts, generator=g) + 0.5
    counts = (load / load.sum() * rows).floor().long()
    counts[-1] += rows - counts.sum()
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device=device,
                                                                                dtype=torch.int32)


AB_COLUMNS = ["op", "shape", "v1_ms", "v2_ms", "v3_ms", "cublas_ms", "v2_vs_v1", "v2_vs_cublas",
              "v3_vs_cublas", "v1_vs_cublas", "v2_TFLOP/s", "v3_TFLOP/s", "v2_%matmul_peak",
              "v3_%matmul_peak", "v3_variant"]


def ab_rates(row: dict, who: str, s: int, peak: float) -> None:
    """``<who>_TFLOP/s`` and ``<who>_%matmul_peak`` of an --ab row from its ``<who>_ms``
    (an s^3 GEMM): each generation's share of the peak under its own name."""
    row[f"{who}_TFLOP/s"] = 2.0 * s ** 3 / (row[f"{who}_ms"] * 1e-3) / 1e12
    row[f"{who}_%matmul_peak"] = 100.0 * row[f"{who}_TFLOP/s"] / peak


def set_kernel(version: int) -> int:
    """Select our CUDA GEMM generation (1/2/3, 4 = auto) for later calls, 0 only asks; returns
    the previous."""
    return int(torch.ops.deepseek_kernels._gemm_cuda_kernel(version))


def v3_variant(family: str) -> str:
    """The opt-in variant the family's last v3 launch ran ("gemm" or "fp8_gemm"):
    the V3Variant bits of csrc/common/kernel_choice.h, spelled out."""
    bits = int(torch.ops.deepseek_kernels._cuda_kernel_ran(f"{family}_v3_variant"))
    names = [n for b, n in ((1, "tma"), (2, "cluster"), (4, "deep"), (8, "warp-specialized"),
                            (16, "fma-promotion"), (32, "warp-arrivals")) if bits & b]
    return "+".join(names) or "cp.async"


def main_ab(args) -> int:
    """--ab: v1 vs v2 vs v3 vs cuBLAS at bf16 4096^3 and 8192^3, plain and bias + gelu."""
    import datetime

    import deepseek_kernels as dk
    from deepseek_kernels import reference as ref

    device = torch.device(args.device)
    info = T.device_info(device)
    print(f"device : {info['name']} ({info['model']}), torch {torch.__version__}")
    peak = T.measure_matmul_tflops(device)
    print(f"peak   : torch matmul {peak:,.1f} TFLOP/s (bf16 8192^3)", flush=True)
    timing = dict(warmup=5, reps=20)
    sizes = args.square or [4096, 8192]
    start = set_kernel(0)
    torch.manual_seed(0)
    checks, rows = {}, []
    try:
        for s in sizes:
            a = torch.randn(s, s, device=device).to(torch.bfloat16)
            w = (torch.randn(s, s, device=device) * s ** -0.5).to(torch.bfloat16)
            b = torch.randn(s, device=device).to(torch.bfloat16)
            cases = [
                ("gemm", None, "none", lambda: torch.matmul(a, w.t())),
                ("gemm+bias+gelu", b, "gelu", lambda: F.gelu(F.linear(a, w, b))),
            ]
            for op, bias, act, peer in cases:
                name = f"{op} {s}^3"
                ours = {}
                for v in (1, 2, 3):
                    set_kernel(v)
                    ours[v] = dk.gemm(a, w, bias, activation=act)
                want = ref.gemm(a, w, bias, activation=act, out_dtype=torch.float64)
                _check(f"v3 {name}", ours[3], peer(), want, checks)
                _check(f"v2 {name}", ours[2], peer(), want, checks)
                _check(f"v1 {name}", ours[1], peer(), want, checks)
                del want
                if act == "none":  # same mma sequence per element: bitwise equal
                    checks[f"v2 == v1 {name}"] = bool(torch.equal(ours[1], ours[2]))
                    print(f"check  : v2 == v1 bitwise {name} -> {checks[f'v2 == v1 {name}']}",
                          flush=True)
                ok = checks[f"v2 {name}"] and checks.get(f"v2 == v1 {name}", True)
                del ours

                def run(v, bias=bias, act=act):
                    set_kernel(v)
                    return lambda: dk.gemm(a, w, bias, activation=act)

                r = {"op": op, "shape": f"{s}^3"}
                r["v1_ms"] = T.time_fn(run(1), device, **timing)["median_ms"]
                r["cublas_ms"] = T.time_fn(peer, device, **timing)["median_ms"]
                r["v1_vs_cublas"] = r["cublas_ms"] / r["v1_ms"]
                if ok:
                    r["v2_ms"] = T.time_fn(run(2), device, **timing)["median_ms"]
                    r["v2_vs_v1"] = r["v1_ms"] / r["v2_ms"]
                    r["v2_vs_cublas"] = r["cublas_ms"] / r["v2_ms"]
                    ab_rates(r, "v2", s, peak)
                    print(f"  {name}: v1 {r['v1_ms']:.3f} ms, v2 {r['v2_ms']:.3f} ms, cuBLAS "
                          f"{r['cublas_ms']:.3f} ms (v2 at {100 * r['v2_vs_cublas']:.1f}% of cuBLAS)",
                          flush=True)
                else:
                    print(f"  {name}: v2 failed its check -- not timed", flush=True)
                if checks[f"v3 {name}"]:  # wgmma (v2 where sm_90a is missing)
                    r["v3_ms"] = T.time_fn(run(3), device, **timing)["median_ms"]
                    r["v3_vs_cublas"] = r["cublas_ms"] / r["v3_ms"]
                    ab_rates(r, "v3", s, peak)
                    r["v3_variant"] = v3_variant("gemm")
                    print(f"  {name}: v3 {r['v3_ms']:.3f} ms ({100 * r['v3_vs_cublas']:.1f}% of cuBLAS; "
                          f"ran {r['v3_variant']})", flush=True)
                else:
                    print(f"  {name}: v3 failed its check -- not timed", flush=True)
                rows.append(r)
            del a, w, b
    finally:
        set_kernel(start)

    print()
    T.print_table(rows, AB_COLUMNS)
    path = T.write_results(Path(args.out) / f"{info['name']}-gemm-ab.json", dict(
        benchmark="gemm-ab",
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=info, matmul_peak_tflops=peak, sizes=sizes, dtype="bf16", timing=timing,
        checks=checks, columns=AB_COLUMNS, rows=rows,
        notes={"cublas": "torch.matmul(a, w.t()) / F.gelu(F.linear(a, w, b)) at bf16",
               "v1": "mma.sync, 128x128 (or 64x64) tiles, 3-stage cp.async",
               "v2": "mma.sync, 128x256 tiles, 8 warps of 64x64, 5-stage cp.async, "
                     "double-buffered fragments",
               "v3": "wgmma m64n256k16 (sm_90a; v2 elsewhere), 128x256 tiles, 2 warpgroups, "
                     "4 stages filled by TMA (cp.async with DSK_GEMM_TMA=0) in the 128B swizzle"},
        torch=torch.__version__, build=dk.build_info()))
    print(f"\nwrote {path}")
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--square", type=int, nargs="*", help="M = N = K sizes")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--grouped", type=int, nargs=4, metavar=("ROWS", "E", "N", "K"))
    ap.add_argument("--int8", type=int, nargs=3, metavar=("M", "N", "K"))
    ap.add_argument("--fp8", type=int, nargs=3, metavar=("M", "N", "K"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--ab", action="store_true",
                    help="only bf16 4096^3 / 8192^3: our CUDA kernels v1 vs v2 vs cuBLAS")
    args = ap.parse_args(argv)
    if args.ab:
        if args.device != "cuda":
            print("error: --ab compares CUDA kernels: use --device cuda", file=sys.stderr)
            return 2
        import deepseek_kernels  # noqa: F401  (registers the ops)
        if not hasattr(torch.ops.deepseek_kernels, "_gemm_cuda_kernel"):
            print("error: --ab needs a build with the _gemm_cuda_kernel op (rebuild)",
                  file=sys.stderr)
            return 2
        return main_ab(args)

    import deepseek_kernels as dk
    from deepseek_kernels import reference as ref
    from deepseek_kernels.ops import cuda_kernel_choice

    device = torch.device(args.device)
    cfg = dict(CONFIGS[device.type])
    for key in ("square", "dtype", "grouped", "int8", "fp8"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dtype = DTYPES[cfg["dtype"]]
    info = T.device_info(device)
    print(f"device : {info['name']} ({info['model']}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    peak = T.measure_matmul_tflops(device)
    print(f"peak   : torch matmul {peak:,.1f} TFLOP/s "
          f"({'bf16 8192^3' if device.type == 'cuda' else 'fp32 2048^3'})", flush=True)
    copy_bw = T.measure_copy_bandwidth(device)
    print(f"copy bw: {copy_bw:,.1f} GB/s (bytes read + written)", flush=True)
    timing = dict(warmup=2, reps=5, min_time_s=0.2) if device.type == "cpu" else dict(warmup=5, reps=20)

    torch.manual_seed(0)
    checks, rows = {}, []

    def row(op, shape, flops, ours, peer, peer2=None, nbytes=None):
        """One table row. ``nbytes``: the bytes the op must move at least (operands
        read once, output written once); gives ours_GB/s and floor_ms, the roofline
        time max(flops / matmul peak, nbytes / copy bandwidth), and x_of_floor."""
        r = {"op": op, "shape": shape,
             "dtype": op.split()[0] if op.split()[0] in ("int8", "fp8") else cfg["dtype"]}
        r["ours_ms"] = T.time_fn(ours, device, **timing)["median_ms"]
        r["peer_ms"] = T.time_fn(peer, device, **timing)["median_ms"]
        r["x_vs_peer"] = r["peer_ms"] / r["ours_ms"]
        r["ours_TFLOP/s"] = flops / (r["ours_ms"] * 1e-3) / 1e12
        r["%matmul_peak"] = 100.0 * r["ours_TFLOP/s"] / peak
        if nbytes is not None:
            r["ours_GB/s"] = nbytes / (r["ours_ms"] * 1e-3) / 1e9
            r["floor_ms"] = max(flops / (peak * 1e12), nbytes / (copy_bw * 1e9)) * 1e3
            r["x_of_floor"] = r["floor_ms"] / r["ours_ms"]
        if peer2 is not None:
            r["peer2_ms"] = T.time_fn(peer2, device, **timing)["median_ms"]
            r["x_vs_peer2"] = r["peer2_ms"] / r["ours_ms"]
        rows.append(r)
        print(f"  {op} {shape}: ours {r['ours_ms']:.3f} ms, peer {r['peer_ms']:.3f} ms", flush=True)

    def fp8_tensor_core_rows(op, shape, flops, call, exact, peer, peer2):
        """Rows for the opt-in FP8 tensor-core kernels (v2 mma.sync, v3 wgmma): each is
        checked against `exact` (the exact kernel's result of `call`) first, and timed
        only when it passes."""
        for v in (2, 3):
            with cuda_kernel_choice("_fp8_cuda_kernel", v):
                tc = call()
                drift = ((tc.double() - exact.double()).norm() / exact.double().norm()).item()
                name = f"{op.replace(' ', '_')}_v{v}_close_to_v1"
                checks[name] = drift < 1e-3
                print(f"check  : {op} v{v} (tensor cores) vs v1 relative difference {drift:.3g} "
                      f"-> {checks[name]}", flush=True)
                del tc
                if checks[name]:
                    row(f"{op} v{v}", shape, flops, call, peer, peer2)
                    if v == 3:
                        rows[-1]["v3_variant"] = v3_variant("fp8_gemm")

    for s in cfg["square"]:
        a = torch.randn(s, s, device=device).to(dtype)
        w = (torch.randn(s, s, device=device) * s ** -0.5).to(dtype)
        b = torch.randn(s, device=device).to(dtype)
        want = ref.gemm(a, w, b, activation="gelu", out_dtype=torch.float64)
        _check(f"gemm+bias+gelu {s}^3", dk.gemm(a, w, b, activation="gelu"), F.gelu(F.linear(a, w, b)),
               want, checks)
        del want
        flops = 2.0 * s ** 3
        row("gemm", f"{s}^3", flops, lambda: dk.gemm(a, w), lambda: torch.matmul(a, w.t()))
        row("gemm+bias+gelu", f"{s}^3", flops, lambda: dk.gemm(a, w, b, activation="gelu"),
            lambda: F.gelu(F.linear(a, w, b)))
        del a, w, b

    rows_g, e, n, k = cfg["grouped"]
    x = torch.randn(rows_g, k, device=device).to(dtype)
    weights = (torch.randn(e, n, k, device=device) * k ** -0.5).to(dtype)
    offsets = _balanced_offsets(rows_g, e, device)
    bounds = offsets.tolist()

    def loop():
        return torch.cat([x[bounds[i]:bounds[i + 1]] @ weights[i].t() for i in range(e)])

    _check("grouped", dk.grouped_gemm(x, weights, offsets), loop(), ref.grouped_gemm(x, weights, offsets, out_dtype=torch.float64),
           checks)
    w0 = weights[0]
    # Unlike the one-GEMM peer (one [N, K] weight), the grouped GEMM reads E weights:
    # at DeepSeek-V3's shape 7.5 GB of bf16, a bandwidth floor near the peer's time.
    grouped_bytes = (e * n * k + rows_g * k + rows_g * n) * x.element_size()
    print(f"note   : grouped moves >= {grouped_bytes / 1e9:.3g} GB (E weights, x, out): "
          f"{grouped_bytes / (copy_bw * 1e9) * 1e3:.3g} ms at the copy bandwidth", flush=True)
    row("grouped", f"S={rows_g} E={e} N={n} K={k}", 2.0 * rows_g * n * k,
        lambda: dk.grouped_gemm(x, weights, offsets), lambda: torch.matmul(x, w0.t()), loop,
        nbytes=grouped_bytes)
    if device.type == "cuda":
        # The grouped GEMM through the forced v2 (mma.sync 128x256) and v3 (wgmma)
        # kernels (auto, the row above, runs v3 here where it can).
        for v in (2, 3):
            with cuda_kernel_choice("_gemm_cuda_kernel", v):
                _check(f"grouped v{v}", dk.grouped_gemm(x, weights, offsets), loop(),
                       ref.grouped_gemm(x, weights, offsets, out_dtype=torch.float64), checks)
                if checks[f"grouped v{v}"]:
                    row(f"grouped v{v}", f"S={rows_g} E={e} N={n} K={k}", 2.0 * rows_g * n * k,
                        lambda: dk.grouped_gemm(x, weights, offsets), lambda: torch.matmul(x, w0.t()), loop,
                        nbytes=grouped_bytes)
                    if v == 3 and int(torch.ops.deepseek_kernels._cuda_kernel_ran("gemm")) == 3:
                        rows[-1]["v3_variant"] = v3_variant("gemm")

    # The "fp8" and "fp8 grouped" rows time the exact SIMT kernel (v1, bitwise the CPU),
    # the reference the tensor-core rows (v2, v3: the CUDA default) are checked against.
    fp8_default = torch.ops.deepseek_kernels._fp8_cuda_kernel(1)

    # FP8 grouped: the same problem in e4m3 (1x128 activation blocks, 128x128 per expert).
    qx, sx = dk.quantize_fp8(x, (1, 128))
    qweights, sweights = dk.quantize_fp8(weights, (128, 128))  # each expert's on its own
    out = dk.fp8_grouped_gemm(qx, sx, qweights, sweights, offsets)
    probe = [i for i in range(e) if bounds[i + 1] > bounds[i]][:2]  # per-group contract, two groups
    checks["fp8_grouped_equals_fp8_gemm_per_group"] = all(bool(torch.equal(
        out[bounds[i]:bounds[i + 1]],
        dk.fp8_gemm(qx[bounds[i]:bounds[i + 1]], sx[bounds[i]:bounds[i + 1]], qweights[i], sweights[i])))
        for i in probe)
    i = probe[0]
    want = x[bounds[i]:bounds[i + 1]].double() @ weights[i].double().t()
    rel = ((out[bounds[i]:bounds[i + 1]].double() - want).norm() / want.norm()).item()
    checks["fp8_grouped_rel_error_below_5e-2"] = rel < 5e-2
    print(f"check  : fp8 grouped: equals fp8_gemm per group -> "
          f"{checks['fp8_grouped_equals_fp8_gemm_per_group']}; relative error vs fp64 {rel:.3g}", flush=True)
    row("fp8 grouped", f"S={rows_g} E={e} N={n} K={k}", 2.0 * rows_g * n * k,
        lambda: dk.fp8_grouped_gemm(qx, sx, qweights, sweights, offsets),
        lambda: dk.grouped_gemm(x, weights, offsets), lambda: torch.matmul(x, w0.t()))
    if device.type == "cuda":
        fp8_tensor_core_rows("fp8 grouped", f"S={rows_g} E={e} N={n} K={k}", 2.0 * rows_g * n * k,
                             lambda: dk.fp8_grouped_gemm(qx, sx, qweights, sweights, offsets), out,
                             lambda: dk.grouped_gemm(x, weights, offsets), lambda: torch.matmul(x, w0.t()))
    del x, weights, qx, qweights, out, want

    # The "int8" row times dp4a (v1); "int8 v2" the tensor cores (the CUDA default).
    int8_default = torch.ops.deepseek_kernels._int8_cuda_kernel(1)
    m, n, k = cfg["int8"]
    a = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) * 0.05
    qa, sa = dk.quantize_int8_rowwise(a)
    qw, sw = dk.quantize_int8_rowwise(w)
    out = dk.int8_gemm(qa, sa, qw, sw)
    checks["int8_bitwise_vs_reference"] = bool(torch.equal(out, ref.int8_gemm(qa, sa, qw, sw)))
    print(f"check  : int8 bitwise vs reference -> {checks['int8_bitwise_vs_reference']}")

    def int_mm_peer():
        acc = torch._int_mm(qa, qw.t())
        return ((acc.float() * sa[:, None]) * sw[None, :]).to(torch.bfloat16)

    try:
        has_int_mm = torch.equal(int_mm_peer(), out)
    except RuntimeError:  # torch._int_mm is not available for this device/shape
        has_int_mm = False
    abf, wbf = a.to(torch.bfloat16), w.to(torch.bfloat16)
    row("int8", f"{m}x{n}x{k}", 2.0 * m * n * k, lambda: dk.int8_gemm(qa, sa, qw, sw),
        int_mm_peer if has_int_mm else (lambda: torch.matmul(abf, wbf.t())),
        (lambda: torch.matmul(abf, wbf.t())) if has_int_mm else None)
    print("note   : int8 peer is torch._int_mm + scaling" if has_int_mm
          else "note   : torch._int_mm unavailable here; int8 peer is a bf16 matmul")
    if device.type == "cuda":
        # v2: INT8 tensor cores (the default), bitwise v1 when correct.
        with cuda_kernel_choice("_int8_cuda_kernel", 2):
            checks["int8_v2_bitwise_v1"] = bool(torch.equal(dk.int8_gemm(qa, sa, qw, sw), out))
            print(f"check  : int8 v2 (tensor cores) bitwise v1 -> {checks['int8_v2_bitwise_v1']}")
            if checks["int8_v2_bitwise_v1"]:
                row("int8 v2", f"{m}x{n}x{k}", 2.0 * m * n * k, lambda: dk.int8_gemm(qa, sa, qw, sw),
                    int_mm_peer if has_int_mm else (lambda: torch.matmul(abf, wbf.t())),
                    (lambda: torch.matmul(abf, wbf.t())) if has_int_mm else None)
    torch.ops.deepseek_kernels._int8_cuda_kernel(int8_default)

    del a, w, qa, qw, abf, wbf
    m, n, k = cfg["fp8"]
    a = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) * k ** -0.5
    qa, sa = dk.quantize_fp8(a, (1, 128))
    qw, sw = dk.quantize_fp8(w, (128, 128))
    out = dk.fp8_gemm(qa, sa, qw, sw)
    if m * n * k <= 2 ** 24:  # the reference loops over K in Python
        checks["fp8_bitwise_vs_reference"] = bool(torch.equal(out, ref.fp8_gemm(qa, sa, qw, sw)))
    want = a.double() @ w.double().t()
    rel = ((out.double() - want).norm() / want.norm()).item()
    checks["fp8_rel_error_below_5e-2"] = rel < 5e-2
    print(f"check  : fp8 relative error vs fp64 {rel:.3g}", flush=True)
    del want
    abf, wbf = a.to(torch.bfloat16), w.to(torch.bfloat16)
    # Peer: torch._scaled_mm with row-wise scales (cuBLASLt; coarser scaling than ours).
    qa_row = (a / (a.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
    qw_row = (w / (w.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
    sa_row = (a.abs().amax(1, keepdim=True) / 448).float()
    sw_row = (w.abs().amax(1, keepdim=True) / 448).float().t()

    def scaled_mm():
        return torch._scaled_mm(qa_row, qw_row.t(), scale_a=sa_row, scale_b=sw_row,
                                out_dtype=torch.bfloat16)

    try:
        scaled_mm()
        peer, peer2, note = scaled_mm, (lambda: torch.matmul(abf, wbf.t())), "torch._scaled_mm row-wise"
    except (RuntimeError, NotImplementedError):
        peer, peer2, note = (lambda: torch.matmul(abf, wbf.t())), None, "bf16 matmul (_scaled_mm unavailable)"
    row("fp8", f"{m}x{n}x{k}", 2.0 * m * n * k, lambda: dk.fp8_gemm(qa, sa, qw, sw), peer, peer2)
    print(f"note   : fp8 peer is {note}; peer2 a bf16 matmul; ours is the exact SIMT kernel (v1)")
    if device.type == "cuda":
        fp8_tensor_core_rows("fp8", f"{m}x{n}x{k}", 2.0 * m * n * k, lambda: dk.fp8_gemm(qa, sa, qw, sw), out,
                             peer, lambda: torch.matmul(abf, wbf.t()))
    torch.ops.deepseek_kernels._fp8_cuda_kernel(fp8_default)

    print()
    T.print_table(rows, COLUMNS)
    path = T.write_results(Path(args.out) / f"gemm-{info['name']}.json", dict(
        device=info, config=cfg, matmul_peak_tflops=peak, checks=checks, rows=rows,
        notes={"grouped": "peer = one matmul of the same total size; peer2 = per-expert loop",
               "fp8 grouped": "peer = our bf16 grouped_gemm, peer2 = one bf16 matmul of the same size",
               "int8": "peer = torch._int_mm + scaling when available (peer2 = bf16 matmul)",
               "fp8": "peer = torch._scaled_mm row-wise when available, peer2 = bf16 matmul; "
                      "ours = exact SIMT kernel (v1); 'fp8 v2'/'fp8 v3' = FP8 tensor cores "
                      "(v3: the CUDA default)",
               "int8 v2": "INT8 tensor cores (the CUDA default), bitwise the 'int8' row (dp4a)"},
        torch=torch.__version__, build=dk.build_info()))
    print(f"\nwrote {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
