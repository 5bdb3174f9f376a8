"""Forward and capture overhead before vs after the "foundations" refactor, side by side in ONE process.

BEFORE is commit 1d8784b's ``workbench/``, ``hooks/`` and ``kernels/``, extracted with ``git archive``
into a temp dir and imported as the top-level package ``wb_before`` (``workbench/`` ->
``wb_before/``, ``hooks/`` -> ``wb_before/hooks/``, ``kernels/`` -> ``wb_before/kernels/``; the
absolute imports and the lazy-import module strings are rewritten ``workbench.`` -> ``wb_before.``
and a grep checks that nothing refers to ``workbench`` modules any more; schema strings such as
``"workbench.trace/1"`` are left alone). AFTER is the checkout's ``import workbench``.

Both load the embedded model (data/models/tiny-llama4) and see the same inputs: 8 x 512 random
tokens of its vocabulary. Before timing, both models' logits and a recorded pass (router ids +
weights + float16 logits) are compared (asserted equal; max abs diff reported).

Variants (each timed as a streak of ``--passes`` forward passes under ``torch.no_grad``):
plain forward, recorded (capture router), recorded (router + logits), each BEFORE and AFTER. A
recorded streak ends with ``rec.flush()``, so every byte is in the store when the clock stops.
One recorder per version and capture set stays open for the whole run (temp stores) and is
attached / detached around its streaks, so the stores of both versions grow in lock step.

Rounds: one warm-up streak of each variant, then ``--rounds`` rounds; even rounds run the six
streaks in the order (plain, router, router+logits) x (BEFORE, AFTER), odd rounds in the reverse
order, so each pair is ABAB / BABA and every variant sits in every position equally often. A
quiet set, then (unless ``--no-load``) a loaded set of the same rounds with two busy processes
(``python -c "while True: pass"``, one per core) started by this script and stopped after.

Reported per set: medians of each variant (ms per streak), per-round AFTER/BEFORE ratios (median,
mean, 95% bootstrap CI of the median, 10,000 resamples of the rounds), capture overhead (recorded
- plain, ms per streak) per version and its AFTER - BEFORE difference, 1-min load average at the
start and end of the set. Also two micro-timings that bound what the refactor can change: the
mask build of each version (the forward's only restructured tensor work) and the dead per-pass
expert-load computation BEFORE did (removed AFTER).

    .venv/bin/python benchmarks/refactor_overhead.py [--rounds 10] [--passes 8] [--threads N]
        [--max-set-seconds 240] [--no-load] [--quick] [--json out.json]

A set stops early (after an even number of rounds, at least 4) once it has run --max-set-seconds:
with 2 torch threads on 2 oversubscribed cores a streak can stall for 10-30 s, and the default
run should stay within ~10 minutes. Default run on 2 cores: 2-4 minutes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "1d8784b"
BEFORE_NAME = "wb_before"


# ---------------------------------------------------------------------------------------------
# BEFORE: the old package under another name
# ---------------------------------------------------------------------------------------------
_IMPORT_FROM = re.compile(r"^(\s*)from workbench(?=[.\s])", re.M)
_IMPORT_AS = re.compile(r"^(\s*)import workbench\.([\w.]+)(\s+as\s+\w+)", re.M)
_IMPORT_BARE = re.compile(r"^(\s*)import workbench\s*$", re.M)
_IMPORT_PKG_AS = re.compile(r"^(\s*)import workbench(\s+as\s+\w+)", re.M)
_FSTRING = re.compile(r"""f(["'])workbench\.\{""")
_QUOTED = re.compile(r"""(["'])workbench((?:\.\w+)+)\1""")
# what must not be left after the rewrite
_LEFT = [re.compile(r"^\s*(from|import)\s+workbench\b", re.M), re.compile(r"""import_module\(\s*f?["']workbench"""),
         re.compile(r"""f["']workbench\.\{""")]


def _is_module(pkg: Path, dotted: str) -> bool:
    p = pkg.joinpath(*dotted.strip(".").split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def extract_before(dest: Path, commit: str = BEFORE_COMMIT) -> dict:
    """Extract ``commit``'s package into ``dest/wb_before`` with rewritten imports; returns a summary."""
    src = dest / "src"
    src.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "workbench", "hooks", "kernels"],
                          check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=arch, check=True)
    pkg = dest / BEFORE_NAME
    shutil.move(str(src / "workbench"), str(pkg))
    for sub in ("hooks", "kernels"):
        assert not (pkg / sub).exists(), f"{commit}: workbench/{sub} exists beside the top-level {sub}/"
        shutil.move(str(src / sub), str(pkg / sub))
    n_files = n_lines = 0
    for f in sorted(pkg.rglob("*.py")):
        text = f.read_text()
        new = _IMPORT_FROM.sub(rf"\1from {BEFORE_NAME}", text)
        new = _IMPORT_AS.sub(rf"\1import {BEFORE_NAME}.\2\3", new)
        new = _IMPORT_PKG_AS.sub(rf"\1import {BEFORE_NAME}\2", new)
        new = _IMPORT_BARE.sub(rf"\1import {BEFORE_NAME} as workbench", new)
        new = _FSTRING.sub(rf"f\1{BEFORE_NAME}.{{", new)
        new = _QUOTED.sub(lambda m: f"{m[1]}{BEFORE_NAME}{m[2]}{m[1]}" if _is_module(pkg, m[2]) else m[0], new)
        if new != text:
            n_files += 1
            n_lines += sum(a != b for a, b in zip(text.splitlines(), new.splitlines()))
            f.write_text(new)
    left = []
    for f in sorted(pkg.rglob("*.py")):
        text = f.read_text()
        for rx in _LEFT:
            left += [f"{f.relative_to(dest)}: {m.group(0).strip()}" for m in rx.finditer(text)]
        left += [f"{f.relative_to(dest)}: {m.group(0)}" for m in _QUOTED.finditer(text) if _is_module(pkg, m[2])]
    assert not left, "BEFORE still refers to workbench modules:\n" + "\n".join(left)
    return {"commit": commit, "dir": str(pkg), "files_rewritten": n_files, "lines_rewritten": n_lines}


