"""Functional API: typed, documented wrappers around ``torch.ops.deepseek_kernels``.

Every op has a fake (meta) implementation registered here so that it works
under ``torch.compile`` and with FakeTensors. Argument checking lives in the
C++ host glue (``csrc/``), in one place for every caller.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.deepseek_kernels

# The Python autograd layer that torch.library.register_autograd puts in front of
# an op costs ~10 us per call even when no gradient can flow (where it only
# redispatches below autograd): measured on the CPU, that layer is about half the
# host time of a small moe_topk_gating. The wrappers of the differentiable ops
# skip it then. torch.compile traces the op as is.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", None)


def _register_fake(qualname: str, *, dims=None, non_negative=(), positive=()):
    """``torch.library.register_fake(qualname)``, with the checks every fake
    needs before its shapes: all tensor arguments on one device, as the kernels
    require (without it a meta tensor mixed with real ones dispatches to the
    fake, which returns an uninitialised tensor on the first argument's device),
    then the ranks (``dims``: name -> rank or tuple of ranks) and the sizes
    (``non_negative`` / ``positive``: int arguments; None is skipped) the fake
    reads, named as the kernels name them. Without those, torch.compile traced a
    bad call into "Trying to create tensor with negative dimension -1" or "tuple
    index out of range" instead of the kernels' error."""
    op = qualname.split("::")[1]
    dims = dims or {}

    def register(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            first = None
            bound = signature.bind(*args, **kwargs).arguments
            for name, value in bound.items():
                if not isinstance(value, Tensor):
                    continue
                if first is None:
                    first = (name, value.device)
                elif value.device != first[1]:
                    raise ValueError(f"{op}: argument '{name}' must be on the same device as "
                                     f"'{first[0]}' ({first[1]}), got {value.device}")
            for name, rank in dims.items():
                t = bound.get(name)
                ranks = rank if isinstance(rank, tuple) else (rank,)
                if isinstance(t, Tensor) and t.dim() not in ranks:
                    raise ValueError(f"{op}: argument '{name}' must be "
                                     f"{' or '.join(f'{r}-D' for r in ranks)}, got shape {tuple(t.shape)}")
            for names, low, what in ((non_negative, 0, "non-negative"), (positive, 1, "positive")):
                for name in names:
                    value = bound.get(name)
                    if value is not None:
                        torch._check_value(value >= low,
                                           lambda: f"{op}: argument '{name}' must be {what}, got {value}")
            return fake(*args, **kwargs)

        torch.library.register_fake(qualname)(checked)
        return fake

    return register


# The Python kernels of our ops (Autograd, Autocast), registered in one library.
_impl_lib = torch.library.Library("deepseek_kernels", "IMPL")
# qualified name -> (backward, setup_context): the formulas (_torch_library_autograd)
_AUTOGRAD_FORMULAS = {}
# qualified name -> the op's two autograd.Function classes (see _register_autograd)
_FUNCTIONS = {}


def _register_autograd(qualname: str, backward, setup_context) -> None:
    """The op's Autograd kernel, with ``torch.library.register_autograd``'s contract
    (``setup_context(ctx, inputs[, keyword_only_inputs], output)`` with every
    default filled in, ``backward(ctx, *grads)`` returning one gradient per
    positional input), registered the way it registers one.

    Why not register_autograd itself: its kernel rebuilds the schema's defaults on
    every call that needs a gradient (``fill_defaults`` reads ``schema.arguments``
    once per argument), 15-45 us per call on the CPU here for our 5-10 argument
    schemas, 2-5x the op's own host time, and a training forward calls several
    such ops per layer. This one reads the defaults once, here. Its
    autograd.Function also runs under torch.func's transforms (grad, vjp, jacrev),
    where torch.library's raises.
    """
    _AUTOGRAD_FORMULAS[qualname] = (backward, setup_context)
    op = getattr(_ops, qualname.split("::")[1]).default
    args = op._schema.arguments
    pos_defaults = [a.default_value for a in args if not a.kwarg_only]
    kw_defaults = {a.name: a.default_value for a in args if a.kwarg_only}
    takes_kw = bool(kw_defaults)  # as torch.library decides it: the schema has kwarg-only args
    below = torch._C._after_autograd_keyset

    # The dispatcher hands the kernel the positional arguments (those equal to their
    # defaults may be cut off the end) and the kwarg-only ones as kwargs; the
    # Function gets them plus (keyset, kwargs) as its last argument (keyset None:
    # applied from Python, by _call_differentiable under torch.func).
    def forward(*args_then_meta):
        *inputs, (keyset, kwargs) = args_then_meta
        with torch._C._AutoDispatchBelowAutograd():
            if keyset is None:
                return op(*inputs, **kwargs)
            return op.redispatch(keyset & below, *inputs, **kwargs)

    def setup_context_(ctx, args_then_meta, output):
        *inputs, (_, kwargs) = args_then_meta
        inputs = (*inputs, *pos_defaults[len(inputs):])
        if takes_kw:
            setup_context(ctx=ctx, inputs=inputs, keyword_only_inputs={**kw_defaults, **kwargs},
                          output=output)
        else:
            setup_context(ctx=ctx, inputs=inputs, output=output)

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # the trailing metadata is no input
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        grads_in = grads_in if isinstance(grads_in, tuple) else (grads_in,)
        # one per argument passed (the defaulted ones the dispatcher cut off have none)
        n = len(needs) - 1
        return (*grads_in[:n], *([None] * (n - len(grads_in))), None)

    def forward_with_ctx(ctx, *args_then_meta):
        output = forward(*args_then_meta)
        setup_context_(ctx, args_then_meta, output)
        return output

    # Two classes of the same three functions: torch.func's transforms need forward
    # and setup_context apart (applied from Python, not from inside the dispatcher's
    # Autograd key), which costs ~15 us more per call than forward(ctx, ...).
    name = "DskAutograd_" + qualname.replace("::", "_")
    fast = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx), "backward": staticmethod(backward_)})
    _FUNCTIONS[qualname] = (fast, type(name + "_func", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context_),
        "backward": staticmethod(backward_)}))

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args, **kwargs):
            return fast.apply(*args, (keyset, kwargs))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args, **kwargs)

    _impl_lib.impl(qualname.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


def _torch_library_autograd(name: str):
    """``name`` through the Autograd kernel torch.library.register_autograd would have
    registered for our formulas (built, not registered), called as the dispatcher
    calls it, after the Autocast key's casts: what tests/test_eager_autograd.py and
    bench/bench_host.py compare ours with."""
    from torch._library import autograd as library_autograd

    qualname = f"deepseek_kernels::{name}"
    impl = library_autograd.make_autograd_impl(getattr(_ops, name).default,
                                               library_autograd.Info(*_AUTOGRAD_FORMULAS[qualname]))

    def call(*args, **kwargs):
        device_type = _autocast_device(qualname, args)
        if device_type is not None:
            args, kwargs = _autocast_args(args, kwargs, device_type)
        cuda = next(a for a in args if isinstance(a, Tensor)).is_cuda
        backend = torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU
        return impl(torch._C.DispatchKeySet(backend), *args, **kwargs)

    return call


def _call_differentiable(op, *args, **kwargs):
    """``op(*args, **kwargs)``, below the autograd layer when no input needs a gradient."""
    if _below_autograd is None or torch.compiler.is_compiling():
        return op(*args, **kwargs)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args, **kwargs):
        return _apply_function(op, args, kwargs)
    with _below_autograd():
        return op(*args, **kwargs)


