"""Quantized vs bf16 forward on CPU (#14): peak RSS and time, side by side.

Two workloads, each variant in its own subprocess (peak RSS is per process), repetitions
interleaved ABCABC so machine load hits every variant alike:

* ``embedded``: the embedded tiny Llama 4 (data/models/tiny-llama4), loaded in bf16 as stored
  / with quantize="fp8" / quantize="int4" (routed experts), forward of 4 x 256 tokens.
* ``scout-layer``: one Scout-shaped MoE layer's routed experts (E=16, H=5120, I=8192, top-1),
  random weights made one expert at a time, bf16 vs Fp8Weight vs Int4Weight through
  ``workbench.kernels.moe_experts`` (CPU path: each touched expert dequantized to bf16 before its
  matmuls), T = 16 and 256 tokens.

Run: ``python benchmarks/quant_cpu.py [--threads N] [--reps R] [--skip-scout]``. Prints one table
per workload with ratios to bf16. CPU numbers only; on CPU the quantized path is the reference
implementation (dequantize, then the bf16 matmul), not a fast kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_embedded(variant: str, reps: int) -> dict:
    import torch

    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    q = None if variant == "bf16" else variant
    t0 = time.perf_counter()
    m = wb.load_model(EMBEDDED_MODEL, dtype=torch.bfloat16, progress=False, quantize=q)
    load_s = time.perf_counter() - t0
    rss_load = _rss_mb()
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        m(input_ids=ids)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            m(input_ids=ids)
            times.append((time.perf_counter() - t) * 1e3)
    return {"load_s": load_s, "ms": statistics.median(times), "rss_load_mb": rss_load, "peak_mb": _peak_mb(),
            "weights_mb": weights / 2**20}


def child_scout(variant: str, reps: int, T: int) -> dict:
    import torch

    from workbench.kernels import moe_experts
    from workbench.quant import Fp8Weight, Int4Weight, quantize

    E, H, I = 16, 5120, 8192
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    parts = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
    weights = {}
    for name, (K, N) in parts.items():
        per = []
        for _ in range(E):  # one expert at a time: transient float32 of one expert only
            w = (torch.randn(K, N, generator=g) * K ** -0.5).to(torch.bfloat16)
            per.append(w if variant == "bf16" else quantize(w, variant))
            del w
        if variant == "bf16":
            weights[name] = torch.stack(per)
        elif variant == "fp8":
            weights[name] = Fp8Weight(torch.stack([p.data for p in per]), torch.stack([p.scale for p in per]))
        else:
            weights[name] = Int4Weight(torch.stack([p.data for p in per]), torch.stack([p.scale for p in per]))
        del per
    make_s = time.perf_counter() - t0
    rss_load = _rss_mb()
    wbytes = sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                 for w in weights.values())
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, 1), generator=g)
    tw = torch.rand(T, 1, generator=g)
    times = []
    with torch.no_grad():
        moe_experts(x, ids, tw, weights["gate_up_proj"], weights["down_proj"])  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            moe_experts(x, ids, tw, weights["gate_up_proj"], weights["down_proj"])
            times.append((time.perf_counter() - t) * 1e3)
    return {"load_s": make_s, "ms": statistics.median(times), "rss_load_mb": rss_load, "peak_mb": _peak_mb(),
            "weights_mb": wbytes / 2**20}


def run_child(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, "--child", *args, "--threads", str(threads)], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"child {args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def table(title: str, rows: dict[str, list[dict]]) -> None:
    base = {k: statistics.median(r[k] for r in rows["bf16"]) for k in ("ms", "peak_mb")}
    print(f"\n{title}")
    print(f"{'variant':8} {'weights MB':>11} {'RSS after load MB':>18} {'peak RSS MB':>12} {'forward ms':>11} "
          f"{'time / bf16':>12} {'peak / bf16':>12}")
    for v, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{v:8} {med['weights_mb']:11.1f} {med['rss_load_mb']:18.0f} {med['peak_mb']:12.0f} {med['ms']:11.1f} "
              f"{med['ms'] / base['ms']:12.2f} {med['peak_mb'] / base['peak_mb']:12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved subprocess rounds per variant")
    ap.add_argument("--skip-scout", action="store_true")
    a = ap.parse_args()
    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        kind, variant = a.child[0], a.child[1]
        res = child_embedded(variant, a.reps) if kind == "embedded" else child_scout(variant, a.reps, int(a.child[2]))
        print("RESULT " + json.dumps(res))
        return
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.threads} thread(s), {a.rounds} interleaved rounds")
    variants = ("bf16", "fp8", "int4")
    rows = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            rows[v].append(run_child(["embedded", v, "--reps", str(a.reps)], a.threads))
    table("embedded tiny Llama 4 (bf16 model; experts quantized), forward 4 x 256 tokens", rows)
    if a.skip_scout:
        return
    for T in (16, 256):
        rows = {v: [] for v in variants}
        for _ in range(max(1, a.rounds - 1)):
            for v in variants:
                rows[v].append(run_child(["scout", v, str(T), "--reps", str(max(2, a.reps // 2))], a.threads))
        table(f"Scout-shaped MoE layer, routed experts only (E=16, H=5120, I=8192, top-1), T={T}", rows)


if __name__ == "__main__":
    main()
