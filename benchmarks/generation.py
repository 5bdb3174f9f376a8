"""Decode speed: ``wb.generate`` vs transformers' ``generate`` (its own cache), side by side in one process.

Model: the embedded tiny Llama 4 (data/models/tiny-llama4), float32, CPU, ``--threads`` torch
threads (default 2). Both load the same checkpoint. Prompts: the demo prompts
(data/prompts/demo.jsonl; the text-only ones), in file order, skipping any whose greedy answer ends on an
end-of-sequence id before ``--new`` tokens (so both produce exactly ``--new`` tokens: transformers
gets ``min_new_tokens = max_new_tokens``, workbench stops at ``length``); batch 1 uses the first
prompt, batch 8 the first 8 (left-padded by the processor, the same batch for both). Greedy.

Before timing, the generated ids of both are asserted equal (every row, every token). In a
left-padded batch transformers takes the NoPE temperature from the padded buffer index rather than
the position, so its padded rows may differ from what they compute alone; then each workbench row
is asserted equal to transformers' generate on that prompt alone, and the differing rows are printed.

Timing: each "run" is one ``generate`` call (processor call included for workbench, which takes
strings; transformers gets the processor output made once outside the clock). Two lengths are
timed, ``--new`` and 1 new token: decode tokens/s = rows x (new - 1) / (t(new) - t(1)), i.e. the
prefill and the per-call setup cancel; end-to-end tokens/s = rows x new / t(new) is printed too.
Extra workbench variants (``--variants``, default ``no-gather no-inference-mode``; benchmark-only
switches set around the call): ``wb-device-sort``: the decode steps' expert assignments sorted on
the device as in a prefill (``workbench.kernels.moe_torch.HOST_SORT_MAX = 0``), i.e. without the
host sort of few assignments; ``wb-all-threads``: decode steps on every torch thread
(``workbench.generation.SINGLE_THREAD_DECODE_MACS = 0``), i.e. without the one-thread policy for
small models; ``wb-no-gather``: the routed experts of a decode step by the loop or
``torch._grouped_mm`` instead of the gathered-weights ``bmm`` (``moe_torch.GATHER_MAX = 0``);
``wb-no-inference-mode``: ``wb.generate`` under ``torch.no_grad`` instead of
``torch.inference_mode`` (``torch.inference_mode`` replaced by ``torch.no_grad`` during the call).
Each shows what that part of the decode path is worth.
Rounds: warm-up of every variant, then ``--rounds`` rounds; even rounds run (wb, hf), odd rounds
(hf, wb) (ABAB), each variant as (new, 1) back to back. Per-round ratio wb/hf of decode tokens/s:
median with a 95% bootstrap CI over rounds.

    .venv/bin/python benchmarks/generation.py [--rounds 10] [--new 64] [--threads 2] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from refactor_overhead import bootstrap_median_ci, cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="*", default=["no-gather", "no-inference-mode"],
                    choices=["device-sort", "all-threads", "no-gather", "no-inference-mode"],
                    help="extra workbench variants (see above)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import transformers

    import workbench as wb
    from workbench import generation
    from workbench.kernels import moe_torch
    from workbench.embedded import EMBEDDED_MODEL

    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False).eval()
    proc = wb.load_processor(EMBEDDED_MODEL)
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    attn_impl = getattr(hf.config, "_attn_implementation", None)
    rows = [json.loads(x) for x in (ROOT / "data/prompts/demo.jsonl").read_text().splitlines() if x.strip()]
    texts = [r["text"] for r in rows if not r.get("images") and "<|image|>" not in r["text"]]  # text prompts
    # prompts whose greedy answer runs the full length (no end-of-sequence id before --new tokens)
    full = [t for t, g in zip(texts, wb.generate(model, proc, texts, args.new, batch_size=1)) if g.finish_reason == "length"]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "threads": torch.get_num_threads(), "new": args.new, "hf_attn_implementation": attn_impl,
           "prompts_full_length": len(full), "prompts": len(texts), "sets": {}}
    print(f"# {res['date']}; {res['machine']['cpu']} ({res['machine']['cores']} cores); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {torch.get_num_threads()} threads; transformers attention "
          f"{attn_impl}; {len(full)}/{len(texts)} demo prompts run {args.new} tokens without eos", flush=True)

    for B in args.batches:
        prompts = full[:B]
        assert len(prompts) == B, f"only {len(full)} full-length prompts"
        enc = proc(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        T0 = enc["input_ids"].shape[1]

        def run_wb(n):
            return wb.generate(model, proc, prompts, n, batch_size=B)

        def patched(module, name, value):
            def run(n):
                old = getattr(module, name)
                setattr(module, name, value)
                try:
                    return run_wb(n)
                finally:
                    setattr(module, name, old)
            return run

        variants = {"wb-device-sort": patched(moe_torch, "HOST_SORT_MAX", 0),
                    "wb-all-threads": patched(generation, "SINGLE_THREAD_DECODE_MACS", 0),
                    "wb-no-gather": patched(moe_torch, "GATHER_MAX", 0),
                    "wb-no-inference-mode": patched(torch, "inference_mode", torch.no_grad)}
        variants = {k: v for k, v in variants.items() if k[3:] in args.variants}

        def run_hf(n):
            return hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        # -- equality --------------------------------------------------------------------------
        a = [g.token_ids for g in run_wb(args.new)]
        b = run_hf(args.new)[:, T0:].tolist()
        for name, fn in variants.items():
            assert [g.token_ids for g in fn(args.new)] == a, f"{name} ids differ"
        assert all(len(x) == args.new for x in a) and all(len(x) == args.new for x in b), "lengths differ"
        hf_batched_rows_differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if hf_batched_rows_differ:
            # transformers takes the NoPE temperature from the buffer index, not the position, so its
            # left-padded rows differ from what they compute alone (workbench follows the position):
            # compare each row with transformers run on that prompt alone (no padding)
            alone = []
            for t in prompts:
                e1 = proc(text=[t], return_tensors="pt")
                alone.append(hf.generate(input_ids=e1["input_ids"], attention_mask=e1["attention_mask"],
                                         max_new_tokens=args.new, min_new_tokens=args.new,
                                         do_sample=False)[0, e1["input_ids"].shape[1]:].tolist())
            assert a == alone, "generated ids differ from transformers on each prompt alone: " + str(
                [i for i, (x, y) in enumerate(zip(a, alone)) if x != y])
            print(f"batch {B}: transformers' left-padded batch differs from workbench in rows {hf_batched_rows_differ} "
                  "(its NoPE temperature follows the padded buffer index); workbench's rows equal transformers on "
                  "each prompt alone", flush=True)
        print(f"batch {B} (prompt length {T0} incl. padding, {int(enc['attention_mask'].sum())} real tokens): "
              f"generated ids equal ({B} x {args.new})", flush=True)

        fns = {"wb": run_wb, "hf": run_hf}
        fns.update(variants)
        for k in fns:  # warm-up
            fns[k](args.new)
            fns[k](1)
        times = {(k, n): [] for k in fns for n in (args.new, 1)}
        load0 = os.getloadavg()
        t_set = time.perf_counter()
        for r in range(args.rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                for n in (args.new, 1):
                    t0 = time.perf_counter()
                    fns[k](n)
                    times[(k, n)].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {n}: {times[(k, n)][-1] * 1e3:.0f} ms" for k, n in times)
                  + f"; load {os.getloadavg()[0]:.2f}", flush=True)
        out = {"hf_batched_rows_differ": hf_batched_rows_differ, "load_start": load0, "load_end": os.getloadavg(), "seconds": time.perf_counter() - t_set,
               "prompt_len": T0, "ms": {f"{k}_{n}": [x * 1e3 for x in v] for (k, n), v in times.items()}}
        dec = {}
        for k in fns:
            full_t, one_t = np.array(times[(k, args.new)]), np.array(times[(k, 1)])
            dec[k] = B * (args.new - 1) / (full_t - one_t)  # per round
            out[f"{k}_decode_tok_s"] = float(np.median(dec[k]))
            out[f"{k}_e2e_tok_s"] = float(np.median(B * args.new / full_t))
            out[f"{k}_step_ms"] = float(np.median((full_t - one_t) / (args.new - 1) * 1e3))
        for name in variants:
            lr = dec[name] / dec["hf"]
            llo, lhi = bootstrap_median_ci(lr)
            out[f"ratio_decode_{name}"] = {"median": float(np.median(lr)), "ci95": (llo, lhi)}
            print(f"batch {B}: {name}: decode {out[f'{name}_decode_tok_s']:.0f} tokens/s "
                  f"({out[f'{name}_step_ms']:.2f} ms/step), ratio to hf {np.median(lr):.2f}x "
                  f"(95% CI {llo:.2f} .. {lhi:.2f})", flush=True)
        ratio = dec["wb"] / dec["hf"]
        lo, hi = bootstrap_median_ci(ratio)
        e2e = np.array(times[("hf", args.new)]) / np.array(times[("wb", args.new)])
        elo, ehi = bootstrap_median_ci(e2e)
        out.update(ratio_decode={"median": float(np.median(ratio)), "ci95": (lo, hi), "values": ratio.tolist()},
                   ratio_e2e={"median": float(np.median(e2e)), "ci95": (elo, ehi)})
        res["sets"][f"batch{B}"] = out
        print(f"batch {B}: decode tokens/s wb {out['wb_decode_tok_s']:.0f} ({out['wb_step_ms']:.2f} ms/step), "
              f"hf {out['hf_decode_tok_s']:.0f} ({out['hf_step_ms']:.2f} ms/step); per-round ratio wb/hf median "
              f"{np.median(ratio):.2f}x (95% CI {lo:.2f} .. {hi:.2f}); end-to-end ({args.new} tokens incl. prefill) "
              f"wb {out['wb_e2e_tok_s']:.0f} vs hf {out['hf_e2e_tok_s']:.0f} tokens/s, ratio {np.median(e2e):.2f}x "
              f"({elo:.2f} .. {ehi:.2f}); load {load0[0]:.2f} -> {out['load_end'][0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
