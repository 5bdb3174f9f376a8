"""Wall-time cost of a live ExpertLoadDashboard on a recorded run, in a real Jupyter kernel (no browser).

    .venv/bin/python benchmarks/live_overhead.py [--rounds 12] [--forward 40] [--hz 2] [--commit-every 1] [--root DIR]

Starts an IPython kernel (jupyter_client, the venv's ``python3`` kernel), so that the dashboard's
updates are serialized and sent on the kernel's IOPub socket exactly as in JupyterLab; nothing
displays them (the browser's drawing is not part of this measurement: with the browser on another
machine, as with a GPU server and a laptop, this is the whole cost to the run).

In the kernel: a small random Llama 4 checkpoint (4 MoE layers, 16 experts, top-1, hidden 256), and
a run = ``--forward`` forward passes of 4 x 256 tokens recorded by ``wb.record`` (one commit per
pass). Variant A: no dashboard; B: ``ExpertLoadDashboard(rec, refresh_hz=--hz)`` created before
the timed part (its first drawing is not timed), refreshing while the run streams. Rounds in ABBA
order (even rounds) and BAAB (odd rounds); both variants record with ``commit_every_seconds=--commit-every``
(the dashboard can redraw only what was committed: the recorder's default 1 s bounds it to about one
redraw per second; notebook 02 uses 0.5 s) after one warm-up run of each; per round the ratio
(B1 + B2) / (A1 + A2) of wall times, so slow drifts of the machine's load cancel within a round.

Reported: the median and mean of the per-round ratios with a 95% bootstrap confidence interval of
the median (10,000 resamples of the rounds), the spread of run times, the refresh thread's CPU
time / run wall time, the number of refreshes per run and the redraws per second while the run streams
(figure pushes of the heatmap / run wall time: what a browser would draw), and the load average
(before, after, per round: the machine may be shared). Writes
``benchmarks/out/live_overhead.json``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"

KERNEL_CODE = r"""
import json, os, resource, time, threading, torch, workbench as wb
from workbench.widgets import ExpertLoadDashboard
torch.manual_seed(0)
model = wb.load_model('ckpt', progress=False)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 300, (4, 256), generator=g) for _ in range(N_FORWARD)]

def one_run(variant, tag):
    with torch.no_grad(), wb.record(model, f'live_{tag}.zarr', overwrite=True,
                                    commit_every_seconds=COMMIT_EVERY) as rec:
        d = ExpertLoadDashboard(rec, refresh_hz=REFRESH_HZ) if variant == 'B' else None
        time.sleep(0.2)
        if d is not None:
            d._pushes0 = d.heatmap.pushes
        t = time.perf_counter()
        for b in batches:
            model(input_ids=b)
        rec.flush()
        dt = time.perf_counter() - t
    if d is None:
        return dict(wall=dt, refreshes=0, refresh_cpu=0.0)
    pushes = d.heatmap.pushes  # figure messages sent while the run streamed (the first drawing excluded below)
    d.stop()
    return dict(wall=dt, refreshes=d.n_refreshes, refresh_cpu=d.refresh_cpu_seconds, pushes=pushes - d._pushes0)

one_run('A', 'warm_a'); one_run('B', 'warm_b')
rounds = []
for i in range(N_ROUNDS):
    order = 'ABBA' if i % 2 == 0 else 'BAAB'
    runs = [(v, one_run(v, f'{i}_{j}')) for j, v in enumerate(order)]
    rounds.append(dict(order=order, runs=runs, load=os.getloadavg()))
    print(f'round {i + 1}/{N_ROUNDS}:', ' '.join(f"{v} {r['wall']:.2f}s" for v, r in runs), flush=True)
