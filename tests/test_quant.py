"""Blockwise INT8/INT4 quantization against deepseek_kernels.reference.

The kernels and the reference do the same IEEE fp32 operations, so outputs are
compared bitwise; separate tests check the reference's own contract against
the input (error bound, unbiased stochastic rounding, NaN handling).
"""

import math

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels import reference as ref
from tests.conftest import DEVICES, kernel_choice, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QMAX = {8: 127, 4: 7}
OURS_Q = {8: dk.quantize_int8, 4: dk.quantize_int4}
REF_Q = {8: ref.quantize_int8, 4: ref.quantize_int4}


def _sizes(block_size):
    return [0, 1, 37, block_size - 1, block_size + 1, 10**6 + 3]


def _dequant(bits, qt, n, block_size, out_dtype=torch.float32):
    if bits == 8:
        return dk.dequantize_int8(qt.q, qt.scales, block_size, out_dtype=out_dtype)
    return dk.dequantize_int4(qt.q, qt.scales, n, block_size, out_dtype=out_dtype)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t):
    """The tensor's bit pattern (so NaNs compare equal to identical NaNs)."""
    t = t.cpu()
    return t.view(_SAME_WIDTH_INT[t.dtype]) if t.dtype in _SAME_WIDTH_INT else t


def _assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), (a, b)


# ---------------------------------------------------------------------------
# Bitwise agreement with the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,block_size", [(8, 256), (8, 37), (8, 1024), (4, 256), (4, 38)])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_quantize_matches_reference(device, dtype, bits, block_size, stochastic):
    for n in _sizes(block_size):
        x = (torch.randn(n) * 3).to(dtype).to(device)
        seed = 1234 + n
        ours = OURS_Q[bits](x, block_size, stochastic=stochastic, seed=seed)
        theirs = REF_Q[bits](x.cpu(), block_size, stochastic=stochastic, seed=seed)
        _assert_same(ours, theirs)
        assert ours.q.device == x.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,block_size", [(8, 256), (8, 37), (4, 256), (4, 38)])
