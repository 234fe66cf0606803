"""CPU results do not depend on the thread count.

The CPU kernels split work over threads (at::parallel_for), but each output is
computed the same way whichever thread computes it, so a run on 1, 2 or 3
threads (more threads than this CI machine's 2 cores is allowed, only slower)
gives the same bits. Shapes are large enough that every op's work really is
split. Attention has its own such test (test_attention.py).
"""

import contextlib

import pytest
import torch

import deepseek_kernels as dk


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_bits_on(thread_counts, fn):
    results = []
    for n in thread_counts:
        with _threads(n):
            out = fn()
        results.append(out if isinstance(out, (tuple, list)) else (out,))
    for n, got in zip(thread_counts[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], got)):
            assert torch.equal(a, b), f"output {i}: {thread_counts[0]} vs {n} threads differ"


THREADS = (1, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemms(dtype):
    a = torch.randn(1000, 136).to(dtype)
    w = torch.randn(520, 136).to(dtype)
    b = torch.randn(520).to(dtype)
    ws = torch.randn(5, 72, 136).to(dtype)
    offsets = torch.tensor([0, 301, 301, 650, 999, 1000], dtype=torch.int32)
    _same_bits_on(THREADS, lambda: (dk.gemm(a, w, b, activation="gelu"),
                                    dk.grouped_gemm(a, ws, offsets)))


def test_gemm_backward():
    a = torch.randn(700, 136, requires_grad=True)
    w = torch.randn(264, 136, requires_grad=True)
    ws = torch.randn(3, 40, 136, requires_grad=True)
    offsets = torch.tensor([0, 250, 250, 700], dtype=torch.int32)

    def run():
        y = dk.gemm(a, w, activation="silu").sum() + dk.grouped_gemm(a, ws, offsets).sum()
        return torch.autograd.grad(y, (a, w, ws))

    _same_bits_on(THREADS, run)


def test_int8_and_fp8():
    a, w = torch.randn(1000, 384), torch.randn(520, 384) * 0.05
    qa, sa = dk.quantize_int8_rowwise(a)
    qw, sw = dk.quantize_int8_rowwise(w)
    fa, fsa = dk.quantize_fp8(a)
    fw, fsw = dk.quantize_fp8(torch.randn(3, 256, 384), block=(128, 128))
    offsets = torch.tensor([0, 400, 400, 1000], dtype=torch.int32)
    _same_bits_on(THREADS, lambda: (dk.quantize_int8_rowwise(a)[0], dk.int8_gemm(qa, sa, qw, sw),
                                    dk.quantize_fp8(a)[1], dk.fp8_gemm(fa, fsa, fw[0], fsw[0]),
                                    dk.fp8_grouped_gemm(fa, fsa, fw, fsw, offsets)))


def test_blockwise_quantization():
    x = torch.randn(1 << 20) * torch.rand(1 << 20) ** 4
    rows = torch.randn(4, 300_001)

    def run():
        q8 = dk.quantize_int8(x, 128, stochastic=True, seed=7)
        q4 = dk.quantize_int4(x, 128)
        s8 = dk.quantize_int8(rows.reshape(-1), 128)
        return (*q8, *q4, dk.dequantize_int8(q8.q, q8.scales, 128, out_dtype=torch.bfloat16),
                dk.dequantize_int4(q4.q, q4.scales, x.numel(), 128),
                dk.dequantize_sum_int8(s8.q.reshape(4, -1), s8.scales.reshape(4, -1), 128))

    _same_bits_on(THREADS, run)


@pytest.mark.parametrize("capacity", [None, 700])
def test_moe_routing_forward_and_backward(capacity):
    t, e, k, h = 4097, 64, 6, 72
    logits = torch.randn(t, e, requires_grad=True)
    x = torch.randn(t, h, requires_grad=True)
    bias = torch.randn(e) * 0.1

    def run():
        g = dk.moe_topk_gating(logits, k, correction_bias=bias, n_group=8, topk_group=4,
                               capacity=capacity, drop_policy="probability")
        if capacity is None:
            packed, offsets = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts)
            y = dk.moe_unpermute(packed * 1.5, g.expert_ids, g.slots, offsets, g.weights)
        else:
            d = dk.moe_dispatch(x, g.expert_ids, g.slots, e, capacity)
            y = dk.moe_combine(d * 1.5, g.expert_ids, g.slots, g.weights)
        grads = torch.autograd.grad((y * y).sum() + g.mean_scores.sum(), (logits, x))
        return (*[v for v in g], y, *grads)

    _same_bits_on(THREADS, run)


def test_varlen_attention():
    lq, lk = [0, 1, 300, 77], [129, 5, 700, 0]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 64, requires_grad=True)
    kv = torch.randn(sum(lk), 2, 64, requires_grad=True)

    def run():
        out, lse = dk.cross_attention_varlen(q, kv, kv, cu(lq), cu(lk), max(lq), max(lk), causal=True,
                                             return_lse=True)
        return (out, lse, *torch.autograd.grad(out.sum(), (q, kv)))

    _same_bits_on(THREADS, run)
