"""Our Autograd kernel (``ops._register_autograd``) against torch.library's.

Every differentiable op's Autograd kernel is ours: torch.library.register_autograd's
rebuilds the schema's defaults on every call (15-45 us of host time). It keeps
register_autograd's contract, so the same ``setup_context`` and ``backward`` run
through torch's own kernel (built here with ``make_autograd_impl``, not registered)
must give the same bits: outputs and gradients, through the ``deepseek_kernels``
wrappers (every argument passed) and ``torch.ops`` (defaults left out, which the
dispatcher also cuts off), under autocast, and when only some inputs need a
gradient.
"""

import pytest
import torch

from deepseek_kernels import ops
from tests.conftest import DEVICES

_K = torch.ops.deepseek_kernels


class _Door:
    """``_D.<op>(...)``: torch.ops (``door = "ops"``) or torch.library's own Autograd
    kernel for the same formulas (``door = "library"``), called as the dispatcher
    would call it (after the Autocast key's casts)."""

    door = "ops"

    def __getattr__(self, name):
        if self.door == "ops":
            return getattr(_K, name)
        return ops._torch_library_autograd(name)


_D = _Door()


def _leaves(*ts, grad=None):
    grad = grad if grad is not None else [True] * len(ts)
    return [t.detach().clone().requires_grad_(g) if t.is_floating_point() else t for t, g in zip(ts, grad)]


def _run(fn, inputs, seed=0):
    """fn(*inputs) -> (outputs, grads of the float leaves) for a fixed random
    weighting of the float outputs."""
    out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, grads


def _assert_same(a, b):
    (oa, ga), (ob, gb) = a, b
    assert len(oa) == len(ob) and len(ga) == len(gb)
    for x, y in zip((*oa, *ga), (*ob, *gb)):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y), (x - y).abs().max()


