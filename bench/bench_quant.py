#!/usr/bin/env python
"""Benchmark the blockwise INT8/INT4 quantization kernels against their peers.

For every op it times three implementations with the same signature:

  ours      deepseek_kernels.ops.X            (the hand-written CPU/CUDA kernel)
  ref       deepseek_kernels.reference.X      (pure-PyTorch composition, eager)
  compiled  torch.compile(reference.X)        (what Inductor makes of the reference)

and reports time, speed-up, achieved bandwidth and the fraction of this
device's copy bandwidth (measured in the same run) that the kernel reaches.
These ops are memory-bound, so %copy_bw is the number that says how much is
left on the table.

Usage (from the repository root, after ``pip install --no-build-isolation -e .``):

    python bench/bench_quant.py                        # CUDA if available, else CPU
    python bench/bench_quant.py --device cpu --quick   # 1 MiB only, a minute or so
    python bench/bench_quant.py --device cpu --no-compile
    python bench/bench_quant.py --sizes 16MiB 1000003 --ops quantize_int8 dequantize_int8
    python bench/bench_quant.py --device cuda --ab     # CUDA kernels v1 vs v2, ~1 minute

Results go to ``bench/results/<device_name>.json`` (``<device_name>-ab.json`` for --ab).

--ab times our two CUDA kernel generations side by side in one process (the
private op ``_quant_cuda_kernel`` switches them between calls; the environment
variable DSK_QUANT_KERNEL=v1|v2 only sets the starting choice). Both must match
the reference bitwise; no ref/compiled peers, so it stays short.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for `timer` when this file is imported, not run
# Last on the path: an installed deepseek_kernels wins, but an in-place build
# (`python setup.py build_ext --inplace`) in this checkout also works.
sys.path.append(str(HERE.parent))

import timer as T  # noqa: E402

MiB = 1 << 20
SEED = 1234  # the reference needs an explicit seed for stochastic rounding

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

TABLE_COLUMNS = [
    "op",
    "dtype",
    "n",
    "ours_ms",
    "ref_ms",
    "compiled_ms",
    "speedup_vs_ref",
    "speedup_vs_compiled",
    "ours_GB/s",
    "%copy_bw",
]

AB_COLUMNS = [
    "op",
    "dtype",
    "n",
    "v1_ms",
    "v2_ms",
    "v2_speedup",
    "v1_%copy_bw",
    "v2_%copy_bw",
]

ALL_OPS = [
    "quantize_int8",
    "quantize_int8_sr",
    "dequantize_int8",
    "dequantize_sum_int8",
    "quantize_int4",
    "quantize_int4_sr",
    "dequantize_int4",
    "dequantize_sum_int4",
]
SUM_WORLD_SIZES = (4, 8)  # rows W of dequantize_sum_*: typical all-reduce group sizes


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark row: an op called with fixed inputs, for all three peers."""

    label: str  # shown in the table, e.g. "dequantize_sum_int8[W=4]"
    fn_name: str  # the attribute in deepseek_kernels.ops / .reference
    dtype: str  # the floating side's dtype: input of quantize, output of dequantize
    n: int  # elements (per row for dequantize_sum_*)
    make: Callable[[], Tuple[tuple, dict]]  # builds (args, kwargs), on demand


