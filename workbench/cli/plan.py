"""``workbench plan MODEL --gpus 1xH100-80GB --quantize int4 --context 32k --batch 1``: will it fit?

Prints the memory plan of :func:`workbench.runtime.plan.plan` (weights by part, KV cache,
activations per prefill block, recorder buffers, total against capacity, the verdict and the
cheapest configuration that fits); ``--json`` prints the same numbers as JSON. Exit 0 whether
or not the configuration fits (the verdict says); a bad flag value (a GPU spec, a quantize mode, a
size) is one line ``workbench plan: error: ...`` and exit 2.
"""
from __future__ import annotations

import re

from workbench.cli._common import CLIError

__all__ = ["add_parser", "run", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_size(text: str, flag: str, zero_ok: bool = False) -> int:
    """``"32768"``, ``"32k"`` (x1024), ``"1M"`` (x1024^2) -> int; CLIError naming ``flag`` otherwise."""
    m = _SIZE.match(str(text))
    if m is None:
        raise CLIError(f"{flag}: expected a positive integer such as 32768 or 32k, got {text!r}")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if n < (0 if zero_ok else 1):
        raise CLIError(f"{flag}: must be {'0 or more' if zero_ok else 'at least 1'}, got {text!r}")
    return n


def run(args) -> int:
    from workbench.runtime.plan import PlanError, plan, plan_json

    try:
        p = plan(args.model, args.gpus, args.quantize, context=parse_size(args.context, "--context"),
                 batch=parse_size(args.batch, "--batch"), capture=args.capture,
                 quantize_modules=args.quantize_modules, dtype=args.dtype,
                 block=None if args.block is None else parse_size(args.block, "--block"),
                 logits_to_keep=parse_size(args.logits_to_keep, "--logits-to-keep", zero_ok=True),
                 image_tiles=None if args.image_tiles is None else parse_size(args.image_tiles, "--image-tiles",
                                                                              zero_ok=True))
    except PlanError as e:
        raise CLIError(str(e)) from None
    print(plan_json(p) if args.json else p.table())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory plan: weights by part, KV cache, activations and recorder buffers "
                                    "against the GPUs' memory, with a verdict and the cheapest configuration "
                                    "that fits")
    p.add_argument("model", help="preset (scout, maverick) or checkpoint directory (its config.json)")
    p.add_argument("--gpus", default="1xH100-80GB",
                   help="COUNTxCARD-MEMORYGB: 1xH100-80GB (default), 8xH100-80GB, 1xH200-141GB, ...")
    p.add_argument("--quantize", default="none", help="none (default), fp8 or int4: the routed experts' weights")
    p.add_argument("--quantize-modules", default=None,
                   help="also quantize these (comma-separated): shared_expert, dense_mlp, attention")
    p.add_argument("--context", default="8192", help="tokens per row, prompt + generated (32768 or 32k; default 8192)")
    p.add_argument("--batch", default="1", help="rows (default 1)")
    p.add_argument("--capture", default="router",
                   help="what a recording captures, comma-separated: router (always), logits, attention")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the unquantized weights, activations and KV cache")
    p.add_argument("--block", default=None, help="prefill block in tokens (default: the model's prefill chunk)")
    p.add_argument("--logits-to-keep", default="0",
                   help="0 (default): logits of every token, as a plain forward; 1: the last token's (generation)")
    p.add_argument("--image-tiles", default=None,
                   help="image tiles per row for --capture attention (default 17: the largest image)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=run)
