"""Does ``torch.compile`` (Inductor, CPU) make a decode-sized block faster? Eager vs compiled, one process.

The block is one attention sub-layer of the embedded model at decode shapes, written out with plain
ops so that Inductor compiles it whole (``fullgraph=True``, static shapes): RMSNorm, a fused QKV
projection, single-query GQA attention over ``--keys`` cached keys with an additive mask, the
output projection and the residual add (hidden 128, 4 query / 2 KV heads of 32). It is the kind of
block a compiled decode step would be made of; if compiling it does not pay on this CPU, compiling
the whole step (issue 13's remaining lever for >= 2x decode) would not either.

Rounds: ``--rounds`` rounds of ``--calls`` calls per variant, even rounds (eager, compiled), odd
rounds reversed; reported: median us per call and the per-round ratio compiled/eager (median and
95% bootstrap CI). Compile time (first call) is printed. Results are checked equal (atol 1e-4).

    python benchmarks/compile_cpu.py [--threads 1] [--batches 1 8] [--keys 330] [--rounds 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refactor_overhead import bootstrap_median_ci, cpu_model  # noqa: E402


def block_fn(B: int, S: int, H: int = 128, hq: int = 4, hkv: int = 2, D: int = 32):
    g = torch.Generator().manual_seed(0)
    w = torch.ones(H)
    wqkv = torch.randn(H, (hq + 2 * hkv) * D, generator=g) * 0.05
    wo = torch.randn(hq * D, H, generator=g) * 0.05
    scale = D ** -0.5

    def f(x, k_cache, v_cache, mask):
        h = F.rms_norm(x, (H,), w, 1e-5)
        qkv = h @ wqkv
        q = qkv[:, :hq * D].reshape(B, hkv, hq // hkv, D)  # query heads grouped by their KV head
        s = torch.matmul(q, k_cache.transpose(-1, -2)) * scale + mask
        o = torch.matmul(torch.softmax(s, -1), v_cache).reshape(B, hq * D)
        return x + o @ wo

    args = (torch.randn(B, H, generator=g), torch.randn(B, hkv, S, D, generator=g),
            torch.randn(B, hkv, S, D, generator=g), torch.zeros(B, 1, 1, S))
    return f, args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--keys", type=int, default=330)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"# {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.2f}")
    for B in args.batches:
        f, a = block_fn(B, args.keys)
        t0 = time.perf_counter()
        cf = torch.compile(f, fullgraph=True, dynamic=False)
        out = cf(*a)
        compile_s = time.perf_counter() - t0
        assert torch.allclose(out, f(*a), atol=1e-4), "compiled result differs"
        times = {"eager": [], "compiled": []}
        for fn in (f, cf):
            for _ in range(100):
                fn(*a)
        for r in range(args.rounds):
            for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
                fn = f if name == "eager" else cf
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn(*a)
                times[name].append((time.perf_counter() - t) / args.calls * 1e6)
        ratio = np.array(times["compiled"]) / np.array(times["eager"])
        lo, hi = bootstrap_median_ci(ratio)
        print(f"B={B}, {args.keys} keys: eager {np.median(times['eager']):.1f} us, compiled "
              f"{np.median(times['compiled']):.1f} us per call; compiled/eager {np.median(ratio):.2f}x "
              f"(95% CI {lo:.2f} .. {hi:.2f}); compile {compile_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
