"""GEMMs: gemm (fused bias + activation), grouped_gemm, row-wise INT8 W8A8, FP8 block-scaled.

Floating-point ops are checked against deepseek_kernels.reference computed in
fp64, with a derived tolerance: our max error must be at most twice the error
of PyTorch's own op at the same precision (F.linear + bias + activation, each
step rounded in the input dtype), plus a floor of a few fp32 ulps of the
output scale for fp32 accumulation noise. The INT8 ops are exact: bitwise
equal to the reference, to an int64-accumulated product, and across devices.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import deepseek_kernels as dk
from deepseek_kernels import reference as ref
from deepseek_kernels.nn import Linear, MoELayer

from .conftest import AUTOCAST_CASES, DEVICES, hopper_build, kernel_choice, kernel_ran, requires_cuda

ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _torch_peer(a, w, bias, activation):
    """What PyTorch users write, at the inputs' precision."""
    y = F.linear(a, w, bias)
    return ref._gemm_activation(y, activation) if activation != "none" else y


def _max_err(x, want):
    return (x.double() - want.double()).abs().max().item() if x.numel() else 0.0


def _check_close(ours, peer, want, name=""):
    """ours within 2x the peer's error against the fp64 reference (+ fp32 floor)."""
    assert want.dtype == torch.float64, "compare against the unrounded reference"
    assert ours.shape == want.shape and ours.dtype == peer.dtype, name
    floor = 8 * torch.finfo(torch.float32).eps * max(want.double().abs().max().item(), 1.0) \
        if want.numel() else 0.0
    err, peer_err = _max_err(ours, want), _max_err(peer, want)
    assert err <= 2 * peer_err + floor, f"{name}: ours {err:.3g} vs torch {peer_err:.3g}"
    return err


def _data(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


# ---------------------------------------------------------------------------
# gemm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mnk", [(1, 8, 136), (17, 136, 8), (17, 1000, 136), (1000, 136, 1032)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_reference(device, dtype, activation, with_bias, mnk):
    m, n, k = mnk
    a = _data((m, k), dtype, device)
    w = _data((n, k), dtype, device, k ** -0.5)
    bias = _data((n,), dtype, device) if with_bias else None
    ours = dk.gemm(a, w, bias, activation=activation)
    want = ref.gemm(a, w, bias, activation=activation, out_dtype=torch.float64)
    assert ours.dtype == dtype
    _check_close(ours, _torch_peer(a, w, bias, activation), want, f"{mnk} {dtype} {activation}")


@pytest.mark.parametrize("path", [1, 2], ids=["fp32-blas", "avx512-bf16"])
def test_gemm_cpu_bf16_paths(path):
    """The CPU's two bf16 paths (1: fp32 BLAS on converted copies; 2: the AVX512-BF16
    kernel, auto's choice where the CPU has it, else path 1 runs): within 2x torch's
    error against fp64, for bf16 and fp32 outputs (the fp32 accumulator itself,
    within 4x the fp32 BLAS one's), at odd K (the last pair padded), K past the
    256-wide K blocks, M past the 8-row micro-tiles, N past the 32-column panels,
    and M <= 4 (dot products along K, a masked K tail); grouped_gemm likewise,
    with an empty group."""
    with kernel_choice("_gemm_cpu_bf16", path):
        for m, n, k in [(1, 1, 1), (3, 70, 1025), (4, 9, 31), (5, 9, 37), (9, 33, 257), (70, 31, 600),
                        (17, 100, 1025)]:
            a, w = _data((m, k), torch.bfloat16, "cpu"), _data((n, k), torch.bfloat16, "cpu", k ** -0.5)
            bias = _data((n,), torch.bfloat16, "cpu")
            for act in ("none", "gelu"):
                want = ref.gemm(a, w, bias, activation=act, out_dtype=torch.float64)
                _check_close(dk.gemm(a, w, bias, activation=act), _torch_peer(a, w, bias, act), want,
                             f"{(m, n, k)} {act}")
                acc32 = dk.gemm(a, w, bias, activation=act, out_dtype=torch.float32)
                blas = ref._gemm_activation(F.linear(a.float(), w.float(), bias.float()), act)
                floor = 8 * torch.finfo(torch.float32).eps
                assert _max_err(acc32, want) <= 4 * _max_err(blas, want) + floor, (m, n, k, act)
        x, ws = _data((50, 77), torch.bfloat16, "cpu"), _data((4, 33, 77), torch.bfloat16, "cpu", 77 ** -0.5)
        off = torch.tensor([0, 10, 10, 45, 50], dtype=torch.int32)
        want = ref.grouped_gemm(x, ws, off, out_dtype=torch.float64)
        peer = torch.cat([x[off[e]:off[e + 1]] @ ws[e].t() for e in range(4)])
        _check_close(dk.grouped_gemm(x, ws, off), peer, want, "grouped")
    with pytest.raises(ValueError, match="_gemm_cpu_bf16"):
        torch.ops.deepseek_kernels._gemm_cpu_bf16(9)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_batched_input_and_out_dtype(device):
    a = _data((2, 5, 72), torch.bfloat16, device)
    w = _data((40, 72), torch.bfloat16, device)
    bias = _data((40,), torch.float32, device)  # fp32 bias with bf16 data is accepted
    out = dk.gemm(a, w, bias, activation="gelu", out_dtype=torch.float32)
    assert out.shape == (2, 5, 40) and out.dtype == torch.float32
    want = ref.gemm(a, w, bias, activation="gelu", out_dtype=torch.float64)
    # Peer: the same products in fp32 (exact bf16 inputs), one rounding less than bf16 out.
    peer = F.gelu(F.linear(a.float(), w.float(), bias))
    _check_close(out, peer, want)
    # A non-contiguous weight view (nn.Linear's weight.t().t() patterns) is handled.
    wt = _data((72, 40), torch.bfloat16, device).t()
    _check_close(dk.gemm(a, wt), _torch_peer(a, wt, None, "none"),
                 ref.gemm(a, wt, out_dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 13, 130])  # not multiples of 8: the CUDA path pads K
def test_gemm_odd_k(device, k):
    a = _data((33, k), torch.float16, device)
    w = _data((24, k), torch.float16, device)
    _check_close(dk.gemm(a, w, activation="silu"), _torch_peer(a, w, None, "silu"),
                 ref.gemm(a, w, activation="silu", out_dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_empty(device):
    w = _data((8, 16), torch.bfloat16, device)
    out = dk.gemm(torch.empty(0, 16, dtype=torch.bfloat16, device=device), w)
    assert out.shape == (0, 8)
    # K = 0: the products are empty sums, out = act(bias).
    bias = _data((8,), torch.float32, device)
    out = dk.gemm(torch.empty(3, 0, device=device), torch.empty(8, 0, device=device), bias,
                  activation="relu")
    assert torch.equal(out, torch.relu(bias).expand(3, 8))


@pytest.mark.parametrize("activation", ACTS)
def test_gemm_gradcheck(activation):
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda a, w, b: dk.gemm(a, w, b, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, w, b))
    a3 = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: dk.gemm(a, w, activation=activation), (a3, w))


def test_gemm_relu_gradient_at_zero_is_torchs():
    """relu'(0) = 0, as torch.relu's backward: a pre-activation exactly 0 (a zero
    input row without bias, as the zero padding rows of a batch) passes no gradient.
    gradcheck cannot see it (a kink), so compare with the torch peer directly."""
    a = torch.randn(5, 7, dtype=torch.float64)
    a[[1, 3]] = 0.0
    w = torch.randn(6, 7, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    b[2] = 0.0
    dy = torch.randn(5, 6, dtype=torch.float64)
    for bias in (None, b):
        leaves = [a.clone().requires_grad_(), w.clone().requires_grad_()]
        peers = [a.clone().requires_grad_(), w.clone().requires_grad_()]
        if bias is not None:
            leaves.append(bias.clone().requires_grad_())
            peers.append(bias.clone().requires_grad_())
        dk.gemm(*leaves, activation="relu").backward(dy)
        torch.relu(F.linear(*peers)).backward(dy)
        for mine, peer in zip(leaves, peers):
            torch.testing.assert_close(mine.grad, peer.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_backward_matches_reference(device, dtype):
    a = _data((37, 48), dtype, device).requires_grad_()
    w = _data((24, 48), dtype, device, 0.2).requires_grad_()
    b = _data((24,), dtype, device).requires_grad_()
    dy = _data((37, 24), dtype, device)
    dk.gemm(a, w, b, activation="gelu_tanh").backward(dy)
    ours = [a.grad, w.grad, b.grad]
    a64, w64, b64 = (t.detach().double().requires_grad_() for t in (a, w, b))
    ref.gemm(a64, w64, b64, activation="gelu_tanh").backward(dy.double())
    a.grad = w.grad = b.grad = None
    _torch_peer(a, w, b, "gelu_tanh").backward(dy)
    for name, mine, peer, want in zip("awb", ours, [a.grad, w.grad, b.grad],
                                      [a64.grad, w64.grad, b64.grad]):
        _check_close(mine, peer, want, f"d{name}")


def test_gemm_opcheck():
    a = torch.randn(9, 24, dtype=torch.bfloat16)
    w = torch.randn(16, 24, dtype=torch.bfloat16)
    b = torch.randn(16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.deepseek_kernels.gemm.default, (a, w, b),
                          {"activation": "gelu"})
    torch.library.opcheck(torch.ops.deepseek_kernels.gemm.default, (a.float(), w.float(), None),
                          {"out_dtype": torch.bfloat16})
    a64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.deepseek_kernels.gemm.default, (a64, w64, None),
                          {"activation": "silu"})


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_bad_inputs(device):
    a = torch.randn(4, 16, device=device)
    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match=r"gemm: argument 'weight' must have shape \[N, K\] with K = 16"):
        dk.gemm(a, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="argument 'bias' must have shape"):
        dk.gemm(a, w, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="argument 'activation' must be one of"):
        dk.gemm(a, w, activation="tanh")
    with pytest.raises(TypeError, match="argument 'weight' must have the dtype of 'a'"):
        dk.gemm(a, w.bfloat16())
    with pytest.raises(TypeError, match="argument 'a' must have dtype"):
        dk.gemm(a.int(), w)
    with pytest.raises(TypeError, match="argument 'out_dtype' must be one of"):
        dk.gemm(a, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="argument 'weight' must be 2-D"):
        dk.gemm(a, w[None])


@requires_cuda
def test_gemm_mixed_devices():
    a = torch.randn(4, 16)
    with pytest.raises(ValueError, match="must be on the same device"):
        dk.gemm(a, torch.randn(8, 16, device="cuda"))
    with pytest.raises(ValueError, match="float64, which only the CPU"):
        dk.gemm(a.double().cuda(), torch.randn(8, 16, device="cuda").double())


def test_gemm_torch_compile_fullgraph():
    def fn(x, w, b, w2, offsets):
        h = dk.gemm(x, w, b, activation="silu")
        return dk.grouped_gemm(h, w2, offsets)

    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24)
    w2 = torch.randn(3, 8, 24, requires_grad=True)
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    # aot_eager exercises Dynamo + the fake kernels + autograd tracing without
    # Inductor's C++ compile (minutes on this 2-core CI); the graph is the same.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, w2, offsets)
    assert torch.equal(out, fn(x, w, b, w2, offsets))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and w2.grad is not None



