import os

import torch

import deepseek_kernels


def test_build_info_fields():
    info = deepseek_kernels.build_info()
    for key in ("torch_version", "cuda_kernels", "cuda_version", "cuda_archs", "openmp", "cpu_threads"):
        assert key in info, key
    assert info["torch_runtime_version"] == torch.__version__
    # Built against the same major.minor torch we run with (ABI safety).
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    if info["cuda_kernels"]:
        assert info["cuda_archs"], "CUDA build must name its architectures"


def test_cuda_kernels_compiled_when_expected():
    # CI builds with DSK_FORCE_CUDA=1 and sets this: every .cu file must be in the build.
    if os.environ.get("DSK_EXPECT_CUDA_KERNELS") != "1":
        import pytest

        pytest.skip("DSK_EXPECT_CUDA_KERNELS not set (set by .ci/run and `make test`)")
    info = deepseek_kernels.build_info()
    assert info["cuda_kernels"] is True
    assert "sm_80" in info["cuda_archs"] and "sm_90a" in info["cuda_archs"]


def test_ops_registered():
    names = ["quantize_int8", "dequantize_int8", "dequantize_sum_int8",
             "quantize_int4", "dequantize_int4", "dequantize_sum_int4",
             "moe_topk_gating", "moe_dispatch", "moe_combine", "moe_permute", "moe_unpermute",
             "moe_rows_dot",
             "cross_attention", "cross_attention_backward", "cross_attention_varlen",
             "cross_attention_varlen_backward",
             "gemm", "grouped_gemm", "grouped_gemm_wgrad", "quantize_int8_rowwise", "int8_gemm",
             "quantize_fp8", "fp8_gemm"]
    for name in names:
        assert hasattr(torch.ops.deepseek_kernels, name), name


def test_cpu_kernels_use_openmp_when_torch_does():
    # at::parallel_for is an inline OpenMP loop: without -fopenmp in our build
    # the CPU kernels would silently run on one thread.
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert deepseek_kernels.build_info()["openmp"] is True


def test_cuda_kernel_ran_op():
    # Which generation a family's last CUDA launch ran (0 before any; the CPU never sets it).
    import pytest

    op = torch.ops.deepseek_kernels._cuda_kernel_ran
    for family in ("gemm", "fp8_gemm", "int8_gemm", "attention_fwd", "attention_bwd"):
        assert op(family) in (0, 1, 2, 3)
    for family in ("gemm_v3_variant", "fp8_gemm_v3_variant"):  # V3Variant bits
        assert 0 <= op(family) < 64
    assert op("attention_bwd_v3_variant") in (0, 1)  # 1: dQ by bulk reductions
    before = op("gemm")
    deepseek_kernels.gemm(torch.randn(3, 8), torch.randn(5, 8))  # CPU: not a CUDA launch
    assert op("gemm") == before
    with pytest.raises(ValueError, match="'gemm', 'fp8_gemm'.*got 'gemmm'"):
        op("gemmm")


