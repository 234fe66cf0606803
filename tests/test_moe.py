"""MoE routing: top-k gating, capacity dispatch/combine, dropless permute/unpermute.

The reference (deepseek_kernels.reference) is checked against plain loops and
torch's own softmax/sigmoid; the kernels are checked bitwise against the
reference (the gating contract fixes every fp32 operation and its order).
"""

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
