"""Capture overhead on CPU: the same model and inputs, recorder off vs on, side by side in one process.

Model: the embedded tiny Llama 4 (data/models/tiny-llama4), float32. Workloads (``--workload``):

* ``batches``: a streak is ``--passes`` (8) forward passes of ``--batch`` x ``--seq`` (8 x 512)
  random text tokens.
* ``prompts``: a streak is the 18 demo prompts (data/prompts/demo.jsonl, images included), one
  forward pass per prompt (batch 1), each processed once before timing.

Recorder policies (``--policies``), each with its own recorder (temp store, capture router, plus
float16 logits with ``--logits``) that stays open for the run and is attached around its streaks:

* ``default``: the recorder's defaults (time-based: a commit when >= ``commit_every_seconds`` = 1 s
  passed since the last one, and at ``flush``);
* ``per-pass``: ``commit_every_seconds=0`` (and ``commit_every_tokens=0``): every pass committed
  before the next (the old default);
* ``tokens``: ``commit_every_tokens=--commit-every`` (default 16384), ``commit_every_seconds=0``.

Benchmark-only variants (``--variants``), each its own recorder with the default policy, run in
the same rounds: ``rename``: chunk files written by a plain rename over the old file (the atomic
exchange of ``workbench.trace.chunks.write_atomic`` switched off around its streaks);
``old-commit``: that, and a store created with the previous 65536-row chunk cap
(``workbench.trace.writer._MAX_CHUNK_ROWS``), i.e. the commit path before 2026-12-07 (round 3);
``cap64k``: the 65536-row cap alone (files exchanged as by default).

Every recorded streak ends with ``rec.flush()``, so every byte is committed when the clock
stops, while the writer thread overlaps the next forward passes as in a real run. Rounds: one
warm-up streak of each variant, then ``--rounds`` rounds; even rounds run (plain, policies...),
odd rounds the reverse (ABAB). Reported: median ms per streak, per-round overhead recorded/plain - 1
(median and 95% bootstrap CI over rounds), 1-min load average at the start and end.

    python benchmarks/capture_overhead.py [--workload batches|prompts|both] [--rounds 10]
        [--policies default per-pass] [--variants rename old-commit] [--logits] [--threads 2]
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
import workbench.trace.chunks as chunks_mod
import workbench.trace.writer as writer_mod
from workbench.embedded import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from refactor_overhead import bootstrap_median_ci  # noqa: E402

POLICY_KW = {"default": {}, "per-pass": {"commit_every_seconds": 0, "commit_every_tokens": 0},
             "tokens": None}  # tokens: filled from --commit-every


def workload_inputs(name: str, model, args) -> tuple[list[dict], int]:
    """The forward-pass inputs of one streak and its token count."""
    if name == "batches":
        vocab = model.config.text.vocab_size
        ids = torch.randint(0, vocab - 32, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        return [{"input_ids": ids}] * args.passes, args.batch * args.seq * args.passes
    proc = wb.load_processor(default_model_dir())
    src = ROOT / "data/prompts/demo.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    inputs, n = [], 0
    for r in rows:
        kw = {"text": [r["text"]], "return_tensors": "pt"}
        if r.get("images"):
            kw["images"] = [[str((src.parent / p).resolve()) for p in r["images"]]]  # relative to the file
        enc = proc(**kw)
        inputs.append({k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values") if enc.get(k) is not None})
        n += int(enc["attention_mask"].sum())
    return inputs, n


def run_workload(name: str, model, args, tmp: Path) -> dict:
    inputs, n_tokens = workload_inputs(name, model, args)
    capture = ("router", "logits") if args.logits else ("router",)
    recs = {}
    for pol in args.policies:
        kw = POLICY_KW[pol] if pol != "tokens" else {"commit_every_tokens": args.commit_every,
                                                     "commit_every_seconds": 0}
        recs[pol] = wb.record(model, tmp / f"{name}_{pol}.zarr", capture=capture, **kw)
    for var in args.variants:
        cap = writer_mod._MAX_CHUNK_ROWS
        writer_mod._MAX_CHUNK_ROWS = 1 << 16 if var in ("old-commit", "cap64k") else cap
        try:
            recs[var] = wb.record(model, tmp / f"{name}_{var}.zarr", capture=capture)
        finally:
            writer_mod._MAX_CHUNK_ROWS = cap

    def streak(kind: str) -> float:
        rec = recs.get(kind)
        if rec is not None:
            rec.attach()
        exchange = getattr(chunks_mod, "_RENAMEAT2", None)  # (absent in code before 2026-12-07)
        if kind in ("rename", "old-commit"):
            chunks_mod._RENAMEAT2 = None
        try:
            t0 = time.perf_counter()
            for x in inputs:
                model(**x)
            if rec is not None:
                rec.flush()  # the clock stops only when everything is written
            dt = time.perf_counter() - t0
        finally:
            if kind in ("rename", "old-commit"):
                chunks_mod._RENAMEAT2 = exchange
        if rec is not None:
            rec.detach()
        return dt

    kinds = ["plain"] + list(args.policies) + list(args.variants)
    for k in kinds:  # warm-up
        streak(k)
    times = {k: [] for k in kinds}
    load0 = os.getloadavg()
    t_set = time.perf_counter()
    for r in range(args.rounds):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            times[k].append(streak(k))
        print(f"  {name} round {r + 1}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f}" for k in kinds)
              + f" ms; load {os.getloadavg()[0]:.2f}", flush=True)
    for rec in recs.values():
        rec.close()
    committed = {}
    for pol in [*args.policies, *args.variants]:
        ds = wb.open_trace(tmp / f"{name}_{pol}.zarr")
        committed[pol] = int(ds.sizes["token"])
    out = {"load_start": load0, "load_end": os.getloadavg(), "seconds": time.perf_counter() - t_set,
           "tokens_per_streak": n_tokens, "passes_per_streak": len(inputs), "capture": list(capture),
           "ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
           "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}, "committed_tokens": committed}
    plain = np.array(times["plain"])
    for pol in [*args.policies, *args.variants]:
        over = np.array(times[pol]) / plain - 1
        lo, hi = bootstrap_median_ci(over)
        out[f"overhead_{pol}"] = {"median": float(np.median(over)), "ci95": (lo, hi), "values": over.tolist(),
                                  "ratio_of_medians": float(np.median(times[pol]) / np.median(plain) - 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["batches", "prompts", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--passes", type=int, default=8, help="forward passes per streak (batches workload)")
    ap.add_argument("--logits", action="store_true", help="also capture float16 router logits")
    ap.add_argument("--policies", nargs="+", default=["default", "per-pass"], choices=list(POLICY_KW))
    ap.add_argument("--variants", nargs="*", default=[], choices=["rename", "old-commit", "cap64k"],
                    help="benchmark-only variants of the default policy (see above)")
    ap.add_argument("--commit-every", type=int, default=16384, help="commit_every_tokens of the 'tokens' policy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = wb.load_model(default_model_dir(), progress=False)
    import zarr

    print(f"# capture overhead; torch {torch.__version__}, zarr {zarr.__version__}, {torch.get_num_threads()} threads; "
          f"policies {args.policies}; load {os.getloadavg()}", flush=True)
    res = {"argv": sys.argv, "threads": torch.get_num_threads(), "workloads": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in (["prompts", "batches"] if args.workload == "both" else [args.workload]):
            r = run_workload(name, model, args, Path(d))
            res["workloads"][name] = r
            desc = (f"{r['passes_per_streak']} single-prompt forwards ({r['tokens_per_streak']} tokens)"
                    if name == "prompts" else f"{r['passes_per_streak']} passes of {args.batch} x {args.seq} tokens")
            print(f"{name}: {desc}, capture {r['capture']}, load {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}: "
                  f"plain {r['median_ms']['plain']:.0f} ms; " + "; ".join(
                      f"{p} {r['median_ms'][p]:.0f} ms, overhead {100 * r[f'overhead_{p}']['median']:+.1f}% "
                      f"(95% CI {100 * r[f'overhead_{p}']['ci95'][0]:+.1f} .. "
                      f"{100 * r[f'overhead_{p}']['ci95'][1]:+.1f}%)"
                      for p in [*args.policies, *args.variants]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
