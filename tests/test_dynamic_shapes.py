"""torch.compile with dynamic shapes and torch.export, for every op and module.

A model compiled once and then fed another batch or sequence length is traced
with symbolic sizes (``dynamic=True``, or automatically after the first
recompile), so every fake must work on SymInts and every Python-side check on
SymInts/SymFloats. Each case here compiles once, runs two sizes, and checks:
one graph (no recompile for the second size) and the eager result's exact bits
(the compiled graph calls the same kernels). ``aot_eager``: Dynamo, the fakes
and the autograd tracing, without Inductor's C++ compile (minutes on 2 cores).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import deepseek_kernels as dk
import deepseek_kernels.nn as dnn
from tests.conftest import DEVICES


def _compile_dynamic(fn):
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=True), counter


def _assert_same(got, want, what):
    if isinstance(got, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        assert torch.equal(got, want) or torch.equal(got.isnan(), want.isnan()) and torch.equal(
            got.nan_to_num(), want.nan_to_num()), what
        return
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same(g, w, f"{what}[{i}]")


def _check_one_graph(fn, sizes, check):
    """Compile fn with dynamic shapes, then check(compiled, size) for each size: every
    size after the first must run on the first one's graph (no recompile)."""
    compiled, counter = _compile_dynamic(fn)
    graphs = None
    for n in sizes:
        check(compiled, n)
        graphs = graphs or counter.frame_count
    assert counter.frame_count == graphs, f"recompiled for sizes {sizes}"


def _check_two_sizes(fn, make_inputs, sizes=(37, 53)):
    """Compiled fn == eager fn, bitwise, on inputs of each size, from one graph."""
    def check(compiled, n):
        args = make_inputs(n)
        _assert_same(compiled(*args), fn(*args), f"size {n}")

    _check_one_graph(fn, sizes, check)


def _routing(n, device, e=16, k=3, capacity=None):
    logits = torch.randn(n, e, device=device)
    return dk.moe_topk_gating(logits, k, capacity=capacity)


