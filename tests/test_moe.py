"""MoE routing: top-k gating, capacity dispatch/combine, dropless permute/unpermute.

The reference (deepseek_kernels.reference) is checked against plain loops and
torch's own softmax/sigmoid; the kernels are checked bitwise against the
reference (the gating contract fixes every fp32 operation and its order).
"""

import functools
import math
import os
import subprocess
import sys

import pytest
import torch

from deepseek_kernels import reference as ref


# ---------------------------------------------------------------------------
# The reference's own contract
# ---------------------------------------------------------------------------


def _loop_gating(logits, k, scoring="softmax", bias=None, n_group=1, topk_group=1,
                 renormalize=True, scale=1.0, capacity=None, drop_policy="position"):
    """A plain-Python statement of the routing rules (on the reference's scores)."""
    t, e = logits.shape
    p = ref.moe_scores(logits, scoring)
    ids, ws = [], []
    for i in range(t):
        sel = [float(p[i, x]) + (float(bias[x]) if bias is not None else 0.0) for x in range(e)]
        if bias is not None:  # the fp32 sum, as the kernels add it
            sel = (p[i] + bias).tolist()
        gsize = e // n_group
        gscores = []
        for g in range(n_group):
            v = sorted(sel[g * gsize:(g + 1) * gsize], reverse=True)
            gscores.append(v[0] + v[1] if gsize >= 2 else v[0])
        if topk_group < n_group:
            groups = sorted(range(n_group), key=lambda g: (-gscores[g], g))[:topk_group]
        else:
            groups = list(range(n_group))
        cand = [x for g in groups for x in range(g * gsize, (g + 1) * gsize)]
        chosen = sorted(cand, key=lambda x: (-sel[x], x))[:k]
        ids.append(chosen)
    ids = torch.tensor(ids, dtype=torch.int64).view(t, k)
    # weights: same fp32 ops as the reference, checked separately
    flat = [(i, j, int(ids[i, j])) for i in range(t) for j in range(k)]
    w = ref.moe_topk_gating(logits, k, scoring=scoring, correction_bias=bias, n_group=n_group,
                            topk_group=topk_group, renormalize=renormalize,
                            routed_scaling_factor=scale)[0]
    keep = {}
    for ex in range(e):
        mine = [(i, j) for (i, j, x) in flat if x == ex]
        if capacity is None:
            kept = mine
        elif drop_policy == "position":
            kept = mine[:capacity]
        else:
            kept = sorted(sorted(mine, key=lambda c: (-float(w[c]), c[0]))[:capacity])
        for s, c in enumerate(kept):
            keep[c] = s
    slots = torch.tensor([[keep.get((i, j), -1) for j in range(k)] for i in range(t)]).view(t, k)
    return ids, slots


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cfg", [
    dict(k=2), dict(k=6, n_group=8, topk_group=3), dict(k=4, n_group=4, topk_group=4),
    dict(k=3, n_group=64, topk_group=5), dict(k=6, capacity=5),
    dict(k=6, capacity=3, drop_policy="probability"), dict(k=6, n_group=8, topk_group=4, capacity=0),
    dict(k=6, capacity=4, drop_policy="probability", n_group=4, topk_group=2),
])
def test_reference_matches_loops(scoring, cfg):
    cfg = dict(cfg)
    k = cfg.pop("k")
    logits = torch.randn(40, 64) * 2
    bias = torch.randn(64) * 0.1 if scoring == "sigmoid" else None
    out = ref.moe_topk_gating(logits, k, scoring=scoring, correction_bias=bias, **cfg)
    ids, slots = _loop_gating(logits, k, scoring, bias, **cfg)
    assert torch.equal(out[1].long(), ids)
    assert torch.equal(out[2].long(), slots)
    kept = slots >= 0
    assert torch.equal(out[3].long(), torch.bincount(ids[kept], minlength=64))
    assert torch.equal(out[4].long(), torch.bincount(ids.reshape(-1), minlength=64))


def test_reference_ties_go_to_lower_index():
    logits = torch.zeros(3, 16)
    logits[1, [3, 9, 12]] = 1.0
    out = ref.moe_topk_gating(logits, 4)
    assert out[1][0].tolist() == [0, 1, 2, 3]
    assert out[1][1].tolist() == [3, 9, 12, 0]
    # equal weights compete for capacity: the earlier token wins
    out = ref.moe_topk_gating(torch.zeros(5, 4), 1, capacity=2, drop_policy="probability")
    assert out[2][:, 0].tolist() == [0, 1, -1, -1, -1]


def test_reference_scores_close_to_torch():
    x = torch.randn(257, 300, dtype=torch.float32) * 8
    x[0, :] = -1000.0
    x[1, 5] = 80.0
    for scoring, exact in [("softmax", torch.softmax(x.double(), 1)), ("sigmoid", torch.sigmoid(x.double()))]:
        p = ref.moe_scores(x, scoring).double()
        assert torch.allclose(p, exact, rtol=1e-6, atol=1e-7), (p - exact).abs().max()
    xs = -torch.rand(1 << 16) * 87.0
    rel = (ref.moe_exp(xs).double() - torch.exp(xs.double())) / torch.exp(xs.double())
    assert rel.abs().max() < 4e-7


def test_reference_weights_and_mean_scores():
    logits = torch.randn(50, 32)
    w, ids, *_, mean = ref.moe_topk_gating(logits, 4, routed_scaling_factor=2.5)
    p = torch.softmax(logits.double(), 1)
    u = p.gather(1, ids.long())
    assert torch.allclose(w.double(), 2.5 * u / u.sum(1, keepdim=True), rtol=1e-5)
    assert torch.allclose(mean.double(), p.mean(0), rtol=1e-5)
    w2 = ref.moe_topk_gating(logits, 4, renormalize=False)[0]
    assert torch.allclose(w2.double(), u, rtol=1e-5)


# ---------------------------------------------------------------------------
# Kernels against the reference (bitwise)
# ---------------------------------------------------------------------------

import deepseek_kernels as dk  # noqa: E402
from tests.conftest import DEVICES, kernel_choice, requires_cuda  # noqa: E402

GATING_NAMES = ("weights", "expert_ids", "slots", "expert_counts", "routed_counts", "mean_scores")

GATING_CONFIGS = [
    dict(k=1),
    dict(k=6),
    dict(k=8, n_group=8, topk_group=4),
    dict(k=6, n_group=8, topk_group=3, renormalize=False, routed_scaling_factor=2.5),
    dict(k=6, capacity=9),
    dict(k=6, capacity=9, drop_policy="probability"),
    dict(k=8, n_group=8, topk_group=4, capacity=12, drop_policy="probability", routed_scaling_factor=2.5),
    dict(k=4, n_group=64, topk_group=6, capacity=3),
    dict(k=6, capacity=0),
    dict(k=6, capacity=0, drop_policy="probability"),
]


def _bits(t):
    t = t.cpu()
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def _assert_bitwise(ours, theirs, names=None):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        name = names[i] if names else i
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), (name, a, b)


