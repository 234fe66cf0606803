"""Shared timing helpers for the benchmarks in bench/.

Everything here reports the *median* of many runs (robust to the odd slow run)
plus min/p20/p80 so the spread is visible next to the headline number.

CUDA timing uses CUDA events around each call and flushes the L2 cache between
runs (outside the timed region), so every run reads its inputs from device
memory the way a real, cold call would. CPU timing uses ``time.perf_counter``;
CPU caches are not flushed, so inputs that fit in the cache (e.g. 1 MiB) are
timed cache-resident.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Sequence

import torch

__all__ = [
    "time_cuda",
    "time_cpu",
    "time_host_cuda",
    "time_fn",
    "measure_copy_bandwidth",
    "measure_matmul_tflops",
    "device_name",
    "device_info",
    "print_table",
    "format_table",
    "write_results",
]

MiB = 1 << 20
_FALLBACK_L2_BYTES = 256 * MiB  # when the driver does not report an L2 size


# ---------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarize(times_ms: List[float]) -> Dict[str, float]:
    s = sorted(times_ms)
    return {
        "median_ms": statistics.median(s),
        "min_ms": s[0],
        "p20": _percentile(s, 20),
        "p80": _percentile(s, 80),
        "reps": len(s),
    }


# One flush buffer per device, allocated on first use: reallocating ~100 MiB
# for every timed op would only add noise and allocator churn.
_flush_buffers: Dict[int, torch.Tensor] = {}


def _l2_flush_buffer(dev: int) -> torch.Tensor:
    buf = _flush_buffers.get(dev)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0
        nbytes = 2 * l2 if l2 > 0 else _FALLBACK_L2_BYTES
        buf = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", dev))
        _flush_buffers[dev] = buf
    return buf


def time_cuda(
    fn: Callable[[], object], *, warmup: int = 10, reps: int = 50, flush_l2: bool = True
) -> Dict[str, float]:
    """Time ``fn()`` on the current CUDA device with CUDA events.

    ``warmup`` untimed calls first (module load, allocator growth, autotuning,
    torch.compile). Before each timed call, when ``flush_l2`` is set, a buffer of
    twice the L2 size is overwritten so the call starts with a cold cache; the
    start event is recorded *after* that write, on the same stream, so the flush
    is never part of the measured time.
    """
    dev = torch.cuda.current_device()
    flush = _l2_flush_buffer(dev) if flush_l2 else None

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    # One sync at the end: syncing per rep would add host gaps but not change
    # what the events measure.
    torch.cuda.synchronize()
    return _summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cuda_graph(
    fn: Callable[[], object], *, warmup: int = 3, reps: int = 50, flush_l2: bool = True
) -> Dict[str, float]:
    """Time replays of a CUDA graph holding one ``fn()`` call: the device time
    without the host's per-call launch overhead, which is what a model running
    under CUDA graphs (or on a stream kept busy ahead of the host) pays. Raises
    whatever capture raises when ``fn`` cannot be captured (e.g. a host sync)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch recommends
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, warmup=warmup, reps=reps, flush_l2=flush_l2)


def time_host_cuda(fn: Callable[[], object], *, warmup: int = 10, reps: int = 200,
                   sync_every: int = 10) -> Dict[str, float]:
    """Host time of one ``fn()`` call on CUDA: what it costs the CPU to enqueue
    its work (Python, dispatch, argument checks, allocations, launches), without
    waiting for the device. Where it exceeds the device time, eager calls run at
    the host's pace, whatever the kernels do. The device is synchronized every
    ``sync_every`` calls (untimed), so the launch queue never fills."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times_ms: List[float] = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return _summarize(times_ms)


def time_cpu(
    fn: Callable[[], object], *, warmup: int = 3, reps: int = 20, min_time_s: float = 0.2
) -> Dict[str, float]:
    """Time ``fn()`` on the CPU with ``time.perf_counter``.

    Runs at least ``reps`` timed calls, and keeps going until ``min_time_s`` of
    timed calls have accumulated, so fast functions get more samples (capped so
    a sub-microsecond function cannot loop forever).
    """
    for _ in range(warmup):
        fn()
    times_ms: List[float] = []
    total = 0.0
    max_reps = max(reps, 10_000)
    while len(times_ms) < reps or (total < min_time_s and len(times_ms) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        total += dt
        times_ms.append(dt * 1e3)
    return _summarize(times_ms)


def time_fn(fn: Callable[[], object], device, **kw) -> Dict[str, float]:
    """Dispatch to :func:`time_cuda` or :func:`time_cpu` by ``device``.

    Keyword arguments are passed through; ``flush_l2`` is dropped for the CPU
    and ``min_time_s`` for CUDA, so callers can pass one set of options.
    """
    device = torch.device(device)
    if device.type == "cuda":
        kw.pop("min_time_s", None)
        with torch.cuda.device(device):
            return time_cuda(fn, **kw)
    if device.type == "cpu":
        kw.pop("flush_l2", None)
        return time_cpu(fn, **kw)
    raise ValueError(f"unsupported device {device}")


# ---------------------------------------------------------------------------
# Machine ceilings, measured in the same run as the benchmark
# ---------------------------------------------------------------------------


def measure_copy_bandwidth(device, nbytes: int = 256 * MiB) -> float:
    """Device-memory bandwidth in GB/s of ``dst.copy_(src)``, counting the bytes
    read *and* the bytes written (2 * nbytes per copy).

    256 MiB is far larger than any L2/L3, so this is the DRAM/HBM ceiling that
    memory-bound kernels are compared against.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, dtype=torch.float32, device=device)  # real data, not zeros
    dst = torch.empty_like(src)
    if device.type == "cuda":
        # The buffers dwarf the L2 already; skipping the flush saves time.
        t = time_fn(lambda: dst.copy_(src), device, warmup=5, reps=30, flush_l2=False)
    else:
        t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10, min_time_s=0.5)
    moved = 2 * n * 4
    del src, dst
    return moved / (t["median_ms"] * 1e-3) / 1e9


