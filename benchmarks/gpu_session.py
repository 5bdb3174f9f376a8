"""Everything this project checks and measures on a GPU, in ONE call of the lent device.

    python benchmarks/gpu_session.py [--out DIR] [--budget SECONDS]      # on the GPU machine
    TRITON_INTERPRET=1 python benchmarks/gpu_session.py --dry-run         # plumbing, tiny, on CPU

Needs torch + triton (+ transformers for the MoE baselines; zarr for the recorder check, skipped
when missing). Imports this checkout's kernels/ and hooks/ as ``workbench.kernels`` /
``workbench.hooks`` when the package is not installed (the bare GPU machine).

Sections, in priority order (each guarded: a failure is logged and the next one runs; a section
is skipped once the time budget is spent):

1. ``correct``  -- Triton MoE kernels on CUDA vs a float64 reference on fresh random inputs,
   outputs poisoned with NaN first: bf16/fp16/fp32, k = 1/2/3, scale input (operand and epilogue
   scaling) / output, T = 1, ragged T, all tokens on one expert, empty experts, E = 128,
   non-contiguous weights; CUDA-graph capture + replay with new routing; no host
   synchronization inside ``moe_experts(check_ids=False)`` (``torch.cuda.set_sync_debug_mode``).
2. ``ceilings`` -- bf16 8192^3 matmul rate and device-to-device copy rate.
3. ``tune``     -- tile sweep of both kernels at every benchmark shape (compiles first in a
   process pool); best configs written as ``configs/``-format JSON files to the output dir.
4. ``moe``      -- one Llama 4 MoE layer (H=5120, I=8192, bf16, top-1 + shared expert) at Scout
   (E=16) and Maverick (E=128) shapes: transformers' Llama4TextMoe, sorted loop,
   torch._grouped_mm, workbench with the repo's configs, with the tuned configs (operand and
   epilogue input scaling), and with router capture to pinned host memory. Floor, ratios, errors.
5. ``attention`` -- cross-modal attention-probability kernel (Triton) vs naive dense softmax rows,
   32k tokens with one 17-tile image (2448 patches), Scout's 40 query / 8 KV heads x 128.
6. ``model``    -- the embedded tiny checkpoint on CUDA (fp32, bf16) vs CPU fp32; recording a
   trace on CUDA (zarr) equals recording on CPU.
7. ``decode``   -- (issue 13) decode step time, eager with the default and the static KV cache, and
   replayed as a CUDA graph (logits vs eager steps on a twin cache): the embedded model and a
   Scout-shaped random model of 4 layers (3 chunked + 1 global), batch 1 and 8; a 128k-token
   prefill of the latter with router ids captured by a hook listener: time, peak memory per token.

Writes ``session.json`` (all numbers), ``moe_layer.md`` (the table) and tuned config files.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _register(name: str, folder: Path) -> None:
    """Make ``folder`` importable as package ``name`` (the checkout's package-dir mapping)."""
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


_register("workbench.kernels", ROOT / "kernels")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workbench.kernels import moe_experts  # noqa: E402
from workbench.kernels import moe_triton as mt  # noqa: E402

T0 = time.time()
LOG: list[str] = []
RES: dict = {"sections": {}}


def log(*a) -> None:
    line = f"[{time.time() - T0:6.1f}s] " + " ".join(str(x) for x in a)
    print(line, flush=True)
    LOG.append(line)


def left(budget: float) -> float:
    return budget - (time.time() - T0)


# ----------------------------------------------------------------------------------- timing

def timer(dev: str):
    if dev == "cuda":
        def t(fn, min_ms: float = 30.0, max_n: int = 50) -> float:
            fn()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize()
            est = max(s.elapsed_time(e), 1e-3)
            n = int(min(max_n, max(3, math.ceil(min_ms / est))))
            ts = []
            for _ in range(n):
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            return statistics.median(ts)
        return t

    def t(fn, min_ms: float = 0.0, max_n: int = 3) -> float:
        fn()
        ts = []
        for _ in range(max_n):
            a = time.perf_counter(); fn(); ts.append((time.perf_counter() - a) * 1e3)
        return statistics.median(ts)
    return t


# ----------------------------------------------------------------------------------- 1. correct

def ref64(x, ids, w, gu, dp, scale):
    """float64 reference, vectorized per (slot, expert); scale='input' rounds w*x like the model."""
    T, H = x.shape
    I = dp.shape[1]
    out = torch.zeros(T, H, dtype=torch.float64, device=x.device)
    for j in range(ids.shape[1]):
        for e in torch.unique(ids[:, j]).tolist():
            rows = (ids[:, j] == e).nonzero()[:, 0]
            wj = w[rows, j]
            z = (x[rows] * wj.to(x.dtype)[:, None]).double() if scale == "input" else x[rows].double()
            g = z @ gu[e, :, :I].double()
            u = z @ gu[e, :, I:].double()
            y = (F.silu(g) * u) @ dp[e].double()
            out[rows] += y if scale == "input" else wj.double()[:, None] * y
    return out


def rel(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def section_correct(dev, dry):
    cases = []  # (name, T, H, I, E, k, dtype, ids-kind)
    H, I = (32, 32) if dry else (512, 256)
    dts = [torch.float32, torch.bfloat16] if dry else [torch.float32, torch.float16, torch.bfloat16]
    for dt in dts:
        for k in (1, 2):
            cases.append((f"base-{str(dt)[6:]}-k{k}", 7 if dry else 300, H, I, 16, k, dt, None))
    if not dry:
        cases += [("T1", 1, H, I, 16, 1, torch.bfloat16, None),
                  ("ragged-T333-k3", 333, H, I, 16, 3, torch.bfloat16, None),
                  ("one-expert-T517", 517, H, I, 16, 1, torch.bfloat16, "one"),
                  ("empty-experts-k2", 200, H, I, 16, 2, torch.float16, "two"),
                  ("E128-k1", 700, H, I, 128, 1, torch.bfloat16, None),
                  ("E128-k2-fp32", 300, H, I, 128, 2, torch.float32, None),
                  ("noncontig-k2", 150, H, I, 16, 2, torch.bfloat16, "noncontig"),
                  ("big-H5120-I1024", 640, 5120, 1024, 16, 1, torch.bfloat16, None)]
        big = {"BLOCK_M": 64, "gate_up": _c(128, 64, 8, 8, 4, True), "down": _c(256, 64, 8, 8, 4, True)}
        small = {"BLOCK_M": 16, "gate_up": _c(128, 128, 4, 4, 3, True), "down": _c(128, 128, 4, 4, 4, True)}
        cases += [("tma-bf16-k1", 300, H, I, 16, 1, torch.bfloat16, None, big),
                  ("tma-fp16-k2", 300, H, I, 16, 2, torch.float16, None, small),
                  ("tma-fp32-k1", 300, H, I, 16, 1, torch.float32, None, big),
                  ("tma-one-expert", 517, H, I, 16, 1, torch.bfloat16, "one", big),
                  ("tma-E128-k2", 300, H, I, 128, 2, torch.bfloat16, None, small),
                  ("tma-I1000-k1", 200, H, 1000, 16, 1, torch.bfloat16, None, big),
                  ("tma-noncontig-k2", 150, H, I, 16, 2, torch.bfloat16, "noncontig", big),
                  ("tma-big-H5120", 640, 5120, 1024, 16, 1, torch.bfloat16, None, big)]
    rows, ok = [], True
    for name, T, H_, I_, E, k, dt, kind, *cfg in cases:
        cfg = cfg[0] if cfg else None
        g = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
        x = torch.randn(T, H_, device=dev, generator=g).to(dt)
        gu = (torch.randn(E, H_, 2 * I_, device=dev, generator=g) / H_ ** 0.5).to(dt)
        dp = (torch.randn(E, I_, H_, device=dev, generator=g) / I_ ** 0.5).to(dt)
        ids = torch.argsort(torch.rand(T, E, device=dev, generator=g), dim=1)[:, :k]
        if kind == "one":
            ids = torch.full((T, k), 5, device=dev, dtype=torch.int64)
        elif kind == "two":
            ids = torch.stack([torch.tensor([2, 9], device=dev)[torch.randperm(2, device=dev)] for _ in range(T)])
        used = set(ids.reshape(-1).tolist())
        for e in range(E):  # experts no token uses must never be read
            if e not in used:
                gu[e] = float("nan"); dp[e] = float("nan")
        if kind == "noncontig":
            gu = gu.transpose(1, 2).contiguous().transpose(1, 2)
            dp = dp.transpose(1, 2).contiguous().transpose(1, 2)
        w = torch.rand(T, k, device=dev, generator=g) + 0.25
        for scale, mode in (("input", "operand"), ("input", "epilogue"), ("output", None)):
            out = torch.full((T, H_), float("nan"), device=dev, dtype=dt)
            opts = {"input_scale": mode} if mode else {}
            if cfg is not None:
                opts["config"] = cfg
            y = moe_experts(x, ids, w, gu, dp, scale=scale, backend="triton", out=out, check_ids=False, **opts)
            r = ref64(x, ids, w, gu, dp, scale)
            e_ = rel(y, r)
            good = bool(torch.isfinite(y).all()) and e_ < TOL[dt] and y.data_ptr() == out.data_ptr()
            ok &= good
            rows.append({"case": name, "scale": scale + (f"/{mode}" if mode else ""), "rel": e_, "ok": good})
            if not good:
                log("FAIL", name, scale, mode, e_)
    # CUDA graph: capture once, new routing, replay
    if dev == "cuda":
        T, E = 64, 16
        x = torch.randn(T, H, device=dev).bfloat16()
        gu = (torch.randn(E, H, 2 * I, device=dev) / H ** 0.5).bfloat16()
        dp = (torch.randn(E, I, H, device=dev) / I ** 0.5).bfloat16()
        ids = torch.randint(0, E, (T, 1), device=dev)
        w = torch.rand(T, 1, device=dev) + 0.25
        out = torch.empty_like(x)
        moe_experts(x, ids, w, gu, dp, out=out, check_ids=False)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe_experts(x, ids, w, gu, dp, out=out, check_ids=False)
        ids.copy_(torch.randint(0, E, ids.shape, device=dev))
        out.fill_(float("nan"))
        graph.replay(); torch.cuda.synchronize()
        e_ = rel(out, ref64(x, ids, w, gu, dp, "input"))
        rows.append({"case": "cuda-graph-replay", "rel": e_, "ok": e_ < TOL[torch.bfloat16]})
        ok &= e_ < TOL[torch.bfloat16]
        # no host synchronization inside the call
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_experts(x, ids, w, gu, dp, out=out, check_ids=False)
            nosync = True
        except RuntimeError as ex:
            nosync = f"{ex}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append({"case": "no-host-sync", "ok": nosync is True, "detail": nosync})
        ok &= nosync is True
    log("correct:", "all ok" if ok else "FAILURES", f"({len(rows)} checks)")
    return {"ok": ok, "rows": rows}


# ----------------------------------------------------------------------------------- 2. ceilings

def section_ceilings(dev, dry, t):
    n = 512 if dry else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = t(lambda: a @ b, 100)
    peak = 2 * n ** 3 / ms / 1e9
    del a, b
    numel = (4 if dry else 1024) * 1024 ** 2
    x = torch.empty(numel, device=dev, dtype=torch.bfloat16).normal_(); y = torch.empty_like(x)
    ms2 = t(lambda: y.copy_(x), 100)
    bw = 2 * x.numel() * 2 / ms2 / 1e9
    del x, y
    log(f"ceilings: bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s")
    return {"peak_tflops": peak, "copy_tbps": bw}


# ----------------------------------------------------------------------------------- 3. tune

def _c(bn, bk, gm, w, s, tma=False):
    c = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w, "num_stages": s}
    if tma:
        c["TMA"] = True
    return c


# candidates per regime (average assignments per expert <= 64: weight-bandwidth bound)
SMALL = {"BLOCK_M": [16, 32, 64],
         "gate_up": [_c(64, 128, 1, 4, 4), _c(64, 128, 4, 4, 4), _c(128, 128, 4, 4, 3), _c(64, 256, 4, 4, 3),
                     _c(32, 256, 4, 4, 4), _c(128, 64, 4, 4, 5),
                     _c(128, 128, 4, 4, 3, True), _c(128, 64, 4, 4, 5, True), _c(64, 128, 4, 4, 4, True)],
         "down": [_c(64, 128, 1, 4, 4), _c(128, 128, 4, 4, 4), _c(64, 256, 4, 4, 3), _c(128, 64, 4, 4, 5),
                  _c(256, 64, 4, 8, 4), _c(32, 256, 4, 4, 4),
                  _c(128, 128, 4, 4, 4, True), _c(256, 64, 4, 8, 4, True), _c(128, 64, 4, 4, 5, True)]}
LARGE = {"BLOCK_M": [64, 128],
         "gate_up": [_c(64, 64, 8, 4, 4), _c(128, 64, 8, 8, 3), _c(128, 64, 8, 8, 4), _c(64, 64, 8, 8, 5),
                     _c(64, 128, 8, 4, 3), _c(128, 128, 8, 8, 2), _c(128, 64, 16, 8, 4), _c(128, 64, 4, 8, 4),
                     _c(128, 64, 8, 8, 4, True), _c(128, 64, 8, 8, 3, True), _c(64, 64, 8, 4, 4, True),
                     _c(128, 128, 8, 8, 2, True)],
         "down": [_c(128, 64, 8, 4, 4), _c(256, 64, 8, 8, 3), _c(256, 64, 8, 8, 4), _c(128, 64, 8, 8, 4),
                  _c(128, 128, 8, 8, 3), _c(256, 128, 8, 8, 2), _c(256, 64, 16, 8, 4), _c(128, 64, 8, 4, 5),
                  _c(256, 64, 8, 8, 4, True), _c(256, 64, 8, 8, 3, True), _c(128, 64, 8, 4, 4, True),
                  _c(128, 128, 8, 8, 3, True)]}
DRY = {"BLOCK_M": [16, 32], "gate_up": [_c(16, 16, 1, 4, 1), _c(32, 32, 2, 4, 1), _c(16, 16, 1, 4, 1, True)],
       "down": [_c(16, 16, 1, 4, 1), _c(32, 32, 2, 4, 1)]}


def regime(T, k, E, dry):
    if dry:
        return DRY
    return SMALL if T * k / E <= 64 else LARGE


def _compile_task(args):
    """Worker: compile (by running once on tiny inputs of the same specialization) some configs."""
    H, I, tasks = args
    dev = "cuda"
    E, T = 2, 64
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    gu = torch.randn(E, H, 2 * I, device=dev, dtype=torch.bfloat16) * 0.01
    dp = torch.randn(E, I, H, device=dev, dtype=torch.bfloat16) * 0.01
    ids = torch.randint(0, E, (T, 1), device=dev)
    tw = torch.rand(T, device=dev, dtype=torch.bfloat16)
    inter = torch.empty(T, I, device=dev, dtype=torch.bfloat16)
    c = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    errs = []
    for bm, part, cfg, mode in tasks:
        al = mt.align_block_size(ids, E, bm)
        try:
            if part == "gate_up":
                mt.launch_gate_up(x, gu, inter, tw, al, 1, bm, cfg, mode)
            else:
                mt.launch_down(inter, dp, c, tw, al, bm, cfg)
            torch.cuda.synchronize()
        except Exception as e:  # out of resources etc.: the main process skips it too
            errs.append(f"{bm} {part} {cfg}: {type(e).__name__}")
    return errs


def precompile(shapes, H, I, dry, workers):
    tasks = set()
    for T, k, E in shapes:
        r = regime(T, k, E, dry)
        for bm in r["BLOCK_M"]:
            for cfg in r["gate_up"]:
                for mode in (1, 2):
                    tasks.add((bm, "gate_up", json.dumps(cfg, sort_keys=True), mode))
            for cfg in r["down"]:
                tasks.add((bm, "down", json.dumps(cfg, sort_keys=True), 0))
    tasks = [(bm, p, json.loads(c), m) for bm, p, c, m in sorted(tasks)]
    if dry or workers < 2:
        return {"tasks": len(tasks), "skipped": "dry run / no pool"}
    import concurrent.futures as cf
    import multiprocessing as mp
    chunks = [tasks[i::workers] for i in range(workers)]
    t0 = time.time()
    errs = []
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for e in ex.map(_compile_task, [(H, I, ch) for ch in chunks]):
            errs += e
    log(f"precompile: {len(tasks)} kernels in {time.time() - t0:.1f} s on {workers} processes, {len(errs)} failed")
    return {"tasks": len(tasks), "seconds": time.time() - t0, "errors": errs}


def tune_shape(E, T, k, x, top_i, scores, gu_w, dn_w, dry, t):
    """Best (BLOCK_M, gate_up cfg, down cfg) for one shape: per BLOCK_M, the fastest gate_up and
    the fastest down kernel (epilogue scaling), plus the alignment time."""
    r = regime(T, k, E, dry)
    N, I, H = T * k, dn_w.shape[1], x.shape[1]
    tw = scores.reshape(-1).contiguous()
    out = {"per_bm": {}}
    best = None
    for bm in r["BLOCK_M"]:
        al = mt.align_block_size(top_i, E, bm)
        t_align = t(lambda: mt.align_block_size(top_i, E, bm), 5)
        inter = torch.empty(N, I, device=x.device, dtype=x.dtype)
        c = torch.empty(N, H, device=x.device, dtype=x.dtype)
        gts, dts = [], []
        ref_i = ref_c = None
        for cfg in r["gate_up"]:
            try:
                inter.fill_(float("nan"))
                ms = t(lambda: mt.launch_gate_up(x, gu_w, inter, tw, al, k, bm, cfg, 2))
                if ref_i is None:
                    ref_i = inter.float().clone()
                err = ((inter.float() - ref_i).norm() / ref_i.norm()).item()
                if not err < 1e-2:  # NaN (rows not written) or wrong: never pick it
                    log("  gate_up WRONG", bm, cfg, err); ms = float("inf")
                gts.append((ms, cfg))
            except Exception as e:
                gts.append((float("inf"), cfg)); log("  gate_up", bm, cfg, type(e).__name__)
        g_ms, g_cfg = min(gts, key=lambda z: z[0])
        mt.launch_gate_up(x, gu_w, inter, tw, al, k, bm, g_cfg, 2)
        for cfg in r["down"]:
            try:
                c.fill_(float("nan"))
                ms = t(lambda: mt.launch_down(inter, dn_w, c, tw, al, bm, cfg))
                if ref_c is None:
                    ref_c = c.float().clone()
                err = ((c.float() - ref_c).norm() / ref_c.norm()).item()
                if not err < 1e-2:
                    log("  down WRONG", bm, cfg, err); ms = float("inf")
                dts.append((ms, cfg))
            except Exception as e:
                dts.append((float("inf"), cfg)); log("  down", bm, cfg, type(e).__name__)
        d_ms, d_cfg = min(dts, key=lambda z: z[0])
        tot = t_align + g_ms + d_ms
        out["per_bm"][bm] = {"align_ms": t_align, "gate_up": [[m, c_] for m, c_ in gts],
                             "down": [[m, c_] for m, c_ in dts], "total_ms": tot}
        if best is None or tot < best[0]:
            best = (tot, {"BLOCK_M": bm, "gate_up": g_cfg, "down": d_cfg})
        del inter, c, ref_i, ref_c
    out["best_ms"], out["best"] = best
    return out


# ----------------------------------------------------------------------------------- 4. moe

def section_moe(dev, dry, t, ceil, budget, shapes_by_E, out_dir, workers):
    import moe_layer as ml  # transformers' layer + baselines (benchmarks/moe_layer.py)
    from triton.testing import do_bench

    def bench(fn):
        if dev == "cuda":
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return t(fn)

    dt = torch.bfloat16
    H, I = (64, 32) if dry else (5120, 8192)
    peak, bw = ceil["peak_tflops"], ceil["copy_tbps"]
    all_shapes = [(T, 1, E) for E, Ts in shapes_by_E.items() for T in Ts]
    RES["sections"]["precompile"] = precompile(all_shapes, H, I, dry, workers)
    rows, tuned = [], {}
    for E, Ts in shapes_by_E.items():
        if left(budget) < 30:
            rows.append({"E": E, "note": "skipped: time budget"}); continue
        if dev == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(E)
        m = ml.make_layer(E, H, I, dev, dt)
        W1, W2 = m.experts.gate_up_proj, m.experts.down_proj
        for T in Ts:
            if left(budget) < 25:
                rows.append({"E": E, "T": T, "note": "skipped: time budget"}); continue
            row = {"E": E, "T": T}
            try:
                with torch.no_grad():
                    x = torch.randn(T, H, device=dev, dtype=dt)
                    logits, top_i, scores = ml.route(m, x)
                    n_used = int(torch.unique(top_i).numel())
                    flops = T * (2 * H * 2 * I + 2 * I * H) * 2
                    wbytes = (n_used + 1) * 3 * H * I * dt.itemsize
                    row.update(experts_used=n_used, floor_ms=max(flops / (peak * 1e9), wbytes / (bw * 1e9)),
                               floor_kind="compute" if flops / peak > wbytes / bw else "bandwidth")
                    tr = tune_shape(E, T, 1, x, top_i, scores, W1, W2, dry, t)
                    tuned.setdefault(E, {})[T] = tr
                    row["tuned_cfg"] = tr["best"]
                    row["tuned_kernels_ms"] = tr["best_ms"]
                    log(f"tune E={E} T={T}: {tr['best_ms']:.3f} ms kernels, {json.dumps(tr['best'])}")
                    cfg_t = tr["best"]
                    repo_cfg = mt.get_config(T, 1, E, H, I, dt, mt.device_name(x.device))
                    backend = "triton"

                    def wb(cfg, mode, cap=None):
                        lg, ti, sc = ml.route(m, x)
                        y = moe_experts(x, ti, sc, W1, W2, scale="input", check_ids=False, backend=backend,
                                        config=cfg, input_scale=mode)
                        o = m.shared_expert(x)
                        o.add_(y)
                        if cap is not None:
                            cap[0].copy_(lg, non_blocking=True); cap[1].copy_(ti, non_blocking=True)
                        return o

                    side = torch.cuda.Stream() if dev == "cuda" else None

                    def wb_overlap(cfg, mode):
                        # shared expert on a side stream, concurrent with the routed kernels
                        lg, ti, sc = ml.route(m, x)
                        main = torch.cuda.current_stream()
                        side.wait_stream(main)
                        with torch.cuda.stream(side):
                            o = m.shared_expert(x)
                        y = moe_experts(x, ti, sc, W1, W2, scale="input", check_ids=False, backend=backend,
                                        config=cfg, input_scale=mode)
                        main.wait_stream(side)
                        o.record_stream(main)
                        return o.add_(y)

                    fns = {"hf": lambda: m(x)[0], "loop": lambda: ml.loop_fn(m, x),
                           "grouped": lambda: ml.grouped_fn(m, x),
                           "wb_repo": lambda: wb(repo_cfg, "operand"),
                           "wb_tuned_operand": lambda: wb(cfg_t, "operand"),
                           "wb_tuned_epilogue": lambda: wb(cfg_t, "epilogue")}
                    if side is not None:
                        fns["wb_overlap"] = lambda: wb_overlap(repo_cfg, "operand")
                    free = torch.cuda.mem_get_info()[0] if dev == "cuda" else float("inf")
                    outs = {}
                    for name, fn in fns.items():
                        if name == "hf" and ml.hf_bytes(E, T, H, I) * 1.15 > free:
                            row["hf_ms"] = "oom (skipped)"; continue
                        try:
                            outs[name] = fn()
                            row[name + "_ms"] = bench(fn)
                        except torch.OutOfMemoryError:
                            row[name + "_ms"] = "oom"; outs.pop(name, None)
                            if dev == "cuda":
                                torch.cuda.empty_cache()
                        except Exception as e:
                            row[name + "_ms"] = f"error: {type(e).__name__}: {str(e)[:160]}"; outs.pop(name, None)
                    best_mode = min(("operand", "epilogue"),
                                    key=lambda md: row.get(f"wb_tuned_{md}_ms") if isinstance(
                                        row.get(f"wb_tuned_{md}_ms"), float) else float("inf"))
                    pin = dev == "cuda"
                    cap = (torch.empty(T, E, dtype=dt, pin_memory=pin),
                           torch.empty(T, 1, dtype=torch.long, pin_memory=pin))
                    row["capture_mode"] = best_mode
                    row["wb_tuned_capture_ms"] = bench(lambda: wb(cfg_t, best_mode, cap))
                    ref_name = "hf" if "hf" in outs else "loop"
                    row["err_ref"] = ref_name
                    rf = outs[ref_name].float()
                    for name, y in outs.items():
                        if name != ref_name:
                            row[name + "_err"] = ((y.float() - rf).norm() / rf.norm()).item()
                    del outs, rf
            except torch.OutOfMemoryError:
                row["note"] = "oom"
            except Exception as e:
                row["note"] = f"error: {type(e).__name__}: {e}"[:300]
                log(traceback.format_exc())
            rows.append(row)
            log(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()
                            if k_ != "tuned_cfg"}))
            x = logits = top_i = scores = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        del m, W1, W2
    write_configs(tuned, H, I, dt, out_dir, dev)
    return {"rows": rows, "tuning": {str(E): {str(T): v for T, v in d.items()} for E, d in tuned.items()}}


