"""Capture cost of ``expert_out`` (norms only) and ``attribution`` vs router-only capture (issue 19).

Same model, inputs and process; each variant has its own recorder (temp store), attached around
its streaks. Model: the embedded tiny Llama 4 (``workbench.embedded.EMBEDDED_MODEL``), float32, CPU.
A streak = ``--passes`` forward passes of ``--batch`` x ``--seq`` random tokens, ending with
``rec.flush()`` (every byte committed when the clock stops). One warm-up streak per variant, then
``--rounds`` rounds, even rounds in order, odd rounds reversed (ABAB). Reported: median ms per
streak and, per variant, the median over rounds of time / router-only time - 1 with a 95%
bootstrap CI, on wall-clock time and on the process's CPU time (all threads: the forward pass and
the writer thread; less sensitive than wall time to other jobs on a shared machine).

    python benchmarks/expert_capture.py [--rounds 8] [--batch 4] [--seq 256] [--passes 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import workbench as wb
from workbench.embedded import EMBEDDED_MODEL, default_model_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from refactor_overhead import bootstrap_median_ci  # noqa: E402

VARIANTS = {"router": ("router",), "expert_out": ("router", "expert_out"),
            "attribution": ("router", "attribution"), "both": ("router", "expert_out", "attribution")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = wb.load_model(EMBEDDED_MODEL if EMBEDDED_MODEL.is_dir() else default_model_dir(), progress=False)
    vocab = model.config.text.vocab_size
    ids = torch.randint(0, vocab - 32, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"# expert capture cost; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.passes} x ({args.batch} x {args.seq}) per streak; load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        recs = {k: wb.record(model, Path(d) / f"{k}.zarr", capture=v) for k, v in VARIANTS.items()}

        def streak(kind: str) -> float:
            rec = recs[kind]
            rec.attach()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.passes):
                model(input_ids=ids)
            rec.flush()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            rec.detach()
            cpu[kind].append(dc)
            return dt

        kinds = list(VARIANTS)
        cpu = {k: [] for k in kinds}
        for k in kinds:
            streak(k)
        cpu = {k: [] for k in kinds}  # warm-up not counted
        times = {k: [] for k in kinds}
        load0 = os.getloadavg()
        for r in range(args.rounds):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                times[k].append(streak(k))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f}" for k in kinds) + " ms", flush=True)
        for rec in recs.values():
            rec.close()
    res = {"argv": sys.argv, "load_start": load0, "load_end": os.getloadavg(), "overhead": {}}
    for clock, data in (("wall", times), ("cpu", cpu)):
        base = np.array(data["router"])
        res[f"median_ms_{clock}"] = med = {k: statistics.median(v) * 1e3 for k, v in data.items()}
        for k in kinds[1:]:
            over = np.array(data[k]) / base - 1
            lo, hi = bootstrap_median_ci(over)
            res["overhead"][f"{k}_{clock}"] = {"median": float(np.median(over)), "ci95": (lo, hi)}
            print(f"{clock:4s} {k:12s} vs router-only: median {np.median(over) * 100:+.1f}% (95% CI {lo * 100:+.1f} "
                  f".. {hi * 100:+.1f}%), median streak {med[k]:.0f} ms vs {med['router']:.0f} ms")
    print(f"load average: start {load0[0]:.2f}, end {res['load_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
