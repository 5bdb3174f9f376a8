"""One Llama-4 MoE layer on the GPU: all variants side by side in one process.

    python benchmarks/moe_layer.py [OUT_PATH.md]          # GPU (H100: < 8 minutes)
    python benchmarks/moe_layer.py --dry-run [OUT.md]     # tiny shapes on CPU: checks the plumbing

Needs only torch, triton and transformers (runs on the bare GPU machine; workbench.kernels is
imported from this checkout if the package is not installed). Shapes: H=5120, I=8192, bf16,
top-1 routing + shared expert, E in {16, 128}, T in {256, 2048, 8192, 32768}; a case or variant
that does not fit in memory is skipped and marked.

Variants (same weights, same input, same routing):
  hf        transformers' Llama4TextMoe (runs every expert on every token)
  loop      tokens sorted by expert, one matmul pair per non-empty expert (host sync for counts)
  grouped   tokens sorted by expert, torch._grouped_mm for gate_up and down
  wb        workbench.kernels.moe_experts (Triton on CUDA), check_ids=False (no host sync)
  wb+cap    wb plus capture of router logits and top-k ids to pinned host memory (non-blocking)
Ceilings measured in the same run: bf16 8192^3 matmul rate, device-to-device copy rate.
floor = max(active FLOPs / peak, weight bytes of the experts actually used (+ shared) / copy rate).
Errors: ||y - y_hf|| / ||y_hf|| (or vs `loop` where hf did not fit; marked).
Writes a markdown table to OUT_PATH.md (default $OUT/moe_layer.md, else ./moe_layer.md) and JSON
next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from workbench.kernels import moe_experts
except ImportError:  # bare GPU machine: import the package from this checkout
    import importlib.util
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.util.spec_from_file_location(
        "workbench.kernels", os.path.join(_root, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(_root, "kernels")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["workbench.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    moe_experts = _mod.moe_experts

T0 = time.time()
BUDGET_S = 7 * 60  # stop starting new cases after this (the whole run must stay < 8 min)
WB_BACKEND = None  # None: Triton on CUDA; the dry run uses "triton" when TRITON_INTERPRET=1


def make_bench(dev):
    if dev == "cuda":
        from triton.testing import do_bench

        def med(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return med

    def med(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter(); fn(); ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    return med


def ceilings(dev, dt, med, dry):
    n = 512 if dry else 8192
    a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
    ms = med(lambda: a @ b)
    peak = 2 * n ** 3 / ms / 1e9  # TFLOP/s
    del a, b
    numel = (16 if dry else 1024) * 1024 ** 2  # 2 GiB bf16 on the GPU
    x = torch.empty(numel, device=dev, dtype=dt).normal_(); y = torch.empty_like(x)
    ms = med(lambda: y.copy_(x))
    bw = 2 * x.numel() * x.element_size() / ms / 1e9  # TB/s, read + write
    del x, y
    if dev == "cuda":
        torch.cuda.empty_cache()
    return peak, bw


def make_layer(E, H, I, dev, dt):
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, intermediate_size_mlp=I,
                           num_local_experts=E, num_experts_per_tok=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):  # allocate directly on the device (32 GB at E=128)
            m = Llama4TextMoe(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def route(m, x):
    logits = F.linear(x, m.router.weight)
    top_v, top_i = logits.topk(1, dim=-1)
    scores = torch.sigmoid(top_v.float()).to(x.dtype)  # as Llama4Router
    return logits, top_i, scores


def loop_fn(m, x):
    E = m.num_experts
    logits, top_i, scores = route(m, x)
    flat = top_i.view(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x[order] * scores.view(-1)[order, None]
    ys, s = [], 0
    for e, c in enumerate(counts):
        if c:
            h = xs[s:s + c] @ m.experts.gate_up_proj[e]
            g, u = h.chunk(2, dim=-1)
            ys.append((u * F.silu(g)) @ m.experts.down_proj[e])
        s += c
    out = m.shared_expert(x)
    out.index_add_(0, order, torch.cat(ys))
    return out


def grouped_fn(m, x):
    E = m.num_experts
    logits, top_i, scores = route(m, x)
    flat = top_i.view(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    xs = x[order] * scores.view(-1)[order, None]
    h = torch._grouped_mm(xs, m.experts.gate_up_proj, offs=offs)
    g, u = h.chunk(2, dim=-1)
    yv = torch._grouped_mm(u * F.silu(g), m.experts.down_proj, offs=offs)
    out = m.shared_expert(x)
    out.index_add_(0, order, yv)
    return out


def wb_fn(m, x, capture=None):
    logits, top_i, scores = route(m, x)
    y = moe_experts(x, top_i, scores, m.experts.gate_up_proj, m.experts.down_proj,
                    scale="input", check_ids=False, backend=WB_BACKEND)
    out = m.shared_expert(x)
    out.add_(y)
    if capture is not None:
        capture[0].copy_(logits, non_blocking=True)
        capture[1].copy_(top_i, non_blocking=True)
    return out


def hf_bytes(E, T, H, I):
    # peak activations of Llama4TextMoe: repeat(x) E*T*H, gate_up E*T*2I, act/up E*T*2I, out E*T*H
    return E * T * (2 * H + 4 * I) * 2


def fmt(v, nd=2):
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "-" if v is None else str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=None, help="markdown output path")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    ap.add_argument("--E", type=int, nargs="*", default=None)
    ap.add_argument("--T", type=int, nargs="*", default=None)
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    if not a.dry_run and dry:
        print("no CUDA device: running --dry-run", file=sys.stderr)
    dev, dt = ("cpu", torch.bfloat16) if dry else ("cuda", torch.bfloat16)
    H, I = (128, 64) if dry else (5120, 8192)
    Es = a.E or ([4, 16] if dry else [16, 128])
    Ts = a.T or ([8, 64] if dry else [256, 2048, 8192, 32768])
    out_path = a.out or os.path.join(os.environ.get("OUT", "."), "moe_layer.md")
    med = make_bench(dev)
    global WB_BACKEND
    if dry and os.environ.get("TRITON_INTERPRET") == "1":
        WB_BACKEND = "triton"
    torch.manual_seed(0)

    import transformers
    import triton
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "H": H, "I": I, "dtype": str(dt), "dry_run": dry, "wb_backend": WB_BACKEND or "auto"}
    peak, bw = ceilings(dev, dt, med, dry)
    res["peak_bf16_tflops"], res["copy_tbps"] = peak, bw
    print(json.dumps(res), flush=True)

    rows = []
    for E in Es:
        if time.time() - T0 > BUDGET_S:
            rows.append({"E": E, "note": "skipped: time budget"}); continue
        if dev == "cuda":
            torch.cuda.empty_cache()
        try:
            m = make_layer(E, H, I, dev, dt)
        except torch.OutOfMemoryError:
            rows.append({"E": E, "note": "layer does not fit"}); continue
        for T in Ts:
            if time.time() - T0 > BUDGET_S:
                rows.append({"E": E, "T": T, "note": "skipped: time budget"}); continue
            row = {"E": E, "T": T}
            try:
                x = torch.randn(T, H, device=dev, dtype=dt)
                with torch.no_grad():
                    _, top_i, _ = route(m, x)
                    n_used = int(torch.unique(top_i).numel())
                    flops = T * (2 * H * 2 * I + 2 * I * H) * 2  # routed top-1 + shared expert
                    wbytes = (n_used + 1) * 3 * H * I * dt.itemsize
                    row.update(experts_used=n_used, floor_ms=max(flops / (peak * 1e9), wbytes / (bw * 1e9)))
                    outs = {}
                    free = torch.cuda.mem_get_info()[0] if dev == "cuda" else float("inf")
                    fns = {"hf": lambda: m(x)[0], "loop": lambda: loop_fn(m, x),
                           "grouped": lambda: grouped_fn(m, x), "wb": lambda: wb_fn(m, x)}
                    for name, fn in fns.items():
                        if name == "hf" and hf_bytes(E, T, H, I) * 1.15 > free:
                            row["hf_ms"] = "oom (skipped)"; continue
                        try:
                            outs[name] = fn()
                            row[name + "_ms"] = med(fn)
                        except torch.OutOfMemoryError:
                            row[name + "_ms"] = "oom"
                            outs.pop(name, None)
                            torch.cuda.empty_cache()
                        except Exception as e:  # keep the other variants' numbers
                            row[name + "_ms"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                            outs.pop(name, None)
                    pin = dev == "cuda"
                    cap = (torch.empty(T, E, dtype=dt, pin_memory=pin), torch.empty(T, 1, dtype=torch.long, pin_memory=pin))
                    row["wb+cap_ms"] = med(lambda: wb_fn(m, x, cap)) if "wb" in outs else None
                    ref_name = "hf" if "hf" in outs else "loop"
                    row["err_ref"] = ref_name
                    ref = outs.get(ref_name)
                    if ref is not None:
                        rf = ref.float()
                        for name, y in outs.items():
                            if name != ref_name:
                                row[name + "_err"] = ((y.float() - rf).norm() / rf.norm()).item()
                    del outs, ref
            except torch.OutOfMemoryError:
                row["note"] = "oom"
            rows.append(row)
            print(json.dumps(row), flush=True)
            x = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        del m
    res["rows"] = rows
    res["wall_s"] = time.time() - T0

    names = ["hf", "loop", "grouped", "wb", "wb+cap"]
    lines = [f"Device: {res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
             f"H={H}, I={I}, {dt}, top-1 + shared expert. Ceilings measured in this run: "
             f"bf16 matmul {peak:.0f} TFLOP/s, device copy {bw:.2f} TB/s. Median ms "
             f"(x floor in parentheses); errors are ||y - y_ref|| / ||y_ref||.", "",
             "| E | T | used experts | floor ms | " + " | ".join(names) + " | err vs | " +
             " | ".join(f"{n} err" for n in ["loop", "grouped", "wb"]) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(names) + "---|" + "---:|" * 3]
    for r in rows:
        if "floor_ms" not in r:
            lines.append(f"| {r.get('E')} | {r.get('T', '-')} | | | {r.get('note', '')} |"); continue
        cells = []
        for n in names:
            v = r.get(n + "_ms")
            cells.append(f"{v:.3f} ({v / r['floor_ms']:.2f}x)" if isinstance(v, float) else fmt(v))
        errs = [f"{r[n + '_err']:.1e}" if isinstance(r.get(n + "_err"), float) else "-" for n in ["loop", "grouped", "wb"]]
        lines.append(f"| {r['E']} | {r['T']} | {r['experts_used']} | {r['floor_ms']:.3f} | " + " | ".join(cells)
                     + f" | {r['err_ref']} | " + " | ".join(errs) + " |")
    lines.append(f"\nwall time {res['wall_s']:.0f} s")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(table + "\n")
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
