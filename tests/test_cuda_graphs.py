"""Every CUDA op captured in a CUDA graph and replayed on new data.

A graph holds what the op enqueued at capture: a host sync there fails the
capture, and anything the op computed on the host from the data (a size, an
offset) would be stale on replay. So each case captures one call, writes new
values into the same input buffers, replays, and demands the bits of an eager
call on the new values (every op here is deterministic).
"""

import pytest
import torch

import deepseek_kernels as dk
from .conftest import kernel_choice, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

OPS = torch.ops.deepseek_kernels


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _replay_matches_eager(fn, refill):
    """Capture fn() in a graph, refill() the inputs in place, replay: the graph's
    outputs must equal an eager fn() on the refilled inputs, bit for bit."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, smem limits)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _flat(fn())
    refill()
    graph.replay()
    want = _flat(fn())
    torch.cuda.synchronize()
    assert len(captured) == len(want)
    for i, (got, exp) in enumerate(zip(captured, want)):
        assert got.shape == exp.shape and got.dtype == exp.dtype, i
        torch.testing.assert_close(got, exp, rtol=0, atol=0, equal_nan=True, msg=f"output {i}")


def _refill(*tensors, scale=1.0):
    def run():
        for t in tensors:
            t.copy_(torch.randn(t.shape, device=t.device) * scale)
    return run


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quant(bits, stochastic):
    torch.manual_seed(0)
    x = torch.randn(4097, device="cuda")
    quant = dk.quantize_int8 if bits == 8 else dk.quantize_int4
    # An explicit seed: without one the op draws it on the host, which a graph
    # fixes at capture (every replay would round alike).
    seed = 7 if stochastic else None
    _replay_matches_eager(lambda: quant(x, 256, stochastic=stochastic, seed=seed), _refill(x))
    rows = torch.randn(3, 4097, device="cuda")

    def dequant():
        outs = [quant(r, 256, stochastic=stochastic, seed=seed) for r in rows]
        q = torch.stack([o.q for o in outs])
        s = torch.stack([o.scales for o in outs])
        if bits == 8:
            return dk.dequantize_int8(q[0], s[0], 256), dk.dequantize_sum_int8(q, s, 256)
        return dk.dequantize_int4(q[0], s[0], 4097, 256), dk.dequantize_sum_int4(q, s, 4097, 256)

    _replay_matches_eager(dequant, _refill(rows))


GATING_CASES = {
    "softmax-dropless": dict(k=8),
    "sigmoid-bias-groups-position": dict(k=8, scoring="sigmoid", n_group=8, topk_group=4,
                                         capacity=40, bias=True),
    "softmax-probability": dict(k=6, capacity=30, drop_policy="probability"),
}


@pytest.mark.parametrize("moe_kernel", [1, 2])
@pytest.mark.parametrize("case", list(GATING_CASES))
def test_moe(case, moe_kernel):
    torch.manual_seed(0)
    kw = dict(GATING_CASES[case])
    k = kw.pop("k")
    t, e, h = 300, 64, 136
    bias = torch.randn(e, device="cuda") * 0.1 if kw.pop("bias", False) else None
    logits = torch.randn(t, e, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    with kernel_choice("_moe_cuda_kernel", moe_kernel):
        _replay_matches_eager(lambda: dk.moe_topk_gating(logits, k, correction_bias=bias, **kw),
                              _refill(logits, bias) if bias is not None else _refill(logits))
        g = dk.moe_topk_gating(logits, k, correction_bias=bias, **kw)
    cap = kw.get("capacity") or t * k
    expert_out = torch.randn(e, cap, h, device="cuda", dtype=torch.bfloat16)
    _replay_matches_eager(lambda: dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap), _refill(x))
    _replay_matches_eager(lambda: dk.moe_combine(expert_out, g.expert_ids, g.slots, g.weights),
                          _refill(expert_out))
    if kw.get("capacity") is None:
        # Dropless with a static row count: no host read of the packed size.
        def permute_unpermute():
            packed, offsets = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, num_rows=t * k)
            return packed, offsets, dk.moe_unpermute(packed, g.expert_ids, g.slots, offsets, g.weights)

        _replay_matches_eager(permute_unpermute, _refill(x))


@pytest.mark.parametrize("gemm_kernel", [1, 2, 3])
def test_gemm(gemm_kernel):
    torch.manual_seed(0)
    m, n, k, groups = 1000, 264, 136, 5
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    ws = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 100, 100, 437, 900, m], device="cuda", dtype=torch.int32)
    with kernel_choice("_gemm_cuda_kernel", gemm_kernel):
        _replay_matches_eager(lambda: dk.gemm(a, w, bias, activation="gelu"), _refill(a, w, bias))
        _replay_matches_eager(lambda: dk.grouped_gemm(a, ws, offsets), _refill(a, ws))


@pytest.mark.parametrize("kernel", [1, 2])
def test_int8_and_fp8_gemm(kernel):
    torch.manual_seed(0)
    m, n, k = 300, 264, 512
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    def int8():
        qa, sa = dk.quantize_int8_rowwise(a)
        qw, sw = dk.quantize_int8_rowwise(w)
        return dk.int8_gemm(qa, sa, qw, sw)

    with kernel_choice("_int8_cuda_kernel", kernel):
        _replay_matches_eager(int8, _refill(a, w))
    if torch.cuda.get_device_capability() < (8, 9):
        return  # no e4m3 on this GPU
    ws = torch.randn(3, n, k, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 50, 50, m], device="cuda", dtype=torch.int64)

    def fp8():
        qa, sa = dk.quantize_fp8(a, (1, 128))
        qw, sw = dk.quantize_fp8(w, (128, 128))
        qws, sws = dk.quantize_fp8(ws, (128, 128))
        return dk.fp8_gemm(qa, sa, qw, sw), dk.fp8_grouped_gemm(qa, sa, qws, sws, offsets)

    with kernel_choice("_fp8_cuda_kernel", kernel):  # v2 falls back where e4m3 mma cannot run
        _replay_matches_eager(fp8, _refill(a, w, ws))


@pytest.mark.parametrize("fwd_kernel,bwd_kernel", [(1, 1), (2, 2), (3, 2), (3, 3)])
def test_attention(fwd_kernel, bwd_kernel):
    torch.manual_seed(0)
    b, lq, lk, hq, hkv, d = 2, 77, 300, 4, 2, 64
    q = torch.randn(b, lq, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, lk, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, lk, hkv, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    mask = torch.zeros(b, lk, dtype=torch.bool, device="cuda")
    mask[1, 250:] = True
    cu_q = torch.tensor([0, 30, 30, 77], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 1, 120, 300], device="cuda", dtype=torch.int32)

    def padded():
        out, lse = OPS.cross_attention(q, k, v, None, mask, True)
        return (out, lse, *OPS.cross_attention_backward(dout, q, k, v, out, lse, None, mask, True))

    def varlen():
        qv, kv, vv, dv = q[0], k[0], v[0], dout[0]
        out, lse = OPS.cross_attention_varlen(qv, kv, vv, cu_q, cu_k, 47, 181, None, False)
        return (out, lse, *OPS.cross_attention_varlen_backward(dv, qv, kv, vv, out, lse, cu_q, cu_k,
                                                                47, 181, None, False))

    with kernel_choice("_attention_cuda_kernel", fwd_kernel), \
            kernel_choice("_attention_cuda_bwd_kernel", bwd_kernel):
        _replay_matches_eager(padded, _refill(q, k, v, dout))
        _replay_matches_eager(varlen, _refill(q, k, v, dout))
