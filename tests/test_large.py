"""Sizes past 2^31 elements: the kernels' index arithmetic must be 64-bit.

Each test needs about 9-13 GB of memory and tens of seconds, so they are opt-in:
``DSK_LARGE_TESTS=1 python -m pytest tests/test_large.py`` (CPU; the CUDA cases
also need that much free GPU memory). Each checks the last rows/blocks, the ones
whose element offsets do not fit in int32, against the reference computed on just
those rows.
"""

import gc
import os

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels import reference as ref

from .conftest import DEVICES, HAS_CUDA

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(os.environ.get("DSK_LARGE_TESTS") != "1",
                       reason="needs ~13 GB and minutes: set DSK_LARGE_TESTS=1"),
]

BIG = 2 ** 31 + 4096  # elements: offsets of the last ones overflow int32


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tail_rows(rows, dtype, device, n):
    """A [rows, n] tensor whose last 8 rows hold random data (the rest ones): filling
    8.6 GB with randn would take longer than the test."""
    x = torch.ones(rows, n, dtype=dtype, device=device)
    x[-8:] = torch.randn(8, n, device=device).to(dtype)
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_dequantize_int8_past_2_31(device):
    block = 256
    n = BIG
    x = _tail_rows(n // block, torch.bfloat16, device, block).reshape(-1)
    q = dk.quantize_int8(x, block)
    tail = slice(n - 8 * block, n)  # whole blocks at the end
    want_q, want_scales, _ = ref.quantize_int8(x[tail], block)
    assert torch.equal(q.q[tail], want_q) and torch.equal(q.scales[-8:], want_scales)
    head_q, head_scales, _ = ref.quantize_int8(x[:block], block)
    assert torch.equal(q.q[:block], head_q) and torch.equal(q.scales[:1], head_scales)
    y = dk.dequantize_int8(q.q, q.scales, block, out_dtype=torch.bfloat16)
    assert torch.equal(y[tail], ref.dequantize_int8(want_q, want_scales, block, out_dtype=torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_moe_dispatch_combine_past_2_31(device):
    # T * H and E * C * H past 2^31: token t's row starts at t * H > 2^31 for the last tokens.
    t, h, e = 65536, 32800, 2
    x = _tail_rows(t, torch.bfloat16, device, h)
    ids = (torch.arange(t, device=device, dtype=torch.int32) % e)[:, None]
    slots = (torch.arange(t, device=device, dtype=torch.int32) // e)[:, None]
    weights = torch.rand(t, 1, device=device)
    cap = t // e
    d = dk.moe_dispatch(x, ids, slots, e, cap)
    assert d.shape == (e, cap, h)
    for tok in range(t - 8, t):
        assert torch.equal(d[tok % e, tok // e], x[tok])
    del x
    y = dk.moe_combine(d, ids, slots, weights)
    want = ref.moe_combine(d, ids[-8:], slots[-8:], weights[-8:])
    assert torch.equal(y[-8:], want)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_output_past_2_31(device):
    # M * N past 2^31: the epilogue's row * N offsets of the last rows.
    m, n, k = 65536, 32800, 8
    a = _tail_rows(m, torch.bfloat16, device, k)
    w = torch.randn(n, k, device=device).to(torch.bfloat16)
    b = torch.randn(n, device=device).to(torch.bfloat16)
    out = dk.gemm(a, w, b, activation="relu")
    assert out.shape == (m, n)
    want = dk.gemm(a[-8:], w, b, activation="relu")  # same kernel, small offsets
    assert torch.equal(out[-8:], want)
    ref_out = ref.gemm(a[-8:], w, b, activation="relu", out_dtype=torch.float64)
    assert (out[-8:].double() - ref_out).abs().max() <= 2 ** -7 * ref_out.abs().max() + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_past_2_31(device):
    # B * Lq * H * D past 2^31 with one key: softmax over one key is 1, out = v exactly.
    lq, hq, d = 2 ** 21 + 8, 16, 64
    q = torch.ones(1, lq, hq, d, dtype=torch.bfloat16, device=device)
    q[:, -8:] = torch.randn(1, 8, hq, d, device=device).to(torch.bfloat16)
    k = torch.randn(1, 1, hq, d, device=device).to(torch.bfloat16)
    v = torch.randn(1, 1, hq, d, device=device).to(torch.bfloat16)
    out = dk.cross_attention(q, k, v)
    assert out.shape == q.shape
    assert torch.equal(out[0, -8:], v[0, 0].expand(8, hq, d))
    assert torch.equal(out[0, :8], v[0, 0].expand(8, hq, d))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (the CPU kernels hold T * k choices in int64)")
def test_moe_gating_probability_past_2_31_cuda():
    # T * k past 2^31 with drop_policy="probability": the CUDA kernels' choice order
    # (t * k + j) and expert offsets (up to T * k) are int64. ~67 GB of GPU memory.
    free, _ = torch.cuda.mem_get_info()
    if free < 70 * 2 ** 30:
        pytest.skip(f"needs ~70 GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    e = k = 16
    t = 2 ** 27 + 64  # t * k = 2^31 + 1024
    # All-equal logits (but the last rows): with k = E every token chooses every
    # expert, so each expert's count is T and a token's rank (= slot) is its index;
    # capacity T keeps them all (no quadratic drop pass).
    logits = _tail_rows(t, torch.bfloat16, "cuda", e)
    out = dk.moe_topk_gating(logits, k, capacity=t, drop_policy="probability")
    _, ids, slots, expert_counts, routed_counts, _ = out
    torch.cuda.synchronize()
    assert torch.equal(expert_counts.cpu(), torch.full((e,), t, dtype=torch.int32))
    assert torch.equal(routed_counts.cpu(), torch.full((e,), t, dtype=torch.int32))
    last = torch.arange(t - 8, t, dtype=torch.int32)[:, None].expand(8, k)
    assert torch.equal(slots[-8:].cpu(), last)
    assert torch.equal(slots[:8].cpu(), torch.arange(8, dtype=torch.int32)[:, None].expand(8, k))
    assert torch.equal(ids[-8:].sort(dim=1).values.cpu(), torch.arange(e, dtype=torch.int32).expand(8, e))
