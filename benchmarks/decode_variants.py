"""What-ifs for one decode step of ``wb.generate``, switched step by step inside the same generation.

Model: the embedded tiny Llama 4 (data/models/tiny-llama4), float32, CPU; ``--batch`` text prompts of
data/prompts/demo.jsonl, left-padded, greedy, ``--new`` tokens per call (the one-token decode steps
are what is timed; the prefill runs the shipped code). Each variant is a benchmark-only patch set
just before a decode step's forward pass and undone right after it:

* ``rms-layernorm``: RMSNorm (and the QK L2 norm) as ``F.layer_norm`` over ``[x, -x]`` (mean 0, so its
  variance is mean(x^2)): one fused kernel instead of the ~12 dispatches of CPU ``F.rms_norm``;
* ``rms-vecdot``: RMSNorm as ``x * rsqrt(vecdot(x, x) / H + eps) * w`` with in-place steps;
* ``rms-none``: every norm replaced by the identity: a ceiling (what the 12 norms of a step cost);
  wrong outputs, so not checked;
* ``moe-no-gather``: routed experts by the loop / ``torch._grouped_mm`` instead of gathered weights;
* ``moe-embedding-bag``: each assignment's products as ``F.embedding_bag`` over the experts' weight
  rows with the activations as per-sample weights: no weight copy;
* ``moe-dense``: every expert on every row (``bmm`` over all experts), the chosen row picked after;
* ``sdpa-fold``: single-token queries of one KV head folded into one query block
  (``(B, Hkv, G, D)`` instead of GQA over ``(B, Hq, 1, D)``): half the kernel's (batch, head) tasks.

Before timing, every variant except the ceiling runs a whole generation alone and its ids are
asserted equal to the shipped code's. Timing: ``--rounds`` generations; the decode steps cycle
through the variants (the shipped code, ``base``, among them), each cycle in the reverse order of the
one before (ABBA). Reported per variant: median step time, and per cycle the ratio base / variant
(> 1: the variant is faster) as median with a 95% bootstrap CI over cycles. Steps a few ms apart
share the machine's state, so this resolves differences of a few percent that whole-call A/B rounds
on this VM (20-30% swings between rounds) cannot.

    .venv/bin/python benchmarks/decode_variants.py [--batch 8] [--rounds 8] [--new 65] [--threads 2]
        [--variants rms-layernorm rms-none moe-no-gather ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from refactor_overhead import bootstrap_median_ci, cpu_model  # noqa: E402


def _rms_layernorm(self, x):
    H = x.shape[-1]
    return F.layer_norm(torch.cat([x, -x], -1), (2 * H,), None, None, self.eps)[..., :H] * self.weight


def _l2_layernorm(x, eps):
    H = x.shape[-1]
    return F.layer_norm(torch.cat([x, -x], -1), (2 * H,), None, None, eps)[..., :H]


def _rms_vecdot(self, x):
    H = x.shape[-1]
    return x * torch.linalg.vecdot(x, x).unsqueeze(-1).div_(H).add_(self.eps).rsqrt_() * self.weight


def _l2_vecdot(x, eps):
    H = x.shape[-1]
    return x * torch.linalg.vecdot(x, x).unsqueeze(-1).div_(H).add_(eps).rsqrt_()


def _experts_embedding_bag(xs, experts, gate_up_proj, down_proj):
    E, H, I2 = gate_up_proj.shape
    I = I2 // 2
    h = F.embedding_bag(experts[:, None] * H + torch.arange(H), gate_up_proj.view(E * H, I2),
                        per_sample_weights=xs, mode="sum")
    a = F.silu(h[:, :I]) * h[:, I:]
    return F.embedding_bag(experts[:, None] * I + torch.arange(I), down_proj.view(E * I, H),
                           per_sample_weights=a, mode="sum")


def _experts_dense(xs, experts, gate_up_proj, down_proj):
    E, H, I2 = gate_up_proj.shape
    I, N = I2 // 2, xs.shape[0]
    rows = torch.arange(N)
    h = torch.bmm(xs[None].expand(E, N, H), gate_up_proj)[experts, rows]
    a = F.silu(h[:, :I]) * h[:, I:]
    return torch.bmm(a[None].expand(E, N, I), down_proj)[experts, rows]


def _sdpa_fold(q, k, v, attn_mask=None, scale=None, enable_gqa=False, **kw):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if T != 1 or not enable_gqa or kw:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa, **kw)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=attn_mask, scale=scale)
    return out.reshape(B, Hq, 1, D)


def variants() -> dict:
    """name -> (list of (object, attribute, replacement)); the shipped code is ``base``."""
    from workbench.kernels import moe_torch
    from workbench.models.llama4 import model as M
    from workbench.runtime import attend

    folded_F = types.SimpleNamespace(scaled_dot_product_attention=_sdpa_fold)
    return {
        "base": [],
        "rms-layernorm": [(M.Llama4TextRMSNorm, "forward", _rms_layernorm), (M, "l2_norm", _l2_layernorm)],
        "rms-vecdot": [(M.Llama4TextRMSNorm, "forward", _rms_vecdot), (M, "l2_norm", _l2_vecdot)],
        "rms-none": [(M.Llama4TextRMSNorm, "forward", lambda self, x: x), (M, "l2_norm", lambda x, eps: x)],
        "moe-no-gather": [(moe_torch, "GATHER_MAX", 0)],
        "moe-embedding-bag": [(moe_torch, "_experts_gathered", _experts_embedding_bag)],
        "moe-dense": [(moe_torch, "_experts_gathered", _experts_dense)],
        "sdpa-fold": [(attend, "F", folded_F)],
    }


CEILINGS = {"rms-none"}  # wrong outputs on purpose: not compared


class Switcher:
    """Wraps the model's forward: each one-token call runs under the next variant of the cycle."""

    def __init__(self, model, table: dict, names: list[str]):
        self.model, self.table, self.names = model, table, names
        self.forward = model.forward
        self.times = {n: [] for n in names}
        self.only: str | None = None  # run every step under this variant (the equality check)
        self.i = 0

    def __call__(self, *args, **kw):
        if kw["input_ids"].shape[1] != 1:  # a prefill: the shipped code, untimed
            return self.forward(*args, **kw)
        n = len(self.names)
        cycle = self.names if (self.i // n) % 2 == 0 else self.names[::-1]
        name = self.only or cycle[self.i % n]
        self.i += 1
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in self.table[name]]
        for obj, attr, value in self.table[name]:
            setattr(obj, attr, value)
        try:
            t0 = time.perf_counter()
            out = self.forward(*args, **kw)
            dt = time.perf_counter() - t0
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)
        if self.only is None:
            self.times[name].append(dt)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--threads", type=int, default=2)
    table_names = [n for n in variants() if n != "base"]
    ap.add_argument("--variants", nargs="+", default=table_names, choices=table_names)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False).eval()
    proc = wb.load_processor(EMBEDDED_MODEL)
    rows = [json.loads(x) for x in (ROOT / "data/prompts/demo.jsonl").read_text().splitlines() if x.strip()]
    texts = [r["text"] for r in rows if not r.get("images") and "<|image|>" not in r["text"]][:args.batch]
    assert len(texts) == args.batch, f"only {len(texts)} text prompts"
    names = ["base"] + list(args.variants)
    sw = Switcher(model, variants(), names)
    model.forward = sw

    def run():
        return [g.token_ids for g in wb.generate(model, proc, texts, args.new, batch_size=args.batch)]

    sw.only = "base"
    ref = run()
    for name in args.variants:
        if name not in CEILINGS:
            sw.only = name
            assert run() == ref, f"{name}: generated ids differ from the shipped code's"
    sw.only = None
    run()  # warm-up of the cycle
    sw.times = {n: [] for n in names}
    sw.i = 0
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        sw.i -= sw.i % len(names)  # each generation starts a whole cycle
        run()
    cycles = min(len(v) for v in sw.times.values())
    t = {n: np.asarray(v[:cycles]) for n, v in sw.times.items()}
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; {cpu_model()} "
          f"({os.cpu_count()} cores); torch {torch.__version__}; {torch.get_num_threads()} threads set (decode "
          f"steps of a small model run on one: workbench.generation); batch {args.batch}; {cycles} cycles; load "
          f"{load0[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    res = {"argv": sys.argv, "cpu": cpu_model(), "platform": platform.platform(), "torch": torch.__version__,
           "cycles": cycles, "variants": {}}
    for n in names:
        r = t["base"] / t[n]
        lo, hi = bootstrap_median_ci(r)
        res["variants"][n] = {"step_ms": float(np.median(t[n]) * 1e3), "base_over": float(np.median(r)),
                              "ci95": (lo, hi)}
        print(f"{n:>18}: step {np.median(t[n]) * 1e3:6.2f} ms; base / {n} per cycle {np.median(r):.3f} "
              f"(95% CI {lo:.3f} .. {hi:.3f})" + ("  [ceiling: wrong outputs]" if n in CEILINGS else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