# ---------------------------------------------------------------------------------------------
# load generator
# ---------------------------------------------------------------------------------------------
class BusyLoad:
    """``n`` processes spinning ``while True: pass`` (started and stopped by this script, by pid)."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> "BusyLoad":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def bootstrap_median_ci(x, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    x = np.asarray(x, float)
    meds = np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def summary(x) -> dict:
    lo, hi = bootstrap_median_ci(x)
    return {"median": statistics.median(x), "mean": statistics.fmean(x), "ci95": (lo, hi),
            "min": min(x), "max": max(x), "values": list(x)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def micro(fn, n: int) -> float:
    """Median seconds of ``fn()`` over ``n`` calls (after one warm-up)."""
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds per set (quiet, loaded); default 10")
    ap.add_argument("--max-set-seconds", type=float, default=240.0,
                    help="stop a set early after an even number of rounds (>= 4) once it ran this long; default 240")
    ap.add_argument("--passes", type=int, default=8, help="forward passes per timed streak; default 8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, here = cores)")
    ap.add_argument("--busy", type=int, default=None, help="busy processes in the loaded set (default: cores)")
    ap.add_argument("--no-load", action="store_true", help="skip the loaded set")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 2 passes of 2 x 128 tokens")
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.passes, args.batch, args.seq = 2, 2, 2, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    n_busy = args.busy or os.cpu_count() or 2

    import workbench as wa
    from workbench.embedded import default_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="wb-refactor-bench-"))
    busy_sets = []
    try:
        before_info = extract_before(tmp)
        sys.path.insert(0, str(tmp))
        import wb_before as wbb
        import wb_before.hooks  # noqa: F401
        import wb_before.store as store_b
        from workbench.trace import open_trace as open_a

        stray = [m for m, mod in list(sys.modules.items()) if (m == "workbench" or m.startswith("workbench."))
                 and str(tmp) in (getattr(mod, "__file__", None) or "")]
        assert not stray, f"BEFORE files loaded as workbench modules: {stray}"
        assert Path(wbb.__file__).resolve().is_relative_to(tmp.resolve())
        assert Path(wa.__file__).resolve().is_relative_to(ROOT.resolve())

        model_dir = default_model_dir()
        torch.manual_seed(0)
        m_b = wbb.load_model(model_dir, progress=False)
        m_a = wa.load_model(model_dir, progress=False)
        for m in (m_b, m_a):
            m.eval()
        assert type(m_b).__module__.startswith(BEFORE_NAME) and type(m_a).__module__.startswith("workbench")
        vocab = m_a.config.text.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        sd_b, sd_a = m_b.state_dict(), m_a.state_dict()
        assert sd_b.keys() == sd_a.keys() and all(torch.equal(sd_b[k], sd_a[k]) for k in sd_a), "weights differ"

        res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "argv": sys.argv, "before": before_info, "model_dir": str(model_dir),
                     "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count()},
                     "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "numpy": np.__version__},
                     "threads": torch.get_num_threads(), "passes": args.passes, "rounds": args.rounds,
                     "shape": [args.batch, args.seq], "vocab": vocab}
        import zarr
        res["versions"]["zarr"] = zarr.__version__
        after_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "workbench", "hooks", "kernels"],
                               capture_output=True, text=True).stdout.strip()
        res["after"] = {"head": after_commit, "package_dirs_modified_vs_head": dirty.splitlines()}

        with torch.no_grad():
            # -- equality: logits and one recorded pass --------------------------------------
            lb, la = m_b(input_ids=ids).logits, m_a(input_ids=ids).logits
            diff = (lb.double() - la.double()).abs().max().item()
            res["logits_max_abs_diff"] = diff
            res["logits_equal"] = bool(torch.equal(lb, la))
            assert torch.allclose(lb, la, rtol=0, atol=1e-5), f"logits differ: max abs diff {diff}"
            check = {}
            for tag, mod, model in (("before", wbb, m_b), ("after", wa, m_a)):
                with mod.record(model, tmp / f"check_{tag}.zarr", capture=("router", "logits")):
                    model(input_ids=ids)
            ds_b = store_b.open_trace(tmp / "check_before.zarr")
            ds_a = open_a(tmp / "check_after.zarr")
            for v in ("token_id", "sequence", "position", "topk_expert", "topk_weight", "router_logits"):
                xb, xa = np.asarray(ds_b[v].values), np.asarray(ds_a[v].values)
                assert xb.shape == xa.shape, (v, xb.shape, xa.shape)
                d = float(np.nanmax(np.abs(xb.astype(np.float64) - xa.astype(np.float64)))) if xb.size else 0.0
                check[v] = {"shape": list(xa.shape), "equal": bool(np.array_equal(xb, xa)), "max_abs_diff": d}
                assert np.array_equal(xb, xa), f"recorded {v} differs: max abs diff {d}"
            res["trace_check"] = check
            print(f"# equality: logits max abs diff {diff:.3g} (bitwise equal: {res['logits_equal']}); recorded "
                  + ", ".join(f"{k} {'equal' if c['equal'] else 'DIFFERS'}" for k, c in check.items()), flush=True)

            # -- floors: the only restructured tensor work ------------------------------------
            B, T = ids.shape
            mask = torch.ones(B, T, dtype=torch.long)
            pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
            chunk = m_a.config.text.attention_chunk_size
            from workbench.runtime import ForwardBatch
            before_model = sys.modules[f"{BEFORE_NAME}.model"]

            def masks_before():
                return before_model.attention_masks(mask, pos, chunk)

            def masks_after():
                fb = ForwardBatch.build((B, T), ids.device, None, None)
                return fb.mask(chunk), fb.mask(None)

            fb_b, fb_a = masks_before(), masks_after()
            assert torch.equal(fb_b[0], fb_a[1]) and torch.equal(fb_b[1], fb_a[0]), "masks differ"
            L, E, k = len(m_a.config.text.moe_layers), m_a.config.text.num_local_experts, m_a.config.text.num_experts_per_tok
            topk = torch.randint(0, E, (B * T, L, k))

            def dead_loads():  # BEFORE's Recorder._on_forward_end, lines removed AFTER
                flat = (topk + torch.arange(L, device=topk.device)[None, :, None] * E).reshape(-1)
                valid = mask.reshape(-1, 1, 1).expand_as(topk).reshape(-1).to(torch.int64)
                return torch.zeros(L * E, dtype=torch.int64).scatter_add_(0, flat, valid).view(L, E)

            n_micro = 5 if args.quick else 50
            res["floor_ms"] = {"masks_before": micro(masks_before, n_micro) * 1e3,
                               "masks_after": micro(masks_after, n_micro) * 1e3,
                               "dead_loads_before": micro(dead_loads, n_micro) * 1e3,
                               "one_forward_after": micro(lambda: m_a(input_ids=ids), 3) * 1e3}
            print("# floors (ms, median): " + ", ".join(f"{k} {v:.3f}" for k, v in res["floor_ms"].items()), flush=True)

            # -- timed streaks ------------------------------------------------------------------
            recs = {}
            for tag, mod, model in (("B", wbb, m_b), ("A", wa, m_a)):
                recs[("router", tag)] = mod.record(model, tmp / f"t_{tag}_router.zarr", capture=("router",))
                recs[("logits", tag)] = mod.record(model, tmp / f"t_{tag}_logits.zarr", capture=("router", "logits"))
            models = {"B": m_b, "A": m_a}

            def streak(kind: str, tag: str) -> float:
                model = models[tag]
                rec = None if kind == "plain" else recs[(kind, tag)]
                if rec is not None:
                    rec.attach()
                t0 = time.perf_counter()
                for _ in range(args.passes):
                    model(input_ids=ids)
                if rec is not None:
                    rec.flush()  # the clock stops only when everything is written
                dt = time.perf_counter() - t0
                if rec is not None:
                    rec.detach()
                return dt

            kinds = ("plain", "router", "logits")
            order_even = [(k, t) for k in kinds for t in ("B", "A")]
            for kt in order_even:  # warm-up
                streak(*kt)

            def run_set(name: str) -> dict:
                times = {kt: [] for kt in order_even}
                load_start = os.getloadavg()
                loads = []
                t_set = time.perf_counter()
                for r in range(args.rounds):
                    if r >= 4 and r % 2 == 0 and time.perf_counter() - t_set > args.max_set_seconds:
                        print(f"{name}: stopped after {r} rounds ({time.perf_counter() - t_set:.0f} s > "
                              f"--max-set-seconds {args.max_set_seconds:g})", flush=True)
                        break
                    order = order_even if r % 2 == 0 else order_even[::-1]
                    for kt in order:
                        times[kt].append(streak(*kt))
                    print(f"{name} round {r + 1}/{args.rounds}: " + " ".join(
                        f"{k[:6]}-{t} {times[(k, t)][-1] * 1e3:.0f}" for k, t in order_even)
                        + f" ms; load {os.getloadavg()[0]:.2f}", flush=True)
                    loads.append(os.getloadavg()[0])
                out = {"load_start": load_start, "load_end": os.getloadavg(), "load_per_round": loads,
                       "rounds": len(loads), "seconds": time.perf_counter() - t_set,
                       "ms": {f"{k}_{t}": [x * 1e3 for x in v] for (k, t), v in times.items()}}
                for k in kinds:
                    b, a = np.array(times[(k, "B")]), np.array(times[(k, "A")])
                    out[f"{k}_ratio"] = summary(list(a / b))
                    out[f"{k}_ratio_of_medians"] = float(np.median(a) / np.median(b))
                    # interference only adds time: the fastest streak of each is the least disturbed
                    out[f"{k}_ratio_of_mins"] = float(a.min() / b.min())
                # streaks that took more than 1.5x the fastest streak of their variant: disturbed
                out["slow_streaks"] = {f"{k}_{t}": int((np.array(v) > 1.5 * min(v)).sum()) for (k, t), v in times.items()}
                for k in ("router", "logits"):
                    ob = (np.array(times[(k, "B")]) - np.array(times[("plain", "B")])) * 1e3
                    oa = (np.array(times[(k, "A")]) - np.array(times[("plain", "A")])) * 1e3
                    out[f"{k}_overhead_ms_B"] = summary(list(ob))
                    out[f"{k}_overhead_ms_A"] = summary(list(oa))
                    out[f"{k}_overhead_ms_A_minus_B"] = summary(list(oa - ob))
                return out

            sets = {"quiet": run_set("quiet")}
            if not args.no_load:
                with BusyLoad(n_busy) as busy:
                    busy_sets.append(busy)
                    time.sleep(2.0)  # let the spinners get going
                    sets["loaded"] = run_set(f"loaded({n_busy} busy)")
                res["busy_processes"] = n_busy
            res["sets"] = sets

            for rec in recs.values():
                rec.close()
        # the timed stores: both versions recorded the same passes
        same = {}
        for kind in ("router", "logits"):
            ds_b = store_b.open_trace(tmp / f"t_B_{kind}.zarr")
            ds_a = open_a(tmp / f"t_A_{kind}.zarr")
            vs = ("topk_expert", "topk_weight") + (("router_logits",) if kind == "logits" else ())
            same[kind] = {"n_tokens": [int(ds_b.sizes["token"]), int(ds_a.sizes["token"])],
                          "equal": all(np.array_equal(ds_b[v].values, ds_a[v].values) for v in vs)}
            assert same[kind]["equal"] and same[kind]["n_tokens"][0] == same[kind]["n_tokens"][1], same
        res["timed_stores_equal"] = same
    finally:
        for b in busy_sets:
            b.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)

    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


def report(res: dict) -> None:
    print()
    print(f"# {res['date']}; {res['machine']['cpu']} ({res['machine']['cores']} cores), {res['machine']['platform']}")
    v = res["versions"]
    print(f"# python {v['python']}, torch {v['torch']}, zarr {v['zarr']}, numpy {v['numpy']}; torch threads "
          f"{res['threads']}; {res['rounds']} rounds x {res['passes']} passes of {res['shape'][0]} x {res['shape'][1]} "
          f"tokens per streak")
    print(f"# BEFORE {res['before']['commit']} as {BEFORE_NAME} ({res['before']['files_rewritten']} files, "
          f"{res['before']['lines_rewritten']} lines rewritten); AFTER {res['after']['head']} working tree "
          f"(package dirs modified vs HEAD: {res['after']['package_dirs_modified_vs_head'] or 'none'})")
    print(f"# logits max abs diff {res['logits_max_abs_diff']:.3g} (bitwise equal {res['logits_equal']}); traces: "
          + ", ".join(f"{k} {'equal' if c['equal'] else 'DIFFER'}" for k, c in res["trace_check"].items())
          + f"; timed stores equal: {res['timed_stores_equal']}")
    f = res["floor_ms"]
    print(f"# floors: masks BEFORE {f['masks_before']:.3f} ms, AFTER {f['masks_after']:.3f} ms per pass; dead loads "
          f"BEFORE {f['dead_loads_before']:.3f} ms per pass; one AFTER forward {f['one_forward_after']:.1f} ms")
    labels = {"plain": "plain forward", "router": "recorded: router", "logits": "recorded: router + logits"}
    for name, s in res["sets"].items():
        ls, le = s["load_start"][0], s["load_end"][0]
        print(f"\n## {name}: {s['rounds']} rounds, load avg (1 min) {ls:.2f} at start, {le:.2f} at end "
              f"(per round {min(s['load_per_round']):.2f}..{max(s['load_per_round']):.2f}); {s['seconds']:.0f} s; "
              f"streaks > 1.5x their variant's fastest: {s['slow_streaks']}")
        print("| variant | BEFORE median ms (min) | AFTER median ms (min) | AFTER/BEFORE per-round ratio: median "
              "(95% CI) | mean | min..max | ratio of medians | ratio of mins |")
        print("|---|---:|---:|---|---:|---|---:|---:|")
        for k, lab in labels.items():
            r = s[f"{k}_ratio"]
            mb, ma = s["ms"][f"{k}_B"], s["ms"][f"{k}_A"]
            print(f"| {lab} | {statistics.median(mb):.0f} ({min(mb):.0f}) | {statistics.median(ma):.0f} ({min(ma):.0f}) | "
                  f"{r['median']:.3f} ({r['ci95'][0]:.3f} .. {r['ci95'][1]:.3f}) | {r['mean']:.3f} | "
                  f"{r['min']:.3f}..{r['max']:.3f} | {s[f'{k}_ratio_of_medians']:.3f} | {s[f'{k}_ratio_of_mins']:.3f} |")
        print("| capture overhead (recorded - plain, per round) | BEFORE median ms | AFTER median ms | "
              "AFTER - BEFORE: median ms (95% CI) | mean | | | |")
        print("|---|---:|---:|---|---:|---|---|---|")
        for k in ("router", "logits"):
            ob, oa, d = s[f"{k}_overhead_ms_B"], s[f"{k}_overhead_ms_A"], s[f"{k}_overhead_ms_A_minus_B"]
            print(f"| {labels[k]} | {ob['median']:.0f} | {oa['median']:.0f} | {d['median']:+.0f} "
                  f"({d['ci95'][0]:+.0f} .. {d['ci95'][1]:+.0f}) | {d['mean']:+.0f} | | | |")
        print("per-round ratios: " + "; ".join(f"{k} " + ", ".join(f"{x:.3f}" for x in s[f"{k}_ratio"]["values"])
                                               for k in labels))


if __name__ == "__main__":
    main()
