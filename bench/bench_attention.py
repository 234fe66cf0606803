#!/usr/bin/env python
"""Benchmark cross-attention (forward and backward) against PyTorch SDPA.

    python bench/bench_attention.py                 # CUDA if available, else CPU
    python bench/bench_attention.py --device cuda   # B=8 Hq=16 Lq=1024 Lk=4096 bf16, D=128 and 64, varlen
    python bench/bench_attention.py --device cpu    # fp32 and bf16 B=2 H=8 D=64 Lq=256 Lk=1024
    python bench/bench_attention.py --ab            # CUDA fwd and bwd v1 vs v2 vs SDPA flash, ~30 s

Side by side in the same run: ours (deepseek_kernels.cross_attention /
cross_attention_varlen) and torch.nn.functional.scaled_dot_product_attention
(on CUDA the flash backend where it supports the case, else the efficient one;
on the CPU its default). Both are checked against each other before timing.
FLOPs: forward 4 * B * Hq * Lq * Lk * D, backward 2.5x that; varlen sums the
samples. The peer for varlen is SDPA on the batch padded to the longest sample.
Results go to ``bench/results/attention-<device_name>.json``.

--ab times our three CUDA forward kernel generations (v1, v2, the default, and
v3, wgmma on sm_90a, which falls back to v2 elsewhere: the row says which ran;
the private op ``_attention_cuda_kernel`` switches them between calls, the
environment variable DSK_ATTENTION_KERNEL picks the starting one) next to SDPA's
flash backend on the forward of B=8 Hq=16 Lq=1024 Lk=4096 bf16, D=128 and 64,
after checking each against SDPA; then the three backward generations (v1, the
default, v2 and v3, wgmma on sm_90a; ``_attention_cuda_bwd_kernel``,
DSK_ATTENTION_BWD_KERNEL) next to SDPA flash's backward. Results: ``<device_name>-attention-ab.json``.
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["case", "pass", "sdpa_backend", "ours_ms", "sdpa_ms", "x_vs_sdpa", "ours_TFLOP/s",
           "sdpa_TFLOP/s", "%matmul_peak"]

CASES = {
    "cuda": [
        dict(name="B8 H16 D128 Lq1024 Lk4096", B=8, Hq=16, Hkv=16, D=128, Lq=1024, Lk=4096, dtype="bf16"),
        dict(name="B8 H16 D64 Lq1024 Lk4096", B=8, Hq=16, Hkv=16, D=64, Lq=1024, Lk=4096, dtype="bf16"),
        dict(name="varlen B8 H16 D128 Lq<=1024 Lk<=4096", B=8, Hq=16, Hkv=16, D=128, Lq=1024,
             Lk=4096, dtype="bf16", varlen=True),
        # GQA: 4 query heads per K/V head (SDPA with enable_gqa)
        dict(name="GQA B8 Hq16 Hkv4 D128 Lq1024 Lk4096", B=8, Hq=16, Hkv=4, D=128, Lq=1024, Lk=4096,
             dtype="bf16"),
    ],
    "cpu": [
        dict(name="B2 H8 D64 Lq256 Lk1024 fp32", B=2, Hq=8, Hkv=8, D=64, Lq=256, Lk=1024, dtype="fp32"),
        dict(name="B2 H8 D64 Lq256 Lk1024 bf16", B=2, Hq=8, Hkv=8, D=64, Lq=256, Lk=1024, dtype="bf16"),
    ],
}


def _sdpa_backends(device):
    if device.type != "cuda":
        return [None]
    from torch.nn.attention import SDPBackend
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _sdpa(q, k, v, backend):
    """SDPA on [B, L, H, D] tensors (it wants [B, H, L, D]); GQA when K/V have fewer heads."""
    args = [t.transpose(1, 2) for t in (q, k, v)]
    gqa = {"enable_gqa": True} if k.shape[-2] != q.shape[-2] else {}
    if backend is None:
        return F.scaled_dot_product_attention(*args, **gqa).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(*args, **gqa).transpose(1, 2)


def _pick_backend(q, k, v, device):
    for backend in _sdpa_backends(device):
        try:
            _sdpa(q, k, v, backend)
            return backend
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend supports this case")


def run_case(case, device, timing, peak_tflops, dk):
    dtype = DTYPES[case["dtype"]]
    b, hq, hkv, d, lq, lk = (case[x] for x in ("B", "Hq", "Hkv", "D", "Lq", "Lk"))
    gen = torch.Generator().manual_seed(0)
    rows, checks = [], {}
    if case.get("varlen"):
        lens_q = torch.randint(lq // 4, lq + 1, (b,), generator=gen).tolist()
        lens_k = torch.randint(lk // 4, lk + 1, (b,), generator=gen).tolist()
        cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                     device=device)
        cq, ck = cu(lens_q), cu(lens_k)
        mq, mk = max(lens_q), max(lens_k)
        q = torch.randn(sum(lens_q), hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(sum(lens_k), hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(sum(lens_k), hkv, d, device=device, dtype=dtype, requires_grad=True)
        flops = sum(4.0 * hq * a * c * d for a, c in zip(lens_q, lens_k))
        ours_fwd = lambda: dk.cross_attention_varlen(q, k, v, cq, ck, mq, mk)  # noqa: E731
        # Peer: the padded batch (what one runs without varlen support).
        pq = torch.randn(b, mq, hq, d, device=device, dtype=dtype, requires_grad=True)
        pk = torch.randn(b, mk, hkv, d, device=device, dtype=dtype, requires_grad=True)
        pv = torch.randn(b, mk, hkv, d, device=device, dtype=dtype, requires_grad=True)
        peer_in = (pq, pk, pv)
        # Check: sample 0 of ours against SDPA on that sample alone.
        s0 = (q[:lens_q[0]][None], k[:lens_k[0]][None], v[:lens_k[0]][None])
        backend = _pick_backend(*s0, device)
        want = _sdpa(*s0, backend)[0]
        got = ours_fwd()[:lens_q[0]]
    else:
        q = torch.randn(b, lq, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, lk, hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, lk, hkv, d, device=device, dtype=dtype, requires_grad=True)
        flops = 4.0 * b * hq * lq * lk * d
        ours_fwd = lambda: dk.cross_attention(q, k, v)  # noqa: E731
        peer_in = (q, k, v)
        backend = _pick_backend(q, k, v, device)
        want = _sdpa(q, k, v, backend)
        got = ours_fwd()
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    checks[f"{case['name']}: forward close to SDPA"] = bool(
        torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))
    backend = _pick_backend(*peer_in, device)
    bname = str(backend).split(".")[-1] if backend is not None else "default"
    peer_fwd = lambda: _sdpa(*peer_in, backend)  # noqa: E731

    out, pout = ours_fwd(), peer_fwd()
    g, pg = torch.randn_like(out), torch.randn_like(pout)
    ours_bwd = lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)  # noqa: E731
    peer_bwd = lambda: torch.autograd.grad(pout, peer_in, pg, retain_graph=True)  # noqa: E731
    peer_flops = flops if not case.get("varlen") else 4.0 * b * hq * mq * mk * d
    passes = [("fwd", lambda: _no_grad(ours_fwd), lambda: _no_grad(peer_fwd), 1.0),
              ("bwd", ours_bwd, peer_bwd, 2.5)]
    for name, fo, fp, mult in passes:
        row = {"case": case["name"], "pass": name, "sdpa_backend": bname}
        row["ours_ms"] = T.time_fn(fo, device, **timing)["median_ms"]
        row["sdpa_ms"] = T.time_fn(fp, device, **timing)["median_ms"]
        row["x_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
        row["ours_TFLOP/s"] = mult * flops / (row["ours_ms"] * 1e-3) / 1e12
        row["sdpa_TFLOP/s"] = mult * peer_flops / (row["sdpa_ms"] * 1e-3) / 1e12
        row["%matmul_peak"] = 100.0 * row["ours_TFLOP/s"] / peak_tflops
        rows.append(row)
        print(f"  {case['name']} {name}: ours {row['ours_ms']:.3f} ms, sdpa {row['sdpa_ms']:.3f} ms",
              flush=True)
    return rows, checks


AB_CASES = [
    dict(name="B8 H16 D128 Lq1024 Lk4096", B=8, Hq=16, Hkv=16, D=128, Lq=1024, Lk=4096, dtype="bf16"),
    dict(name="B8 H16 D64 Lq1024 Lk4096", B=8, Hq=16, Hkv=16, D=64, Lq=1024, Lk=4096, dtype="bf16"),
]
AB_COLUMNS = ["case", "v1_ms", "v2_ms", "v3_ms", "sdpa_ms", "v2_vs_v1", "v1_vs_sdpa", "v2_vs_sdpa",
              "v3_vs_sdpa", "v2_TFLOP/s", "v3_TFLOP/s", "sdpa_TFLOP/s", "v2_%matmul_peak",
              "v3_%matmul_peak", "v3_ran"]


def set_kernel(version: int) -> int:
    """Select our CUDA forward kernel generation (1, 2 or 3; 0 only asks) for later
    calls; returns the previous one."""
    return int(torch.ops.deepseek_kernels._attention_cuda_kernel(version))


def run_ab_case(case, device, timing, peak_tflops, dk):
    """One --ab row: v1 and v2 checked against SDPA flash (and each other), then
    the three forwards timed back to back on the same inputs."""
    from torch.nn.attention import SDPBackend
    dtype = DTYPES[case["dtype"]]
    b, hq, hkv, d, lq, lk = (case[x] for x in ("B", "Hq", "Hkv", "D", "Lq", "Lk"))
    torch.manual_seed(0)
    q = torch.randn(b, lq, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, lk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, lk, hkv, d, device=device, dtype=dtype)
    flops = 4.0 * b * hq * lq * lk * d
    want = _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION).float()
    checks, outs = {}, {}
    for ver in (1, 2, 3):
        set_kernel(ver)
        outs[ver] = dk.cross_attention(q, k, v).float()
        checks[f"{case['name']}: v{ver} close to SDPA flash"] = bool(
            torch.allclose(outs[ver], want, atol=2e-2, rtol=2e-2))
    # v3 (wgmma) falls back to v2 where it cannot run: say which one was timed.
    v3_ran = int(torch.ops.deepseek_kernels._cuda_kernel_ran("attention_fwd"))
    checks[f"{case['name']}: v2 close to v1"] = bool(
        torch.allclose(outs[2], outs[1], atol=2e-2, rtol=2e-2))
    err = {ver: (outs[ver] - want).abs().max().item() for ver in (1, 2, 3)}
    del outs, want
    row = {"case": case["name"], "v3_ran": v3_ran}
    if not all(checks.values()):
        print(f"  {case['name']}: check failed ({checks}, max err vs SDPA {err}) -- not timed",
              flush=True)
        return row, checks
    for ver in (1, 2, 3):
        set_kernel(ver)
        row[f"v{ver}_ms"] = T.time_fn(lambda: dk.cross_attention(q, k, v), device, **timing)["median_ms"]
    row["sdpa_ms"] = T.time_fn(lambda: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), device,
                               **timing)["median_ms"]
    row["v2_vs_v1"] = row["v1_ms"] / row["v2_ms"]
    row["v1_vs_sdpa"] = row["sdpa_ms"] / row["v1_ms"]
    row["v2_vs_sdpa"] = row["sdpa_ms"] / row["v2_ms"]
    row["v3_vs_sdpa"] = row["sdpa_ms"] / row["v3_ms"]
    for who in ("v1", "v2", "v3", "sdpa"):
        row[f"{who}_TFLOP/s"] = flops / (row[f"{who}_ms"] * 1e-3) / 1e12
    row["v2_%matmul_peak"] = 100.0 * row["v2_TFLOP/s"] / peak_tflops
    row["v3_%matmul_peak"] = 100.0 * row["v3_TFLOP/s"] / peak_tflops
    row["max_err_vs_sdpa"] = err
    print(f"  {case['name']} fwd: v1 {row['v1_ms']:.3f} ms, v2 {row['v2_ms']:.3f} ms, "
          f"v3 {row['v3_ms']:.3f} ms (ran v{v3_ran}), sdpa flash {row['sdpa_ms']:.3f} ms "
          f"(v2 x{row['v2_vs_sdpa']:.2f}, v3 x{row['v3_vs_sdpa']:.2f} vs sdpa)", flush=True)
    return row, checks


AB_BWD_COLUMNS = ["case", "bwd_v1_ms", "bwd_v2_ms", "bwd_v3_ms", "sdpa_bwd_ms", "v1_vs_sdpa",
                  "v2_vs_sdpa", "v3_vs_sdpa", "v3_TFLOP/s", "sdpa_TFLOP/s", "v3_ran"]
BWD_VERSIONS = (1, 2, 3)


def set_bwd_kernel(version: int) -> int:
    """The same for the backward kernel generation (private op _attention_cuda_bwd_kernel)."""
    return int(torch.ops.deepseek_kernels._attention_cuda_bwd_kernel(version))


def run_ab_bwd_case(case, device, timing, dk):
    """One backward --ab row: the gradients of v1, v2 and v3 (wgmma; where it
    cannot run the next older one does: v3_ran says which) checked against SDPA
    flash's, then the four backwards timed on the same forward outputs."""
    from torch.nn.attention import SDPBackend
    dtype = DTYPES[case["dtype"]]
    b, hq, hkv, d, lq, lk = (case[x] for x in ("B", "Hq", "Hkv", "D", "Lq", "Lk"))
    torch.manual_seed(1)
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
               for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
    out = dk.cross_attention(q, k, v)
    pout = _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
    g = torch.randn_like(out)
    want = torch.autograd.grad(pout, (q, k, v), g, retain_graph=True)
    checks, grads, ran = {}, {}, {}
    for ver in BWD_VERSIONS:
        set_bwd_kernel(ver)
        grads[ver] = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
        ran[ver] = int(torch.ops.deepseek_kernels._cuda_kernel_ran("attention_bwd"))
        # Relative to each gradient's scale: bf16 gradients summed over 4096 keys.
        ok = all(torch.allclose(a.float(), w.float(), atol=5e-2 * w.float().abs().max().item(),
                                rtol=5e-2) for a, w in zip(grads[ver], want))
        checks[f"{case['name']}: bwd v{ver} close to SDPA flash"] = bool(ok)
    del grads, want
    row = {"case": case["name"], "v3_ran": ran[3]}
    if not all(checks.values()):
        print(f"  {case['name']}: backward check failed ({checks}) -- not timed", flush=True)
        return row, checks
    for ver in BWD_VERSIONS:
        set_bwd_kernel(ver)
        row[f"bwd_v{ver}_ms"] = T.time_fn(
            lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), device,
            **timing)["median_ms"]
    row["sdpa_bwd_ms"] = T.time_fn(
        lambda: torch.autograd.grad(pout, (q, k, v), g, retain_graph=True), device,
        **timing)["median_ms"]
    flops = 2.5 * 4.0 * b * hq * lq * lk * d
    for ver in BWD_VERSIONS:
        row[f"v{ver}_vs_sdpa"] = row["sdpa_bwd_ms"] / row[f"bwd_v{ver}_ms"]
        row[f"v{ver}_TFLOP/s"] = flops / (row[f"bwd_v{ver}_ms"] * 1e-3) / 1e12
    row["sdpa_TFLOP/s"] = flops / (row["sdpa_bwd_ms"] * 1e-3) / 1e12
    print(f"  {case['name']} bwd: v1 {row['bwd_v1_ms']:.3f} ms, v2 {row['bwd_v2_ms']:.3f} ms, "
          f"v3 {row['bwd_v3_ms']:.3f} ms (ran v{ran[3]}), sdpa flash {row['sdpa_bwd_ms']:.3f} ms "
          f"(v3 x{row['v3_vs_sdpa']:.2f} vs sdpa)", flush=True)
    return row, checks


