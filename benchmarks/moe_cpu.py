"""CPU benchmark: the torch path's two methods side by side in one process.

    .venv/bin/python benchmarks/moe_cpu.py [--quick] [--out PATH.md]

For each shape/dtype it times ``moe_experts(..., backend="torch", method=m)`` for
m in {"loop", "grouped"} (torch._grouped_mm), interleaved round by round so that slow drift of
the machine hits both alike, and prints medians and the ratio loop/grouped (> 1: grouped faster).
It also checks the two agree (rel. error vs a float64 torch computation of the same routing).
The routing is random top-k over E experts (roughly uniform loads), plus one skewed case.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from workbench.kernels import moe_experts


def _ref64(x, ids, w, gu, dp, scale):
    # float64, dense-per-expert masked reference (independent of the sorted dispatch)
    I = dp.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.double()
    for e in range(gu.shape[0]):
        hit = ids == e  # (T, k)
        rows, slots = hit.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        ww = w[rows, slots].double()[:, None]
        z = xd[rows] * ww if scale == "input" else xd[rows]
        h = z @ gu[e].double()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ dp[e].double()
        out.index_add_(0, rows, y if scale == "input" else y * ww)
    return out


def make_case(T, H, I, E, k, dtype, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gu = (torch.randn(E, H, 2 * I, generator=g) / H ** 0.5).to(dtype)
    dp = (torch.randn(E, I, H, generator=g) / I ** 0.5).to(dtype)
    logits = torch.randn(T, E, generator=g)
    if skew:  # Zipf-like: a few hot experts, many cold/empty
        logits = logits + torch.log(1.0 / torch.arange(1, E + 1, dtype=torch.float32)) * 3
    top_v, ids = logits.topk(k, dim=-1)
    w = torch.sigmoid(top_v)
    return x, ids, w, gu, dp


CLOCK = time.perf_counter


def bench(fns: dict, rounds: int, inner: int = 1):
    """Interleaved timing: each round runs every variant once, back to back (order alternating).

    Returns per-variant median and min (ms) and the median over rounds of the paired ratio
    loop/grouped: on a shared, noisy machine the paired ratio is the robust statistic."""
    names = list(fns)
    times = {n: [] for n in names}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn = fns[n]
            t0 = CLOCK()
            for _ in range(inner):
                fn()
            times[n].append((CLOCK() - t0) / inner * 1e3)
    stats = {n: (statistics.median(v), min(v)) for n, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times[names[0]], times[names[1]]))
    return stats, paired


CASES = [
    # name, T, H, I, E, k, skew
    ("tiny-llama4 (anchors)", 2048, 256, 512, 16, 1, False),
    ("small", 512, 512, 1024, 16, 1, False),
    ("small k=2", 512, 512, 1024, 16, 2, False),
    ("wider", 1024, 1024, 2048, 8, 1, False),
    ("E=128 few tokens", 256, 256, 512, 128, 1, False),
    ("E=128 skewed", 1024, 256, 512, 128, 1, True),
    ("decode T=1", 1, 512, 1024, 16, 1, False),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (use with --threads 1: robust when "
                         "other jobs load the machine)")
    a = ap.parse_args(argv)
    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu needs --threads 1 (CPU time of spinning worker threads is not work)")
        CLOCK = time.process_time
    rounds = a.rounds or (3 if a.quick else 21)
    head = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}, "
            f"load average at start {os.getloadavg()[0]:.1f}, clock {a.clock}")
    print(head)
    lines = ["| case | T | H | I | E | k | dtype | loop ms (median / min) | grouped ms (median / min) "
             "| loop/grouped (median of paired ratios) | rel err loop | rel err grouped |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, T, H, I, E, k, skew in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x, ids, w, gu, dp = make_case(T, H, I, E, k, dtype, skew)
            fns = {m: (lambda m=m: moe_experts(x, ids, w, gu, dp, backend="torch", method=m))
                   for m in ("loop", "grouped")}
            ref = _ref64(x, ids, w, gu, dp, "input")
            errs = {m: ((fn().double() - ref).norm() / ref.norm()).item() for m, fn in fns.items()}
            inner = 50 if T == 1 else (1 if a.clock == "wall" else 3)
            st, ratio = bench(fns, rounds, inner)
            line = (f"| {name} | {T} | {H} | {I} | {E} | {k} | {str(dtype).split('.')[-1]} | "
                    f"{st['loop'][0]:.3f} / {st['loop'][1]:.3f} | {st['grouped'][0]:.3f} / {st['grouped'][1]:.3f} | "
                    f"{ratio:.2f} | {errs['loop']:.1e} | {errs['grouped']:.1e} |")
            lines.append(line)
            print(line, flush=True)
    table = "\n".join([head, "", *lines])
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
