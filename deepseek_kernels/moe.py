"""MoE training helpers around :func:`deepseek_kernels.moe_topk_gating`.

- :func:`load_balancing_loss`: the Switch/GShard balancing loss generalised to
  top-k, ``alpha * E * sum_i f_i * P_i`` with ``f_i = routed_count_i / (k * T)``
  (the fraction of routed choices, before capacity dropping; not differentiable)
  and ``P_i`` the mean routing score of expert i (differentiable).
- :func:`router_z_loss`: ``mean_t logsumexp(logits_t)^2`` (ST-MoE), keeps logits small;
  optionally over the tokens of a mask.
- :func:`update_correction_bias`: DeepSeek-V3's aux-loss-free balancing,
  ``b_i += gamma * sign(mean load - load_i)``, in place.
- :func:`jitter`: multiplicative noise ``U(1 - eps, 1 + eps)`` on the logits, training only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["load_balancing_loss", "router_z_loss", "update_correction_bias", "jitter"]


def load_balancing_loss(routed_counts: Tensor, mean_scores: Tensor, k: int,
                        num_tokens, alpha: float = 1.0) -> Tensor:
    """``alpha * E * sum_i f_i * P_i``; ``routed_counts`` and ``mean_scores`` as returned
    by ``moe_topk_gating`` for ``num_tokens`` tokens (an int, or a 0-d tensor such as
    the count of unmasked tokens). Equals ``alpha`` for a perfectly uniform router
    (f_i = P_i = 1/E)."""
    if routed_counts.dim() != 1 or mean_scores.shape != routed_counts.shape:
        raise ValueError(f"load_balancing_loss: 'routed_counts' and 'mean_scores' must be [E] "
                         f"(one shape), got {tuple(routed_counts.shape)} and {tuple(mean_scores.shape)}")
    if k < 1 or (not isinstance(num_tokens, Tensor) and num_tokens < 0):
        raise ValueError(f"load_balancing_loss: need k >= 1 and num_tokens >= 0, got k={k}, "
                         f"num_tokens={num_tokens}")
    if not abs(alpha) < math.inf:  # also False for NaN; unlike math.isfinite, traceable on a SymFloat
        raise ValueError(f"load_balancing_loss: argument 'alpha' must be finite, got {alpha}")
    e = mean_scores.shape[0]
    if isinstance(num_tokens, Tensor):  # no host read of a device count
        denom = (num_tokens.to(mean_scores.dtype) * k).clamp(min=1)
    else:
        denom = float(max(k * num_tokens, 1))
    f = routed_counts.to(mean_scores.dtype) / denom
    return alpha * e * (f * mean_scores).sum()


def router_z_loss(logits: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over tokens of ``logsumexp(logits)^2`` in fp32 (0 for no tokens); with a
    bool ``token_mask`` [T], over the tokens it marks True only."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    z = torch.logsumexp(logits.float(), dim=-1)
    if token_mask is None:
        return (z * z).mean()
    zz = torch.where(token_mask, z * z, torch.zeros_like(z))  # (a masked row may hold anything)
    return zz.sum() / token_mask.sum().clamp(min=1).to(zz.dtype)


@torch.no_grad()
def update_correction_bias(bias: Tensor, loads: Tensor, gamma: float) -> Tensor:
    """Aux-loss-free balancing step, in place: ``bias += gamma * sign(mean(loads) - loads)``.
    ``loads``: per-expert counts (``routed_counts`` of the last step or summed over
    several). Under-loaded experts get a larger bias, hence more tokens. Returns ``bias``."""
    if not bias.is_floating_point():
        raise TypeError(f"update_correction_bias: argument 'bias' must be floating point, got {bias.dtype}")
    if bias.dim() != 1 or loads.shape != bias.shape:
        raise ValueError(f"update_correction_bias: 'bias' and 'loads' must be [E] (one shape), got "
                         f"{tuple(bias.shape)} and {tuple(loads.shape)}")
    if not 0 <= gamma < math.inf:
        raise ValueError(f"update_correction_bias: argument 'gamma' must be finite and >= 0, got {gamma}")
    lf = loads.to(torch.float32)
    bias.add_((gamma * torch.sign(lf.mean() - lf)).to(bias.dtype))
    return bias


def jitter(logits: Tensor, eps: float, training: bool = True,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Multiply the logits by noise uniform in [1 - eps, 1 + eps] when training
    and ``eps > 0``; identity otherwise. ``eps`` must be in [0, 1) (a factor <= 0
    would zero or flip a logit)."""
    # Comparisons only (False for NaN): torch.compile(dynamic=True) traces a module's
    # float attribute as a SymFloat, which math.isfinite cannot take.
    if not 0 <= eps < 1:
        raise ValueError(f"jitter: argument 'eps' must be in [0, 1), got {eps}")
    if not training or eps == 0:
        return logits
    # generator only when given: torch.rand's generator overload takes concrete sizes only
    extra = {} if generator is None else {"generator": generator}
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, **extra)
    return logits * (1.0 - eps + 2.0 * eps * u).to(logits.dtype)
