#!/usr/bin/env python
"""Benchmark compressed gradient all-reduce on CPU/gloo against its peers.

Spawns ``--world`` processes (gloo over 127.0.0.1) that average one flat fp32
gradient of ``--size`` bytes with each method, in one run:

  fp32 all_reduce        dist.all_reduce, then divide by W (DDP's default hook)
  bf16 compress          cast to bf16, all_reduce, cast back (torch's bf16_compress_hook)
  ours int8 / int4       deepseek_kernels.distributed.compressed_all_reduce_
  torch pertensor hook   the algorithm of torch's quantization_pertensor_hook (per-tensor
                         uint8, all_gather based), run step for step with blocking
                         all_gathers: the hook itself fails on gloo in torch 2.14
  ours int8, 1 rank      the same call on a one-rank group: the compute alone

For each: median / p20 / p80 time on rank 0 (collectives keep the ranks in
step; every rank runs exactly the same number of repetitions), the bytes one
rank puts on the wire (bandwidth-optimal count, see docs/distributed.md), that
as a fraction of the fp32 all-reduce's, the algorithm bandwidth (fp32 bytes of
the gradient / time) and the relative RMS error of the result against the exact
mean (computed in fp64). ``est_ms_10GbE`` is a model, not a measurement: the
measured time plus the wire bytes at 10 Gb/s, for a feel of where compression
starts to pay (loopback TCP between two processes is about as fast as memory).

Usage (from the repository root, after building the extension):

    python bench/bench_comm.py                   # 64 MiB, 2 ranks
    python bench/bench_comm.py --quick           # 4 MiB
    python bench/bench_comm.py --size 16MiB --world 4 --reps 20

Results go to ``bench/results/comm-<device>.json``.
"""

import argparse
import datetime
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for `timer`
sys.path.append(str(HERE.parent))  # an in-place build of deepseek_kernels in this checkout

import timer as T  # noqa: E402

MiB = 1 << 20
COLUMNS = ["method", "wire_MiB", "vs_fp32", "median_ms", "p20", "p80", "algbw_GBps", "rel_rms_err",
           "est_ms_10GbE"]
LINK_10GBE = 10e9 / 8  # bytes/s: the estimate column adds wire bytes at this rate


def _parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|B)?", s.strip(), flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like 64MiB, 4MiB or 1000000B, got {s!r}")
    mult = {"b": 1, "kib": 1 << 10, "mib": MiB, "gib": 1 << 30, None: 1}[(m.group(2) or "b").lower()]
    return int(float(m.group(1)) * mult)


