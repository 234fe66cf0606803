"""deepseek_kernels.nn modules as a codebase uses them beyond forward/backward: deferred
(meta-device) init, state dicts, copies, dtype conversion, odd input shapes, repr,
no-grad modes. The numerics of the modules are tested in test_gemm.py, test_moe.py
and test_attention.py."""

import copy
import io
import pickle

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.nn import CrossAttention, FP8Linear, Int8Linear, Linear, MoELayer
from tests.conftest import DEVICES

MODULES = ["Linear", "FP8Linear", "Int8Linear", "CrossAttention", "MoELayer", "MoELayer-fp8"]


def _make(name, device="cpu", dtype=None):
    """A small module of each kind (MoELayer with shared experts and a correction bias)."""
    if name == "Linear":
        return Linear(40, 24, activation="gelu", device=device, dtype=dtype)
    if name == "FP8Linear":
        return FP8Linear(40, 24, activation="silu", device=device, dtype=dtype)
    if name == "Int8Linear":
        return Int8Linear(40, 24, activation="relu", device=device)
    if name == "CrossAttention":
        return CrossAttention(32, 4, 2, kv_dim=24, bias=True, device=device, dtype=dtype)
    return MoELayer(16, 24, 8, 2, num_shared_experts=1, capacity_factor=1.25, bias_update_rate=0.01,
                    fp8=name == "MoELayer-fp8", device=device, dtype=dtype)


def _inputs(name, device="cpu", dtype=torch.float32):
    if name == "CrossAttention":
        return (torch.randn(2, 5, 32, device=device, dtype=dtype),
                torch.randn(2, 7, 24, device=device, dtype=dtype))
    return (torch.randn(3, 5, 16 if name.startswith("MoE") else 40, device=device, dtype=dtype),)


def _trained(name, device="cpu"):
    """A module whose state is not the constructor's: Int8Linear quantized from a
    Linear, MoELayer after a training forward (correction bias moved, aux_loss
    holding the graph), left in eval mode (no more bias updates)."""
    m = _make(name, device)
    if name == "Int8Linear":
        m = Int8Linear.from_linear(Linear(40, 24, device=device), activation="relu")
    if name.startswith("MoE"):
        m.aux_loss_alpha = 0.01
        m(*_inputs(name, device))
        assert m.correction_bias.abs().sum() > 0 and m.aux_loss.requires_grad
        m.eval()
    return m


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODULES)
def test_meta_init_then_reset_parameters(name, device):
    """Deferred init (FSDP, big models): build on the meta device, to_empty, then
    reset_parameters gives the constructor's initialisation, draw for draw."""
    torch.manual_seed(1)
    want = _state(_make(name, device))
    m = _make(name, "meta")
    assert all(t.is_meta for t in m.state_dict().values())
    m.to_empty(device=device)
    if name.startswith("MoE"):
        m.correction_bias.fill_(float("nan"))  # to_empty leaves garbage: reset must zero it
    torch.manual_seed(1)
    m.reset_parameters()
    _assert_same_state(_state(m), want)
    assert all(t.device.type == device for t in m.state_dict().values())
    m(*_inputs(name, device))


