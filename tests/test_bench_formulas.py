"""Unit tests of the benchmarks' own arithmetic and peers (bench/): the numbers they
print go into README.md, so a wrong formula or a peer that computes something else
would publish a wrong claim. CPU only, no timing."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_formulas", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_host_peers_compute_what_ours_computes():
    """Every host-cost peer returns ours' result (the dispatch peer used to place only
    each token's first choice, the combine peer to add dropped choices in)."""
    host = _load("bench_host")
    cases = host._cases(torch.device("cpu"))
    checked = 0
    for name, ours, _, _, peer_name, peer in cases:
        if peer is None:
            continue
        out = ours()
        out = out if isinstance(out, (tuple, list)) else (out,)
        assert host.peer_matches(out, peer()), (name, peer_name)
        checked += 1
    assert checked == 6
    # The check itself refuses a result that differs (here: one slot of the buffer lost).
    out = {c[0]: c for c in cases}["moe_dispatch"][1]().detach()
    wrong = out.clone()
    wrong[out.abs().sum(-1) > 0] = 0
    assert not host.peer_matches((out,), wrong)
