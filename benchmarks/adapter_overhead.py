"""Adapter capture overhead on transformers MoE models, side by side with nnsight, in one process.

Models: a tiny random Mixtral and Qwen3-MoE built with transformers' own config classes (hidden
``--hidden`` 256, 4 layers, 8 experts, top-2, vocab 2048), float32, eager attention. A streak is
``--passes`` (8) forward passes of ``--batch`` x ``--seq`` (4 x 256) random tokens under
``torch.no_grad()``. Variants, each timed over the same streaks:

* ``plain``: the model alone;
* ``recorder``: ``wb.record`` (router + float32 logits: ids, applied weights and full logits of
  every MoE layer) into a temp store, kept open and attached around each streak; every streak
  ends with ``rec.flush()``, so every byte is committed to zarr when the clock stops;
* ``adapter``: the adapter's hook points alone (``adapter_for(model).routers``), a listener per
  MoE layer keeping (logits, ids, weights) for the streak: the capture path without the store,
  what nnsight's save path does;
* ``recorder-no-floor`` (``--variants recorder-no-floor``): the same recorder with queue places of
  one pass however short (``PLACE_TOKENS = 0``): the writer then wakes every 3 passes of fewer
  than 256 tokens; shows what the floor is worth on short passes (``--batch 1 --seq 1``);
* ``recorder-deferred`` (``--variants recorder-deferred``): a recorder whose writer thread sleeps
  through the streak (``queue_size=4096``, ``commit_every_seconds=3600``) and writes and commits it at
  the flush, inside the timed streak: the same work, none of it during the passes; shows what the
  writer's wake-ups during the passes cost beyond their own CPU time;
* ``nnsight``: ``NNsight(model).trace(ids)`` per pass, saving the same router outputs (each gate
  module's output tuple: logits, weights, ids) with ``.output.save()``; the saved tensors are kept
  for the streak (nothing written to disk: nnsight's save path only).

Rounds: a warm-up streak of each variant, then ``--rounds`` rounds, even rounds in order, odd
rounds reversed (ABAB). Reported: median ms per streak, overhead variant/plain - 1 (median and
95 % bootstrap CI over rounds; and the ratio of the variants' fastest streaks, the least disturbed
on a shared machine), nnsight/recorder time ratio and how many ms a pass costs less than under
nnsight (the same round's streaks, per pass; each with a 95% bootstrap CI over rounds), 1-min load
average at start and end.

nnsight is a benchmark-only dependency: run this with an interpreter that has it (a separate venv
that also sees this project's packages); without it the nnsight variant is skipped and said so.
One way: ``python -m venv /tmp/nns``; in its site-packages a ``project.pth`` holding the path of
``.venv``'s site-packages and a ``zz_workbench.pth`` holding the line ``import
__editable___moe_workbench_0_1_0_finder; __editable___moe_workbench_0_1_0_finder.install()``;
then ``/tmp/nns/bin/pip install nnsight`` (torch and transformers are found, not reinstalled).

    python benchmarks/adapter_overhead.py [--rounds 10] [--passes 8] [--batch 4] [--seq 256]
        [--threads 2] [--device cpu] [--models mixtral qwen3_moe] [--variants recorder-no-floor]
        [--json out.json]
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
from workbench.hooks.adapters import adapter_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from refactor_overhead import bootstrap_median_ci  # noqa: E402

try:
    from nnsight import NNsight
    import nnsight
    NNSIGHT = nnsight.__version__
except ImportError:  # benchmark-only dependency
    NNsight, NNSIGHT = None, None


def build(name: str, args):
    import transformers as T

    base = dict(vocab_size=2048, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8, max_position_embeddings=4096,
                initializer_range=0.1)
    if name == "mixtral":
        cfg = T.MixtralConfig(**base, num_local_experts=8, num_experts_per_tok=2)
        cls = T.MixtralForCausalLM
    elif name == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**base, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=2 * args.hidden,
                               norm_topk_prob=True)
        cls = T.Qwen3MoeForCausalLM
    else:
        raise SystemExit(f"unknown model {name!r}")
    torch.manual_seed(0)
    model = cls(cfg)
    model.set_attn_implementation("eager")
    return model.to(args.device).eval()


def gate_modules(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_model(name: str, args, tmp: Path) -> dict:
    model = build(name, args)
    ids = torch.randint(0, 2000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    rec = wb.record(model, tmp / f"{name}.zarr", capture={"router": {}, "logits": {"dtype": "float32"}})
    rec.detach()
    old_rec = None
    if "recorder-no-floor" in args.variants:  # the queue as before PLACE_TOKENS: a place per pass of this size
        import workbench.hooks.recorder as R

        saved, R.PLACE_TOKENS = R.PLACE_TOKENS, 0
        try:
            old_rec = wb.record(model, tmp / f"{name}-nofloor.zarr",
                                capture={"router": {}, "logits": {"dtype": "float32"}})
        finally:
            R.PLACE_TOKENS = saved
        old_rec.detach()
    deferred = None
    if "recorder-deferred" in args.variants:  # the writer sleeps through the streak, takes it at the flush
        deferred = wb.record(model, tmp / f"{name}-deferred.zarr",
                             capture={"router": {}, "logits": {"dtype": "float32"}},
                             queue_size=4096, commit_every_seconds=3600.0)
        deferred.detach()
    nn_model = NNsight(model) if NNsight is not None else None
    gates = gate_modules(model)
    kept: list = []
    adapter = adapter_for(model)
    listeners = []

    def keep(point, router_logits, topk_ids, topk_weights):
        kept.append((router_logits, topk_ids, topk_weights))

    def streak(kind: str) -> float:
        kept.clear()
        sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if kind == "plain":
                for _ in range(args.passes):
                    model(input_ids=ids)
            elif kind in ("recorder", "recorder-no-floor", "recorder-deferred"):
                r = {"recorder": rec, "recorder-no-floor": old_rec, "recorder-deferred": deferred}[kind]
                r.attach()
                for _ in range(args.passes):
                    model(input_ids=ids)
                r.flush()
                r.detach()
            elif kind == "adapter":
                listeners.extend(p.add(keep) for p in adapter.routers)
                for _ in range(args.passes):
                    model(input_ids=ids)
                for h in listeners:
                    h.remove()
                listeners.clear()
            elif kind == "nnsight":
                for _ in range(args.passes):
                    saves = []
                    with nn_model.trace(ids):
                        for g in range(len(gates)):
                            saves.append(nn_model.model.layers[g].mlp.gate.output.save())
                    kept.append(saves)
        sync(args.device)
        return time.perf_counter() - t0

    kinds = ["plain", "adapter", "recorder"] + (["recorder-no-floor"] if old_rec is not None else []) \
        + (["recorder-deferred"] if deferred is not None else []) + (["nnsight"] if nn_model is not None else [])
    for k in kinds:  # warm-up
        streak(k)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            times[k].append(streak(k))
        print(f"  {name} round {r}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f}" for k in kinds)
              + f" ms; load {os.getloadavg()[0]:.2f}", flush=True)
    rec.close()
    for r_ in (old_rec, deferred):
        if r_ is not None:
            r_.close()
    adapter.close()
    ds = wb.open_trace(tmp / f"{name}.zarr")
    expected = (1 + args.rounds) * args.passes * args.batch * args.seq
    assert ds.sizes["token"] == expected, (ds.sizes["token"], expected)
    if kept and isinstance(kept[-1], list):  # nnsight saved the decisions the recorder stored (last pass)
        ids_nn = torch.stack([s[2] for s in kept[-1]], 1).cpu().numpy()
        np.testing.assert_array_equal(ids_nn, ds["topk_expert"].values[-ids.numel():])
    plain = np.asarray(times["plain"])
    out = {"load_start": load0, "load_end": os.getloadavg(), "tokens_per_streak": args.passes * ids.numel(),
           "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
           "min_ms": {k: min(v) * 1e3 for k, v in times.items()}}
    for k in kinds[1:]:
        over = np.asarray(times[k]) / plain - 1
        lo, hi = bootstrap_median_ci(over)
        out[f"{k}_overhead"] = {"median": float(np.median(over)), "ci95": (lo, hi),
                                "of_minima": min(times[k]) / min(times["plain"]) - 1,
                                "per_pass_ms": float(np.median(np.asarray(times[k]) - plain)) / args.passes * 1e3}
    if "nnsight" in times:
        for k in [k for k in kinds if k not in ("plain", "nnsight")]:
            ratio = np.asarray(times["nnsight"]) / np.asarray(times[k])
            out[f"nnsight_over_{k}"] = {"median": float(np.median(ratio)), "ci95": bootstrap_median_ci(ratio)}
            # the same round's streaks: how much less a pass costs than under nnsight (> 0: faster)
            saved = (np.asarray(times["nnsight"]) - np.asarray(times[k])) / args.passes * 1e3
            out[f"{k}_saves_ms_per_pass"] = {"median": float(np.median(saved)), "ci95": bootstrap_median_ci(saved)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral", "qwen3_moe"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="*", default=[], choices=["recorder-no-floor", "recorder-deferred"],
                    help="recorder-no-floor: a second recorder whose queue places are passes, however short "
                         "(workbench.hooks.inbox.PLACE_TOKENS = 0), i.e. the writer's batching before the floor; "
                         "recorder-deferred: a recorder whose writer sleeps through each streak (4096 queue places, "
                         "commits every hour) and writes it at the flush, i.e. no writer work during the passes")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({args.threads} threads)"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, nnsight {NNSIGHT or 'not installed'}"
          f"; device {dev}; streak = {args.passes} x ({args.batch} x {args.seq}) tokens; load {os.getloadavg()}",
          flush=True)
    results = {"device": dev, "nnsight": NNSIGHT, "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = run_model(name, args, Path(tmp))
            results["models"][name] = r
            line = f"{name}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in r["ms"].items())
            for k in ("adapter", "recorder", "recorder-no-floor", "recorder-deferred", "nnsight"):
                if f"{k}_overhead" in r:
                    o = r[f"{k}_overhead"]
                    line += (f"; {k} {o['median']:+.1%} [{o['ci95'][0]:+.1%}, {o['ci95'][1]:+.1%}] "
                             f"(minima {o['of_minima']:+.1%}, {o['per_pass_ms']:+.2f} ms/pass)")
            for k in ("adapter", "recorder", "recorder-no-floor", "recorder-deferred"):
                if f"nnsight_over_{k}" in r:
                    q, d = r[f"nnsight_over_{k}"], r[f"{k}_saves_ms_per_pass"]
                    line += (f"; nnsight/{k} {q['median']:.2f}x [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}], "
                             f"{k} {d['median']:+.2f} ms/pass faster [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
            print(line, flush=True)
    if NNSIGHT is None:
        print("nnsight is not installed here: its variant was skipped (install it in a separate venv)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