def _apply_function(op, args, kwargs):
    """The op's autograd.Function (what its Autograd kernel applies) applied from
    here: ~5 us less per call than the dispatcher's way to it (argument parsing,
    the Python kernel's boxing), and the only way torch.func's transforms can run
    it. The Autocast key's casts are done first, as the dispatcher would."""
    name = op._qualified_op_name
    fns = _FUNCTIONS.get(name)
    if fns is None:
        return op(*args, **kwargs)
    fn = fns[1] if torch._C._are_functorch_transforms_active() else fns[0]
    device_type = _autocast_device(name, args)
    if device_type is not None:
        args, kwargs = _autocast_args(args, kwargs, device_type)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS[device_type]):
            return fn.apply(*args, (None, kwargs))
    return fn.apply(*args, (None, kwargs))


def _autocast_device(qualname: str, args) -> Optional[str]:
    """The device type whose torch.autocast casts this call's arguments (one of the
    autocast ops, autocast on for its tensors' device), or None."""
    if qualname not in _AUTOCAST_QUALNAMES:
        return None
    device_type = next(a.device.type for a in args if isinstance(a, Tensor))
    return device_type if device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type) else None


__all__ = [
    "QuantizedTensor",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_sum_int8",
    "quantize_int4",
    "dequantize_int4",
    "dequantize_sum_int4",
    "MoeGating",
    "moe_topk_gating",
    "moe_dispatch",
    "moe_combine",
    "moe_permute",
    "moe_unpermute",
]


class QuantizedTensor(NamedTuple):
    """Result of a blockwise quantization.

    q:         int8 codes [n] (INT8) or uint8 [ceil(n / 2)] holding two 4-bit codes
               per byte, element 2i in the low nibble (INT4).
    scales:    fp32 [ceil(n / block_size)]; NaN for a block holding NaN/Inf.
    nonfinite: bool scalar tensor, True when any element of x was NaN or Inf.
    """

    q: Tensor
    scales: Tensor
    nonfinite: Tensor


# ---------------------------------------------------------------------------
# Blockwise INT8 / INT4 quantization
# ---------------------------------------------------------------------------


def quantize_int8(
    x: Tensor, block_size: int = 256, *, stochastic: bool = False, seed: Optional[int] = None
) -> QuantizedTensor:
    """Blockwise absmax INT8 quantization of ``x`` (any shape, read as flat).

    Args:
        x: fp32, fp16 or bf16 tensor of any shape and layout (CPU or CUDA).
        block_size: elements per scale; the last block may be shorter.
        stochastic: round stochastically (unbiased) instead of half to even.
        seed: seed of the counter-based generator used by stochastic rounding;
            results depend only on (seed, element index), identical on CPU and
            GPU. ``None`` draws a seed from torch's default CPU generator (on the
            host: a CUDA graph keeps the seed drawn at capture for every replay).

    Returns:
        ``QuantizedTensor(q int8 [n], scales fp32 [ceil(n / block_size)],
        nonfinite bool [])``. scale = absmax / 127 per block (1 for an all-zero
        block); a block holding NaN/Inf gets scale NaN and codes 0, and
        ``nonfinite`` is set, so the NaN survives dequantization.
    """
    return QuantizedTensor(*_call_differentiable(_ops.quantize_int8, x, block_size, stochastic=stochastic,
                                                 seed=seed))


