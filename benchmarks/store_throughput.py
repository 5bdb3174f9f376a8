"""Trace store throughput on a Scout-shaped synthetic stream (not a timed test).

Scout routing shape: 48 MoE layers, 16 experts, top-1. Batches of --batch tokens are appended
(each append is a commit: data, then n_tokens) until --tokens tokens are written, without and
with float16 router logits. Reports:

* tokens/s of TraceWriter.append (ids + weights; + float16 router logits), end-to-end incl. close
* resident memory (psutil RSS) growth over the run: max RSS during the run minus RSS after the
  first batch (and minus RSS before create)
* time to read per-layer expert loads of the finished trace: from the per-batch ``expert_load``
  array vs. counting ``topk_expert`` (both through open_trace, same process, ratio printed)
* side by side on a shorter stream (--compare-tokens): the writer (commit per append, and staged
  with min_commit_tokens=16384) vs. a naive writer that calls
  zarr's ``Array.append`` per array and batch (same chunks and codecs), and vs. the same naive
  writer on sharded arrays (shard = 16 inner chunks), ratios printed.

Synthetic data: a pool of 8 pre-generated batches is cycled (generation is not timed); expert ids
uniform (worst case for compression), weights sigmoid(N(0,1)) float32, logits N(0,2) float16.

    python benchmarks/store_throughput.py [--tokens 1000000] [--batch 4096] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.trace import TraceWriter, expert_loads, open_trace  # noqa: E402
from workbench.trace import writer as _writer  # noqa: E402
from workbench.trace.schema import routing_layout  # noqa: E402

L, E, K = 48, 16, 1
MOE_LAYERS = list(range(48))


def make_pool(batch: int, logits: bool, n: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        b = {
            "token_id": rng.integers(0, 202048, batch, dtype=np.int32),
            "sequence": np.full(batch, i, np.int32),
            "position": np.arange(batch, dtype=np.int32),
            "modality": (rng.random(batch) < 0.3).astype(np.int8),
            "topk_expert": rng.integers(0, E, (batch, L, K), dtype=np.int16),
            "topk_weight": (1 / (1 + np.exp(-rng.standard_normal((batch, L, K))))).astype(np.float32),
        }
        if logits:
            b["router_logits"] = (rng.standard_normal((batch, L, E)) * 2).astype(np.float16)
        pool.append(b)
    return pool


def rss() -> int:
    return psutil.Process().memory_info().rss


def du(path: Path) -> tuple[int, int]:
    size = files = 0
    for root, _, names in os.walk(path):
        for f in names:
            size += os.path.getsize(os.path.join(root, f))
            files += 1
    return size, files


def run_writer(path: Path, tokens: int, batch: int, logits: bool, min_commit_tokens: int = 0) -> dict:
    pool = make_pool(batch, logits)
    gc.collect()
    rss0 = rss()
    proc = psutil.Process()
    c0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    w = TraceWriter.create(path, **routing_layout(MOE_LAYERS, E, K, logits_dtype="float16" if logits else None),
                           attrs={"benchmark": "store_throughput"}, overwrite=True,
                           min_commit_tokens=min_commit_tokens)
    n = i = 0
    rss1 = None
    peak = 0
    while n < tokens:
        b = pool[i % len(pool)]
        m = min(batch, tokens - n)
        w.append(**{k: v[:m] for k, v in b.items()})
        n += m
        i += 1
        r = rss()
        if rss1 is None:
            rss1 = r
        peak = max(peak, r)
    w.close()
    dt = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - c0
    size, files = du(path)
    return {"tokens": n, "seconds": dt, "tok_s": n / dt, "cpu_s": cpu, "rss_before": rss0, "rss_first": rss1,
            "rss_peak": peak, "rss_end": rss(), "bytes": size, "files": files}


def run_naive(path: Path, tokens: int, batch: int, logits: bool, shard_chunks: int | None) -> dict:
    """zarr Array.append per array and batch, n_tokens attribute after; optional sharding."""
    pool = make_pool(batch, logits)
    if path.exists():
        shutil.rmtree(path)
    proc = psutil.Process()
    c0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    g = zarr.open_group(path, mode="w", zarr_format=3)
    g.attrs["n_tokens"] = 0
    rows = {"token_id": (), "sequence": (), "position": (), "modality": (), "topk_expert": (L, K),
            "topk_weight": (L, K)}
    if logits:
        rows["router_logits"] = (L, E)
    arrs = {}
    for name, row in rows.items():
        dt = pool[0][name].dtype
        ch = _writer._chunk_rows(int(np.prod(row, dtype=np.int64)) * dt.itemsize, 1 << 20)
        kw = {}
        if shard_chunks:
            kw["shards"] = (ch * shard_chunks,) + row
        arrs[name] = g.create_array(name, shape=(0,) + row, chunks=(ch,) + row, dtype=dt,
                                    compressors=_writer.codec("float" if dt.kind == "f" else "sequential" if name == "position" else "int"),
                                    fill_value=_writer.fill_value(dt), **kw)
    n = i = 0
    while n < tokens:
        b = pool[i % len(pool)]
        m = min(batch, tokens - n)
        for name, a in arrs.items():
            a.append(b[name][:m])
        n += m
        g.attrs["n_tokens"] = n
        i += 1
    dt = time.perf_counter() - t0
    return {"tokens": n, "seconds": dt, "tok_s": n / dt, "cpu_s": sum(proc.cpu_times()[:2]) - c0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--logits-tokens", type=int, default=None, help="default: --tokens")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--compare-tokens", type=int, default=262_144)
    ap.add_argument("--dir", type=str, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wb_store_bench_"))
    base.mkdir(parents=True, exist_ok=True)
    logits_tokens = args.logits_tokens or args.tokens
    MB = 1 << 20

    print(f"python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, "
          f"{os.cpu_count()} CPUs, dir {base}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(the machine is shared: wall-clock rates depend on it; CPU seconds much less)")
    print(f"shape: {L} MoE layers, {E} experts, top-{K}; batch {args.batch} tokens; every append commits")

    r = run_writer(base / "ids.zarr", args.tokens, args.batch, logits=False)
    print(f"ids+weights     : {r['tokens']:>9,} tokens in {r['seconds']:.2f} s = {r['tok_s']:>10,.0f} tokens/s;"
          f" {r['bytes']/MB:.1f} MiB on disk in {r['files']} files")
    print(f"  CPU {r['cpu_s']:.2f} s (all threads) = {r['tokens']/r['cpu_s']:,.0f} tokens per CPU-second")
    print(f"  RSS: before create {r['rss_before']/MB:.0f} MiB, after 1st batch {r['rss_first']/MB:.0f} MiB, "
          f"peak {r['rss_peak']/MB:.0f} MiB, end {r['rss_end']/MB:.0f} MiB -> growth over the run "
          f"{(r['rss_peak']-r['rss_first'])/MB:.1f} MiB (from before create {(r['rss_peak']-r['rss_before'])/MB:.1f} MiB)")

    # per-layer expert loads of the finished trace
    for attempt in range(2):
        t0 = time.perf_counter()
        a = expert_loads(base / "ids.zarr")
        t_arr = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = expert_loads(base / "ids.zarr", from_topk=True)
        t_topk = time.perf_counter() - t0
    assert (a.values == b.values).all() and int(a.values.sum()) == r["tokens"] * L * K
    print(f"expert loads of {r['tokens']:,} tokens: from expert_load {t_arr*1e3:.1f} ms, "
          f"from topk_expert {t_topk*1e3:.1f} ms (ratio {t_topk/t_arr:.1f}x); identical counts")
    t0 = time.perf_counter()
    ds = open_trace(base / "ids.zarr")
    t_open = time.perf_counter() - t0
    print(f"open_trace: {t_open*1e3:.1f} ms ({ds.sizes['token']:,} tokens)")

    r2 = run_writer(base / "logits.zarr", logits_tokens, args.batch, logits=True)
    print(f"+ fp16 logits   : {r2['tokens']:>9,} tokens in {r2['seconds']:.2f} s = {r2['tok_s']:>10,.0f} tokens/s;"
          f" {r2['bytes']/MB:.1f} MiB on disk in {r2['files']} files")
    print(f"  CPU {r2['cpu_s']:.2f} s (all threads) = {r2['tokens']/r2['cpu_s']:,.0f} tokens per CPU-second")
    print(f"  RSS: after 1st batch {r2['rss_first']/MB:.0f} MiB, peak {r2['rss_peak']/MB:.0f} MiB -> growth "
          f"{(r2['rss_peak']-r2['rss_first'])/MB:.1f} MiB")

    if args.compare_tokens:
        n = args.compare_tokens
        print(f"side by side, {n:,} tokens, ids+weights:")
        w = run_writer(base / "cmp_w.zarr", n, args.batch, logits=False)
        st = run_writer(base / "cmp_staged.zarr", n, args.batch, logits=False, min_commit_tokens=16384)
        nv = run_naive(base / "cmp_naive.zarr", n, args.batch, logits=False, shard_chunks=None)
        sh = run_naive(base / "cmp_shard.zarr", n, args.batch, logits=False, shard_chunks=16)
        for label, x in (("TraceWriter", w), ("TraceWriter, commit/16384", st), ("naive Array.append", nv),
                         ("naive append, sharded x16", sh)):
            print(f"  {label:<27} {x['tok_s']:>10,.0f} tokens/s ({x['tok_s']/w['tok_s']:.2f}x), "
                  f"{x['tokens']/x['cpu_s']:>10,.0f} tokens/CPU-s ({(x['tokens']/x['cpu_s'])/(w['tokens']/w['cpu_s']):.2f}x)")

    if not args.keep and not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