def main_ab(args, dk, info) -> int:
    if not torch.cuda.is_available() or args.device != "cuda":
        print("error: --ab compares CUDA kernels: needs --device cuda", file=sys.stderr)
        return 2
    if not hasattr(torch.ops.deepseek_kernels, "_attention_cuda_bwd_kernel"):
        print("error: --ab needs a build with the _attention_cuda_bwd_kernel op (rebuild)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    peak = T.measure_matmul_tflops(device)
    print(f"matmul : {peak:,.1f} TFLOP/s (bf16 8192^3)", flush=True)
    timing = dict(warmup=5, reps=30)
    start, start_bwd = set_kernel(0), set_bwd_kernel(0)
    rows, bwd_rows, checks = [], [], {}
    try:
        for case in AB_CASES:
            r, c = run_ab_case(case, device, timing, peak, dk)
            rows.append(r)
            checks.update(c)
            r, c = run_ab_bwd_case(case, device, timing, dk)
            bwd_rows.append(r)
            checks.update(c)
    finally:
        set_kernel(start)
        set_bwd_kernel(start_bwd)
    print("checks :", checks)
    print()
    T.print_table(rows, AB_COLUMNS)
    print()
    T.print_table(bwd_rows, AB_BWD_COLUMNS)
    path = T.write_results(Path(args.out) / f"{info['name']}-attention-ab.json", dict(
        benchmark="attention-ab", device=info, matmul_tflops=peak, checks=checks, rows=rows,
        bwd_rows=bwd_rows, cases=AB_CASES, timing=timing, torch=torch.__version__,
        build=dk.build_info()))
    print(f"\nwrote {path}")
    return 0 if all(checks.values()) else 1


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    ap.add_argument("--ab", action="store_true",
                    help="CUDA forward and backward: our kernels v1 vs v2 vs SDPA flash (D=128, 64)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import deepseek_kernels as dk

    device = torch.device(args.device)
    cases = CASES[device.type]
    if args.quick:
        cases = [dict(cases[0], name="quick", B=1, Hq=2, Hkv=2, Lq=33, Lk=70)]
    info = T.device_info(device)
    print(f"device : {info['name']} ({info['model']}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if args.ab:
        return main_ab(args, dk, info)
    peak = T.measure_matmul_tflops(device)
    print(f"matmul : {peak:,.1f} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32 2048^3'})",
          flush=True)
    timing = dict(warmup=3, reps=10) if device.type == "cpu" else dict(warmup=5, reps=30)
    rows, checks = [], {}
    for case in cases:
        r, c = run_case(case, device, timing, peak, dk)
        rows += r
        checks.update(c)
    print("checks :", checks)
    print()
    T.print_table(rows, COLUMNS)
    path = T.write_results(Path(args.out) / f"attention-{info['name']}.json", dict(
        device=info, matmul_tflops=peak, checks=checks, rows=rows, cases=cases,
        torch=torch.__version__, build=dk.build_info()))
    print(f"\nwrote {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
