"""Functional API: typed, documented wrappers around ``torch.ops.deepseek_kernels``.

Every op has a fake (meta) implementation registered here so that it works
under ``torch.compile`` and with FakeTensors. Argument checking lives in the
C++ host glue (``csrc/``), in one place for every caller.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

_ops = torch.ops.deepseek_kernels

__all__ = [
    "QuantizedTensor",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_sum_int8",
    "quantize_int4",
    "dequantize_int4",
    "dequantize_sum_int4",
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
            GPU. ``None`` draws a seed from torch's default CPU generator.

    Returns:
        ``QuantizedTensor(q int8 [n], scales fp32 [ceil(n / block_size)],
        nonfinite bool [])``. scale = absmax / 127 per block (1 for an all-zero
        block); a block holding NaN/Inf gets scale NaN and codes 0, and
        ``nonfinite`` is set, so the NaN survives dequantization.
    """
    return QuantizedTensor(*_ops.quantize_int8(x, block_size, stochastic=stochastic, seed=seed))


def dequantize_int8(
    q: Tensor, scales: Tensor, block_size: int = 256, *, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``q [n] int8``, ``scales [ceil(n / block_size)] fp32``
    -> ``[n]`` in ``out_dtype`` (fp32, fp16 or bf16), each element ``fp32(q) * scale``."""
    return _ops.dequantize_int8(q, scales, block_size, out_dtype=out_dtype)


def dequantize_sum_int8(q: Tensor, scales: Tensor, block_size: int = 256) -> Tensor:
    """Sum of W dequantized rows: ``q [W, n] int8``, ``scales [W, ceil(n / block_size)] fp32``
    -> fp32 ``[n]``. Rows are added in order 0..W-1 in fp32, so the result is
    deterministic (the reduce step of a compressed all-reduce)."""
    return _ops.dequantize_sum_int8(q, scales, block_size)


def quantize_int4(
    x: Tensor, block_size: int = 256, *, stochastic: bool = False, seed: Optional[int] = None
) -> QuantizedTensor:
    """Blockwise absmax INT4 quantization: like :func:`quantize_int8` with codes in
    [-7, 7] (scale = absmax / 7), packed two per byte into ``q uint8 [ceil(n / 2)]``
    (element 2i in the low nibble, two's complement). ``block_size`` must be even."""
    return QuantizedTensor(*_ops.quantize_int4(x, block_size, stochastic=stochastic, seed=seed))


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
    return _ops.dequantize_int4(q, scales, numel, block_size, out_dtype=out_dtype)


def dequantize_sum_int4(q: Tensor, scales: Tensor, numel: int, block_size: int = 256) -> Tensor:
    """Sum of W dequantized INT4 rows: ``q uint8 [W, ceil(numel / 2)]``, ``scales [W, nb]``
    -> fp32 ``[numel]``, rows added in order in fp32."""
    return _ops.dequantize_sum_int4(q, scales, numel, block_size)


# ---------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only
# ---------------------------------------------------------------------------


def _num_blocks(n: int, block_size: int) -> int:
    torch._check(block_size > 0, lambda: f"block_size must be positive, got {block_size}")
    return (n + block_size - 1) // block_size


def _fake_quantize(x: Tensor, block_size: int, packed: bool):
    n = x.numel()
    nb = _num_blocks(n, block_size)
    if packed:
        q = x.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    else:
        q = x.new_empty((n,), dtype=torch.int8)
    return q, x.new_empty((nb,), dtype=torch.float32), x.new_empty((), dtype=torch.bool)


@torch.library.register_fake("deepseek_kernels::quantize_int8")
def _(x, block_size=256, *, stochastic=False, seed=None):
    return _fake_quantize(x, block_size, packed=False)


@torch.library.register_fake("deepseek_kernels::quantize_int4")
def _(x, block_size=256, *, stochastic=False, seed=None):
    return _fake_quantize(x, block_size, packed=True)


@torch.library.register_fake("deepseek_kernels::dequantize_int8")
def _(q, scales, block_size=256, *, out_dtype=None):
    return q.new_empty((q.numel(),), dtype=out_dtype or torch.float32)


@torch.library.register_fake("deepseek_kernels::dequantize_int4")
def _(q, scales, numel, block_size=256, *, out_dtype=None):
    return q.new_empty((numel,), dtype=out_dtype or torch.float32)


@torch.library.register_fake("deepseek_kernels::dequantize_sum_int8")
def _(q, scales, block_size=256):
    torch._check(q.dim() == 2, lambda: f"q must be 2-D [W, n], got {q.dim()}-D")
    return q.new_empty((q.shape[1],), dtype=torch.float32)


@torch.library.register_fake("deepseek_kernels::dequantize_sum_int4")
def _(q, scales, numel, block_size=256):
    torch._check(q.dim() == 2, lambda: f"q must be 2-D [W, ceil(numel/2)], got {q.dim()}-D")
    return q.new_empty((numel,), dtype=torch.float32)