def write_configs(tuned, H, I, dt, out_dir, dev):
    name = mt.device_name(torch.device(dev)) if dev == "cuda" else "cpu"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    for E, per_T in tuned.items():
        data = {"_note": (f"Tuned by benchmarks/gpu_session.py on {card}, {time.strftime('%Y-%m-%d')}, torch "
                          f"{torch.__version__}, triton {__import__('triton').__version__}: per token count, the "
                          "fastest BLOCK_M / gate_up / down tiles of a sweep (epilogue input scaling); "
                          "kernel ms in _measured_ms."),
                "_shape": f"E={E}, H={H}, I={I}, top-1, {str(dt)[6:]}",
                "_measured_ms": {str(T): round(v["best_ms"], 4) for T, v in per_T.items()}}
        for T, v in sorted(per_T.items()):
            data[str(T)] = v["best"]
        fn = mt.config_file_name(E, H, I, name, dt)
        with open(out_dir / fn, "w") as f:
            json.dump(data, f, indent=1)
        log("wrote", fn)


def moe_table(res) -> str:
    names = ["hf", "loop", "grouped", "wb_repo", "wb_tuned_operand", "wb_tuned_epilogue", "wb_tuned_capture",
             "wb_overlap"]
    c = res["sections"].get("ceilings", {})
    lines = [f"Device: {res['env'].get('device')}; torch {res['env'].get('torch')}, triton {res['env'].get('triton')}, "
             f"transformers {res['env'].get('transformers')}; bf16 matmul {c.get('peak_tflops', 0):.0f} TFLOP/s, "
             f"copy {c.get('copy_tbps', 0):.2f} TB/s. Median ms (x floor).", "",
             "| E | T | floor ms | " + " | ".join(names) + " | errors vs ref |",
             "|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for r in res["sections"].get("moe", {}).get("rows", []):
        if "floor_ms" not in r:
            lines.append(f"| {r.get('E')} | {r.get('T', '-')} | | {r.get('note', '')} |"); continue
        cells = []
        for n in names:
            v = r.get(n + "_ms")
            cells.append(f"{v:.3f} ({v / r['floor_ms']:.2f}x)" if isinstance(v, float) else str(v))
        errs = ", ".join(f"{n}: {r[n + '_err']:.1e}" for n in names if isinstance(r.get(n + "_err"), float))
        lines.append(f"| {r['E']} | {r['T']} | {r['floor_ms']:.3f} ({r['floor_kind']}) | " + " | ".join(cells)
                     + f" | vs {r['err_ref']}: {errs} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- 5. attention

def section_attention(dev, dry, t):
    from workbench.kernels.attention_map import cross_attention_probs
    IMAGE = 7
    seq = 160 if dry else 32768
    rows_, cols_ = (1, 1) if dry else (4, 4)
    tpt = 16 if dry else 144
    ids = [1] * 17
    for _ in range(rows_ * cols_ + 1):
        ids += [IMAGE] * tpt + [2]
    ids += [3] * (seq - len(ids))
    row = torch.tensor(ids)
    patch = row == IMAGE
    first = int(patch.nonzero()[0])
    qi = ((~patch) & (torch.arange(seq) > first)).nonzero()[:, 0].to(dev)
    pi = patch.nonzero()[:, 0].to(dev)
    Hq, Hkv, D = (4, 2, 16) if dry else (40, 8, 128)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(Hq, seq, D, device=dev, generator=g).to(torch.bfloat16)
    k = torch.randn(Hkv, seq, D, device=dev, generator=g).to(torch.bfloat16)
    pos = torch.arange(seq, device=dev)
    scale = D ** -0.5
    res = {"seq": seq, "queries": int(qi.numel()), "patches": int(pi.numel()), "heads": [Hq, Hkv, D], "rows": []}
    variants = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_P=64, num_warps=4)] if dry else [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_P=64, num_warps=4), dict(BLOCK_M=128, BLOCK_N=64, BLOCK_P=64, num_warps=8),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_P=128, num_warps=8), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_P=128, num_warps=4)]
    if dry:
        variants = [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_P=16, num_warps=4)]
    for chunk in (8192 if not dry else 64, None):
        def naive():  # per head: full masked rows (Q x T) in fp32, softmax, gather the patch columns
            acc = torch.zeros(qi.numel(), pi.numel(), device=dev)
            idx = torch.arange(seq, device=dev)
            msk = idx[None, :] <= qi[:, None]
            if chunk is not None:
                msk &= (idx[None, :] // chunk) == (qi[:, None] // chunk)
            for h in range(Hq):
                s = (q[h, qi].float() @ k[h // (Hq // Hkv)].float().T) * scale
                acc += torch.softmax(s.masked_fill(~msk, float("-inf")), -1)[:, pi]
            return acc / Hq
        ref = naive()
        r = {"chunk": chunk, "naive_mean_ms": t(naive, 50, 5)}
        for v in variants:
            tag = "M{BLOCK_M}N{BLOCK_N}P{BLOCK_P}w{num_warps}".format(**v)
            try:
                def kern(heads="mean", v=v):
                    return cross_attention_probs(q, k, scale, query_index=qi, key_index=pi, positions=pos,
                                                 chunk_size=chunk, heads=heads, out_dtype=torch.float16,
                                                 check_indices=False, backend="triton", **v)
                y = kern()
                err = ((y[0].float() - ref).abs().max()).item()
                ya = kern("all")  # (Hq, Q, P): more than 2^31 elements at this size
                acc = torch.zeros_like(ref)
                for a in range(0, Hq, 8):
                    acc += ya[a:a + 8].float().sum(0)
                err_all = ((acc / Hq - ref).abs().max()).item()
                del ya, acc
                r[tag] = {"mean_ms": t(kern, 50, 10), "max_abs_err_vs_naive": err,
                          "all_heads_mean_max_abs_err_vs_naive": err_all,
                          "all_heads_ms": t(lambda: kern("all"), 50, 5)}
            except Exception as e:
                r[tag] = f"error: {type(e).__name__}: {str(e)[:200]}"
        res["rows"].append(r)
        log("attention", json.dumps(r))
        del ref
    return res


# ----------------------------------------------------------------------------------- 6. model

def section_model(dev, dry):
    _register("workbench.hooks", ROOT / "hooks")
    from workbench.checkpoint import load_model
    path = ROOT / "data" / "models" / "tiny-llama4"
    cpu = load_model(path, dtype=torch.float32, device="cpu")
    V = cpu.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (4, 300), generator=g)
    mask = torch.ones_like(ids); mask[1, :37] = 0  # one left-padded row
    with torch.no_grad():
        ref = cpu(input_ids=ids, attention_mask=mask).logits.double()
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        gm = load_model(path, dtype=dt, device=dev)
        with torch.no_grad():
            y = gm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.double().cpu()
        keep = mask.bool()
        out[str(dt)] = {"rel": rel(y[keep], ref[keep]),
                        "top1_agree": (y[keep].argmax(-1) == ref[keep].argmax(-1)).float().mean().item()}
        del gm
    try:
        _register("workbench.hooks", ROOT / "hooks")
        import workbench as wb
        from workbench.trace import open_trace
        with tempfile.TemporaryDirectory() as d:
            traces = {}
            for name, model in (("cpu", cpu), ("dev", load_model(path, dtype=torch.float32, device=dev))):
                p = Path(d) / f"{name}.zarr"
                with torch.no_grad(), wb.record(model, p, capture=("router", "logits")):
                    model(input_ids=ids.to(model_device(model)), attention_mask=mask.to(model_device(model)))
                traces[name] = open_trace(p).load()
            a, b = traces["cpu"], traces["dev"]
            out["recorder"] = {
                "tokens": int(a.sizes["token"]),
                "ids_equal_frac": float((a["topk_expert"].values == b["topk_expert"].values).mean()),
                "weights_max_abs_diff": float(abs(a["topk_weight"].values - b["topk_weight"].values).max()),
                "token_ids_equal": bool((a["token_id"].values == b["token_id"].values).all())}
    except ImportError as e:
        out["recorder"] = f"skipped: {e}"
    log("model", json.dumps(out))
    return out


def model_device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------- 7. decode

def _decode_timings(model, dev, dt, B, T0, n, t, graphs):
    """Eager decode steps (default and static cache) and, on CUDA, a captured step replayed: ms
    per step and the replay's logits vs eager steps on a twin cache."""
    from workbench.runtime.graphs import capture_decode_step
    from workbench.runtime.kv_cache import KVCache
    V = model.text_config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T0 + n), generator=g).to(dev)
    ones = torch.ones(B, 1, dtype=torch.long, device=dev)
    res = {}
    for static in (False, True):
        cache = KVCache(model.text_config, B, T0 + n + 64, block=T0, dtype=dt, device=dev, static=static)
        model(input_ids=ids[:, :T0], cache=cache, prefill_chunk=T0, logits_to_keep=1)
        step_ids = ids[:, T0:T0 + 1]

        def eager():
            # each call advances the cache by one slot: the timer's <= 42 calls fit its 64 spare ones
            model(input_ids=step_ids, attention_mask=ones, cache=cache, logits_to_keep=1)
        res["eager_static" if static else "eager"] = t(eager, 20.0, 40)
    if graphs:
        # every replay advances the device counter (no host check runs in a replay): room for the n
        # checked steps and the timer's <= 202 replays
        twin, cache = (KVCache(model.text_config, B, T0 + n + extra, block=T0, dtype=dt, device=dev, static=True)
                       for extra in (4, 256))
        for c in (twin, cache):
            model(input_ids=ids[:, :T0], cache=c, prefill_chunk=T0, logits_to_keep=1)
        step_ids = ids[:, T0:T0 + 1].clone()
        graph, out = capture_decode_step(model, cache, step_ids, ones)
        diffs, agree = [], []
        for i in range(T0, T0 + n):
            step_ids.copy_(ids[:, i:i + 1])
            graph.replay()
            ref = model(input_ids=ids[:, i:i + 1], attention_mask=ones, cache=twin, logits_to_keep=1).logits
            diffs.append(float((out.float() - ref.float()).abs().max()))
            agree.append(bool(torch.equal(out.argmax(-1), ref.argmax(-1))))
        res["graph_vs_eager_max_abs"], res["graph_argmax_agree"] = max(diffs), all(agree)
        res["graph"] = t(graph.replay, 20.0, 200)  # the same step replayed: what a decode loop pays per token
    return res