def _torch_pertensor(t, world, rank):
    """torch's quantization_pertensor_hook, step for step, with blocking all_gathers.

    The hook itself (torch 2.14) cannot run on gloo: it reads the all_gather future
    as ``fut.wait()[0][rank][0]`` (NCCL's nested list), while gloo's future holds
    the flat list of gathered tensors, so it fails with "invalid index of a 0-dim
    tensor". Same observer, same quantize/dequantize helpers, same collectives.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import quantization_hooks as qh

    obs = torch.ao.quantization.MinMaxObserver().to(t.device)
    obs(t)
    s, z = obs.calculate_qparams()
    s_and_z = torch.FloatTensor([s, z]).to(t.device)
    all_s_and_z = [torch.zeros_like(s_and_z) for _ in range(world)]
    dist.all_gather(all_s_and_z, s_and_z)
    q = qh._quantize_per_tensor_backend(t, all_s_and_z[rank][0], all_s_and_z[rank][1])
    all_q = [torch.zeros_like(q) for _ in range(world)]
    dist.all_gather(all_q, q)
    acc = torch.zeros_like(all_q[0], dtype=torch.float32)
    for r, qr in enumerate(all_q):
        acc += qh._dequantize_per_tensor_backend(qr, all_s_and_z[r][0], all_s_and_z[r][1])
    return t.copy_(acc / world)


def _methods(world, rank, n, block_size, single_group):
    from deepseek_kernels.distributed import compressed_all_reduce_

    ring = lambda elem: 2 * (world - 1) * elem * n // world  # noqa: E731

    def fp32(t):
        dist.all_reduce(t)
        return t.div_(world)

    def bf16(t):
        c = t.to(torch.bfloat16).div_(world)
        dist.all_reduce(c)
        return t.copy_(c)

    def ours(bits, group=None):
        def f(t):
            compressed_all_reduce_(t, bits=bits, block_size=block_size, group=group)
            return t
        return f

    def torch_pertensor(t):
        return _torch_pertensor(t, world, rank)

    # (name, fn(t) -> averaged t, bytes this rank sends)
    return [
        ("fp32 all_reduce", fp32, ring(4)),
        ("bf16 compress", bf16, ring(2)),
        ("ours int8", ours(8), None),
        ("ours int4", ours(4), None),
        ("torch pertensor hook algorithm (uint8)", torch_pertensor, (world - 1) * (n + 8)),
        ("ours int8, 1 rank (compute only)", ours(8, single_group), 0),
    ]


def _worker(rank, world, port, args, out_path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # one one-rank group per rank (new_group must be called by every rank)
    singles = [dist.new_group([r]) for r in range(world)]
    from deepseek_kernels.distributed import compressed_all_reduce_

    n = args.size // 4
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(n, generator=g) * (1 + rank)  # a different "gradient" per rank
    exact = x.double()
    dist.all_reduce(exact)
    exact /= world
    exact_norm = exact.norm().item()

    rows = []
    for name, fn, nbytes in _methods(world, rank, n, args.block_size, singles[rank]):
        if "1 rank" in name:
            err = float("nan")
            ref_exact = x.double()  # the one-rank "mean" is x itself
            y = fn(x.clone())
            err = ((y.double() - ref_exact).norm() / ref_exact.norm()).item()
        else:
            y = fn(x.clone())
            err = ((y.double() - exact).norm() / exact_norm).item()
        if nbytes is None:  # ours: from the call's own accounting
            bits = 8 if "int8" in name else 4
            nbytes = compressed_all_reduce_(x.clone(), bits=bits, block_size=args.block_size).bytes_sent
        t = x.clone()
        dist.barrier()
        # min_time_s=0: exactly `reps` runs on every rank, or the collectives would not pair up
        timing = T.time_cpu(lambda: fn(t), warmup=args.warmup, reps=args.reps, min_time_s=0.0)
        fp32_bytes = 2 * (world - 1) * 4 * n // world
        rows.append({
            "method": name,
            "n": n,
            "wire_bytes": nbytes,
            "wire_MiB": nbytes / MiB,
            "vs_fp32": nbytes / fp32_bytes if fp32_bytes else float("nan"),
            "median_ms": timing["median_ms"],
            "p20": timing["p20"],
            "p80": timing["p80"],
            "min_ms": timing["min_ms"],
            "reps": timing["reps"],
            "algbw_GBps": 4 * n / (timing["median_ms"] * 1e-3) / 1e9,
            "rel_rms_err": err,
            # a model, not a measurement: measured time plus the wire bytes at 10 Gb/s
            "est_ms_10GbE": timing["median_ms"] + nbytes / LINK_10GBE * 1e3,
        })
        if rank == 0:
            print(f"  {name}: {timing['median_ms']:.2f} ms", flush=True)
    if rank == 0:
        torch.save(rows, out_path)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=_parse_size, default=64 * MiB, help="gradient size in bytes of fp32 (default 64MiB)")
    p.add_argument("--quick", action="store_true", help="4 MiB, fewer repetitions")
    p.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 10, quick 20)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="results JSON (default bench/results/comm-<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.size = 4 * MiB
    if args.reps is None:
        args.reps = 20 if args.size <= 8 * MiB else 10
    if args.size < 4 or args.world < 1:
        p.error("--size must be at least 4 bytes and --world at least 1")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"{args.world} ranks, gloo on 127.0.0.1, {args.size / MiB:g} MiB of fp32 gradient "
          f"({args.size // 4:,} elements), block_size {args.block_size}, {args.reps} reps", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        mp.start_processes(_worker, args=(args.world, port, args, out_path), nprocs=args.world,
                           start_method="spawn", join=True)
        rows = torch.load(out_path, weights_only=False)

    print()
    T.print_table(rows, COLUMNS)
    device = T.device_name("cpu")
    path = args.out or str(HERE / "results" / f"comm-{device}.json")
    payload = {
        "benchmark": "bench_comm.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": T.device_info("cpu"),
        "torch": torch.__version__,
        "backend": "gloo",
        "world_size": args.world,
        "size_bytes": args.size,
        "block_size": args.block_size,
        "reps": args.reps,
        "notes": "times are rank 0's; wire bytes are what one rank sends (bandwidth-optimal "
                 "collectives); rel_rms_err against the exact fp64 mean",
        "rows": rows,
    }
    print(f"\nwrote {T.write_results(path, payload)}")


if __name__ == "__main__":
    main()
