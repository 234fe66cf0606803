"""Modules built on the kernels: :class:`MoELayer`, a DeepSeek-style MoE FFN."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import moe as _moe
from . import ops as _ops
from . import reference as _reference

__all__ = ["MoELayer", "CrossAttention", "Linear", "FP8Linear", "Int8Linear"]


def _autocast(*tensors: Optional[Tensor]):
    """Under torch.autocast, cast the floating inputs to the autocast dtype here, as
    torch.nn.Linear's matmul would be. The ops cast at their Autocast keys too, but
    the modules' reference path (use_kernels=False, reference.py in fp64) does not,
    and these casts come out contiguous (one pass over a transposed weight, which
    the ops would copy again)."""
    dt = _autocast_dtype(tensors[0].device)
    if dt is None:
        return tensors
    return tuple(t.to(dt, memory_format=torch.contiguous_format)
                 if t is not None and t.is_floating_point() else t for t in tensors)


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward called now is activation
    checkpointing's recompute (reentrant or not). A compiled graph never re-runs the
    Python forward (its partitioner recomputes inside the graph): False there."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """torch.autocast's dtype on ``device``'s type, None where it is off (or the device
    type has no autocast, e.g. meta)."""
    dev = device.type
    if dev not in ("cpu", "cuda", "xpu", "mps", "hpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _output_dtype(x: Tensor) -> torch.dtype:
    """The dtype torch.nn.Linear returns for input ``x``: the autocast dtype under
    torch.autocast (fp64 excepted, as autocast leaves it), else ``x``'s. FP8Linear and
    Int8Linear compute in fp32 whatever it is, then round to it once."""
    dt = _autocast_dtype(x.device) if x.dtype != torch.float64 else None
    return dt if dt is not None else x.dtype


def _check_last_dim(name: str, x: Tensor, size: int) -> None:
    """A clear error where a reshape to [-1, size] would regroup x's elements."""
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name}: the input's last dimension must be {size}, got shape {tuple(x.shape)}")


def _rows(x: Tensor, size: int) -> Tensor:
    """x [..., size] as [rows, size]; reshape(-1, 0) cannot infer the row count."""
    return x.reshape(-1, size) if size else x.reshape(x.shape[:-1].numel(), 0)


def _quantizable(t: Tensor) -> Tensor:
    """What quantize_fp8 and quantize_int8_rowwise take (fp32/fp16/bf16): fp64 (a model
    in .double()) through fp32, far finer than e4m3's 3 mantissa bits or int8's codes."""
    return t.float() if t.dtype == torch.float64 else t


def _apply_keeping_fp32(apply, fn, recurse: bool, tensors) -> nn.Module:
    """``apply(fn, recurse)`` (nn.Module._apply) with the tensors named by ``tensors``
    ((module, attribute) pairs) kept fp32: ``.to(dtype)``, ``.half()``, ``.bfloat16()``
    and ``.double()`` convert every floating parameter and buffer, which would break
    the fp32 contract of these (int8_gemm's scales and bias, the router) and round
    state that accumulates small steps (the correction bias). They follow device moves."""
    saved = []
    for m, name in tensors:
        t = getattr(m, name)
        if t is not None:
            saved.append((m, name, t.detach(), None if t.grad is None else t.grad.detach()))
    out = apply(fn, recurse)
    for m, name, old, old_grad in saved:
        new = getattr(m, name)
        if new is None or new.dtype == torch.float32:
            continue
        if isinstance(new, nn.Parameter):
            with torch.no_grad():
                new.data = old.to(new.device, torch.float32)
            if new.grad is not None:
                g = new.grad if old_grad is None else old_grad
                new.grad = g.to(new.device, torch.float32)
        else:
            m._buffers[name] = old.to(new.device, torch.float32)
    return out