def section_decode(dev, dry, t, budget):
    """Issue 13 on a GPU: decode step time with and without a CUDA graph (embedded model, and a
    Scout-shaped random model of 4 layers: 3 chunked + 1 global), replay == eager; prefill of
    128k tokens of the Scout-shaped model with router ids captured by a hook listener: time,
    peak memory per token."""
    _register("workbench.hooks", ROOT / "hooks")
    from workbench.checkpoint import load_model
    from workbench.kernels import triton_available
    from workbench.models.llama4.config import preset
    from workbench.models.llama4.model import build_model
    out = {}
    dt = torch.float32 if dry else torch.bfloat16
    graphs = dev == "cuda" and triton_available()  # the torch expert path reads counts on the host
    tiny = load_model(ROOT / "data" / "models" / "tiny-llama4", dtype=dt, device=dev, progress=False)
    for B in (1, 8):
        out[f"tiny_b{B}"] = _decode_timings(tiny, dev, dt, B, 64 if dry else 512, 8, t, graphs)
        log("decode", f"tiny B={B}", json.dumps(out[f"tiny_b{B}"]))
    del tiny
    if dry:
        return out
    cfg = preset("scout", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], moe_layers=[0, 1, 2, 3])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            m = build_model(cfg)
        m = m.to_empty(device=dev).eval()
    finally:
        torch.set_default_dtype(old)
    for name, p in m.named_parameters():
        p.requires_grad_(False)
        p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    text = m.language_model.model
    for B in (1, 8):
        out[f"scout4_b{B}"] = _decode_timings(m, dev, torch.bfloat16, B, 1024, 8, t, graphs)
        log("decode", f"scout-shaped 4 layers B={B}", json.dumps(out[f"scout4_b{B}"]))
    ids_seen = []
    hs = [layer.feed_forward.hook_router.add(lambda p, router_logits, topk_ids, topk_weights:
                                             ids_seen.append(topk_ids.to("cpu", non_blocking=True)))
          for layer in text.layers if getattr(layer, "is_moe_layer", False)]
    try:
        T, wall = 16384, None
        while T <= 131072:
            # the global layer's time grows ~T^2: go on only when 4x the last run still fits the budget
            if wall is not None and 4.5 * wall > left(budget) - 30:
                out["prefill_stopped_before"] = T
                break
            ids = torch.randint(3, cfg.text.vocab_size, (1, T), device=dev)
            ids_seen.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            a = time.perf_counter()
            m(input_ids=ids, logits_to_keep=1)
            torch.cuda.synchronize()
            wall = time.perf_counter() - a
            peak = torch.cuda.max_memory_allocated() - base
            out[f"scout4_prefill_{T}"] = {"tokens": T, "seconds": wall, "tokens_per_s": T / wall,
                                          "peak_bytes_above_weights": peak, "bytes_per_token": peak / T,
                                          "router_ids_captured": int(sum(x.numel() for x in ids_seen))}
            log("decode", f"scout-shaped prefill {T}", json.dumps(out[f"scout4_prefill_{T}"]))
            T *= 2
    finally:
        for h in hs:
            h.remove()
    return out


