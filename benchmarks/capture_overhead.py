"""Capture overhead on CPU: the same model and inputs, recorder off vs on, side by side in one process.

Model: the embedded tiny Llama 4 (data/models/tiny-llama4). Inputs: 8 x 512 random text tokens.
Each round times a streak of ``--passes`` plain forward passes and a streak of recorded ones
(router ids + weights, optionally float16 logits; the recorded streak ends with ``flush()``, so
every byte is in the store when the clock stops, while the writer thread overlaps the next
forward passes as it does in a real run), in alternating order; prints medians and the ratio.

    python benchmarks/capture_overhead.py [--rounds 7] [--logits]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import workbench as wb
from workbench.embedded import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--logits", action="store_true", help="also capture float16 router logits")
    ap.add_argument("--passes", type=int, default=8, help="forward passes per timed streak")
    ap.add_argument("--commit-every", type=int, default=0, help="Recorder(commit_every_tokens=N); 0 = every pass")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = wb.load_model(default_model_dir(), progress=False)
    vocab = model.config.text.vocab_size
    ids = torch.randint(0, vocab - 32, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    capture = ("router", "logits") if args.logits else ("router",)
    with tempfile.TemporaryDirectory() as d:
        rec = wb.record(model, Path(d) / "t.zarr", capture=capture, commit_every_tokens=args.commit_every)
        model(input_ids=ids)  # warm-up
        plain, recorded = [], []
        for r in range(args.rounds):
            for kind in (("plain", "rec") if r % 2 == 0 else ("rec", "plain")):
                if kind == "rec":
                    rec.attach()
                    t0 = time.perf_counter()
                    for _ in range(args.passes):
                        model(input_ids=ids)
                    rec.flush()  # the clock stops only when everything is written
                    recorded.append(time.perf_counter() - t0)
                    rec.detach()
                else:
                    t0 = time.perf_counter()
                    for _ in range(args.passes):
                        model(input_ids=ids)
                    plain.append(time.perf_counter() - t0)
        rec.close()
    p, q = statistics.median(plain) * 1e3, statistics.median(recorded) * 1e3
    print(f"# capture overhead, {args.passes} passes of {args.batch} x {args.seq} tokens, capture={capture}, "
          f"{torch.get_num_threads()} threads, commit every {args.commit_every or 'pass'}")
    print(f"plain {p:.0f} ms, recorded (incl. every store write) {q:.0f} ms, overhead {100 * (q / p - 1):+.1f}%")


if __name__ == "__main__":
    main()