@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_gemm_autocast_like_linear(device, dtype):
    """Under torch.autocast, gemm and grouped_gemm run in the autocast dtype as
    F.linear does: the same bits as explicitly cast inputs, the output in that
    dtype, fp32 gradients for fp32 leaves; fp64 stays fp64; eager and compiled."""
    x = torch.randn(12, 16, device=device, requires_grad=True)
    w = torch.randn(24, 16, device=device, requires_grad=True)
    b = torch.randn(24, device=device)
    w2 = torch.randn(3, 8, 24, device=device, requires_grad=True)
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)

    def fn(x, w, b, w2):
        with torch.autocast(device, dtype=dtype):
            return dk.grouped_gemm(dk.gemm(x, w, b, activation="gelu"), w2, offsets)

    want = dk.grouped_gemm(dk.gemm(x.to(dtype), w.to(dtype), b.to(dtype), activation="gelu"),
                           w2.to(dtype), offsets)
    with torch.autocast(device, dtype=dtype):
        assert F.linear(x, w).dtype == dtype  # the peer's behaviour
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        out = f(x, w, b, w2)
        assert out.dtype == dtype and torch.equal(out, want)
        grads = torch.autograd.grad(out.float().sum(), (x, w, w2))
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    if device == "cpu":
        with torch.autocast(device, dtype=dtype):
            assert dk.gemm(x.double(), w.double()).dtype == torch.float64

# ---------------------------------------------------------------------------
# grouped_gemm
# ---------------------------------------------------------------------------


def _random_offsets(rows, groups, device, dtype=torch.int32, empty_groups=True):
    cuts = torch.sort(torch.randint(0, rows + 1, (groups - 1,))).values
    if empty_groups and groups > 2:
        cuts[1] = cuts[0]  # at least one empty group
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([rows])]).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 8, 136), (300, 7, 136, 72), (1000, 16, 40, 1032)],
                         ids=lambda s: "S{}xE{}xN{}xK{}".format(*s))
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=str)
def test_grouped_gemm_matches_reference(device, dtype, shape, offsets_dtype):
    s, e, n, k = shape
    x = _data((s, k), dtype, device)
    weights = _data((e, n, k), dtype, device, k ** -0.5)
    offsets = _random_offsets(s, e, device, offsets_dtype)
    ours = dk.grouped_gemm(x, weights, offsets)
    want = ref.grouped_gemm(x, weights, offsets, out_dtype=torch.float64)
    assert ours.dtype == dtype
    bounds = offsets.tolist()
    peer = torch.cat([x[bounds[g]:bounds[g + 1]] @ weights[g].t() for g in range(e)])
    _check_close(ours, peer, want)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_edge_cases(device):
    w = _data((4, 8, 24), torch.bfloat16, device)
    out = dk.grouped_gemm(torch.empty(0, 24, dtype=torch.bfloat16, device=device), w,
                          torch.zeros(5, dtype=torch.int32, device=device))
    assert out.shape == (0, 8)
    # Everything in the last group; out_dtype fp32.
    x = _data((70, 24), torch.bfloat16, device)
    offsets = torch.tensor([0, 0, 0, 0, 70], device=device)
    out = dk.grouped_gemm(x, w, offsets, out_dtype=torch.float32)
    want = ref.grouped_gemm(x, w, offsets, out_dtype=torch.float64)
    assert out.dtype == torch.float32
    _check_close(out, x.float() @ w[3].float().t(), want)


def test_grouped_gemm_gradcheck():
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 4, 4, 9, 11])
    assert torch.autograd.gradcheck(lambda x, w: dk.grouped_gemm(x, w, offsets), (x, w))


def test_backward_with_an_out_dtype():
    """bf16 inputs with an fp32 out_dtype: the fp32 incoming gradient is rounded to the
    inputs' dtype for the products (as nn.Linear's backward), so the gradients are
    bf16 and within bf16's error of the fp64 reference's (gemm and grouped_gemm)."""
    torch.manual_seed(4)
    x = torch.randn(11, 16).bfloat16().requires_grad_()
    w = torch.randn(8, 16).bfloat16().requires_grad_()
    ws = torch.randn(3, 8, 16).bfloat16().requires_grad_()
    offsets = torch.tensor([0, 4, 4, 11])
    cases = ((lambda x, w: dk.gemm(x, w, out_dtype=torch.float32), ref.gemm, w),
             (lambda x, w: dk.grouped_gemm(x, w, offsets, out_dtype=torch.float32),
              lambda x, w: ref.grouped_gemm(x, w, offsets), ws))
    for fn, ref_fn, weight in cases:
        y = fn(x, weight)
        assert y.dtype == torch.float32
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, weight), dy)
        x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        want = torch.autograd.grad(ref_fn(x64, w64), (x64, w64), dy.double())
        for got, exp in zip((gx, gw), want):
            assert got.dtype == torch.bfloat16
            rel = float((got.double() - exp).norm() / exp.norm())
            assert rel < 3 * 2.0**-8, rel


def test_grouped_gemm_opcheck():
    x = torch.randn(11, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    dy = torch.randn(11, 8)
    for offsets in (torch.tensor([0, 4, 4, 11]), torch.tensor([0, 2, 7, 11], dtype=torch.int32)):
        torch.library.opcheck(torch.ops.deepseek_kernels.grouped_gemm.default, (x, w, offsets))
        torch.library.opcheck(torch.ops.deepseek_kernels.grouped_gemm_wgrad.default,
                              (dy, x.detach(), offsets, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_wgrad(device):
    dy = _data((50, 24), torch.bfloat16, device)
    x = _data((50, 40), torch.bfloat16, device)
    offsets = torch.tensor([0, 0, 17, 50, 50], device=device)
    dw = torch.ops.deepseek_kernels.grouped_gemm_wgrad(dy, x, offsets, 4)
    assert dw.shape == (4, 24, 40) and dw.dtype == torch.bfloat16
    want = torch.zeros(4, 24, 40, dtype=torch.float64, device=device)
    want[1] = dy[:17].double().t() @ x[:17].double()
    want[2] = dy[17:].double().t() @ x[17:].double()
    peer = torch.stack([torch.zeros(24, 40, dtype=torch.bfloat16, device=device),
                        dy[:17].t() @ x[:17], dy[17:].t() @ x[17:],
                        torch.zeros(24, 40, dtype=torch.bfloat16, device=device)])
    _check_close(dw, peer, want)
    assert (dw[0] == 0).all() and (dw[3] == 0).all()
    with pytest.raises(ValueError, match="must be non-decreasing"):
        torch.ops.deepseek_kernels.grouped_gemm_wgrad(dy, x, torch.tensor([0, 20, 17, 50, 50],
                                                                          device=device), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_bad_inputs(device):
    x = torch.randn(10, 16, device=device)
    w = torch.randn(3, 8, 16, device=device)
    good = torch.tensor([0, 3, 6, 10], device=device)
    with pytest.raises(ValueError, match=r"'weights' must have shape \[E, N, K\] with K = 16"):
        dk.grouped_gemm(x, torch.randn(3, 8, 12, device=device), good)
    with pytest.raises(ValueError, match="'offsets' must have E \\+ 1 = 4 entries"):
        dk.grouped_gemm(x, w, good[:3])
    with pytest.raises(TypeError, match="'offsets' must have dtype"):
        dk.grouped_gemm(x, w, good.float())
    with pytest.raises(TypeError, match="'weights' must have the dtype of 'x'"):
        dk.grouped_gemm(x, w.half(), good)
    if device == "cpu":  # values are checked where they live (no host sync on CUDA)
        with pytest.raises(ValueError, match="must be non-decreasing"):
            dk.grouped_gemm(x, w, torch.tensor([0, 6, 3, 10]))
        with pytest.raises(ValueError, match="must end at x.size\\(0\\) = 10"):
            dk.grouped_gemm(x, w, torch.tensor([0, 3, 6, 9]))
        with pytest.raises(ValueError, match="must start at 0"):
            dk.grouped_gemm(x, w, torch.tensor([1, 3, 6, 10]))


@requires_cuda
def test_grouped_gemm_cuda_bad_offsets_stay_in_bounds():
    x = torch.randn(100, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 8, 16, device="cuda", dtype=torch.bfloat16)
    for bad in ([0, 60, 30, 100], [-5, 3, 6, 1000], [0, 3, 6, 90]):
        dk.grouped_gemm(x, w, torch.tensor(bad, device="cuda"))
    torch.cuda.synchronize()  # no illegal address


# ---------------------------------------------------------------------------
# INT8 W8A8
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_int8_rowwise_exact(device, dtype):
    x = _data((67, 130), dtype, device, 3.0)
    x[3] = 0  # all-zero row: scale 1, codes 0
    x[5, 7] = float("nan")  # non-finite row: scale NaN, codes 0
    # Exact halves: 127 * (j + 0.5) / 127-scaled values round to even.
    x[9, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5], dtype=dtype)
    q, s = dk.quantize_int8_rowwise(x)
    rq, rs = ref.quantize_int8_rowwise(x)
    assert torch.equal(q, rq)
    assert torch.equal(s.nan_to_num(-1), rs.nan_to_num(-1))
    assert s[3] == 1 and (q[3] == 0).all() and s[5].isnan() and (q[5] == 0).all()
    assert q[9, :4].tolist() == [127, 0, 2, -2]  # scale 1: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    # Round to nearest: within half a step (plus the fp32 rounding of q * s - x).
    finite = torch.isfinite(s)
    xf, qf, sf = x.float()[finite], q.float()[finite], s[finite, None]
    assert ((qf * sf - xf).abs() <= 0.5 * sf + 1e-6 * xf.abs()).all()


def _int8_problem(m, n, k, device):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    a_s = torch.rand(m, device=device) * 0.02 + 1e-3
    w_s = torch.rand(n, device=device) * 0.02 + 1e-3
    return a, a_s, w, w_s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mnk", [(1, 8, 136), (17, 136, 8), (100, 72, 1030), (33, 40, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_gemm_bitwise(device, mnk, out_dtype, with_bias):
    m, n, k = mnk
    a, a_s, w, w_s = _int8_problem(m, n, k, device)
    bias = torch.randn(n, device=device) if with_bias else None
    out = dk.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype)
    want = ref.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, want)


def test_int8_cuda_kernel_op():
    op = torch.ops.deepseek_kernels._int8_cuda_kernel
    start = op(0)
    assert op(2) == start and op(0) == 2
    assert op(start) == 2 and op(0) == start
    with pytest.raises(ValueError, match="0, 1 or 2"):
        op(5)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_int8_tensor_core_kernel_bitwise(out_dtype):
    """v2 (mma.sync s8) gives the reference's bits: integer sums are exact in any
    order. Tails of its 128 x 128 x 64 and 64 x 64 x 64 tiles, K with |acc| past 2^24
    (rounded to fp32 the same way), K % 16 != 0 (falls back to dp4a), bias or not."""
    with kernel_choice("_int8_cuda_kernel", 2):
        for m, n, k in [(1, 8, 128), (17, 136, 1024), (300, 200, 528), (1000, 1000, 4096),
                        (129, 257, 2048), (100, 72, 1030)]:
            a, a_s, w, w_s = _int8_problem(m, n, k, "cuda")
            for bias in (None, torch.randn(n, device="cuda")):
                out = dk.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype)
                assert kernel_ran("int8_gemm") == (2 if k % 16 == 0 else 1), (m, n, k)
                want = ref.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype)
                assert torch.equal(out, want), (m, n, k, bias is not None)


