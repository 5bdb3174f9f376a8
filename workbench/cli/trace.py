"""``workbench trace MODEL --prompts FILE.jsonl --out STORE``: record a prompt set into a trace.

MODEL: a Llama 4 checkpoint (workbench's own model) or a transformers checkpoint of any MoE family
with a routing adapter (loaded with transformers; ``--device-map``, ``--dtype``; ``--loader``).
``--tp N`` under ``torchrun --nproc-per-node N``: tensor parallelism (workbench.runtime.parallel);
rank 0 writes the store, a failing rank stops every rank with its name.
"""
from __future__ import annotations

import hashlib
import json
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
    checkpoint_loader,
    device_name,
    dtype_name,
    load_transformers_checkpoint,
    positive_int,
    quantize_options,
    read_prompts,
    trace_summary,
)

__all__ = ["add_parser", "run"]


def run(args) -> int:
    if not getattr(args, "tp", None):
        return _run(args, None)
    from workbench.runtime import parallel

    tp = parallel.init()
    if tp.size != args.tp:
        raise CLIError(f"--tp {args.tp} but {tp.size} processes were started: run under torchrun --nproc-per-node "
                       f"{args.tp}")
    with parallel.guard(tp):
        return _run(args, tp)


def _run(args, tp) -> int:
    import torch

    from workbench.checkpoint import load_model
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor
    from workbench.runtime.memory import InsufficientMemoryError

    # Cheap checks first: flags (argparse), prompts, captures and --out, all before the model loads.
    prompts_path = Path(args.prompts)
    if args.images and not Path(args.images).is_dir():
        raise CLIError(f"--images {args.images} is not a directory")
    prompts = read_prompts(prompts_path, Path(args.images) if args.images else None)
    capture = capture_options(args)
    quantize = quantize_options(args)
    inputs_hash = hashlib.sha256(prompts_path.read_bytes()).hexdigest()[:16]
    out = Path(args.out)
    if tp is None or tp.rank == 0:  # rank 0 owns the store
        check_store_out(out, resume=args.resume, overwrite=args.overwrite, inputs_hash=inputs_hash)
    provenance = {"inputs_hash": inputs_hash, "prompts_file": str(prompts_path)}
    loader = checkpoint_loader(Path(args.model), args.loader)
    _check_max_tokens(Path(args.model), args.max_tokens)
    if loader == "transformers":
        import transformers

        if tp is not None:
            raise CLIError("--tp applies to Llama 4 checkpoints loaded with workbench")
        if quantize:
            raise CLIError("--quantize applies to Llama 4 checkpoints loaded with workbench")
        if any(p["images"] for p in prompts):
            raise CLIError("prompts with images need a multimodal Llama 4 checkpoint loaded with workbench")
        model, proc = load_transformers_checkpoint(Path(args.model), dtype=args.dtype, device=args.device,
                                                   device_map=args.device_map, progress=not args.quiet)
        provenance.update(loader="transformers", transformers_version=transformers.__version__)
    else:
        if args.device_map is not None:
            raise CLIError("--device-map applies to checkpoints loaded with transformers (use --device)")
        model = load_model(args.model, dtype=args.dtype, device=args.device or (tp.device if tp else None), tp=tp,
                           progress=not args.quiet, **quantize)
        proc = load_processor(args.model)
    check_vocab(proc, model)
    # a prompt the processor refuses fails here, naming its line, not after Recorder created the store
    limit = getattr(getattr(model, "text_config", None), "max_position_embeddings", None)  # workbench's Llama 4
    check_prompts_process(proc, prompts, prompts_path, max_tokens=args.max_tokens, truncate=args.truncate,
                          max_positions=limit)
    if not args.resume:  # too big for this machine's memory: said before the store exists (a resumed
        # run's batches are other ones; the model's own check still runs before each allocation)
        try:
            Recorder.check_run(model, proc, prompts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                               truncation=args.truncate, names=[f"{prompts_path}:{p['line']}" for p in prompts],
                               batch_size_name=f"--batch-size (now {args.batch_size})")
        except InsufficientMemoryError as e:
            raise CLIError(str(e)) from None
    rec = Recorder(model, out, capture, processor=proc, resume=args.resume, overwrite=args.overwrite,
                   provenance=provenance, commit_every_seconds=args.commit_every)
    ok = False
    try:
        with torch.no_grad():
            summary = rec.run(model, proc, prompts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                              truncation=args.truncate, progress=not args.quiet)
        ok = True
    finally:
        rec.close(complete=ok)
    if tp is None or tp.rank == 0:
        print(trace_summary(out, summary))
    return 0


def _check_max_tokens(model: Path, max_tokens: int | None) -> None:
    """CLIError when ``--max-tokens`` is above the model's max_position_embeddings (config.json, or
    its text_config): the model refuses longer inputs, after the weights loaded. A config.json
    that cannot be read is left to the loader to report."""
    if max_tokens is None:
        return
    try:
        cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
        limit = (cfg.get("text_config") or cfg).get("max_position_embeddings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        return
    if isinstance(limit, int) and max_tokens > limit:
        raise CLIError(f"--max-tokens {max_tokens} is more than the model's max_position_embeddings {limit} "
                       f"({model / 'config.json'}); pass --max-tokens {limit} or less")


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="record router decisions over a prompts file into a zarr trace store")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json): Llama 4, or any "
                                 "transformers MoE family with a routing adapter (Mixtral, Qwen-MoE, OLMoE, ...)")
    p.add_argument("--prompts", required=True, help='JSONL file: {"text": ..., "images": [file, ...]} per line')
    p.add_argument("--images", help="folder the image file names resolve against (default: the prompts file's)")
    p.add_argument("--out", required=True, help="trace store to create (a directory, e.g. runs/x.zarr)")
    add_capture_arguments(p)
    add_commit_argument(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="longest prompt allowed (tokens); longer is an error")
    p.add_argument("--truncate", action="store_true", help="truncate prompts longer than --max-tokens instead")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--resume", action="store_true", help="continue an incomplete store from its committed length")
    store.add_argument("--overwrite", action="store_true", help="replace an existing trace at --out")
    p.add_argument("--dtype", type=dtype_name, default=None, help="float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--device-map", default=None,
                   help="transformers checkpoints: device_map for from_pretrained (auto, balanced, ...)")
    p.add_argument("--loader", choices=("auto", "workbench", "transformers"), default="auto",
                   help="who loads MODEL: auto (Llama 4 with workbench, other MoE families with transformers), "
                        "workbench, or transformers (also for Llama 4)")
    p.add_argument("--tp", type=positive_int, default=None,
                   help="tensor parallelism over N processes: run under torchrun --nproc-per-node N")
    add_quantize_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