def test_wrappers_skip_the_autograd_layer_only_when_no_gradient_can_flow(monkeypatch):
    """The differentiable ops' wrappers call below the Python autograd layer when no
    input needs a gradient (same results), and through the dispatcher to the op's
    Autograd kernel otherwise (gradients flow; tests/test_eager_autograd.py compares
    that kernel with torch.library's)."""
    import contextlib

    from deepseek_kernels import ops as O

    entered = []

    @contextlib.contextmanager
    def counting_guard():
        entered.append(1)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            yield

    monkeypatch.setattr(O, "_below_autograd", counting_guard)
    torch.manual_seed(0)
    a, w = torch.randn(37, 24), torch.randn(9, 24)
    logits = torch.randn(37, 8)
    q, k = torch.randn(2, 5, 4, 32), torch.randn(2, 7, 2, 32)

    def calls():
        g = O.moe_topk_gating(logits, 2)
        return [O.gemm(a, w, activation="gelu"), O.cross_attention(q, k, k),
                O.moe_dispatch(a, g.expert_ids, g.slots, 8, 74), *g]

    fast = calls()
    assert len(entered) == 4
    with torch.inference_mode():  # the autograd layer is off anyway: the same results
        want = torch.ops.deepseek_kernels.gemm(a, w, None, activation="gelu")
    torch.testing.assert_close(fast[0], want, rtol=0, atol=0)
    assert not any(t.requires_grad for t in fast)

    entered.clear()
    for t in (a, logits, q):
        t.requires_grad_(True)
    slow = calls()
    # through the dispatcher to the ops' Autograd kernel (ops._register_autograd)
    assert entered == []
    assert all(type(t.grad_fn).__name__.startswith("DskAutograd_") for t in slow[:4])
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s.detach(), rtol=0, atol=0)
    (slow[0].sum() + slow[1].sum() + slow[2].sum() + slow[3].sum()).backward()
    assert a.grad is not None and q.grad is not None and logits.grad is not None

    entered.clear()
    with torch.no_grad():  # inputs need gradients, grad mode is off: the fast path
        out = O.gemm(a, w)
    assert entered == [1] and not out.requires_grad


def test_profile_targets_summary(tmp_path):
    """bench/profile_targets.py --summarize reads ncu's --csv --page details output
    (log lines mixed in) into one row per kernel launch; a CSV without those
    metrics says so instead of printing an empty table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "profile_targets.py"
    spec = importlib.util.spec_from_file_location("profile_targets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
              '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
              '"Metric Value"\n')

    def line(i, kernel, section, metric, unit, value):
        return (f'"{i}","1","python3","h","{kernel}","1","7","(256, 1, 1)","(512, 1, 1)","0","9.0",'
                f'"{section}","{metric}","{unit}","{value}"\n')

    csv_text = ("==PROF== Connected to process 1\n" + header
                + line(0, "wgmma_gemm_kernel", "GPU Speed Of Light Throughput", "Duration", "us", "203.1")
                + line(0, "wgmma_gemm_kernel", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "88.2")
                + line(0, "wgmma_gemm_kernel", "GPU Speed Of Light Throughput", "Elapsed Cycles", "cycle", "1")
                + line(1, "gating_rows_v2_kernel", "Occupancy", "Achieved Occupancy", "%", "61.5")
                + "==PROF== Disconnected from process 1\n")
    (tmp_path / "ncu.csv").write_text(csv_text)
    table = mod.summarize(str(tmp_path / "ncu.csv")).splitlines()
    assert len(table) == 2
    assert "wgmma_gemm_kernel" in table[0] and "time: 203.1 us" in table[0] and "SM %: 88.2 %" in table[0]
    assert "Elapsed" not in table[0] and "occupancy %: -" in table[0]
    assert "gating_rows_v2_kernel" in table[1] and "occupancy %: 61.5 %" in table[1]
    (tmp_path / "empty.csv").write_text(header)
    assert "no kernel metrics" in mod.summarize(str(tmp_path / "empty.csv"))
    import pytest

    with pytest.raises(ValueError, match="unknown target"):
        mod._target("nope")


_COLLECT_FAMILIES = r"""
import json, sys
import pytest

class Collector:
    def __init__(self):
        self.ids = []
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

out = {}
for name, files, kexpr in json.loads(sys.argv[1]):
    c = Collector()
    args = ["--co", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files.split()]
    if kexpr:
        args += ["-k", kexpr]
    pytest.main(args, plugins=[c])
    out[name] = c.ids
