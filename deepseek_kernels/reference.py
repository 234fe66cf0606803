"""Pure-PyTorch reference implementations of every deepseek_kernels op.

Used by the tests (the kernels must match these bit for bit where the op is
exact, or within a derived tolerance where it is not), by the benchmarks (as
the PyTorch peer) and by the model's ``use_kernels=False`` path.

The quantization references reproduce the kernels' arithmetic exactly: every
step is a single IEEE fp32 operation (division, rounding half to even, floor,
multiplication, addition in a fixed order), so kernels and references agree
bitwise on every device.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "quantize_int8",
    "dequantize_int8",
    "dequantize_sum_int8",
    "quantize_int4",
    "dequantize_int4",
    "dequantize_sum_int4",
    "stochastic_uniform",
    "seed_key",
]

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """The 'lowbias32' integer hash (C. Wellons) on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key that a 64-bit seed selects (same as csrc/common/rng.h)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return _hash32_int(_hash32_int(s & _MASK32) ^ (s >> 32))


def stochastic_uniform(n: int, seed: int, device=None) -> Tensor:
    """The uniform [0, 1) draws used for stochastic rounding of elements 0..n-1.

    Counter-based: element i's draw depends only on (seed, i), so results are
    reproducible and identical on CPU and GPU.
    """
    i = torch.arange(n, dtype=torch.int64, device=device)
    key = seed_key(seed)
    r = _hash32((i & _MASK32) ^ key)
    r = _hash32((r + (i >> 32)) & _MASK32)
    return (r >> 8).to(torch.float32) * (2.0**-24)


