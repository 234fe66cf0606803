"""Bad-input fuzzing of every op in torch.ops.deepseek_kernels (CPU).

For each op: one valid call (checked against deepseek_kernels/reference.py),
then one argument perturbed at a time: a disallowed dtype, another rank, each
dimension 0 / 1 / one more, a non-contiguous, column-major or expanded (stride 0)
layout, a meta tensor among CPU ones, negative / huge integers, NaN / inf floats
and out-of-range or non-monotonic index tensors (ids, slots, counts, offsets,
row bases, cu_seqlens). Each perturbed call must either raise
RuntimeError/ValueError/TypeError/IndexError naming the argument, or succeed and
agree with the reference (or, for a layout change, with the same op on a
contiguous copy).

The calls run in child processes (one per family, under a memory limit) that
print a line before and after each case: a segfault, an abort or a hang (a
timeout) is pinned to the case that started last, reported, and the child is
restarted after it.
"""
import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = {
    "quant": ["quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4",
              "dequantize_sum_int8", "dequantize_sum_int4"],
    "moe": ["moe_topk_gating", "moe_dispatch", "moe_combine", "moe_permute", "moe_unpermute",
            "moe_rows_dot"],
    "gemm": ["gemm", "grouped_gemm", "grouped_gemm_wgrad", "quantize_int8_rowwise", "int8_gemm",
             "quantize_fp8", "fp8_gemm", "fp8_grouped_gemm"],
    "attention": ["cross_attention", "cross_attention_backward", "cross_attention_varlen",
                  "cross_attention_varlen_backward"],
    # the private kernel-choice ops deepseek_kernels.ops.cuda_kernel_choice calls
    "private": ["_quant_cuda_kernel", "_moe_cuda_kernel", "_gemm_cuda_kernel", "_fp8_cuda_kernel",
                "_int8_cuda_kernel", "_int8_cpu_sums", "_gemm_cpu_bf16", "_attention_cuda_kernel",
                "_attention_cuda_bwd_kernel"],
}
ALL_OPS = [op for ops in FAMILIES.values() for op in ops]
# Registered but called by no Python wrapper (tests/conftest.py's kernel_ran only).
NOT_FUZZED = {"_cuda_kernel_ran"}

ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
INT_VALUES = [-1, 0, 2**31, 2**62, -2**62]
FLOAT_VALUES = [math.nan, math.inf, -math.inf, 1e300, -1.0, 0.0]
BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.float16, torch.float64, torch.int8,
              torch.uint8, torch.bfloat16, torch.float32, torch.int16, torch.complex64]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Child side: the cases
# ---------------------------------------------------------------------------


class Spec:
    """One op's valid call and what may vary.

    args: name -> value, in schema order (the op is called with keywords).
    dtypes: tensor name -> allowed dtypes (the others must be refused).
    ints / floats: names of int / float arguments to perturb.
    ref: args -> outputs (tuple or tensor), or None (no reference).
    related: names a message may name instead of the perturbed one.
    extra: list of (label, perturbed name, args) op-specific cases.
    """

    def __init__(self, op, args, dtypes, ints=(), floats=(), ref=None, related=(), extra=(), rebind=None):
        self.op, self.args, self.dtypes = op, args, dtypes
        # args -> args: a backward's out and lse recomputed for a changed scalar argument
        self.rebind = rebind or (lambda a: a)
        self.ints, self.floats, self.ref = ints, floats, ref
        self.related, self.extra = set(related), list(extra)


def _with(args, **changes):
    out = dict(args)
    out.update(changes)
    return out


