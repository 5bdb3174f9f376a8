"""Routing analyses on a 1M-token, Scout-shaped synthetic trace read lazily from zarr.

    .venv/bin/python benchmarks/analysis_1m.py [--tokens 1000000] [--no-logits] [--keep DIR]

Writes a trace-shaped zarr store (the trace's token arrays) with zarr directly (48 MoE layers, 16 experts, top-1, 50
sequences, router_logits float16; shards of 4 x 64k tokens, inner chunks of 64k tokens,
`dimension_names` on every array) into a temp dir, plus a second store (same inputs, 10% of
the routing changed, no logits) for `saturation`. Then, on a fresh `xr.open_zarr` each time:

- the "read floor": streaming the variables an analysis needs, block by block, doing nothing;
- every analysis; its time as a ratio to the read floor of its inputs; the peak RSS growth
  (psutil sampling every 20 ms) to show memory stays bounded by blocks, not the trace;
- alternatives side by side: expert_load / router_entropy as plain xarray+dask expressions,
  and the block loop with the prefetch thread off.

Prints a markdown table (the numbers recorded in benchmarks/RESULTS.md, "Routing analyses").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask  # noqa: E402
import psutil  # noqa: E402
import xarray as xr  # noqa: E402
import zarr  # noqa: E402

import workbench.analysis as A  # noqa: E402
from workbench.analysis import _common  # noqa: E402

L, E, K, N_SEQ = 48, 16, 1, 50
CHUNK, SHARD = 65536, 4 * 65536
VOCAB, PATCH_ID, SPECIAL_IDS = 202048, 200092, np.arange(200000, 200016)


def _block(rng, start, stop, seq_len, tok_effect, bias, logits):
    """Synthetic rows [start, stop): token ids, metadata and top-1 routing for every layer."""
    n = stop - start
    rows = np.arange(start, stop)
    seq = (rows // seq_len).astype(np.int32)
    pos = (rows % seq_len).astype(np.int32)
    mod = np.zeros(n, np.int8)
    mod[(pos >= 1) & (pos <= 16 * 144)] = 1  # 16 tiles of image patches after BOS
    mod[(pos == 0) | (pos % 1000 == 999)] = 2
    tid = np.minimum(rng.zipf(1.3, n), VOCAB - 1).astype(np.int32)
    tid[mod == 1] = PATCH_ID
    tid[mod == 2] = SPECIAL_IDS[pos[mod == 2] % 16]
    z = rng.standard_normal((n, L, E), dtype=np.float32)
    z += bias[None]
    z += tok_effect[tid % tok_effect.shape[0]]
    top = np.argmax(z, axis=-1).astype(np.int16)[..., None]
    w = (1 / (1 + np.exp(-np.take_along_axis(z, top.astype(np.int64), axis=-1)))).astype(np.float32)
    return dict(token_id=tid, sequence=seq, position=pos, modality=mod, topk_expert=top, topk_weight=w,
                router_logits=z.astype(np.float16) if logits else None)


def write_trace(path, n_tokens, seed=0, logits=True, perturb_from=None):
    """A zarr v3 group with the token arrays of a trace (names, dims, dtypes of workbench.trace.schema),
    written with zarr directly (sharded, whole shards at a time) and read with ``xr.open_zarr``: not
    a complete trace (no commits, no schema attribute)."""
    rng = np.random.default_rng(seed)
    gen = np.random.default_rng(1234)  # the model: the same for both stores
    bias = gen.normal(0, 0.6, (L, E)).astype(np.float32)
    tok_effect = gen.normal(0, 1.2, (4096, L, E)).astype(np.float32)
    seq_len = n_tokens // N_SEQ
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"complete": False, "n_experts": E, "top_k": K,
                    "model": "synthetic Scout-shaped (48 MoE layers, 16 experts, top-1)"})
    specs = {
        "token_id": (("token",), "int32"), "sequence": (("token",), "int32"),
        "position": (("token",), "int32"), "modality": (("token",), "int8"),
        "topk_expert": (("token", "moe_layer", "k"), "int16"),
        "topk_weight": (("token", "moe_layer", "k"), "float32"),
    }
    if logits:
        specs["router_logits"] = (("token", "moe_layer", "expert"), "float16")
    sizes = {"token": n_tokens, "moe_layer": L, "k": K, "expert": E}
    arrays = {}
    for name, (dims, dtype) in specs.items():
        shape = tuple(sizes[d] for d in dims)
        arrays[name] = g.create_array(
            name, shape=shape, dtype=dtype, chunks=(CHUNK,) + shape[1:], shards=(SHARD,) + shape[1:],
            dimension_names=list(dims), attributes={"coordinates": "layer"} if len(dims) > 1 else {})
    lay = g.create_array("layer", shape=(L,), dtype="int64", chunks=(L,), dimension_names=["moe_layer"])
    lay[:] = np.arange(L)  # Scout: every decoder layer is a MoE layer
    for s in range(0, n_tokens, SHARD):  # whole shards at a time (no shard rewrites)
        e = min(s + SHARD, n_tokens)
        if perturb_from is None:
            parts = [_block(rng, a, min(a + CHUNK, e), seq_len, tok_effect, bias, logits)
                     for a in range(s, e, CHUNK)]
        for name in specs:
            if perturb_from is None:
                val = np.concatenate([p[name] for p in parts])
            else:  # same inputs, 10% of the top-1 choices moved to another expert
                val = np.asarray(perturb_from[name][s:e]).copy()
                if name == "topk_expert":
                    flip = rng.random(val.shape) < 0.1
                    val[flip] = (val[flip] + rng.integers(1, E, flip.sum())) % E
            arrays[name][s:e] = val
    g.attrs.update({"complete": True, "n_tokens": n_tokens})
    zarr.consolidate_metadata(str(path))


class PeakRSS:
    def __init__(self):
        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta_mb = (self.peak - self.base) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--no-logits", action="store_true")
    ap.add_argument("--keep", help="write the stores here and keep them")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table gives medians")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wb_analysis_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    pa, pb = root / "a.zarr", root / "b.zarr"
    logits = not args.no_logits
    try:
        t0 = time.perf_counter()
        if not (pa / "zarr.json").exists():
            write_trace(pa, args.tokens, seed=0, logits=logits)
            src = zarr.open_group(str(pa), mode="r")
            write_trace(pb, args.tokens, seed=1, logits=False, perturb_from=src)
        t_write = time.perf_counter() - t0
        size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20  # noqa: E731
        open_ = lambda p=pa: xr.open_zarr(p)  # noqa: E731
        ds = open_()
        print(f"# {platform.machine()} cpus={os.cpu_count()} load average {os.getloadavg()[0]:.1f} "
              f"python {platform.python_version()} numpy {np.__version__} xarray {xr.__version__} "
              f"dask {dask.__version__} zarr {zarr.__version__}")
        print(f"# trace: {args.tokens} tokens, {L} MoE layers, {E} experts, top-{K}, {N_SEQ} sequences, "
              f"logits={logits}; store {size(pa):.0f} MiB (+{size(pb):.0f} MiB); written in {t_write:.1f} s; "
              f"dask token chunks {ds['topk_expert'].chunks[0][0]}")

        def floor(names):
            def run():
                d = open_()
                for _ in _common.iter_blocks(d, names):
                    pass
            return run

        def dask_load():
            d = open_()
            oh = d["topk_expert"] == xr.DataArray(np.arange(E), dims="expert")
            return oh.sum(("token", "k")).compute()

        def dask_entropy():
            d = open_()
            x = d["router_logits"].astype(np.float32)
            z = x - x.max("expert")
            lse = np.log(np.exp(z).sum("expert"))
            p = np.exp(z - lse)
            h = (lse - (p * z).sum("expert")) / np.log(E)
            return h.mean("token").compute()

        def no_prefetch(fn):
            def run():
                _common.PREFETCH = False
                try:
                    return fn()
                finally:
                    _common.PREFETCH = True
            return run

        # the alternatives compute the same numbers
        assert np.array_equal(dask_load().transpose("moe_layer", "expert").values,
                              A.expert_load(open_(), normalize=False).values)
        if logits:
            assert np.allclose(dask_entropy().values,
                               A.router_entropy(open_(), per_token=False)["mean_entropy"].values, rtol=1e-4)

        labels = {s: ["code", "chat", "math", "web", "books"][s % 5] for s in range(N_SEQ)}
        # (name, reference for the ratio, function); a reference is a floor or another case
        cases = [
            ("read floor: topk_expert", None, floor(["topk_expert"])),
            ("read floor: topk_expert + modality", None, floor(["topk_expert", "modality"])),
            ("expert_load", "read floor: topk_expert", lambda: A.expert_load(open_())),
            ("expert_load(by_modality=True)", "read floor: topk_expert + modality",
             lambda: A.expert_load(open_(), by_modality=True)),
            ("load_imbalance", "read floor: topk_expert", lambda: A.load_imbalance(open_())),
            ("load_imbalance(modality='image')", "read floor: topk_expert + modality",
             lambda: A.load_imbalance(open_(), modality="image")),
            ("coactivation(layer=24)", "read floor: topk_expert", lambda: A.coactivation(open_(), 24)),
            ("repetition_rate", "read floor: topk_expert", lambda: A.repetition_rate(open_())),
            ("layer_transitions(0, 47)", "read floor: topk_expert", lambda: A.layer_transitions(open_(), 0, 47)),
            ("vocab_specialization(target='input')", "read floor: topk_expert",
             lambda: A.vocab_specialization(open_())),
            ("vocab_specialization(target='next')", "read floor: topk_expert",
             lambda: A.vocab_specialization(open_(), target="next")),
            ("domain_specialization(5 labels)", "read floor: topk_expert",
             lambda: A.domain_specialization(open_(), labels)),
            ("saturation(a, b)", "read floor: topk_expert", lambda: A.saturation(open_(), open_(pb))),
            ("ALT expert_load: xarray+dask one-hot sum", "expert_load", dask_load),
            ("ALT expert_load: prefetch thread off", "expert_load", no_prefetch(lambda: A.expert_load(open_()))),
            ("ALT repetition_rate: prefetch thread off", "repetition_rate",
             no_prefetch(lambda: A.repetition_rate(open_()))),
        ]
        if logits:
            cases += [
                ("read floor: router_logits", None, floor(["router_logits"])),
                ("router_entropy(per_token=False)", "read floor: router_logits",
                 lambda: A.router_entropy(open_(), per_token=False)),
                ("router_entropy(by_modality=True, per_token=False)", "read floor: router_logits",
                 lambda: A.router_entropy(open_(), by_modality=True, per_token=False)),
                ("ALT router_entropy: xarray+dask expression", "router_entropy(per_token=False)", dask_entropy),
            ]
        times = {name: [] for name, _, _ in cases}
        rss = {name: 0.0 for name, _, _ in cases}
        for r in range(args.repeat):  # rounds interleave the cases: drift hits all alike
            for name, _, fn in cases:
                with PeakRSS() as m:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                rss[name] = max(rss[name], m.delta_mb)
            print(f"# round {r + 1}/{args.repeat} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        med = {name: float(np.median(v)) for name, v in times.items()}
        print("\n| case | median s (this machine) | ratio | to | peak RSS growth MiB |")
        print("|---|---:|---:|---|---:|")
        for name, ref, _ in cases:
            ratio = f"{med[name] / med[ref]:.2f}" if ref else ""
            print(f"| {name} | {med[name]:.2f} | {ratio} | {ref or ''} | {rss[name]:.0f} |")
        print("\n# spread (min..max s): " + "; ".join(
            f"{n}: {min(v):.2f}..{max(v):.2f}" for n, v in times.items()))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