# ----------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out/gpu_session"))
    ap.add_argument("--budget", type=float, default=420, help="seconds; later sections are skipped past it")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--sections", default="correct,ceilings,moe,attention,model,decode")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    dev = "cpu" if dry else "cuda"
    out_dir = Path(a.out); out_dir.mkdir(parents=True, exist_ok=True)
    import triton
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "cpus": os.cpu_count()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    RES["env"] = env
    log(json.dumps(env))
    t = timer(dev)
    shapes = {4: [32], 8: [16]} if dry else {16: [256, 2048, 8192, 32768], 128: [256, 2048, 8192, 16384, 32768]}
    wanted = a.sections.split(",")

    def run(name, fn, min_left=20):
        if name not in wanted:
            return
        if left(a.budget) < min_left:
            RES["sections"][name] = "skipped: time budget"; log("skip", name); return
        t_s = time.time()
        try:
            with torch.no_grad():
                RES["sections"][name] = fn()
        except Exception:
            RES["sections"][name] = {"error": traceback.format_exc()[-3000:]}
            log(f"section {name} FAILED:\n" + traceback.format_exc())
        log(f"section {name}: {time.time() - t_s:.1f} s")
        dump(out_dir)

    run("correct", lambda: section_correct(dev, dry))
    run("ceilings", lambda: section_ceilings(dev, dry, t))
    ceil = RES["sections"].get("ceilings") if isinstance(RES["sections"].get("ceilings"), dict) \
        else {"peak_tflops": 780.0, "copy_tbps": 3.02}
    # the MoE layer (issue 3) first, leaving ~70 s for the attention and model sections
    run("moe", lambda: section_moe(dev, dry, t, ceil, a.budget - 70, shapes, out_dir, a.workers), 60)
    run("attention", lambda: section_attention(dev, dry, t), 25)
    run("model", lambda: section_model(dev, dry), 10)
    run("decode", lambda: section_decode(dev, dry, t, a.budget), 40)
    RES["wall_s"] = time.time() - T0
    dump(out_dir)
    print(moe_table(RES))


def dump(out_dir: Path) -> None:
    with open(out_dir / "session.json", "w") as f:
        json.dump(RES, f, indent=1, default=str)
    with open(out_dir / "session.log", "w") as f:
        f.write("\n".join(LOG) + "\n")
    if "moe" in RES["sections"] and isinstance(RES["sections"]["moe"], dict):
        with open(out_dir / "moe_layer.md", "w") as f:
            f.write(moe_table(RES) + "\n")


if __name__ == "__main__":
    main()