def measure_matmul_tflops(device) -> float:
    """Dense matmul rate in TFLOP/s on random data: bf16 8192^3 on CUDA (the
    tensor-core peak in practice), fp32 2048^3 on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        m, dtype = 8192, torch.bfloat16
        kw = dict(warmup=5, reps=20, flush_l2=False)
    else:
        m, dtype = 2048, torch.float32
        kw = dict(warmup=1, reps=5, min_time_s=0.5)
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    t = time_fn(lambda: torch.mm(a, b), device, **kw)
    del a, b
    return 2.0 * m**3 / (t["median_ms"] * 1e-3) / 1e12


# ---------------------------------------------------------------------------
# Device description
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    """CPU model string from /proc/cpuinfo (Linux), else from platform."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _shorten_cpu_model(model: str) -> str:
    # Drop vendor boilerplate and the clock ("Intel(R) Xeon(R) Platinum 8480+ CPU
    # @ 2.00GHz" -> "Intel Xeon Platinum 8480+"), which would only lengthen names.
    s = re.sub(r"\((R|TM|r|tm)\)", "", model)
    s = re.sub(r"@.*$", "", s)
    s = re.sub(r"\b(CPU|Processor|\d+-Core)\b", "", s, flags=re.IGNORECASE)
    return " ".join(s.split())


def _slug(s: str) -> str:
    """Lowercase, every run of non-alphanumerics -> a single '-'."""
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def device_name(device) -> str:
    """A filename-safe device name: ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _slug("cuda-" + torch.cuda.get_device_name(idx))
    if device.type == "cpu":
        return _slug("cpu-" + _shorten_cpu_model(_cpu_model()))
    return _slug(str(device))


def device_info(device) -> dict:
    """What is worth recording next to the numbers about the device."""
    device = torch.device(device)
    info = {"type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(
            model=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            total_memory_bytes=p.total_memory,
            l2_cache_bytes=getattr(p, "L2_cache_size", None),
            cuda_runtime=torch.version.cuda,
        )
    else:
        info.update(
            model=_cpu_model(),
            machine=platform.machine(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
        )
    return info


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        a = abs(v)
        if a == 0 or 0.01 <= a < 1e5:
            return f"{v:.3f}" if a < 100 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table of ``rows`` (dicts) restricted to ``columns``.

    Numbers are right-aligned, text left-aligned; missing or NaN values show as
    ``n/a``; ints get thousands separators so element counts are readable.
    """
    rows = list(rows)

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    # A column holding no text is numeric: right-aligned, header and n/a too.
    numeric = [not any(isinstance(r.get(c), str) for r in rows) for c in columns]
    cells = [
        [f"{r.get(c):,}" if isinstance(r.get(c), int) and is_num(r.get(c)) else _fmt(r.get(c))
         for c in columns]
        for r in rows
    ]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def join(line):
        return "  ".join(
            s.rjust(w) if num else s.ljust(w) for s, w, num in zip(line, widths, numeric)
        ).rstrip()

    out = [join(columns), "  ".join("-" * w for w in widths)]
    out += [join(line) for line in cells]
    return "\n".join(out)


def print_table(rows: Iterable[dict], columns: Sequence[str]) -> None:
    print(format_table(rows, columns), flush=True)


def _json_safe(obj):
    """NaN/Inf -> None (strict JSON has no NaN); tensors, dtypes, devices -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _json_safe(obj.item())
    return str(obj)


def write_results(path, payload: dict) -> str:
    """Write ``payload`` as indented JSON to ``path``, creating the folder.

    Written to a temporary file and renamed, so an interrupted run never leaves
    a truncated results file behind. Returns the path written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(payload), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