def test_dequantize_matches_reference(device, out_dtype, bits, block_size):
    for n in _sizes(block_size):
        x = torch.randn(n, device=device)
        qt = OURS_Q[bits](x, block_size)
        ours = _dequant(bits, qt, n, block_size, out_dtype)
        if bits == 8:
            theirs = ref.dequantize_int8(qt.q.cpu(), qt.scales.cpu(), block_size, out_dtype=out_dtype)
        else:
            theirs = ref.dequantize_int4(qt.q.cpu(), qt.scales.cpu(), n, block_size, out_dtype=out_dtype)
        assert ours.dtype == out_dtype and ours.shape == (n,)
        assert torch.equal(ours.cpu(), theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,block_size", [(8, 256), (8, 37), (4, 256), (4, 38)])
@pytest.mark.parametrize("world", [0, 1, 2, 3, 8])
def test_dequantize_sum_matches_reference(device, bits, block_size, world):
    for n in [0, 1, 37, block_size + 1, 100_003]:
        rows = [OURS_Q[bits](torch.randn(n, device=device) * (w + 1), block_size) for w in range(world)]
        nb = math.ceil(n / block_size)
        qbytes = n if bits == 8 else (n + 1) // 2
        qdtype = torch.int8 if bits == 8 else torch.uint8
        q = torch.stack([r.q for r in rows]) if rows else torch.empty(0, qbytes, dtype=qdtype, device=device)
        s = torch.stack([r.scales for r in rows]) if rows else torch.empty(0, nb, device=device)
        if bits == 8:
            ours = dk.dequantize_sum_int8(q, s, block_size)
            theirs = ref.dequantize_sum_int8(q.cpu(), s.cpu(), block_size)
        else:
            ours = dk.dequantize_sum_int4(q, s, n, block_size)
            theirs = ref.dequantize_sum_int4(q.cpu(), s.cpu(), n, block_size)
        assert ours.dtype == torch.float32 and ours.shape == (n,)
        assert torch.equal(ours.cpu(), theirs)
        # And the fp32 sum is close to the exact (fp64) sum of the dequantized rows.
        if world:
            exact = sum(_dequant(bits, r, n, block_size).double().cpu() for r in rows)
            bound = world * 2**-24 * sum(_dequant(bits, r, n, block_size).double().abs().cpu() for r in rows)
            assert ((ours.double().cpu() - exact).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_int4_every_byte(device):
    """Every byte value as packed codes, nibble 8 included (-8 in two's
    complement: quantize_int4 never writes it, but any byte decodes), an odd
    numel, and dequantize_sum over rows of such bytes: bitwise as the reference."""
    bs = 38
    q = torch.arange(256, dtype=torch.uint8).roll(3).repeat(3)  # 768 bytes
    n = 2 * q.numel() - 1
    scales = torch.rand(math.ceil(n / bs)) + 0.5
    ours = dk.dequantize_int4(q.to(device), scales.to(device), n, bs)
    theirs = ref.dequantize_int4(q, scales, n, bs)
    assert torch.equal(ours.cpu(), theirs)
    assert ours.cpu().div(scales.repeat_interleave(bs)[:n]).min() == -8
    q2 = torch.stack([q, q.flip(0)])
    s2 = torch.stack([scales, scales * 3])
    assert torch.equal(dk.dequantize_sum_int4(q2.to(device), s2.to(device), n, bs).cpu(),
                       ref.dequantize_sum_int4(q2, s2, n, bs))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_and_cuda_agree_bitwise(bits, dtype):
    x = (torch.randn(300_001) * 10).to(dtype)
    for stochastic in (False, True):
        cpu = OURS_Q[bits](x, 128, stochastic=stochastic, seed=99)
        gpu = OURS_Q[bits](x.cuda(), 128, stochastic=stochastic, seed=99)
        _assert_same(cpu, gpu)


# ---------------------------------------------------------------------------
# CUDA kernel generations v1 and v2 (selected by the private _quant_cuda_kernel
# op, for the benchmark's A/B): bitwise the same, and the same as the CPU
# ---------------------------------------------------------------------------


def _set_kernel(version):
    return torch.ops.deepseek_kernels._quant_cuda_kernel(version)


@pytest.fixture
def restore_kernel():
    with kernel_choice("_quant_cuda_kernel", 0):  # restores the choice the test found
        yield


def test_kernel_switch(restore_kernel):
    assert _set_kernel(0) in (1, 2)
    _set_kernel(1)
    assert _set_kernel(2) == 1
    assert _set_kernel(0) == 2
    with pytest.raises(ValueError, match="version"):
        _set_kernel(3)
    assert _set_kernel(0) == 2


def _both_kernels(fn):
    out = []
    for v in (1, 2):
        _set_kernel(v)
        r = fn()
        out.append(tuple(r) if isinstance(r, (tuple, list)) else (r,))
    return out


# Block sizes: v2 quantize handles 32 * (16 / itemsize) * {1, 2, 4} (fp32 128/256/512,
# 16-bit 256/512/1024), the rest falls back to v1; v2 dequantize takes power-of-two
# block sizes by a shift and others (96) by division.
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [96, 128, 256, 512, 1024])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_quantize_v1_v2_cpu_agree(restore_kernel, bits, dtype, block_size, stochastic):
    # Partial last blocks, fewer blocks than one warp step (G), and a few waves.
    for n in [1, block_size - 2, 3 * block_size, 5 * block_size + 6, 4096 * block_size + 2 * block_size + 10]:
        x = (torch.randn(n) * 5).to(dtype)
        if n > 100:
            x[n // 2] = float("inf")  # one non-finite block
        x[-1] = 0.0
        xg = x.cuda()
        v1, v2 = _both_kernels(lambda: OURS_Q[bits](xg, block_size, stochastic=stochastic, seed=7))
        cpu = OURS_Q[bits](x, block_size, stochastic=stochastic, seed=7)
        _assert_same(v1, v2)
        _assert_same(v2, cpu)


@requires_cuda
@pytest.mark.cuda
def test_quantize_v1_v2_all_zero_and_misaligned(restore_kernel):
    for x in [torch.zeros(1000 * 256 + 3, device="cuda"), torch.randn(70_001, device="cuda")[1:]]:
        for bits in (8, 4):
            v1, v2 = _both_kernels(lambda: OURS_Q[bits](x, 256))
            _assert_same(v1, v2)
            _assert_same(v2, OURS_Q[bits](x.cpu(), 256))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [96, 256, 1024])
def test_dequantize_v1_v2_cpu_agree(restore_kernel, bits, out_dtype, block_size):
    for n in [1, 7, block_size + 3, 300_007, 2_000_000]:
        qt = OURS_Q[bits](torch.randn(n, device="cuda") * 3, block_size)
        v1, v2 = _both_kernels(lambda: _dequant(bits, qt, n, block_size, out_dtype))
        cpu = _dequant(bits, type(qt)(*(t.cpu() for t in qt)), n, block_size, out_dtype)
        _assert_same(v1, v2)
        _assert_same(v2, (cpu,))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [96, 256])