# ---------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [None, 5])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating(device, capacity, scoring):
    def fn(logits, bias):
        return tuple(dk.moe_topk_gating(logits, 4, scoring=scoring, correction_bias=bias, n_group=4,
                                        topk_group=2, capacity=capacity, drop_policy="probability"))

    _check_two_sizes(fn, lambda n: (torch.randn(n, 16, device=device), torch.randn(16, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_combine(device):
    e, cap, h = 16, 7, 24

    def fn(x, ids, slots, weights):
        d = dk.moe_dispatch(x, ids, slots, e, cap)
        return d, dk.moe_combine(d * 2 + 1, ids, slots, weights)

    def inputs(n):
        g = _routing(n, device, capacity=cap)
        return torch.randn(n, h, device=device), g.expert_ids, g.slots, g.weights

    _check_two_sizes(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static_rows", [False, True])
def test_permute_unpermute(device, static_rows):
    def fn(x, ids, slots, counts, weights):
        num_rows = x.shape[0] * ids.shape[1] if static_rows else None
        packed, offsets = dk.moe_permute(x, ids, slots, counts, num_rows=num_rows)
        return packed, offsets, dk.moe_unpermute(packed * 2 + 1, ids, slots, offsets, weights)

    def inputs(n):
        g = _routing(n, device)
        return torch.randn(n, 24, device=device), g.expert_ids, g.slots, g.expert_counts, g.weights

    _check_two_sizes(fn, inputs)


def test_permute_static_rows_overflow_raises_when_compiled():
    """Compiled on the CPU, num_rows below the routed count still raises (from the
    kernel, which sees the counts; the graph cannot compare a data-dependent size)."""
    g = _routing(37, "cpu")
    x = torch.randn(37, 24)
    compiled, _ = _compile_dynamic(lambda x, i, s, c: dk.moe_permute(x, i, s, c, num_rows=3))
    with pytest.raises(ValueError, match=r"'num_rows'=3 is smaller than sum\(expert_counts\)"):
        compiled(x, g.expert_ids, g.slots, g.expert_counts)


def test_bad_arguments_are_named_when_compiled():
    """Tracing runs the fakes first: a bad size or rank gets the kernels' named
    error there, not "Trying to create tensor with negative dimension -1" or
    "tuple index out of range"."""
    g = _routing(8, "cpu")
    x = torch.randn(8, 24)
    cases = [
        (lambda x, i, s: dk.moe_dispatch(x, i, s, 8, -1), (x, g.expert_ids, g.slots),
         "moe_dispatch: argument 'capacity' must be non-negative, got -1"),
        (lambda x, i, s: dk.moe_dispatch(x.flatten(), i, s, 8, 4), (x, g.expert_ids, g.slots),
         "moe_dispatch: argument 'x' must be 2-D, got shape"),
        (lambda x: dk.moe_topk_gating(x, -1), (x,), "moe_topk_gating: argument 'k' must be positive"),
        (lambda x: dk.quantize_int8(x, 0), (x,), "quantize_int8: argument 'block_size' must be positive"),
        (lambda q, s: dk.dequantize_int4(q, s, -1), (torch.zeros(4, dtype=torch.uint8), torch.ones(1)),
         "dequantize_int4: argument 'numel' must be non-negative"),
        (lambda q, k, v: dk.cross_attention(q[0], k, v), (torch.randn(1, 2, 1, 8),) * 3,
         "cross_attention: argument 'q' must be 4-D, got shape"),
    ]
    for fn, args, message in cases:
        compiled, _ = _compile_dynamic(fn)
        with pytest.raises(Exception, match=message):
            compiled(*args)
    # Static sizes (torch.compile's first trace): past int32 / kMaxK / the offsets,
    # not "Storage size calculation overflowed".
    static = [
        (lambda x, i, s: dk.moe_dispatch(x, i, s, 8, 2**62), (x, g.expert_ids, g.slots),
         r"moe_dispatch: argument 'capacity' must be at most 2147483647 \(slots are int32\)"),
        (lambda x: dk.moe_topk_gating(x, 2**62), (x,), "moe_topk_gating: argument 'k' must be at most 16"),
        (lambda d, x, o: torch.ops.deepseek_kernels.grouped_gemm_wgrad(d, x, o, 2**62),
         (torch.randn(4, 3), torch.randn(4, 5), torch.tensor([0, 4])),
         "grouped_gemm_wgrad: argument 'offsets' must have shape"),
    ]
    for fn, args, message in static:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_and_grouped_gemm(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = torch.randn(40, 24, device=device, dtype=dtype)
    b = torch.randn(40, device=device, dtype=dtype)
    w2 = torch.randn(3, 16, 40, device=device, dtype=dtype)

    def fn(x, offsets):
        h = dk.gemm(x, w, b, activation="gelu")
        return h, dk.grouped_gemm(h, w2, offsets)

    def inputs(n):
        offsets = torch.tensor([0, n // 3, n // 3, n], dtype=torch.int32, device=device)
        return torch.randn(n, 24, device=device, dtype=dtype), offsets

    _check_two_sizes(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", ["plain", "mask", "causal"])
def test_cross_attention(device, option):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def fn(q, k, v, mask):
        return dk.cross_attention(q, k, v, key_padding_mask=mask, causal=option == "causal",
                                  return_lse=True)

    def inputs(n):
        q = torch.randn(2, n, 4, 32, device=device, dtype=dtype)
        k, v = (torch.randn(2, n + 13, 2, 32, device=device, dtype=dtype) for _ in range(2))
        mask = torch.rand(2, n + 13, device=device) < 0.3 if option == "mask" else None
        return q, k, v, mask

    _check_two_sizes(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_varlen(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def fn(q, k, v, cu_q, cu_k):
        return dk.cross_attention_varlen(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], return_lse=True)

    def inputs(n):
        lq, lk = [0, 1, n - 1], [3, 0, 2 * n]
        cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32,
                                     device=device)
        q = torch.randn(sum(lq), 4, 32, device=device, dtype=dtype)
        k, v = (torch.randn(sum(lk), 1, 32, device=device, dtype=dtype) for _ in range(2))
        return q, k, v, cu(lq), cu(lk)

    _check_two_sizes(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_quantization(device):
    def fn(x, x2):
        q8 = dk.quantize_int8(x, 64)
        q4 = dk.quantize_int4(x, 64)
        s8 = dk.quantize_int8(x2.reshape(-1), 64)
        return (*q8, *q4, dk.dequantize_int8(q8.q, q8.scales, 64, out_dtype=torch.bfloat16),
                dk.dequantize_int4(q4.q, q4.scales, x.shape[0], 64),
                dk.dequantize_sum_int8(s8.q.reshape(2, -1), s8.scales.reshape(2, -1), 64))

    _check_two_sizes(fn, lambda n: (torch.randn(n * 31, device=device),
                                    torch.randn(2, n * 64, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_int8_gemm(device):
    wq, ws = dk.quantize_int8_rowwise(torch.randn(40, 24, device=device))

    def fn(a):
        aq, as_ = dk.quantize_int8_rowwise(a)
        return aq, as_, dk.int8_gemm(aq, as_, wq, ws)

    _check_two_sizes(fn, lambda n: (torch.randn(n, 24, device=device),))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemms(device):
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    wq, ws = dk.quantize_fp8(torch.randn(136, 256, device=device), block=(128, 128))
    wg = torch.randn(2, 136, 256, device=device)
    wgq, wgs = zip(*(dk.quantize_fp8(w, block=(128, 128)) for w in wg))
    wgq, wgs = torch.stack(wgq), torch.stack(wgs)

    def fn(a, offsets):
        aq, as_ = dk.quantize_fp8(a)
        return (aq.view(torch.uint8), as_, dk.fp8_gemm(aq, as_, wq, ws),
                dk.fp8_grouped_gemm(aq, as_, wgq, wgs, offsets))

    def inputs(n):
        return (torch.randn(n, 256, device=device),
                torch.tensor([0, n // 2, n], dtype=torch.int32, device=device))

    _check_two_sizes(fn, inputs)


# ---------------------------------------------------------------------------
# Gradients through a dynamic graph
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_backward(device):
    """The registered backward formulas traced with symbolic sizes: the gradients
    match eager's (bitwise for our kernels' outputs; the Python formulas around
    them run the same torch ops in the same order under aot_eager)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    e, cap = 8, 6
    w = torch.randn(32, 24, device=device, dtype=dtype, requires_grad=True)

    def fn(x, logits, q, kv):
        g = dk.moe_topk_gating(logits, 2, capacity=cap)
        h = dk.gemm(x, w, activation="silu")
        d = dk.moe_dispatch(h, g.expert_ids, g.slots, e, cap)
        y = dk.moe_combine(d, g.expert_ids, g.slots, g.weights.to(dtype))
        a = dk.cross_attention(q, kv, kv)
        return y.float().sum() + g.mean_scores.sum() + a.float().sum()

    def check(compiled, n):
        leaves = (torch.randn(n, 24, device=device, dtype=dtype, requires_grad=True),
                  torch.randn(n, e, device=device, requires_grad=True),
                  torch.randn(1, n, 2, 32, device=device, dtype=dtype, requires_grad=True),
                  torch.randn(1, n + 5, 2, 32, device=device, dtype=dtype, requires_grad=True))
        grads = [torch.autograd.grad(f(*leaves), (*leaves, w)) for f in (compiled, fn)]
        _assert_same(grads[0], grads[1], f"gradients, size {n}")

    _check_one_graph(fn, (37, 53), check)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


def _module_two_sizes(module, make_input, train):
    module.train(train)

    def check(compiled, shape):
        x = make_input(*shape)
        if train:  # the jitter noise: the same draws for both
            state = torch.random.get_rng_state()
            got = compiled(x)
            torch.random.set_rng_state(state)
        else:
            got = compiled(x)
        _assert_same(got, module(x), f"input {tuple(x.shape)}")

    _check_one_graph(module, ((2, 19), (3, 23)), check)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("train", [False, True])
def test_moe_layer(capacity_factor, train):
    torch.manual_seed(0)
    layer = dnn.MoELayer(32, 48, 8, 2, num_shared_experts=1, capacity_factor=capacity_factor,
                         n_group=4, topk_group=2, aux_loss_alpha=0.01, z_loss_coef=1e-3,
                         jitter_eps=0.01 if train else 0.0)
    _module_two_sizes(layer, lambda b, s: torch.randn(b, s, 32), train)


def test_moe_layer_bias_update():
    """The aux-loss-free bias update (in place, under no_grad) inside a dynamic graph
    moves the bias as eager does."""
    layers = [dnn.MoELayer(32, 48, 8, 2, bias_update_rate=0.01) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    def check(compiled, n):
        x = torch.randn(2, n, 32)
        _assert_same(compiled(x), layers[1](x), f"output, {n} tokens")
        _assert_same(layers[0].correction_bias, layers[1].correction_bias, f"bias, {n} tokens")

    _check_one_graph(layers[0], (19, 23), check)
    assert layers[0].correction_bias.abs().sum() > 0


@pytest.mark.parametrize("name", ["Linear", "FP8Linear", "Int8Linear", "CrossAttention"])
def test_layers(name):
    if name == "CrossAttention":
        layer = dnn.CrossAttention(64, 4, 2)
        _module_two_sizes(layer, lambda b, s: torch.randn(b, s, 64), False)
        return
    lin = dnn.Linear(256, 136, activation="gelu")
    if name == "FP8Linear":
        lin = dnn.FP8Linear(256, 136, activation="gelu")
        torch.nn.init.normal_(lin.weight)
    elif name == "Int8Linear":
        lin = dnn.Int8Linear.from_linear(lin)
    _module_two_sizes(lin, lambda b, s: torch.randn(b, s, 256), False)


# ---------------------------------------------------------------------------
# torch.export with symbolic batch and sequence sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Linear", "CrossAttention", "MoELayer-capacity", "MoELayer-dropless"])
def test_export(name):
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("seq", min=2, max=4096)
    if name == "Linear":
        module = dnn.Linear(32, 40, activation="silu")
    elif name == "CrossAttention":
        module = dnn.CrossAttention(32, 4, 2)
    else:
        module = dnn.MoELayer(32, 48, 8, 2, capacity_factor=1.25 if name == "MoELayer-capacity" else None)
    module.eval()
    exported = torch.export.export(module, (torch.randn(2, 19, 32),),
                                   dynamic_shapes={"x": {0: batch, 1: seq}})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("deepseek_kernels" in t for t in targets), targets
    x = torch.randn(3, 23, 32)
    _assert_same(exported.module()(x), module(x), "exported module, a new size")


def test_aot_inductor_package(tmp_path):
    """An exported MoELayer (symbolic sizes) through AOTInductor: the packaged
    model calls our ops (the library loaded) and matches eager at a new size."""
    torch.manual_seed(0)
    layer = dnn.MoELayer(32, 48, 8, 2, capacity_factor=1.25).eval()
    batch, seq = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("seq", min=2, max=4096)
    exported = torch.export.export(layer, (torch.randn(2, 19, 32),),
                                   dynamic_shapes={"x": {0: batch, 1: seq}})
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "moe.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    x = torch.randn(3, 23, 32)
    with torch.no_grad():
        # Inductor may fuse the torch ops between ours (the SwiGLU, the router matmul)
        torch.testing.assert_close(runner(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_moe_layer_has_no_graph_break_without_fullgraph(capacity_factor):
    """Plain torch.compile (fullgraph=False, which treats a data-dependent output
    size as a graph break, and here fell back to eager for the whole forward): the
    dropless layer permutes into a static T * k rows, so one graph, no break."""
    layer = dnn.MoELayer(32, 48, 8, 2, num_shared_experts=1, capacity_factor=capacity_factor)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 19, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
