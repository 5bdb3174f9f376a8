"""Cross-modal attention capture: memory and slowdown of ``capture=("attention",)`` (issue 5).

Workload: one sequence of ``--seq`` tokens (default 32768) holding one 17-tile image (4x4 tiles +
global thumbnail = 2448 <|patch|> tokens, the processor's layout with <|image_start|>, tile
separators, <|image|>, <|image_end|>) near the start, followed by text. Model: a tiny Llama 4
(hidden 64, 2 decoder layers: layer 0 chunked RoPE with chunk 8192, layer 1 global NoPE -- or
chunked too with ``--layers rope+rope``; 4 query heads / 2 KV heads, head_dim 16; tiny 336 px
vision tower), float32, CPU.

Reports
  * memory: theoretical capture bytes (L x H' x Q x P x 2 for float16, plus the kernel's score
    block) next to T x T, and the measured peak RSS of a capturing forward minus that of a plain
    forward (each in its own subprocess, ``ru_maxrss``);
  * time: plain forward vs capturing forward (and, with ``--variants``, the capture with the
    kernel's own log-sum-exp, the earlier path), in one process, rounds in alternating order
    (ABBA), medians, per-round ratios with their spread, the load average per round, and the time
    spent inside the capture's listeners (the store write runs in the recorder's writer thread after
    the forward pass; its flush time is reported apart);
  * GPU (only when CUDA is available): the Triton kernel vs a naive "softmax of the full masked
    score rows, then gather the patch columns" on the same inputs.

    python benchmarks/attention_capture.py [--seq 32768] [--heads all|mean] [--repeats 6]
        [--layers rope+nope|rope+rope] [--variants plain,capture,capture-kernel-lse] [--threads N]
        [--skip-memory] [--skip-timing]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

IMAGE, BOI, EOI, IMG_MARK, SEP_X, SEP_Y = 319, 316, 317, 318, 315, 314
TPT = 144


def build_model(pattern: str = "rope+nope"):
    from workbench.checkpoint import random_model
    from workbench.models.llama4.config import ModelConfig, TextConfig
    from workbench.models.llama4.vision import VisionConfig

    text = TextConfig(vocab_size=320, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_local_experts=4, num_experts_per_tok=1,
                      no_rope_layers=[1, 0] if pattern == "rope+nope" else [1, 1],
                      attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1,
                      max_position_embeddings=131072, pad_token_id=0)
    vision = VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                          vision_output_dim=48, image_size=336, patch_size=14, projector_input_dim=48,
                          projector_output_dim=48)
    cfg = ModelConfig(text=text, vision=vision, image_token_index=IMAGE, boi_token_index=BOI,
                      eoi_token_index=EOI)
    return random_model(cfg, seed=0)


def build_inputs(seq: int, rows: int = 4, cols: int = 4):
    """[bos] text(16) <image 4x4 + thumbnail> text... up to `seq` tokens; pixels for rows*cols+1 tiles."""
    g = torch.Generator().manual_seed(0)
    img = [BOI]
    for _ in range(rows):
        for c in range(cols):
            img += [IMAGE] * TPT + ([SEP_X] if c < cols - 1 else [])
        img.append(SEP_Y)
    img += [IMG_MARK] + [IMAGE] * TPT + [EOI]
    head = [1] + torch.randint(3, 300, (16,), generator=g).tolist()
    n_text = seq - len(head) - len(img)
    if n_text < 1:
        raise SystemExit(f"--seq {seq} is too short for the image ({len(img)} tokens)")
    ids = head + img + torch.randint(3, 300, (n_text,), generator=g).tolist()
    pixels = torch.randn(rows * cols + 1, 3, 336, 336, generator=g)
    return torch.tensor([ids]), pixels


def counts(ids: torch.Tensor) -> tuple[int, int]:
    """(Q, P): text queries after the first patch, patch keys."""
    row = ids[0]
    patch = row == IMAGE
    first = int(patch.nonzero()[0])
    q = int(((~patch) & (torch.arange(row.numel()) > first)).sum())
    return q, int(patch.sum())


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------- subprocesses
def run_one(mode: str, seq: int, heads: str, pattern: str) -> dict:
    import workbench as wb

    torch.set_grad_enabled(False)
    model = build_model(pattern)
    ids, px = build_inputs(seq)
    base = rss_bytes()
    t0 = time.perf_counter()
    if mode == "plain":
        model(input_ids=ids, pixel_values=px)
        fwd, flush = time.perf_counter() - t0, 0.0
    else:
        with tempfile.TemporaryDirectory() as d:
            with wb.record(model, Path(d) / "a.zarr", capture={"attention": {"heads": heads}}) as rec:
                model(input_ids=ids, pixel_values=px)
                fwd = time.perf_counter() - t0
                rec.flush()
                flush = time.perf_counter() - t0 - fwd
    return {"mode": mode, "seq": seq, "baseline_rss": base, "peak_rss": maxrss_bytes(), "forward_s": fwd,
            "flush_s": flush}


def subprocess_run(mode: str, seq: int, heads: str, threads: int | None, pattern: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--seq", str(seq), "--heads", heads, "--layers", pattern]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def theory(seq: int, heads: str) -> dict:
    from workbench.kernels.attention_map import _COL_BLOCK_BYTES, torch_block_sizes

    ids, _ = build_inputs(seq)
    Q, P = counts(ids)
    L, Hq, D = 2, 4, 16
    Hout = 1 if heads == "mean" else Hq
    store = L * Hout * Q * P * 2
    # default CPU path (the layer's log-sum-exp): the (Hq, rows, P) float32 score block, the
    # [scale q, -lse] rows and the (Hq, D+1, P) patch keys; the layer's lse (Hq, T) float32
    bq, _, _ = torch_block_sizes(Hq, D, P, fused=True, block_bytes=_COL_BLOCK_BYTES)
    columns = 4 * (Hq * bq * P + Hq * bq * (D + 1) + Hq * (D + 1) * P + Hq * seq)
    # the kernel's own log-sum-exp (CUDA path, or use_layer_lse=False): column block (Hq, bq, P)
    # + K, V and the zero-V blocks (Hq, bk, D) + one mask block (bq, mk), float32
    bq, bk, mk = torch_block_sizes(Hq, D, P, fused=True)
    kernel = 4 * (Hq * bq * P + 3 * Hq * min(bk, seq) * D + bq * mk)
    return {"T": seq, "Q": Q, "P": P, "capture_bytes": store, "column_block_bytes": columns,
            "kernel_block_bytes": kernel, "TxT_float32_per_head_bytes": seq * seq * 4}


VARIANTS = {
    "plain": "plain forward, no recorder",
    "capture": "capturing forward; the row log-sum-exp comes from the layer's own attention (default)",
    "capture-kernel-lse": "capturing forward; the kernel computes the row log-sum-exp itself "
                          "(use_layer_lse=False: the path before 2026-11-26, still the CUDA path)",
    "capture-1thread": "as capture, the column pass always with one torch thread (column_threads=1)",
    "capture-torch-threads": "as capture, the column pass always with torch's threads (column_threads=None)",
}


def timing(seq: int, heads: str, repeats: int, pattern: str, variants=("plain", "capture")) -> dict:
    """Each round runs every variant once, in forward then reverse order on alternate rounds
    (ABBA / ABCCBA: a load drifting within a round does not favour either side); per round the
    ratio of each capturing variant to that round's plain forward, plus the load average."""
    import workbench as wb

    torch.set_grad_enabled(False)
    model = build_model(pattern)
    ids, px = build_inputs(seq)
    model(input_ids=ids, pixel_values=px)  # warm-up
    res = {v: {"forward_s": [], "tap_s": [], "flush_s": []} for v in variants}

    def run(v, path):
        r = res[v]
        if v == "plain":
            t0 = time.perf_counter()
            model(input_ids=ids, pixel_values=px)
            r["forward_s"].append(time.perf_counter() - t0)
            return
        with wb.record(model, path, capture={"attention": {"heads": heads}}) as rec:
            spent = [0.0]
            att = rec.captures[-1]
            att.use_layer_lse = v != "capture-kernel-lse"
            att.column_threads = {"capture-1thread": 1, "capture-torch-threads": None}.get(v, "auto")
            for name in ("_on_inputs", "_on_attn"):  # time spent inside the capture's listeners
                setattr(att, name, _timed(getattr(att, name), spent))
            t0 = time.perf_counter()
            model(input_ids=ids, pixel_values=px)
            r["forward_s"].append(time.perf_counter() - t0)
            r["tap_s"].append(spent[0])
            t1 = time.perf_counter()
            rec.flush()
            r["flush_s"].append(time.perf_counter() - t1)

    loads = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]
            load0 = os.getloadavg()[0]
            for v in order:
                run(v, Path(d) / f"{v}{i}.zarr")
            loads.append((load0, os.getloadavg()[0]))
            print(f"  round {i + 1}/{repeats} ({' '.join(order)}): "
                  + ", ".join(f"{v} {res[v]['forward_s'][-1]:.2f} s" for v in variants)
                  + f"; load average {load0:.2f} -> {loads[-1][1]:.2f}", flush=True)
    out = {"variants": {v: VARIANTS[v] for v in variants}, "load_avg_1min": loads}
    plain = res["plain"]["forward_s"] if "plain" in res else None
    for v in variants:
        r = res[v]
        r["median_s"] = statistics.median(r["forward_s"])
        if v != "plain" and plain is not None:
            pr = [c / p for p, c in zip(plain, r["forward_s"])]
            r["pair_ratios"] = pr
            r["median_pair_ratio"] = statistics.median(pr)
            r["pair_ratio_range"] = (min(pr), max(pr))
            r["ratio_of_medians"] = r["median_s"] / statistics.median(plain)
            r["ratio_of_minima"] = min(r["forward_s"]) / min(plain)
            # the capture's own share of each capturing forward: less exposed to load changes
            est = [c / (c - h) for c, h in zip(r["forward_s"], r["tap_s"])]
            r["tap_estimate"] = est
            r["median_tap_estimate"] = statistics.median(est)
        out[v] = r
    return out


