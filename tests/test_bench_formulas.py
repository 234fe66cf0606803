"""Unit tests of the benchmarks' own arithmetic and peers (bench/): the numbers they
print go into README.md and docs/benchmarks.md, so a wrong formula or a peer that computes something else
would publish a wrong claim. CPU only, no timing."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_formulas", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_host_peers_compute_what_ours_computes():
    """Every host-cost peer returns ours' result (the dispatch peer used to place only
    each token's first choice, the combine peer to add dropped choices in)."""
    host = _load("bench_host")
    cases = host._cases(torch.device("cpu"))
    checked = 0
    for name, ours, _, _, peer_name, peer in cases:
        if peer is None:
            continue
        out = ours()
        out = out if isinstance(out, (tuple, list)) else (out,)
        assert host.peer_matches(out, peer()), (name, peer_name)
        checked += 1
    assert checked == 6
    # The check itself refuses a result that differs (here: one slot of the buffer lost).
    out = {c[0]: c for c in cases}["moe_dispatch"][1]().detach()
    wrong = out.clone()
    wrong[out.abs().sum(-1) > 0] = 0
    assert not host.peer_matches((out,), wrong)


def test_bench_gemm_ab_rates_name_their_kernel():
    """--ab's % of the matmul peak is per generation: the single "%matmul_peak" column
    held v2's (48% at 8192^3 in session 9) beside v3's 727 TFLOP/s (92%)."""
    gemm = _load("bench_gemm")
    row = {"v2_ms": 2.901, "v3_ms": 1.513}
    gemm.ab_rates(row, "v2", 8192, 787.93)
    gemm.ab_rates(row, "v3", 8192, 787.93)
    assert abs(row["v3_TFLOP/s"] - 2 * 8192 ** 3 / 1.513e-3 / 1e12) < 1e-9
    assert round(row["v2_%matmul_peak"], 1) == 48.1 and round(row["v3_%matmul_peak"], 1) == 92.2
    assert "%matmul_peak" not in gemm.AB_COLUMNS
    assert {"v2_%matmul_peak", "v3_%matmul_peak"} <= set(gemm.AB_COLUMNS)


def test_bench_attention_gqa_peer():
    """The attention bench's SDPA peer takes GQA cases (enable_gqa: K/V with fewer
    heads), and ours matches it on one."""
    import deepseek_kernels as dk

    att = _load("bench_attention")
    assert any(c["Hkv"] < c["Hq"] for c in att.CASES["cuda"])
    case = dict(name="GQA quick", B=1, Hq=4, Hkv=1, D=32, Lq=33, Lk=70, dtype="fp32")
    rows, checks = att.run_case(case, torch.device("cpu"), dict(warmup=1, reps=2, min_time_s=0.0), 100.0, dk)
    assert checks == {"GQA quick: forward close to SDPA": True}
    assert [r["pass"] for r in rows] == ["fwd", "bwd"]