def _grad_fn_name(fn, inputs):
    out = fn(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return type(out.grad_fn).__name__


def _both(wrapper, direct, inputs):
    """wrapper (deepseek_kernels.ops) and direct (_D: torch.ops, then torch.library's
    kernel) on fresh copies of the inputs: the same bits."""
    want = _run(wrapper, _leaves(*inputs))
    assert _grad_fn_name(wrapper, _leaves(*inputs)).startswith("DskAutograd_"), "not our kernel"
    for door, grad_fn in (("ops", "DskAutograd_"), ("library", "GeneratedBackwardFor")):
        _Door.door = door
        try:
            assert _grad_fn_name(direct, _leaves(*inputs)).startswith(grad_fn), door
            _assert_same(want, _run(direct, _leaves(*inputs)))
        finally:
            _Door.door = "ops"


def _routing(T, E, k, capacity, seed, device):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(device)
    return ops.moe_topk_gating(logits, k, capacity=capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("capacity", [None, 3])
def test_gating(scoring, capacity, device):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 16, generator=g).to(device)
    bias = torch.randn(16, generator=g).to(device)
    kw = dict(scoring=scoring, n_group=4, topk_group=2, routed_scaling_factor=2.5, capacity=capacity)
    _both(lambda x: ops.moe_topk_gating(x, 3, correction_bias=bias, **kw),
          lambda x: _D.moe_topk_gating(x, 3, bias, **kw), [logits])
    # defaults only
    _both(lambda x: ops.moe_topk_gating(x, 2), lambda x: _D.moe_topk_gating(x, 2), [logits])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_dispatch_combine_permute_unpermute(weighted, device):
    T, E, k, H = 37, 8, 2, 24
    r = _routing(T, E, k, 6, seed=2, device=device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).to(device)
    w = r.weights.clone()
    ids, slots = r.expert_ids, r.slots
    if weighted:
        _both(lambda x, w: ops.moe_dispatch(x, ids, slots, E, 6, w),
              lambda x, w: _D.moe_dispatch(x, ids, slots, E, 6, w), [x, w])
    else:
        _both(lambda x: ops.moe_dispatch(x, ids, slots, E, 6), lambda x: _D.moe_dispatch(x, ids, slots, E, 6),
              [x])
    eo = torch.randn(E, 6, H, generator=g).to(device)
    _both(lambda eo, w: ops.moe_combine(eo, ids, slots, w if weighted else None),
          lambda eo, w: _D.moe_combine(eo, ids, slots, w if weighted else None), [eo, w])

    d = _routing(T, E, k, None, seed=4, device=device)
    ids, slots, counts = d.expert_ids, d.slots, d.expert_counts
    _both(lambda x, w: ops.moe_permute(x, ids, slots, counts, w if weighted else None),
          lambda x, w: _D.moe_permute(x, ids, slots, counts, w if weighted else None), [x, d.weights])
    packed, offsets = ops.moe_permute(x, ids, slots, counts)
    _both(lambda p, w: ops.moe_unpermute(p, ids, slots, offsets, w if weighted else None),
          lambda p, w: _D.moe_unpermute(p, ids, slots, offsets, w if weighted else None), [packed, d.weights])


def _attention_inputs(dtype, device, seed=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 37, 4, 32, generator=g).to(device, dtype)
    kv = [torch.randn(2, 65, 2, 32, generator=g).to(device, dtype) for _ in range(2)]
    mask = (torch.rand(2, 65, generator=g) < 0.3).to(device)
    return q, kv[0], kv[1], mask


def _float_dtype(device, autocast):
    """fp32 inputs (cast by autocast where it is on); the CUDA kernels take bf16 only
    for attention, so without autocast CUDA gets bf16."""
    return torch.bfloat16 if device == "cuda" and not autocast else torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
def test_attention(autocast, device):
    q, k, v, mask = _attention_inputs(_float_dtype(device, autocast), device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        _both(lambda q, k, v: ops.cross_attention(q, k, v, key_padding_mask=mask, causal=True, return_lse=True),
              lambda q, k, v: _D.cross_attention(q, k, v, None, mask, True), [q, k, v])
        _both(lambda q, k, v: ops.cross_attention(q, k, v), lambda q, k, v: _D.cross_attention(q, k, v)[0],
              [q, k, v])
        cu_q = torch.tensor([0, 0, 1, 38], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 5, 5, 70], dtype=torch.int32, device=device)
        qv, kv_, vv = q.reshape(-1, 4, 32)[:38], k.reshape(-1, 2, 32)[:70], v.reshape(-1, 2, 32)[:70]
        _both(lambda q, k, v: ops.cross_attention_varlen(q, k, v, cu_q, cu_k, 37, 65, softmax_scale=0.3,
                                                          return_lse=True),
              lambda q, k, v: _D.cross_attention_varlen(q, k, v, cu_q, cu_k, 37, 65, 0.3), [qv, kv_, vv])
    if autocast:  # the casts are recorded: fp32 leaves get fp32 gradients
        leaves = _leaves(q, k, v)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = ops.cross_attention(*leaves)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("activation", ["none", "gelu", "silu"])
@pytest.mark.parametrize("device", DEVICES)
def test_gemm(activation, autocast, device):
    g = torch.Generator().manual_seed(6)
    dt = _float_dtype(device, autocast)
    a, w, b = (torch.randn(*shape, generator=g).to(device, dt) for shape in ((17, 40), (24, 40), (24,)))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        _both(lambda a, w, b: ops.gemm(a, w, b, activation=activation),
              lambda a, w, b: _D.gemm(a, w, b, activation=activation), [a, w, b])
        _both(lambda a, w: ops.gemm(a, w), lambda a, w: _D.gemm(a, w), [a, w])
        x = torch.randn(37, 40, generator=g).to(device, dt)
        ws = torch.randn(3, 24, 40, generator=g).to(device, dt)
        offsets = torch.tensor([0, 10, 10, 37], dtype=torch.int32, device=device)
        _both(lambda x, ws: ops.grouped_gemm(x, ws, offsets), lambda x, ws: _D.grouped_gemm(x, ws, offsets),
              [x, ws])


def test_only_some_inputs_need_a_gradient():
    """The backward reads ctx.needs_input_grad to skip gradients: our kernel and
    torch.library's give the same ones for a weight-only, a bias-only and an
    input+bias gradient."""
    g = torch.Generator().manual_seed(7)
    a, w, b = torch.randn(9, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    for grad in ([False, True, False], [False, False, True], [True, False, True]):
        ours = _run(lambda a, w, b: ops.gemm(a, w, b, activation="gelu"), _leaves(a, w, b, grad=grad))
        assert len(ours[1]) == sum(grad)
        _Door.door = "library"
        try:
            _assert_same(ours, _run(lambda a, w, b: _D.gemm(a, w, b, activation="gelu"),
                                    _leaves(a, w, b, grad=grad)))
        finally:
            _Door.door = "ops"


def test_no_gradient_needed_builds_no_graph():
    a, w = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        assert ops.gemm(a, w).grad_fn is None
    assert ops.gemm(a, w.detach()).grad_fn is None


def test_torch_func_transforms():
    """torch.func.grad / vjp / jacrev run through our ops (torch.library's generated
    Function has no separate setup_context, which they need) and agree
    with autograd bit for bit."""
    g = torch.Generator().manual_seed(8)
    a, w = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g,
                                                                                dtype=torch.float64)
    logits = torch.randn(6, 8, generator=g, dtype=torch.float64)
    cases = [
        (lambda a: ops.gemm(a, w, activation="gelu").sum(), a),
        (lambda x: ops.moe_topk_gating(x, 2, scoring="sigmoid").weights.pow(2).sum(), logits),
        (lambda q: ops.cross_attention(q.view(1, 5, 1, 16), q.view(1, 5, 1, 16), q.view(1, 5, 1, 16)).sum(), a),
    ]
    for f, x in cases:
        leaf = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(f(leaf), leaf)
        assert torch.equal(torch.func.grad(f)(x), want)
        out, vjp = torch.func.vjp(f, x)
        assert torch.equal(vjp(torch.ones_like(out))[0], want)
    jac = torch.func.jacrev(lambda a: ops.gemm(a, w))(a)
    assert jac.shape == (5, 8, 5, 16)
    torch.testing.assert_close(jac[2, :, 2, :], w, rtol=0, atol=0)
    assert not jac[2, :, 3, :].any()


def test_double_backward_is_exact_or_a_clear_error():
    """create_graph=True: gemm and gating have exact second derivatives (gradcheck of
    the gradient, fp64); the ops whose backward is a kernel of its own (attention,
    grouped_gemm's weight gradient, the routing weights of dispatch/combine) raise
    when a second backward reaches that kernel, instead of torch's warning and wrong
    second derivatives."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)

    def grad_of(f):
        return lambda x: torch.autograd.grad(f(x).pow(2).sum(), x, create_graph=True)[0]

    assert torch.autograd.gradcheck(grad_of(lambda x: ops.gemm(x, w, activation="gelu")), (a,))
    assert torch.autograd.gradcheck(grad_of(lambda x: ops.moe_topk_gating(x, 2).weights), (a,))

    r = ops.moe_topk_gating(torch.randn(4, 8, generator=g), 2, capacity=2)
    wts = r.weights.double().requires_grad_()
    offsets = torch.tensor([0, 1, 4], dtype=torch.int32)
    raising = {
        "cross_attention_backward": lambda x: ops.cross_attention(x.view(1, 4, 1, 16), x.view(1, 4, 1, 16),
                                                                  x.view(1, 4, 1, 16)),
        "grouped_gemm_wgrad": lambda x: ops.grouped_gemm(a.detach(), x.view(2, 2, 16), offsets),
        "moe_rows_dot": lambda x: ops.moe_combine(x.view(8, 2, 4), r.expert_ids, r.slots, wts),
    }
    for name, f in raising.items():
        x = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
        leaves = (x, wts) if name == "moe_rows_dot" else (x,)
        grads = torch.autograd.grad(f(x).pow(2).sum(), leaves, create_graph=True)
        with pytest.raises(RuntimeError, match=f"{name} is not differentiable.*double backward"):
            sum(t.sum() for t in grads).backward()


def test_bench_host_smoke(tmp_path):
    """bench/bench_host.py end to end on the CPU with few repetitions: its check that
    both doors give the same bits passes, and it writes its table."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_host.py"
    spec = importlib.util.spec_from_file_location("bench_host_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--device", "cpu", "--reps", "20", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (result,) = tmp_path.glob("host-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert len(rows) == 9 and all(r["ours_us"] > 0 and r["library_us"] > 0 for r in rows)