@pytest.mark.parametrize("sums", [1, 2], ids=["our-loop", "torch-int-mm"])
def test_int8_cpu_sums_both_ways_bitwise(sums):
    """The CPU's int32 sums by our loop (1) or by torch's int8 matmul (2; auto picks
    it where the CPU has AVX512-VNNI): the reference's bits either way, at odd
    shapes, bias or not, and at K = 131,071 with extreme codes (sums near 2^31)."""
    with kernel_choice("_int8_cpu_sums", sums):
        for m, n, k in [(1, 1, 1), (5, 9, 37), (33, 40, 7), (100, 72, 1030), (64, 64, 256)]:
            a, a_s, w, w_s = _int8_problem(m, n, k, "cpu")
            for bias in (None, torch.randn(n)):
                for out_dtype in DTYPES:
                    want = ref.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype)
                    assert torch.equal(dk.int8_gemm(a, a_s, w, w_s, bias=bias, out_dtype=out_dtype), want)
        k = 131_071
        a = torch.full((3, k), -128, dtype=torch.int8)
        a[1] = 127
        w = torch.full((2, k), -128, dtype=torch.int8)
        out = dk.int8_gemm(a, torch.ones(3), w, torch.ones(2), out_dtype=torch.float32)
        exact = (a.double() @ w.double().t())
        assert torch.equal(out.double(), exact.float().double())  # |sum| < 2^31, one fp32 rounding
    op = torch.ops.deepseek_kernels._int8_cpu_sums
    with pytest.raises(ValueError, match="_int8_cpu_sums"):
        op(7)