print("FAMILIES=" + json.dumps(out))
"""


def test_gpu_check_families_partition_the_cuda_tests():
    # bench/gpu_check.sh runs the CUDA tests as families, each in its own process:
    # the families without a variable of their own must hold every `-m cuda` test
    # but the past-2^31 ones (their own step) exactly once, and every family must
    # select some test (a -k expression gone stale selects nothing, silently).
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "bench" / "gpu_check.sh").read_text()
    specs = re.findall(r'^\s+([\w-]+)\) echo "([^|"]*)\|([^|"]*)\|([^"]*)" ;;$', script, re.M)
    assert len(specs) >= 16, specs
    all_cuda = ("all", " ".join(sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                                       if p.name != "test_large.py")), "")
    families = [(name, files, kexpr) for name, files, kexpr, _ in specs] + [all_cuda]
    run = subprocess.run([sys.executable, "-c", _COLLECT_FAMILIES, json.dumps(families)], cwd=root,
                         capture_output=True, text=True, timeout=600)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("FAMILIES=")]
    assert line, run.stdout[-2000:] + run.stderr[-2000:]
    got = json.loads(line[0][len("FAMILIES="):])
    everything = set(got.pop("all"))
    assert everything
    for name, ids in got.items():
        assert ids, f"gpu_check family {name!r} selects no test"
    plain = [name for name, _, _, env in specs if not env]
    seen = {}
    for name in plain:
        for test in got[name]:
            assert test not in seen, f"{test} in families {seen[test]!r} and {name!r}"
            seen[test] = name
    assert set(seen) == everything, sorted(everything - set(seen))[:10]


def _fake_samples():
    """(op name, positional args, keyword args) on the CPU, one per op with two or
    more tensor arguments."""
    import deepseek_kernels.ops  # noqa: F401  (registers the fakes)

    i32 = torch.int32
    ids = torch.tensor([[0, 1], [1, 0], [0, -1]], dtype=i32)
    slots = torch.tensor([[0, 0], [1, 1], [1, -1]], dtype=i32)
    w = torch.rand(3, 2)
    off = torch.tensor([0, 2, 5], dtype=i32)
    q, kv = torch.randn(2, 3, 2, 32), torch.randn(2, 5, 1, 32)
    cu_q, cu_k = torch.tensor([0, 1, 3], dtype=i32), torch.tensor([0, 4, 5], dtype=i32)
    fp8 = torch.randn(128, 128).to(torch.float8_e4m3fn)
    return [
        ("dequantize_int8", (torch.zeros(5, dtype=torch.int8), torch.ones(1)), {}),
        ("dequantize_int4", (torch.zeros(3, dtype=torch.uint8), torch.ones(1), 5), {}),
        ("dequantize_sum_int8", (torch.zeros(2, 5, dtype=torch.int8), torch.ones(2, 1)), {}),
        ("dequantize_sum_int4", (torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 1), 5), {}),
        ("moe_topk_gating", (torch.randn(3, 4), 2, torch.zeros(4)), {}),
        ("moe_dispatch", (torch.randn(3, 8), ids, slots, 2, 2, w), {}),
        ("moe_combine", (torch.randn(2, 2, 8), ids, slots, w), {}),
        ("moe_permute", (torch.randn(3, 8), ids, slots, torch.tensor([2, 3], dtype=i32), w), {}),
        ("moe_unpermute", (torch.randn(5, 8), ids, slots, off, w), {}),
        ("moe_rows_dot", (torch.randn(4, 8), torch.randn(3, 8), ids, slots, torch.tensor([0, 2]),
                          torch.tensor([2, 2], dtype=i32), 2), {}),
        ("cross_attention", (q, kv, kv, None, torch.zeros(2, 5, dtype=torch.bool)), {}),
        ("cross_attention_backward", (q, q, kv, kv, q, torch.zeros(2, 2, 3)), {}),
        ("cross_attention_varlen", (q[0], kv[0], kv[0], cu_q, cu_k, 2, 4), {}),
        ("cross_attention_varlen_backward", (q[0], q[0], kv[0], kv[0], q[0], torch.zeros(2, 3),
                                             cu_q, cu_k, 2, 4), {}),
        ("gemm", (torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)), {}),
        ("grouped_gemm", (torch.randn(5, 8), torch.randn(2, 4, 8), off), {}),
        ("grouped_gemm_wgrad", (torch.randn(5, 4), torch.randn(5, 8), off, 2), {}),
        ("int8_gemm", (torch.zeros(3, 8, dtype=torch.int8), torch.ones(3), torch.zeros(4, 8, dtype=torch.int8),
                       torch.ones(4)), {}),
        ("fp8_gemm", (fp8, torch.ones(128, 1), fp8, torch.ones(1, 1)), {}),
        ("fp8_grouped_gemm", (fp8, torch.ones(128, 1), torch.stack([fp8, fp8]), torch.ones(2, 1, 1),
                              torch.tensor([0, 64, 128], dtype=i32)), {}),
    ]


def test_fakes_reject_mixed_devices():
    """Every fake checks its tensors share one device before computing shapes:
    a meta tensor among CPU ones dispatches to the fake, which used to return an
    uninitialised CPU tensor. All-meta calls still work (shape inference)."""
    import pytest

    for name, args, kwargs in _fake_samples():
        op = getattr(torch.ops.deepseek_kernels, name)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        if name != "moe_permute":  # data-dependent size: FakeTensors only, not meta
            outs = op(*meta, **kwargs)
            for o in (outs if isinstance(outs, (tuple, list)) else [outs]):
                assert o.device.type == "meta", name
        for i in positions:
            mixed = list(args)
            mixed[i] = args[i].to("meta")
            # The argument named is the first that differs from the first tensor's device.
            with pytest.raises(ValueError, match=f"{name}: argument '.*' must be on the same device as"):
                op(*mixed, **kwargs)


def test_ops_without_backward_raise_on_a_gradient():
    """The quantize/dequantize ops and the INT8/FP8 GEMMs have no backward. A
    gradient reaching one through a float input (a scale, or x) must raise, not
    be dropped with a warning (torch's default for an op without autograd)."""
    import pytest

    from deepseek_kernels.ops import _NO_BACKWARD

    samples = {name: (args, kwargs) for name, args, kwargs in _fake_samples()}
    samples["quantize_int8"] = ((torch.randn(300),), {})
    samples["quantize_int4"] = ((torch.randn(300),), {})
    samples["quantize_int8_rowwise"] = ((torch.randn(3, 8),), {})
    samples["quantize_fp8"] = ((torch.randn(4, 128),), {})
    assert set(_NO_BACKWARD) <= set(samples)
    for name in _NO_BACKWARD:
        args, kwargs = samples[name]
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == torch.float32
                else a for a in args]
        outs = getattr(torch.ops.deepseek_kernels, name)(*args, **kwargs)
        floats = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if o.requires_grad]
        assert floats, name
        with pytest.raises(RuntimeError, match=f"{name} is not differentiable"):
            sum(o.float().sum() for o in floats).backward()
        # No gradient needed: no error, and the wrapper skips the autograd layer.
        with torch.no_grad():
            getattr(torch.ops.deepseek_kernels, name)(*args, **kwargs)


def test_none_for_a_tensor_argument_is_named():
    """None where an op needs a Tensor arrives as an undefined tensor: the error
    names the argument (it used to say 'tensor does not have a device')."""
    import pytest

    # (Ops with one tensor argument never get there: torch's dispatcher rejects a
    # call with no tensor at all.)
    for name, args, kwargs in _fake_samples():
        op = getattr(torch.ops.deepseek_kernels, name)
        schema = op.default._schema
        for i, a in enumerate(args):
            arg = schema.arguments[i]
            if not isinstance(a, torch.Tensor) or str(arg.type) != "Tensor":  # None is valid for Tensor?
                continue
            broken = list(args)
            broken[i] = None
            with pytest.raises(TypeError, match=f"{name}: argument '{arg.name}' must be a Tensor, got None"):
                op(*broken, **kwargs)