def _logits(t, e, dtype, scale=2.0):
    x = torch.randn(t, e) * scale
    x[::7, ::5] = x[::7, :1].clone()  # exact ties inside rows
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", GATING_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_gating_matches_reference(device, scoring, dtype, cfg):
    cfg = dict(cfg)
    k = cfg.pop("k")
    e = 64
    logits = _logits(77, e, dtype)
    bias = (torch.randn(e) * 0.05) if scoring == "sigmoid" else None
    ours = dk.moe_topk_gating(logits.to(device), k, scoring=scoring,
                              correction_bias=None if bias is None else bias.to(device), **cfg)
    theirs = ref.moe_topk_gating(logits, k, scoring=scoring, correction_bias=bias, **cfg)
    _assert_bitwise(ours, theirs, GATING_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,e,k,ng,tg", [(0, 8, 2, 1, 1), (1, 1, 1, 1, 1), (300, 256, 8, 8, 4),
                                         (33, 1024, 16, 16, 5), (5, 1000, 16, 1, 1),
                                         (65, 96, 7, 3, 2), (17, 40, 5, 40, 40), (2500, 32, 4, 4, 2),
                                         # CUDA: more chunks than blocks (the grid-stride loop),
                                         # groups straddling lanes, more groups than lanes
                                         (9000, 64, 6, 4, 2), (40, 300, 6, 10, 3), (50, 512, 8, 128, 40)])