def _quantize_blocks(
    x: Tensor, block_size: int, qmax: int, stochastic: bool, seed: Optional[int]
) -> Tuple[Tensor, Tensor, Tensor]:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    xf = x.reshape(-1).to(torch.float32)
    n = xf.numel()
    nb = math.ceil(n / block_size)
    xp = torch.nn.functional.pad(xf, (0, nb * block_size - n)).view(nb, block_size)
    finite = torch.isfinite(xp).all(dim=1)
    absmax = xp.abs().amax(dim=1)
    # Divide by a tensor, not a Python scalar: on CUDA torch turns division by
    # a scalar into multiplication by its reciprocal, which rounds differently.
    scale = absmax / torch.full_like(absmax, qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    v = xp / scale[:, None]
    if stochastic:
        if seed is None:
            raise ValueError("the reference needs an explicit seed for stochastic rounding")
        u = stochastic_uniform(nb * block_size, seed, device=x.device).view(nb, block_size)
        q = torch.floor(v + u)
    else:
        q = torch.round(v)  # half to even
    q = torch.clamp(q, -qmax, qmax)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    codes = q.to(torch.int8).reshape(-1)[:n]
    nonfinite = ~finite.all()
    return codes, scale, nonfinite


def quantize_int8(
    x: Tensor, block_size: int = 256, *, stochastic: bool = False, seed: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Blockwise absmax INT8 quantization; see deepseek_kernels.ops.quantize_int8."""
    return _quantize_blocks(x, block_size, 127, stochastic, seed)


def _pack_int4(codes: Tensor) -> Tensor:
    c = codes.to(torch.int16)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = (c & 0xF).view(-1, 2)
    return (c[:, 0] | (c[:, 1] << 4)).to(torch.uint8)


def _unpack_int4(packed: Tensor, numel: int) -> Tensor:
    b = packed.to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    c = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    c = torch.where(c >= 8, c - 16, c)
    return c[..., :numel].to(torch.int8)


def quantize_int4(
    x: Tensor, block_size: int = 256, *, stochastic: bool = False, seed: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Blockwise absmax INT4 quantization, two codes per byte (low nibble first)."""
    if block_size % 2:
        raise ValueError(f"block_size must be even for int4, got {block_size}")
    codes, scale, nonfinite = _quantize_blocks(x, block_size, 7, stochastic, seed)
    return _pack_int4(codes), scale, nonfinite


def _dequantize_rows(codes: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """codes int8 [W, n], scales [W, nb] -> fp32 [W, n] (q * scale, one fp32 product)."""
    n = codes.shape[-1]
    s = scales.to(torch.float32).repeat_interleave(block_size, dim=-1)[..., :n]
    return codes.to(torch.float32) * s


def dequantize_int8(
    q: Tensor, scales: Tensor, block_size: int = 256, *, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    out = _dequantize_rows(q.reshape(1, -1), scales.reshape(1, -1), block_size)[0]
    return out.to(out_dtype or torch.float32)


def dequantize_int4(
    q: Tensor,
    scales: Tensor,
    numel: int,
    block_size: int = 256,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    codes = _unpack_int4(q.reshape(1, -1), numel)
    out = _dequantize_rows(codes, scales.reshape(1, -1), block_size)[0]
    return out.to(out_dtype or torch.float32)


def _sum_rows(rows: Tensor) -> Tensor:
    acc = torch.zeros(rows.shape[-1], dtype=torch.float32, device=rows.device)
    for w in range(rows.shape[0]):  # fixed rank order: the result is deterministic
        acc = acc + rows[w]
    return acc


def dequantize_sum_int8(q: Tensor, scales: Tensor, block_size: int = 256) -> Tensor:
    """Sum over the W rows of q [W, n] dequantized with scales [W, nb], in row order, fp32."""
    return _sum_rows(_dequantize_rows(q, scales, block_size))


def dequantize_sum_int4(q: Tensor, scales: Tensor, numel: int, block_size: int = 256) -> Tensor:
    return _sum_rows(_dequantize_rows(_unpack_int4(q, numel), scales, block_size))


# ---------------------------------------------------------------------------
# MoE routing: top-k gating, capacity dispatch/combine, dropless permute/unpermute
# ---------------------------------------------------------------------------
#
# The gating contract is exact: the kernels (csrc/moe) and this reference do
# the same IEEE fp32 operations in the same order, so results agree bitwise:
#
#   exp(x), x <= 0:  0 if x < -87; else n = rint(x * LOG2E),
#                    r = (x - n * LN2_HI) - n * LN2_LO,
#                    p = Horner(r; 1/5040, 1/720, 1/120, 1/24, 1/6, 1/2, 1, 1)
#                    (each step one fp32 multiply then one fp32 add), times 2^n.
#   softmax:         s_e = exp(x_e - max), sum in "warp order" (32 strided partial
#                    sums e = l, l+32, ... from 0, then halving: lanes l and l+16, 8, 4,
#                    2, 1), p_e = s_e / sum.
#   sigmoid:         t = exp(-|x|); x >= 0: 1 / (1 + t), else t / (1 + t).
#   fp64 logits (CPU only, for gradcheck) use the library exp in fp64 instead.
#   selection score: p_e + bias_e (bias only selects).
#   groups:          group score = best + second best selection score of the group
#                    (the best alone when a group has one expert); the topk_group
#                    best groups are kept (ties: lower group index); top-k among their
#                    experts (ties: lower expert index), in descending order.
#   weights:         u_j = p_{e_j}; renormalize: sum u_j sequentially j = 0..k-1 from 0
#                    and divide when the sum is > 0; then times routed_scaling_factor.
#   invalid rows:    a row with a non-finite logit (NaN, +-Inf), or any non-finite
#                    correction_bias, is not routed: expert_ids -1, weights 0, slots -1,
#                    no count, no score mass.
#   ranks/slots:     choice (t, j) to expert e has rank = number of routed choices to e
#                    from earlier tokens (a token's choices are distinct experts).
#                    dropless: slot = rank.  position: slot = rank if rank < capacity.
#                    probability: the `capacity` highest weights of the expert are kept
#                    (ties: earlier token); kept slots are numbered in token order.
#   mean_scores:     per expert, sum over tokens of p in chunks of 8 tokens (sequential
#                    inside a chunk, from 0); chunk c added into lane c % 256 (sequential
#                    per lane, from 0); the 256 lanes halved (l + 128, 64, ..., 1); / T.

_EXP_CUTOFF = -87.0
_LOG2E = float.fromhex("0x1.715476p+0")
_LN2_HI = float.fromhex("0x1.62e4p-1")
_LN2_LO = float.fromhex("0x1.7f7d1cp-20")
# 1/7!, 1/6!, ..., 1/2!, 1, 1 rounded to fp32 (Horner, highest degree first).
_EXP_POLY = [float.fromhex(h) for h in (
    "0x1.a01a02p-13", "0x1.6c16c2p-10", "0x1.111112p-7", "0x1.555556p-5",
    "0x1.555556p-3", "0x1p-1", "0x1p+0", "0x1p+0")]
_SCORE_SUM_CHUNK = 8  # tokens per partial sum of mean_scores
_MEAN_LANES = 256  # strided sums of the chunk partials, then halved
_WARP = 32

MoeGating = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _c(v: float, like: Tensor) -> Tensor:
    """A 0-dim constant of like's dtype (so every operation rounds in that dtype)."""
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def moe_exp(x: Tensor) -> Tensor:
    """The library's exp for x <= 0, bitwise as in csrc/moe/moe_math.h (fp32);
    fp64 uses torch.exp."""
    if x.dtype == torch.float64:
        return torch.exp(x)
    n = torch.round(x * _c(_LOG2E, x))
    r = (x - n * _c(_LN2_HI, x)) - n * _c(_LN2_LO, x)
    p = torch.full_like(x, _EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = p * r + _c(coef, x)
    ni = n.clamp(-126, 0).to(torch.int32)
    scale = ((ni + 127) << 23).view(torch.float32)
    out = p * scale
    return torch.where(x < _c(_EXP_CUTOFF, x), torch.zeros_like(x), out)


def _warp_order_sum(s: Tensor) -> Tensor:
    """Row sums of s [T, E] in the kernels' order (32 strided partials, then halving)."""
    t, e = s.shape
    width = -(-e // _WARP) * _WARP
    sp = torch.nn.functional.pad(s, (0, width - e)).view(t, width // _WARP, _WARP)
    acc = torch.zeros(t, _WARP, dtype=s.dtype, device=s.device)
    for i in range(sp.shape[1]):
        acc = acc + sp[:, i, :]
    half = _WARP // 2
    while half >= 1:
        acc = acc[:, :half] + acc[:, half:2 * half]
        half //= 2
    return acc[:, 0]


def moe_scores(logits: Tensor, scoring: str = "softmax") -> Tensor:
    """Routing scores [T, E] in the compute dtype (fp32, or fp64 for fp64 logits).
    Rows holding a non-finite logit may come out NaN: moe_topk_gating does not
    route them."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if scoring == "softmax":
        m = x.amax(dim=1, keepdim=True) if x.shape[1] else x
        s = moe_exp(x - m)
        return s / _warp_order_sum(s)[:, None]
    if scoring == "sigmoid":
        t = moe_exp(-x.abs())
        one = _c(1.0, x)
        return torch.where(x >= 0, one / (one + t), t / (one + t))
    raise ValueError(f"moe_topk_gating: argument 'scoring' must be 'softmax' or 'sigmoid', got {scoring!r}")


def _stable_desc_order(v: Tensor) -> Tensor:
    """Indices sorting each row of v by descending value, ties to the lower index."""
    return torch.sort(-v, dim=-1, stable=True).indices


def _ranks_in_expert(ids: Tensor, key_order: Tensor, num_experts: int) -> Tensor:
    """For flat choices with expert ids (-1 = none), visited in key_order, the
    position of each choice among its expert's choices in that order."""
    n = ids.numel()
    ids_o = ids[key_order]
    by_expert = torch.sort(torch.where(ids_o < 0, num_experts, ids_o), stable=True)
    pos = torch.empty(n, dtype=torch.int64, device=ids.device)
    sorted_ids = by_expert.values
    counts = torch.bincount(sorted_ids, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=ids.device) - starts[sorted_ids]
    pos[key_order[by_expert.indices]] = rank_sorted
    return pos


def _check_gating_args(logits, k, scoring, correction_bias, n_group, topk_group, capacity,
                       drop_policy):
    op = "moe_topk_gating"
    if logits.dim() != 2:
        raise ValueError(f"{op}: argument 'logits' must be 2-D [T, E], got shape {tuple(logits.shape)}")
    e = logits.shape[1]
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{op}: argument 'scoring' must be 'softmax' or 'sigmoid', got {scoring!r}")
    if drop_policy not in ("position", "probability"):
        raise ValueError(f"{op}: argument 'drop_policy' must be 'position' or 'probability', got {drop_policy!r}")
    if not 1 <= k <= e:
        raise ValueError(f"{op}: argument 'k' must be in [1, E={e}], got {k}")
    if n_group < 1 or e % n_group:
        raise ValueError(f"{op}: argument 'n_group' must divide E={e}, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{op}: argument 'topk_group' must be in [1, n_group={n_group}], got {topk_group}")
    if k > topk_group * (e // n_group):
        raise ValueError(f"{op}: argument 'k'={k} exceeds the {topk_group * (e // n_group)} experts "
                         "of the kept groups")
    if capacity is not None and capacity < 0:
        raise ValueError(f"{op}: argument 'capacity' must be non-negative, got {capacity}")
    if correction_bias is not None and tuple(correction_bias.shape) != (e,):
        raise ValueError(f"{op}: argument 'correction_bias' must have shape ({e},), got {tuple(correction_bias.shape)}")


def moe_topk_gating(
    logits: Tensor, k: int, *, scoring: str = "softmax", correction_bias: Optional[Tensor] = None,
    n_group: int = 1, topk_group: int = 1, renormalize: bool = True,
    routed_scaling_factor: float = 1.0, capacity: Optional[int] = None,
    drop_policy: str = "position",
) -> MoeGating:
    """Reference of ops.moe_topk_gating: (weights, expert_ids, slots, expert_counts,
    routed_counts, mean_scores); the contract is spelled out above."""
    _check_gating_args(logits, k, scoring, correction_bias, n_group, topk_group, capacity, drop_policy)
    t, e = logits.shape
    dev = logits.device
    p = moe_scores(logits, scoring)
    cdt = p.dtype
    valid = torch.isfinite(logits).all(dim=1)
    if correction_bias is not None:
        b = correction_bias.to(cdt)
        valid = valid & torch.isfinite(b).all()
        sel = p + b
    else:
        sel = p
    # Invalid rows: route on zeros (discarded below) so no NaN enters a sort.
    sel = torch.where(valid[:, None], sel, torch.zeros_like(sel))
    p = torch.where(valid[:, None], p, torch.zeros_like(p))

    gsize = e // n_group
    if n_group > 1 and topk_group < n_group:
        g = sel.view(t, n_group, gsize)
        top2 = torch.topk(g, min(2, gsize), dim=-1).values
        gscore = top2[..., 0] + top2[..., 1] if gsize >= 2 else top2[..., 0]
        keep_g = _stable_desc_order(gscore)[:, :topk_group]
        gmask = torch.zeros(t, n_group, dtype=torch.bool, device=dev)
        gmask.scatter_(1, keep_g, True)
        emask = gmask.repeat_interleave(gsize, dim=1)
        sel = torch.where(emask, sel, torch.full_like(sel, float("-inf")))
    ids = _stable_desc_order(sel)[:, :k]
    u = p.gather(1, ids)
    w = u
    if renormalize:
        s = torch.zeros(t, dtype=cdt, device=dev)
        for j in range(k):
            s = s + u[:, j]
        w = torch.where(s[:, None] > 0, u / s[:, None], u)
    w = w * _c(routed_scaling_factor, w)
    w = torch.where(valid[:, None], w, torch.zeros_like(w))
    ids = torch.where(valid[:, None], ids, torch.full_like(ids, -1))

    # Ranks in token order (flat choice index order = token order: a token's
    # choices go to distinct experts).
    flat_ids = ids.reshape(-1)
    n = flat_ids.numel()
    routed = flat_ids >= 0
    rank = _ranks_in_expert(flat_ids, torch.arange(n, device=dev), e)
    if capacity is None:
        keep = routed
    elif drop_policy == "position":
        keep = routed & (rank < capacity)
    else:
        by_weight = _stable_desc_order(w.reshape(-1))  # ties: earlier flat index
        wrank = _ranks_in_expert(flat_ids, by_weight, e)
        keep = routed & (wrank < capacity)
    kept_ids = torch.where(keep, flat_ids, torch.full_like(flat_ids, -1))
    slot = _ranks_in_expert(kept_ids, torch.arange(n, device=dev), e)
    slots = torch.where(keep, slot, torch.full_like(slot, -1)).view(t, k).to(torch.int32)
    expert_counts = torch.bincount(kept_ids[keep], minlength=e).to(torch.int32)
    routed_counts = torch.bincount(flat_ids[routed], minlength=e).to(torch.int32)

    nc = -(-t // _SCORE_SUM_CHUNK)
    pc = torch.nn.functional.pad(p, (0, 0, 0, nc * _SCORE_SUM_CHUNK - t)).view(nc, _SCORE_SUM_CHUNK, e)
    part = torch.zeros(nc, e, dtype=cdt, device=dev)
    for i in range(_SCORE_SUM_CHUNK):
        part = part + pc[:, i, :]
    nl = _MEAN_LANES
    rows = -(-nc // nl)
    pl = torch.nn.functional.pad(part, (0, 0, 0, rows * nl - nc)).view(rows, nl, e)
    lanes = torch.zeros(nl, e, dtype=cdt, device=dev)
    for r in range(rows):
        lanes = lanes + pl[r]
    half = nl // 2
    while half >= 1:
        lanes = lanes[:half] + lanes[half:2 * half]
        half //= 2
    mean_scores = lanes[0] / _c(float(max(t, 1)), lanes[0])
    return (w.to(cdt), ids.to(torch.int32), slots, expert_counts, routed_counts, mean_scores)


def _choice_rows(expert_ids: Tensor, slots: Tensor, row_base: Tensor) -> Tensor:
    """Row of each choice in an expert-major buffer (row_base[e] + slot), -1 if dropped."""
    ids = expert_ids.long()
    kept = (ids >= 0) & (slots >= 0)
    rows = row_base[ids.clamp(min=0)] + slots.long()
    return torch.where(kept, rows, torch.full_like(rows, -1))


def _scatter_rows(x: Tensor, rows: Tensor, nrows: int, weights: Optional[Tensor]) -> Tensor:
    t, k = rows.shape
    h = x.shape[1]
    out = torch.zeros(nrows, h, dtype=x.dtype, device=x.device)
    for j in range(k):
        kept = rows[:, j] >= 0
        src = x[kept]
        if weights is not None:
            cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
            src = (weights[kept, j, None].to(cdt) * src.to(cdt)).to(x.dtype)
        out[rows[kept, j]] = src
    return out


def _gather_rows(buf: Tensor, rows: Tensor, weights: Optional[Tensor]) -> Tensor:
    """y[t] = sum over kept choices j = 0..k-1 (in order, compute dtype) of w * buf[row]."""
    t, k = rows.shape
    cdt = torch.float64 if buf.dtype == torch.float64 else torch.float32
    acc = torch.zeros(t, buf.shape[1], dtype=cdt, device=buf.device)
    if buf.shape[0] == 0:  # nothing kept (capacity 0, no token): no row to gather
        # Still a function of buf and weights (sums over nothing: exact zeros), so
        # backward reaches them with zero gradients instead of raising.
        acc = acc + buf.to(cdt).sum()
        if weights is not None:
            acc = acc + weights.to(cdt)[:, :0].sum()
        return acc.to(buf.dtype)
    for j in range(k):
        kept = rows[:, j] >= 0
        r = buf[rows[:, j].clamp(min=0)].to(cdt)
        if weights is not None:
            r = weights[:, j, None].to(cdt) * r
        acc = torch.where(kept[:, None], acc + r, acc)
    return acc.to(buf.dtype)


def moe_dispatch(x: Tensor, expert_ids: Tensor, slots: Tensor, num_experts: int, capacity: int,
                 weights: Optional[Tensor] = None) -> Tensor:
    """x [T, H] -> [E, capacity, H]: row (e, slot) holds its token's x (times its
    weight, in fp32, when weights are given); unfilled rows are zero."""
    base = torch.arange(num_experts, device=x.device) * capacity
    rows = _choice_rows(expert_ids, slots, base)
    out = _scatter_rows(x, rows, num_experts * capacity, weights)
    return out.view(num_experts, capacity, x.shape[1])


def moe_combine(expert_out: Tensor, expert_ids: Tensor, slots: Tensor,
                weights: Optional[Tensor] = None) -> Tensor:
    """[E, C, H] -> [T, H]: y[t] = sum over kept choices of weight * expert_out[e, slot]."""
    e, c, h = expert_out.shape
    base = torch.arange(e, device=expert_out.device) * c
    rows = _choice_rows(expert_ids, slots, base)
    return _gather_rows(expert_out.reshape(e * c, h), rows, weights)


def moe_permute(x: Tensor, expert_ids: Tensor, slots: Tensor, expert_counts: Tensor
                ) -> Tuple[Tensor, Tensor]:
    """Dropless: x [T, H] -> (packed [sum(counts), H] expert-contiguous, offsets [E+1] int32)."""
    counts = expert_counts.long()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    rows = _choice_rows(expert_ids, slots, offsets[:-1])
    packed = _scatter_rows(x, rows, int(offsets[-1]), None)
    return packed, offsets.to(torch.int32)


def moe_unpermute(packed: Tensor, expert_ids: Tensor, slots: Tensor, offsets: Tensor,
                  weights: Optional[Tensor] = None) -> Tensor:
    """packed [N, H] -> [T, H]: y[t] = sum over kept choices of weight * packed[offsets[e] + slot]."""
    rows = _choice_rows(expert_ids, slots, offsets.long()[:-1])
    return _gather_rows(packed, rows, weights)


def moe_rows_dot(rows: Tensor, other: Tensor, expert_ids: Tensor, slots: Tensor,
                 row_base: Tensor) -> Tensor:
    """out[t, j] = <other[t], rows[row_base[e] + slot]> in the compute dtype, summed as 32
    strided partial sums (h = l, l + 32, ...) then halved; 0 for dropped choices."""
    cdt = torch.float64 if rows.dtype == torch.float64 else torch.float32
    r = _choice_rows(expert_ids, slots, row_base.long())
    t, k = r.shape
    h = rows.shape[1]
    prod = rows[r.clamp(min=0)].to(cdt) * other.to(cdt)[:, None, :]          # [T, k, H]
    width = -(-h // _WARP) * _WARP
    prod = torch.nn.functional.pad(prod, (0, width - h)).view(t, k, width // _WARP, _WARP)
    acc = torch.zeros(t, k, _WARP, dtype=cdt, device=rows.device)
    for i in range(prod.shape[2]):
        acc = acc + prod[:, :, i, :]
    half = _WARP // 2
    while half >= 1:
        acc = acc[..., :half] + acc[..., half:2 * half]
        half //= 2
    return torch.where(r >= 0, acc[..., 0], torch.zeros_like(acc[..., 0]))


# ---------------------------------------------------------------------------
# Attention: exact (materialised) cross-attention, the kernels' semantics
# ---------------------------------------------------------------------------
#
# s = softmax_scale * q.k over the visible keys (not padding; if causal,
# j <= i + Lk - Lq, bottom-right aligned), p = softmax(s), out = p.v,
# lse = logsumexp(s). A query that sees no key: out 0, lse -inf, zero gradients.
# Computed in fp32 (fp64 for fp64 inputs) and cast back; differentiable.

__all__ += ["cross_attention", "cross_attention_varlen"]


def _attention_math(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float],
                    key_padding_mask: Optional[Tensor], causal: bool,
                    compute_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> (out [B, Lq, Hq, D] in compute_dtype,
    lse [B, Hq, Lq] in compute_dtype)."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"cross_attention: query heads {hq} must be a multiple of key/value heads {hkv}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qc = q.to(compute_dtype).transpose(1, 2)  # [B, Hq, Lq, D]
    kc = k.to(compute_dtype).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vc = v.to(compute_dtype).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    visible = torch.ones((b, 1, lq, lk), dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        visible = visible & (j <= i + (lk - lq))
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.to(torch.bool)[:, None, None, :]
    s = s.masked_fill(~visible, -math.inf)
    # Softmax is shift-invariant: a detached, finite row max keeps rows that see
    # nothing (all -inf) at exp(-inf) = 0 instead of NaN, gradients included.
    m = s.amax(dim=-1, keepdim=True).detach() if lk > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    seen = l > 0
    p = e / torch.where(seen, l, torch.ones_like(l))
    out = torch.matmul(p, vc).transpose(1, 2)
    lse = torch.where(seen, torch.log(torch.where(seen, l, torch.ones_like(l))) + m,
                      torch.full_like(l, -math.inf))
    # A visible NaN or +inf score leaves the softmax undefined: l is NaN (or inf,
    # the +inf row max having been reset to 0) and the row's out is NaN; its lse
    # is NaN too, as the kernels give it.
    lse = torch.where(torch.isnan(l) | torch.isinf(l), torch.full_like(l, math.nan), lse)
    return out, lse.squeeze(-1)


def _attention_compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                    return_lse: bool = False):
    """Reference for :func:`deepseek_kernels.ops.cross_attention` (same signature):
    materialises the [B, Hq, Lq, Lk] scores in fp32 (fp64 for fp64 inputs)."""
    out, lse = _attention_math(q, k, v, softmax_scale, key_padding_mask, causal,
                               _attention_compute_dtype(q))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def cross_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           return_lse: bool = False):
    """Reference for :func:`deepseek_kernels.ops.cross_attention_varlen`: one padded
    reference call per sample (lse [Hq, total_q])."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    cdt = _attention_compute_dtype(q)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, l = _attention_math(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]],
                               v[None, ck[b]:ck[b + 1]], softmax_scale, None, causal, cdt)
        outs.append(o[0])
        lses.append(l[0])
    hq = q.shape[1]
    out = torch.cat(outs) if outs else q.new_zeros(q.shape, dtype=cdt)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((hq, 0), dtype=cdt)
    out = out.to(q.dtype)
    return (out, lse.float() if cdt == torch.float32 else lse) if return_lse else out

# GEMMs: fp64 compute for the floating-point ops (the tests' high-precision
# reference); the INT8 ops reproduce the kernels' arithmetic bitwise.
# ---------------------------------------------------------------------------

__all__ += ["gemm", "grouped_gemm", "quantize_int8_rowwise", "int8_gemm"]


def _gemm_activation(z: Tensor, activation: str) -> Tensor:
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"gemm: argument 'activation' must be one of none, relu, gelu, gelu_tanh, "
                     f"silu, got {activation!r}")


def gemm(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: str = "none",
         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """act(a @ weight.T + bias) computed in fp64, rounded once to out_dtype (default a's)."""
    z = a.to(torch.float64) @ weight.to(torch.float64).t()
    if bias is not None:
        z = z + bias.to(torch.float64)
    return _gemm_activation(z, activation).to(out_dtype or a.dtype)


def grouped_gemm(x: Tensor, weights: Tensor, offsets: Tensor, *,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ weights[e].T in fp64."""
    bounds = offsets.tolist()
    out = torch.zeros(x.shape[0], weights.shape[1], dtype=torch.float64, device=x.device)
    for e in range(weights.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        out[lo:hi] = x[lo:hi].to(torch.float64) @ weights[e].to(torch.float64).t()
    return out.to(out_dtype or x.dtype)


def quantize_int8_rowwise(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row absmax INT8: scale = amax / 127 (fp32; 1 if 0; NaN for a non-finite row),
    q = clamp(round_half_even(x / scale), -127, 127) (0 for a non-finite row)."""
    xf = x.to(torch.float32)
    finite = torch.isfinite(xf).all(dim=1)
    amax = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf)).amax(dim=1) \
        if xf.shape[1] > 0 else xf.new_zeros(xf.shape[0])
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its
    # reciprocal, which is not the correctly rounded quotient the kernels compute
    scales = amax / _c(127.0, amax)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    q = torch.clamp(torch.round(xf / scales[:, None]), -127, 127)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    return q.to(torch.int8), scales


def int8_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, *,
              bias: Optional[Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Exact integer products (fp64 holds |acc| <= 127^2 K exactly), then the kernels'
    fp32 steps: (float(acc) * a_scale) * w_scale (+ bias), one rounding to out_dtype."""
    acc = a.to(torch.float64) @ w.to(torch.float64).t()
    out = (acc.to(torch.float32) * a_scales[:, None]) * w_scales[None, :]
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


__all__ += ["quantize_fp8", "fp8_gemm", "fp8_grouped_gemm"]

_FP8_BLOCK = 128


def quantize_fp8(x: Tensor, block: Tuple[int, int] = (1, 128)) -> Tuple[Tensor, Tensor]:
    """Block absmax e4m3: scale = amax / 448 (fp32; 1 if 0; NaN for a non-finite block),
    code = e4m3(clamp(x / scale, -448, 448)) rounded to nearest even. 3-D x: per matrix."""
    if x.dim() == 3:
        parts = [quantize_fp8(m, block) for m in x]
        if not parts:
            rows, cols = -(-x.shape[1] // block[0]), -(-x.shape[2] // _FP8_BLOCK)
            return x.to(torch.float8_e4m3fn), x.new_empty((0, rows, cols), dtype=torch.float32)
        return torch.stack([q for q, _ in parts]), torch.stack([sc for _, sc in parts])
    br = block[0]
    m, k = x.shape
    rb, cb = -(-m // br), -(-k // _FP8_BLOCK)
    xf = x.to(torch.float32)
    pad = torch.nn.functional.pad(xf, (0, cb * _FP8_BLOCK - k, 0, rb * br - m))
    tiles = pad.view(rb, br, cb, _FP8_BLOCK)
    finite = torch.isfinite(tiles).all(dim=3).all(dim=1)
    amax = torch.where(torch.isfinite(tiles), tiles.abs(), torch.zeros_like(tiles)).amax(dim=3).amax(dim=1)
    scales = amax / _c(448.0, amax)  # tensor divisor: see quantize_int8_rowwise
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    full = scales.repeat_interleave(br, 0)[:m].repeat_interleave(_FP8_BLOCK, 1)[:, :k]
    ok = finite.repeat_interleave(br, 0)[:m].repeat_interleave(_FP8_BLOCK, 1)[:, :k]
    v = torch.where(ok, xf / full, torch.zeros_like(xf)).clamp(-448.0, 448.0)
    return v.to(torch.float8_e4m3fn), scales


def fp8_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, *,
             out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The kernels' order: per K block, an fp32 sum over k ascending, then
    acc = acc + (part * a_scale) * w_scale in fp32, block by block."""
    m, k = a.shape
    n = w.shape[0]
    af, wf = a.to(torch.float32), w.to(torch.float32)
    w_rows = w_scales.repeat_interleave(_FP8_BLOCK, 0)[:n]  # [N, k_blocks]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(-(-k // _FP8_BLOCK)):
        part = torch.zeros(m, n, dtype=torch.float32, device=a.device)
        for kk in range(kb * _FP8_BLOCK, min((kb + 1) * _FP8_BLOCK, k)):
            part = part + af[:, kk, None] * wf[None, :, kk]
        acc = acc + (part * a_scales[:, kb, None]) * w_rows[None, :, kb]
    return acc.to(out_dtype)


def fp8_grouped_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, offsets: Tensor, *,
                     out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """fp8_gemm of each group's rows with its own weights and weight scales."""
    bounds = offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        out[lo:hi] = fp8_gemm(a[lo:hi], a_scales[lo:hi], w[e], w_scales[e], out_dtype=out_dtype)
    return out