def build_cases(
    reference, ops_wanted: Sequence[str], sizes: Sequence[int], dtypes: Sequence[str], bs: int, device
) -> List[Case]:
    """Every row to run, op by op, then dtype, then size. Inputs are made lazily,
    one case at a time, so the 256 MiB CUDA cases never hold several at once."""

    def randn(*shape, dtype=torch.float32):
        # Fresh random data, never zeros: zeros hide unwritten outputs and can
        # run faster than real data.
        return torch.randn(*shape, device=device).to(dtype)

    def quantize_case(op: str, dname: str, n: int) -> Case:
        stochastic = op.endswith("_sr")
        kwargs = dict(stochastic=True, seed=SEED) if stochastic else {}
        fn = op[: -len("_sr")] if stochastic else op
        return Case(op, fn, dname, n, lambda: ((randn(n, dtype=DTYPES[dname]), bs), kwargs))

    def dequantize_case(op: str, dname: str, n: int) -> Case:
        bits = int(op[-1])  # dequantize_int8 / dequantize_int4

        def make():
            q, s, _ = getattr(reference, f"quantize_int{bits}")(randn(n), bs)
            args = (q, s, bs) if bits == 8 else (q, s, n, bs)
            return args, dict(out_dtype=DTYPES[dname])

        return Case(op, op, dname, n, make)

    def sum_case(op: str, w: int, n: int) -> Case:
        bits = int(op[-1])  # dequantize_sum_int8 / dequantize_sum_int4

        def make():
            # W independently quantized rows, as W ranks would send them (a
            # block never straddles two rows).
            rows = [getattr(reference, f"quantize_int{bits}")(randn(n), bs) for _ in range(w)]
            q = torch.stack([r[0] for r in rows])
            s = torch.stack([r[1] for r in rows])
            return ((q, s, bs) if bits == 8 else (q, s, n, bs)), {}

        return Case(f"{op}[W={w}]", op, "fp32", n, make)

    cases: List[Case] = []
    for op in ALL_OPS:
        if op not in ops_wanted:
            continue
        if op.startswith("dequantize_sum_"):
            # Reads int codes, always writes fp32: no dtype axis.
            cases += [sum_case(op, w, n) for w in SUM_WORLD_SIZES for n in sizes]
        elif op.startswith("dequantize_"):
            cases += [dequantize_case(op, d, n) for d in dtypes for n in sizes]
        else:
            cases += [quantize_case(op, d, n) for d in dtypes for n in sizes]
    return cases


# ---------------------------------------------------------------------------
# Checking and accounting
# ---------------------------------------------------------------------------


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def bitwise_mismatch(got, want) -> Optional[str]:
    """None when every output has the same dtype, shape and bits; else why not."""
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"output {i}: {g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}"
        if not torch.equal(g, w):
            ne = (g != w).reshape(-1).nonzero()
            first = int(ne[0]) if ne.numel() else -1
            return f"output {i}: {ne.numel()} elements differ (first at flat index {first})"
    return None


