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

# Parametrize over this to run a test on every device; CUDA cases carry the
# `cuda` marker (`pytest -m cuda`) and skip with a visible reason without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh but reproducible random data per test: seeded from the test's id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