def _timed(fn, acc):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
    return wrapper


def gpu_kernel_vs_naive(seq: int) -> dict | None:
    """Triton kernel vs naive dense softmax rows on the GPU (only when CUDA is available)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    from workbench.kernels.attention_map import cross_attention_probs

    dev = "cuda"
    ids, _ = build_inputs(seq)
    row = ids[0]
    patch = row == IMAGE
    first = int(patch.nonzero()[0])
    qi = ((~patch) & (torch.arange(seq) > first)).nonzero()[:, 0].to(dev)
    pi = patch.nonzero()[:, 0].to(dev)
    Hq, Hkv, D = 40, 8, 128  # Scout's attention shape
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(Hq, seq, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(Hkv, seq, D, device=dev, dtype=torch.bfloat16, generator=g)
    pos = torch.arange(seq, device=dev)
    out = {}
    for chunk in (8192, None):
        def kern():
            return cross_attention_probs(q, k, D ** -0.5, query_index=qi, key_index=pi, positions=pos,
                                         chunk_size=chunk, heads="mean", out_dtype=torch.float16,
                                         check_indices=False)

        def naive():  # per head: full masked rows for the text queries (Q x T), softmax, gather
            acc = torch.zeros(qi.numel(), pi.numel(), device=dev)
            idx = torch.arange(seq, device=dev)
            m = idx[None, :] <= qi[:, None]
            if chunk is not None:
                m &= (idx[None, :] // chunk) == (qi[:, None] // chunk)
            for h in range(Hq):
                s = (q[h, qi].float() @ k[h // (Hq // Hkv)].float().T) * D ** -0.5
                acc += torch.softmax(s.masked_fill(~m, float("-inf")), -1)[:, pi]
            return (acc / Hq).half()

        torch.testing.assert_close(kern().float(), naive().float(), atol=2e-3, rtol=2e-2)
        out[f"chunk={chunk}"] = {"triton_ms": triton.testing.do_bench(kern),
                                 "naive_ms": triton.testing.do_bench(naive)}
    out["device"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", default="all", choices=["all", "mean"])
    ap.add_argument("--repeats", type=int, default=6, help="rounds (each runs every variant once)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", default="rope+nope", choices=["rope+nope", "rope+rope"],
                    help="layer 0 is chunked RoPE; layer 1 global NoPE (default) or chunked RoPE too "
                         "(Llama 4's default pattern for a 2-layer model: every 4th layer is NoPE)")
    ap.add_argument("--variants", default="plain,capture",
                    help="comma-separated, timed in alternating order per round: " + "; ".join(
                        f"{k}: {v}" for k, v in VARIANTS.items()))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args.child, args.seq, args.heads, args.layers)))
        return

    import numpy as np
    import triton
    import zarr

    print(f"# attention capture benchmark: T={args.seq}, heads={args.heads}, torch {torch.__version__}, "
          f"triton {triton.__version__}, zarr {zarr.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    th = theory(args.seq, args.heads)
    gib = 1 << 30
    print(f"T={th['T']} Q={th['Q']} text queries, P={th['P']} patch keys, 2 layers ({args.layers}), "
          f"heads={args.heads}")
    print(f"theoretical capture buffer (float16): {th['capture_bytes'] / gib:.3f} GiB "
          f"(+ working blocks {th['column_block_bytes'] / 2**20:.0f} MiB with the layer's log-sum-exp, "
          f"{th['kernel_block_bytes'] / 2**20:.0f} MiB computing it); one T x T float32 matrix per head "
          f"would be {th['TxT_float32_per_head_bytes'] / gib:.2f} GiB")
    result = {"theory": th}
    if not args.skip_memory:
        plain = subprocess_run("plain", args.seq, args.heads, args.threads, args.layers)
        cap = subprocess_run("capture", args.seq, args.heads, args.threads, args.layers)
        extra = cap["peak_rss"] - plain["peak_rss"]
        print(f"peak RSS plain forward   {plain['peak_rss'] / gib:.3f} GiB (baseline {plain['baseline_rss'] / gib:.3f})")
        print(f"peak RSS capture forward {cap['peak_rss'] / gib:.3f} GiB (baseline {cap['baseline_rss'] / gib:.3f})")
        print(f"measured extra peak memory of the capture: {extra / gib:.3f} GiB "
              f"= {extra / th['capture_bytes']:.2f} x the theoretical buffer")
        result["memory"] = {"plain": plain, "capture": cap, "extra_bytes": extra}
    if not args.skip_timing:
        variants = tuple(args.variants.split(","))
        bad = [v for v in variants if v not in VARIANTS]
        if bad or "plain" not in variants:
            raise SystemExit(f"--variants: need 'plain' and names from {sorted(VARIANTS)}, got {args.variants}")
        print(f"timing {args.repeats} rounds, load average at start {os.getloadavg()}", flush=True)
        t = timing(args.seq, args.heads, args.repeats, args.layers, variants)
        f = lambda xs: " ".join("%.2f" % x for x in xs)  # noqa: E731
        for v in variants:
            r = t[v]
            print(f"{v:>20}: forward median {r['median_s']:.2f} s  [{f(r['forward_s'])}]")
            if v != "plain":
                print(f"{'':>20}  per-round ratio to plain: median {r['median_pair_ratio']:.3f}x, "
                      f"range {r['pair_ratio_range'][0]:.3f}-{r['pair_ratio_range'][1]:.3f}  [{f(r['pair_ratios'])}]; "
                      f"ratio of medians {r['ratio_of_medians']:.3f}x, of minima {r['ratio_of_minima']:.3f}x")
                print(f"{'':>20}  time in the capture listeners [{f(r['tap_s'])}] s -> forward / (forward - taps) "
                      f"median {r['median_tap_estimate']:.3f}x [{f(r['tap_estimate'])}]; store flush "
                      f"(writer thread) median {statistics.median(r['flush_s']):.2f} s")
        print(f"load average (1 min) before/after each round: "
              f"{' '.join('%.2f/%.2f' % x for x in t['load_avg_1min'])}; now {os.getloadavg()}")
        result["timing"] = t
    gpu = gpu_kernel_vs_naive(args.seq)
    if gpu is None:
        print("GPU kernel vs naive softmax: not measured: no GPU (CUDA) available")
    else:
        print(f"GPU kernel vs naive softmax on {gpu['device']}: {json.dumps(gpu)}")
    result["gpu"] = gpu
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
