"""pytest-benchmark versions of the quantization benchmarks (CPU, 1 MiB fp32).

Run from the repository root:

    pytest bench/ --benchmark-only -q

Not part of the normal test suite: pytest collects only tests/ by default
(testpaths), so these run only when bench/ is named. bench/bench_quant.py is
the full benchmark (CUDA, large sizes, torch.compile peer, bandwidth); this
file is the quick, pytest-native comparison of ours vs the reference, one
benchmark group per op.
"""

from __future__ import annotations

import pytest
import torch

try:
    import deepseek_kernels  # noqa: F401
    from deepseek_kernels import ops, reference
except ImportError as e:  # the compiled extension is not built
    pytest.skip(
        f"deepseek_kernels cannot be imported ({e}); build it with "
        "`pip install --no-build-isolation -e .` to run the benchmarks",
        allow_module_level=True,
    )

N = (1 << 20) // 4  # 1 MiB of fp32 input
BLOCK = 256
DEVICE = "cpu"


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _assert_bitwise_equal(got, want) -> None:
    got, want = _outputs(got), _outputs(want)
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g, w), "ours differs from the reference: refusing to time it"


def _inputs(op: str):
    """(args) for op on fresh random (never zero) data, seeded for repeatability."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE)

    if op == "quantize_int8" or op == "quantize_int4":
        return (randn(N), BLOCK)
    if op == "dequantize_int8":
        q, s, _ = reference.quantize_int8(randn(N), BLOCK)
        return (q, s, BLOCK)
    if op == "dequantize_sum_int8":
        w = 4
        rows = [reference.quantize_int8(randn(N), BLOCK) for _ in range(w)]
        q = torch.stack([r[0] for r in rows])
        s = torch.stack([r[1] for r in rows])
        return (q, s, BLOCK)
    raise ValueError(op)


OPS = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_sum_int8"]
IMPLS = {"ours": ops, "ref": reference}


@pytest.fixture(scope="module", params=OPS)
def case(request):
    """One op's inputs, made once and shared by the 'ours' and 'ref' benchmarks;
    ours is checked bitwise against the reference before anything is timed."""
    op = request.param
    args = _inputs(op)
    _assert_bitwise_equal(getattr(ops, op)(*args), getattr(reference, op)(*args))
    return op, args


@pytest.mark.parametrize("impl", list(IMPLS))
def test_quant(benchmark, case, impl):
    op, args = case
    fn = getattr(IMPLS[impl], op)
    benchmark.group = op  # ours and ref side by side in the report
    benchmark.extra_info.update(op=op, impl=impl, dtype="fp32", n=N, block_size=BLOCK)
    benchmark(fn, *args)
