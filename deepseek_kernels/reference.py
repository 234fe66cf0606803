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