def dequantize_int8(
    q: Tensor, scales: Tensor, block_size: int = 256, *, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``q [n] int8``, ``scales [ceil(n / block_size)] fp32``
    -> ``[n]`` in ``out_dtype`` (fp32, fp16 or bf16), each element ``fp32(q) * scale``."""
    return _call_differentiable(_ops.dequantize_int8, q, scales, block_size, out_dtype=out_dtype)


def dequantize_sum_int8(q: Tensor, scales: Tensor, block_size: int = 256) -> Tensor:
    """Sum of W dequantized rows: ``q [W, n] int8``, ``scales [W, ceil(n / block_size)] fp32``
    -> fp32 ``[n]``. Rows are added in order 0..W-1 in fp32, so the result is
    deterministic (the reduce step of a compressed all-reduce)."""
    return _call_differentiable(_ops.dequantize_sum_int8, q, scales, block_size)


def quantize_int4(
    x: Tensor, block_size: int = 256, *, stochastic: bool = False, seed: Optional[int] = None
) -> QuantizedTensor:
    """Blockwise absmax INT4 quantization: like :func:`quantize_int8` with codes in
    [-7, 7] (scale = absmax / 7), packed two per byte into ``q uint8 [ceil(n / 2)]``
    (element 2i in the low nibble, two's complement). ``block_size`` must be even."""
    return QuantizedTensor(*_call_differentiable(_ops.quantize_int4, x, block_size, stochastic=stochastic,
                                                 seed=seed))


def dequantize_int4(
    q: Tensor,
    scales: Tensor,
    numel: int,
    block_size: int = 256,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_int4`: ``q uint8 [ceil(numel / 2)]`` -> ``[numel]`` in
    ``out_dtype``. ``numel`` is needed because an odd count leaves a padding nibble."""
    return _call_differentiable(_ops.dequantize_int4, q, scales, numel, block_size, out_dtype=out_dtype)


def dequantize_sum_int4(q: Tensor, scales: Tensor, numel: int, block_size: int = 256) -> Tensor:
    """Sum of W dequantized INT4 rows: ``q uint8 [W, ceil(numel / 2)]``, ``scales [W, nb]``
    -> fp32 ``[numel]``, rows added in order in fp32."""
    return _call_differentiable(_ops.dequantize_sum_int4, q, scales, numel, block_size)


# ---------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only
# ---------------------------------------------------------------------------


def _num_blocks(n: int, block_size: int) -> int:
    torch._check(block_size > 0, lambda: f"block_size must be positive, got {block_size}")
    return (n + block_size - 1) // block_size


def _check_int4_bytes(op: str, row_bytes, numel) -> None:
    # as the kernels: checked before numel sizes the output (2^62 overflowed it)
    torch._check_value(row_bytes == (numel + 1) // 2, lambda: (
        f"{op}: argument 'q' must hold {(numel + 1) // 2} bytes per row for numel={numel}, got {row_bytes}"))


def _fake_quantize(x: Tensor, block_size: int, packed: bool):
    n = x.numel()
    nb = _num_blocks(n, block_size)
    if packed:
        q = x.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    else:
        q = x.new_empty((n,), dtype=torch.int8)
    return q, x.new_empty((nb,), dtype=torch.float32), x.new_empty((), dtype=torch.bool)


@_register_fake("deepseek_kernels::quantize_int8", positive=("block_size",))
def _(x, block_size=256, *, stochastic=False, seed=None):
    return _fake_quantize(x, block_size, packed=False)


@_register_fake("deepseek_kernels::quantize_int4", positive=("block_size",))
def _(x, block_size=256, *, stochastic=False, seed=None):
    return _fake_quantize(x, block_size, packed=True)


@_register_fake("deepseek_kernels::dequantize_int8", positive=("block_size",))
def _(q, scales, block_size=256, *, out_dtype=None):
    return q.new_empty((q.numel(),), dtype=out_dtype or torch.float32)


@_register_fake("deepseek_kernels::dequantize_int4", non_negative=("numel",), positive=("block_size",))
def _(q, scales, numel, block_size=256, *, out_dtype=None):
    _check_int4_bytes("dequantize_int4", q.numel(), numel)
    return q.new_empty((numel,), dtype=out_dtype or torch.float32)


@_register_fake("deepseek_kernels::dequantize_sum_int8", dims={"q": 2, "scales": 2}, positive=("block_size",))
def _(q, scales, block_size=256):
    return q.new_empty((q.shape[1],), dtype=torch.float32)


@_register_fake("deepseek_kernels::dequantize_sum_int4", dims={"q": 2, "scales": 2}, non_negative=("numel",),
                positive=("block_size",))
def _(q, scales, numel, block_size=256):
    _check_int4_bytes("dequantize_sum_int4", q.shape[1], numel)
    return q.new_empty((numel,), dtype=torch.float32)


# ---------------------------------------------------------------------------
# MoE routing
# ---------------------------------------------------------------------------


class MoeGating(NamedTuple):
    """Result of :func:`moe_topk_gating` (T tokens, E experts, k choices each).

    weights:       fp32 [T, k] (fp64 for fp64 logits): the chosen scores, renormalized
                   over the k choices when asked, times routed_scaling_factor; computed
                   before dropping (a dropped choice keeps its weight, combine skips it).
    expert_ids:    int32 [T, k], descending selection score, ties to the lower index;
                   -1 for a token that is not routed (a non-finite logit or bias).
    slots:         int32 [T, k], the choice's row in its expert's buffer, -1 if dropped.
    expert_counts: int32 [E], choices kept per expert.
    routed_counts: int32 [E], choices routed per expert before dropping
                   (f_i = routed_counts / (k * T) in the balancing loss).
    mean_scores:   fp32 [E] (fp64 for fp64 logits), per-expert mean score over the T tokens (P_i), differentiable.
    """

    weights: Tensor
    expert_ids: Tensor
    slots: Tensor
    expert_counts: Tensor
    routed_counts: Tensor
    mean_scores: Tensor


def moe_topk_gating(
    logits: Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    correction_bias: Optional[Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    capacity: Optional[int] = None,
    drop_policy: str = "position",
) -> MoeGating:
    """Fused top-k MoE gating with group-limited routing and capacity slots.

    Args:
        logits: [T, E] router logits, fp32/fp16/bf16 (fp64 on CPU, for gradcheck);
            E <= 1024, T < 2^31 (counts and slots are int32). Scores are computed
            in fp32 whatever the dtype.
        k: choices per token, 1 <= k <= min(E, 16).
        scoring: "softmax" or "sigmoid".
        correction_bias: [E], added to the scores for *selection only* (DeepSeek-V3's
            aux-loss-free balancing); it gets no gradient.
        n_group, topk_group: keep the topk_group of n_group expert groups with the
            largest (best + second best) selection score, then pick top-k inside them.
        renormalize: divide the k weights by their sum.
        routed_scaling_factor: multiplies the weights.
        capacity: None = dropless (every choice gets a slot); otherwise at most
            ``capacity`` choices kept per expert.
        drop_policy: "position" keeps the earliest tokens; "probability" keeps the
            largest weights (ties: earlier token). Kept slots are numbered in token order.

    Deterministic and bitwise identical on CPU and GPU (the arithmetic is fixed,
    see ``reference.py``). A token with a non-finite logit is never routed
    (expert_ids -1, weights 0, slots -1). Differentiable in ``logits`` through
    ``weights`` and ``mean_scores``.
    """
    return MoeGating(*_call_differentiable(
        _ops.moe_topk_gating, logits, k, correction_bias, scoring=scoring, n_group=n_group,
        topk_group=topk_group, renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor, capacity=capacity, drop_policy=drop_policy))


def moe_dispatch(x: Tensor, expert_ids: Tensor, slots: Tensor, num_experts: int, capacity: int,
                 weights: Optional[Tensor] = None) -> Tensor:
    """Capacity mode: ``x [T, H] -> [num_experts, capacity, H]``; row (e, slot) holds its
    token's row (times its weight, in fp32, when ``weights`` is given); unfilled rows are 0."""
    return _call_differentiable(_ops.moe_dispatch, x, expert_ids, slots, num_experts, capacity, weights)


def moe_combine(expert_out: Tensor, expert_ids: Tensor, slots: Tensor,
                weights: Optional[Tensor] = None) -> Tensor:
    """``expert_out [E, C, H] -> [T, H]``: y[t] = sum over the token's kept choices
    (j = 0..k-1, in fp32) of weight * expert_out[e, slot]; dropped choices add nothing."""
    return _call_differentiable(_ops.moe_combine, expert_out, expert_ids, slots, weights)


def moe_permute(x: Tensor, expert_ids: Tensor, slots: Tensor, expert_counts: Tensor,
                weights: Optional[Tensor] = None, *,
                num_rows: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Dropless mode: ``x [T, H] -> (packed [sum(expert_counts), H], offsets int32 [E+1])``,
    expert e's rows at packed[offsets[e]:offsets[e+1]] in token order (grouped-GEMM
    ready). On CUDA the packed size costs one device-to-host read, unless

    ``num_rows`` is given: packed then has ``num_rows`` rows (static: no host sync,
    and torch.compile sees a fixed shape), the rows past offsets[E] are zero. It
    must be >= sum(expert_counts); ``T * k`` always is (every choice routed at
    most once). The CPU raises otherwise; on CUDA choices past it are skipped, like
    every out-of-range choice there.
    """
    return _call_differentiable(_ops.moe_permute, x, expert_ids, slots, expert_counts, weights,
                                num_rows=num_rows)


def moe_unpermute(packed: Tensor, expert_ids: Tensor, slots: Tensor, offsets: Tensor,
                  weights: Optional[Tensor] = None) -> Tensor:
    """Inverse of :func:`moe_permute` with weights: y[t] = sum over kept choices of
    weight * packed[offsets[e] + slot] (fp32, choice order)."""
    return _call_differentiable(_ops.moe_unpermute, packed, expert_ids, slots, offsets, weights)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@_register_fake("deepseek_kernels::moe_topk_gating", dims={"logits": 2, "correction_bias": 1},
                non_negative=("capacity",), positive=("k",))
def _(logits, k, correction_bias=None, *, scoring="softmax", n_group=1, topk_group=1,
      renormalize=True, routed_scaling_factor=1.0, capacity=None, drop_policy="position"):
    torch._check_value(k <= 16, lambda: f"moe_topk_gating: argument 'k' must be at most 16, got {k}")
    t, e = logits.shape
    cdt = _compute_dtype(logits)
    i32 = torch.int32
    return (logits.new_empty((t, k), dtype=cdt), logits.new_empty((t, k), dtype=i32),
            logits.new_empty((t, k), dtype=i32), logits.new_empty((e,), dtype=i32),
            logits.new_empty((e,), dtype=i32), logits.new_empty((e,), dtype=cdt))


@_register_fake("deepseek_kernels::moe_dispatch", dims={"x": 2, "expert_ids": 2, "slots": 2, "weights": 2},
                non_negative=("capacity",), positive=("num_experts",))
def _(x, expert_ids, slots, num_experts, capacity, weights=None):
    for name, value, what in (("num_experts", num_experts, "expert ids"), ("capacity", capacity, "slots")):
        torch._check_value(value <= 2**31 - 1, lambda: (
            f"moe_dispatch: argument '{name}' must be at most 2147483647 ({what} are int32), got {value}"))
    return x.new_empty((num_experts, capacity, x.shape[1]))


@_register_fake("deepseek_kernels::moe_combine", dims={"expert_out": 3, "expert_ids": 2, "slots": 2, "weights": 2})
def _(expert_out, expert_ids, slots, weights=None):
    return expert_out.new_empty((expert_ids.shape[0], expert_out.shape[2]))


@_register_fake("deepseek_kernels::moe_permute",
                dims={"x": 2, "expert_ids": 2, "slots": 2, "expert_counts": 1, "weights": 2},
                non_negative=("num_rows",))
def _(x, expert_ids, slots, expert_counts, weights=None, *, num_rows=None):
    if num_rows is None:
        num_rows = torch.library.get_ctx().new_dynamic_size()
    else:
        torch._check_value(num_rows <= 2**31 - 1, lambda: (
            f"moe_permute: argument 'num_rows' must be at most 2^31 - 1 (packed rows are addressed by "
            f"int32 offsets), got {num_rows}"))
    return x.new_empty((num_rows, x.shape[1])), x.new_empty((expert_counts.shape[0] + 1,), dtype=torch.int32)


@_register_fake("deepseek_kernels::moe_unpermute",
                dims={"packed": 2, "expert_ids": 2, "slots": 2, "offsets": 1, "weights": 2})
def _(packed, expert_ids, slots, offsets, weights=None):
    return packed.new_empty((expert_ids.shape[0], packed.shape[1]))


# ---------------------------------------------------------------------------
# MoE autograd
# ---------------------------------------------------------------------------


def _gating_setup(ctx, inputs, keyword_only_inputs, output):
    kw = keyword_only_inputs
    ctx.scoring = kw.get("scoring", "softmax")
    ctx.renormalize = kw.get("renormalize", True)
    ctx.scale = kw.get("routed_scaling_factor", 1.0)
    ctx.save_for_backward(inputs[0], output[1])  # logits, expert_ids


def _gating_backward(ctx, grad_w, grad_ids, grad_slots, grad_counts, grad_routed, grad_mean):
    logits, ids = ctx.saved_tensors
    cdt = _compute_dtype(logits)
    x = logits.to(cdt)
    t = x.shape[0]
    valid = (ids[:, :1] >= 0)
    xs = torch.where(valid, x, torch.zeros_like(x))
    p = torch.softmax(xs, dim=1) if ctx.scoring == "softmax" else torch.sigmoid(xs)
    idx = ids.long().clamp(min=0)
    dp = torch.zeros_like(p)
    if grad_w is not None:
        gw = grad_w.to(cdt)
        u = p.gather(1, idx)
        if ctx.renormalize:
            s = u.sum(dim=1, keepdim=True)
            pos = s > 0
            s_safe = torch.where(pos, s, torch.ones_like(s))
            du = torch.where(pos, gw / s_safe - (gw * u).sum(1, keepdim=True) / (s_safe * s_safe), gw)
        else:
            du = gw
        du = du * ctx.scale
        du = torch.where(valid, du, torch.zeros_like(du))
        dp = dp.scatter_add(1, idx, du)
    if grad_mean is not None:
        dp = dp + torch.where(valid, grad_mean.to(cdt)[None, :] / max(t, 1), torch.zeros_like(dp))
    if ctx.scoring == "softmax":
        dl = p * (dp - (p * dp).sum(dim=1, keepdim=True))
    else:
        dl = dp * p * (1 - p)
    dl = torch.where(valid, dl, torch.zeros_like(dl))
    return dl.to(logits.dtype), None, None


def _rows_weight_grad(buf_rows: Tensor, dy: Tensor, expert_ids: Tensor, slots: Tensor,
                      row_base: Tensor, slot_limit: Optional[Tensor] = None,
                      capacity: int = 0) -> Tensor:
    """d weight[t, j] = <dy[t], buf[row(t, j)]> (compute dtype, fixed order), 0 when dropped."""
    return _call_differentiable(_ops.moe_rows_dot, buf_rows.contiguous(), dy.contiguous().to(buf_rows.dtype),
                                expert_ids, slots, row_base.to(torch.int64), slot_limit, capacity)


@_register_fake("deepseek_kernels::moe_rows_dot",
                dims={"rows": 2, "other": 2, "expert_ids": 2, "slots": 2, "row_base": 1, "slot_limit": 1})
def _(rows, other, expert_ids, slots, row_base, slot_limit, capacity):
    return rows.new_empty(tuple(expert_ids.shape), dtype=_compute_dtype(rows))


def _dispatch_setup(ctx, inputs, output):
    x, ids, slots, num_experts, capacity, weights = inputs
    ctx.E, ctx.C = num_experts, capacity
    ctx.has_w = weights is not None
    ctx.save_for_backward(x if ctx.has_w else None, ids, slots, weights)


def _dispatch_backward(ctx, grad):
    x, ids, slots, weights = ctx.saved_tensors
    dx = moe_combine(grad.contiguous(), ids, slots, weights)
    dw = None
    if ctx.has_w and ctx.needs_input_grad[5]:
        base = torch.arange(ctx.E, device=grad.device) * ctx.C
        dw = _rows_weight_grad(grad.reshape(ctx.E * ctx.C, grad.shape[-1]), x, ids, slots, base,
                               capacity=ctx.C).to(weights.dtype)
    return dx, None, None, None, None, dw


def _combine_setup(ctx, inputs, output):
    eo, ids, slots, weights = inputs
    ctx.shape = eo.shape
    ctx.save_for_backward(eo if weights is not None else None, ids, slots, weights)


def _combine_backward(ctx, grad):
    eo, ids, slots, weights = ctx.saved_tensors
    e, c, h = ctx.shape
    deo = moe_dispatch(grad.contiguous(), ids, slots, e, c, weights)
    dw = None
    if weights is not None and ctx.needs_input_grad[3]:
        base = torch.arange(e, device=grad.device) * c
        dw = _rows_weight_grad(eo.reshape(e * c, h), grad, ids, slots, base,
                               capacity=c).to(weights.dtype)
    return deo, None, None, dw


def _permute_setup(ctx, inputs, keyword_only_inputs, output):
    x, ids, slots, counts, weights = inputs  # num_rows only sizes packed: rows past offsets[E] get no gradient
    ctx.has_w = weights is not None
    ctx.save_for_backward(x if ctx.has_w else None, ids, slots, weights, output[1])


def _permute_backward(ctx, grad_packed, grad_offsets):
    x, ids, slots, weights, offsets = ctx.saved_tensors
    dx = moe_unpermute(grad_packed.contiguous(), ids, slots, offsets, weights)
    dw = None
    if ctx.has_w and ctx.needs_input_grad[4]:
        limit = (offsets[1:] - offsets[:-1]).to(torch.int32)
        dw = _rows_weight_grad(grad_packed, x, ids, slots, offsets.long()[:-1], limit).to(weights.dtype)
    return dx, None, None, None, dw


def _unpermute_setup(ctx, inputs, output):
    packed, ids, slots, offsets, weights = inputs
    ctx.rows = packed.shape[0]
    ctx.save_for_backward(packed if weights is not None else None, ids, slots, offsets, weights)


def _unpermute_backward(ctx, grad):
    packed, ids, slots, offsets, weights = ctx.saved_tensors
    # d packed[offsets[e] + slot] = w * dy[t] (one fp32 product, rounded once): a
    # weighted moe_permute of dy into packed's row count (each row is hit at most
    # once; rows no kept choice names are zero).
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    dpacked, _ = moe_permute(grad, ids, slots, counts, weights, num_rows=ctx.rows)
    dw = None
    if weights is not None and ctx.needs_input_grad[4]:
        dw = _rows_weight_grad(packed, grad, ids, slots, offsets.long()[:-1], counts).to(weights.dtype)
    return dpacked, None, None, None, dw


_register_autograd("deepseek_kernels::moe_topk_gating", _gating_backward,
                   setup_context=_gating_setup)
_register_autograd("deepseek_kernels::moe_dispatch", _dispatch_backward,
                   setup_context=_dispatch_setup)
_register_autograd("deepseek_kernels::moe_combine", _combine_backward,
                   setup_context=_combine_setup)
_register_autograd("deepseek_kernels::moe_permute", _permute_backward,
                   setup_context=_permute_setup)
_register_autograd("deepseek_kernels::moe_unpermute", _unpermute_backward,
                   setup_context=_unpermute_setup)


# ---------------------------------------------------------------------------
# Attention: exact FlashAttention-style cross-attention (csrc/attention)
# ---------------------------------------------------------------------------
#
# The forward ops always return (out, lse); the backward ops recompute the
# attention probabilities blockwise from the saved lse (FlashAttention-2) and
# are deterministic on every device (fixed summation order, no atomics).

__all__ += ["cross_attention", "cross_attention_varlen"]


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None, causal: bool = False, return_lse: bool = False,
):
    """Exact attention of ``q`` over ``k``/``v`` without materialising the Lq x Lk matrix.

    Args:
        q: ``[B, Lq, Hq, D]``; k, v: ``[B, Lk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA:
            query head h reads key/value head ``h // (Hq // Hkv)``). CPU: fp32, fp16, bf16
            (fp32 accumulation) and fp64, any D <= 256. CUDA: fp16/bf16, D in
            {16, 32, 64, 96, 128, 256}.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        key_padding_mask: bool ``[B, Lk]``, True marks a key to ignore
            (``nn.MultiheadAttention``'s convention).
        causal: query i sees keys ``j <= i + Lk - Lq`` (aligned bottom-right, as in
            FlashAttention-2; for self-attention Lq == Lk this is the usual mask).
        return_lse: also return the log-sum-exp of the scaled scores, fp32
            ``[B, Hq, Lq]`` (fp64 for fp64 inputs); not differentiable.

    A query that sees no key (all masked) gets output 0, lse ``-inf`` and zero
    gradients; one with a NaN or +inf score gets NaN for both (a NaN in q, k or v
    is never dropped). Differentiable in q, k and v.
    """
    out, lse = _call_differentiable(_ops.cross_attention, q, k, v, softmax_scale, key_padding_mask,
                                    causal)
    return (out, lse) if return_lse else out


def cross_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, softmax_scale: Optional[float] = None,
    causal: bool = False, return_lse: bool = False,
):
    """:func:`cross_attention` over packed samples of independent lengths.

    ``q [total_q, Hq, D]``, ``k``/``v`` ``[total_k, Hkv, D]``; sample b holds query rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    (int32 ``[B + 1]``, starting at 0, non-decreasing; empty samples allowed).
    ``max_seqlen_q/k`` must be >= every sample's length (checked on the CPU only: on
    CUDA the check would need a host sync). ``causal`` aligns bottom-right per sample.
    lse is fp32 ``[Hq, total_q]``.
    """
    out, lse = _call_differentiable(_ops.cross_attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return (out, lse) if return_lse else out


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_register_fake("deepseek_kernels::cross_attention", dims={"q": 4, "k": 4, "v": 4, "key_padding_mask": 2})
def _(q, k, v, softmax_scale=None, key_padding_mask=None, causal=False):
    b, lq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, hq, lq), dtype=_lse_dtype(q))


@_register_fake("deepseek_kernels::cross_attention_backward",
                dims={"dout": 4, "q": 4, "k": 4, "v": 4, "out": 4, "lse": 3, "key_padding_mask": 2})
def _(dout, q, k, v, out, lse, softmax_scale=None, key_padding_mask=None, causal=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@_register_fake("deepseek_kernels::cross_attention_varlen",
                dims={"q": 3, "k": 3, "v": 3, "cu_seqlens_q": 1, "cu_seqlens_k": 1},
                non_negative=("max_seqlen_q", "max_seqlen_k"))
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
      causal=False):
    total_q, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (hq, total_q), dtype=_lse_dtype(q))


@_register_fake("deepseek_kernels::cross_attention_varlen_backward",
                dims={"dout": 3, "q": 3, "k": 3, "v": 3, "out": 3, "lse": 2, "cu_seqlens_q": 1, "cu_seqlens_k": 1},
                non_negative=("max_seqlen_q", "max_seqlen_k"))
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale=None, causal=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, mask, causal = inputs
    ctx.scale, ctx.causal = scale, causal
    # lse is an auxiliary output, not differentiable (a constant to autograd).
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, output[0], output[1], mask)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = _call_differentiable(_ops.cross_attention_backward, dout.contiguous(), q, k, v, out, lse,
                                      ctx.scale, mask, ctx.causal)
    return dq, dk, dv, None, None, None


def _attention_varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    ctx.max_q, ctx.max_k, ctx.scale, ctx.causal = max_q, max_k, scale, causal
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)


def _attention_varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _call_differentiable(
        _ops.cross_attention_varlen_backward, dout.contiguous(), q, k, v, out, lse, cu_q, cu_k,
        ctx.max_q, ctx.max_k, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None, None, None, None


_register_autograd("deepseek_kernels::cross_attention", _attention_backward,
                   setup_context=_attention_setup)
_register_autograd("deepseek_kernels::cross_attention_varlen",
                   _attention_varlen_backward, setup_context=_attention_varlen_setup)

# GEMMs (csrc/gemm)
# ---------------------------------------------------------------------------

GEMM_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

__all__ += ["GEMM_ACTIVATIONS", "gemm", "grouped_gemm", "quantize_int8_rowwise", "int8_gemm"]


def gemm(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: str = "none",
         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``act(a @ weight.T + bias)``: ``a [..., K]``, ``weight [N, K]`` (nn.Linear layout),
    ``bias [N]`` -> ``[..., N]``.

    fp32/fp16/bf16 inputs (fp64 on CPU, for gradcheck), products accumulated in fp32;
    bias and activation ("none", "relu", "gelu", "gelu_tanh", "silu") are applied to the
    fp32 accumulator before the single rounding to ``out_dtype`` (default: a's dtype).
    Differentiable in a, weight and bias (the backward recomputes the pre-activation).
    """
    return _call_differentiable(_ops.gemm, a, weight, bias, activation=activation, out_dtype=out_dtype)


def grouped_gemm(x: Tensor, weights: Tensor, offsets: Tensor, *,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-group GEMM for MoE experts: ``x [S, K]`` packed by group (as
    :func:`moe_permute` produces it), ``weights [E, N, K]``, ``offsets [E + 1]`` int32/int64
    -> ``[S, N]`` with ``out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ weights[e].T``.

    offsets must start at 0, be non-decreasing and end at S (checked on the CPU; on CUDA
    they stay on the device, unchecked, and bad values give an unspecified result but
    never an out-of-bounds access). Differentiable in x and weights.
    """
    return _call_differentiable(_ops.grouped_gemm, x, weights, offsets, out_dtype=out_dtype)


def quantize_int8_rowwise(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric per-row INT8 quantization of ``x [M, K]`` (fp32/fp16/bf16) ->
    ``(q int8 [M, K], scales fp32 [M])``: scale = absmax / 127 (1 for an all-zero row,
    NaN with codes 0 for a row holding NaN/Inf), q = clamp(round_half_even(x / scale)).
    Bitwise identical on CPU and GPU."""
    q, scales = _call_differentiable(_ops.quantize_int8_rowwise, x)
    return q, scales


def int8_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, *,
              bias: Optional[Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """W8A8 GEMM: ``a int8 [M, K]``, ``a_scales fp32 [M]``, ``w int8 [N, K]``, ``w_scales
    fp32 [N]``, optional fp32 ``bias [N]`` -> ``[M, N]`` in ``out_dtype``.

    acc = exact int32 sum of products; out = (float(acc) * a_scales[m]) * w_scales[n]
    (+ bias[n]) in fp32, then one rounding. Bitwise identical on CPU and GPU, with the
    default tensor-core CUDA kernel (v2, K % 16 == 0) and with the dp4a one it falls
    back to (v1, ``DSK_INT8_KERNEL=v1``).
    Not differentiable (inference): a gradient that reaches it raises.
    """
    return _call_differentiable(_ops.int8_gemm, a, a_scales, w, w_scales, bias, out_dtype=out_dtype)


@_register_fake("deepseek_kernels::gemm", dims={"weight": 2, "bias": 1})
def _(a, weight, bias=None, *, activation="none", out_dtype=None):
    torch._check_value(a.dim() >= 1, lambda: f"gemm: argument 'a' must be at least 1-D [..., K], got shape "
                                             f"{tuple(a.shape)}")
    torch._check_value(weight.shape[1] == a.shape[-1], lambda: (
        f"gemm: argument 'weight' must have shape [N, K] with K = {a.shape[-1]} (a's last dimension), "
        f"got {tuple(weight.shape)}"))
    return a.new_empty((*a.shape[:-1], weight.shape[0]), dtype=out_dtype or a.dtype)


@_register_fake("deepseek_kernels::grouped_gemm", dims={"x": 2, "weights": 3, "offsets": 1})
def _(x, weights, offsets, *, out_dtype=None):
    return x.new_empty((x.shape[0], weights.shape[1]), dtype=out_dtype or x.dtype)


@_register_fake("deepseek_kernels::grouped_gemm_wgrad", dims={"dy": 2, "x": 2, "offsets": 1},
                non_negative=("num_groups",))
def _(dy, x, offsets, num_groups):
    torch._check_value(offsets.shape[0] == num_groups + 1, lambda: (
        f"grouped_gemm_wgrad: argument 'offsets' must have shape ({num_groups + 1},), got {tuple(offsets.shape)}"))
    return x.new_empty((num_groups, dy.shape[1], x.shape[1]))


@_register_fake("deepseek_kernels::quantize_int8_rowwise", dims={"x": 2})
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@_register_fake("deepseek_kernels::int8_gemm", dims={"a": 2, "a_scales": 1, "w": 2, "w_scales": 1, "bias": 1})
def _(a, a_scales, w, w_scales, bias=None, *, out_dtype=None):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype or torch.bfloat16)


def _activation_grad(z: Tensor, activation: str) -> Tensor:
    """d act / dz at the pre-activation z (z in the compute dtype)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    if activation == "gelu_tanh":
        c = 0.7978845608028654
        t = torch.tanh(c * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}")


def _gemm_setup(ctx, inputs, keyword_only_inputs, output):
    a, weight, bias = inputs
    ctx.activation = keyword_only_inputs.get("activation", "none")
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, weight, bias)


def _gemm_backward(ctx, grad):
    a, weight, bias = ctx.saved_tensors
    cdt = _compute_dtype(a)
    k, n = weight.shape[1], weight.shape[0]
    m = a.numel() // k if k else math.prod(a.shape[:-1])
    a2 = a.reshape(m, k)
    g = grad.reshape(m, n).to(cdt)
    if ctx.activation != "none":
        # Recompute the pre-activation (fp32 accumulator) rather than keep it alive.
        z = gemm(a2, weight, bias, out_dtype=cdt)
        g = g * _activation_grad(z, ctx.activation)
    g_in = g.to(a.dtype)  # products in the inputs' dtype, as nn.Linear's backward
    da = dw = db = None
    if ctx.needs_input_grad[0]:
        da = (g_in @ weight).reshape(a.shape)
    if ctx.needs_input_grad[1]:
        dw = g_in.t() @ a2
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g.sum(0).to(bias.dtype)
    return da, dw, db


def _grouped_setup(ctx, inputs, keyword_only_inputs, output):
    x, weights, offsets = inputs
    ctx.save_for_backward(x, weights, offsets)


def _grouped_backward(ctx, grad):
    x, weights, offsets = ctx.saved_tensors
    grad = grad.to(x.dtype)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # d x_e = dy_e @ W_e: the same grouped GEMM with W_e^T ([E, K, N]).
        dx = grouped_gemm(grad, weights.transpose(1, 2).contiguous(), offsets)
    if ctx.needs_input_grad[1]:
        # d W_e = dy_e^T @ x_e: one BLAS call per group inside an op (its output shape is
        # static, so torch.compile traces it; on CUDA it reads the bounds: one host sync).
        dw = _call_differentiable(_ops.grouped_gemm_wgrad, grad.contiguous(), x, offsets, weights.shape[0])
    return dx, dw, None


_register_autograd("deepseek_kernels::gemm", _gemm_backward, setup_context=_gemm_setup)
_register_autograd("deepseek_kernels::grouped_gemm", _grouped_backward,
                   setup_context=_grouped_setup)


# FP8 e4m3 block-scaled (DeepSeek-V3 recipe)

__all__ += ["quantize_fp8", "fp8_gemm", "fp8_grouped_gemm"]


def quantize_fp8(x: Tensor, block: Tuple[int, int] = (1, 128)) -> Tuple[Tensor, Tensor]:
    """Block-scaled FP8 e4m3 quantization of ``x [M, K]`` (fp32/fp16/bf16) in one pass.

    ``block=(1, 128)`` (activations) gives ``scales [M, ceil(K/128)]``; ``(128, 128)``
    (weights) gives ``scales [ceil(M/128), ceil(K/128)]``. A 3-D ``x [E, M, K]`` (e.g.
    the experts' weights for :func:`fp8_grouped_gemm`) quantizes each ``x[e]`` on its own
    in the same launch: ``scales [E, ...]``. scale = absmax / 448 in fp32
    (1 for an all-zero block, NaN with codes 0 for a block holding NaN/Inf); code =
    e4m3(x / scale), round to nearest even. Returns ``(q float8_e4m3fn [M, K], scales fp32)``.
    Bitwise identical on CPU and GPU.
    """
    if not isinstance(block, (tuple, list)):
        raise TypeError(f"quantize_fp8: argument 'block' must be (1, 128) or (128, 128), "
                        f"got {type(block).__name__}")
    q, scales = _call_differentiable(_ops.quantize_fp8, x, list(block))
    return q, scales


def fp8_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, *,
             out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``a e4m3 [M, K]`` with ``a_scales [M, ceil(K/128)]`` (1 x 128 blocks) times
    ``w e4m3 [N, K]`` with ``w_scales [ceil(N/128), ceil(K/128)]`` (128 x 128 blocks) ->
    ``[M, N]`` in ``out_dtype``.

    Per 128-wide K block: an fp32 partial sum (k ascending), scaled by the two block
    scales and added to an fp32 accumulator in block order (DeepSeek-V3's promotion of
    partial sums); one rounding at the end. The default CUDA kernel (v3: wgmma, sm_90a;
    else v2: mma.sync, sm_89+; K % 16 == 0, else v1) sums each block on the FP8 tensor
    cores, in their order, and v3 folds it in with one FMA by ``a_scale * w_scale``:
    close to the contract but not bitwise (on an H100 at 4096x7168x16384: 1.1-1.2 ms).
    ``DSK_FP8_KERNEL=v1`` (or the private op ``torch.ops.deepseek_kernels._fp8_cuda_kernel``)
    selects the exact SIMT kernel, bitwise the CPU's and reference.py's (96 ms there).
    Not differentiable: a gradient that reaches it raises.
    """
    return _call_differentiable(_ops.fp8_gemm, a, a_scales, w, w_scales, out_dtype=out_dtype)


def fp8_grouped_gemm(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, offsets: Tensor, *,
                     out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """FP8 block-scaled grouped GEMM for MoE experts: ``a e4m3 [S, K]`` packed by group (as
    :func:`moe_permute` produces it) with ``a_scales [S, ceil(K/128)]`` (1 x 128 blocks),
    ``w e4m3 [E, N, K]`` with ``w_scales [E, ceil(N/128), ceil(K/128)]`` (128 x 128 blocks
    per expert, e.g. ``quantize_fp8`` of each ``w[e]``), ``offsets [E + 1]`` int32/int64 ->
    ``[S, N]`` in ``out_dtype`` with ``out[offsets[e]:offsets[e+1]] =
    fp8_gemm(a[offsets[e]:offsets[e+1]], ..., w[e], w_scales[e])``, bit for bit.

    offsets are checked as in :func:`grouped_gemm` (on the CPU; on CUDA they stay on the
    device). CPU and CUDA agree bitwise with ``DSK_FP8_KERNEL=v1``; the default CUDA
    kernel is the tensor-core one of :func:`fp8_gemm`. Not differentiable: a gradient that
    reaches it raises.
    """
    return _call_differentiable(_ops.fp8_grouped_gemm, a, a_scales, w, w_scales, offsets,
                                out_dtype=out_dtype)


@_register_fake("deepseek_kernels::quantize_fp8", dims={"x": (2, 3)})
def _(x, block=(1, 128)):
    torch._check_value(len(block) == 2 and block[0] in (1, 128) and block[1] == 128,
                       lambda: f"quantize_fp8: argument 'block' must be (1, 128) or (128, 128), got {list(block)}")
    rows = -(-x.shape[-2] // block[0])
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((*x.shape[:-2], rows, -(-x.shape[-1] // 128)), dtype=torch.float32))


@_register_fake("deepseek_kernels::fp8_gemm", dims={"a": 2, "a_scales": 2, "w": 2, "w_scales": 2})
def _(a, a_scales, w, w_scales, *, out_dtype=None):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype or torch.bfloat16)


@_register_fake("deepseek_kernels::fp8_grouped_gemm",
                dims={"a": 2, "a_scales": 2, "w": 3, "w_scales": 3, "offsets": 1})
def _(a, a_scales, w, w_scales, offsets, *, out_dtype=None):
    return a.new_empty((a.shape[0], w.shape[1]), dtype=out_dtype or torch.bfloat16)


# ---------------------------------------------------------------------------
# Ops without a backward: a gradient that reaches one raises
# ---------------------------------------------------------------------------
# Without an autograd registration torch only warns and drops the gradient
# (e.g. int8_gemm's through its scales, which the scales of a quantized x carry):
# a silently wrong gradient. These ops are for inference and communication.
_NO_BACKWARD = {
    "quantize_int8": "rounding to codes has no useful gradient",
    "quantize_int4": "rounding to codes has no useful gradient",
    "quantize_int8_rowwise": "rounding to codes has no useful gradient",
    "quantize_fp8": "rounding to codes has no useful gradient (nn.FP8Linear trains with a "
                    "straight-through backward)",
    "dequantize_int8": "its inputs are codes and scales",
    "dequantize_int4": "its inputs are codes and scales",
    "dequantize_sum_int8": "its inputs are codes and scales",
    "dequantize_sum_int4": "its inputs are codes and scales",
    "int8_gemm": "an inference GEMM on quantized operands (train with gemm)",
    "fp8_gemm": "an inference GEMM on quantized operands (nn.FP8Linear trains with a "
                "straight-through backward)",
    "fp8_grouped_gemm": "an inference GEMM on quantized operands",
    # The ops that only backward formulas call: with create_graph=True their inputs
    # need gradients, and a second backward through them (a gradient penalty) would
    # otherwise get torch's warning and silently wrong second derivatives.
    "cross_attention_backward": "no double backward: second derivatives through cross_attention "
                                "are not implemented (as in FlashAttention)",
    "cross_attention_varlen_backward": "no double backward: second derivatives through "
                                       "cross_attention_varlen are not implemented",
    "grouped_gemm_wgrad": "no double backward: second derivatives through grouped_gemm's weight "
                          "gradient are not implemented",
    "moe_rows_dot": "no double backward: second derivatives through the routing weights of "
                    "moe_dispatch/moe_combine/moe_permute/moe_unpermute are not implemented",
}


def _register_no_backward(name: str, why: str) -> None:
    def backward(ctx, *grads):
        raise RuntimeError(f"deepseek_kernels::{name} is not differentiable ({why}), but a gradient "
                           f"reached it through a floating-point input; detach its inputs, run it "
                           f"under torch.no_grad(), or do not backpropagate through a gradient "
                           f"(create_graph=True)")

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):
        pass

    # Through _register_autograd: the wrappers (and the backward formulas calling the
    # *_backward ops) raise under torch.func's transforms too, not torch.library's
    # "override setup_context" error.
    _register_autograd(f"deepseek_kernels::{name}", backward, setup_context)


for _name, _why in _NO_BACKWARD.items():
    _register_no_backward(_name, _why)


# ---------------------------------------------------------------------------
# Autocast: the matmul-like ops run in the autocast dtype, as torch's do
# ---------------------------------------------------------------------------
# Under torch.autocast, torch.matmul / F.linear / SDPA cast fp32 inputs to the
# autocast dtype ("lower precision fp" ops); ours do the same, at the Autocast
# dispatch keys (above autograd, so the casts are recorded and gradients reach
# the fp32 leaves in fp32). fp64 inputs are left alone, as torch leaves them.
# The other ops compute in fp32 whatever their inputs (gating), move rows
# (dispatch/combine) or take quantized operands: autocast does not touch them.
_AUTOCAST_OPS = ("gemm", "grouped_gemm", "cross_attention", "cross_attention_varlen")
_AUTOCAST_QUALNAMES = frozenset(f"deepseek_kernels::{name}" for name in _AUTOCAST_OPS)
_AUTOCAST_KEYS = {
    "cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU),
    "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA),
}

def _autocast_args(args, kwargs, device_type: str):
    """The arguments with every floating tensor but fp64 in the autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


def _register_autocast(name: str, device_type: str) -> None:
    op = getattr(_ops, name).default
    exclude = _AUTOCAST_KEYS[device_type]

    def kernel(*args, **kwargs):
        args, kwargs = _autocast_args(args, kwargs, device_type)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(*args, **kwargs)

    _impl_lib.impl(name, kernel, "AutocastCPU" if device_type == "cpu" else "AutocastCUDA")


for _name in _AUTOCAST_OPS:
    _register_autocast(_name, "cpu")
    _register_autocast(_name, "cuda")


# ---------------------------------------------------------------------------
# CUDA kernel generations (A/B runs)
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_kernel_choice(op_name: str, version: int) -> Iterator[None]:
    """Select a family's CUDA kernel generation for the block through its private op
    (``"_quant_cuda_kernel"``, ``"_moe_cuda_kernel"``, ``"_gemm_cuda_kernel"``,
    ``"_fp8_cuda_kernel"``, ``"_int8_cuda_kernel"``, ``"_int8_cpu_sums"``, ``"_gemm_cpu_bf16"``, ``"_attention_cuda_kernel"``,
    ``"_attention_cuda_bwd_kernel"``;
    version 0 only asks), then restore the previous choice. The environment variables
    (docs/kernel-generations.md) set the starting one. The ops are catch-alls:
    this works on CPU-only builds too."""
    op = getattr(torch.ops.deepseek_kernels, op_name)
    old = op(version)
    try:
        yield
    finally:
        op(old)