@pytest.mark.parametrize("name", MODULES)
def test_state_dict_and_copies_round_trip(name):
    """state_dict -> load_state_dict(strict=True) into a fresh module, deepcopy, pickle
    and torch.save/torch.load: the same state and bitwise the same outputs. A MoELayer
    after a training forward holds aux_loss with its graph (deepcopy of it raised)."""
    m = _trained(name)
    x = _inputs(name)
    want, state = m(*x), _state(m)
    fresh = _make(name).eval()
    result = fresh.load_state_dict(m.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for c in (fresh, copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False)):
        _assert_same_state(_state(c), state)
        assert torch.equal(c(*x), want)
    if name.startswith("MoE"):
        assert copy.deepcopy(m).aux_loss.grad_fn is None  # a copy holds a plain value
        m.train()
        (m(*x).sum() + m.aux_loss).backward()  # the original still trains


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_dtype_conversion(name, dtype):
    """.to(dtype) then forward in that dtype: the output in it, close to fp32's. The
    fp32 parts stay fp32 (MoELayer's router and correction bias, Int8Linear's scales
    and bias: .half() made int8_gemm reject them, and the MoELayer router fail), and
    fp64 runs through the FP8 modules (quantized through fp32)."""
    m = _trained(name)
    x = _inputs(name)
    want = m(*x).double()
    conv = {torch.float64: m.double, torch.float16: m.half, torch.bfloat16: m.bfloat16}[dtype]()
    assert conv is m
    y = m(*(t.to(dtype) for t in x))
    assert y.dtype == dtype
    rel = ((y.double() - want).norm() / want.norm()).item()
    # the FP8/INT8 ones quantize slightly different inputs: a few codes apart
    assert rel < {torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype], rel
    if name == "Int8Linear":
        assert m.weight_q.dtype == torch.int8
        assert m.weight_scales.dtype == m.bias.dtype == torch.float32
    if name.startswith("MoE"):
        assert m.router.weight.dtype == m.correction_bias.dtype == torch.float32
        assert m.w_gate_up.dtype == m.shared["down"].weight.dtype == dtype
        # as if built in that dtype
        built = {k: v.dtype for k, v in _make(name, dtype=dtype).state_dict().items()}
        assert {k: v.dtype for k, v in m.state_dict().items()} == built
        m.train()
        before = m.correction_bias.clone()
        m(*(t.to(dtype) for t in x)).float().sum().backward()
        assert m.router.weight.grad.dtype == torch.float32
        assert not torch.equal(m.correction_bias, before)  # fp32 steps of 0.01, not rounded away
        m.float()
        assert m.w_gate_up.dtype == torch.float32


def test_conversion_keeps_fp32_state_exact():
    """The kept-fp32 tensors are not rounded through the conversion dtype and follow
    device moves (meta here); parameter identity and gradients survive, with
    torch's swap-tensors conversion too."""
    for swap in (False, True):
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            m = _trained("MoELayer")
            m.train()
            m(*_inputs("MoELayer")).sum().backward()
            w, g, b = m.router.weight, m.router.weight.grad.clone(), m.correction_bias.clone()
            wv = w.detach().clone()
            m.to(torch.bfloat16)
            assert m.router.weight is w and torch.equal(w, wv) and torch.equal(w.grad, g)
            assert torch.equal(m.correction_bias, b)
            m.to("meta")
            assert m.router.weight.is_meta and m.router.weight.dtype == torch.float32
            assert m.correction_bias.is_meta and m.correction_bias.dtype == torch.float32
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
    q = Int8Linear.from_linear(Linear(40, 24))
    s = q.weight_scales.clone()
    q.half()
    assert torch.equal(q.weight_scales, s)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # in_features=0, as nn.Linear
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("name", ["Linear", "FP8Linear", "Int8Linear"])
def test_linear_input_shapes(name, use_kernels):
    """[*, in] as nn.Linear: 1-D, 3-D, 4-D, empty batch dims (with backward), and
    in_features = 0 (reshape(-1, 0) failed in FP8Linear and Int8Linear)."""
    m = _trained(name)
    m.use_kernels = use_kernels
    x = torch.randn(2, 3, 4, 40)
    want = m(x.reshape(-1, 40)).reshape(2, 3, 4, 24)
    for got, ref in [(m(x), want), (m(x[1, 2, 3]), want[1, 2, 3]), (m(x[0]), want[0])]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # 1-row GEMMs sum differently
    for shape in [(0, 40), (2, 0, 40), (0, 3, 0, 40)]:
        xe = torch.randn(*shape, requires_grad=name != "Int8Linear")
        y = m(xe)
        assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
        if name != "Int8Linear":
            y.sum().backward()
            assert xe.grad.shape == xe.shape
            assert not m.weight.grad.any() and not m.bias.grad.any()
            m.zero_grad()
    k0 = {"Linear": Linear, "FP8Linear": FP8Linear, "Int8Linear": Int8Linear}[name](0, 5)
    k0.use_kernels = use_kernels
    with torch.no_grad():
        k0.bias.uniform_()
    assert torch.equal(k0(torch.randn(3, 0)), k0.bias.expand(3, 5))


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_moe_layer_empty_batch(use_kernels):
    """0 tokens through every MoELayer mode: an empty output, zero gradients, no loss
    or bias update from nothing."""
    for kw in (dict(), dict(capacity_factor=1.0), dict(fp8=True)):
        m = MoELayer(16, 24, 8, 2, num_shared_experts=1, aux_loss_alpha=0.01, z_loss_coef=1e-3,
                     bias_update_rate=0.01, **kw)
        m.use_kernels = use_kernels
        x = torch.randn(2, 0, 16, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        (y.sum() + m.aux_loss).backward()
        assert m.aux_loss.item() == 0 and not m.correction_bias.any(), kw
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters()), kw


