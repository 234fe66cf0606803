#!/usr/bin/env python
"""Benchmark MoE routing (gating, capacity dispatch, combine) against its peers.

Four implementations of the same capacity-mode step (drop_policy "position"):

  ours        deepseek_kernels.moe_topk_gating / moe_dispatch / moe_combine
  ref         deepseek_kernels.reference (the exact, bitwise reference, eager)
  deepspeed   a DeepSpeed-style composition written here: softmax, (group mask),
              topk, one-hot cumsum for positions, dense [T, E, C] dispatch mask and
              combine weights, einsum dispatch/combine
  ds_compiled torch.compile of the DeepSpeed-style composition (--compile; default
              on CUDA only, Inductor compiles take minutes on a small CPU)

Every implementation is checked against ours before it is timed (ours bitwise
against the reference; the DeepSpeed-style one to fp tolerance: its einsum sums
in another order). On CUDA, ours and the compiled peer are also timed replayed
from a CUDA graph (``*_graph_ms``): the device time without per-call host
launch overhead, which a model under CUDA graphs or a busy stream pays; and
``ours_host_us`` is what one eager call of ours costs the host (Python, checks,
allocations, launches): ``ours_ms`` is host-bound where it exceeds the device time.

    python bench/bench_moe.py                 # CUDA if available (H100 config), else CPU config
    python bench/bench_moe.py --device cpu    # T=4096 E=64 k=6 H=1024 fp32
    python bench/bench_moe.py --device cuda   # T=8192 E=256 k=8 groups 8/4 H=7168 bf16
    python bench/bench_moe.py --profile       # + per-kernel device times of our stages

Results go to ``bench/results/moe-<device_name>.json`` (``--profile`` adds a
``profile`` entry: per stage, each kernel's calls and microseconds per call).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# OpenMP threads that sleep between calls take a scheduler tick (several ms on
# some VMs) to wake up, which swamps sub-millisecond CPU timings of every
# parallel op, ours and torch's alike: keep them spinning (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
# Fresh multi-100-MB outputs (the [E, C, H] dispatch buffer, the peers' dense
# [T, E, C] masks) cost more in first-touch page faults than in writes with 4 KiB
# pages: let torch's CPU allocator ask for transparent huge pages (every
# implementation benefits alike).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))

import timer as T  # noqa: E402

CONFIGS = {
    "cpu": dict(tokens=4096, experts=64, k=6, hidden=1024, n_group=1, topk_group=1, dtype="fp32"),
    "cuda": dict(tokens=8192, experts=256, k=8, hidden=7168, n_group=8, topk_group=4, dtype="bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["stage", "ours_ms", "ref_ms", "deepspeed_ms", "ds_compiled_ms", "x_vs_ref",
           "x_vs_deepspeed", "x_vs_ds_compiled", "ours_GB/s", "%copy_bw", "ours_graph_ms",
           "ds_compiled_graph_ms", "x_vs_ds_compiled_graph", "ours_host_us"]


# ---------------------------------------------------------------------------
# The DeepSpeed-style composition (dense one-hot masks and einsums)
# ---------------------------------------------------------------------------


def ds_gate(logits, k, capacity, n_group, topk_group):
    """-> (combine_weights [T, E, C] fp32, dispatch_mask [T, E, C] bool)."""
    t, e = logits.shape
    p = torch.softmax(logits.float(), dim=-1)
    sel = p
    if n_group > 1 and topk_group < n_group:
        g = p.view(t, n_group, e // n_group)
        gscore = g.topk(2, dim=-1).values.sum(-1)
        gidx = gscore.topk(topk_group, dim=-1).indices
        gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1.0)
        sel = p.masked_fill(gmask.repeat_interleave(e // n_group, dim=1) == 0, float("-inf"))
    w, idx = sel.topk(k, dim=-1)
    w = p.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    mask = torch.nn.functional.one_hot(idx, e).reshape(t * k, e)       # token order
    loc = (torch.cumsum(mask, dim=0) - 1).reshape(t, k, e)
    loc = (loc * mask.view(t, k, e)).sum(-1)                            # [T, k]
    keep = loc < capacity
    w = w * keep
    loc_oh = torch.nn.functional.one_hot(loc.clamp(max=capacity - 1), capacity).to(w.dtype)  # [T, k, C]
    e_oh = torch.nn.functional.one_hot(idx, e).to(w.dtype)                                  # [T, k, E]
    combine = torch.einsum("tk,tke,tkc->tec", w, e_oh, loc_oh * keep[..., None])
    return combine, combine > 0


def ds_dispatch(x, dispatch_mask):
    return torch.einsum("tec,th->ech", dispatch_mask.to(x.dtype), x)


def ds_combine(expert_out, combine_weights):
    return torch.einsum("tec,ech->th", combine_weights.to(expert_out.dtype), expert_out)


def ds_step(logits, x, expert_out, k, capacity, n_group, topk_group):
    cw, dm = ds_gate(logits, k, capacity, n_group, topk_group)
    return ds_dispatch(x, dm), ds_combine(expert_out, cw)


# ---------------------------------------------------------------------------


def profile_stages(stages, device, reps: int = 20):
    """Per-kernel time of each stage with torch.profiler: {stage: [(name, calls per
    stage call, us per stage call)]}, largest first. CUDA: device kernels (and
    memsets/copies), warm L2 (no flush between calls); CPU: ops' self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    result = {}
    for stage, fn in stages.items():
        for _ in range(3):
            fn()
        sync()
        with profile(activities=acts) as prof:
            for _ in range(reps):
                fn()
            sync()
        rows = []
        for ev in prof.key_averages():
            if cuda:
                if not str(getattr(ev, "device_type", "")).endswith("CUDA"):
                    continue
                us = getattr(ev, "self_device_time_total", None)
                if us is None:
                    us = getattr(ev, "self_cuda_time_total", 0.0)
            else:
                us = ev.self_cpu_time_total
            if us > 0:
                rows.append((ev.key, ev.count / reps, us / reps))
        rows.sort(key=lambda r: -r[2])
        result[stage] = rows
        if not rows:  # an unexpected profiler layout: show its own table instead
            print(prof.key_averages().table(row_limit=15))
        total = sum(r[2] for r in rows)
        print(f"\nprofile {stage}: {total:.1f} us per call "
              f"({'device kernels' if cuda else 'CPU ops, self time'}, {reps} calls)")
        for name, calls, us in rows[:12]:
            print(f"  {us:9.1f} us  {calls:5.1f}x  {name[:100]}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--n-group", type=int)
    ap.add_argument("--topk-group", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--compile", dest="compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-ref", action="store_true", help="skip the (slow) eager reference")
    ap.add_argument("--profile", action="store_true",
                    help="print per-kernel times of our stages (torch.profiler)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import deepseek_kernels as dk
    from deepseek_kernels import reference as ref

    device = torch.device(args.device)
    cfg = dict(CONFIGS[device.type])
    for key in ("tokens", "experts", "k", "hidden", "n_group", "topk_group", "dtype"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    t, e, k, h = cfg["tokens"], cfg["experts"], cfg["k"], cfg["hidden"]
    ng, tg = cfg["n_group"], cfg["topk_group"]
    dtype = DTYPES[cfg["dtype"]]
    cap = int(math.ceil(args.capacity_factor * t * k / e))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f}: timings will be noisy", file=sys.stderr)
    info = T.device_info(device)
    print(f"device : {info['name']} ({info['model']}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"config : T={t} E={e} k={k} H={h} n_group={ng} topk_group={tg} {cfg['dtype']} "
          f"capacity={cap} (factor {args.capacity_factor})")
    copy_gbps = T.measure_copy_bandwidth(device)
    print(f"copy bw: {copy_gbps:,.1f} GB/s", flush=True)

    torch.manual_seed(0)
    logits = torch.randn(t, e, device=device).to(dtype)
    x = torch.randn(t, h, device=device).to(dtype)
    expert_out = torch.randn(e, cap, h, device=device).to(dtype)
    gkw = dict(n_group=ng, topk_group=tg, capacity=cap)

    # --- correctness before timing ---
    g = dk.moe_topk_gating(logits, k, **gkw)
    d = dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap)
    y = dk.moe_combine(expert_out, g.expert_ids, g.slots, g.weights)
    checks = {}
    if not args.no_ref:
        gr = ref.moe_topk_gating(logits, k, **gkw)
        checks["ref_gating_bitwise"] = all(torch.equal(a, b) for a, b in zip(g, gr))
        checks["ref_dispatch_bitwise"] = torch.equal(d, ref.moe_dispatch(x, gr[1], gr[2], e, cap))
        checks["ref_combine_bitwise"] = torch.equal(y, ref.moe_combine(expert_out, gr[1], gr[2], gr[0]))
    dd, dy = ds_step(logits, x, expert_out, k, cap, ng, tg)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    checks["deepspeed_dispatch_close"] = bool(torch.allclose(dd.float(), d.float(), **tol))
    checks["deepspeed_combine_close"] = bool(torch.allclose(dy.float(), y.float(), **tol))
    print("checks :", checks, flush=True)
    del dd, dy

    ours = {
        "gating": lambda: dk.moe_topk_gating(logits, k, **gkw),
        "dispatch": lambda: dk.moe_dispatch(x, g.expert_ids, g.slots, e, cap),
        "combine": lambda: dk.moe_combine(expert_out, g.expert_ids, g.slots, g.weights),
    }

    def ours_total():
        gg = dk.moe_topk_gating(logits, k, **gkw)
        return (dk.moe_dispatch(x, gg.expert_ids, gg.slots, e, cap),
                dk.moe_combine(expert_out, gg.expert_ids, gg.slots, gg.weights))

    ours["gating+dispatch+combine"] = ours_total

    refs = {}
    if not args.no_ref:
        gr = ref.moe_topk_gating(logits, k, **gkw)

        def ref_total():
            r = ref.moe_topk_gating(logits, k, **gkw)
            return (ref.moe_dispatch(x, r[1], r[2], e, cap), ref.moe_combine(expert_out, r[1], r[2], r[0]))

        refs = {
            "gating": lambda: ref.moe_topk_gating(logits, k, **gkw),
            "dispatch": lambda: ref.moe_dispatch(x, gr[1], gr[2], e, cap),
            "combine": lambda: ref.moe_combine(expert_out, gr[1], gr[2], gr[0]),
            "gating+dispatch+combine": ref_total,
        }
    cw, dm = ds_gate(logits, k, cap, ng, tg)
    dss = {
        "gating": lambda: ds_gate(logits, k, cap, ng, tg),
        "dispatch": lambda: ds_dispatch(x, dm),
        "combine": lambda: ds_combine(expert_out, cw),
        "gating+dispatch+combine": lambda: ds_step(logits, x, expert_out, k, cap, ng, tg),
    }
    comp = {}
    if use_compile:
        cg = torch.compile(ds_gate, dynamic=False)
        cd = torch.compile(ds_dispatch, dynamic=False)
        cc = torch.compile(ds_combine, dynamic=False)
        cs = torch.compile(ds_step, dynamic=False)
        comp = {
            "gating": lambda: cg(logits, k, cap, ng, tg),
            "dispatch": lambda: cd(x, dm),
            "combine": lambda: cc(expert_out, cw),
            "gating+dispatch+combine": lambda: cs(logits, x, expert_out, k, cap, ng, tg),
        }

    elt = x.element_size()
    kept = int(g.expert_counts.sum())
    # The bytes a stage must move (each input row read once, each output row
    # written once): a kernel that re-reads rows is charged for its extra traffic.
    moved = {
        "dispatch": (t * h + e * cap * h) * elt + t * k * 8,       # x + the whole buffer + ids/slots
        "combine": (kept * h + t * h) * elt + t * k * 12,          # kept rows + output + ids/slots/weights
    }
    timing = dict(warmup=3, reps=10) if device.type == "cpu" else {}
    # The peers take seconds per call on a small CPU: fewer repetitions there.
    peer_timing = dict(warmup=1, reps=3, min_time_s=0.0) if device.type == "cpu" else {}
    rows = []
    for stage in ours:
        row = {"stage": stage}
        row["ours_ms"] = T.time_fn(ours[stage], device, **timing)["median_ms"]
        if stage in refs:
            row["ref_ms"] = T.time_fn(refs[stage], device, **peer_timing)["median_ms"]
        row["deepspeed_ms"] = T.time_fn(dss[stage], device, **peer_timing)["median_ms"]
        if stage in comp:
            row["ds_compiled_ms"] = T.time_fn(comp[stage], device, **peer_timing)["median_ms"]
        for name, col in (("ref_ms", "x_vs_ref"), ("deepspeed_ms", "x_vs_deepspeed"),
                          ("ds_compiled_ms", "x_vs_ds_compiled")):
            if row.get(name):
                row[col] = row[name] / row["ours_ms"]
        if stage in moved:
            gbps = moved[stage] / (row["ours_ms"] * 1e-3) / 1e9
            row["ours_GB/s"] = gbps
            row["%copy_bw"] = 100.0 * gbps / copy_gbps
        if device.type == "cuda":
            # The same calls replayed from a CUDA graph: device time without the
            # host's launch overhead (ours and the compiled peer alike).
            for name, fn in (("ours_graph_ms", ours[stage]), ("ds_compiled_graph_ms", comp.get(stage))):
                if fn is None:
                    continue
                try:
                    row[name] = T.time_cuda_graph(fn)["median_ms"]
                except Exception as exc:  # not capturable: reported, not fatal
                    print(f"note   : {stage}: {name[:-3]} not capturable ({type(exc).__name__}: {exc})")
            if row.get("ours_graph_ms") and row.get("ds_compiled_graph_ms"):
                row["x_vs_ds_compiled_graph"] = row["ds_compiled_graph_ms"] / row["ours_graph_ms"]
            # What one eager call costs the host (ours_ms is host-bound where this is larger).
            row["ours_host_us"] = 1e3 * T.time_host_cuda(ours[stage])["median_ms"]
        rows.append(row)
        print(f"  {stage}: ours {row['ours_ms']:.3f} ms", flush=True)
    print()
    T.print_table(rows, COLUMNS)
    extra = {}
    if args.profile:
        extra["profile"] = {stage: [dict(kernel=n, calls=c, us=u) for n, c, u in prof_rows]
                            for stage, prof_rows in profile_stages(ours, device).items()}
    path = T.write_results(Path(args.out) / f"moe-{info['name']}.json", dict(
        device=info, config=dict(cfg, capacity=cap, capacity_factor=args.capacity_factor),
        copy_gbps=copy_gbps, checks=checks, rows=rows, torch=torch.__version__,
        build=dk.build_info(), **extra))
    print(f"\nwrote {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