def tensor_bytes(objs) -> int:
    return sum(t.numel() * t.element_size() for t in objs if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------
# torch.compile peer
# ---------------------------------------------------------------------------


def _raise_recompile_limit(limit: int = 256) -> None:
    # Each (op, shape, dtype, kwargs) is its own static-shape graph of the same
    # Python function; past the default limit (8) dynamo would silently fall
    # back to eager and the "compiled" column would be lying.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


_compiled: Dict[str, Callable] = {}


def compiled_reference(reference, fn_name: str) -> Callable:
    """torch.compile of a reference op, one wrapper per op. dynamic=False: the
    strongest version of the peer, specialized to each benchmarked shape."""
    if fn_name not in _compiled:
        _compiled[fn_name] = torch.compile(getattr(reference, fn_name), dynamic=False)
    return _compiled[fn_name]


def _short_error(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg[:200]}"


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and b > 0 else None


def _check_ours(ours_fn, args, kwargs, want) -> Tuple[Optional[str], int]:
    """Calls ours once: (None, bytes read + written) when it matches ``want``
    bitwise; else (why not, as a row status, 0)."""
    try:
        got = ours_fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - report it as a failed row, keep going
        return "ERROR: " + _short_error(e), 0
    why = bitwise_mismatch(got, want)
    if why is not None:
        return "MISMATCH: " + why, 0
    return None, tensor_bytes(args) + tensor_bytes(_as_tuple(got))  # inputs read + outputs written


def _bandwidth(nbytes: int, ms: float, copy_gbps: float) -> Tuple[float, Optional[float]]:
    """(GB/s, % of the measured copy bandwidth) of moving nbytes in ms."""
    gbps = nbytes / (ms * 1e-3) / 1e9
    return gbps, 100.0 * gbps / copy_gbps if copy_gbps > 0 else None


def run_case(case: Case, ops, reference, device, timing: dict, use_compile: bool,
             copy_gbps: float) -> dict:
    args, kwargs = case.make()
    ours_fn = getattr(ops, case.fn_name)
    ref_fn = getattr(reference, case.fn_name)

    row = dict(op=case.label, dtype=case.dtype, n=case.n, fn=case.fn_name,
               kwargs={k: (DTYPE_NAMES.get(v, str(v)) if isinstance(v, torch.dtype) else v)
                       for k, v in kwargs.items()},
               status="ok")

    # Correctness first: never time a kernel that computes something else.
    want = ref_fn(*args, **kwargs)
    failed, nbytes = _check_ours(ours_fn, args, kwargs, want)
    if failed is not None:
        row["status"] = failed
        return row
    row["bytes"] = nbytes

    t_ours = T.time_fn(lambda: ours_fn(*args, **kwargs), device, **timing)
    t_ref = T.time_fn(lambda: ref_fn(*args, **kwargs), device, **timing)

    t_comp = None
    if use_compile:
        try:
            cfn = compiled_reference(reference, case.fn_name)
            cout = cfn(*args, **kwargs)  # compiles here, outside any timing
            # Informational only: Inductor may legally reassociate and differ.
            row["compiled_bitwise_equal"] = bitwise_mismatch(cout, want) is None
            del cout
            t_comp = T.time_fn(lambda: cfn(*args, **kwargs), device, **timing)
        except Exception as e:  # noqa: BLE001 - any compile failure just means "n/a"
            row["compiled_error"] = _short_error(e)
    del want, args, kwargs

    ours_ms = t_ours["median_ms"]
    ref_ms = t_ref["median_ms"]
    comp_ms = t_comp["median_ms"] if t_comp else None
    gbps, pct_copy = _bandwidth(nbytes, ours_ms, copy_gbps)
    row.update({
        "ours_ms": ours_ms,
        "ref_ms": ref_ms,
        "compiled_ms": comp_ms,
        "speedup_vs_ref": _ratio(ref_ms, ours_ms),
        "speedup_vs_compiled": _ratio(comp_ms, ours_ms),
        "ours_GB/s": gbps,
        "%copy_bw": pct_copy,
        "timing": {"ours": t_ours, "ref": t_ref, "compiled": t_comp},
    })
    return row


def set_kernel(version: int) -> int:
    """Select our CUDA kernel generation (1 or 2) for later calls; returns the
    previous one. A registered op, so it switches within this process."""
    return int(torch.ops.deepseek_kernels._quant_cuda_kernel(version))


def run_ab_case(case: Case, ops, reference, device, timing: dict, copy_gbps: float) -> dict:
    """One row of --ab: both kernel generations checked bitwise against the
    reference, then timed back to back on the same inputs."""
    args, kwargs = case.make()
    ours_fn = getattr(ops, case.fn_name)
    want = getattr(reference, case.fn_name)(*args, **kwargs)
    row = dict(op=case.label, dtype=case.dtype, n=case.n, fn=case.fn_name, status="ok")
    nbytes = None
    for v in (1, 2):
        set_kernel(v)
        failed, nbytes = _check_ours(ours_fn, args, kwargs, want)
        if failed is not None:
            row["status"] = f"v{v} " + failed
            return row
    del want
    row["bytes"] = nbytes
    times = {}
    for v in (1, 2):
        set_kernel(v)
        times[v] = T.time_fn(lambda: ours_fn(*args, **kwargs), device, **timing)
    for v in (1, 2):
        ms = times[v]["median_ms"]
        row[f"v{v}_ms"] = ms
        row[f"v{v}_%copy_bw"] = _bandwidth(nbytes, ms, copy_gbps)[1]
    row["v2_speedup"] = _ratio(row["v1_ms"], row["v2_ms"])
    row["timing"] = {f"v{v}": times[v] for v in (1, 2)}
    return row


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_rows(cases: Sequence[Case], device, run_one: Callable[[Case], dict],
             summary: Callable[[dict], str]) -> List[dict]:
    """Runs the cases in turn (``run_one`` makes a row), printing a line each:
    ``summary(row)`` for a timed row, the status for one that was not."""
    rows = []
    for i, case in enumerate(cases, 1):
        row = run_one(case)
        _free(device)
        rows.append(row)
        head = f"[{i}/{len(cases)}] {case.label} {case.dtype} n={case.n:,}"
        if row["status"] != "ok":
            print(f"{head}: {row['status']} -- not timed", flush=True)
            continue
        print(f"{head}: {summary(row)}", flush=True)
    return rows


def save_results(path: Path, benchmark: str, run_info: dict, settings: dict,
                  columns: List[str], rows: List[dict]) -> int:
    """Writes the JSON results, then names the rows that were not timed (exit
    status 1) if any."""
    payload = {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **run_info,
        "settings": settings,
        "columns": columns,
        "rows": rows,
    }
    path = T.write_results(path, payload)
    print(f"\nwrote {path}")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print(f"\nerror: {len(bad)} case(s) failed or did not match the reference bitwise, "
              "and were not timed:", file=sys.stderr)
        for r in bad:
            print(f"  {r['op']} {r['dtype']} n={r['n']:,}: {r['status']}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_size(s: str) -> int:
    """Element count: a plain integer ('1000003'), or a size of fp32 input with a
    unit ('16MiB' -> 4,194,304 elements; KiB, MiB, GiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*(KiB|MiB|GiB)?\s*", s, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}: use e.g. 262144 or 16MiB")
    v = int(m.group(1))
    unit = (m.group(2) or "").lower()
    if unit:
        v = v * {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}[unit] // 4
    if v <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {s!r}")
    return v


def default_sizes(device: torch.device, quick: bool) -> List[int]:
    if quick:
        return [1 * MiB // 4]
    if device.type == "cuda":
        return [256 * MiB // 4, 16 * MiB // 4, 1 * MiB // 4]
    return [16 * MiB // 4, 1 * MiB // 4]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time deepseek_kernels quantization ops against the PyTorch reference "
                    "and torch.compile of it.")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="element counts, or fp32 input sizes like 16MiB "
                        "(default: CUDA 256MiB 16MiB 1MiB; CPU 16MiB 1MiB)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtype of the floating side (default: CUDA fp32 bf16; CPU fp32)")
    p.add_argument("--ops", nargs="+", choices=ALL_OPS, default=ALL_OPS,
                   help="ops to run ('_sr' = stochastic rounding)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="1 MiB only")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile peer (its compiles are slow on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    p.add_argument("--ab", action="store_true",
                   help="CUDA only: time our kernel generations v1 and v2 side by side "
                        "(default sizes 256MiB 16MiB; no ref/compiled peers)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    try:
        import deepseek_kernels
        from deepseek_kernels import ops, reference
    except ImportError as e:
        print(f"error: cannot import deepseek_kernels: {e}", file=sys.stderr)
        return 2

    if args.ab and device.type != "cuda":
        print("error: --ab compares CUDA kernels: use --device cuda", file=sys.stderr)
        return 2
    if args.ab and not hasattr(torch.ops.deepseek_kernels, "_quant_cuda_kernel"):
        print("error: --ab needs a build with the _quant_cuda_kernel op (rebuild)", file=sys.stderr)
        return 2

    if args.ab and not args.sizes and not args.quick:
        sizes = [256 * MiB // 4, 16 * MiB // 4]
    else:
        sizes = args.sizes or default_sizes(device, args.quick)
    dtypes = args.dtypes or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    timing = {}
    if args.reps is not None:
        timing["reps"] = args.reps
    if args.warmup is not None:
        timing["warmup"] = args.warmup
    use_compile = not args.no_compile and not args.ab
    if use_compile:
        _raise_recompile_limit()

    # Other processes (a compiler, another benchmark) make CPU timings meaningless
    # on a small machine: say so up front rather than publish noise silently.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ncpu = os.cpu_count() or 1
    if load is not None and load > 0.5 * ncpu:
        print(f"warning: load average {load:.2f} on {ncpu} CPUs: the machine is busy, "
              "timings (CPU ones above all) will be noisy", file=sys.stderr)

    torch.manual_seed(0)
    info = T.device_info(device)
    build = deepseek_kernels.build_info()
    print(f"device      : {info['name']} ({info['model']})")
    print(f"torch       : {torch.__version__}  (CUDA {torch.version.cuda})")
    print(f"build_info  : {build}")

    # The ceilings, measured now on this device, so %copy_bw is relative to what
    # this machine really does today, not a datasheet.
    copy_gbps = T.measure_copy_bandwidth(device)
    matmul_tflops = T.measure_matmul_tflops(device)
    mm = "bf16 8192^3" if device.type == "cuda" else "fp32 2048^3"
    print(f"copy bw     : {copy_gbps:,.1f} GB/s  (dst.copy_(src), 256 MiB, read + write)")
    print(f"matmul peak : {matmul_tflops:,.2f} TFLOP/s  ({mm})")
    print(flush=True)
    _free(device)

    cases = build_cases(reference, args.ops, sizes, dtypes, args.block_size, device)
    # What every results file starts with, after its name and time.
    run_info = {
        "device": info,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "build_info": build,
        "load_avg_1min_at_start": load,
        "peaks": {"copy_GBps": copy_gbps, "matmul_TFLOPs": matmul_tflops, "matmul": mm},
    }
    if args.ab:
        return main_ab(args, cases, ops, reference, device, timing, copy_gbps, run_info, sizes,
                       dtypes)

    def summary(row: dict) -> str:
        comp = (f"{row['compiled_ms']:.4f} ms" if row["compiled_ms"] is not None
                else "n/a" + (f" ({row['compiled_error']})" if "compiled_error" in row else ""))
        return f"ours {row['ours_ms']:.4f} ms, ref {row['ref_ms']:.4f} ms, compiled {comp}"

    rows = run_rows(cases, device, lambda case: run_case(case, ops, reference, device, timing,
                                                         use_compile, copy_gbps), summary)

    print()
    T.print_table(rows, TABLE_COLUMNS)

    differs = [r for r in rows if r.get("compiled_bitwise_equal") is False]
    if differs:
        # Not an error: Inductor may contract a*b+c into an FMA or reassociate,
        # so the compiled peer need not be bitwise equal to the eager reference.
        print("\nnote: torch.compile(reference) is not bitwise equal to the eager reference "
              "for: " + ", ".join(f"{r['op']} {r['dtype']} n={r['n']:,}" for r in differs))

    settings = {
        "sizes": sizes, "dtypes": dtypes, "ops": args.ops, "block_size": args.block_size,
        "quick": args.quick, "compile": use_compile, "timing_overrides": timing,
        "stochastic_seed": SEED,
    }
    return save_results(Path(args.out) / f"{info['name']}.json", "quant", run_info, settings,
                        TABLE_COLUMNS, rows)


def main_ab(args, cases, ops, reference, device, timing, copy_gbps, run_info, sizes,
            dtypes) -> int:
    """--ab: v1 vs v2 of our CUDA kernels, row by row; leaves the starting choice set."""
    start = set_kernel(0)
    try:
        rows = run_rows(cases, device,
                        lambda case: run_ab_case(case, ops, reference, device, timing, copy_gbps),
                        lambda row: (f"v1 {row['v1_ms']:.4f} ms, v2 {row['v2_ms']:.4f} ms "
                                     f"(x{row['v2_speedup']:.3f})"))
    finally:
        set_kernel(start)

    print()
    T.print_table(rows, AB_COLUMNS)
    settings = {
        "sizes": sizes, "dtypes": dtypes, "ops": args.ops, "block_size": args.block_size,
        "timing_overrides": timing, "stochastic_seed": SEED,
    }
    path = Path(args.out) / f"{run_info['device']['name']}-ab.json"
    return save_results(path, "quant-ab", run_info, settings, AB_COLUMNS, rows)


if __name__ == "__main__":
    sys.exit(main())