def test_repr_shows_the_configuration():
    a = repr(CrossAttention(64, 8, 2, kv_dim=48, softmax_scale=0.5))
    assert "dim=64, num_heads=8, num_kv_heads=2, kv_dim=48, softmax_scale=0.5" in a
    assert "kv_dim" not in repr(CrossAttention(64, 8))
    r = repr(MoELayer(16, 24, 8, 2, capacity_factor=1.25, scoring="sigmoid", n_group=4, topk_group=2,
                      bias_update_rate=0.001, fp8=True))
    assert ("hidden=16, ffn_hidden=24, num_experts=8, k=2, capacity_factor=1.25, scoring='sigmoid', "
            "n_group=4, topk_group=2, bias_update_rate=0.001, fp8=True") in r
    assert "in_features=40, out_features=24, bias=True, activation='silu'" in repr(_make("FP8Linear"))


@pytest.mark.parametrize("name", MODULES)
def test_no_grad_modes(name):
    """torch.no_grad, torch.inference_mode and requires_grad_(False): the same output,
    no graph."""
    m = _trained(name)
    x = _inputs(name)
    want = m(*x)
    with torch.no_grad():
        a = m(*x)
    with torch.inference_mode():
        b = m(*x)
    c = m.requires_grad_(False)(*x)
    for y in (a, b, c):
        assert torch.equal(y, want) and y.grad_fn is None


def test_moe_router_is_fp32_under_autocast(monkeypatch):
    """The documented fp32 router: under bf16 autocast the gating gets the fp32 logits
    of the eager router (autocast ran nn.Linear in bf16: routing on rounded logits)."""
    m = MoELayer(16, 24, 8, 2)
    x = torch.randn(40, 16)
    seen, real = [], dk.ops.moe_topk_gating
    monkeypatch.setattr(dk.ops, "moe_topk_gating", lambda logits, *a, **kw: seen.append(logits) or
                        real(logits, *a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], m.router(x))


