"""Compressed gradient all-reduce for data-parallel training.

Three pieces, all on top of ``torch.distributed`` and the blockwise quantization
ops of :mod:`deepseek_kernels.ops`:

* :func:`compressed_all_reduce_` averages a tensor across a process group in
  place, sending blockwise INT8 or INT4 codes instead of fp32 values;
* :class:`CompressionState` + :func:`compressed_allreduce_hook`, a
  ``DistributedDataParallel`` communication hook doing the same for gradient
  buckets, with error feedback;
* :class:`TopKState` + :func:`topk_sparsify_hook`, a hook that sends only the
  largest ``fraction`` of each bucket (indices and values), with error feedback.

The algorithm of :func:`compressed_all_reduce_` (``W`` ranks, blocks of ``B``
elements):

1. pad the flat tensor with zeros to ``N``, a multiple of ``W * B``, so that
   every rank owns one shard of ``S = N / W`` elements made of whole blocks;
2. quantize the padded tensor blockwise (one fp32 scale per block);
3. ``all_to_all_single``: rank ``r`` receives every rank's codes and scales for
   shard ``r`` (the reduce-scatter pattern), plus every rank's non-finite flag;
4. the owner of a shard dequantizes and sums the ``W`` rows in rank order
   0..W-1 in fp32 (``dequantize_sum_int8/int4``) and divides by ``W``;
5. the owner quantizes its reduced shard again, and an all-gather gives every
   rank every shard's codes and scales;
6. every rank, the owner included, dequantizes all shards and writes the result
   into the tensor. All ranks therefore hold bit-identical values.

If any rank's input held NaN or Inf, or the fp32 sum of a shard overflowed,
every rank's whole result is NaN (the flags travel with the scales, so this
costs no extra collective): a GradScaler then skips the step on every rank.

Codes, scales and flag of one destination travel in one buffer (4-byte aligned
rows, sent as int32), so each call is two collectives. int32 is supported by
every backend (gloo, NCCL, MPI); gloo in torch >= 2.x also moves int8/uint8,
but the int32 view costs nothing and removes the question.

See docs/distributed.md for usage, the error bound and the byte accounting.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import ops

__all__ = [
    "CommStats",
    "compressed_all_reduce_",
    "CompressionState",
    "compressed_allreduce_hook",
    "TopKState",
    "topk_sparsify_hook",
]

_QMAX = {8: 127, 4: 7}
_M64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _derive_seed(*parts: int) -> int:
    """A well-mixed non-negative int64 seed from a tuple of integers."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h & ((1 << 63) - 1)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return int(bits)


