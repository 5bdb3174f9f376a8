"""``workbench generate MODEL --prompts FILE.jsonl --max-new-tokens N [--out STORE]``: answer prompts,
recording how every prompt and answer token was routed."""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from workbench.cli._common import (
    CLIError,
    add_capture_arguments,
    add_commit_argument,
    add_quantize_arguments,
    capture_options,
    check_prompts_process,
    check_store_out,
    check_vocab,
    check_writable_dir,
    device_name,
    dtype_name,
    positive_int,
    quantize_options,
    read_prompts,
    trace_summary,
)

__all__ = ["add_parser", "run"]


def run(args) -> int:
    import torch

    from workbench.checkpoint import load_model
    from workbench.generation import check_generation, generate
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor
    from workbench.runtime.memory import ContextLengthError, InsufficientMemoryError

    # Cheap checks first (flags, prompts, output paths), all before the model loads.
    prompts_path = Path(args.prompts)
    if args.images and not Path(args.images).is_dir():
        raise CLIError(f"--images {args.images} is not a directory")
    prompts = read_prompts(prompts_path, Path(args.images) if args.images else None)
    capture = capture_options(args) if args.out else None
    quantize = quantize_options(args)
    if args.capture != "router" and not args.out:
        raise CLIError("--capture needs --out (the trace store to record into)")
    inputs_hash = hashlib.sha256(prompts_path.read_bytes()).hexdigest()[:16]
    if args.out:
        check_store_out(Path(args.out), resume=False, overwrite=args.overwrite, inputs_hash=inputs_hash,
                        can_resume=False)
    if args.answers:
        answers = Path(args.answers)
        check_writable_dir(answers.parent, "--answers")
        if answers.is_dir():
            raise CLIError(f"--answers {answers} is a directory; give a file name (e.g. answers.jsonl)")
    model = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet, **quantize)
    proc = load_processor(args.model)
    check_vocab(proc, model)
    if args.prefill_chunk:
        model.prefill_chunk = args.prefill_chunk
    items = [{"text": p["text"], "images": p["images"]} for p in prompts]
    # checked before the store exists: each prompt as the processor sees it (errors name its line),
    # then every batch against the model's positions and this machine's memory
    check_prompts_process(proc, prompts, prompts_path, max_tokens=None, truncate=False)
    try:
        check_generation(model, proc, items, args.max_new_tokens, batch_size=args.batch_size,
                         names=[f"{prompts_path}:{p['line']}" for p in prompts],
                         memory_hint="a smaller --max-new-tokens or --batch-size, or shorter prompts")
    except ContextLengthError as e:
        raise CLIError(f"{e} (shorten the prompt or lower --max-new-tokens)") from None
    except InsufficientMemoryError as e:
        raise CLIError(str(e)) from None
    rec = None
    if args.out:
        rec = Recorder(model, Path(args.out), capture, processor=proc, overwrite=args.overwrite,
                       commit_every_seconds=args.commit_every,
                       provenance={"inputs_hash": inputs_hash, "prompts_file": str(prompts_path),
                                   "generation": {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                                                  "temperature": args.temperature, "top_p": args.top_p,
                                                  "seed": args.seed, "stop": args.stop}})
    ok = False
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            results = generate(model, proc, items, args.max_new_tokens, do_sample=args.do_sample,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                               recorder=rec, batch_size=args.batch_size, progress=not args.quiet)
        ok = True
    finally:
        if rec is not None:
            rec.close(complete=ok)
    lines = [json.dumps({"line": p["line"], **r.to_json()}, ensure_ascii=False) for p, r in zip(prompts, results)]
    if args.answers:
        Path(args.answers).parent.mkdir(parents=True, exist_ok=True)  # checked creatable up front
        tmp = Path(args.answers).with_name(Path(args.answers).name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(args.answers)  # all or nothing: a reader never sees half a file
    else:
        for p, r in zip(prompts, results):
            print(f"[{p['line']}] {r.text!r} ({len(r.token_ids)} tokens, {r.finish_reason})")
    seconds = time.perf_counter() - t0
    n_new = sum(len(r.token_ids) for r in results)
    print(f"generated {n_new:,} tokens for {len(prompts)} prompts in {seconds:.1f} s "
          f"({n_new / max(seconds, 1e-9):,.1f} tokens/s)")
    if rec is not None:
        print(trace_summary(Path(args.out), {"prompts": len(prompts), "tokens": rec.n_tokens, "seconds": seconds,
                                             "tokens_per_s": rec.n_tokens / max(seconds, 1e-9), "skipped_empty": []}))
    return 0


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _top_p(text: str) -> float:
    value = _temperature(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate answers to a prompts file, recording the routing of every token")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompts", required=True, help='JSONL file: {"text": ..., "images": [file, ...]} per line')
    p.add_argument("--images", help="folder the image file names resolve against (default: the prompts file's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--out", help="trace store to record prompts and answers into (a directory, e.g. runs/x.zarr)")
    p.add_argument("--answers", help="write the answers as JSONL here instead of printing them")
    add_capture_arguments(p)
    add_commit_argument(p)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_temperature, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the sampler")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch, left-padded (default: 8)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prompt tokens per prefill block (default: the model's, 4096)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace at --out")
    p.add_argument("--dtype", type=dtype_name, default=None, help="float32, bfloat16, float16 (default: as stored)")
    add_quantize_arguments(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