json.dump(dict(rounds=rounds, threads=torch.get_num_threads()), open('live_results.json', 'w'))
"""


def bootstrap_median_ci(x, n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.asarray(x, float)
    meds = np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--forward", type=int, default=40)
    ap.add_argument("--hz", type=float, default=2.0)
    ap.add_argument("--commit-every", type=float, default=1.0, help="recorder commit_every_seconds (default 1)")
    ap.add_argument("--root", type=Path, default=None)
    a = ap.parse_args()
    from jupyter_client.manager import start_new_kernel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from widgets_browser import make_model, versions

    root = a.root or Path(tempfile.mkdtemp(prefix="wb-live-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    make_model(root / "ckpt")
    (root / "live_results.json").unlink(missing_ok=True)
    load_before = os.getloadavg()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(root), env=env)
    try:
        code = (KERNEL_CODE.replace("N_FORWARD", str(a.forward)).replace("N_ROUNDS", str(a.rounds))
                .replace("REFRESH_HZ", repr(float(a.hz)))
                .replace("COMMIT_EVERY", repr(float(a.commit_every))))
        reply = kc.execute_interactive(code, timeout=3600)
        if reply["content"]["status"] != "ok":
            sys.exit(f"kernel error: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    load_after = os.getloadavg()
    kr = json.loads((root / "live_results.json").read_text())
    rounds = kr["rounds"]
    ratios, wall_a, wall_b, cpu_frac, refreshes, rate = [], [], [], [], [], []
    for r in rounds:
        a_ = [x["wall"] for v, x in r["runs"] if v == "A"]
        b_ = [x for v, x in r["runs"] if v == "B"]
        ratios.append(sum(x["wall"] for x in b_) / sum(a_))
        wall_a += a_
        wall_b += [x["wall"] for x in b_]
        cpu_frac += [x["refresh_cpu"] / x["wall"] for x in b_]
        refreshes += [x["refreshes"] for x in b_]
        rate += [x["pushes"] / x["wall"] for x in b_]
    lo, hi = bootstrap_median_ci(ratios)
    res = dict(date=time.strftime("%Y-%m-%d"), versions=versions(), forward=a.forward, hz=a.hz,
               commit_every_seconds=a.commit_every, rounds=a.rounds,
               threads=kr["threads"], ratios=ratios, ratio_median=statistics.median(ratios),
               ratio_mean=statistics.fmean(ratios), ratio_median_ci95=(lo, hi),
               wall_a=wall_a, wall_b=wall_b, refresh_cpu_fraction=statistics.fmean(cpu_frac),
               refreshes_per_run=refreshes, redraws_per_second=rate,
               redraws_per_second_median=statistics.median(rate), load_average_before=load_before,
               load_average_after=load_after,
               load_average_per_round=[r["load"] for r in rounds])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "live_overhead.json").write_text(json.dumps(res, indent=1))
    q = lambda v: (min(v), statistics.median(v), max(v))  # noqa: E731
    print(f"\nlive dashboard at {a.hz:g} Hz, {a.rounds} ABBA/BAAB rounds, {a.forward} forward passes per run, "
          f"commits every {a.commit_every:g} s, torch threads {kr['threads']}")
    print(f"run wall time with / without the dashboard, per round: median {res['ratio_median']:.4f} "
          f"(95% CI of the median {lo:.4f} .. {hi:.4f}), mean {res['ratio_mean']:.4f}; "
          f"all ratios {[round(x, 3) for x in ratios]}")
    print("run wall s without (min / median / max): %.2f / %.2f / %.2f; with: %.2f / %.2f / %.2f"
          % (*q(wall_a), *q(wall_b)))
    print(f"refresh thread CPU / run wall time: {100 * res['refresh_cpu_fraction']:.2f} %; refreshes per run "
          f"{min(refreshes)}..{max(refreshes)}")
    print(f"redraws per second while the run streams (heatmap pushes / run wall time): min / median / max "
          f"{min(rate):.2f} / {statistics.median(rate):.2f} / {max(rate):.2f}")
    print(f"load average before {load_before}, after {load_after}")
    print(json.dumps(res["versions"]))


if __name__ == "__main__":
    main()