def test_int8_gemm_accumulation_is_exact():
    # Unit scales and fp32 out expose the raw int32 accumulator; K large enough
    # that |acc| passes 2^24 would be rounded identically, so keep it below.
    m, n, k = 9, 10, 1000
    a = torch.full((m, k), -127, dtype=torch.int8)
    a[1::2] = torch.randint(-127, 128, (m // 2, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w[0] = -127
    one_m, one_n = torch.ones(m), torch.ones(n)
    out = dk.int8_gemm(a, one_m, w, one_n, out_dtype=torch.float32)
    exact = (a.long()[:, None, :] * w.long()[None, :, :]).sum(-1)  # int64 accumulation
    assert torch.equal(out.double(), exact.double())
    assert out[0, 0] == 127 * 127 * k


def test_int8_gemm_w8a8_error_vs_bf16():
    """The W8A8 pipeline end to end: quantize both sides row-wise, int8_gemm; its
    error against fp64 is reported relative to a bf16 GEMM's (W8A8 is coarser)."""
    x = torch.randn(64, 512)
    w = torch.randn(96, 512) * 0.05
    qx, sx = dk.quantize_int8_rowwise(x)
    qw, sw = dk.quantize_int8_rowwise(w)
    out = dk.int8_gemm(qx, sx, qw, sw, out_dtype=torch.float32)
    want = x.double() @ w.double().t()
    rel = ((out.double() - want).norm() / want.norm()).item()
    rel_bf16 = ((x.bfloat16() @ w.bfloat16().t()).double() - want).norm().item() / want.norm().item()
    assert rel < 0.02, rel  # 7-bit codes: ~1% relative error
    assert rel > rel_bf16 / 10  # sanity: it is a real quantized product, not the fp one


def test_int8_opcheck():
    a, a_s, w, w_s = _int8_problem(9, 16, 40, "cpu")
    torch.library.opcheck(torch.ops.deepseek_kernels.int8_gemm.default, (a, a_s, w, w_s, None),
                          {"out_dtype": torch.float16})
    torch.library.opcheck(torch.ops.deepseek_kernels.quantize_int8_rowwise.default,
                          (torch.randn(7, 33, dtype=torch.bfloat16),))


@pytest.mark.parametrize("device", DEVICES)
def test_int8_bad_inputs(device):
    a, a_s, w, w_s = _int8_problem(4, 8, 16, device)
    with pytest.raises(ValueError, match=r"argument 'w' must have shape \[N, K\] with K = 16"):
        dk.int8_gemm(a, a_s, w[:, :8], w_s)
    with pytest.raises(ValueError, match=r"argument 'a_scales' must have shape \[4\]"):
        dk.int8_gemm(a, a_s[:3], w, w_s)
    with pytest.raises(ValueError, match=r"argument 'w_scales' must have shape \[8\]"):
        dk.int8_gemm(a, a_s, w, w_s[None])
    with pytest.raises(TypeError, match="argument 'a' must have dtype Char"):
        dk.int8_gemm(a.float(), a_s, w, w_s)
    with pytest.raises(TypeError, match="argument 'w_scales' must have dtype Float"):
        dk.int8_gemm(a, a_s, w, w_s.half())
    with pytest.raises(ValueError, match="argument 'x' must be 2-D"):
        dk.quantize_int8_rowwise(torch.randn(3, 4, 5, device=device))
    with pytest.raises(TypeError, match="argument 'x' must have dtype"):
        dk.quantize_int8_rowwise(torch.randn(3, 4, device=device).double())
    assert dk.int8_gemm(a[:0], a_s[:0], w, w_s).shape == (0, 8)
    # int8 codes may hold -128: 128 * 128 * K must fit the int32 accumulator.
    k_max = (2**31 - 1) // (128 * 128)
    a1 = torch.full((1, k_max + 1), -128, dtype=torch.int8, device=device)
    w1, one = a1.clone(), torch.ones(1, device=device)
    with pytest.raises(ValueError, match=f"K = {k_max + 1} exceeds {k_max}"):
        dk.int8_gemm(a1, one, w1, one)
    out = dk.int8_gemm(a1[:, :k_max], one, w1[:, :k_max], one, out_dtype=torch.float32)
    assert out.item() == 128 * 128 * k_max  # the largest accumulator, exact in fp32 (a multiple of 2^14)
    q, s = dk.quantize_int8_rowwise(torch.randn(0, 5, device=device))
    assert q.shape == (0, 5) and s.shape == (0,)


# ---------------------------------------------------------------------------
# CPU vs CUDA
# ---------------------------------------------------------------------------


# The CUDA bf16/fp16 GEMM kernel generation for a block (4 = auto).
_gemm_kernel = functools.partial(kernel_choice, "_gemm_cuda_kernel")


def test_gemm_cuda_kernel_op():
    # A catch-all op: works (and is checked) on CPU-only builds too.
    op = torch.ops.deepseek_kernels._gemm_cuda_kernel
    start = op(0)
    assert start in (1, 2, 3, 4)
    with _gemm_kernel(2):
        assert op(0) == 2
        assert op(1) == 2 and op(0) == 1
    assert op(0) == start
    with _gemm_kernel(3):
        assert op(0) == 3
    with _gemm_kernel(4):  # auto
        assert op(0) == 4
    with pytest.raises(ValueError, match="0, 1, 2, 3 or 4"):
        op(5)


@requires_cuda
@pytest.mark.cuda
def test_gemm_auto_choice():
    """auto (the default): v3 (v2 without sm_90a) where 128 x 256 tiles fill a wave
    of the GPU, plain or grouped; v1's smaller tiles below. Each result within the
    fp64 criterion."""
    rows = 128 * torch.cuda.get_device_properties(0).multi_processor_count  # a wave at N = 256
    big = 3 if hopper_build() else 2
    x = _data((rows, 264), torch.bfloat16, "cuda")
    w = _data((4, 256, 264), torch.bfloat16, "cuda", 264 ** -0.5)
    offsets = _random_offsets(rows, 4, "cuda")
    with _gemm_kernel(4):
        for m, want_ran in [(17, 1), (rows, big)]:
            ours = dk.gemm(x[:m], w[0])
            assert kernel_ran("gemm") == want_ran, m
            want = ref.gemm(x[:m], w[0], out_dtype=torch.float64)
            _check_close(ours, x[:m] @ w[0].t(), want, f"auto gemm m={m}")
        ours = dk.grouped_gemm(x, w, offsets)
        assert kernel_ran("gemm") == big
        bounds = offsets.tolist()
        peer = torch.cat([x[bounds[g]:bounds[g + 1]] @ w[g].t() for g in range(4)])
        _check_close(ours, peer, ref.grouped_gemm(x, w, offsets, out_dtype=torch.float64),
                     "auto grouped")


# (M, N, K): every tail of v2's 128 x 256 x 32 tiles; K = 17 is padded to 24 by the
# glue; (4097, 264, 136) and (200, 4100, 72) span many CTAs in M and N.
_VERSION_SHAPES = [(1, 17, 136), (17, 136, 1000), (136, 1000, 17), (1000, 1000, 136),
                   (4097, 264, 136), (200, 4100, 72)]
_CPU_CACHE = {}


def _cpu_case(mnk, dtype):
    """Inputs, fp64 references and CPU results of one problem, shared by the
    kernel versions (the CPU work dominates this test). The CPU result is the CPU
    kernel's arithmetic: one dk.gemm to fp32 (fp32 BLAS), then bias + activation
    in fp32 and one rounding, per epilogue."""
    key = (mnk, dtype)
    if key not in _CPU_CACHE:
        m, n, k = mnk
        g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
        a = torch.randn(m, k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        z = a.double() @ w.double().t()
        z32 = dk.gemm(a, w, out_dtype=torch.float32)
        cases = {}
        for activation in ACTS:
            for with_bias in (False, True):
                want = ref._gemm_activation(z + b.double() if with_bias else z, activation)
                cpu = ref._gemm_activation(z32 + b.float() if with_bias else z32, activation)
                cases[activation, with_bias] = (want, cpu.to(dtype))
        _CPU_CACHE[key] = (a, w, b, cases)
    return _CPU_CACHE[key]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1", "v2", "v3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_versions_match_cpu(version, dtype):
    """Each CUDA kernel generation against the CPU (fp32 BLAS + our epilogue) and
    fp64: every activation, bias on/off, odd shapes. v2 must also equal v1
    bitwise where the epilogue has no transcendental (same mma sequence per
    output element: K in 32-wide tiles, 16 at a time, ascending). v3 (wgmma; v2
    on GPUs without sm_90a) sums in the wgmma's order: the tolerances only."""
    eps = torch.finfo(dtype).eps
    for mnk in _VERSION_SHAPES:
        a, w, b, cases = _cpu_case(mnk, dtype)
        ag, wg, bg = a.cuda(), w.cuda(), b.cuda()
        for (activation, with_bias), (want, cpu) in cases.items():
            name = f"v{version} {mnk} {dtype} {activation} bias={with_bias}"
            with _gemm_kernel(version):
                gpu = dk.gemm(ag, wg, bg if with_bias else None, activation=activation)
            if hopper_build():  # where every generation must run, not fall back
                assert kernel_ran("gemm") == version, name
            if version == 2 and activation in ("none", "relu"):
                with _gemm_kernel(1):
                    v1 = dk.gemm(ag, wg, bg if with_bias else None, activation=activation)
                assert torch.equal(gpu, v1), name
            gpu = gpu.cpu()
            assert gpu.dtype == dtype, name
            _check_close(gpu, cpu, want, name)
            assert (gpu.float() - cpu.float()).abs().max() <= 2 * eps * \
                max(want.abs().max().item(), 1.0), name
    # fp32 output and leading batch dims through the same kernel.
    a, w, b, cases = _cpu_case((1000, 1000, 136), dtype)
    want, _ = cases["gelu", True]
    with _gemm_kernel(version):
        gpu = dk.gemm(a.cuda().view(10, 100, 136), w.cuda(), b.cuda(), activation="gelu",
                      out_dtype=torch.float32)
    assert gpu.shape == (10, 100, 1000) and gpu.dtype == torch.float32
    cpu = dk.gemm(a, w, b, activation="gelu", out_dtype=torch.float32)
    _check_close(gpu.cpu().view(1000, 1000), cpu, want, f"v{version} fp32 out")


@requires_cuda
@pytest.mark.cuda
def test_cuda_kernel_v2_large_square():
    """v2 at a full-wave size (512 CTAs of 128 x 256) against v1, bitwise, and a
    bias + gelu spot check against fp64 on a block of rows."""
    m = n = k = 2048
    a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    with _gemm_kernel(1):
        v1 = dk.gemm(a, w, b)
    with _gemm_kernel(2):
        v2 = dk.gemm(a, w, b)
        v2g = dk.gemm(a, w, b, activation="gelu")
    assert torch.equal(v1, v2)
    rows = slice(1900, 2048)
    want = ref.gemm(a[rows], w, b, activation="gelu", out_dtype=torch.float64)
    _check_close(v2g[rows], _torch_peer(a[rows], w, b, "gelu"), want, "v2 2048^3 gelu")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1", "v2", "v3"])
def test_grouped_gemm_cuda_kernel_versions(version):
    """Grouped GEMMs through each forced generation (v2/v3 locate their row tiles in
    the groups as v1 does; auto picks v3 where its tiles fill a wave): empty groups, groups
    shorter than a tile, many tiles; v2 bitwise v1 (same mma order), v3 within
    the fp64 criterion. Bad offsets stay in bounds."""
    for s_rows, e, n, k in [(1000, 16, 136, 1032), (5000, 7, 300, 200), (3, 4, 8, 16)]:
        x = _data((s_rows, k), torch.bfloat16, "cuda")
        weights = _data((e, n, k), torch.bfloat16, "cuda", k ** -0.5)
        offsets = _random_offsets(s_rows, e, "cuda")
        with _gemm_kernel(version):
            ours = dk.grouped_gemm(x, weights, offsets)
        if hopper_build():
            assert kernel_ran("gemm") == version
        with _gemm_kernel(1):
            v1 = dk.grouped_gemm(x, weights, offsets)
        if version == 2:
            assert torch.equal(ours, v1)
        want = ref.grouped_gemm(x, weights, offsets, out_dtype=torch.float64)
        bounds = offsets.tolist()
        peer = torch.cat([x[bounds[g]:bounds[g + 1]] @ weights[g].t() for g in range(e)])
        _check_close(ours, peer, want, f"v{version} grouped {(s_rows, e, n, k)}")
    with _gemm_kernel(version):
        for bad in ([0, 60, 30, 100], [-5, 3, 6, 1000], [0, 3, 6, 90]):
            dk.grouped_gemm(x[:100], weights[:3], torch.tensor(bad, device="cuda"))
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.cuda
def test_cuda_kernel_v3_wgmma():
    """v3 (wgmma) on full waves and every tail of its 128 x 256 x 64 tiles, against
    fp64 with the usual 2x-of-PyTorch criterion, bf16 and fp16, and twice the same
    bits (deterministic). On a GPU without sm_90a it runs v2 (still checked)."""
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in [(2048, 2048, 2048), (4097, 300, 200), (129, 257, 72), (1, 8, 8), (300, 4100, 1000)]:
            a = torch.randn(m, k, device="cuda").to(dtype)
            w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
            b = torch.randn(n, device="cuda").to(dtype)
            with _gemm_kernel(3):
                out = dk.gemm(a, w, b, activation="gelu")
                again = dk.gemm(a, w, b, activation="gelu")
            if hopper_build():
                assert kernel_ran("gemm") == 3  # v3 itself, not the v2 fallback
            assert torch.equal(out, again)
            rows = slice(max(0, m - 200), m)  # the last rows: the M tail
            want = ref.gemm(a[rows], w, b, activation="gelu", out_dtype=torch.float64)
            _check_close(out[rows], _torch_peer(a[rows], w, b, "gelu"), want, f"v3 {(m, n, k)} {dtype}")
            rows = slice(0, min(m, 200))
            want = ref.gemm(a[rows], w, b, activation="gelu", out_dtype=torch.float64)
            _check_close(out[rows], _torch_peer(a[rows], w, b, "gelu"), want, f"v3 {(m, n, k)} {dtype}")


# argv: the saved cases (op name, args, kwargs), where to save the outputs, the
# kernel-choice op and the family whose generation 3 must run. Saves the outputs
# and, per case, the v3 variant bits its launch noted (V3Variant, kernel_choice.h).
_V3_CASES_SCRIPT = """
import sys, torch, deepseek_kernels as dk
cases = torch.load(sys.argv[1])
getattr(torch.ops.deepseek_kernels, sys.argv[3])(3)
outs, variants = [], []
for op, args, kwargs in cases:
    outs.append(getattr(dk, op)(*args, **kwargs))
    assert torch.ops.deepseek_kernels._cuda_kernel_ran(sys.argv[4]) == 3
    variants.append(int(torch.ops.deepseek_kernels._cuda_kernel_ran(sys.argv[4] + "_v3_variant")))
torch.save((outs, variants), sys.argv[2])
"""
# V3Variant bits (csrc/common/kernel_choice.h).
_V3_TMA, _V3_CLUSTER, _V3_DEEP, _V3_WARP_SPECIALIZED, _V3_FMA_PROMOTION, _V3_WARP_ARRIVALS = 1, 2, 4, 8, 16, 32


# The variables that pick v3's opt-in variants, per family (read once per process).
_V3_KNOBS = {"gemm": ["DSK_GEMM_" + k for k in ("TMA", "CLUSTER", "DEEP_PREFETCH", "WARP_SPECIALIZED",
                                                "SKIP_EMPTY_ROWS")] + ["DSK_WS_WARP_ARRIVALS"],
             "fp8_gemm": ["DSK_FP8_" + k for k in ("TMA", "CLUSTER", "DEEP_PREFETCH", "WARP_SPECIALIZED",
                                                   "FMA_PROMOTION")] + ["DSK_WS_WARP_ARRIVALS"]}


def _skip_if_variant_env(family):
    """The variant tests compare a subprocess's variant with this process's default
    v3: skipped where this process itself runs a variant (gpu_check's variant families)."""
    import os

    knobs = [k for k in _V3_KNOBS[family] if os.environ.get(k)]
    if knobs:
        pytest.skip(f"compares against the default v3, and this process sets {knobs}")


def _run_v3_variant(tmp_path, cases, choice_op, family, variant):
    """`cases` through generation 3 of `family` in a fresh process with the
    environment assignments in `variant`: (outputs, the V3Variant bits each ran)."""
    import os
    import subprocess
    import sys

    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, **dict(kv.split("=") for kv in variant.split()))
    subprocess.run([sys.executable, "-c", _V3_CASES_SCRIPT, str(tmp_path / "cases.pt"),
                    str(tmp_path / "outs.pt"), choice_op, family], env=env, check=True, timeout=300)
    return torch.load(tmp_path / "outs.pt")


def _assert_v3_variant_same_bits(tmp_path, cases, choice_op, family, variant, default_bits, variant_bits,
                                 baseline=None):
    """Runs `cases` ((dk op name, args, kwargs) each) through generation 3 of
    `family` (forced with `choice_op`) here, or with `baseline` in a fresh process,
    and in a fresh process with the environment assignments in `variant` (read
    once per process by the library), and asserts the two runs' outputs are the
    same bits, and that each case ran the v3 variant asked for: `default_bits` in
    the first run, `variant_bits(op)` in the second (a variant that silently fell
    back would leave the test comparing v3 with itself)."""
    _skip_if_variant_env(family)
    if baseline is None:
        with kernel_choice(choice_op, 3):
            ours = []
            for op, args, kwargs in cases:
                ours.append(getattr(dk, op)(*args, **kwargs))
                assert kernel_ran(family) == 3
                assert kernel_ran(family + "_v3_variant") == default_bits, op
    else:
        ours, ran = _run_v3_variant(tmp_path, cases, choice_op, family, baseline)
        assert ran == [default_bits] * len(cases), ran
    theirs, ran = _run_v3_variant(tmp_path, cases, choice_op, family, variant)
    assert len(theirs) == len(ours)
    for i, ((op, _, _), a, b) in enumerate(zip(cases, ours, theirs)):
        assert ran[i] == variant_bits(op), (i, op, ran[i], variant_bits(op))
        assert torch.equal(a, b), i


@requires_cuda
@pytest.mark.cuda
@pytest.mark.skipif(not hopper_build(), reason="v3 (wgmma) needs an H100/H200 and an sm_90a build")
@pytest.mark.parametrize("variant", ["DSK_GEMM_TMA=0", "DSK_GEMM_CLUSTER=1", "DSK_GEMM_DEEP_PREFETCH=1",
                                     "DSK_GEMM_CLUSTER=1 DSK_GEMM_DEEP_PREFETCH=1", "DSK_GEMM_WARP_SPECIALIZED=1",
                                     "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_SKIP_EMPTY_ROWS=1",
                                     "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1",
                                     "DSK_GEMM_WARP_SPECIALIZED=1 DSK_WS_WARP_ARRIVALS=1",
                                     "DSK_GEMM_WARP_SPECIALIZED=1 DSK_GEMM_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1"],
                         ids=["cp_async", "cluster", "deep_prefetch", "cluster_deep_prefetch", "warp_specialized",
                              "warp_specialized_skip_empty", "warp_specialized_cluster",
                              "warp_specialized_warp_arrivals", "warp_specialized_cluster_warp_arrivals"])
def test_cuda_v3_tma_and_variant_same_bits(tmp_path, variant):
    """v3 filled by TMA (the default) and by cp.async (DSK_GEMM_TMA=0), in clusters
    of two CTAs multicasting B (DSK_GEMM_CLUSTER=1; plain GEMMs: an odd count of m
    tiles leaves a CTA past M), with its copies a tile further ahead
    (DSK_GEMM_DEEP_PREFETCH=1), or warp-specialized and persistent
    (DSK_GEMM_WARP_SPECIALIZED=1: the last shapes have more tiles than an H100 has
    SMs, so CTAs run several and the stage counter crosses tiles; with
    DSK_GEMM_CLUSTER=1 in clusters, the last plain shape with more pairs of m tiles
    than an H100 holds clusters and an odd count of m tiles), each read once
    per process (a subprocess), feed the same operands to the same wgmma in the
    same K order: the outputs must be the same bits, on tails of K (TMA zero-fills
    past K and past the last row), M, N and grouped tiles (offsets not multiples
    of 128)."""
    cases = []
    for m, n, k in [(1, 260, 8), (127, 260, 56), (129, 260, 64), (300, 520, 72), (1000, 300, 136),
                    (2100, 1030, 640), (4100, 2600, 200)]:
        cases.append(("gemm", (_data((m, k), torch.bfloat16, "cuda"),
                               _data((n, k), torch.bfloat16, "cuda", k ** -0.5),
                               _data((n,), torch.bfloat16, "cuda")), {"activation": "gelu"}))
    for s_rows, e, n, k in [(1000, 7, 136, 200), (300, 4, 264, 64), (9000, 40, 520, 136)]:
        cases.append(("grouped_gemm", (_data((s_rows, k), torch.bfloat16, "cuda"),
                                       _data((e, n, k), torch.bfloat16, "cuda", k ** -0.5),
                                       _random_offsets(s_rows, e, "cuda")), {}))

    def variant_bits(op):
        cluster = _V3_CLUSTER if "CLUSTER" in variant and op == "gemm" else 0  # plain GEMMs only
        if "WARP_SPECIALIZED" in variant:  # it takes precedence over the deep variant
            return (_V3_TMA | _V3_WARP_SPECIALIZED | cluster
                    | (_V3_WARP_ARRIVALS if "WARP_ARRIVALS" in variant else 0))
        return ((0 if "TMA=0" in variant else _V3_TMA) | cluster
                | (_V3_DEEP if "DEEP_PREFETCH" in variant else 0))

    _assert_v3_variant_same_bits(tmp_path, cases, "_gemm_cuda_kernel", "gemm", variant, _V3_TMA, variant_bits)


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu():
    # bf16 through tensor cores vs the CPU's fp32 BLAS: same reference error budget.
    # The kernel picks 64x64 tiles for small problems and 128x128 ones once they
    # fill the GPU (>= one CTA per SM): (2065, 1032, 264) is the latter, with tails.
    for m, n, k in [(1, 8, 136), (129, 257, 72), (4096, 512, 1024), (300, 1000, 1000),
                    (2065, 1032, 264)]:
        a = _data((m, k), torch.bfloat16, "cpu")
        w = _data((n, k), torch.bfloat16, "cpu", k ** -0.5)
        b = _data((n,), torch.bfloat16, "cpu")
        want = ref.gemm(a, w, b, activation="gelu", out_dtype=torch.float64)
        cpu = dk.gemm(a, w, b, activation="gelu")
        gpu = dk.gemm(a.cuda(), w.cuda(), b.cuda(), activation="gelu").cpu()
        _check_close(gpu, cpu, want)
        assert (gpu.float() - cpu.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * \
            max(want.float().abs().max().item(), 1.0)
    # Grouped at MoE-like proportions, with empty experts; both tile shapes.
    for s, n in [(2000, 384), (8000, 1100)]:
        x = _data((s, 256), torch.bfloat16, "cpu")
        w = _data((32, n, 256), torch.bfloat16, "cpu", 1 / 16)
        offsets = _random_offsets(s, 32, "cpu")
        cpu = dk.grouped_gemm(x, w, offsets)
        gpu = dk.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda()).cpu()
        _check_close(gpu, cpu, ref.grouped_gemm(x, w, offsets, out_dtype=torch.float64))
    # INT8 and the row-wise quantizer: bitwise.
    a, a_s, wq, w_s = _int8_problem(333, 129, 1001, "cpu")
    assert torch.equal(dk.int8_gemm(a.cuda(), a_s.cuda(), wq.cuda(), w_s.cuda()).cpu(),
                       dk.int8_gemm(a, a_s, wq, w_s))
    xf = torch.randn(77, 1001, dtype=torch.bfloat16)
    for got, want in zip(dk.quantize_int8_rowwise(xf.cuda()), dk.quantize_int8_rowwise(xf)):
        assert torch.equal(got.cpu(), want)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_is_a_drop_in(device, activation):
    base = torch.nn.Linear(48, 20, device=device)
    lin = Linear.from_linear(base, activation=activation)
    assert lin.weight.shape == (20, 48) and not lin.weight is base.weight
    x = torch.randn(3, 7, 48, device=device, requires_grad=True)
    want = base(x)
    if activation == "gelu":
        want = F.gelu(want)
    y = lin(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()  # base's grads land on base's parameters
    torch.testing.assert_close(lin.weight.grad, base.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad, base.bias.grad, rtol=1e-4, atol=1e-4)
    fresh = Linear(48, 20, bias=False, dtype=torch.bfloat16, device=device)
    assert fresh.bias is None and fresh.weight.dtype == torch.bfloat16
    assert fresh.weight.abs().max() <= 48 ** -0.5  # nn.Linear's init bound
    with pytest.raises(ValueError, match="activation must be one of"):
        Linear(4, 4, activation="tanh")


def test_moe_layer_dropless_uses_grouped_gemm(monkeypatch):
    """MoELayer's dropless path runs two grouped GEMMs and matches the per-expert loop."""
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 8, 2)
    calls = []
    real = dk.ops.grouped_gemm
    monkeypatch.setattr(dk.ops, "grouped_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(30, 16)
    y = layer(x)
    assert len(calls) == 2
    with torch.no_grad():
        g = dk.moe_topk_gating(layer.router(x), 2)
        want = torch.zeros(30, 16, dtype=torch.float64)
        for t in range(30):
            for j in range(2):
                e = int(g.expert_ids[t, j])
                h = x[t].double() @ layer.w_gate_up[e].double()
                want[t] += float(g.weights[t, j]) * (layer._swiglu(h) @ layer.w_down[e].double())
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)


def test_bench_gemm_smoke(tmp_path):
    """bench/bench_gemm.py end to end on tiny CPU shapes: its checks must pass."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_gemm_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--device", "cpu", "--square", "48", "--grouped", "64", "4", "16", "24",
                   "--int8", "16", "24", "40", "--fp8", "8", "16", "256", "--out", str(tmp_path)])
    assert rc == 0
    (result,) = tmp_path.glob("gemm-*.json")
    data = json.loads(result.read_text())
    assert all(data["checks"].values())
    assert [r["op"] for r in data["rows"]] == ["gemm", "gemm+bias+gelu", "grouped", "fp8 grouped",
                                              "int8", "fp8"]


# ---------------------------------------------------------------------------
# FP8 e4m3 block-scaled
# ---------------------------------------------------------------------------

from deepseek_kernels.nn import FP8Linear  # noqa: E402


# The CUDA FP8 GEMM kernel for a block (1 exact SIMT, 2 mma.sync, 3 wgmma).
_fp8_kernel = functools.partial(kernel_choice, "_fp8_cuda_kernel")


@pytest.fixture(autouse=True)
def _exact_fp8_kernel():
    """Every test starts on the exact FP8 kernel, whatever DSK_FP8_KERNEL says: the
    bitwise assertions are about it; tests of the tensor-core kernel select it."""
    with _fp8_kernel(1):
        yield


def _same(x, y):
    """Bitwise equality, NaN == NaN."""
    x, y = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x, \
        y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y
    return x.shape == y.shape and torch.equal(x.nan_to_num(-7), y.nan_to_num(-7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)], ids=["1x128", "128x128"])
@pytest.mark.parametrize("shape", [(1, 8), (17, 136), (130, 300)], ids=lambda s: "x".join(map(str, s)))
def test_quantize_fp8_bitwise(device, dtype, block, shape):
    x = _data(shape, dtype, device, 5.0)
    if shape[0] > 3:
        x[3] = 0  # a zero row: its 1x128 blocks get scale 1
    if shape[0] > 5:
        x[5, 0] = float("inf")
    q, s = dk.quantize_fp8(x, block)
    rq, rs = ref.quantize_fp8(x, block)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // block[0]), -(-shape[1] // 128))
    assert _same(q, rq) and _same(s, rs)
    # Round to nearest e4m3: relative error <= 2^-4 of each finite block's values.
    sf = s.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    ok = torch.isfinite(sf)
    deq = q.float() * sf
    assert ((deq - x.float()).abs()[ok] <= 2 ** -4 * x.float().abs()[ok] + sf[ok] * 2 ** -9).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)], ids=["1x128", "128x128"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 130, 300), (5, 136, 128)], ids=lambda s: "x".join(map(str, s)))
def test_quantize_fp8_batched(device, dtype, block, shape):
    """A 3-D x [E, M, K] quantizes each x[e] on its own: equal to E 2-D calls."""
    x = _data(shape, dtype, device, 5.0)
    x[-1, 0, 0] = float("nan")  # one non-finite block in the last matrix only
    q, s = dk.quantize_fp8(x, block)
    assert s.shape == (shape[0], -(-shape[1] // block[0]), -(-shape[2] // 128))
    for e in range(shape[0]):
        qe, se = dk.quantize_fp8(x[e], block)
        assert _same(q[e], qe) and _same(s[e], se)
    rq, rs = ref.quantize_fp8(x, block)
    assert _same(q, rq) and _same(s, rs)
    q0, s0 = dk.quantize_fp8(x[:0], block)
    assert q0.shape == (0, *shape[1:]) and s0.shape == (0, *s.shape[1:])
    with pytest.raises(ValueError, match="must be 2-D \\[M, K\\] or 3-D \\[E, M, K\\], got 1-D"):
        dk.quantize_fp8(x[0, 0], block)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mnk", [(1, 8, 128), (17, 136, 256), (33, 130, 200), (64, 256, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_fp8_gemm_bitwise_and_error(device, mnk, out_dtype):
    m, n, k = mnk
    x = _data((m, k), torch.float32, device)
    w = _data((n, k), torch.float32, device, k ** -0.5)
    qx, sx = dk.quantize_fp8(x, (1, 128))
    qw, sw = dk.quantize_fp8(w, (128, 128))
    out = dk.fp8_gemm(qx, sx, qw, sw, out_dtype=out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, ref.fp8_gemm(qx, sx, qw, sw, out_dtype=out_dtype))
    # Error against the unquantized fp64 product, bounded elementwise from e4m3's
    # rounding: |dx| <= max(2^-4 |x|, 2^-10 scale) (normal / subnormal range), so
    # |d(x.w)| <= |x|.|dw| + |dx|.|w| + |dx|.|dw|, plus fp32 sums and the output rounding.
    want = x.double() @ w.double().t()
    xa, wa = x.double().abs(), w.double().abs()
    ex = torch.maximum(xa * 2 ** -4, sx.double().repeat_interleave(128, 1)[:, :k] * 2 ** -10)
    ew = torch.maximum(wa * 2 ** -4, sw.double().repeat_interleave(128, 0)[:n].repeat_interleave(
        128, 1)[:, :k] * 2 ** -10)
    bound = xa @ ew.t() + ex @ wa.t() + ex @ ew.t() + 1e-5 * (xa @ wa.t()) \
        + want.abs() * torch.finfo(out_dtype).eps
    assert ((out.double() - want).abs() <= bound).all()
    # Reported next to bf16: FP8 (3 mantissa bits) is coarser, a few percent.
    rel = ((out.double() - want).norm() / want.norm()).item()
    rel_bf16 = ((x.bfloat16() @ w.bfloat16().t()).double() - want).norm().item() / want.norm().item()
    if m * n >= 1000:
        assert rel < 0.05 and rel > rel_bf16, (rel, rel_bf16)


def test_fp8_opcheck():
    x = torch.randn(9, 200)
    torch.library.opcheck(torch.ops.deepseek_kernels.quantize_fp8.default, (x, [1, 128]))
    torch.library.opcheck(torch.ops.deepseek_kernels.quantize_fp8.default, (x.bfloat16(), [128, 128]))
    torch.library.opcheck(torch.ops.deepseek_kernels.quantize_fp8.default, (x.view(3, 3, 200), [128, 128]))
    qx, sx = dk.quantize_fp8(x, (1, 128))
    qw, sw = dk.quantize_fp8(torch.randn(20, 200), (128, 128))
    # test_schema is left out for fp8 inputs: its mutation check multiplies the
    # inputs, which torch does not implement for float8 on the CPU.
    torch.library.opcheck(torch.ops.deepseek_kernels.fp8_gemm.default, (qx, sx, qw, sw),
                          {"out_dtype": torch.float32},
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_bad_inputs(device):
    x = torch.randn(4, 256, device=device)
    qx, sx = dk.quantize_fp8(x, (1, 128))
    qw, sw = dk.quantize_fp8(torch.randn(8, 256, device=device), (128, 128))
    with pytest.raises(ValueError, match=r"'block' must be \(1, 128\) or \(128, 128\)"):
        dk.quantize_fp8(x, (1, 64))
    for bad in (None, 128):
        with pytest.raises(TypeError, match=r"'block' must be \(1, 128\) or \(128, 128\), got"):
            dk.quantize_fp8(x, bad)
    with pytest.raises(ValueError, match=r"'a_scales' must have shape \[4, 2\]"):
        dk.fp8_gemm(qx, sx[:, :1], qw, sw)
    with pytest.raises(ValueError, match=r"'w_scales' must have shape \[1, 2\]"):
        dk.fp8_gemm(qx, sx, qw, sx)
    with pytest.raises(ValueError, match=r"'w' must have shape \[N, K\] with K = 256"):
        dk.fp8_gemm(qx, sx, qw[:, :128], sw[:, :1])
    with pytest.raises(TypeError, match="argument 'a' must have dtype"):
        dk.fp8_gemm(x, sx, qw, sw)
    assert dk.fp8_gemm(qx[:0], sx[:0], qw, sw).shape == (0, 8)


def _fp8_grouped_problem(s, e, n, k, device, offsets_dtype=torch.int32):
    """x [S, K] in 1x128 blocks, each expert's [N, K] weight in 128x128 blocks."""
    x = _data((s, k), torch.float32, device, 3.0)
    w = _data((e, n, k), torch.float32, device, k ** -0.5)
    qx, sx = dk.quantize_fp8(x, (1, 128))
    qw, sw = dk.quantize_fp8(w, (128, 128))  # each expert's weight on its own
    offsets = _random_offsets(s, e, device, offsets_dtype)
    return qx, sx, qw, sw, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 8, 128), (37, 3, 136, 200), (300, 7, 130, 256), (1025, 16, 40, 384)],
                         ids=lambda s: "S{}xE{}xN{}xK{}".format(*s))
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_fp8_grouped_gemm_bitwise(device, shape, offsets_dtype, out_dtype):
    qx, sx, qw, sw, offsets = _fp8_grouped_problem(*shape, device, offsets_dtype)
    out = dk.fp8_grouped_gemm(qx, sx, qw, sw, offsets, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (shape[0], shape[2])
    assert torch.equal(out, ref.fp8_grouped_gemm(qx, sx, qw, sw, offsets, out_dtype=out_dtype))
    # Each group is exactly fp8_gemm of its rows (the contract in gemm_params.h).
    bounds = offsets.tolist()
    for g in range(shape[1]):
        lo, hi = bounds[g], bounds[g + 1]
        assert torch.equal(out[lo:hi], dk.fp8_gemm(qx[lo:hi], sx[lo:hi], qw[g], sw[g], out_dtype=out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_grouped_gemm_edge_cases(device):
    qx, sx, qw, sw, _ = _fp8_grouped_problem(70, 4, 24, 256, device)
    out = dk.fp8_grouped_gemm(qx[:0], sx[:0], qw, sw, torch.zeros(5, dtype=torch.int32, device=device))
    assert out.shape == (0, 24) and out.dtype == torch.bfloat16
    last = torch.tensor([0, 0, 0, 0, 70], device=device)  # every row in the last group
    out = dk.fp8_grouped_gemm(qx, sx, qw, sw, last, out_dtype=torch.float32)
    assert torch.equal(out, dk.fp8_gemm(qx, sx, qw[3], sw[3], out_dtype=torch.float32))
    # No experts at all, no rows.
    out = dk.fp8_grouped_gemm(qx[:0], sx[:0], qw[:0], sw[:0], torch.zeros(1, dtype=torch.int64, device=device))
    assert out.shape == (0, 24)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_grouped_gemm_bad_inputs(device):
    qx, sx, qw, sw, _ = _fp8_grouped_problem(10, 3, 8, 256, device)
    good = torch.tensor([0, 3, 6, 10], device=device)
    with pytest.raises(ValueError, match=r"'w' must have shape \[E, N, K\] with K = 256"):
        dk.fp8_grouped_gemm(qx, sx, qw[:, :, :128], sw[:, :, :1], good)
    with pytest.raises(ValueError, match=r"argument 'w' must be 3-D"):
        dk.fp8_grouped_gemm(qx, sx, qw[0], sw[0], good)
    with pytest.raises(ValueError, match=r"'w_scales' must have shape \[3, 1, 2\]"):
        dk.fp8_grouped_gemm(qx, sx, qw, sw[:, :, :1], good)
    with pytest.raises(ValueError, match=r"'a_scales' must have shape \[10, 2\]"):
        dk.fp8_grouped_gemm(qx, sx[:, :1], qw, sw, good)
    with pytest.raises(ValueError, match=r"'offsets' must have shape \[4\]"):
        dk.fp8_grouped_gemm(qx, sx, qw, sw, good[:3])
    with pytest.raises(TypeError, match="'offsets' must have dtype"):
        dk.fp8_grouped_gemm(qx, sx, qw, sw, good.float())
    with pytest.raises(TypeError, match="argument 'w' must have dtype"):
        dk.fp8_grouped_gemm(qx, sx, qw.float(), sw, good)
    with pytest.raises(TypeError, match="'out_dtype' must be one of Float, Half, BFloat16"):
        dk.fp8_grouped_gemm(qx, sx, qw, sw, good, out_dtype=torch.int32)
    if device == "cpu":  # values are checked where they live (no host sync on CUDA)
        with pytest.raises(ValueError, match="must be non-decreasing"):
            dk.fp8_grouped_gemm(qx, sx, qw, sw, torch.tensor([0, 6, 3, 10]))
        with pytest.raises(ValueError, match="must end at a.size\\(0\\) = 10"):
            dk.fp8_grouped_gemm(qx, sx, qw, sw, torch.tensor([0, 3, 6, 9]))


def test_fp8_grouped_gemm_opcheck_and_compile():
    qx, sx, qw, sw, offsets = _fp8_grouped_problem(20, 3, 16, 200, "cpu")
    # test_schema left out, as for fp8_gemm (float8 multiplication on the CPU).
    torch.library.opcheck(torch.ops.deepseek_kernels.fp8_grouped_gemm.default, (qx, sx, qw, sw, offsets),
                          {"out_dtype": torch.float32},
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    compiled = torch.compile(dk.fp8_grouped_gemm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(qx, sx, qw, sw, offsets), dk.fp8_grouped_gemm(qx, sx, qw, sw, offsets))


@requires_cuda
@pytest.mark.cuda
def test_fp8_grouped_gemm_cuda_matches_cpu_and_stays_in_bounds():
    for shape in [(1, 1, 8, 128), (300, 7, 130, 520), (2000, 32, 256, 1024)]:
        qx, sx, qw, sw, offsets = _fp8_grouped_problem(*shape, "cpu")
        out_cpu = dk.fp8_grouped_gemm(qx, sx, qw, sw, offsets)
        out_gpu = dk.fp8_grouped_gemm(qx.cuda(), sx.cuda(), qw.cuda(), sw.cuda(), offsets.cuda())
        assert torch.equal(out_gpu.cpu(), out_cpu)
    qx, sx, qw, sw, _ = _fp8_grouped_problem(100, 3, 8, 256, "cuda")
    for version in (1, 2, 3):
        with _fp8_kernel(version):
            for bad in ([0, 60, 30, 100], [-5, 3, 6, 1000], [0, 3, 6, 90]):
                dk.fp8_grouped_gemm(qx, sx, qw, sw, torch.tensor(bad, device="cuda"))
    torch.cuda.synchronize()  # no illegal address


def test_fp8_cuda_kernel_op():
    op = torch.ops.deepseek_kernels._fp8_cuda_kernel
    start = op(0)
    assert start == 1  # pinned by _exact_fp8_kernel (the library's default is 3)
    with _fp8_kernel(2):
        assert op(0) == 2
    with _fp8_kernel(3):
        assert op(0) == 3
    assert op(0) == start
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        op(4)


def _fp8_summation_bound(qx, sx, qw, sw, offsets=None):
    """What the tensor cores may differ from the exact kernel by: each 128-wide block
    sum is re-associated (and, on Hopper, aligned to fewer bits while it builds up), so
    per block |diff| <= 2^-10 * sum |products| (a generous multiple of the fp32 and
    Hopper's ~2^-13 alignment error over 4 mma steps), times the two block scales."""
    xs = qx.float().abs() * sx.repeat_interleave(128, 1)[:, :qx.shape[1]]
    if offsets is None:
        qw, sw, offsets = qw[None], sw[None], torch.tensor([0, qx.shape[0]])
    bounds = offsets.tolist()
    out = torch.zeros(qx.shape[0], qw.shape[1], dtype=torch.float64, device=qx.device)
    for g in range(qw.shape[0]):
        ws = qw[g].float().abs() * sw[g].repeat_interleave(128, 0)[:qw.shape[1]].repeat_interleave(
            128, 1)[:, :qw.shape[2]]
        out[bounds[g]:bounds[g + 1]] = xs[bounds[g]:bounds[g + 1]].double() @ ws.double().t()
    return 2 ** -10 * out


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("version", [2, 3], ids=["v2", "v3"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_fp8_tensor_core_kernel_matches_exact(version, out_dtype):
    """v2 (mma.sync) and v3 (wgmma; v2 without sm_90a) against v1 (exact, bitwise =
    CPU) on tails of their 128 x 128 tiles, K not a multiple of 128 (a short last
    block) or of 16 (falls back to v1), plain and grouped, every output dtype."""
    eps = torch.finfo(out_dtype).eps
    for m, n, k in [(1, 8, 128), (77, 300, 528), (256, 384, 1024), (1000, 136, 4096), (33, 40, 200)]:
        x = torch.randn(m, k, device="cuda") * 3
        w = torch.randn(n, k, device="cuda")
        qx, sx = dk.quantize_fp8(x, (1, 128))
        qw, sw = dk.quantize_fp8(w, (128, 128))
        exact = dk.fp8_gemm(qx, sx, qw, sw, out_dtype=torch.float32)
        with _fp8_kernel(version):
            tc = dk.fp8_gemm(qx, sx, qw, sw, out_dtype=out_dtype)
        if hopper_build():  # where both tensor-core kernels must run
            assert kernel_ran("fp8_gemm") == (version if k % 16 == 0 else 1), (m, n, k)
        bound = _fp8_summation_bound(qx, sx, qw, sw) + 2 * eps * exact.double().abs()
        diff = (tc.double() - exact.double()).abs()
        assert (diff <= bound).all(), ((m, n, k), (diff - bound).max().item())
        if k % 16:  # fell back to the exact kernel
            assert torch.equal(tc, dk.fp8_gemm(qx, sx, qw, sw, out_dtype=out_dtype))
    for shape in [(300, 7, 130, 512), (2000, 32, 256, 1024)]:
        qx, sx, qw, sw, offsets = _fp8_grouped_problem(*shape, "cuda")
        exact = dk.fp8_grouped_gemm(qx, sx, qw, sw, offsets, out_dtype=torch.float32)
        with _fp8_kernel(version):
            tc = dk.fp8_grouped_gemm(qx, sx, qw, sw, offsets, out_dtype=out_dtype)
        bound = _fp8_summation_bound(qx, sx, qw, sw, offsets.cpu()) + 2 * eps * exact.double().abs()
        assert ((tc.double() - exact.double()).abs() <= bound).all(), shape
    # Deterministic: the same bits twice.
    with _fp8_kernel(version):
        assert torch.equal(dk.fp8_gemm(qx, sx, qw[0], sw[0]), dk.fp8_gemm(qx, sx, qw[0], sw[0]))


# FP8 v3 without warp specialization: the baseline of the variant tests below.
_FP8_V3_PLAIN = "DSK_FP8_WARP_SPECIALIZED=0"


@requires_cuda
@pytest.mark.cuda
@pytest.mark.skipif(not hopper_build(), reason="FP8 v3 (wgmma) needs an H100/H200 and an sm_90a build")
@pytest.mark.parametrize("variant", [f"{_FP8_V3_PLAIN} DSK_FP8_TMA=1", f"{_FP8_V3_PLAIN} DSK_FP8_DEEP_PREFETCH=1",
                                     f"{_FP8_V3_PLAIN} DSK_FP8_CLUSTER=1", "DSK_FP8_FMA_PROMOTION=0",
                                     "DSK_FP8_FMA_PROMOTION=0 DSK_FP8_CLUSTER=1",
                                     "DSK_FP8_FMA_PROMOTION=0 DSK_WS_WARP_ARRIVALS=1",
                                     "DSK_FP8_FMA_PROMOTION=0 DSK_FP8_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1"],
                         ids=["tma", "deep_prefetch", "cluster", "warp_specialized", "warp_specialized_cluster",
                              "warp_specialized_warp_arrivals", "warp_specialized_cluster_warp_arrivals"])
def test_cuda_fp8_v3_variants_same_bits(tmp_path, variant):
    """FP8 v3 without warp specialization (DSK_FP8_WARP_SPECIALIZED=0: cp.async
    copies) and its variants with the contract's promotion, each read once per
    process (a subprocess): TMA copies, TMA with every stage ahead, clusters of
    two CTAs multicasting W (plain GEMMs; an odd count of m tiles leaves a CTA
    past M), warp-specialized and persistent (DSK_FP8_FMA_PROMOTION=0; the last
    plain and grouped shapes have more tiles than an H100 has SMs), also in
    clusters (plain GEMMs; the last has more pairs of m tiles than an H100 holds
    clusters, and an odd count of m tiles). Same operands, same wgmma and
    promotion order: the same bits, on M, N and K tails and grouped tiles."""
    cases = []
    for m, n, k in [(1, 8, 128), (77, 300, 528), (300, 384, 1024), (1000, 136, 4096), (2100, 1100, 512)]:
        qx, sx = dk.quantize_fp8(torch.randn(m, k, device="cuda") * 3, (1, 128))
        qw, sw = dk.quantize_fp8(torch.randn(n, k, device="cuda"), (128, 128))
        cases.append(("fp8_gemm", (qx, sx, qw, sw), {}))
    cases.append(("fp8_grouped_gemm", _fp8_grouped_problem(2000, 32, 256, 1024, "cuda"), {}))
    cases.append(("fp8_grouped_gemm", _fp8_grouped_problem(6000, 16, 384, 512, "cuda"), {}))

    def variant_bits(op):
        cluster = "CLUSTER" in variant
        bits = _V3_TMA | (_V3_CLUSTER if cluster and op == "fp8_gemm" else 0)  # plain GEMMs only
        if _FP8_V3_PLAIN not in variant:  # warp-specialized: it takes precedence over the deep variant
            return bits | _V3_WARP_SPECIALIZED | (_V3_WARP_ARRIVALS if "WARP_ARRIVALS" in variant else 0)
        return bits | (_V3_DEEP if cluster or "DEEP_PREFETCH" in variant else 0)  # cluster implies deep

    _assert_v3_variant_same_bits(tmp_path, cases, "_fp8_cuda_kernel", "fp8_gemm", variant, 0, variant_bits,
                                 baseline=_FP8_V3_PLAIN)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.skipif(not hopper_build(), reason="FP8 v3 (wgmma) needs an H100/H200 and an sm_90a build")
@pytest.mark.parametrize("variant", ["", "DSK_FP8_CLUSTER=1", "DSK_FP8_CLUSTER=1 DSK_WS_WARP_ARRIVALS=1"],
                         ids=["fma", "fma_cluster", "fma_cluster_warp_arrivals"])
def test_cuda_fp8_v3_fma_promotion_close_to_v3(tmp_path, variant):
    """FP8 v3's default, the warp-specialized kernel promoting with one FMA (alone,
    in this process, and in clusters: DSK_FP8_CLUSTER=1, read once per process: a
    subprocess), against v3's contract promotion (DSK_FP8_WARP_SPECIALIZED=0, a
    subprocess), on the same block sums: each block's step differs by at most two
    roundings of fp32 (eps32 relative to |part * a_scale * w_scale| + |acc|, summed
    over the k blocks: 4 eps32 * k_blocks * S with S = |x| @ |w|^T of the dequantized
    operands bounds both), then one bf16 rounding each. That the fused promotion
    ran is read from the variant bits."""
    _skip_if_variant_env("fp8_gemm")
    cases, bounds = [], []
    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    for m, n, k in [(77, 300, 528), (2100, 1100, 512)]:
        qx, sx = dk.quantize_fp8(torch.randn(m, k, device="cuda") * 3, (1, 128))
        qw, sw = dk.quantize_fp8(torch.randn(n, k, device="cuda"), (128, 128))
        cases.append(("fp8_gemm", (qx, sx, qw, sw), {}))
        kb = sx.shape[1]
        xd = qx.float() * sx.repeat_interleave(128, 1)[:, :k]
        wd = qw.float() * sw.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        bounds.append(4 * eps32 * kb * (xd.abs() @ wd.abs().t()))
    ours, ran = _run_v3_variant(tmp_path, cases, "_fp8_cuda_kernel", "fp8_gemm", _FP8_V3_PLAIN)
    assert ran == [0] * len(cases), ran  # cp.async copies, the contract's promotion
    cluster = _V3_CLUSTER if "CLUSTER" in variant else 0
    if variant:
        theirs, ran = _run_v3_variant(tmp_path, cases, "_fp8_cuda_kernel", "fp8_gemm", variant)
    else:  # the default, here
        with kernel_choice("_fp8_cuda_kernel", 3):
            theirs, ran = [], []
            for _, args, kwargs in cases:
                theirs.append(dk.fp8_gemm(*args, **kwargs))
                ran.append(kernel_ran("fp8_gemm_v3_variant"))
    for i, (a, b, bound) in enumerate(zip(ours, theirs, bounds)):
        arrivals = _V3_WARP_ARRIVALS if "WARP_ARRIVALS" in variant else 0
        assert ran[i] == _V3_TMA | _V3_WARP_SPECIALIZED | _V3_FMA_PROMOTION | cluster | arrivals, ran[i]
        a, b = a.double(), b.double()
        tol = bound.double() + eps16 * (a.abs() + b.abs())
        assert ((a - b).abs() <= tol).all(), (i, ((a - b).abs() - tol).max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear(device):
    base = torch.nn.Linear(256, 136, device=device)
    lin = FP8Linear.from_linear(base)
    x = torch.randn(2, 9, 256, device=device, requires_grad=True)
    y = lin(x)
    want = base(x)
    assert y.shape == want.shape
    rel = ((y - want).norm() / want.norm()).item()
    assert rel < 0.05, rel
    y.square().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None and x.grad is not None
    # Straight-through: the bf16 gradient of the unquantized map at the FP8 output.
    dy = 2 * y.detach().reshape(-1, 136)
    torch.testing.assert_close(lin.bias.grad, dy.sum(0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_fp8_linear_gradients_through_the_activation(activation):
    """Straight-through with an activation: dz = dy * act'(z) at the FP8 pre-activation z
    (the same layer without its activation, fp32 in and out), then db = sum dz exactly
    (fp32) and dx = dz W, dW = dz^T x in bf16 (relative error ~ 2^-8 per operand)."""
    torch.manual_seed(5)
    lin = FP8Linear(160, 40, bias=True, activation=activation)
    x = torch.randn(7, 160, requires_grad=True)
    dy = torch.randn(7, 40)
    lin(x).backward(dy)
    with torch.no_grad():
        z = FP8Linear.from_linear(lin, activation="none")(x).double().requires_grad_()
    act = {"gelu": F.gelu, "silu": F.silu}[activation]
    (dz,) = torch.autograd.grad(act(z), z, dy.double())
    torch.testing.assert_close(lin.bias.grad.double(), dz.sum(0), rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, dz @ lin.weight.detach().double()), (lin.weight.grad, dz.t() @ x.detach().double())):
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < 3 * 2.0**-8, rel


@requires_cuda
@pytest.mark.cuda
def test_fp8_cuda_matches_cpu():
    for m, n, k in [(1, 8, 128), (77, 300, 520), (256, 384, 1024)]:
        x = torch.randn(m, k, dtype=torch.bfloat16) * 3
        w = torch.randn(n, k, dtype=torch.bfloat16)
        q_cpu = [dk.quantize_fp8(x, (1, 128)), dk.quantize_fp8(w, (128, 128))]
        q_gpu = [dk.quantize_fp8(x.cuda(), (1, 128)), dk.quantize_fp8(w.cuda(), (128, 128))]
        for (qc, sc), (qg, sg) in zip(q_cpu, q_gpu):
            assert _same(qc, qg.cpu()) and _same(sc, sg.cpu())
        (qx, sx), (qw, sw) = q_cpu
        out_cpu = dk.fp8_gemm(qx, sx, qw, sw)
        out_gpu = dk.fp8_gemm(qx.cuda(), sx.cuda(), qw.cuda(), sw.cuda())
        assert torch.equal(out_gpu.cpu(), out_cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_reference_switch_and_int8_linear(device):
    """use_kernels=False runs the same parameters through reference.py (bitwise for the
    INT8/FP8 modules); Int8Linear.from_linear and FP8Linear(activation=...) track the
    float layer they come from."""
    from deepseek_kernels.nn import Int8Linear

    lin = Linear(256, 40, activation="gelu", device=device)
    x = torch.randn(3, 5, 256, device=device)
    y = lin(x)
    lin.use_kernels = False
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
    lin.use_kernels = True

    q = Int8Linear.from_linear(lin)
    assert q.activation == "gelu" and q.weight_q.dtype == torch.int8
    yq = q(x)
    q.use_kernels = False
    assert torch.equal(q(x), yq)
    assert ((yq - y).norm() / y.norm()).item() < 0.02  # 7-bit codes

    f8 = FP8Linear.from_linear(lin)
    assert f8.activation == "gelu"
    y8 = f8(x)
    f8.use_kernels = False
    assert torch.equal(f8(x), y8)
    assert ((y8 - y).norm() / y.norm()).item() < 0.05
    x.requires_grad_()
    f8.use_kernels = True
    f8(x).sum().backward()
    assert x.grad is not None and torch.isfinite(f8.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_inside_autocast_keeps_its_compute_dtype(device):
    """Called under torch.autocast, the op's own inner matmuls must not be autocast:
    the result equals the same call outside autocast, bitwise (a segfault once)."""
    a = torch.randn(256, 16, 32, device=device, dtype=torch.bfloat16)
    w = torch.randn(48, 32, device=device, dtype=torch.bfloat16)
    b = torch.randn(48, device=device, dtype=torch.bfloat16)
    x = torch.randn(100, 32, device=device, dtype=torch.bfloat16)
    ws = torch.randn(3, 48, 32, device=device, dtype=torch.bfloat16)
    offs = torch.tensor([0, 10, 10, 100], device=device, dtype=torch.int32)
    expect = [dk.gemm(a, w), dk.gemm(a, w, b, activation="gelu"), dk.grouped_gemm(x, ws, offs)]
    with torch.autocast(device, dtype=torch.bfloat16):
        got = [dk.gemm(a, w), dk.gemm(a, w, b, activation="gelu"), dk.grouped_gemm(x, ws, offs)]
    for e, g in zip(expect, got):
        assert g.dtype == e.dtype and torch.equal(g, e)