def test_linear_from_linear_keeps_the_activation():
    """Linear.from_linear follows FP8Linear's and Int8Linear's default: the source's
    activation (a "none" default silently dropped an FP8Linear's SiLU)."""
    f8 = _make("FP8Linear")
    assert Linear.from_linear(f8).activation == "silu"
    assert Linear.from_linear(f8, activation="none").activation == "none"
    assert Linear.from_linear(torch.nn.Linear(4, 3)).activation == "none"
    x = torch.randn(3, 40)
    want = torch.nn.functional.silu(torch.nn.functional.linear(x, f8.weight, f8.bias))
    torch.testing.assert_close(Linear.from_linear(f8)(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Linear", "FP8Linear", "Int8Linear"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_modules_return_what_nn_linear_returns_under_autocast(name, activation):
    """Under bf16 autocast torch.nn.Linear returns bf16; so do ours. FP8Linear and
    Int8Linear compute in fp32 as always and round once to bf16 (bitwise the fp32
    result rounded); fp64 inputs stay fp64, as autocast leaves them."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(40, 24)
    cls = {"Linear": Linear, "FP8Linear": FP8Linear, "Int8Linear": Int8Linear}[name]
    m = cls.from_linear(ref, activation=activation)
    x = torch.randn(7, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_dtype = ref(x).dtype
        y = m(x)
        y64 = m(x.double()) if name != "Linear" else None  # (nn.Linear: a dtype error)
    assert want_dtype == torch.bfloat16 and y.dtype == want_dtype
    if name != "Linear":  # the same fp32 computation, one rounding
        assert y64.dtype == torch.float64
        assert torch.equal(y, m(x).to(torch.bfloat16))
    if name == "FP8Linear":  # gradients reach the fp32 leaves in fp32
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(xg).float().sum().backward()
        assert xg.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32
    if name == "Linear":  # the reference path (reference.py in fp64) gets the module's casts too
        m.use_kernels = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref = m(x)
        assert y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y_ref, y)  # bf16's tolerance: one rounding each


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_under_activation_checkpointing(use_reentrant, capacity_factor):
    """torch.utils.checkpoint re-runs the forward during backward: the recompute must
    route with the bias the forward used (the forward has already updated it) and
    not update it again. Three steps: outputs, gradients and the bias equal the
    run without checkpointing, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    kw = dict(capacity_factor=capacity_factor, bias_update_rate=0.01, jitter_eps=0.01)
    plain, ckpt = MoELayer(32, 48, 8, 2, **kw), MoELayer(32, 48, 8, 2, **kw)
    ckpt.load_state_dict(plain.state_dict())
    for step in range(3):
        x = torch.randn(64, 32)
        torch.manual_seed(step)
        y = plain(x.requires_grad_())
        y.sum().backward()
        torch.manual_seed(step)
        yc = checkpoint(ckpt, x, use_reentrant=use_reentrant)
        yc.sum().backward()
        assert torch.equal(y, yc), step
        assert torch.equal(plain.correction_bias, ckpt.correction_bias), step
    assert plain.correction_bias.abs().sum() > 0
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_moe_layer_token_mask(use_kernels):
    """token_mask leaves padding out of routing: an all-True mask changes nothing
    (bitwise); with padding masked out, the real tokens' outputs and the losses are
    those of the real tokens alone (dropless), padded tokens get only the shared
    experts' output, take no capacity slot and do not move the bias."""
    torch.manual_seed(0)
    kw = dict(num_shared_experts=1, aux_loss_alpha=0.01, z_loss_coef=1e-3, bias_update_rate=0.01)
    m = MoELayer(16, 24, 8, 2, **kw)
    m.use_kernels = use_kernels
    x = torch.randn(3, 5, 16)
    y0, aux0 = m(x), m.aux_loss
    bias0 = m.correction_bias.clone()
    m.correction_bias.zero_()
    y1 = m(x, torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(y0, y1) and torch.equal(aux0, m.aux_loss) and torch.equal(bias0, m.correction_bias)

    # right padding: 2 + 4 + 3 real tokens, padding rows hold garbage
    lengths = [2, 4, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    xp = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    real = x[mask]  # [9, 16]
    m.eval()  # no bias update between the two calls
    y_real, aux_real = m(real), m.aux_loss
    y_pad = m(xp, mask)
    torch.testing.assert_close(y_pad[mask], y_real, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.aux_loss, aux_real, rtol=1e-6, atol=1e-7)
    shared = m.shared["down"](m._swiglu(m.shared["gate_up"](xp[~mask])))
    torch.testing.assert_close(y_pad[~mask], shared, rtol=1e-6, atol=1e-6)
    assert int(m.last_routed_counts.sum()) == 2 * 9

    # capacity mode, padding first: it must not take the slots of the real tokens
    mc = MoELayer(16, 24, 8, 2, capacity_factor=1.0)
    mc.use_kernels = use_kernels
    first = torch.arange(5)[None, :] >= torch.tensor([3, 3, 3])[:, None]  # 3 pads, then 2 real
    mc(x, first)
    assert int(mc.last_routed_counts.sum()) == 2 * 6

    m.train()
    before = m.correction_bias.clone()
    m(xp, mask)
    m.correction_bias.copy_(before)
    # bias update from the real tokens' loads alone
    expected = before + 0.01 * torch.sign(m.last_routed_counts.float().mean() - m.last_routed_counts.float())
    m(xp, mask)
    assert torch.equal(m.correction_bias, expected)

    for bad in (mask.int(), mask[:, :4], mask.reshape(-1)):
        with pytest.raises(ValueError, match="token_mask"):
            m(xp, bad)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_layer_returns_the_autocast_dtype(fp8, capacity_factor):
    """Under bf16 autocast every MoELayer mode returns bf16 (the FP8 experts returned
    fp32, unlike the bf16 ones), and fp32 inputs get fp32 gradients."""
    torch.manual_seed(0)
    m = MoELayer(128, 128, 4, 2, num_shared_experts=1, capacity_factor=capacity_factor, fp8=fp8)
    x = torch.randn(2, 5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.w_gate_up.grad.dtype == torch.float32
    assert m(x.detach()).dtype == torch.float32