class _FP8GroupedFunction(torch.autograd.Function):
    """Grouped FP8 forward (rows in 1x128 blocks, each group's weight in 128x128 blocks);
    straight-through backward in bf16, as :class:`FP8Linear`'s."""

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, offsets: Tensor, use_kernels: bool,
                out_dtype: torch.dtype) -> Tensor:
        K = _ops if use_kernels else _reference
        qx, sx = K.quantize_fp8(_quantizable(x), (1, 128))
        qw, sw = K.quantize_fp8(_quantizable(weights), (128, 128))
        ctx.save_for_backward(x, weights, offsets)
        ctx.use_kernels = use_kernels
        # fp64 (a model in .double()): an fp32 result, exactly widened
        return K.fp8_grouped_gemm(qx, sx, qw, sw, offsets,
                                  out_dtype=_quantizable(x).dtype).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weights, offsets = ctx.saved_tensors
        gb, xb, wb = dy.to(torch.bfloat16), x.to(torch.bfloat16), weights.to(torch.bfloat16)
        dx = dw = None
        if ctx.use_kernels:
            if ctx.needs_input_grad[0]:
                dx = _ops.grouped_gemm(gb, wb.transpose(1, 2).contiguous(), offsets)
            if ctx.needs_input_grad[1]:
                dw = torch.ops.deepseek_kernels.grouped_gemm_wgrad(gb.contiguous(), xb, offsets,
                                                                    weights.shape[0])
        else:
            bounds = offsets.tolist()
            if ctx.needs_input_grad[0]:
                dx = _reference.grouped_gemm(gb, wb.transpose(1, 2), offsets, out_dtype=torch.bfloat16)
            if ctx.needs_input_grad[1]:
                dw = torch.stack([gb[lo:hi].t() @ xb[lo:hi] for lo, hi in zip(bounds, bounds[1:])])
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(weights.dtype),
                None, None, None)


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts plus optional always-on shared experts.

    ``y = shared(x) + sum_{kept choices} w * expert_e(x)`` with
    ``expert_e(x) = (silu(x W1_e) * (x W3_e)) W2_e``. Routing by
    :func:`deepseek_kernels.moe_topk_gating` (fp32 router). Experts run as
    batched matmuls: capacity mode (``capacity_factor`` set, static shapes,
    ``capacity = ceil(capacity_factor * T * k / E)``) dispatches to
    ``[E, capacity, hidden]`` and runs one ``bmm`` per projection; dropless mode
    (``capacity_factor=None``) permutes into expert-contiguous rows and runs one
    :func:`deepseek_kernels.grouped_gemm` per projection (with ``use_kernels=False``,
    one matmul per expert). With ``fp8=True`` the experts' projections run FP8
    block-scaled (:func:`deepseek_kernels.fp8_grouped_gemm` in both modes: the capacity
    buffer is E groups of ``capacity`` rows), backward straight-through in bf16 as
    :class:`FP8Linear`.

    After each forward (not under torch.export), ``self.aux_loss`` holds ``aux_loss_alpha`` * the balancing
    loss + ``z_loss_coef`` * the router z-loss (0 when both are 0), and
    ``self.last_routed_counts`` the per-expert loads. With ``bias_update_rate > 0``
    the selection bias (``correction_bias`` buffer) is updated after every
    training forward (DeepSeek-V3's aux-loss-free balancing). Under activation
    checkpointing the recompute routes with the bias its forward used and updates
    nothing (one update per step; the gradients of the routing the forward took),
    provided each forward's recompute comes before the next forward, as in
    forward/backward alternation; with several micro-batches in flight (pipeline
    schedules), set ``bias_update_rate=0`` and call
    :func:`deepseek_kernels.moe.update_correction_bias` after the optimizer step.

    The router and ``correction_bias`` stay fp32 whatever ``dtype`` the experts take,
    through ``.to(dtype)``/``.half()``/``.bfloat16()`` too, and the router runs in fp32
    under ``torch.autocast``.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, k: int,
                 num_shared_experts: int = 0, capacity_factor: Optional[float] = None, *,
                 scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 renormalize: bool = True, routed_scaling_factor: float = 1.0,
                 drop_policy: str = "position", aux_loss_alpha: float = 0.0,
                 z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 use_correction_bias: Optional[bool] = None, jitter_eps: float = 0.0,
                 fp8: bool = False, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.hidden, self.ffn_hidden, self.num_experts, self.k = hidden, ffn_hidden, num_experts, k
        if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"MoELayer: capacity_factor must be None or finite and > 0, got {capacity_factor}")
        self.capacity_factor = capacity_factor
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.renormalize, self.routed_scaling_factor = renormalize, routed_scaling_factor
        self.drop_policy = drop_policy
        self.aux_loss_alpha, self.z_loss_coef = aux_loss_alpha, z_loss_coef
        self.bias_update_rate, self.jitter_eps = bias_update_rate, jitter_eps
        self.fp8 = fp8
        self.router = nn.Linear(hidden, num_experts, bias=False, device=device, dtype=torch.float32)
        if use_correction_bias is None:
            use_correction_bias = bias_update_rate > 0
        if use_correction_bias:
            self.register_buffer("correction_bias", torch.zeros(num_experts, device=device,
                                                                dtype=torch.float32))
        else:
            self.correction_bias = None
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden, 2 * ffn_hidden, **fk))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden, **fk))
        # Not reset_parameters(): the router and the shared experts (nn.Linear) draw their
        # init as they are built, so that would draw twice and change every seeded init.
        # The draws here are reset_parameters()'s, in its order.
        self._reset_experts()
        self.shared = None
        if num_shared_experts > 0:
            fs = ffn_hidden * num_shared_experts
            self.shared = nn.ModuleDict({
                "gate_up": nn.Linear(hidden, 2 * fs, bias=False, **fk),
                "down": nn.Linear(fs, hidden, bias=False, **fk),
            })
        self.aux_loss: Tensor = torch.zeros(())
        self.last_routed_counts: Optional[Tensor] = None
        # False: the same parameters through reference.py (pure PyTorch), for A/B runs
        self.use_kernels = True

    def _reset_experts(self) -> None:
        s_in, s_ff = 1.0 / math.sqrt(self.hidden), 1.0 / math.sqrt(self.ffn_hidden)
        with torch.no_grad():
            self.w_gate_up.uniform_(-s_in, s_in)
            self.w_down.uniform_(-s_ff, s_ff)

    def reset_parameters(self) -> None:
        """The constructor's initialisation (the same draws, in the same order), e.g.
        after ``to_empty`` from the meta device; the correction bias back to zero."""
        self.router.reset_parameters()
        self._reset_experts()
        if self.shared is not None:
            self.shared["gate_up"].reset_parameters()
            self.shared["down"].reset_parameters()
        if self.correction_bias is not None:
            with torch.no_grad():
                self.correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp32(super()._apply, fn, recurse,
                                   [(self.router, "weight"), (self, "correction_bias")])

    def __getstate__(self):
        # aux_loss holds the last forward's graph: copy.deepcopy (an EMA copy of the model)
        # raises on a tensor that is not a graph leaf, and a copy cannot backprop into it.
        state = super().__getstate__()
        if isinstance(state.get("aux_loss"), Tensor):
            state["aux_loss"] = state["aux_loss"].detach()
        return state

    def extra_repr(self) -> str:
        s = (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
             f"k={self.k}, capacity_factor={self.capacity_factor}, scoring={self.scoring!r}")
        if self.n_group > 1:
            s += f", n_group={self.n_group}, topk_group={self.topk_group}"
        if self.correction_bias is not None:
            s += f", bias_update_rate={self.bias_update_rate}"
        return s + (", fp8=True" if self.fp8 else "")

    def capacity(self, num_tokens: int) -> int:
        # math.ceil gives an int, and stays symbolic for a symbolic token count (an int()
        # around it would specialize a compiled or exported graph on the count).
        return math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts)

    @staticmethod
    def _swiglu(h: Tensor) -> Tensor:
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    def _fp8_experts(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """SwiGLU experts on expert-contiguous ``rows`` with FP8 projections."""
        # The expert weights are stored [E, in, out]; the grouped GEMMs take [E, out, in].
        w1, w2 = self.w_gate_up.transpose(1, 2), self.w_down.transpose(1, 2)
        # outputs in the dtype the bf16 experts' grouped_gemm would give (autocast's)
        h = self._swiglu(_FP8GroupedFunction.apply(rows, w1, offsets, self.use_kernels,
                                                   _output_dtype(rows)))
        return _FP8GroupedFunction.apply(h, w2, offsets, self.use_kernels, _output_dtype(h))

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` [..., hidden] -> [..., hidden]. ``token_mask``: optional bool
        [...] (x's leading shape), False for tokens to leave out of routing (padding):
        they get no expert (only the shared experts' output), take no capacity slot,
        and count in neither the losses nor the bias update. Capacity is still sized
        from all tokens (a static shape)."""
        _check_last_dim("MoELayer", x, self.hidden)
        shape = x.shape
        x2 = x.reshape(-1, self.hidden)
        t = x2.shape[0]
        mask = None
        if token_mask is not None:
            if token_mask.dtype != torch.bool or token_mask.shape != shape[:-1]:
                raise ValueError(f"MoELayer: token_mask must be bool of shape {tuple(shape[:-1])}, got "
                                 f"{token_mask.dtype} of shape {tuple(token_mask.shape)}")
            if token_mask.device != x.device:
                raise ValueError(f"MoELayer: token_mask must be on {x.device}, got {token_mask.device}")
            mask = token_mask.reshape(-1)
        if _autocast_dtype(x2.device) is not None:
            # An fp32 router, as documented (DeepSeek-V3 keeps gating in fp32): autocast
            # would run nn.Linear in bf16/fp16 and route on rounded logits.
            with torch.autocast(x2.device.type, enabled=False):
                logits = self.router(x2.float())
        else:
            logits = self.router(x2.float())
        logits = _moe.jitter(logits, self.jitter_eps, self.training)
        if x2.dtype == torch.float64:
            logits = logits.double()
        bias = self.correction_bias
        updating = self.training and self.bias_update_rate > 0 and bias is not None
        recomputing = updating and _in_backward()
        if updating and not recomputing:
            # Route with a copy: the in-place update below must not reach a recompute
            # of this forward (activation checkpointing), which routes with this copy.
            bias = self._routing_bias = bias.clone()
        elif recomputing and getattr(self, "_routing_bias", None) is not None:
            bias = self._routing_bias
        cap = self.capacity(t) if self.capacity_factor is not None else None
        K = _ops if self.use_kernels else _reference
        # A row with a non-finite logit is not routed (the gating contract): no
        # expert, no slot, no count, no score mass, zero gradient.
        routed_logits = logits if mask is None else torch.where(
            mask[:, None], logits, torch.full_like(logits, float("nan")))
        g = _ops.MoeGating(*K.moe_topk_gating(
            routed_logits, self.k, scoring=self.scoring, correction_bias=bias, n_group=self.n_group,
            topk_group=self.topk_group, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor, capacity=cap,
            drop_policy=self.drop_policy))
        if cap is not None:
            d = K.moe_dispatch(x2, g.expert_ids, g.slots, self.num_experts, cap)
            if self.fp8:
                rows = torch.arange(self.num_experts + 1, device=x2.device) * cap
                eo = self._fp8_experts(d.reshape(-1, self.hidden), rows).reshape(
                    self.num_experts, cap, self.hidden)
            else:
                h = self._swiglu(torch.bmm(d, self.w_gate_up))
                eo = torch.bmm(h, self.w_down)
            y = K.moe_combine(eo, g.expert_ids, g.slots, g.weights)
        else:
            if self.use_kernels:
                # A static row count, T * k: dropless routing routes every choice of a
                # token with finite logits, so sum(expert_counts) is T * k but for tokens
                # never routed (non-finite logits), whose zero rows pad the end. No
                # device-to-host read on CUDA, and no data-dependent shape, which
                # torch.compile without fullgraph=True meets with a graph break. The
                # padding joins the last expert's group in the grouped GEMMs (computed,
                # never read back by unpermute, zero gradient).
                rows = t * self.k
                packed, offsets = _ops.moe_permute(x2, g.expert_ids, g.slots, g.expert_counts,
                                                   num_rows=rows)
                group_offsets = torch.cat([offsets[:-1], offsets.new_full((1,), rows)])
            else:
                packed, offsets = K.moe_permute(x2, g.expert_ids, g.slots, g.expert_counts)
                group_offsets = offsets
            if self.fp8:
                eo = self._fp8_experts(packed, group_offsets)
            elif self.use_kernels:
                # The expert weights are stored [E, in, out]; grouped_gemm takes [E, out, in].
                packed, w1, w2 = _autocast(packed, self.w_gate_up.transpose(1, 2),
                                           self.w_down.transpose(1, 2))
                h = self._swiglu(_ops.grouped_gemm(packed, w1, group_offsets))
                eo = _ops.grouped_gemm(h, w2, group_offsets)
            else:
                bounds = offsets.tolist()
                outs = []
                for e in range(self.num_experts):
                    rows = packed[bounds[e]:bounds[e + 1]]
                    outs.append(self._swiglu(rows @ self.w_gate_up[e]) @ self.w_down[e])
                eo = torch.cat(outs) if outs else packed
            y = K.moe_unpermute(eo, g.expert_ids, g.slots, offsets, g.weights)
        if self.shared is not None:
            y = y + self.shared["down"](self._swiglu(self.shared["gate_up"](x2)))

        aux = logits.new_zeros((), dtype=torch.float32)
        if self.aux_loss_alpha:
            if mask is None:
                aux = aux + _moe.load_balancing_loss(g.routed_counts, g.mean_scores, self.k, t,
                                                     self.aux_loss_alpha).float()
            else:  # mean_scores is the score mass over all t rows: rescale to the n routed
                n = mask.sum()
                scores = g.mean_scores * (t / n.clamp(min=1).to(g.mean_scores.dtype))
                aux = aux + _moe.load_balancing_loss(g.routed_counts, scores, self.k, n,
                                                     self.aux_loss_alpha).float()
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * _moe.router_z_loss(logits, mask)
        if not torch.compiler.is_exporting():
            # (An exported program has no use for them, and torch.export warns about
            # tensor attributes assigned while it traces.)
            self.aux_loss = aux
            self.last_routed_counts = g.routed_counts
        if updating and not recomputing:
            _moe.update_correction_bias(self.correction_bias, g.routed_counts, self.bias_update_rate)
        # Not a view of y (as F.linear's N-d result is not): FSDP2 warns about a module
        # returning a view, whose in-place update would skip its pre-backward hook. y is
        # a fresh [T, H] tensor no backward saved, so nothing else sees its storage.
        return torch.ops.aten._unsafe_view(y, shape)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

# What the fused kernels take (csrc/attention/attention_api.cpp checks the same).
_CUDA_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_ATTENTION_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
_CPU_ATTENTION_MAX_HEAD_DIM = 256


def _attention_kernels_support(q: Tensor) -> bool:
    d = q.shape[-1]
    if q.device.type == "cuda":
        return q.dtype in _CUDA_ATTENTION_DTYPES and d in _CUDA_ATTENTION_HEAD_DIMS
    return q.device.type == "cpu" and d <= _CPU_ATTENTION_MAX_HEAD_DIM


class CrossAttention(nn.Module):
    """Multi-head (GQA/MQA) cross-attention with q/k/v/out projections.

    ``forward(x [B, Lq, dim], context [B, Lk, kv_dim] = None, key_padding_mask=None,
    causal=False, use_kernels=None)`` -> ``[B, Lq, dim]``. ``context=None`` is
    self-attention on x. ``key_padding_mask`` is bool ``[B, Lk]``, True = ignore the
    key. ``causal`` aligns bottom-right (see :func:`deepseek_kernels.ops.cross_attention`).
    ``use_kernels=False`` runs :func:`deepseek_kernels.reference.cross_attention`
    (plain PyTorch) instead of the fused kernel; ``use_kernels=None`` (the default)
    follows the module's ``use_kernels`` attribute (True unless a model switches it).
    Cases the kernels do not take (on CUDA: fp32 activations, or a head dim outside
    {16, 32, 64, 96, 128, 256}) run the reference too, with a warning (once per call site).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 kv_dim: Optional[int] = None, bias: bool = False,
                 softmax_scale: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"CrossAttention: num_heads={num_heads} and num_kv_heads={num_kv_heads} "
                             "must be >= 1")
        if dim % num_heads != 0:
            raise ValueError(f"CrossAttention: dim={dim} must be a multiple of num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"CrossAttention: num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        fk = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.kv_dim = dim if kv_dim is None else kv_dim
        self.softmax_scale = softmax_scale
        # deepseek_kernels Linear (gemm): the same use_kernels switch applies to them
        self.q_proj = Linear(dim, dim, bias=bias, **fk)
        self.k_proj = Linear(self.kv_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.v_proj = Linear(self.kv_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.out_proj = Linear(dim, dim, bias=bias, **fk)
        self.use_kernels = True

    def reset_parameters(self) -> None:
        """The constructor's initialisation (the projections' draws, in its order)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
        if self.kv_dim != self.dim:
            s += f", kv_dim={self.kv_dim}"
        return s + ("" if self.softmax_scale is None else f", softmax_scale={self.softmax_scale}")

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                use_kernels: Optional[bool] = None) -> Tensor:
        use_kernels = self.use_kernels if use_kernels is None else use_kernels
        ctx = x if context is None else context
        if x.dim() != 3 or ctx.dim() != 3 or ctx.shape[0] != x.shape[0]:
            raise ValueError(f"CrossAttention: x [B, Lq, dim] and context [B, Lk, kv_dim] must be 3-D with "
                             f"one batch size, got {tuple(x.shape)} and {tuple(ctx.shape)}")
        b, lq, _ = x.shape
        lk = ctx.shape[1]
        q = self.q_proj(x).view(b, lq, self.num_heads, self.head_dim)
        k = self.k_proj(ctx).view(b, lk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(ctx).view(b, lk, self.num_kv_heads, self.head_dim)
        if use_kernels and not _attention_kernels_support(q):
            warnings.warn(
                f"CrossAttention: no fused kernel for {q.dtype} head_dim={self.head_dim} on "
                f"{q.device.type} (CUDA takes fp16/bf16 and head dims {_CUDA_ATTENTION_HEAD_DIMS}); "
                "using the PyTorch reference", stacklevel=2)
            use_kernels = False
        attend = _ops.cross_attention if use_kernels else _reference.cross_attention
        o = attend(q, k, v, softmax_scale=self.softmax_scale, key_padding_mask=key_padding_mask,
                   causal=causal)
        return self.out_proj(o.reshape(b, lq, self.dim))

# GEMM modules
# ---------------------------------------------------------------------------

class _GemmLinear(nn.Module):
    """What :class:`Linear`, :class:`FP8Linear` and :class:`Int8Linear` share: the
    activation check, the sizes, the float parameters (the first two), the copy
    from another linear layer and the repr. Private: the three stay unrelated to
    each other for ``isinstance`` (model/generate.py swaps Linear for Int8Linear)."""

    def __init__(self, name: str, in_features: int, out_features: int, activation: str):
        super().__init__()
        if activation not in _ops.GEMM_ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {_ops.GEMM_ACTIVATIONS}, "
                             f"got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation

    def _make_parameters(self, bias: bool, device, dtype) -> None:
        """``weight [out, in]`` and ``bias [out]`` (or None), uninitialised."""
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **fk))
        self.bias = nn.Parameter(torch.empty(self.out_features, **fk)) if bias else None

    def _init_parameters(self) -> None:
        # nn.Linear's initialisation, so swapping modules keeps training dynamics.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @staticmethod
    def _activation_of(linear: nn.Module, activation: Optional[str]) -> str:
        """``activation``, or for None ``linear``'s own (``"none"`` when it has none)."""
        return getattr(linear, "activation", "none") if activation is None else activation

    @classmethod
    def _empty_like(cls, linear: nn.Module, activation: str, **kwargs):
        """A ``cls`` with ``linear``'s sizes, bias or not, and device."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                   device=linear.weight.device, **kwargs)

    @classmethod
    def _copy_of(cls, linear: nn.Module, activation: str):
        """A ``cls`` with ``linear``'s dtype, holding copies of its parameters."""
        m = cls._empty_like(linear, activation, dtype=linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")


class Linear(_GemmLinear):
    """Drop-in for :class:`torch.nn.Linear` (``weight [out, in]``, same init) running
    :func:`deepseek_kernels.gemm`, with an optional activation fused into the epilogue
    (``"none"``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none", device=None, dtype=None):
        super().__init__("Linear", in_features, out_features, activation)
        self._make_parameters(bias, device, dtype)
        # False: the same parameters through reference.py (pure PyTorch), for A/B runs
        self.use_kernels = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, activation: Optional[str] = None) -> "Linear":
        """A Linear sharing nothing with ``linear`` but holding copies of its parameters;
        ``activation=None``: ``linear``'s own (``"none"`` for a torch.nn.Linear), as
        FP8Linear's and Int8Linear's (a "none" default dropped an FP8Linear's activation)."""
        return cls._copy_of(linear, cls._activation_of(linear, activation))

    def forward(self, x: Tensor) -> Tensor:
        K = _ops if self.use_kernels else _reference
        x, w, b = _autocast(x, self.weight, self.bias)
        return K.gemm(x, w, b, activation=self.activation)


class _FP8LinearFunction(torch.autograd.Function):
    """FP8 forward (1x128 activation blocks, 128x128 weight blocks); straight-through
    backward: the gradients of the unquantized linear map, computed in bf16."""

    @staticmethod
    def forward(ctx, x2: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                use_kernels: bool, out_dtype: torch.dtype) -> Tensor:
        K = _ops if use_kernels else _reference
        qx, sx = K.quantize_fp8(_quantizable(x2), (1, 128))
        qw, sw = K.quantize_fp8(_quantizable(weight), (128, 128))
        # fp32 out: bias and activation on the fp32 result, one rounding at the end.
        z = K.fp8_gemm(qx, sx, qw, sw, out_dtype=torch.float32)
        if bias is not None:
            z = z + bias.float()
        ctx.save_for_backward(x2, weight, z if activation != "none" else None)
        ctx.has_bias, ctx.activation = bias is not None, activation
        return _reference._gemm_activation(z, activation).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, z = ctx.saved_tensors
        g = dy.float()
        if ctx.activation != "none":
            g = g * _ops._activation_grad(z, ctx.activation)
        gb = g.to(torch.bfloat16)
        dx = (gb @ weight.to(torch.bfloat16)).to(x2.dtype) if ctx.needs_input_grad[0] else None
        dw = (gb.t() @ x2.to(torch.bfloat16)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


class FP8Linear(_GemmLinear):
    """Linear layer with an FP8 e4m3 forward (DeepSeek-V3 recipe): activations quantized
    per 1x128 block, the (fp32/bf16 master) weight per 128x128 block, on every forward;
    :func:`deepseek_kernels.fp8_gemm` accumulates per-block partial sums in fp32.
    Bias and the optional activation (as :class:`Linear`) apply to the fp32 result,
    rounded once to the dtype torch.nn.Linear would return: the input's, or the
    autocast dtype under torch.autocast (fp64 inputs and weights quantize through fp32).
    Backward is straight-through in bf16 (gradients of the unquantized linear map,
    through the activation at the FP8 pre-activation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none", device=None, dtype=None):
        super().__init__("FP8Linear", in_features, out_features, activation)
        self._make_parameters(bias, device, dtype)
        self.use_kernels = True  # False: reference.py's (bitwise equal) FP8 ops
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, activation: Optional[str] = None) -> "FP8Linear":
        return cls._copy_of(linear, cls._activation_of(linear, activation))

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("FP8Linear", x, self.in_features)
        x2 = _rows(x, self.in_features)
        y = _FP8LinearFunction.apply(x2, self.weight, self.bias, self.activation, self.use_kernels,
                                     _output_dtype(x))
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(_GemmLinear):
    """W8A8 inference Linear: the weight quantized per output row once
    (:func:`deepseek_kernels.quantize_int8_rowwise`), activations per row on every
    forward, :func:`deepseek_kernels.int8_gemm` (exact int32 accumulation, fp32
    bias), then the activation; the output in the dtype torch.nn.Linear would return
    (the input's, or the autocast dtype under torch.autocast; fp64 inputs quantize
    through fp32). Built from a trained layer with :meth:`from_linear`; holds buffers,
    not parameters (no training). ``weight_scales`` and ``bias`` stay fp32 (int8_gemm's
    contract) through ``.to(dtype)``/``.half()``/``.bfloat16()``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none", device=None):
        super().__init__("Int8Linear", in_features, out_features, activation)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                     device=device))
        self.register_buffer("weight_scales", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.use_kernels = True  # False: reference.py's (bitwise equal) INT8 ops

    def reset_parameters(self) -> None:
        """The constructor's state (codes 0, scales 1, bias 0), e.g. after ``to_empty``
        from the meta device; load a state dict or use :meth:`from_linear` for weights."""
        with torch.no_grad():
            self.weight_q.zero_()
            self.weight_scales.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp32(super()._apply, fn, recurse,
                                   [(self, "weight_scales"), (self, "bias")])

    @classmethod
    def from_linear(cls, linear: nn.Module, activation: Optional[str] = None) -> "Int8Linear":
        m = cls._empty_like(linear, cls._activation_of(linear, activation))
        with torch.no_grad():
            w = linear.weight.detach()
            q, s = _ops.quantize_int8_rowwise(_quantizable(w))
            m.weight_q.copy_(q)
            m.weight_scales.copy_(s)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        return m

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("Int8Linear", x, self.in_features)
        K = _ops if self.use_kernels else _reference
        x2 = _rows(x, self.in_features)
        out_dtype = _output_dtype(x)
        # fp32 out where the activation follows (one rounding after it) or for fp64
        # (an fp32 result, exactly widened below, as FP8Linear)
        fp32_out = self.activation != "none" or out_dtype == torch.float64
        qx, sx = K.quantize_int8_rowwise(_quantizable(x2))
        y = K.int8_gemm(qx, sx, self.weight_q, self.weight_scales, bias=self.bias,
                        out_dtype=torch.float32 if fp32_out else out_dtype)
        y = _reference._gemm_activation(y, self.activation)
        return y.reshape(*x.shape[:-1], self.out_features).to(out_dtype)