def _setitem(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _as_tuple(out):
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def _tol(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    if dtype == torch.float64:
        return 1e-9, 1e-9
    return 2e-4, 2e-5


def _same(a, b):
    """None when the outputs agree, else why not."""
    a, b = _as_tuple(a), _as_tuple(b)
    if len(a) != len(b):
        return f"{len(a)} outputs vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(x, torch.Tensor):
            if x != y:
                return f"output {i}: {x} vs {y}"
            continue
        if x.shape != y.shape:
            return f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return f"output {i}: dtype {x.dtype} vs {y.dtype}"
        if x.dtype in (torch.float8_e4m3fn,):
            x, y = x.float(), y.float()
        if x.is_floating_point():
            rtol, atol = _tol(x.dtype)
            if not torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol, equal_nan=True):
                return f"output {i}: max diff {(x.double() - y.double()).abs().nan_to_num(1e30).max().item()}"
        elif not torch.equal(x, y):
            return f"output {i}: values differ"
    return None


def _named(msg, names):
    if "Could not run 'deepseek_kernels::" in msg and "backend" in msg:
        return True  # the dispatcher's answer to a layout no kernel takes (sparse): names the backend
    return any(f"'{n}'" in msg or f"`{n}`" in msg or f"argument {n}" in msg for n in names)


_REAL = [None]  # the last real call's outputs (None: it raised)
_LOG = []  # the outcome of every case, for DSK_FUZZ_LOG
_LABEL = [""]


def _run_case(spec, name, args, mode):
    """mode: 'either' (named error, or success matching the reference),
    'error' (named error), ('like', args2): named error, or success matching the
    op on args2 (a contiguous copy)."""
    op = getattr(torch.ops.deepseek_kernels, spec.op)
    names = {name} | spec.related
    _REAL[0] = None
    try:
        out = op(**args)
        _REAL[0] = out
    except ERRORS as e:
        if mode == "valid":
            return f"a valid call raised {type(e).__name__}: {str(e)[:300]}"
        msg = str(e).split("\n")[0] if "Exception raised from" in str(e) else str(e)
        msg = msg.strip()
        _LOG.append(f"{spec.op} | {_LABEL[0]} | raised {type(e).__name__}: {msg[:200]}")
        if not _named(msg, names):
            return f"unclear error ({type(e).__name__}): {msg[:300]}"
        return None
    except Exception as e:  # noqa: BLE001
        return f"unexpected {type(e).__name__}: {str(e)[:300]}"
    _LOG.append(f"{spec.op} | {_LABEL[0]} | succeeded ({mode if isinstance(mode, str) else 'like'})")
    if mode == "error":
        return "accepted"
    if isinstance(mode, tuple):
        try:
            want = op(**mode[1])
        except ERRORS as e:
            return f"succeeded, but the contiguous copy raised: {str(e)[:200]}"
        why = _same(out, want)
        return None if why is None else f"differs from the contiguous call: {why}"
    if spec.ref is None:
        return "succeeded (no reference to compare with)"
    try:
        want = spec.ref(args)
    except Exception as e:  # noqa: BLE001
        return f"accepted an input the reference rejects ({type(e).__name__}: {str(e)[:200]})"
    why = _same(out, want)
    return None if why is None else f"silently wrong: {why}"


def _fake_case(spec, name, args):
    """The same call on fake tensors (what torch.compile traces): when the real
    call succeeded, the same output dtypes and static sizes; when it raised, a
    named error or (a fake checks less than the kernels) success."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    if any(isinstance(v, torch.Tensor) and (v.is_meta or v.is_sparse) for v in args.values()):
        return None
    real = _REAL[0]
    # Static sizes, as torch.compile's first trace (a ShapeEnv's symbolic ones cost 15x
    # the time; tests/test_dynamic_shapes.py compiles bad calls with dynamic=True),
    # except for moe_permute's data-dependent row count.
    mode = FakeTensorMode(shape_env=ShapeEnv() if spec.op == "moe_permute" else None)
    fake_args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    try:
        with mode:
            fake = getattr(torch.ops.deepseek_kernels, spec.op)(**fake_args)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip()
        if real is not None:
            return f"fake raised ({type(e).__name__}: {msg[:200]}) where the kernel succeeded"
        if not isinstance(e, ERRORS) or not _named(msg, {name} | spec.related):
            return f"fake: unclear error ({type(e).__name__}): {msg[:300]}"
        return None
    if real is None:
        return None
    for i, (r, f) in enumerate(zip(_as_tuple(real), _as_tuple(fake))):
        sizes_differ = r.dim() != f.dim() or any(
            isinstance(b, int) and a != b for a, b in zip(r.shape, f.shape))
        if r.dtype != f.dtype or sizes_differ:
            return f"fake output {i} is {f.dtype}{tuple(f.shape)}, the kernel's {r.dtype}{tuple(r.shape)}"
    return None


def _tensor_variants(t, allowed):
    """(label, tensor, mode) for the generic perturbations of one tensor."""
    for dt in BAD_DTYPES:
        if dt == t.dtype or dt in allowed:
            continue
        yield f"dtype={str(dt)[6:]}", t.to(dt), "either"
    yield "rank+1", t.unsqueeze(0), "either"
    if t.dim() >= 2:
        yield "rank-1", t.flatten(0, 1), "either"
    elif t.dim() == 1 and t.numel() > 0:
        yield "rank-1", t[0], "either"
    for d in range(t.dim()):
        n = t.size(d)
        for new in sorted({0, 1, n + 1} - {n}):
            if new <= n:
                v = t.narrow(d, 0, new)
            elif n > 0:
                v = torch.cat([t, t.narrow(d, 0, 1)], d)
            else:
                continue
            yield f"size[{d}]={new}", v.clone(), "either"
    if t.dim() >= 1 and t.numel() > 0:
        strided = torch.stack([t, t], -1).select(-1, 0)
        yield "strided", strided, ("like", strided.contiguous())
        if t.size(0) > 1:
            e = t[:1].expand(t.shape)
            yield "expanded", e, ("like", e.contiguous())
    if t.dim() >= 2:
        cm = t.mT.contiguous().mT
        yield "column-major", cm, ("like", cm.contiguous())
    if t.dim() >= 1 and t.numel() > 1 and t.storage_offset() == 0:
        off = torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].view(t.shape)
        yield "offset", off, ("like", off.clone())
    if t.dtype in (torch.float32, torch.float64) and t.dim() >= 1:
        # t's values as a view with the negative bit (the imaginary part of a conjugate)
        neg = torch.complex(torch.zeros_like(t), -t).conj().imag
        assert neg.is_neg()
        yield "neg-bit view", neg, ("like", neg.clone())
    if t.dim() >= 1 and t.dtype not in (torch.float8_e4m3fn, torch.bool):
        yield "sparse", t.to_sparse(), "error"
    yield "meta", t.to("meta"), "meta"


def _cases(spec):
    """(label, name, args, mode) for every perturbation of spec."""
    yield "baseline", "", spec.args, "valid"
    for name, value in spec.args.items():
        if isinstance(value, torch.Tensor):
            allowed = spec.dtypes.get(name, (value.dtype,))
            others = [n for n, o in spec.args.items() if n != name and isinstance(o, torch.Tensor)]
            for label, v, mode in _tensor_variants(value, allowed):
                if mode == "meta":
                    if not others:  # a lone meta tensor is a fake call: its fake kernel answers
                        continue
                    mode = "error"
                args = _with(spec.args, **{name: v})
                if isinstance(mode, tuple):
                    mode = ("like", _with(spec.args, **{name: mode[1]}))
                yield f"{name}:{label}", name, args, mode
        elif name in spec.ints:
            for iv in INT_VALUES:
                if iv != value:
                    yield f"{name}={iv}", name, spec.rebind(_with(spec.args, **{name: iv})), "either"
        elif name in spec.floats:
            for fv in FLOAT_VALUES:
                yield f"{name}={fv}", name, spec.rebind(_with(spec.args, **{name: fv})), "either"
    for label, name, args, *mode in spec.extra:
        yield f"{name}:{label}", name, args, (mode[0] if mode else "either")


# ---- quant ----

# q, scales, numel and block_size must agree: a mismatch may be named by any of them
_DEQ = {"q", "scales", "numel", "block_size"}


def _quant_specs():
    from deepseek_kernels import reference as R
    x = torch.randn(300)
    fl = FLOATS
    specs = []
    for bits in (8, 4):
        quant = getattr(R, f"quantize_int{bits}")
        specs.append(Spec(
            f"quantize_int{bits}", dict(x=x, block_size=64, stochastic=True, seed=7), {"x": fl},
            ints={"block_size", "seed"},
            # a block past the end is one block of n (the reference would allocate it)
            ref=lambda a, quant=quant: quant(a["x"], min(a["block_size"], max(a["x"].numel(), 2)),
                                             stochastic=a["stochastic"], seed=a["seed"]),
            extra=[("odd block", "block_size", dict(x=x, block_size=63, stochastic=False, seed=None))]
            if bits == 4 else []))
    q8, s8, _ = R.quantize_int8(x, 64)
    q4, s4, _ = R.quantize_int4(x, 64)
    specs.append(Spec(
        "dequantize_int8", dict(q=q8, scales=s8, block_size=64, out_dtype=None),
        {"q": (torch.int8,), "scales": (torch.float32,)}, ints={"block_size"}, related=_DEQ,
        ref=lambda a: R.dequantize_int8(a["q"], a["scales"], a["block_size"], out_dtype=a["out_dtype"]),
        extra=[("int64", "out_dtype", dict(q=q8, scales=s8, block_size=64, out_dtype=torch.int64)),
               ("float16", "out_dtype", dict(q=q8, scales=s8, block_size=64, out_dtype=torch.float16)),
               ("bfloat16", "out_dtype", dict(q=q8, scales=s8, block_size=64, out_dtype=torch.bfloat16))]))
    specs.append(Spec(
        "dequantize_int4", dict(q=q4, scales=s4, numel=300, block_size=64, out_dtype=None),
        {"q": (torch.uint8,), "scales": (torch.float32,)}, ints={"block_size", "numel"}, related=_DEQ,
        ref=lambda a: R.dequantize_int4(a["q"], a["scales"], a["numel"], a["block_size"],
                                        out_dtype=a["out_dtype"]),
        extra=[("299", "numel", dict(q=q4, scales=s4, numel=299, block_size=64, out_dtype=None)),
               ("empty", "q", dict(q=q4[:0], scales=s4[:0], numel=0, block_size=64, out_dtype=None)),
               ("int32", "out_dtype", dict(q=q4, scales=s4, numel=300, block_size=64, out_dtype=torch.int32))]))
    xs = torch.randn(3, 300)
    q8s = torch.stack([R.quantize_int8(r, 64)[0] for r in xs])
    s8s = torch.stack([R.quantize_int8(r, 64)[1] for r in xs])
    q4s = torch.stack([R.quantize_int4(r, 64)[0] for r in xs])
    s4s = torch.stack([R.quantize_int4(r, 64)[1] for r in xs])
    specs.append(Spec(
        "dequantize_sum_int8", dict(q=q8s, scales=s8s, block_size=64),
        {"q": (torch.int8,), "scales": (torch.float32,)}, ints={"block_size"}, related=_DEQ,
        extra=[("no rows", "q", dict(q=q8s[:0], scales=s8s[:0], block_size=64)),
               ("no columns", "q", dict(q=q8s[:, :0], scales=s8s[:, :0], block_size=64))],
        ref=lambda a: R.dequantize_sum_int8(a["q"], a["scales"], a["block_size"])))
    specs.append(Spec(
        "dequantize_sum_int4", dict(q=q4s, scales=s4s, numel=300, block_size=64),
        {"q": (torch.uint8,), "scales": (torch.float32,)}, ints={"block_size", "numel"}, related=_DEQ,
        extra=[("no rows", "q", dict(q=q4s[:0], scales=s4s[:0], numel=300, block_size=64)),
               ("no columns", "q", dict(q=q4s[:, :0], scales=s4s[:, :0], numel=0, block_size=64))],
        ref=lambda a: R.dequantize_sum_int4(a["q"], a["scales"], a["numel"], a["block_size"])))
    return specs


# ---- moe ----

MOE_DATA = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IDS = ("expert_ids", "slots")


def _index_extras(args, name, t, bad_values, related=()):
    """Entry [0, 0] (or [0]) of index tensor t set to each bad value."""
    index = (0,) * t.dim()
    return [(f"[{index}]={v}", name, _with(args, **{name: _setitem(t, index, v)})) for v in bad_values]


def _moe_specs():
    from deepseek_kernels import reference as R
    T, E, H, K, C = 8, 16, 6, 2, 3
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1
    gating_args = dict(logits=logits, k=K, correction_bias=bias, scoring="sigmoid", n_group=4,
                       topk_group=2, renormalize=True, routed_scaling_factor=2.5, capacity=C,
                       drop_policy="position")

    def gating_ref(a):
        return R.moe_topk_gating(a["logits"], a["k"], scoring=a["scoring"],
                                 correction_bias=a["correction_bias"], n_group=a["n_group"],
                                 topk_group=a["topk_group"], renormalize=a["renormalize"],
                                 routed_scaling_factor=a["routed_scaling_factor"],
                                 capacity=a["capacity"], drop_policy=a["drop_policy"])

    g = torch.ops.deepseek_kernels.moe_topk_gating(**gating_args)
    w, ids, slots = g[0], g[1], g[2]
    gating_extra = [
        ("bad", "scoring", _with(gating_args, scoring="relu")),
        ("bad", "drop_policy", _with(gating_args, drop_policy="random")),
        ("nan row", "logits", _with(gating_args, logits=_setitem(logits, 0, math.nan))),
        ("nan entry", "logits", _with(gating_args, logits=_setitem(logits, (1, 3), math.nan))),
        ("inf entry", "logits", _with(gating_args, logits=_setitem(logits, (1, 3), math.inf))),
        ("-inf row", "logits", _with(gating_args, logits=_setitem(logits, 2, -math.inf))),
        ("nan", "correction_bias", _with(gating_args, correction_bias=_setitem(bias, 3, math.nan))),
        ("softmax nan row", "logits", _with(gating_args, scoring="softmax",
                                            logits=_setitem(logits, 0, math.nan))),
        ("no capacity nan", "logits", _with(gating_args, capacity=None,
                                            logits=_setitem(logits, (1, 3), math.nan))),
        ("k=17", "k", _with(gating_args, k=17)),
        ("n_group=3", "n_group", _with(gating_args, n_group=3)),
        ("topk_group=5", "topk_group", _with(gating_args, topk_group=5)),
        ("E=2000", "logits", _with(gating_args, logits=torch.randn(2, 2000), correction_bias=None)),
    ]
    gating = Spec("moe_topk_gating", gating_args, {"logits": MOE_DATA, "correction_bias": MOE_DATA},
                  ints={"k", "n_group", "topk_group", "capacity"}, floats={"routed_scaling_factor"},
                  ref=gating_ref, related={"k", "n_group", "topk_group"}, extra=gating_extra)
    x = torch.randn(T, H)
    disp_args = dict(x=x, expert_ids=ids, slots=slots, num_experts=E, capacity=C, weights=w)
    bad_ids = [E, -2, 2**31 - 1, -2**31]
    bad_slots = [C, -2, 2**31 - 1, -2**31]
    dup = _setitem(_setitem(slots, (1, 0), slots[0, 0].item()), (1, 1), slots[0, 1].item())
    dup_ids = _setitem(_setitem(ids, (1, 0), ids[0, 0].item()), (1, 1), ids[0, 1].item())
    idx_related = set(_IDS)
    dispatch = Spec(
        "moe_dispatch", disp_args,
        {"x": MOE_DATA, "expert_ids": (torch.int32,), "slots": (torch.int32,), "weights": (torch.float32,)},
        ints={"num_experts", "capacity"},
        ref=lambda a: R.moe_dispatch(a["x"], a["expert_ids"], a["slots"], a["num_experts"], a["capacity"],
                                     a["weights"]),
        related=idx_related,
        extra=_index_extras(disp_args, "expert_ids", ids, bad_ids)
        + _index_extras(disp_args, "slots", slots, bad_slots)
        + [("duplicate (expert, slot)", "slots", _with(disp_args, expert_ids=dup_ids, slots=dup)),
           ("no weights", "weights", _with(disp_args, weights=None)),
           ("num_experts=4", "num_experts", _with(disp_args, num_experts=4)),
           ("capacity=1", "capacity", _with(disp_args, capacity=1))])
    eo = torch.randn(E, C, H)
    comb_args = dict(expert_out=eo, expert_ids=ids, slots=slots, weights=w)
    combine = Spec(
        "moe_combine", comb_args,
        {"expert_out": MOE_DATA, "expert_ids": (torch.int32,), "slots": (torch.int32,),
         "weights": (torch.float32,)},
        ref=lambda a: R.moe_combine(a["expert_out"], a["expert_ids"], a["slots"], a["weights"]),
        related=idx_related,
        extra=_index_extras(comb_args, "expert_ids", ids, bad_ids)
        + _index_extras(comb_args, "slots", slots, bad_slots)
        + [("no weights", "weights", _with(comb_args, weights=None))])
    # dropless routing for permute / unpermute
    gd = torch.ops.deepseek_kernels.moe_topk_gating(logits, K, None, scoring="softmax")
    wd, idsd, slotsd, counts = gd[0], gd[1], gd[2], gd[3]
    perm_args = dict(x=x, expert_ids=idsd, slots=slotsd, expert_counts=counts, weights=None)

    def permute_ref(a):  # reference.moe_permute takes no weights: its scatter does
        packed, offsets = R.moe_permute(a["x"], a["expert_ids"], a["slots"], a["expert_counts"])
        if a["weights"] is not None:
            rows = R._choice_rows(a["expert_ids"], a["slots"], offsets.long()[:-1])
            packed = R._scatter_rows(a["x"], rows, packed.shape[0], a["weights"])
        n = a.get("num_rows")
        if n is not None:  # a static row count: zero rows after the routed ones
            if not packed.shape[0] <= n <= 2**31 - 1:
                raise ValueError(f"num_rows={n} outside [{packed.shape[0]}, 2^31)")
            packed = torch.cat([packed, packed.new_zeros(n - packed.shape[0], packed.shape[1])])
        return packed, offsets

    nz = int(torch.nonzero(counts)[0, 0])
    permute = Spec(
        "moe_permute", perm_args,
        {"x": MOE_DATA, "expert_ids": (torch.int32,), "slots": (torch.int32,),
         "expert_counts": (torch.int32,), "weights": (torch.float32,)},
        ref=permute_ref,
        related=idx_related | {"expert_counts"},
        extra=[("given", "weights", _with(perm_args, weights=wd))]
        + _index_extras(perm_args, "expert_ids", idsd, bad_ids)
        + _index_extras(perm_args, "slots", slotsd, [int(counts[idsd[0, 0]]), -2, 2**31 - 1])
        + [("count-1", "expert_counts", _with(perm_args, expert_counts=_setitem(counts, nz, counts[nz] - 1))),
           ("count+1", "expert_counts", _with(perm_args, expert_counts=_setitem(counts, nz, counts[nz] + 1))),
           ("negative", "expert_counts", _with(perm_args, expert_counts=_setitem(counts, nz, -1))),
           ("int32 overflow", "expert_counts",
            _with(perm_args, expert_counts=_setitem(_setitem(counts, 0, 2**31 - 1), 1, 2**31 - 1))),
           ("huge", "expert_counts", _with(perm_args, expert_counts=_setitem(counts, 0, 2**31 - 1)))]
        + [(f"={n}", "num_rows", _with(perm_args, num_rows=n))
           for n in (T * K, int(counts.sum()), int(counts.sum()) - 1, 0, -1, 2**31, 2**62)])
    packed, offsets = torch.ops.deepseek_kernels.moe_permute(x, idsd, slotsd, counts)
    unperm_args = dict(packed=packed, expert_ids=idsd, slots=slotsd, offsets=offsets, weights=wd)
    o = offsets
    unpermute = Spec(
        "moe_unpermute", unperm_args,
        {"packed": MOE_DATA, "expert_ids": (torch.int32,), "slots": (torch.int32,),
         "offsets": (torch.int32,), "weights": (torch.float32,)},
        ref=lambda a: R.moe_unpermute(a["packed"], a["expert_ids"], a["slots"], a["offsets"], a["weights"]),
        related=idx_related | {"offsets"},
        extra=_index_extras(unperm_args, "expert_ids", idsd, bad_ids)
        + _index_extras(unperm_args, "slots", slotsd, [-2, 2**31 - 1, T * K])
        + [("start 1", "offsets", _with(unperm_args, offsets=_setitem(o, 0, 1))),
           ("start -1", "offsets", _with(unperm_args, offsets=_setitem(o, 0, -1))),
           ("decreasing", "offsets", _with(unperm_args, offsets=_setitem(o, 2, int(o[1]) - 1))),
           ("end past packed", "offsets", _with(unperm_args, offsets=_setitem(o, -1, int(o[-1]) + 5))),
           ("huge", "offsets", _with(unperm_args, offsets=_setitem(o, -1, 2**31 - 1))),
           ("int min", "offsets", _with(unperm_args, offsets=_setitem(o, 1, -2**31))),
           ("no weights", "weights", _with(unperm_args, weights=None))])
    # rows_dot: capacity buffer rows [E * C, H], row_base e * C, no slot limit
    rows = torch.randn(E * C, H)
    dy = torch.randn(T, H)
    base = torch.arange(E, dtype=torch.int64) * C
    rd_args = dict(rows=rows, other=dy, expert_ids=ids, slots=slots, row_base=base,
                   slot_limit=torch.full((E,), C, dtype=torch.int32), capacity=C)
    rows_dot = Spec(
        "moe_rows_dot", rd_args,
        {"rows": MOE_DATA, "other": (torch.float32,), "expert_ids": (torch.int32,), "slots": (torch.int32,),
         "row_base": (torch.int64,), "slot_limit": (torch.int32,)},
        ints={"capacity"},
        ref=lambda a: R.moe_rows_dot(a["rows"], a["other"], a["expert_ids"], a["slots"], a["row_base"]),
        related=idx_related | {"row_base", "slot_limit", "capacity", "rows"},
        extra=_index_extras(rd_args, "expert_ids", ids, bad_ids)
        + _index_extras(rd_args, "slots", slots, bad_slots)
        + [("row_base -1", "row_base", _with(rd_args, row_base=_setitem(base, 0, -1))),
           ("row_base past rows", "row_base", _with(rd_args, row_base=_setitem(base, 1, E * C))),
           ("row_base huge", "row_base", _with(rd_args, row_base=_setitem(base, 1, 2**62))),
           ("slot_limit -1", "slot_limit", _with(rd_args, slot_limit=_setitem(rd_args["slot_limit"], 0, -1))),
           ("slot_limit huge", "slot_limit",
            _with(rd_args, slot_limit=_setitem(rd_args["slot_limit"], 0, 2**31 - 1))),
           ("no slot_limit, capacity huge", "capacity", _with(rd_args, slot_limit=None, capacity=2**62)),
           ("no slot_limit, capacity -1", "capacity", _with(rd_args, slot_limit=None, capacity=-1))])
    for spec in (dispatch, combine, permute, unpermute, rows_dot):
        a0 = spec.args
        tok = [n for n in ("x", "other", "weights") if a0.get(n) is not None]
        no_tokens = _with(a0, expert_ids=a0["expert_ids"][:0], slots=a0["slots"][:0],
                          **{n: a0[n][:0] for n in tok})
        spec.extra += [("no tokens", "expert_ids", no_tokens),
                       ("all dropped", "expert_ids", _with(a0, expert_ids=torch.full_like(a0["expert_ids"], -1))),
                       ("slots all -1", "slots", _with(a0, slots=torch.full_like(a0["slots"], -1)))]
    return [gating, dispatch, combine, permute, unpermute, rows_dot]


# ---- gemm ----

GEMM_DATA = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _gemm_specs():
    from deepseek_kernels import reference as R
    a, wt, b = torch.randn(5, 8), torch.randn(7, 8), torch.randn(7)
    gemm_args = dict(a=a, weight=wt, bias=b, activation="gelu", out_dtype=None)
    gemm = Spec(
        "gemm", gemm_args, {"a": GEMM_DATA, "weight": GEMM_DATA, "bias": (torch.float32,)},
        ref=lambda a_: R.gemm(a_["a"], a_["weight"], a_["bias"], activation=a_["activation"],
                              out_dtype=a_["out_dtype"]),
        related={"a", "weight", "bias"},
        extra=[("bad", "activation", _with(gemm_args, activation="tanh")),
               ("int32", "out_dtype", _with(gemm_args, out_dtype=torch.int32)),
               ("float64", "out_dtype", _with(gemm_args, out_dtype=torch.float64)),
               ("bfloat16", "out_dtype", _with(gemm_args, out_dtype=torch.bfloat16)),
               ("None", "bias", _with(gemm_args, bias=None, activation="none")),
               ("a 1-D", "a", _with(gemm_args, a=a[0])),
               ("a 3-D", "a", _with(gemm_args, a=a.reshape(1, 5, 8)))])
    x = torch.randn(10, 8)
    ws = torch.randn(3, 7, 8)
    offs = torch.tensor([0, 4, 4, 10], dtype=torch.int32)

    def offsets_extras(args, name="offsets", rows=10):
        o = args[name]
        return [("start 1", name, _with(args, **{name: _setitem(o, 0, 1)})),
                ("decreasing", name, _with(args, **{name: _setitem(o, 1, 11)})),
                ("end short", name, _with(args, **{name: _setitem(o, -1, rows - 1)})),
                ("end past", name, _with(args, **{name: _setitem(o, -1, rows + 1)})),
                ("negative", name, _with(args, **{name: _setitem(o, 1, -4)})),
                ("huge int64", name, _with(args, **{name: _setitem(o.long(), 2, 2**40)})),
                ("int64", name, _with(args, **{name: o.long()}))]

    gg_args = dict(x=x, weights=ws, offsets=offs, out_dtype=None)
    grouped = Spec(
        "grouped_gemm", gg_args,
        {"x": GEMM_DATA, "weights": GEMM_DATA, "offsets": (torch.int32, torch.int64)},
        ref=lambda a_: R.grouped_gemm(a_["x"], a_["weights"], a_["offsets"], out_dtype=a_["out_dtype"]),
        related={"x", "weights", "offsets"}, extra=offsets_extras(gg_args))
    dy = torch.randn(10, 7)

    def wgrad_ref(a_):
        o = a_["offsets"].tolist()
        xx, d = a_["x"].double(), a_["dy"].double()
        if len(o) != a_["num_groups"] + 1 or o[0] != 0 or o[-1] != xx.shape[0] or o != sorted(o):
            raise ValueError("bad offsets")
        return torch.stack([d[o[g]:o[g + 1]].t() @ xx[o[g]:o[g + 1]] for g in range(a_["num_groups"])]
                           ).to(a_["x"].dtype)

    wg_args = dict(dy=dy, x=x, offsets=offs, num_groups=3)
    wgrad = Spec(
        "grouped_gemm_wgrad", wg_args,
        {"dy": GEMM_DATA, "x": GEMM_DATA, "offsets": (torch.int32, torch.int64)},
        ints={"num_groups"}, ref=wgrad_ref, related={"x", "dy", "offsets", "num_groups"},
        extra=offsets_extras(wg_args))
    qrow = Spec("quantize_int8_rowwise", dict(x=x), {"x": FLOATS},
                ref=lambda a_: R.quantize_int8_rowwise(a_["x"]))
    aq, asc = R.quantize_int8_rowwise(torch.randn(5, 8))
    wq, wsc = R.quantize_int8_rowwise(torch.randn(7, 8))
    i8_args = dict(a=aq, a_scales=asc, w=wq, w_scales=wsc, bias=torch.randn(7), out_dtype=None)
    int8 = Spec(
        "int8_gemm", i8_args,
        {"a": (torch.int8,), "w": (torch.int8,), "a_scales": (torch.float32,), "w_scales": (torch.float32,),
         "bias": (torch.float32,)},
        ref=lambda a_: R.int8_gemm(a_["a"], a_["a_scales"], a_["w"], a_["w_scales"], bias=a_["bias"],
                                   out_dtype=a_["out_dtype"] or torch.bfloat16),
        related={"a", "w", "a_scales", "w_scales", "bias"},
        extra=[("float64", "out_dtype", _with(i8_args, out_dtype=torch.float64)),
               ("float32", "out_dtype", _with(i8_args, out_dtype=torch.float32)),
               ("None", "bias", _with(i8_args, bias=None))])
    x8 = torch.randn(5, 200)
    qfp8 = Spec(
        "quantize_fp8", dict(x=x8, block=[1, 128]), {"x": FLOATS},
        ref=lambda a_: R.quantize_fp8(a_["x"], tuple(a_["block"])),
        extra=[(f"{blk}", "block", dict(x=x8, block=blk))
               for blk in ([128, 128], [1, 64], [128], [1, 128, 1], [-1, 128], [2**62, 128], [])]
        + [("3-D 128x128", "x", dict(x=torch.randn(2, 5, 200), block=[128, 128]))])
    fa, fas = R.quantize_fp8(torch.randn(5, 200))
    fw, fws = R.quantize_fp8(torch.randn(130, 200), (128, 128))
    f8_args = dict(a=fa, a_scales=fas, w=fw, w_scales=fws, out_dtype=None)
    fp8 = Spec(
        "fp8_gemm", f8_args,
        {"a": (torch.float8_e4m3fn,), "w": (torch.float8_e4m3fn,), "a_scales": (torch.float32,),
         "w_scales": (torch.float32,)},
        ref=lambda a_: R.fp8_gemm(a_["a"], a_["a_scales"], a_["w"], a_["w_scales"],
                                  out_dtype=a_["out_dtype"] or torch.bfloat16),
        related={"a", "w", "a_scales", "w_scales"},
        extra=[("e5m2", "a", _with(f8_args, a=fa.to(torch.float8_e5m2))),
               ("e5m2", "w", _with(f8_args, w=fw.to(torch.float8_e5m2))),
               ("int8", "out_dtype", _with(f8_args, out_dtype=torch.int8)),
               ("float64", "out_dtype", _with(f8_args, out_dtype=torch.float64)),
               ("float32", "out_dtype", _with(f8_args, out_dtype=torch.float32))])
    ga, gas = R.quantize_fp8(torch.randn(10, 200))
    gw, gws = R.quantize_fp8(torch.randn(3, 130, 200), (128, 128))
    gf8_args = dict(a=ga, a_scales=gas, w=gw, w_scales=gws, offsets=offs, out_dtype=None)
    gfp8 = Spec(
        "fp8_grouped_gemm", gf8_args,
        {"a": (torch.float8_e4m3fn,), "w": (torch.float8_e4m3fn,), "a_scales": (torch.float32,),
         "w_scales": (torch.float32,), "offsets": (torch.int32, torch.int64)},
        ref=lambda a_: R.fp8_grouped_gemm(a_["a"], a_["a_scales"], a_["w"], a_["w_scales"], a_["offsets"],
                                          out_dtype=a_["out_dtype"] or torch.bfloat16),
        related={"a", "w", "a_scales", "w_scales", "offsets"}, extra=offsets_extras(gf8_args))
    return [gemm, grouped, wgrad, qrow, int8, qfp8, fp8, gfp8]


# ---- attention ----

ATTN_DATA = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _attention_specs():
    from deepseek_kernels import reference as R
    B, Lq, Lk, Hq, Hkv, D = 2, 5, 7, 4, 2, 16
    q, k, v = torch.randn(B, Lq, Hq, D), torch.randn(B, Lk, Hkv, D), torch.randn(B, Lk, Hkv, D)
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, 5:] = False
    fwd_args = dict(q=q, k=k, v=v, softmax_scale=None, key_padding_mask=mask, causal=True)

    def fwd_ref(a):
        return R.cross_attention(a["q"], a["k"], a["v"], softmax_scale=a["softmax_scale"],
                                 key_padding_mask=a["key_padding_mask"], causal=a["causal"], return_lse=True)

    qkv = {"q", "k", "v"}
    fwd = Spec("cross_attention", fwd_args,
               {"q": ATTN_DATA, "k": ATTN_DATA, "v": ATTN_DATA, "key_padding_mask": (torch.bool,)},
               floats={"softmax_scale"}, ref=fwd_ref, related=qkv,
               extra=[("1e300", "softmax_scale", _with(fwd_args, softmax_scale=1e300)),
                      ("None", "key_padding_mask", _with(fwd_args, key_padding_mask=None)),
                      ("a sample all padding", "key_padding_mask",
                       _with(fwd_args, key_padding_mask=_setitem(mask, 0, False))),
                      ("not causal, Lq > Lk", "q", _with(fwd_args, q=torch.randn(B, 9, Hq, D), causal=True)),
                      ("no keys", "k", _with(fwd_args, k=k[:, :0], v=v[:, :0], key_padding_mask=mask[:, :0])),
                      ("no samples", "q", _with(fwd_args, q=q[:0], k=k[:0], v=v[:0], key_padding_mask=mask[:0])),
                      ("D=300", "q", _with(fwd_args, q=torch.randn(B, Lq, Hq, 300), k=torch.randn(B, Lk, Hkv, 300),
                                           v=torch.randn(B, Lk, Hkv, 300)))])
    out, lse = torch.ops.deepseek_kernels.cross_attention(**fwd_args)

    def rebind(a, forward, fwd_template):
        try:
            o, l = forward(**{n: a[n] for n in fwd_template})
        except ERRORS:
            return a  # the backward must then refuse the same argument
        return _with(a, out=o, lse=l)

    dout = torch.randn_like(out)

    def grads(a, forward):
        q_, k_, v_ = (a[n].detach().double().requires_grad_() for n in "qkv")
        o = forward(a, q_, k_, v_)
        dq, dk, dv = torch.autograd.grad(o, (q_, k_, v_), a["dout"].double())
        return dq.to(a["q"].dtype), dk.to(a["k"].dtype), dv.to(a["v"].dtype)

    def bwd_ref(a):
        if a["out"].shape != a["q"].shape or a["lse"].shape != (a["q"].shape[0], a["q"].shape[2],
                                                                a["q"].shape[1]):
            raise ValueError("out/lse shape")
        return grads(a, lambda a_, q_, k_, v_: R.cross_attention(
            q_, k_, v_, softmax_scale=a_["softmax_scale"], key_padding_mask=a_["key_padding_mask"],
            causal=a_["causal"]))

    bwd_args = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, softmax_scale=None,
                    key_padding_mask=mask, causal=True)
    bwd = Spec("cross_attention_backward", bwd_args,
               {n: ATTN_DATA for n in ("q", "k", "v", "dout", "out")} | {
                   "key_padding_mask": (torch.bool,), "lse": (torch.float32,)},
               floats={"softmax_scale"}, ref=bwd_ref, related=qkv | {"dout", "out", "lse"},
               rebind=lambda a: rebind(a, torch.ops.deepseek_kernels.cross_attention, fwd_args))
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 15], dtype=torch.int32)
    vq, vk, vv = torch.randn(12, Hq, D), torch.randn(15, Hkv, D), torch.randn(15, Hkv, D)
    var_args = dict(q=vq, k=vk, v=vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7,
                    max_seqlen_k=8, softmax_scale=0.3, causal=True)

    def var_ref(a):
        return R.cross_attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                        a["max_seqlen_q"], a["max_seqlen_k"], softmax_scale=a["softmax_scale"],
                                        causal=a["causal"], return_lse=True)

    def cu_extras(args, rows_q=12, rows_k=15, backward=False):
        ex = []
        for name, rows in (("cu_seqlens_q", rows_q), ("cu_seqlens_k", rows_k)):
            c = args[name]
            ex += [("start 1", name, _with(args, **{name: _setitem(c, 0, 1)})),
                   ("start -1", name, _with(args, **{name: _setitem(c, 0, -1)})),
                   ("decreasing", name, _with(args, **{name: _setitem(c, 1, rows + 1)})),
                   ("end short", name, _with(args, **{name: _setitem(c, -1, rows - 1)})),
                   ("end past", name, _with(args, **{name: _setitem(c, -1, rows + 1)})),
                   ("int min", name, _with(args, **{name: _setitem(c, 1, -2**31)})),
                   ("int max", name, _with(args, **{name: _setitem(c, -1, 2**31 - 1)}))]
        ex += [("max_seqlen_q too small", "max_seqlen_q", _with(args, max_seqlen_q=6)),
               ("max_seqlen_k too small", "max_seqlen_k", _with(args, max_seqlen_k=7)),
               ("B=0", "cu_seqlens_q", _with(args, cu_seqlens_q=cu_q[:1].clone(), cu_seqlens_k=cu_k[:1].clone())),
               ("an empty sample", "cu_seqlens_q", empty_sample(args, backward)),
               ("lengths differ", "cu_seqlens_k", _with(args, cu_seqlens_k=torch.tensor([0, 15], dtype=torch.int32)))]
        return ex

    def empty_sample(args, backward):
        new = _with(args, cu_seqlens_q=torch.tensor([0, 5, 5, 12], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, 7, 9, 15], dtype=torch.int32))
        if backward:  # out and lse of these samples
            fwd_keys = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                        "softmax_scale", "causal")
            o, l = torch.ops.deepseek_kernels.cross_attention_varlen(**{n: new[n] for n in fwd_keys})
            new = _with(new, out=o, lse=l)
        return new

    var = Spec("cross_attention_varlen", var_args,
               {"q": ATTN_DATA, "k": ATTN_DATA, "v": ATTN_DATA, "cu_seqlens_q": (torch.int32,),
                "cu_seqlens_k": (torch.int32,)},
               ints={"max_seqlen_q", "max_seqlen_k"}, floats={"softmax_scale"}, ref=var_ref,
               related=qkv | {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"},
               extra=cu_extras(var_args))
    vout, vlse = torch.ops.deepseek_kernels.cross_attention_varlen(**var_args)

    def var_bwd_ref(a):
        if a["out"].shape != a["q"].shape or a["lse"].shape != (a["q"].shape[1], a["q"].shape[0]):
            raise ValueError("out/lse shape")
        return grads(a, lambda a_, q_, k_, v_: R.cross_attention_varlen(
            q_, k_, v_, a_["cu_seqlens_q"], a_["cu_seqlens_k"], a_["max_seqlen_q"], a_["max_seqlen_k"],
            softmax_scale=a_["softmax_scale"], causal=a_["causal"]))

    vb_args = dict(dout=torch.randn_like(vout), q=vq, k=vk, v=vv, out=vout, lse=vlse, cu_seqlens_q=cu_q,
                   cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=8, softmax_scale=0.3, causal=True)
    var_bwd = Spec("cross_attention_varlen_backward", vb_args,
                   {n: ATTN_DATA for n in ("q", "k", "v", "dout", "out")} | {
                       "lse": (torch.float32,), "cu_seqlens_q": (torch.int32,), "cu_seqlens_k": (torch.int32,)},
                   ints={"max_seqlen_q", "max_seqlen_k"}, floats={"softmax_scale"}, ref=var_bwd_ref,
                   related=qkv | {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dout", "out",
                                  "lse"},
                   extra=cu_extras(vb_args, backward=True),
                   rebind=lambda a: rebind(a, torch.ops.deepseek_kernels.cross_attention_varlen, var_args))
    return [fwd, bwd, var, var_bwd]


def _private_specs():
    specs = []
    for op in FAMILIES["private"]:
        specs.append(Spec(op, dict(version=0), {}, ints={"version"},
                          ref=None,
                          extra=[(f"{v}", "version", dict(version=v), "error") for v in (5, 7, 100)]))
    return specs


def _selftest_child(skip):
    """Cases 0 and 3 pass, 1 segfaults, 2 hangs: what _run_family must report."""
    import ctypes
    cases = [lambda: None, lambda: ctypes.string_at(0), lambda: time.sleep(3600), lambda: None]
    for i, case in enumerate(cases):
        if i < skip:
            continue
        print(json.dumps({"start": i, "op": "selftest", "case": f"case{i}"}), flush=True)
        case()
        print(json.dumps({"end": i, "op": "selftest", "case": f"case{i}", "fail": None}), flush=True)
    print(json.dumps({"done": len(cases)}), flush=True)


_SPECS = {"quant": _quant_specs, "moe": _moe_specs, "gemm": _gemm_specs, "attention": _attention_specs,
          "private": _private_specs}


def _private_ok(spec, label, args):
    """A private op's version 0 only asks: success with an int is right; every
    other tried value is out of range."""
    return args["version"] == 0


def _child(family, skip):
    """Runs family's cases, skipping the first `skip`; one line per case event."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    if family == "_selftest":
        return _selftest_child(skip)
    torch.set_num_threads(1)
    import deepseek_kernels  # noqa: F401
    torch.manual_seed(0)
    i = 0
    for spec in _SPECS[family]():
        for label, name, args, mode in _cases(spec):
            if i >= skip:
                print(json.dumps({"start": i, "op": spec.op, "case": label}), flush=True)
                _LABEL[0] = label
                if family == "private":
                    ok = _private_ok(spec, label, args)
                    mode = "either" if ok else "error"
                    if ok:
                        try:
                            getattr(torch.ops.deepseek_kernels, spec.op)(**args)
                            why = None
                        except Exception as e:  # noqa: BLE001
                            why = f"raised {e}"
                    else:
                        why = _run_case(spec, name, args, mode)
                else:
                    why = _run_case(spec, name, args, mode)
                    why = why or _fake_case(spec, name, args)
                print(json.dumps({"end": i, "op": spec.op, "case": label, "fail": why}), flush=True)
            i += 1
    if os.environ.get("DSK_FUZZ_LOG"):
        with open(os.environ["DSK_FUZZ_LOG"] + "." + family, "w") as f:
            f.write("\n".join(_LOG) + "\n")
    print(json.dumps({"done": i}), flush=True)


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------

CASE_TIMEOUT_S = 20  # a child printing nothing for this long hangs


def _run_family(family, case_timeout_s=CASE_TIMEOUT_S):
    """{op: [(case, failure)]} plus the number of cases run, restarting the
    child after a crash or a hang."""
    results, cases, skip = {}, 0, 0
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    code = f"import tests.test_fuzz_inputs as m; m._child({family!r}, {{skip}})"
    while True:
        # stderr to a file: a chatty child must not block on a full pipe (a false hang)
        err_file = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([sys.executable, "-c", code.format(skip=skip)], cwd=_REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
        started = None
        deadline = time.monotonic() + 120  # import + setup
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        done = False
        hung = False
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0 or not sel.select(timeout):
                hung = True
                break
            line = proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            if "start" in ev:
                started = ev
                deadline = time.monotonic() + case_timeout_s
            elif "end" in ev:
                cases += 1
                started = None
                if ev["fail"]:
                    results.setdefault(ev["op"], []).append((ev["case"], ev["fail"]))
            elif "done" in ev:
                done = True
        sel.close()
        if hung:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        err_file.seek(0)
        stderr = err_file.read()
        err_file.close()
        if done:
            return results, cases
        if started is None:
            raise AssertionError(f"fuzz child for {family} died outside a case: rc={proc.returncode}\n{stderr[-3000:]}")
        why = f"hang (no result in {case_timeout_s} s)" if hung else \
            f"crash (exit status {proc.returncode}): {stderr.strip().splitlines()[-1:] if stderr.strip() else ''}"
        results.setdefault(started["op"], []).append((started["case"], why))
        cases += 1
        skip = started["start"] + 1


@pytest.fixture(scope="module")
def fuzz_results():
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(FAMILIES, pool.map(_run_family, FAMILIES)))
    results = {}
    for family, (res, n) in runs.items():
        assert n > 0, family
        results.update(res)
    return results


def test_harness_catches_crash_and_hang():
    results, cases = _run_family("_selftest", case_timeout_s=3)
    assert cases == 4
    (c1, why1), (c2, why2) = results["selftest"]
    assert c1 == "case1" and why1.startswith("crash (exit status -11)"), why1
    assert c2 == "case2" and why2.startswith("hang"), why2


def test_every_op_is_fuzzed():
    import deepseek_kernels  # noqa: F401
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("deepseek_kernels::")}
    assert registered - NOT_FUZZED == set(ALL_OPS)


@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_inputs(op, fuzz_results):
    failures = fuzz_results.get(op, [])
    assert not failures, f"{op}: {len(failures)} bad-input cases failed:\n" + "\n".join(
        f"  {case}: {why}" for case, why in failures)


if __name__ == "__main__":  # python tests/test_fuzz_inputs.py [family]: print every failure
    fams = sys.argv[1:] or list(FAMILIES)
    for fam in fams:
        t0 = time.time()
        res, n = _run_family(fam)
        print(f"== {fam}: {n} cases, {sum(map(len, res.values()))} failures, {time.time() - t0:.1f} s")
        for op_, fails in res.items():
            for case, why in fails:
                print(f"  {op_} | {case} | {why}")