@pytest.mark.parametrize("world", [1, 2, 4, 5, 8, 9, 16])
def test_dequantize_sum_v1_v2_cpu_agree(restore_kernel, bits, block_size, world):
    for n in [3, block_size + 1, 100_003, 1_000_000]:
        rows = [OURS_Q[bits](torch.randn(n, device="cuda") * (w + 1), block_size) for w in range(world)]
        q = torch.stack([r.q for r in rows])
        s = torch.stack([r.scales for r in rows])
        if bits == 8:
            fn, args = dk.dequantize_sum_int8, (q, s, block_size)
        else:
            fn, args = dk.dequantize_sum_int4, (q, s, n, block_size)
        v1, v2 = _both_kernels(lambda: fn(*args))
        cpu = fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        _assert_same(v1, v2)
        _assert_same(v2, (cpu,))


# ---------------------------------------------------------------------------
# The contract itself, checked against the input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_round_to_nearest_error_at_most_half_a_step(device, dtype, bits):
    block_size = 256
    n = 100_003
    x = (torch.randn(n) * torch.rand(n) * 100).to(dtype).to(device)
    qt = OURS_Q[bits](x, block_size)
    xhat = _dequant(bits, qt, n, block_size).double()
    scale = qt.scales.double().repeat_interleave(block_size)[:n]
    # x / scale is rounded once in fp32 (relative 2^-24 of at most qmax), the
    # product q * scale once more (relative 2^-24 of at most absmax).
    bound = scale * (0.5 + 2 * QMAX[bits] * 2**-24)
    err = (xhat - x.double()).abs()
    assert (err <= bound).all(), (err / scale).max()
    # Scales are absmax / qmax per block.
    absmax = torch.nn.functional.pad(x.float().abs(), (0, -n % block_size)).view(-1, block_size).amax(1)
    assert torch.equal(qt.scales.cpu(), absmax.cpu() / QMAX[bits])  # CPU: true division


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_block_gets_scale_one(device, bits):
    x = torch.randn(1000, device=device)
    x[256:512] = 0
    qt = OURS_Q[bits](x, 256)
    assert qt.scales[1].item() == 1.0
    assert not qt.nonfinite.item()
    assert (_dequant(bits, qt, 1000, 256)[256:512] == 0).all()
    assert torch.isfinite(qt.scales).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_is_flagged_and_survives(device, bits, bad, dtype):
    n, bs = 1001, 128
    x = torch.randn(n).to(dtype).to(device)
    qt = OURS_Q[bits](x, bs)
    assert not qt.nonfinite.item()
    x[300] = bad  # block 2
    qt = OURS_Q[bits](x, bs)
    assert qt.nonfinite.item() and qt.nonfinite.dtype == torch.bool and qt.nonfinite.dim() == 0
    assert torch.isnan(qt.scales[2]) and torch.isfinite(qt.scales[torch.arange(len(qt.scales)) != 2]).all()
    xhat = _dequant(bits, qt, n, bs)
    assert torch.isnan(xhat[256:384]).all()  # a NaN never becomes a finite value
    assert torch.isfinite(xhat[:256]).all() and torch.isfinite(xhat[384:]).all()
    _assert_same(qt, REF_Q[bits](x.cpu(), bs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(device, bits):
    # Blocks whose first element pins the scale to exactly 1; the other
    # elements hold one value v, so the mean code over ~2M draws estimates
    # E[code] = v (std <= 0.5 / sqrt(2M) = 3.5e-4).
    bs, nblocks = 256, 8192
    for v in (0.3, -2.7, 5.5, 0.001):
        x = torch.full((nblocks, bs), v)
        x[:, 0] = QMAX[bits]
        x = x.reshape(-1).to(device)
        qt = OURS_Q[bits](x, bs, stochastic=True, seed=2024)
        assert (qt.scales == 1).all()
        codes = ref._unpack_int4(qt.q.cpu(), x.numel()) if bits == 4 else qt.q.cpu()
        codes = codes.view(nblocks, bs)[:, 1:].double()
        assert set(codes.unique().tolist()) == {math.floor(v), math.floor(v) + 1}
        assert abs(codes.mean().item() - v) < 1e-3, (v, codes.mean().item())


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_draws_at_the_ends_of_a_step(device):
    """Codes v with |v| in [64, 127] and a draw u within 2^-18 of 0 or 1: v + u
    rounds in fp32 to an integer (v itself, or v + 1, which is 128 for v = 127).
    floor must keep that integer, and the clamp must bring 128 back to 127,
    bitwise as the reference. The blocks' scale is pinned to 1 (127 in every
    block), half the elements are 127; the seed is fixed, and the test checks
    that its draws hit both ends (a few times each in 2^20 elements)."""
    n, bs, seed = 1 << 20, 1024, 11
    gen = torch.Generator().manual_seed(7)
    mag = torch.randint(64, 128, (n,), generator=gen).float()
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -mag, mag)
    x[torch.rand(n, generator=gen) < 0.5] = 127.0
    x[::bs] = 127.0
    u = ref.stochastic_uniform(n, seed)
    assert ((x == 127) & (u >= 1 - 2**-18)).any() and ((x.abs() >= 64) & (u < 2**-18)).any()
    ours = dk.quantize_int8(x.to(device), bs, stochastic=True, seed=seed)
    theirs = ref.quantize_int8(x, bs, stochastic=True, seed=seed)
    assert (ours.scales == 1).all()
    _assert_same(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_seeds(device):
    x = torch.randn(10_000, device=device)
    a = dk.quantize_int8(x, stochastic=True, seed=5)
    b = dk.quantize_int8(x, stochastic=True, seed=5)
    c = dk.quantize_int8(x, stochastic=True, seed=6)
    assert torch.equal(a.q, b.q) and not torch.equal(a.q, c.q)
    # seed=None draws from torch's default generator: reproducible under manual_seed.
    torch.manual_seed(0)
    d = dk.quantize_int8(x, stochastic=True)
    e = dk.quantize_int8(x, stochastic=True)
    torch.manual_seed(0)
    f = dk.quantize_int8(x, stochastic=True)
    assert torch.equal(d.q, f.q) and not torch.equal(d.q, e.q)
    # Stochastic codes are within one step of the nearest ones.
    nearest = dk.quantize_int8(x)
    assert (a.q.int() - nearest.q.int()).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_non_contiguous_and_misaligned_inputs(device, bits):
    base = torch.randn(64, 130, device=device)
    for x in (base.t(), base[:, 1:], base.reshape(-1)[1:], base[::2]):
        assert not x.is_contiguous() or x.data_ptr() % 16
        _assert_same(OURS_Q[bits](x, 64), REF_Q[bits](x.contiguous().cpu(), 64))
    # Non-contiguous codes and scales for dequantize.
    qt = OURS_Q[8](torch.randn(2, 512, device=device), 64)
    q2 = torch.stack([qt.q, qt.q], 1)[:, 0]
    s2 = torch.stack([qt.scales, qt.scales], 1)[:, 0]
    assert torch.equal(dk.dequantize_int8(q2, s2, 64), dk.dequantize_int8(qt.q, qt.scales, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_multidimensional_input_is_read_flat(device):
    x = torch.randn(3, 5, 7, device=device)
    _assert_same(dk.quantize_int8(x, 16), ref.quantize_int8(x.reshape(-1).cpu(), 16))


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x = torch.randn(100, device=device)
    qt = dk.quantize_int8(x, 32)
    q4 = dk.quantize_int4(x, 32)
    cases = [
        (TypeError, "'x' must have dtype", lambda: dk.quantize_int8(x.double())),
        (TypeError, "'x' must have dtype", lambda: dk.quantize_int4(x.int())),
        (ValueError, "'block_size' must be positive, got 0", lambda: dk.quantize_int8(x, 0)),
        (ValueError, "'block_size' must be positive, got -4", lambda: dk.quantize_int4(x, -4)),
        (ValueError, "'block_size' must be even", lambda: dk.quantize_int4(x, 33)),
        (ValueError, "'block_size' must be even", lambda: dk.dequantize_int4(q4.q, q4.scales, 100, 33)),
        (TypeError, "'q' must have dtype Char", lambda: dk.dequantize_int8(qt.q.float(), qt.scales, 32)),
        (TypeError, "'q' must have dtype Byte", lambda: dk.dequantize_int4(qt.q, qt.scales, 100, 32)),
        (TypeError, "'scales' must have dtype Float", lambda: dk.dequantize_int8(qt.q, qt.scales.half(), 32)),
        (ValueError, "'scales' must hold ceil", lambda: dk.dequantize_int8(qt.q, qt.scales[:-1], 32)),
        (ValueError, "'scales' must hold ceil", lambda: dk.dequantize_int8(qt.q, qt.scales, 16)),
        (ValueError, "'q' must hold 51 bytes per row for numel=102, got 50", lambda: dk.dequantize_int4(q4.q, q4.scales, 102, 32)),
        (ValueError, "'numel' must be non-negative", lambda: dk.dequantize_int4(q4.q, q4.scales, -1, 32)),
        (TypeError, "'out_dtype' must be one of", lambda: dk.dequantize_int8(qt.q, qt.scales, 32, out_dtype=torch.int32)),
        (ValueError, "'q' must be 2-D", lambda: dk.dequantize_sum_int8(qt.q, qt.scales[None], 32)),
        (ValueError, "'scales' must have shape", lambda: dk.dequantize_sum_int8(qt.q[None], qt.scales[None, :-1], 32)),
        (ValueError, "'scales' must be 2-D", lambda: dk.dequantize_sum_int4(q4.q[None], q4.scales, 100, 32)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [2**40, 2**63 - 1])
def test_huge_block_size_is_one_block(device, block_size):
    # ceil(n / block_size) must not overflow, nor a block's scratch follow block_size.
    x = torch.tensor([1.0, -2.0, 127.0, 0.5] * 25, device=device)
    qt = dk.quantize_int8(x, block_size)
    assert qt.scales.tolist() == [1.0] and torch.equal(qt.q, dk.quantize_int8(x, 100).q)
    assert torch.equal(dk.dequantize_int8(qt.q, qt.scales, block_size), x.round())
    q4, one_block = dk.quantize_int4(x, block_size - block_size % 2), dk.quantize_int4(x, 100)
    assert torch.equal(q4.scales, one_block.scales) and torch.equal(q4.q, one_block.q)


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices_rejected():
    qt = dk.quantize_int8(torch.randn(100, device="cuda"), 32)
    with pytest.raises(ValueError, match="'scales' must be on the same device as 'q'"):
        dk.dequantize_int8(qt.q, qt.scales.cpu(), 32)
    with pytest.raises(ValueError, match="'scales' must be on the same device as 'q'"):
        dk.dequantize_sum_int8(qt.q.cpu()[None], qt.scales[None], 32)


# ---------------------------------------------------------------------------
# torch.library contract and torch.compile
# ---------------------------------------------------------------------------


def _opcheck_samples(device):
    x = torch.randn(1000, device=device)
    q8 = dk.quantize_int8(x, 64)
    q4 = dk.quantize_int4(x, 64)
    ops = torch.ops.deepseek_kernels
    return [
        (ops.quantize_int8.default, (x,), {"block_size": 64}),
        (ops.quantize_int8.default, (x.half(), 37), {"stochastic": True, "seed": 3}),
        (ops.quantize_int8.default, (torch.randn(0, device=device),), {}),
        (ops.quantize_int4.default, (x.bfloat16(), 64), {}),
        (ops.quantize_int4.default, (x[:999], 38), {"stochastic": True, "seed": 4}),
        (ops.dequantize_int8.default, (q8.q, q8.scales, 64), {"out_dtype": torch.bfloat16}),
        (ops.dequantize_int4.default, (q4.q, q4.scales, 1000, 64), {}),
        (ops.dequantize_sum_int8.default, (torch.stack([q8.q] * 3), torch.stack([q8.scales] * 3), 64), {}),
        (ops.dequantize_sum_int4.default, (torch.stack([q4.q] * 2), torch.stack([q4.scales] * 2), 1000, 64), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def roundtrip(x):
        q8 = dk.quantize_int8(x, 128)
        q4 = dk.quantize_int4(x, 128, stochastic=True, seed=11)
        y8 = dk.dequantize_int8(q8.q, q8.scales, 128, out_dtype=x.dtype)
        y4 = dk.dequantize_int4(q4.q, q4.scales, x.numel(), 128)
        s = dk.dequantize_sum_int8(torch.stack([q8.q, q8.q]), torch.stack([q8.scales, q8.scales]), 128)
        return y8 * 2, y4, s, q8.nonfinite | q4.nonfinite

    x = torch.randn(4097, device=device)
    compiled = torch.compile(roundtrip, fullgraph=True)
    for a, b in zip(compiled(x), roundtrip(x)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# Interop: CuPy arrays through DLPack, without copies
# ---------------------------------------------------------------------------


@requires_cuda
@pytest.mark.cuda
def test_cupy_dlpack_interop():
    cp = pytest.importorskip("cupy")
    xc = cp.random.standard_normal(10_001, dtype=cp.float32)
    x = torch.from_dlpack(xc)
    assert x.data_ptr() == xc.data.ptr  # no copy in
    qt = dk.quantize_int8(x, 256)
    q_cp = cp.from_dlpack(qt.q)
    s_cp = cp.from_dlpack(qt.scales)
    assert q_cp.data.ptr == qt.q.data_ptr() and s_cp.data.ptr == qt.scales.data_ptr()  # no copy out
    expect_q, expect_scales, _ = ref.quantize_int8(x.cpu(), 256)
    assert (cp.asnumpy(q_cp) == expect_q.numpy()).all()
    y = dk.dequantize_int8(torch.from_dlpack(q_cp), torch.from_dlpack(s_cp), 256)
    assert torch.equal(y.cpu(), ref.dequantize_int8(expect_q, expect_scales, 256))
