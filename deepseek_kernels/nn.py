"""Modules built on the kernels: :class:`MoELayer`, a DeepSeek-style MoE FFN."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import moe as _moe
from . import ops as _ops
from . import reference as _reference

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts plus optional always-on shared experts.

    ``y = shared(x) + sum_{kept choices} w * expert_e(x)`` with
    ``expert_e(x) = (silu(x W1_e) * (x W3_e)) W2_e``. Routing by
    :func:`deepseek_kernels.moe_topk_gating` (fp32 router). Experts run as
    batched matmuls: capacity mode (``capacity_factor`` set, static shapes,
    ``capacity = ceil(capacity_factor * T * k / E)``) dispatches to
    ``[E, capacity, hidden]`` and runs one ``bmm`` per projection; dropless mode
    (``capacity_factor=None``) permutes into expert-contiguous rows and runs one
    matmul per expert (a grouped GEMM will replace it).

    After each forward, ``self.aux_loss`` holds ``aux_loss_alpha`` * the balancing
    loss + ``z_loss_coef`` * the router z-loss (0 when both are 0), and
    ``self.last_routed_counts`` the per-expert loads. With ``bias_update_rate > 0``
    the selection bias (``correction_bias`` buffer) is updated after every
    training forward (DeepSeek-V3's aux-loss-free balancing).
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, k: int,
                 num_shared_experts: int = 0, capacity_factor: Optional[float] = None, *,
                 scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 renormalize: bool = True, routed_scaling_factor: float = 1.0,
                 drop_policy: str = "position", aux_loss_alpha: float = 0.0,
                 z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 use_correction_bias: Optional[bool] = None, jitter_eps: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.hidden, self.ffn_hidden, self.num_experts, self.k = hidden, ffn_hidden, num_experts, k
        self.capacity_factor = capacity_factor
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.renormalize, self.routed_scaling_factor = renormalize, routed_scaling_factor
        self.drop_policy = drop_policy
        self.aux_loss_alpha, self.z_loss_coef = aux_loss_alpha, z_loss_coef
        self.bias_update_rate, self.jitter_eps = bias_update_rate, jitter_eps
        self.router = nn.Linear(hidden, num_experts, bias=False, device=device, dtype=torch.float32)
        if use_correction_bias is None:
            use_correction_bias = bias_update_rate > 0
        if use_correction_bias:
            self.register_buffer("correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.correction_bias = None
        s_in, s_ff = 1.0 / math.sqrt(hidden), 1.0 / math.sqrt(ffn_hidden)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden, 2 * ffn_hidden, **fk).uniform_(-s_in, s_in))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden, **fk).uniform_(-s_ff, s_ff))
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

    def capacity(self, num_tokens: int) -> int:
        return int(math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts))

    @staticmethod
    def _swiglu(h: Tensor) -> Tensor:
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden)
        t = x2.shape[0]
        logits = self.router(x2.float())
        logits = _moe.jitter(logits, self.jitter_eps, self.training)
        if x2.dtype == torch.float64:
            logits = logits.double()
        bias = self.correction_bias
        cap = self.capacity(t) if self.capacity_factor is not None else None
        K = _ops if self.use_kernels else _reference
        g = _ops.MoeGating(*K.moe_topk_gating(
            logits, self.k, scoring=self.scoring, correction_bias=bias, n_group=self.n_group,
            topk_group=self.topk_group, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor, capacity=cap,
            drop_policy=self.drop_policy))
        if cap is not None:
            d = K.moe_dispatch(x2, g.expert_ids, g.slots, self.num_experts, cap)
            h = self._swiglu(torch.bmm(d, self.w_gate_up))
            eo = torch.bmm(h, self.w_down)
            y = K.moe_combine(eo, g.expert_ids, g.slots, g.weights)
        else:
            packed, offsets = K.moe_permute(x2, g.expert_ids, g.slots, g.expert_counts)
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
            aux = aux + _moe.load_balancing_loss(g.routed_counts, g.mean_scores, self.k, t,
                                                 self.aux_loss_alpha).float()
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * _moe.router_z_loss(logits)
        self.aux_loss = aux
        self.last_routed_counts = g.routed_counts
        if self.training and self.bias_update_rate > 0 and bias is not None:
            _moe.update_correction_bias(bias, g.routed_counts, self.bias_update_rate)
        return y.reshape(shape)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

import warnings  # noqa: E402

from . import reference as _reference  # noqa: E402

__all__ += ["CrossAttention"]

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
    causal=False, use_kernels=True)`` -> ``[B, Lq, dim]``. ``context=None`` is
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
        self.q_proj = nn.Linear(dim, dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kv_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.kv_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(dim, dim, bias=bias, **fk)
        self.use_kernels = True

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                use_kernels: Optional[bool] = None) -> Tensor:
        use_kernels = self.use_kernels if use_kernels is None else use_kernels
        ctx = x if context is None else context
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