def _effective_block_size(n: int, world: int, block_size: int, bits: int) -> int:
    """``block_size``, or each rank's share of the ``n`` elements where that is
    smaller (even for INT4): a larger block holds one share of data and padding,
    so the cap changes no scale count, only drops padding from the wire (and a
    block_size near 2^63 no longer sizes the padding past any memory)."""
    share = max(-(-n // world), 1)
    if bits == 4:
        share += share % 2
    return min(block_size, share)


def _check_block_size(block_size, bits: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if bits == 4 and block_size % 2:
        raise ValueError(f"block_size must be even for bits=4, got {block_size}")
    return block_size


def _check_nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _group_world_rank(group) -> Tuple[int, int]:
    """(world size, rank in group); (1, 0) without an initialized default group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return world, rank


_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)


def _all_gather_flat(out: Tensor, inp: Tensor, group, world: int) -> None:
    """out [world * len] <- every rank's inp [len], in rank order."""
    if _ALL_GATHER_SINGLE is not None:
        _ALL_GATHER_SINGLE(out, inp, group=group)
    else:  # pragma: no cover - torch without all_gather_into_tensor
        dist.all_gather(list(out.chunk(world)), inp, group=group)


def _as_wire(t: Tensor) -> Tensor:
    """View a 4-byte-aligned uint8 buffer as int32 for the collectives."""
    return t.view(torch.int32)


def _fp32_allreduce_bytes(numel: int, world: int, elem_size: int = 4) -> int:
    """Bytes one rank sends in a bandwidth-optimal (ring) all-reduce of numel elements:
    2 (W - 1) / W of the tensor (reduce-scatter, then all-gather)."""
    return (2 * (world - 1) * elem_size * numel) // world if world > 1 else 0


def _true_div(t: Tensor, d: int) -> Tensor:
    # Divide by a 0-d tensor on t's device, not by a Python scalar: on CUDA a scalar
    # divisor becomes a multiplication by its reciprocal, which rounds differently.
    return t.div_(torch.full((), float(d), dtype=t.dtype, device=t.device))


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


@dataclass
class CommStats:
    """What one compressed all-reduce (or sparsified exchange) put on the wire.

    Byte counts are what *this rank* sends, counted the way a bandwidth-optimal
    implementation of each collective sends them: ``all_to_all_single`` sends W-1
    of its W rows, an all-gather sends this rank's part to W-1 peers, and the
    fp32 reference is a ring all-reduce, ``2 (W - 1) / W * 4 * numel`` bytes.
    With ``world_size == 1`` nothing is sent and every count is 0.
    """

    method: str
    numel: int
    padded_numel: int
    world_size: int
    code_bytes: int = 0  # INT8/INT4 codes (top-k: indices)
    scale_bytes: int = 0  # fp32 block scales (top-k: values)
    flag_bytes: int = 0  # the non-finite flags
    pad_bytes: int = 0  # alignment of the packed rows to 4 bytes
    fp32_allreduce_bytes: int = 0
    nonfinite: Optional[Tensor] = field(default=None, repr=False)
    """bool 0-d tensor on the tensor's device: some rank's input held NaN/Inf.
    Left a tensor so that reading the stats never forces a device sync."""

    @property
    def bytes_sent(self) -> int:
        return self.code_bytes + self.scale_bytes + self.flag_bytes + self.pad_bytes

    @property
    def ratio(self) -> float:
        """bytes_sent / fp32_allreduce_bytes (NaN for a single rank)."""
        if self.fp32_allreduce_bytes == 0:
            return float("nan")
        return self.bytes_sent / self.fp32_allreduce_bytes

    def as_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "numel": self.numel,
            "padded_numel": self.padded_numel,
            "world_size": self.world_size,
            "code_bytes": self.code_bytes,
            "scale_bytes": self.scale_bytes,
            "flag_bytes": self.flag_bytes,
            "pad_bytes": self.pad_bytes,
            "bytes_sent": self.bytes_sent,
            "fp32_allreduce_bytes": self.fp32_allreduce_bytes,
            "ratio": self.ratio,
        }


# ---------------------------------------------------------------------------
# The compressed mean (shared by compressed_all_reduce_ and the hook)
# ---------------------------------------------------------------------------


def _quantized_mean(
    x: Tensor,
    *,
    bits: int,
    block_size: int,
    stochastic: bool,
    seeds: Tuple[Optional[int], Optional[int]],
    group,
    world: int,
    rank: int,
    want_residual: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor], CommStats]:
    """Average the flat fp32 tensor ``x`` [n > 0] across the group.

    Returns ``(mean fp32 [n], nonfinite bool [], residual fp32 [n] or None, stats)``.
    ``mean`` is all NaN when any rank's ``x`` held NaN/Inf. ``residual`` is this
    rank's share of the compression error in the units of ``x``: its own
    stage-1 error ``x - Q1(x)`` plus, on the shard it owns, ``W`` times the
    stage-2 error ``mean_hat - Q2(mean_hat)``; the mean of the residuals over
    the ranks is exactly ``mean(x) - result`` (up to fp32 rounding).
    """
    W, n = world, x.numel()
    B = _effective_block_size(n, W, block_size, bits)
    dev = x.device
    shard = -(-n // (W * B)) * B  # elements per rank: whole blocks
    N = shard * W
    xp = x if N == n else F.pad(x, (0, N - n))

    if bits == 8:
        q, s, nf = ops.quantize_int8(xp, B, stochastic=stochastic, seed=seeds[0])
        cb = shard
    else:
        q, s, nf = ops.quantize_int4(xp, B, stochastic=stochastic, seed=seeds[0])
        cb = shard // 2  # shard is a multiple of the (even) block size
    nbs = shard // B
    cpad = (-cb) % 4
    so = cb + cpad  # byte offset of the scales in a row
    row2 = so + 4 * nbs  # codes | pad | scales
    row1 = row2 + 4  # ... | flag

    # Stage 1: reduce-scatter via all_to_all. Row r of `send` goes to rank r.
    send = torch.empty((W, row1), dtype=torch.uint8, device=dev)
    send[:, :cb] = q.view(torch.uint8).view(W, cb)
    if cpad:
        send[:, cb:so] = 0
    send[:, so:row2] = s.view(torch.uint8).view(W, 4 * nbs)
    send[:, row2:] = nf.to(torch.float32).reshape(1).view(torch.uint8)
    if W > 1:
        recv = torch.empty_like(send)
        dist.all_to_all_single(_as_wire(recv), _as_wire(send), group=group)
    else:
        recv = send
    rq = recv[:, :cb]
    rs = recv[:, so:row2].contiguous().view(torch.float32)  # [W, nbs]
    flags = recv[:, row2:].contiguous().view(torch.float32)  # [W, 1]
    if bits == 8:
        total = ops.dequantize_sum_int8(rq.view(torch.int8), rs, B)
    else:
        total = ops.dequantize_sum_int4(rq, rs, shard, B)
    mean_hat = _true_div(total, W)  # fp32 [shard], in place
    any_nonfinite = flags.amax() > 0

    # Stage 2: the owner re-quantizes its reduced shard; all-gather to everyone.
    if bits == 8:
        q2, s2, _ = ops.quantize_int8(mean_hat, B, stochastic=stochastic, seed=seeds[1])
    else:
        q2, s2, _ = ops.quantize_int4(mean_hat, B, stochastic=stochastic, seed=seeds[1])
    send2 = torch.empty(row2, dtype=torch.uint8, device=dev)
    send2[:cb] = q2.view(torch.uint8)
    if cpad:
        send2[cb:so] = 0
    send2[so:] = s2.view(torch.uint8)
    if W > 1:
        recv2 = torch.empty((W, row2), dtype=torch.uint8, device=dev)
        _all_gather_flat(_as_wire(recv2.view(-1)), _as_wire(send2), group, W)
    else:
        recv2 = send2.view(1, row2)
    gq = recv2[:, :cb].reshape(-1)
    gs = recv2[:, so:].contiguous().view(torch.float32).reshape(-1)  # [N / B]
    # A non-finite reduced scale means the fp32 sum overflowed on its owner (finite
    # inputs near the fp32 maximum); the scales are the same on every rank, so
    # every rank sees it: treat it like a non-finite input.
    any_nonfinite = any_nonfinite | ~torch.isfinite(gs).all()
    # Some rank had NaN/Inf: NaN scales make every dequantized value NaN (NaN * 0
    # is NaN), on the scales, 1/block_size of the data, without a host sync.
    gs.masked_fill_(any_nonfinite, float("nan"))
    if bits == 8:
        out = ops.dequantize_int8(gq.view(torch.int8), gs, B)
    else:
        out = ops.dequantize_int4(gq, gs, N, B)

    residual = None
    if want_residual:
        if bits == 8:
            deq1 = ops.dequantize_int8(q, s, B)
        else:
            deq1 = ops.dequantize_int4(q, s, N, B)
        e = xp - deq1
        lo = rank * shard
        e[lo : lo + shard] += W * (mean_hat - out[lo : lo + shard])
        residual = e[:n]

    result = out[:n]

    stats = CommStats(
        method=f"int{bits}",
        numel=n,
        padded_numel=N,
        world_size=W,
        fp32_allreduce_bytes=_fp32_allreduce_bytes(n, W),
        nonfinite=any_nonfinite,
    )
    if W > 1:
        stats.code_bytes = 2 * (W - 1) * cb
        stats.pad_bytes = 2 * (W - 1) * cpad
        stats.scale_bytes = 2 * (W - 1) * 4 * nbs
        stats.flag_bytes = (W - 1) * 4
    return result, any_nonfinite, residual, stats


def _topk_mean(
    x: Tensor, *, k: int, group, world: int, want_residual: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor], CommStats]:
    """Mean over the group of the top-k (by |x|) sparsification of each rank's x [n].

    Every rank all-gathers every rank's (indices, values) and adds them into a
    zero tensor in rank order, so all ranks hold bit-identical results. NaN/Inf
    have the largest |x| and are always sent; when any rank sent one, the whole
    result is NaN on every rank.
    """
    n, W, dev = x.numel(), world, x.device
    _, idx = torch.topk(x.abs(), k, sorted=False)
    vals = x[idx]
    if n < 2**31:
        idx_words = idx.to(torch.int32)
        iw = 1
    else:  # int64 indices travel as two int32 words
        idx_words = idx.view(torch.int32)
        iw = 2
    payload = torch.cat([idx_words, vals.view(torch.int32)])  # int32 [(iw + 1) k]
    if W > 1:
        gathered = torch.empty((W, payload.numel()), dtype=torch.int32, device=dev)
        _all_gather_flat(gathered.view(-1), payload, group, W)
    else:
        gathered = payload.view(1, -1)
    gidx = gathered[:, : iw * k].contiguous()
    gidx = gidx.long() if iw == 1 else gidx.view(torch.int64)
    gvals = gathered[:, iw * k :].contiguous().view(torch.float32)
    out = torch.zeros(n, dtype=torch.float32, device=dev)
    for r in range(W):  # fixed rank order; indices are unique within a row
        out.index_add_(0, gidx[r], gvals[r])
    _true_div(out, W)
    nonfinite = ~torch.isfinite(gvals).all()
    out.masked_fill_(nonfinite, float("nan"))

    residual = None
    if want_residual:
        residual = x.clone()
        residual[idx] = 0  # what was not sent: x - sparse(x)

    stats = CommStats(
        method="topk",
        numel=n,
        padded_numel=n,
        world_size=W,
        fp32_allreduce_bytes=_fp32_allreduce_bytes(n, W),
        nonfinite=nonfinite,
    )
    if W > 1:
        stats.code_bytes = (W - 1) * 4 * iw * k
        stats.scale_bytes = (W - 1) * 4 * k
    return out, nonfinite, residual, stats


# ---------------------------------------------------------------------------
# compressed_all_reduce_
# ---------------------------------------------------------------------------


def compressed_all_reduce_(
    tensor: Tensor,
    *,
    bits: int = 8,
    block_size: int = 256,
    stochastic: bool = False,
    group=None,
    seed: Optional[int] = None,
) -> CommStats:
    """Average ``tensor`` across ``group`` in place, communicating INT8/INT4 codes.

    Args:
        tensor: a floating-point tensor (fp32, fp16, bf16 or fp64) of any shape
            and layout, the same shape on every rank. Arithmetic is fp32; the
            result is cast back to ``tensor.dtype``.
        bits: 8 or 4.
        block_size: elements per fp32 scale (even for ``bits=4``); capped at each
            rank's share of the tensor, ceil(numel / world).
        stochastic: stochastic (unbiased) rounding in both quantization steps.
        group: the process group (``None``: the default group). Without an
            initialized default group the call acts as a single process.
        seed: base seed for stochastic rounding, mixed with the rank and the
            stage so that ranks round independently. ``None`` draws one from
            torch's default CPU generator (advancing it).

    Returns:
        :class:`CommStats` (bytes this rank sent, the fp32 all-reduce
        equivalent, ``nonfinite`` flag).

    All ranks end with bit-identical values. If any rank's tensor held NaN or
    Inf, or the sum over the ranks overflowed fp32, the whole tensor is NaN on
    every rank. With one rank nothing is
    communicated, but the values still go through quantize -> dequantize ->
    re-quantize -> dequantize, so results do not depend on the world size's
    being 1. The error against the exact fp32 mean is bounded per element by
    ``mean_r(s_r) / 2 + t / 2`` (round to nearest; ``mean_r(s_r) + t`` with
    stochastic rounding) plus fp32 rounding terms, ``s_r`` being the element's
    block scale on rank ``r`` and ``t`` the block scale of the reduced block
    (derivation in docs/distributed.md).
    """
    bits = _check_bits(bits)
    block_size = _check_block_size(block_size, bits)
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must have a floating-point dtype, got {tensor.dtype}")
    world, rank = _group_world_rank(group)
    n = tensor.numel()
    if n == 0:
        return CommStats(
            method=f"int{bits}", numel=0, padded_numel=0, world_size=world,
            nonfinite=torch.zeros((), dtype=torch.bool, device=tensor.device),
        )
    seeds: Tuple[Optional[int], Optional[int]] = (None, None)
    if stochastic:
        base = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        seeds = (_derive_seed(base, rank, 1), _derive_seed(base, rank, 2))
    x = tensor.detach().reshape(-1).to(torch.float32)
    result, _, _, stats = _quantized_mean(
        x, bits=bits, block_size=block_size, stochastic=stochastic, seeds=seeds,
        group=group, world=world, rank=rank, want_residual=False,
    )
    with torch.no_grad():
        tensor.copy_(result.view(tensor.shape))
    return stats


# ---------------------------------------------------------------------------
# DDP communication hooks
# ---------------------------------------------------------------------------


def _check_process_group(group):
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    return group


class _Residual:
    """One parameter's error-feedback residual: ``tensor`` fp32 [numel], a view of
    ``owner`` (the residual of the whole bucket it was computed in) at ``offset``."""

    __slots__ = ("tensor", "owner", "offset", "last_seen")

    def __init__(self, tensor: Tensor, owner: Optional[Tensor], offset: int, last_seen: int):
        self.tensor = tensor
        self.owner = owner
        self.offset = offset
        self.last_seen = last_seen


class _HookState:
    """Iteration counting, error-feedback residuals, byte counters, checkpoints.

    Residuals are kept per parameter, not per bucket: DDP rebuilds its buckets
    after its first iteration (and a resumed run starts from the provisional
    layout again), and a bucket index, even with its shapes, does not name the
    same parameters in both layouts. A parameter is numbered the first time a
    bucket holding it reaches the hook; DDP hands buckets to the hook in index
    order and a fresh DDP always starts from the same layout, so the numbers
    are the same in every run of the same model (they name the residuals in a
    checkpoint).
    """

    _STATE_VERSION = 2

    def __init__(self, process_group, error_feedback: bool, start_iter: int, min_numel: int, seed: int):
        self.process_group = _check_process_group(process_group)
        self.error_feedback = bool(error_feedback)
        self.start_iter = _check_nonneg_int("start_iter", start_iter)
        self.min_numel = _check_nonneg_int("min_numel", min_numel)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.iter = 0
        self.wire_bytes = 0
        self.fp32_bytes = 0
        self.compressed_buckets = 0
        self.plain_buckets = 0
        self._param_numbers = WeakIdKeyDictionary()  # parameter -> its number
        self._residuals: Dict[int, _Residual] = {}  # parameter number -> residual

    # -- public ------------------------------------------------------------

    def reset(self) -> None:
        """Forget every residual and restart the iteration count (so the next
        ``start_iter`` iterations are plain all-reduces again). Byte counters stay."""
        self._residuals.clear()
        self.iter = 0

    @property
    def residual_numel(self) -> int:
        """Elements held in error-feedback residuals (fp32)."""
        return sum(r.tensor.numel() for r in self._residuals.values())

    def _config(self) -> Dict[str, Any]:
        return {
            "error_feedback": self.error_feedback,
            "start_iter": self.start_iter,
            "min_numel": self.min_numel,
            "seed": self.seed,
        }

    def state_dict(self) -> Dict[str, Any]:
        """Counters and residuals (copied to the CPU), for ``torch.save``.

        Each residual is stored with the number of the parameter it belongs to
        (see the class docstring), so a resumed run applies it to the same
        parameter. The config is stored for reference; ``load_state_dict`` keeps
        the config this state was constructed with.
        """
        return {
            "version": self._STATE_VERSION,
            "kind": type(self).__name__,
            "config": self._config(),
            "iter": self.iter,
            "wire_bytes": self.wire_bytes,
            "fp32_bytes": self.fp32_bytes,
            "compressed_buckets": self.compressed_buckets,
            "plain_buckets": self.plain_buckets,
            "residuals": [
                {"param": num, "residual": r.tensor.detach().to("cpu", copy=True)}
                for num, r in sorted(self._residuals.items())
            ],
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore counters and residuals saved by :meth:`state_dict`. Residuals
        move to the gradients' device on first use. A version-1 state (residuals
        per bucket, which could name the wrong parameters) restores the counters
        and drops the residuals, with a warning."""
        if state_dict.get("kind") not in (None, type(self).__name__):
            raise ValueError(
                f"state_dict is from a {state_dict.get('kind')}, cannot load it into a {type(self).__name__}"
            )
        version = int(state_dict.get("version", 1))
        if version > self._STATE_VERSION:
            raise ValueError(
                f"state_dict has version {version}; this deepseek_kernels reads versions 1 to {self._STATE_VERSION}"
            )
        self.iter = int(state_dict["iter"])
        self.wire_bytes = int(state_dict.get("wire_bytes", 0))
        self.fp32_bytes = int(state_dict.get("fp32_bytes", 0))
        self.compressed_buckets = int(state_dict.get("compressed_buckets", 0))
        self.plain_buckets = int(state_dict.get("plain_buckets", 0))
        self._residuals.clear()
        entries = state_dict.get("residuals", [])
        if version == 1:
            if entries:
                warnings.warn(
                    f"{type(self).__name__}.load_state_dict: a version-1 state keys its error-feedback "
                    "residuals by bucket, which does not identify the parameters; its "
                    f"{len(entries)} residual(s) are dropped (the counters are restored)",
                    stacklevel=2,
                )
            return
        for entry in entries:
            t = entry["residual"].to(torch.float32).reshape(-1)
            # Not seen in the coming iteration yet: a bucket must claim it there,
            # or _end_iteration drops it.
            self._residuals[int(entry["param"])] = _Residual(t, None, 0, self.iter - 1)

    # -- used by the hooks ----------------------------------------------------

    def _world_rank(self) -> Tuple[int, int]:
        return _group_world_rank(self.process_group)

    def _segments(self, bucket, buf: Tensor):
        """[(parameter number, offset, numel)] covering the bucket's buffer, in order.
        DDP lays a bucket out as its parameters' gradients back to back."""
        params = list(bucket.parameters()) if hasattr(bucket, "parameters") else []
        if sum(p.numel() for p in params) != buf.numel():
            raise RuntimeError(
                f"DDP bucket {bucket.index()}: its parameters hold {sum(p.numel() for p in params)} "
                f"elements but its buffer {buf.numel()}; the hook needs the gradients back to back"
            )
        segs, off = [], 0
        for p in params:
            num = self._param_numbers.get(p)
            if num is None:
                num = len(self._param_numbers)
                self._param_numbers[p] = num
            segs.append((num, off, p.numel()))
            off += p.numel()
        return segs

    def _take_residual(self, segs, buf: Tensor) -> Optional[Tensor]:
        """The bucket's residual fp32 [numel] (None when no parameter has one)."""
        found = [self._residuals.get(num) for num, _, _ in segs]
        if all(r is None for r in found):
            return None
        first = found[0]
        if (
            first is not None and first.owner is not None and first.owner.numel() == buf.numel()
            and all(r is not None and r.owner is first.owner and r.offset == off
                    for r, (_, off, _) in zip(found, segs))
        ):
            res = first.owner  # same layout as when it was stored: no copy
        else:  # the layout changed (or a restored state): assemble per parameter
            res = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
            for r, (_, off, n) in zip(found, segs):
                if r is not None:
                    res[off : off + n] = r.tensor
        return res.to(buf.device)

    def _store_residual(self, segs, new: Tensor) -> None:
        for num, off, n in segs:
            self._residuals[num] = _Residual(new[off : off + n], new, off, self.iter)

    def _end_iteration(self) -> None:
        # Every bucket reaches the hook each synchronized iteration, so a residual
        # no bucket claimed belongs to no parameter of this model (a restored state
        # of another model): drop it.
        for num in [num for num, r in self._residuals.items() if r.last_seen != self.iter]:
            del self._residuals[num]
        self.iter += 1

    def _plain_allreduce(self, buf: Tensor, world: int) -> torch.futures.Future:
        self.plain_buckets += 1
        nbytes = _fp32_allreduce_bytes(buf.numel(), world, buf.element_size())
        self.wire_bytes += nbytes
        self.fp32_bytes += _fp32_allreduce_bytes(buf.numel(), world)
        buf.div_(world)
        if world == 1:
            return _completed_future(buf)
        work = dist.all_reduce(buf, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def _exchange(self, x: Tensor, bucket_index: int, world: int, rank: int, want_residual: bool):
        raise NotImplementedError

    def _run(self, bucket) -> torch.futures.Future:
        buf = bucket.buffer()
        world, rank = self._world_rank()
        is_last = bucket.is_last()
        segs = self._segments(bucket, buf) if self.error_feedback else []
        old = self._take_residual(segs, buf) if segs else None
        if self.iter < self.start_iter or buf.numel() < self.min_numel or buf.numel() == 0:
            if old is not None:
                # The bucket went plain (after a rebuild, or min_numel): an exact
                # all-reduce re-injects the whole residual, which is then spent.
                buf.copy_(buf.to(torch.float32) + old)
                for num, _, _ in segs:
                    self._residuals.pop(num, None)
            fut = self._plain_allreduce(buf, world)
        else:
            # fp32 view of the gradient (the bucket itself when fp32: it is only
            # read until the result is written back below).
            x = buf.detach().to(torch.float32)
            if old is not None:
                x = x + old
            result, nonfinite, residual, stats = self._exchange(
                x, bucket.index(), world, rank, self.error_feedback
            )
            buf.copy_(result)
            if self.error_feedback:
                if buf.dtype != torch.float32:
                    # the bucket's dtype rounds the mean: feed that error back too
                    residual += result - buf.to(torch.float32)
                # On a non-finite step (GradScaler will skip it) keep the old
                # residual: the NaN must not leak into the next steps. No host sync.
                keep = old if old is not None else torch.zeros_like(residual)
                self._store_residual(segs, torch.where(nonfinite, keep, residual))
            self.compressed_buckets += 1
            self.wire_bytes += stats.bytes_sent
            self.fp32_bytes += stats.fp32_allreduce_bytes
            fut = _completed_future(buf)
        if is_last:
            self._end_iteration()
        return fut


def _completed_future(t: Tensor) -> torch.futures.Future:
    fut = torch.futures.Future(devices=[t.device]) if t.is_cuda else torch.futures.Future()
    fut.set_result(t)
    return fut


class CompressionState(_HookState):
    """State of :func:`compressed_allreduce_hook`.

    Args:
        process_group: the group to reduce over (``None``: the default group).
        bits: 8 or 4.
        block_size: elements per fp32 scale (even for ``bits=4``).
        stochastic: stochastic rounding (seeded from ``seed``, the iteration,
            the bucket index and the rank: reproducible, independent across ranks).
        error_feedback: carry each rank's compression error (and the rounding
            of the mean to a bf16/fp16 bucket) into its next gradient of the
            same parameters (an fp32 residual per parameter).
        start_iter: the first ``start_iter`` iterations use a plain (exact)
            all-reduce. DDP builds its final buckets after its first iteration.
        min_numel: buckets with fewer elements use a plain all-reduce (latency
            dominates them, and padding to world x block costs more there).
        seed: base seed for stochastic rounding.

    Counters: ``iter`` (communication iterations seen: backward passes that
    synchronized; ``no_sync`` passes do not count), ``wire_bytes`` (bytes this
    rank sent, plain all-reduces included), ``fp32_bytes`` (what fp32 ring
    all-reduces of the same buckets would have sent), ``compressed_buckets``,
    ``plain_buckets``.
    """

    def __init__(
        self,
        process_group=None,
        bits: int = 8,
        block_size: int = 256,
        stochastic: bool = False,
        error_feedback: bool = True,
        start_iter: int = 2,
        min_numel: int = 32768,
        seed: int = 0,
    ):
        self.bits = _check_bits(bits)
        self.block_size = _check_block_size(block_size, self.bits)
        self.stochastic = bool(stochastic)
        super().__init__(process_group, error_feedback, start_iter, min_numel, seed)

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "bits": self.bits, "block_size": self.block_size,
                "stochastic": self.stochastic}

    def _exchange(self, x, bucket_index, world, rank, want_residual):
        seeds: Tuple[Optional[int], Optional[int]] = (None, None)
        if self.stochastic:
            seeds = (
                _derive_seed(self.seed, self.iter, bucket_index, rank, 1),
                _derive_seed(self.seed, self.iter, bucket_index, rank, 2),
            )
        return _quantized_mean(
            x, bits=self.bits, block_size=self.block_size, stochastic=self.stochastic,
            seeds=seeds, group=self.process_group, world=world, rank=rank,
            want_residual=want_residual,
        )


def compressed_allreduce_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket with :func:`compressed_all_reduce_`'s
    algorithm, with error feedback.

    ``ddp.register_comm_hook(CompressionState(bits=8), compressed_allreduce_hook)``

    The bucket arrives as the local (un-averaged) gradient; the hook adds this
    rank's residual, averages across ranks with INT8/INT4 codes, stores the new
    residual, and writes the mean into the bucket. Collectives are issued in the
    hook itself, in bucket order (the same on every rank): on NCCL they are
    stream-ordered and the host does not wait; on gloo the call blocks until
    the bucket is reduced.
    """
    return state._run(bucket)


class TopKState(_HookState):
    """State of :func:`topk_sparsify_hook`.

    Args:
        fraction: fraction of each bucket's elements to send, ``0 < fraction <= 1``
            (at least one element).
        error_feedback: carry what was not sent into the next iteration.
        process_group, start_iter, min_numel, seed: as in :class:`CompressionState`.

    Each rank sends ``k = ceil(fraction * n)`` (index, value) pairs, int32
    indices (int64 for buckets of 2**31 elements or more) and fp32 values, with
    an all-gather, so the bytes sent grow with the world size: per rank
    ``(W - 1) * 8k`` against ``2 (W - 1) / W * 4n`` for an fp32 all-reduce, a
    ratio of ``W * fraction`` (0.1 at 2 ranks and 5 %, 0.4 at 8 ranks, and no
    saving at all from ``W = 1 / fraction`` ranks on).
    """

    def __init__(
        self,
        fraction: float = 0.05,
        error_feedback: bool = True,
        process_group=None,
        start_iter: int = 2,
        min_numel: int = 32768,
        seed: int = 0,
    ):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
        if not (0.0 < float(fraction) <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        super().__init__(process_group, error_feedback, start_iter, min_numel, seed)

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "fraction": self.fraction}

    def _exchange(self, x, bucket_index, world, rank, want_residual):
        n = x.numel()
        k = min(n, max(1, math.ceil(self.fraction * n)))
        return _topk_mean(x, k=k, group=self.process_group, world=world, want_residual=want_residual)


def topk_sparsify_hook(
    state: TopKState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: every rank sends the largest-|g| ``state.fraction``
    of its bucket (after adding its residual); the mean of the sparse gradients,
    identical on every rank, is written into the bucket.

    ``ddp.register_comm_hook(TopKState(fraction=0.05), topk_sparsify_hook)``
    """
    return state._run(bucket)
