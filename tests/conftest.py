import zlib

import pytest
import torch

import deepseek_kernels  # noqa: F401  (loads the ops)
from deepseek_kernels.ops import cuda_kernel_choice as kernel_choice  # noqa: F401  (for the tests)

HAS_CUDA = torch.cuda.is_available() and deepseek_kernels.build_info()["cuda_kernels"]
_NO_CUDA_REASON = (
    "no CUDA GPU available" if not torch.cuda.is_available()
    else "deepseek_kernels was built without CUDA kernels"
)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA_REASON)


def kernel_ran(family: str) -> int:
    """The CUDA kernel generation the family's last launch ran, after fallbacks
    ("gemm", "fp8_gemm", "int8_gemm", "attention_fwd", "attention_bwd"): a forced
    generation that cannot run falls back silently, so the tests that force one
    check it really ran where it should. "gemm_v3_variant" / "fp8_gemm_v3_variant": the
    opt-in variant the last v3 launch ran (V3Variant bits, csrc/common/kernel_choice.h);
    "attention_bwd_v3_variant": 1 where the last backward v3 added dQ by bulk reductions."""
    return int(torch.ops.deepseek_kernels._cuda_kernel_ran(family))


def hopper_build() -> bool:
    """An H100/H200 (sm_90) and a build with sm_90a code: the wgmma kernels (GEMM and
    FP8 v3) and FP8 mma.sync (v2) must run when forced."""
    return (HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
            and "sm_90a" in deepseek_kernels.build_info()["cuda_archs"])

# Parametrize over this to run a test on every device; CUDA cases carry the
# `cuda` marker (`pytest -m cuda`) and skip with a visible reason without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]

# (device, autocast dtype) pairs for the autocast tests ("device,dtype").
AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[pytest.mark.cuda, requires_cuda]),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.cuda, requires_cuda]),
]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh but reproducible random data per test: seeded from the test's id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