def test_gating_shapes(device, t, e, k, ng, tg):
    logits = _logits(t, e, torch.float32)
    for cap, pol in [(None, "position"), (t * k // e + 1, "position"), (t * k // e + 1, "probability")]:
        kw = dict(n_group=ng, topk_group=tg, capacity=cap, drop_policy=pol)
        ours = dk.moe_topk_gating(logits.to(device), k, **kw)
        theirs = ref.moe_topk_gating(logits, k, **kw)
        _assert_bitwise(ours, theirs, GATING_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_gating_deterministic(device):
    logits = _logits(2000, 256, torch.bfloat16).to(device)
    kw = dict(k=8, n_group=8, topk_group=4, capacity=70, drop_policy="probability")
    a = dk.moe_topk_gating(logits, **kw)
    b = dk.moe_topk_gating(logits, **kw)
    _assert_bitwise(a, b, GATING_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_nonfinite_rows_are_not_routed(device, scoring):
    logits = torch.randn(20, 16)
    logits[3, 5] = float("nan")
    logits[7, 0] = float("inf")
    logits[11, 2] = float("-inf")
    out = dk.moe_topk_gating(logits.to(device), 4, scoring=scoring, capacity=100)
    _assert_bitwise(out, ref.moe_topk_gating(logits, 4, scoring=scoring, capacity=100), GATING_NAMES)
    for r in (3, 7, 11):
        assert (out.expert_ids[r] == -1).all() and (out.slots[r] == -1).all()
        assert (out.weights[r] == 0).all()
    assert int(out.routed_counts.sum()) == 4 * 17
    assert torch.isfinite(out.mean_scores).all()
    # a non-finite bias routes nothing
    bias = torch.zeros(16)
    bias[1] = float("nan")
    out = dk.moe_topk_gating(logits.to(device), 4, correction_bias=bias.to(device))
    assert (out.expert_ids == -1).all() and int(out.expert_counts.sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_gating_fp64_cpu_close_to_reference(device):
    if device == "cuda":
        with pytest.raises(TypeError, match="float64"):
            dk.moe_topk_gating(torch.randn(4, 8, dtype=torch.float64, device="cuda"), 2)
        return
    logits = torch.randn(50, 32, dtype=torch.float64)
    ours = dk.moe_topk_gating(logits, 4, n_group=4, topk_group=2, capacity=7, drop_policy="probability")
    theirs = ref.moe_topk_gating(logits, 4, n_group=4, topk_group=2, capacity=7, drop_policy="probability")
    for i in (1, 2, 3, 4):
        assert torch.equal(ours[i], theirs[i])
    assert torch.allclose(ours.weights, theirs[0], rtol=1e-14)
    assert torch.allclose(ours.mean_scores, theirs[5], rtol=1e-14)


def _route(t, e, k, device, capacity=None, policy="position", dtype=torch.float32):
    logits = torch.randn(t, e)
    g = dk.moe_topk_gating(logits.to(device), k, capacity=capacity, drop_policy=policy)
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("h", [1, 8, 67, 256])
def test_dispatch_combine_matches_reference(device, dtype, h):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is CPU only")
    t, e, k, cap = 45, 16, 4, 9
    g = _route(t, e, k, device, capacity=cap)
    x = torch.randn(t, h).to(dtype)
    w = g.weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ids, slots = g.expert_ids.cpu(), g.slots.cpu()
    for wt in (None, w):
        d = dk.moe_dispatch(x.to(device), g.expert_ids, g.slots, e, cap,
                            None if wt is None else wt.to(device))
        dr = ref.moe_dispatch(x, ids, slots, e, cap, None if wt is None else wt.cpu())
        _assert_bitwise([d], [dr])
        eo = torch.randn(e, cap, h).to(dtype)
        c = dk.moe_combine(eo.to(device), g.expert_ids, g.slots, None if wt is None else wt.to(device))
        cr = ref.moe_combine(eo, ids, slots, None if wt is None else wt.cpu())
        _assert_bitwise([c], [cr])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dispatch_writes_every_row_once(device, dtype):
    """Hand-made choices: rows left unfilled between filled ones, a token with
    every choice dropped, out-of-range slots skipped on the GPU, and two choices
    naming one row (invalid input): the later choice wins, on both devices."""
    t, e, cap, h = 6, 4, 3, 24
    x = torch.randn(t, h).to(dtype)
    ids = torch.tensor([[0, 1], [2, 0], [3, 1], [0, 2], [1, 3], [2, 3]], dtype=torch.int32)
    slots = torch.tensor([[0, 2], [1, 2], [-1, -1], [2, 1], [0, 0], [1, 0]], dtype=torch.int32)
    # (3, 0) is named by tokens 4 and 5: token 5 (the later choice) wins.
    w = torch.rand(t, 2)
    for wt in (None, w):
        d = dk.moe_dispatch(x.to(device), ids.to(device), slots.to(device), e, cap,
                            None if wt is None else wt.to(device)).cpu()
        want = torch.zeros(e, cap, h, dtype=dtype)
        for tok in range(t):
            for j in range(2):
                if slots[tok, j] >= 0:
                    row = x[tok] if wt is None else (wt[tok, j] * x[tok].float()).to(dtype)
                    want[ids[tok, j], slots[tok, j]] = row
        _assert_bitwise([d], [want])
    if device == "cuda":  # out of range: skipped on the GPU (the CPU raises)
        bad = slots.clone()
        bad[0, 0] = cap
        d = dk.moe_dispatch(x.cuda(), ids.cuda(), bad.cuda(), e, cap).cpu()
        assert (d[0, 0] == 0).all() and torch.equal(d[1], dk.moe_dispatch(x, ids, slots, e, cap)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("h", [1, 8, 67, 256])
def test_permute_unpermute_matches_reference(device, dtype, h):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is CPU only")
    t, e, k = 45, 16, 4
    g = _route(t, e, k, device)
    x = torch.randn(t, h).to(dtype)
    ids, slots, counts = g.expert_ids.cpu(), g.slots.cpu(), g.expert_counts.cpu()
    packed, offsets = dk.moe_permute(x.to(device), g.expert_ids, g.slots, g.expert_counts)
    pr, orr = ref.moe_permute(x, ids, slots, counts)
    _assert_bitwise([packed, offsets], [pr, orr])
    assert packed.shape == (t * k, h)
    w = g.weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    y = dk.moe_unpermute(packed, g.expert_ids, g.slots, offsets, w)
    yr = ref.moe_unpermute(pr, ids, slots, orr, w.cpu())
    _assert_bitwise([y], [yr])
    # the weights renormalized to 1 -> unpermute(permute(x)) ~ x
    if dtype in (torch.float32, torch.float64):
        assert torch.allclose(y.cpu(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_permute_num_rows_has_no_sync_and_pads(device, dtype):
    """num_rows = T * k: the same packed rows as without it, zero rows after, the
    same offsets; gradients flow as through moe_permute; too small raises (CPU)."""
    t, e, k, h = 45, 16, 4, 24
    logits = torch.randn(t, e)
    logits[5, 3] = float("nan")  # a row that is not routed: sum(counts) < T * k
    g = dk.moe_topk_gating(logits.to(device), k)
    x = torch.randn(t, h).to(dtype).to(device)
    w = g.weights
    for wt in (None, w):
        packed, offsets = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, wt)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # a host sync raises
        try:
            p2, o2 = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, wt, num_rows=t * k)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        n = packed.shape[0]
        assert n == t * k - k and p2.shape == (t * k, h)
        _assert_bitwise([p2[:n], o2], [packed, offsets])
        assert (p2[n:] == 0).all()
    xg = x.float().detach().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    p2, o2 = dk.moe_permute(xg, g.expert_ids, g.slots, g.expert_counts, wg, num_rows=t * k)
    p2.square().sum().backward()
    xr = x.float().detach().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    pr, _ = dk.moe_permute(xr, g.expert_ids, g.slots, g.expert_counts, wr)
    pr.square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad) and torch.allclose(wg.grad, wr.grad)
    if device == "cpu":
        with pytest.raises(ValueError, match="num_rows"):
            dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, num_rows=3)
    # past int32 it is named (it failed in the allocator, or in moe_dispatch's
    # 'capacity' on the device-sized path)
    for big in (2**31, 2**62):
        with pytest.raises(ValueError, match=r"'num_rows' must be at most 2\^31 - 1"):
            dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, num_rows=big)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_all_dropped(device):
    g = dk.moe_topk_gating(torch.randn(0, 8, device=device), 2, capacity=3)
    assert g.weights.shape == (0, 2) and int(g.expert_counts.sum()) == 0
    assert (g.mean_scores == 0).all()
    x = torch.randn(0, 5, device=device)
    assert dk.moe_dispatch(x, g.expert_ids, g.slots, 8, 3).shape == (8, 3, 5)
    assert dk.moe_combine(torch.randn(8, 3, 5, device=device), g.expert_ids, g.slots, g.weights).shape == (0, 5)
    p, o = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts)
    assert p.shape == (0, 5) and o.tolist() == [0] * 9
    assert dk.moe_unpermute(p, g.expert_ids, g.slots, o, g.weights).shape == (0, 5)
    # capacity 0: everything dropped, combine gives zeros
    g = dk.moe_topk_gating(torch.randn(10, 8, device=device), 2, capacity=0)
    assert (g.slots == -1).all()
    y = dk.moe_combine(torch.randn(8, 0, 5, device=device), g.expert_ids, g.slots, g.weights)
    assert (y == 0).all()
    assert torch.equal(y.cpu(), ref.moe_combine(torch.randn(8, 0, 5), g.expert_ids.cpu(), g.slots.cpu(),
                                                g.weights.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,cap,h", [(10, 0, 5), (0, 3, 5), (6, 2, 0), (6, None, 0), (0, None, 4)])
def test_backward_of_empty_and_all_dropped(device, t, cap, h):
    """Gradients through dispatch/combine (capacity 0, T = 0, H = 0) and
    permute/unpermute: the right shapes, zero where nothing was routed."""
    e, k = 4, 2
    g = dk.moe_topk_gating(torch.randn(t, e, device=device), k, capacity=cap)
    x = torch.randn(t, h, device=device, requires_grad=True)
    w = g.weights.clone().requires_grad_()
    if cap is not None:
        eo = torch.randn(e, cap, h, device=device, requires_grad=True)
        outs = [dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap, w),
                dk.moe_combine(eo, g.expert_ids, g.slots, w)]
        inputs = (x, w, eo)
    else:
        packed, offsets = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, w)
        outs = [packed, dk.moe_unpermute(packed.detach().requires_grad_(), g.expert_ids, g.slots, offsets, w)]
        inputs = (x, w)
    loss = sum(o.sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for inp, gr in zip(inputs, grads):
        assert gr is None or gr.shape == inp.shape
    if cap == 0:
        assert all(gr is None or (gr == 0).all() for gr in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("h", [1, 33, 256])
def test_rows_dot_matches_reference(device, dtype, h):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is CPU only")
    t, e, k, cap = 45, 16, 4, 9
    g = _route(t, e, k, device, capacity=cap)
    rows = torch.randn(e * cap, h).to(dtype)
    other = torch.randn(t, h).to(dtype)
    base = torch.arange(e, dtype=torch.int64) * cap
    ours = torch.ops.deepseek_kernels.moe_rows_dot(rows.to(device), other.to(device), g.expert_ids,
                                                   g.slots, base.to(device), None, cap)
    theirs = ref.moe_rows_dot(rows, other, g.expert_ids.cpu(), g.slots.cpu(), base)
    _assert_bitwise([ours], [theirs])


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_gating_bad_input():
    x = torch.randn(10, 16)
    cases = [
        (dict(k=0), ValueError, "'k'"), (dict(k=17), ValueError, "'k'"),
        (dict(k=2, n_group=3), ValueError, "'n_group'"),
        (dict(k=2, n_group=4, topk_group=5), ValueError, "'topk_group'"),
        (dict(k=9, n_group=4, topk_group=2), ValueError, "'k'"),
        (dict(k=2, capacity=-1), ValueError, "'capacity'"),
        (dict(k=2, scoring="relu"), ValueError, "'scoring'"),
        (dict(k=2, drop_policy="random"), ValueError, "'drop_policy'"),
        (dict(k=2, correction_bias=torch.zeros(15)), ValueError, "'correction_bias'"),
        (dict(k=2, routed_scaling_factor=float("nan")), ValueError, "'routed_scaling_factor'"),
        (dict(k=2, routed_scaling_factor=-3.5e38), ValueError, "'routed_scaling_factor' must be finite in fp32"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            dk.moe_topk_gating(x, **kw)
    with pytest.raises(ValueError, match="'logits'"):
        dk.moe_topk_gating(torch.randn(10), 1)
    with pytest.raises(ValueError, match="'logits'"):
        dk.moe_topk_gating(torch.randn(2, 1025), 1)
    with pytest.raises(TypeError, match="'logits'"):
        dk.moe_topk_gating(torch.randn(2, 8).to(torch.int32), 1)
    # 2^31 tokens (an expanded view: no memory): counts and slots are int32.
    with pytest.raises(ValueError, match="'logits' must have at most 2\\^31 - 1 rows"):
        dk.moe_topk_gating(torch.zeros(1, 1).expand(2 ** 31, 1), 1)


def test_rows_bad_input():
    g = dk.moe_topk_gating(torch.randn(6, 8), 2, capacity=4)
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="'expert_ids'"):
        dk.moe_dispatch(x, g.expert_ids[:5], g.slots, 8, 4)
    with pytest.raises(ValueError, match="'slots'"):
        dk.moe_dispatch(x, g.expert_ids, g.slots[:, :1], 8, 4)
    with pytest.raises(TypeError, match="'expert_ids'"):
        dk.moe_dispatch(x, g.expert_ids.long(), g.slots, 8, 4)
    with pytest.raises(TypeError, match="'weights'"):
        dk.moe_combine(torch.randn(8, 4, 3), g.expert_ids, g.slots, g.weights.half())
    with pytest.raises(ValueError, match="'weights'"):
        dk.moe_combine(torch.randn(8, 4, 3), g.expert_ids, g.slots, g.weights[:, :1])
    with pytest.raises(ValueError, match="out-of-range"):
        dk.moe_dispatch(x, g.expert_ids, g.slots, 8, 1 if int(g.slots.max()) >= 1 else 0)
    with pytest.raises(ValueError, match="out-of-range"):
        dk.moe_combine(torch.randn(4, 4, 3), g.expert_ids, g.slots, g.weights)
    # -1 is the one 'dropped' value: below it is an error in every rows op (CPU)
    for name in ("expert_ids", "slots"):
        below = {"expert_ids": g.expert_ids.clone(), "slots": g.slots.clone()}
        below[name][2, 1] = -2
        ids_b, slots_b = below["expert_ids"], below["slots"]
        packed, offsets = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts)
        for call in (lambda: dk.moe_dispatch(x, ids_b, slots_b, 8, 4),
                     lambda: dk.moe_combine(torch.randn(8, 4, 3), ids_b, slots_b, g.weights),
                     lambda: dk.moe_permute(x, ids_b, slots_b, g.expert_counts),
                     lambda: dk.moe_unpermute(packed, ids_b, slots_b, offsets, g.weights)):
            with pytest.raises(ValueError, match=r"out-of-range choice at \[2, 1\].*below -1"):
                call()
    with pytest.raises(ValueError, match="'capacity'"):
        dk.moe_dispatch(x, g.expert_ids, g.slots, 8, -1)
    # past int32 (the ids' and slots' type) a size names its argument instead of
    # failing in the allocator ("can't allocate memory", "Storage size ... overflowed")
    for big in (2**31, 2**62):
        with pytest.raises(ValueError, match=r"'num_experts' must be at most 2147483647 \(expert ids are int32\)"):
            dk.moe_dispatch(x, g.expert_ids, g.slots, big, 4)
        with pytest.raises(ValueError, match=r"'capacity' must be at most 2147483647 \(slots are int32\)"):
            dk.moe_dispatch(x, g.expert_ids, g.slots, 8, big)
    wide = torch.zeros(6, 17, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 16 choices"):
        dk.moe_dispatch(x, wide, wide, 8, 4)
    with pytest.raises(ValueError, match="'offsets'"):
        dk.moe_unpermute(torch.randn(3, 3), g.expert_ids, g.slots, torch.tensor([0, 5], dtype=torch.int32))
    # offsets that decrease inside would read past `packed` (the CPU checks them)
    one, i32 = torch.zeros(1, 1, dtype=torch.int32), torch.int32
    with pytest.raises(ValueError, match="'offsets' must be non-decreasing"):
        dk.moe_unpermute(torch.randn(4, 4), one, torch.tensor([[2**30]], dtype=i32),
                         torch.tensor([0, 2**31 - 1, 4], dtype=i32))
    with pytest.raises(ValueError, match="'expert_counts' must be non-negative"):
        dk.moe_permute(torch.randn(3, 1), torch.zeros(3, 1, dtype=i32), torch.tensor([[0], [1], [2]], dtype=i32),
                       torch.tensor([3, -1], dtype=i32))
    # the private rows_dot: every expert's rows inside `rows`
    with pytest.raises(ValueError, match="'row_base'/'slot_limit'"):
        torch.ops.deepseek_kernels.moe_rows_dot(torch.randn(24, 4), torch.randn(6, 4), g.expert_ids, g.slots,
                                                torch.full((8,), 2**40), None, 3)
    with pytest.raises(ValueError, match="'row_base'/'slot_limit'"):
        torch.ops.deepseek_kernels.moe_rows_dot(torch.randn(24, 4), torch.randn(6, 4), g.expert_ids, g.slots,
                                                torch.arange(8) * 3, torch.full((8,), 2**31 - 1, dtype=i32), 3)


def test_rows_choice_just_out_of_range_raises():
    """The choices one past the valid range: a slot equal to its expert's
    capacity (count, offsets span, slot_limit), a slot of -2 (-1 is the only
    negative value), an expert id equal to the number of experts. Every rows op
    raises and names the choice, for the first, the last and a middle expert
    (the row e * C + C, or e * C - 2, lies inside the buffer or just past it)."""
    t, e, cap, h = 3, 4, 2, 5
    x = torch.randn(t, h)
    ids = torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32)
    good = torch.tensor([[0, 0], [0, 0], [1, 1]], dtype=torch.int32)
    counts = torch.tensor([2, 2, 1, 1], dtype=torch.int32)
    w = torch.rand(t, 2)
    packed, offsets = dk.moe_permute(x, ids, good, counts, w)
    base = offsets[:-1].long()
    for at in [(0, 0), (1, 0), (2, 0)]:  # experts 0, 3 (the last), 1
        for bad in ("slot_at_limit", "slot_-2", "expert_E"):
            ids_b, slots, lim = ids.clone(), good.clone(), good.clone()
            if bad == "slot_at_limit":
                slots[at], lim[at] = cap, int(counts[ids[at]])
            elif bad == "slot_-2":
                slots[at] = lim[at] = -2
            else:
                ids_b[at], slots[at], lim[at] = e, 0, 0
            msg = rf"out-of-range choice at \[{at[0]}, {at[1]}\]"
            for call in (lambda: dk.moe_dispatch(x, ids_b, slots, e, cap, w),
                         lambda: dk.moe_combine(torch.randn(e, cap, h), ids_b, slots, w),
                         lambda: dk.moe_permute(x, ids_b, lim, counts, w),
                         lambda: dk.moe_unpermute(packed, ids_b, lim, offsets, w),
                         lambda: torch.ops.deepseek_kernels.moe_rows_dot(packed, x, ids_b, lim, base, counts, 0)):
                with pytest.raises(ValueError, match=msg):
                    call()


@requires_cuda
@pytest.mark.cuda
def test_cuda_rows_past_the_source_are_skipped():
    """offsets (unpermute) and row_base (rows_dot) are read and checked on the CPU
    only: on the GPU a row they place past `packed` / `rows` is skipped, like any
    out-of-range choice there, instead of read past the tensor."""
    packed = torch.randn(4, 8, device="cuda")
    ids = torch.zeros(4, 1, dtype=torch.int32, device="cuda")
    slots = torch.arange(4, dtype=torch.int32, device="cuda")[:, None]
    ok = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    assert torch.equal(dk.moe_unpermute(packed, ids, slots, ok), packed)
    far = torch.tensor([0, 2**30], dtype=torch.int32, device="cuda")  # expert 0: rows 0..2^30-1
    past = slots.clone()
    past[2] = 2**29
    out = dk.moe_unpermute(packed, ids, past, far)
    torch.cuda.synchronize()
    want = packed.clone()
    want[2] = 0
    assert torch.equal(out, want)
    dot = torch.ops.deepseek_kernels.moe_rows_dot(packed, packed, ids, slots,
                                                  torch.tensor([2**40], device="cuda"), None, 4)
    torch.cuda.synchronize()
    assert torch.equal(dot, torch.zeros(4, 1, device="cuda"))


# ---------------------------------------------------------------------------
# Autograd, opcheck, torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gating_gradcheck(scoring, renormalize):
    # well separated logits: the routing is constant under gradcheck's perturbations
    logits = (torch.randperm(24).view(3, 8).double() * 0.37).requires_grad_()
    bias = torch.linspace(-0.01, 0.01, 8, dtype=torch.float64)

    def f(x):
        g = dk.moe_topk_gating(x, 3, scoring=scoring, correction_bias=bias, n_group=4, topk_group=2,
                               renormalize=renormalize, routed_scaling_factor=1.7, capacity=2,
                               drop_policy="probability")
        return g.weights, g.mean_scores

    assert torch.autograd.gradcheck(f, (logits,))


def test_gating_backward_matches_autograd_of_composition():
    logits = torch.randn(30, 16, requires_grad=True)
    g = dk.moe_topk_gating(logits, 4, routed_scaling_factor=2.0)
    gw, gm = torch.randn(30, 4), torch.randn(16)
    (g.weights * gw).sum().add((g.mean_scores * gm).sum()).backward()
    x = logits.detach().clone().requires_grad_()
    p = torch.softmax(x, 1)
    u = p.gather(1, g.expert_ids.long())
    w = 2.0 * u / u.sum(1, keepdim=True)
    ((w * gw).sum() + (p.mean(0) * gm).sum()).backward()
    assert torch.allclose(logits.grad, x.grad, rtol=1e-4, atol=1e-6)


def test_rows_gradcheck():
    t, e, k, h, cap = 7, 4, 2, 3, 3
    g = dk.moe_topk_gating(torch.randn(t, e, dtype=torch.float64), k, capacity=cap)
    ids, slots = g.expert_ids, g.slots
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    w = g.weights.clone().requires_grad_()
    eo = torch.randn(e, cap, h, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: dk.moe_dispatch(x, ids, slots, e, cap, w), (x, w))
    assert torch.autograd.gradcheck(lambda x: dk.moe_dispatch(x, ids, slots, e, cap), (x,))
    assert torch.autograd.gradcheck(lambda eo, w: dk.moe_combine(eo, ids, slots, w), (eo, w))
    gd = dk.moe_topk_gating(torch.randn(t, e, dtype=torch.float64), k)
    n = int(gd.expert_counts.sum())
    packed = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    _, offsets = dk.moe_permute(x.detach(), gd.expert_ids, gd.slots, gd.expert_counts)
    assert torch.autograd.gradcheck(
        lambda x, w: dk.moe_permute(x, gd.expert_ids, gd.slots, gd.expert_counts, w)[0], (x, w))
    assert torch.autograd.gradcheck(
        lambda pk, w: dk.moe_unpermute(pk, gd.expert_ids, gd.slots, offsets, w), (packed, w))


def test_permute_unpermute_gradcheck_with_dropped_choices():
    """Capacity routing through permute/unpermute: a dropped choice (slot -1 with a
    valid expert id) and an unrouted token (id -1) own no packed row, so they add
    nothing to the output and must send no gradient to any packed row."""
    t, e, k, h, cap = 9, 4, 2, 3, 2
    logits = torch.randn(t, e, dtype=torch.float64)
    logits[4, 1] = float("nan")  # never routed
    g = dk.moe_topk_gating(logits, k, capacity=cap)
    assert ((g.slots < 0) & (g.expert_ids >= 0)).any() and (g.expert_ids[4] < 0).all()
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    w = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    packed = torch.randn(int(g.expert_counts.sum()), h, dtype=torch.float64, requires_grad=True)
    _, offsets = dk.moe_permute(x.detach(), g.expert_ids, g.slots, g.expert_counts)
    assert torch.autograd.gradcheck(
        lambda x, w: dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts, w)[0], (x, w))
    assert torch.autograd.gradcheck(
        lambda pk, w: dk.moe_unpermute(pk, g.expert_ids, g.slots, offsets, w), (packed, w))
    assert torch.autograd.gradcheck(
        lambda pk: dk.moe_unpermute(pk, g.expert_ids, g.slots, offsets), (packed,))


def test_end_to_end_gradcheck_through_gating():
    t, e, k, h, cap = 5, 4, 2, 3, 4
    logits = (torch.randperm(t * e).view(t, e).double() * 0.41).requires_grad_()
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(e, h, h, dtype=torch.float64)

    def f(logits, x):
        g = dk.moe_topk_gating(logits, k, capacity=cap)
        d = dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap)
        return dk.moe_combine(torch.bmm(d, proj), g.expert_ids, g.slots, g.weights)

    assert torch.autograd.gradcheck(f, (logits, x))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.deepseek_kernels
    logits = torch.randn(20, 16, device=device)
    for kw in (dict(), dict(capacity=5, drop_policy="probability", n_group=4, topk_group=2)):
        torch.library.opcheck(ops.moe_topk_gating.default, (logits.clone().requires_grad_(), 4), kw)
    g = dk.moe_topk_gating(logits, 4, capacity=6)
    x = torch.randn(20, 8, device=device, requires_grad=True)
    w = g.weights.clone().requires_grad_()
    torch.library.opcheck(ops.moe_dispatch.default, (x, g.expert_ids, g.slots, 16, 6, w))
    eo = torch.randn(16, 6, 8, device=device, requires_grad=True)
    torch.library.opcheck(ops.moe_combine.default, (eo, g.expert_ids, g.slots, w))
    gd = dk.moe_topk_gating(logits, 4)
    torch.library.opcheck(ops.moe_permute.default, (x, gd.expert_ids, gd.slots, gd.expert_counts, w),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # with num_rows the size is static: every utility applies, aot_dispatch included
    torch.library.opcheck(ops.moe_permute.default, (x, gd.expert_ids, gd.slots, gd.expert_counts, w),
                          {"num_rows": 20 * 4 + 3})
    packed, offsets = dk.moe_permute(x.detach(), gd.expert_ids, gd.slots, gd.expert_counts)
    torch.library.opcheck(ops.moe_unpermute.default,
                          (packed.requires_grad_(), gd.expert_ids, gd.slots, offsets, w))
    base = torch.arange(16, device=device) * 6
    torch.library.opcheck(ops.moe_rows_dot.default,
                          (eo.detach().reshape(96, 8), x.detach(), g.expert_ids, g.slots, base, None, 6))


def test_opcheck_compute_dtypes():
    """The fakes' dtypes beyond fp32: fp64 logits give fp64 weights and mean_scores,
    and moe_rows_dot of bf16 rows sums in fp32 (the compute dtype, not the rows')."""
    ops = torch.ops.deepseek_kernels
    logits = torch.randn(11, 6, dtype=torch.float64)
    fake = ("test_faketensor",)  # what differs here (test_opcheck runs the rest at fp32)
    torch.library.opcheck(ops.moe_topk_gating.default, (logits.clone().requires_grad_(), 3),
                          dict(capacity=4), test_utils=fake)
    g = dk.moe_topk_gating(logits, 3, capacity=4)
    rows = torch.randn(6 * 4, 5, dtype=torch.bfloat16)
    other = torch.randn(11, 5, dtype=torch.bfloat16)
    base = torch.arange(6) * 4
    torch.library.opcheck(ops.moe_rows_dot.default, (rows, other, g.expert_ids, g.slots, base, None, 4),
                          test_utils=fake)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_capacity_mode(device):
    t, e, k, h, cap = 32, 8, 2, 16, 10
    logits = torch.randn(t, e, device=device, requires_grad=True)
    x = torch.randn(t, h, device=device, requires_grad=True)
    wexp = torch.randn(e, h, h, device=device)

    def layer(logits, x):
        g = dk.moe_topk_gating(logits, k, capacity=cap, n_group=2, topk_group=1, drop_policy="probability")
        d = dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap)
        return dk.moe_combine(torch.bmm(d, wexp), g.expert_ids, g.slots, g.weights)

    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(logits, x)
    y_eager = layer(logits, x)
    assert torch.equal(y, y_eager)
    y.sum().backward()
    ga = (logits.grad.clone(), x.grad.clone())
    logits.grad = None
    x.grad = None
    y_eager.sum().backward()
    # the forward is our opaque ops (bitwise); the backward's torch-op formulas
    # may be fused and reordered by Inductor
    assert torch.allclose(ga[0], logits.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ga[1], x.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# CPU and CUDA agree bitwise (the CUDA variants above also compare to the reference)
# ---------------------------------------------------------------------------


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_cpu_and_cuda_agree_bitwise(dtype, scoring):
    t, e, k, h = 3000, 256, 8, 1024
    logits = _logits(t, e, dtype)
    bias = torch.randn(e) * 0.05 if scoring == "sigmoid" else None
    for cap, pol in [(None, "position"), (80, "position"), (80, "probability")]:
        kw = dict(scoring=scoring, n_group=8, topk_group=4, capacity=cap, drop_policy=pol,
                  routed_scaling_factor=2.5)
        cpu = dk.moe_topk_gating(logits, k, correction_bias=bias, **kw)
        gpu = dk.moe_topk_gating(logits.cuda(), k, correction_bias=None if bias is None else bias.cuda(), **kw)
        _assert_bitwise(cpu, gpu, GATING_NAMES)
    x = torch.randn(t, h).to(dtype)
    cap = 80
    g = dk.moe_topk_gating(logits, k, capacity=cap, drop_policy="probability")
    gc = [a.cuda() for a in g]
    _assert_bitwise([dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap)],
                    [dk.moe_dispatch(x.cuda(), gc[1], gc[2], e, cap)])
    eo = torch.randn(e, cap, h).to(dtype)
    _assert_bitwise([dk.moe_combine(eo, g.expert_ids, g.slots, g.weights)],
                    [dk.moe_combine(eo.cuda(), gc[1], gc[2], gc[0])])
    g = dk.moe_topk_gating(logits, k)
    gc = [a.cuda() for a in g]
    pc, oc = dk.moe_permute(x, g.expert_ids, g.slots, g.expert_counts)
    pg, og = dk.moe_permute(x.cuda(), gc[1], gc[2], gc[3])
    _assert_bitwise([pc, oc], [pg, og])
    _assert_bitwise([dk.moe_unpermute(pc, g.expert_ids, g.slots, oc, g.weights)],
                    [dk.moe_unpermute(pg, gc[1], gc[2], og, gc[0])])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_cpu_and_cuda_agree_bitwise_bench_config(policy):
    """The benchmark's gating config (issue 3's H100 target): T=8192, E=256, k=8, groups 8/4."""
    logits = _logits(8192, 256, torch.bfloat16)
    kw = dict(n_group=8, topk_group=4, capacity=320, drop_policy=policy)
    _assert_bitwise(dk.moe_topk_gating(logits, 8, **kw), dk.moe_topk_gating(logits.cuda(), 8, **kw),
                    GATING_NAMES)


# ---------------------------------------------------------------------------
# CUDA gating kernel generations: v1 and v2 (the default), chosen with
# DSK_MOE_KERNEL or the private _moe_cuda_kernel op. v2 must give v1's bits,
# hence the CPU's.
# ---------------------------------------------------------------------------


# The CUDA gating kernel generation for a block.
_moe_kernel = functools.partial(kernel_choice, "_moe_cuda_kernel")


def test_moe_cuda_kernel_op():
    # A catch-all op: works (and is checked) on CPU-only builds too.
    op = torch.ops.deepseek_kernels._moe_cuda_kernel
    start = op(0)
    assert start in (1, 2)
    with _moe_kernel(2):
        assert op(0) == 2
        assert op(1) == 2 and op(0) == 1
    assert op(0) == start
    for bad in (3, -1):
        with pytest.raises(ValueError, match="0, 1 or 2"):
            op(bad)
    assert op(0) == start


@pytest.mark.parametrize("value,want", [("v2", "2"), ("1", "1"), ("", "2"),
                                        ("v3", "ValueError: DSK_MOE_KERNEL must be v1 or v2")])
def test_moe_kernel_env_var(value, want):
    """DSK_MOE_KERNEL is read once, on first use (a fresh process per value)."""
    code = ("import torch, deepseek_kernels\n"
            "try:\n    print(torch.ops.deepseek_kernels._moe_cuda_kernel(0))\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = dict(os.environ, DSK_MOE_KERNEL=value)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().startswith(want), out.stdout + out.stderr


@pytest.fixture
def moe_v2():
    with _moe_kernel(2):
        yield


# The existing CUDA gating cases (against the bitwise reference), with v2 forced.
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", GATING_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_gating_v2_matches_reference(moe_v2, scoring, dtype, cfg):
    test_gating_matches_reference("cuda", scoring, dtype, cfg)


@requires_cuda
@pytest.mark.cuda
def test_gating_v2_existing_cuda_cases(moe_v2):
    for shape in [(0, 8, 2, 1, 1), (1, 1, 1, 1, 1), (300, 256, 8, 8, 4), (33, 1024, 16, 16, 5),
                  (5, 1000, 16, 1, 1), (65, 96, 7, 3, 2), (17, 40, 5, 40, 40), (2500, 32, 4, 4, 2),
                  (9000, 64, 6, 4, 2), (40, 300, 6, 10, 3), (50, 512, 8, 128, 40)]:
        test_gating_shapes("cuda", *shape)
    test_gating_deterministic("cuda")
    for scoring in ("softmax", "sigmoid"):
        test_gating_nonfinite_rows_are_not_routed("cuda", scoring)
    for policy in ("position", "probability"):
        test_cpu_and_cuda_agree_bitwise_bench_config(policy)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_v2_cpu_and_cuda_agree_bitwise(moe_v2, dtype, scoring):
    test_cpu_and_cuda_agree_bitwise(dtype, scoring)


def _assert_v2_v1_cpu(logits, k, bias=None, **kw):
    """CUDA v2, CUDA v1 and the CPU: the same bits, for every capacity mode."""
    lc = logits.cuda()
    bc = None if bias is None else bias.cuda()
    modes = [dict(capacity=None)]
    if logits.shape[0] > 0:
        cap = max(1, logits.shape[0] * k // logits.shape[1])
        modes += [dict(capacity=cap, drop_policy="position"),
                  dict(capacity=cap, drop_policy="probability"), dict(capacity=0)]
    for mode in modes:
        args = dict(kw, **mode)
        cpu = dk.moe_topk_gating(logits, k, correction_bias=bias, **args)
        with _moe_kernel(1):
            v1 = dk.moe_topk_gating(lc, k, correction_bias=bc, **args)
        with _moe_kernel(2):
            v2 = dk.moe_topk_gating(lc, k, correction_bias=bc, **args)
        _assert_bitwise(v2, v1, GATING_NAMES)
        _assert_bitwise(v2, cpu, GATING_NAMES)


# (T, E, k, n_group, topk_group): v2's register group path needs a group of
# 32 R experts (R registers per lane); other group sizes take the shared-memory path.
V2_SHAPES = [
    (0, 256, 8, 8, 4), (1, 256, 8, 8, 4), (37, 256, 8, 8, 4),  # T = 0, 1, 37
    (300, 256, 8, 8, 4),      # DeepSeek-V3: group i = register i (R = 1)
    (77, 512, 16, 8, 3),      # R = 2
    (40, 1024, 16, 4, 2),     # R = 8, the largest E and k
    (33, 1024, 16, 16, 5),    # R = 2, 32 registers per lane
    (65, 96, 7, 3, 2),        # R = 1 and a register past the groups (E < 32 * 4)
    (50, 64, 6, 2, 1),        # R = 1, 2 registers per lane
    (45, 64, 4, 4, 2),        # group of 16: shared memory
    (40, 300, 6, 10, 3),      # group of 30: shared memory, E not a multiple of 32
    (50, 512, 8, 128, 40),    # group of 4: more groups than lanes
    (37, 40, 5, 40, 39),      # group of 1
    (17, 40, 5, 40, 40),      # topk_group = n_group: not group-limited
    (5, 1000, 16, 1, 1), (37, 1, 1, 1, 1), (37, 33, 16, 1, 1), (2500, 32, 4, 4, 2),
    (9000, 256, 8, 8, 4),     # more chunks than blocks: the grid-stride loop
    (9000, 64, 6, 4, 2),
]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("scoring,with_bias", [("softmax", False), ("softmax", True),
                                               ("sigmoid", True), ("sigmoid", False)])
@pytest.mark.parametrize("shape", V2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gating_v2_matches_v1_and_cpu(shape, scoring, with_bias):
    t, e, k, ng, tg = shape
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        logits = _logits(t, e, dtype)
        bias = torch.randn(e) * 0.05 if with_bias else None
        _assert_v2_v1_cpu(logits, k, bias, scoring=scoring, n_group=ng, topk_group=tg,
                          routed_scaling_factor=2.5)
    _assert_v2_v1_cpu(_logits(t, e, torch.float32), k, None, scoring=scoring, n_group=ng,
                      topk_group=tg, renormalize=False)


def _adversarial_rows(e, t=96):
    """Rows that stress v2's top-k and group selection: every expert tied; one
    lane (experts l, l + 32, ...) holding all the best, distinct or tied; ties
    across lanes and inside a lane; groups tied; then random bf16-rounded rows."""
    x = torch.randn(t, e).bfloat16().float()
    x[0] = 0.0
    x[1] = 1.0
    for r in range(2, 34):
        lane = r - 2
        n = len(range(lane, e, 32))
        x[r] = -4.0
        if n:
            x[r, lane::32] = (3.0 - 0.25 * torch.arange(n)) if r % 2 else 3.0
    for r in range(34, 50):
        x[r, 7] = x[r, 9] = x[r, 7 + 32 * ((e - 8) // 32)] = 5.0  # across and inside lanes
    if e >= 64:
        for r in range(50, 60):
            x[r] = x[r, : e // 2].repeat(2)  # the two halves equal: groups tie pairwise
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("e,k,ng,tg", [(256, 8, 8, 4), (256, 16, 1, 1), (96, 7, 3, 2), (300, 6, 10, 3),
                                       (33, 16, 1, 1), (16, 16, 4, 4)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_ties_match_reference(device, e, k, ng, tg, scoring):
    """The top-k on rows of ties (all tied, a lane or a group holding the best,
    ties across and inside lanes, k = E) and random rows: the reference's order
    (descending, ties to the lower index) and its bits."""
    x = _adversarial_rows(e)
    bias = torch.randn(e) * 0.01 if scoring == "sigmoid" else None
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(scoring=scoring, n_group=ng, topk_group=tg, capacity=5)
        ours = dk.moe_topk_gating(x.to(dtype).to(device), k,
                                  correction_bias=None if bias is None else bias.to(device), **kw)
        _assert_bitwise(ours, ref.moe_topk_gating(x.to(dtype), k, correction_bias=bias, **kw),
                        GATING_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_probability_drop_ties_keep_earlier_tokens(device, scoring):
    """Repeated rows give equal weights for an expert across tokens: probability
    dropping keeps the capacity largest, ties to the earlier token (a stable
    sort), bitwise as the reference and as the plain-loop statement of the rule."""
    t, e, k, cap = 41, 16, 4, 7
    logits = torch.randn(3, e)[torch.arange(t) % 3]
    logits[::5] = torch.randn(len(range(0, t, 5)), e)
    kw = dict(scoring=scoring, capacity=cap, drop_policy="probability")
    ours = dk.moe_topk_gating(logits.to(device), k, **kw)
    _assert_bitwise(ours, ref.moe_topk_gating(logits, k, **kw), GATING_NAMES)
    _, slots = _loop_gating(logits, k, scoring=scoring, capacity=cap, drop_policy="probability")
    assert torch.equal(ours.slots.cpu().long(), slots)
    assert (ours.routed_counts > cap).any()  # some expert drops tied choices


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("e,k,ng,tg", [(256, 8, 8, 4), (256, 16, 1, 1), (512, 16, 8, 3), (1024, 16, 8, 2),
                                       (96, 7, 3, 2), (64, 6, 4, 2), (300, 6, 10, 3), (32, 4, 1, 1),
                                       (128, 16, 2, 1)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_v2_ties_and_one_lane_wins(e, k, ng, tg, scoring):
    x = _adversarial_rows(e)
    bias = torch.zeros(e) if scoring == "sigmoid" else None
    for dtype in (torch.float32, torch.bfloat16):
        _assert_v2_v1_cpu(x.to(dtype), k, bias, scoring=scoring, n_group=ng, topk_group=tg)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_v2_nonfinite(scoring):
    for e, ng, tg in [(256, 8, 4), (64, 4, 2), (40, 1, 1)]:
        x = _logits(37, e, torch.float32)
        x[3, 5] = float("nan")
        x[7, 0] = float("inf")
        x[11, e - 1] = float("-inf")
        x[36, :] = float("nan")  # the last token of the last (partial) chunk
        _assert_v2_v1_cpu(x, 4, None, scoring=scoring, n_group=ng, topk_group=tg)
        bias = torch.zeros(e)
        bias[1] = float("inf")  # a non-finite bias routes nothing
        _assert_v2_v1_cpu(x, 4, bias, scoring=scoring, n_group=ng, topk_group=tg)


# ---------------------------------------------------------------------------
# deepseek_kernels.moe and nn.MoELayer
# ---------------------------------------------------------------------------

from deepseek_kernels import moe as dmoe  # noqa: E402
from deepseek_kernels.nn import MoELayer  # noqa: E402


def test_losses_and_bias_update():
    t, e, k = 64, 8, 2
    logits = torch.zeros(t, e, requires_grad=True)
    g = dk.moe_topk_gating(logits, k)
    # uniform scores: P_i = 1/E; f_i = counts/(kT); loss = E * sum f_i / E = 1
    loss = dmoe.load_balancing_loss(g.routed_counts, g.mean_scores, k, t, alpha=0.5)
    assert torch.allclose(loss, torch.tensor(0.5))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    x = torch.randn(10, e)
    assert torch.allclose(dmoe.router_z_loss(x), (torch.logsumexp(x, 1) ** 2).mean())
    xb = (x * 7).bfloat16()  # computed in fp32 whatever the logits' dtype
    zb = dmoe.router_z_loss(xb)
    assert zb.dtype == torch.float32
    torch.testing.assert_close(zb, (torch.logsumexp(xb.float(), 1) ** 2).mean(), rtol=1e-6, atol=0)
    bias = torch.zeros(4)
    dmoe.update_correction_bias(bias, torch.tensor([10, 0, 5, 5]), 0.1)
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert dmoe.jitter(x, 0.1, training=False) is x
    j = dmoe.jitter(x, 0.1)
    assert ((j / x - 1).abs() <= 0.1 + 1e-6).all()


def test_jitter_noise_is_uniform_on_both_sides():
    """jitter multiplies by U(1 - eps, 1 + eps): the factors fill the whole interval
    (both sides of 1, mean 1), are drawn per element, and the generator makes them
    reproducible."""
    eps = 0.3
    x = torch.rand(257, 33) + 0.5  # positive: the factor is j / x
    f = dmoe.jitter(x, eps, generator=torch.Generator().manual_seed(3)) / x
    n = f.numel()
    assert ((f - 1).abs() <= eps * (1 + 1e-6)).all()
    # U(1 - eps, 1 + eps): mean 1 (std eps / sqrt(3n)), both ends reached
    assert abs(float(f.mean()) - 1) < 6 * eps / math.sqrt(3 * n)
    assert float(f.min()) < 1 - 0.99 * eps and float(f.max()) > 1 + 0.99 * eps
    assert torch.equal(f, dmoe.jitter(x, eps, generator=torch.Generator().manual_seed(3)) / x)
    assert dmoe.jitter(x, eps, training=False, generator=torch.Generator().manual_seed(3)) is x


def test_losses_and_bias_update_bad_input():
    """Shapes that would broadcast, an integer bias (add_ would truncate the step
    to 0), and non-finite or out-of-range coefficients raise, naming the argument."""
    counts, scores = torch.tensor([3, 1]), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="'routed_counts' and 'mean_scores' must be \\[E\\]"):
        dmoe.load_balancing_loss(counts, torch.tensor([0.5, 0.25, 0.25]), 2, 2)
    with pytest.raises(ValueError, match="k >= 1"):
        dmoe.load_balancing_loss(counts, scores, 0, 2)
    with pytest.raises(ValueError, match="'alpha' must be finite"):
        dmoe.load_balancing_loss(counts, scores, 2, 2, alpha=math.nan)
    with pytest.raises(TypeError, match="'bias' must be floating point"):
        dmoe.update_correction_bias(torch.zeros(2, dtype=torch.int32), counts, 0.1)
    with pytest.raises(ValueError, match="'bias' and 'loads' must be \\[E\\]"):
        dmoe.update_correction_bias(torch.zeros(2), torch.tensor([1, 2, 3]), 0.1)
    with pytest.raises(ValueError, match="'gamma' must be finite and >= 0"):
        dmoe.update_correction_bias(torch.zeros(2), counts, math.inf)
    for eps in (math.nan, -0.1, 1.0):
        with pytest.raises(ValueError, match="'eps' must be in \\[0, 1\\)"):
            dmoe.jitter(torch.randn(3, 2), eps)
    assert dmoe.jitter(scores, 0.0) is scores


@torch.no_grad()
def _moe_layer_reference(layer, x):
    """Dense loop over tokens and their kept choices (fp64)."""
    g = dk.moe_topk_gating(layer.router(x.float()), layer.k, correction_bias=layer.correction_bias,
                           capacity=layer.capacity(x.shape[0]) if layer.capacity_factor else None)
    y = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(layer.k):
            if g.slots[t, j] < 0:
                continue
            e = int(g.expert_ids[t, j])
            h = x[t].double() @ layer.w_gate_up[e].double()
            a, b = h.chunk(2)
            y[t] += float(g.weights[t, j]) * ((torch.nn.functional.silu(a) * b) @ layer.w_down[e].double())
    if layer.shared is not None:
        y += layer.shared["down"](layer._swiglu(layer.shared["gate_up"](x))).double()
    return y


def test_modules_bad_input():
    """Inputs a reshape to [-1, features] would silently regroup, and bad sizes."""
    from deepseek_kernels.nn import CrossAttention, FP8Linear, Int8Linear
    with pytest.raises(ValueError, match="last dimension must be 16, got shape \\(4, 12\\)"):
        MoELayer(16, 32, 8, 2)(torch.randn(4, 12))
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            MoELayer(16, 32, 8, 2, capacity_factor=bad)
    with pytest.raises(ValueError, match="FP8Linear: the input's last dimension must be 128"):
        FP8Linear(128, 128)(torch.randn(3, 64))
    with pytest.raises(ValueError, match="Int8Linear: the input's last dimension must be 16"):
        Int8Linear(16, 8)(torch.randn(3, 12))
    with pytest.raises(ValueError, match="must be 3-D with one batch size"):
        CrossAttention(16, 4)(torch.randn(3, 16))
    with pytest.raises(ValueError, match="must be 3-D with one batch size"):
        CrossAttention(16, 4)(torch.randn(2, 3, 16), torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="num_heads=0"):
        CrossAttention(16, 0)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_moe_layer_capacity_rounds_up(use_kernels):
    """capacity = ceil(capacity_factor * T * k / E), and the layer routes with it: with
    a zero router every token picks experts 0 and 1 (ties to the lower index), so the
    first `capacity` tokens (position policy) get expert outputs, the rest get 0."""
    torch.manual_seed(2)
    e, k, t = 8, 2, 9
    layer = MoELayer(12, 16, e, k, capacity_factor=1.25)
    layer.use_kernels = use_kernels
    assert [layer.capacity(n) for n in (9, 8, 1, 0)] == [3, 3, 1, 0]  # 2.8125, 2.5, 0.3125, 0
    with torch.no_grad():
        layer.router.weight.zero_()
    y = layer(torch.randn(t, 12))
    assert (y[:3].abs().sum(1) > 0).all() and not y[3:].any()


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_forward_backward(capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 8, 2, num_shared_experts=1, capacity_factor=capacity_factor,
                     aux_loss_alpha=0.01, z_loss_coef=1e-3, bias_update_rate=0.01)
    x = torch.randn(3, 10, 16)
    y = layer(x)
    assert y.shape == x.shape
    # the bias was updated after routing, so compare with the routing it used
    layer.correction_bias.zero_()
    layer.eval()
    y = layer(x)
    want = _moe_layer_reference(layer, x.reshape(-1, 16)).reshape(x.shape)
    assert torch.allclose(y.double(), want, rtol=1e-4, atol=1e-5)
    layer.train()
    (layer(x).square().mean() + layer.aux_loss).backward()
    for name, prm in layer.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
def test_moe_layer_fp8_experts(capacity_factor):
    """fp8=True: the experts through fp8_grouped_gemm (both modes), within FP8's error
    of the same layer in fp32; the reference path gives the same bits; bf16
    straight-through gradients reach every parameter and track the fp32 ones."""
    torch.manual_seed(0)
    kw = dict(num_shared_experts=1, capacity_factor=capacity_factor)
    layer = MoELayer(256, 136, 8, 2, **kw)
    fp8 = MoELayer(256, 136, 8, 2, fp8=True, **kw)
    fp8.load_state_dict(layer.state_dict())
    x = torch.randn(3, 40, 256, requires_grad=True)
    y, y8 = layer(x), fp8(x)
    rel = ((y8 - y).norm() / y.norm()).item()
    assert 1e-4 < rel < 0.05, rel  # quantized (not the fp32 path), to FP8's few percent
    fp8.use_kernels = False
    assert torch.equal(fp8(x), y8)  # reference.py's FP8 ops: bitwise the kernels
    fp8.use_kernels = True
    y.square().mean().backward()
    g32 = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x.grad = None
    y8.square().mean().backward()
    for name, prm in fp8.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
        if name.startswith("w_"):
            err = ((prm.grad - g32[name]).norm() / g32[name].norm()).item()
            assert err < 0.1, (name, err)
    # the reference path's straight-through backward: the same bf16 products, summed
    # in another order (bf16 rounding of the results, relative 2^-8)
    g8 = {n: p.grad.clone() for n, p in fp8.named_parameters()}
    gx = x.grad.clone()
    fp8.zero_grad()
    x.grad = None
    fp8.use_kernels = False
    fp8(x).square().mean().backward()
    for name, prm in [("x", x), *fp8.named_parameters()]:
        want = gx if name == "x" else g8[name]
        err = ((prm.grad - want).norm() / want.norm()).item()
        assert err < 2.0**-7, (name, err)


def test_bench_moe_smoke(tmp_path):
    """bench/bench_moe.py end to end on a tiny CPU config: its correctness checks
    (ours bitwise = reference, DeepSpeed-style composition close) must pass."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--device", "cpu", "--tokens", "64", "--experts", "8", "--k", "2", "--hidden", "16",
                   "--n-group", "4", "--topk-group", "2", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    (result,) = tmp_path.glob("moe-*.json")
    data = json.loads(result.read_text())
    assert all(data["checks"].values()) and len(data["rows"]) == 4
