"""deepseek-kernels: hand-written CPU/CUDA kernels for DeepSeek-style models, as torch ops.

Importing this package loads the compiled extension ``deepseek_kernels._C``,
which registers every op under ``torch.ops.deepseek_kernels``.
"""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch: load it first)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "deepseek_kernels._C, the compiled extension, could not be loaded "
        f"({e}). Build it from the repository root with\n"
        "    pip install --no-build-isolation -e .\n"
        "(needs torch, ninja and pybind11 installed first; CUDA kernels are built "
        "when nvcc is found, see docs/building.md)."
    ) from e

from . import ops  # noqa: E402  (registers the fake implementations)
from .ops import (  # noqa: E402
    MoeGating,
    QuantizedTensor,
    dequantize_int4,
    dequantize_int8,
    dequantize_sum_int4,
    dequantize_sum_int8,
    moe_combine,
    moe_dispatch,
    moe_permute,
    moe_topk_gating,
    moe_unpermute,
    quantize_int4,
    quantize_int8,
)
from .ops import (  # noqa: E402  (GEMMs)
    fp8_gemm,
    fp8_grouped_gemm,
    gemm,
    grouped_gemm,
    int8_gemm,
    quantize_fp8,
    quantize_int8_rowwise,
)

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: torch and CUDA versions, CUDA architectures,
    whether the CUDA kernels were compiled, and the CPU parallel backend."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = [
    "build_info",
    "ops",
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
    "gemm",
    "grouped_gemm",
    "quantize_int8_rowwise",
    "int8_gemm",
    "quantize_fp8",
    "fp8_gemm",
    "fp8_grouped_gemm",
]


# ---- attention ----
from .ops import cross_attention, cross_attention_varlen  # noqa: E402

__all__ += ["cross_attention", "cross_attention_varlen"]
