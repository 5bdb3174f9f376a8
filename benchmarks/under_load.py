"""Forward pass under a competing busy job: workbench vs transformers, and thread policies (issue 13).

Model: the embedded tiny Llama 4 (data/models/tiny-llama4), float32, CPU; input 4 x 512 random
ids of the vocabulary (seed 0); ``model(input_ids=ids)`` under ``torch.no_grad`` (full logits, as
transformers returns them). transformers: ``Llama4ForConditionalGeneration.from_pretrained`` with
its default attention implementation (printed; sdpa in transformers 5.23). Logits compared before
timing (max abs diff printed; asserted <= 1e-4).

Each thread policy runs in its own child process (an OpenMP environment variable only acts at
process start; ``torch.set_num_interop_threads`` only before the first parallel work):

* ``t2``: ``torch.set_num_threads(2)`` (the machine's cores; the issue's setting)
* ``t1``: ``torch.set_num_threads(1)``
* ``t2-passive``: 2 threads, ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning)
* ``t1-passive``: 1 thread, ``OMP_WAIT_POLICY=PASSIVE``
* ``t2-interop1``: 2 threads, ``torch.set_num_interop_threads(1)``
* ``t2-spin1000`` / ``t2-spin10000``: 2 threads, ``GOMP_SPINCOUNT=1000`` / ``10000`` (OpenMP threads
  spin that many times before they sleep; libgomp's default is 300,000; the ``workbench`` command
  and ``make lab`` set 1000)

In each child: a warm-up, then a quiet set and a loaded set (``--busy`` processes ``python -c
"while True: pass"``, default 2 = one per core, started 2 s before the set and stopped after, by
pid) of ``--rounds`` rounds; a round times one streak of ``--passes`` forward passes of each model,
order (wb, hf) in even rounds and (hf, wb) in odd ones (ABAB). Reported: medians of ms per pass,
slowdown loaded/quiet per model, the per-round ratio hf/wb (95% bootstrap CI), 1-min load average
at the start and end of each set. A set stops after an even number (>= 4) of rounds once it ran
``--max-set-seconds``.

    .venv/bin/python benchmarks/under_load.py [--policies t2 t1 ...] [--rounds 8] [--passes 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

POLICIES = {
    "t2": ({}, 2, None),
    "t1": ({}, 1, None),
    "t2-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, None),
    "t1-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1, None),
    "t2-interop1": ({}, 2, 1),
    "t2-spin1000": ({"GOMP_SPINCOUNT": "1000"}, 2, None),
    "t2-spin10000": ({"GOMP_SPINCOUNT": "10000"}, 2, None),
}


def child(args) -> None:
    import numpy as np
    import torch

    env, threads, interop = POLICIES[args.policy]
    if interop is not None:
        torch.set_num_interop_threads(interop)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    import transformers

    import workbench as wb
    from refactor_overhead import BusyLoad, bootstrap_median_ci
    from workbench.embedded import EMBEDDED_MODEL

    wbm = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False).eval()
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    vocab = wbm.text_config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    la, lb = wbm(input_ids=ids).logits, hf(input_ids=ids).logits
    diff = float((la.double() - lb.double()).abs().max())
    assert diff <= 1e-4, f"logits differ: {diff}"
    models = {"wb": lambda: wbm(input_ids=ids), "hf": lambda: hf(input_ids=ids)}

    def streak(k):
        t0 = time.perf_counter()
        for _ in range(args.passes):
            models[k]()
        return (time.perf_counter() - t0) / args.passes

    for k in models:  # warm-up
        streak(k)

    def run_set(name):
        times = {k: [] for k in models}
        load0 = os.getloadavg()
        t_set = time.perf_counter()
        for r in range(args.rounds):
            if r >= 4 and r % 2 == 0 and time.perf_counter() - t_set > args.max_set_seconds:
                break
            for k in (("wb", "hf") if r % 2 == 0 else ("hf", "wb")):
                times[k].append(streak(k))
            print(f"  [{args.policy}] {name} round {r + 1}: wb {times['wb'][-1] * 1e3:.0f} ms, "
                  f"hf {times['hf'][-1] * 1e3:.0f} ms per pass; load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        ratio = np.array(times["hf"]) / np.array(times["wb"])
        lo, hi = bootstrap_median_ci(ratio)
        return {"load_start": load0, "load_end": os.getloadavg(), "rounds": len(times["wb"]),
                "seconds": time.perf_counter() - t_set,
                "ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
                "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
                "hf_over_wb": {"median": float(np.median(ratio)), "ci95": (lo, hi)}}

    out = {"policy": args.policy, "env": env, "threads": torch.get_num_threads(),
           "interop": torch.get_num_interop_threads(), "logits_max_abs_diff": diff,
           "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    out["quiet"] = run_set("quiet")
    if args.busy:
        with BusyLoad(args.busy):
            time.sleep(2.0)
            out["loaded"] = run_set(f"loaded({args.busy} busy)")
        out["slowdown"] = {k: out["loaded"]["median_ms"][k] / out["quiet"]["median_ms"][k] for k in models}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="t2")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--max-set-seconds", type=float, default=90.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch
    import transformers

    from refactor_overhead import cpu_model

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__}, "policies": {}}
    print(f"# {res['date']}; {res['machine']['cpu']} ({res['machine']['cores']} cores); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.batch} x {args.seq} tokens, {args.passes} passes per "
          f"streak, {args.rounds} rounds per set, {args.busy} busy processes; load {os.getloadavg()}", flush=True)
    for name in args.policies:
        env = dict(os.environ, **POLICIES[name][0])
        cmd = [sys.executable, __file__, "--child", "--policy", name] + [
            a for k in ("rounds", "passes", "batch", "seq", "busy", "max_set_seconds")
            for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"policy {name}: child failed ({p.returncode})")
        r = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        res["policies"][name] = r
        q, l = r["quiet"], r.get("loaded")
        msg = (f"{name:>12} (threads {r['threads']}, interop {r['interop']}, OMP_WAIT_POLICY {r['omp_wait_policy']}; "
               f"hf attention {r['hf_attn_implementation']}; logits diff {r['logits_max_abs_diff']:.2g}): "
               f"quiet wb {q['median_ms']['wb']:.0f} / hf {q['median_ms']['hf']:.0f} ms "
               f"(hf/wb {q['hf_over_wb']['median']:.2f}x, CI {q['hf_over_wb']['ci95'][0]:.2f}..{q['hf_over_wb']['ci95'][1]:.2f}; "
               f"load {q['load_start'][0]:.2f}->{q['load_end'][0]:.2f})")
        if l:
            msg += (f"; loaded wb {l['median_ms']['wb']:.0f} / hf {l['median_ms']['hf']:.0f} ms (hf/wb "
                    f"{l['hf_over_wb']['median']:.2f}x, CI {l['hf_over_wb']['ci95'][0]:.2f}..{l['hf_over_wb']['ci95'][1]:.2f}; "
                    f"load {l['load_start'][0]:.2f}->{l['load_end'][0]:.2f}); slowdown wb {r['slowdown']['wb']:.1f}x, "
                    f"hf {r['slowdown']['hf']:.1f}x")
        print(msg, flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
