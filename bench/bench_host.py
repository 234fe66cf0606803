#!/usr/bin/env python
"""Host cost of one call of each differentiable op, on inputs small enough that
the arithmetic is negligible: what a training step's Python, dispatch, argument
checks, allocations and autograd bookkeeping cost per op.

Per op, side by side in one run:

  no_grad_us    ours under torch.no_grad() (below the autograd layer)
  ours_us       ours with an input that needs a gradient, through the wrapper in
                deepseek_kernels.ops (our Autograd kernel, ops._register_autograd)
  torch_ops_us  the same through torch.ops.deepseek_kernels (the same kernel)
  library_us    the same formulas through the Autograd kernel torch.library's
                register_autograd would have registered (built here, not registered)
  peer_us       the PyTorch composition a user would write otherwise, with grad
                (F.linear + activation, SDPA, softmax + topk, index_add ...)

and the ratios library/ours and peer/ours (> 1: ours is cheaper). On CUDA the
times are host times (``timer.time_host_cuda``: enqueue cost, the device not
waited for); on the CPU they are whole calls, the arithmetic being tiny.

    python bench/bench_host.py [--device cpu|cuda] [--reps N] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))

import timer as T  # noqa: E402

from deepseek_kernels import ops  # noqa: E402

K = torch.ops.deepseek_kernels
COLUMNS = ["op", "no_grad_us", "ours_us", "torch_ops_us", "library_us", "x_vs_library", "peer", "peer_us",
           "x_vs_peer"]


class _Library:
    """``L.<op>(...)``: the op through torch.library.register_autograd's Autograd kernel
    for our formulas (ops._torch_library_autograd)."""

    def __getattr__(self, name):  # built once per op, then an attribute
        call = ops._torch_library_autograd(name)
        setattr(self, name, call)
        return call


L = _Library()


def _cases(device):
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True, dtype=dt):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    T_, E, k, H, C = 16, 16, 2, 64, 4
    logits = rnd(T_, E, dtype=torch.float32)
    r = ops.moe_topk_gating(logits.detach(), k, capacity=C)
    d = ops.moe_topk_gating(logits.detach(), k)
    x, w = rnd(T_, H), r.weights.detach().clone().requires_grad_()
    eo = rnd(E, C, H)
    packed, offsets = ops.moe_permute(x.detach(), d.expert_ids, d.slots, d.expert_counts)
    packed.requires_grad_()
    a, W, b = rnd(8, 64), rnd(32, 64), rnd(32)
    q, kv = rnd(1, 16, 2, 64), rnd(1, 32, 2, 64)
    ws = rnd(4, 32, 64)
    goff = torch.tensor([0, 3, 3, 10, 16], dtype=torch.int32, device=device)
    gx = rnd(16, 64)
    # The peers' index tensors, made outside the timed calls: every kept choice (expert
    # id and slot >= 0), as ours dispatches and combines them; a dropped one is skipped.
    rows_all = r.expert_ids.long() * C + r.slots.long()
    keep = (r.expert_ids >= 0) & (r.slots >= 0)
    rows = rows_all.clamp(min=0)
    dst, src = rows_all[keep], torch.arange(T_, device=device)[:, None].expand(T_, k)[keep]
    keepw = keep.to(w.dtype)

    def peer_gating():
        p = torch.softmax(logits, dim=-1)
        v, i = torch.topk(p, k, dim=-1)
        return v / v.sum(-1, keepdim=True), i

    return [
        ("moe_topk_gating",
         lambda: ops.moe_topk_gating(logits, k, capacity=C),
         lambda: K.moe_topk_gating(logits, k, capacity=C),
         lambda: L.moe_topk_gating(logits, k, capacity=C),
         "softmax+topk+renorm", peer_gating),
        ("moe_dispatch",
         lambda: ops.moe_dispatch(x, r.expert_ids, r.slots, E, C),
         lambda: K.moe_dispatch(x, r.expert_ids, r.slots, E, C),
         lambda: L.moe_dispatch(x, r.expert_ids, r.slots, E, C),
         "index_select+index_add",
         lambda: x.new_zeros(E * C, H).index_add(0, dst, x.index_select(0, src)).view(E, C, H)),
        ("moe_combine",
         lambda: ops.moe_combine(eo, r.expert_ids, r.slots, w),
         lambda: K.moe_combine(eo, r.expert_ids, r.slots, w),
         lambda: L.moe_combine(eo, r.expert_ids, r.slots, w),
         "index_select+mul+sum",
         lambda: (eo.reshape(E * C, H).index_select(0, rows.reshape(-1)).view(T_, k, H)
                  * (w * keepw)[..., None].to(eo.dtype)).sum(1)),
        ("moe_permute",
         lambda: ops.moe_permute(x, d.expert_ids, d.slots, d.expert_counts),
         lambda: K.moe_permute(x, d.expert_ids, d.slots, d.expert_counts),
         lambda: L.moe_permute(x, d.expert_ids, d.slots, d.expert_counts),
         "argsort+index_select",
         lambda: x.index_select(0, torch.argsort(d.expert_ids.reshape(-1), stable=True) // k)),
        ("moe_permute (num_rows)",  # MoELayer's dropless call: a static row count
         lambda: ops.moe_permute(x, d.expert_ids, d.slots, d.expert_counts, num_rows=T_ * k),
         lambda: K.moe_permute(x, d.expert_ids, d.slots, d.expert_counts, num_rows=T_ * k),
         lambda: L.moe_permute(x, d.expert_ids, d.slots, d.expert_counts, num_rows=T_ * k),
         "n/a", None),
        ("moe_unpermute",
         lambda: ops.moe_unpermute(packed, d.expert_ids, d.slots, offsets, d.weights),
         lambda: K.moe_unpermute(packed, d.expert_ids, d.slots, offsets, d.weights),
         lambda: L.moe_unpermute(packed, d.expert_ids, d.slots, offsets, d.weights),
         "n/a", None),
        ("gemm (bias, gelu)",
         lambda: ops.gemm(a, W, b, activation="gelu"),
         lambda: K.gemm(a, W, b, activation="gelu"),
         lambda: L.gemm(a, W, b, activation="gelu"),
         "F.linear+F.gelu", lambda: F.gelu(F.linear(a, W, b))),
        ("grouped_gemm",
         lambda: ops.grouped_gemm(gx, ws, goff),
         lambda: K.grouped_gemm(gx, ws, goff),
         lambda: L.grouped_gemm(gx, ws, goff),
         "n/a", None),
        ("cross_attention",
         lambda: ops.cross_attention(q, kv, kv),
         lambda: K.cross_attention(q, kv, kv),
         lambda: L.cross_attention(q, kv, kv),
         "SDPA", lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kv.transpose(1, 2),
                                                         kv.transpose(1, 2)).transpose(1, 2)),
    ]


def peer_matches(ours_out, peer_out) -> bool:
    """The peer's outputs (a prefix of ours: gating's weights and ids, permute's rows)
    equal ours to the dtype's tolerance: a peer that does less work is no peer."""
    peer_out = peer_out if isinstance(peer_out, (tuple, list)) else (peer_out,)
    for a, b in zip(ours_out, peer_out):
        tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
        if a.shape != b.shape or not torch.allclose(a.detach().float(), b.detach().float(),
                                                    rtol=tol, atol=tol):
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=2000, help="timed calls per measurement")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # host cost, not parallel arithmetic

        def timed(fn):
            return T.time_cpu(fn, warmup=args.reps // 10, reps=args.reps,
                              min_time_s=0.3 if args.reps >= 1000 else 0.0)["median_ms"] * 1e3
    else:
        def timed(fn):
            return T.time_host_cuda(fn, warmup=args.reps // 40, reps=args.reps)["median_ms"] * 1e3

    rows = []
    for name, ours, torch_ops, library, peer_name, peer in _cases(device):
        # the three calls compute the same bits (checked before timing)
        outs = [f() for f in (ours, torch_ops, library)]
        outs = [o if isinstance(o, (tuple, list)) else (o,) for o in outs]
        if not all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other)):
            raise SystemExit(f"{name}: the wrapper, torch.ops and torch.library results differ")
        if peer is not None and not peer_matches(outs[0], peer()):
            raise SystemExit(f"{name}: the peer ({peer_name}) computes something else than ours")
        with torch.no_grad():
            no_grad = timed(ours)
        row = {"op": name, "no_grad_us": no_grad, "ours_us": timed(ours), "torch_ops_us": timed(torch_ops),
               "library_us": timed(library),
               "peer": peer_name, "peer_us": timed(peer) if peer is not None else None}
        row["x_vs_library"] = row["library_us"] / row["ours_us"]
        row["x_vs_peer"] = row["peer_us"] / row["ours_us"] if peer is not None else None
        rows.append(row)
        print(f"{name}: ours {row['ours_us']:.1f} us, torch.library's kernel {row['library_us']:.1f} us",
              flush=True)

    print()
    T.print_table(rows, COLUMNS)
    path = Path(args.out) / f"host-{T.device_name(device)}.json"
    path = T.write_results(path, {"benchmark": "host", **T.device_info(device),
                                  "columns": COLUMNS, "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
