"""Command line: ``workbench info|trace|demo|export``.

    workbench info PATH            architecture of a checkpoint dir or preset (scout, maverick),
                                   or a summary of a trace store
    workbench trace MODEL --prompts FILE.jsonl --out STORE ...
    workbench demo                 trace the bundled prompts with the embedded default model
    workbench export STORE --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "describe_model"]


def _ranges(idx: list[int]) -> str:
    """[0,1,2,4,5] -> '0-2, 4-5'."""
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def _b(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_model(config, source: str = "") -> str:
    """Human-readable architecture summary of a :class:`~workbench.models.llama4.config.ModelConfig`."""
    t = config.text
    L = t.num_hidden_layers
    moe = t.moe_layers
    rope = [i for i in range(L) if t.uses_rope[i]]
    nope = [i for i in range(L) if not t.uses_rope[i]]
    counts = config.parameter_counts()
    lines = [f"{config.architecture}" + (f"  ({source})" if source else "")]
    lines.append(f"text decoder: {L} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads / "
                 f"{t.num_key_value_heads} KV heads (head_dim {t.head_dim}), vocab {t.vocab_size}")
    dense = [i for i in range(L) if i not in moe]
    lines.append(f"  MoE layers ({len(moe)}): {_ranges(moe)}; {t.num_local_experts} experts, top-{t.num_experts_per_tok}"
                 f" (sigmoid score on the expert input) + shared expert, expert FFN {t.intermediate_size}")
    lines.append(f"  dense layers ({len(dense)}): {_ranges(dense)}" + (f"; FFN {t.intermediate_size_mlp}" if dense else ""))
    chunk = f"chunked attention, {t.attention_chunk_size}-token chunks" if t.attention_chunk_size else "causal attention"
    lines.append(f"  RoPE layers ({len(rope)}): {_ranges(rope)}; {chunk}; theta {t.rope_theta:g}"
                 + (f", llama3 scaling x{t.rope_scaling['factor']:g}" if t.rope_scaling else "")
                 + (", L2 QK norm" if t.use_qk_norm else ", no QK norm"))
    temp = (f"temperature tuning (floor_scale {t.floor_scale}, attn_scale {t.attn_scale:g})"
            if t.attn_temperature_tuning else "no temperature tuning")
    lines.append(f"  NoPE layers ({len(nope)}): {_ranges(nope)}; global causal attention, {temp}")
    if config.vision is not None:
        v = config.vision
        per_tile = int((v.image_size // v.patch_size) ** 2 * v.pixel_shuffle_ratio ** 2)
        lines.append(f"vision tower: {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads, "
                     f"{v.image_size} px tiles of {v.patch_size} px patches -> {per_tile} tokens per tile "
                     f"(pixel shuffle {v.pixel_shuffle_ratio:g}), features {v.vision_output_dim} -> projector -> "
                     f"{t.hidden_size}; image token id {config.image_token_index}")
    else:
        lines.append("vision tower: none (text only)")
    lines.append(f"parameters: {_b(counts['total'])} total (text {_b(counts['text_total'])}, vision {_b(counts['vision'])}); "
                 f"{_b(counts['text_active'])} active per text token (top-{t.num_experts_per_tok} + shared expert, "
                 f"embedding lookup excluded)")
    return "\n".join(lines)


def _is_trace(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def cmd_info(args) -> int:
    path = Path(args.path)
    if _is_trace(path):
        print(describe_trace(path))
        return 0
    from workbench.models.llama4.config import PRESETS, ModelConfig, preset

    if not path.exists() and args.path in PRESETS:
        print(describe_model(preset(args.path), source=f"preset {args.path}"))
        return 0
    print(describe_model(ModelConfig.from_pretrained(path), source=str(path)))
    return 0


class CLIError(Exception):
    """A user error the CLI reports in one line (bad prompts file, missing image...)."""


def read_prompts(path: Path, images_dir: Path | None) -> list[dict]:
    """Read a JSONL prompts file: one object per line, {"text": str, "images": [file, ...]}.

    A bare JSON string is a text prompt. Image files resolve against ``images_dir`` (default: the
    prompts file's folder). Errors name the line.
    """
    import json

    if not path.is_file():
        raise CLIError(f"prompts file {path} does not exist")
    base = images_dir if images_dir is not None else path.parent
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("text", ""), str):
                raise CLIError(f"{path}:{n}: expected an object with a string 'text' (and optional 'images')")
            images = obj.get("images") or []
            if isinstance(images, str):
                images = [images]
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise CLIError(f"{path}:{n}: 'images' must be a list of file names")
            files = []
            for name in images:
                f_img = (base / name) if not Path(name).is_absolute() else Path(name)
                if not f_img.is_file():
                    raise CLIError(f"{path}:{n}: image file {f_img} does not exist")
                files.append(f_img)
            prompts.append({"text": obj.get("text", ""), "images": files, "line": n})
    return prompts


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trace_summary(store: Path, run: dict | None = None) -> str:
    """Tokens, speed, bytes and per-layer load imbalance of a trace (what `trace` prints at the end)."""
    from workbench.analysis import load_imbalance
    from workbench.store import open_trace

    ds = open_trace(store)
    imb = load_imbalance(ds)
    lines = []
    if run is not None:
        lines.append(f"traced {run['prompts']} prompts, {run['tokens']:,} tokens in {run['seconds']:.1f} s "
                     f"({run['tokens_per_s']:,.0f} tokens/s)")
        if run.get("resumed_after"):
            lines.append(f"resumed: prompts 0-{run['resumed_after'] - 1} were already in the store")
        if run["skipped_empty"]:
            lines.append(f"skipped {len(run['skipped_empty'])} empty prompt(s): "
                         + ", ".join(str(i) for i in run["skipped_empty"][:10]))
    lines.append(f"store {store}: {ds.sizes['token']:,} tokens, {_du(store) / 1e6:.2f} MB on disk, "
                 f"complete={ds.attrs['complete']}")
    lines.append("load imbalance per MoE layer (CV = std/mean of load shares; max/mean = E * max share):")
    for i, layer in enumerate(imb["layer"].values):
        lines.append(f"  layer {int(layer):3d}: CV {float(imb['cv'][i]):.3f}  max/mean {float(imb['max_over_mean'][i]):.2f}")
    return "\n".join(lines)


def describe_trace(store: Path) -> str:
    """`workbench info STORE`: what a trace holds, where it came from, and its load imbalance."""
    from workbench.store import open_trace

    ds = open_trace(store)
    a = ds.attrs
    prov = a.get("provenance", {})
    arch = (prov.get("model_config") or {}).get("architectures", ["?"])[0]
    import numpy as np

    n_seq = len(np.unique(ds["sequence"].values))
    arrays = ", ".join(sorted(v for v in ds.data_vars if "token" in ds[v].dims))
    lines = [f"trace {store} (schema {a['schema']}, complete={a['complete']})",
             f"  {ds.sizes['token']:,} tokens in {n_seq} sequences; {len(a['moe_layers'])} MoE layers, "
             f"{a['n_experts']} experts, top-{a['top_k']}",
             f"  arrays: {arrays}",
             f"  model: {arch} on {prov.get('device', '?')} ({prov.get('dtype', '?')})"
             + (f", checkpoint {prov['checkpoint_path']} [{prov.get('checkpoint_fingerprint')}]"
                if prov.get("checkpoint_path") else ""),
             f"  created {prov.get('created', '?')}, updated {prov.get('updated', '?')}; "
             f"workbench {prov.get('versions', {}).get('workbench', '?')}"]
    return "\n".join(lines + trace_summary(store).splitlines()[1:])


def cmd_trace(args) -> int:
    import hashlib

    import torch

    from workbench.checkpoint import load_model
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor

    prompts_path = Path(args.prompts)
    prompts = read_prompts(prompts_path, Path(args.images) if args.images else None)
    capture = tuple(c.strip() for c in args.capture.split(",") if c.strip())
    inputs_hash = hashlib.sha256(prompts_path.read_bytes()).hexdigest()[:16]
    out = Path(args.out)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    proc = load_processor(args.model)
    if args.resume:
        from workbench.store import open_trace

        prev = open_trace(out).attrs.get("provenance", {}).get("inputs_hash")
        if prev is not None and prev != inputs_hash:
            raise CLIError(f"{out} was traced from other prompts (inputs hash {prev}, this file {inputs_hash}); "
                           f"refusing to resume with a different prompts file")
    rec = Recorder(model, out, capture, processor=proc, resume=args.resume, overwrite=args.overwrite,
                   provenance={"inputs_hash": inputs_hash, "prompts_file": str(prompts_path)})
    ok = False
    try:
        with torch.no_grad():
            run = rec.run(model, proc, prompts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                          truncation=args.truncate, progress=not args.quiet)
        ok = True
    finally:
        rec.close(complete=ok)
    print(trace_summary(out, run))
    return 0


def cmd_demo(args) -> int:
    """Trace the bundled prompts with the embedded model, print a summary."""
    import warnings

    import numpy as np
    import torch

    from workbench.analysis import domain_specialization
    from workbench.checkpoint import load_model
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor
    from workbench.store import open_trace

    from workbench.embedded import EMBEDDED_MODEL, default_model_dir, demo_prompts, is_trained_default

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_trained_default():
        print(f"model: embedded default {EMBEDDED_MODEL}")
    else:
        print("model: the trained embedded model (data/models/tiny-llama4) is not shipped yet; running on a small "
              "RANDOM Llama 4 preset (16 experts, top-1): its routing is arbitrary, not learned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said above, once
        model_dir = default_model_dir(out_dir / "random-tiny-llama4")
    items = demo_prompts()
    prompts = [{"text": p["text"], "images": p["images"]} for p in items]
    domains = [p["domain"] for p in items]
    model = load_model(model_dir, progress=False)
    proc = load_processor(model_dir)
    store = out_dir / "demo.zarr"
    rec = Recorder(model, store, ("router",), processor=proc, overwrite=True,
                   provenance={"command": "workbench demo"})
    ok = False
    try:
        with torch.no_grad():
            run = rec.run(model, proc, prompts, batch_size=args.batch_size, progress=not args.quiet)
        ok = True
    finally:
        rec.close(complete=ok)
    print(trace_summary(store, run))
    ds = open_trace(store)
    labels = {i: d for i, d in enumerate(domains)}
    spec = domain_specialization(ds, labels)
    share = spec["share"].mean("moe_layer")  # (label, expert) averaged over MoE layers
    print("top experts by domain (share of routed tokens, averaged over MoE layers):")
    for label in share["label"].values:
        row = share.sel(label=label).values
        top = np.argsort(-row)[:3]
        print(f"  {str(label):6s}: " + ", ".join(f"expert {e} {row[e]:.0%}" for e in top))
    print(f"domain specialization (normalized JSD, 0 = same routing everywhere): "
          + ", ".join(f"layer {int(l)} {v:.2f}" for l, v in zip(spec['layer'].values, spec['jsd_normalized'].values)))
    from workbench.export import export_all

    files = export_all(store, out_dir / "paper", labels=labels, progress=False)
    report = next((f for f in files if f.name == "report.html"), None)
    print(f"paper export: {len(files)} files in {out_dir / 'paper'} (figures PDF/SVG/PNG, tables CSV/LaTeX, "
          f"NetCDF/Parquet)" + (f"; interactive report {report}" if report else ""))
    print(f"trace written to {store}; open it with workbench.open_trace({str(store)!r})")
    return 0


def _layer_pair(text: str | None):
    if text is None:
        return None
    parts = [x for x in text.replace("-", ",").split(",") if x.strip()]
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        raise CLIError(f"--transitions: expected two MoE layers A,B (decoder indices), got {text!r}") from None
    return a, b


def cmd_export(args) -> int:
    """Figures, tables, trace subsets and the HTML report of a trace (workbench.export.export_all)."""
    from workbench.export import ExportError, export_all

    try:
        paths = export_all(args.store, args.out, what=args.what, layers=args.layers, sequences=args.sequences,
                           tokens=args.tokens, labels=args.labels, sequence=args.sequence,
                           transitions=_layer_pair(args.transitions), coactivation_layer=args.coactivation_layer,
                           attention_layer=args.attention_layer, vocab_top=args.vocab_top,
                           vocab_min_count=args.min_count, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                           progress=not args.quiet)
    except ExportError as e:
        raise CLIError(str(e)) from None
    for name, why in paths.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(f"wrote {len(paths)} files to {args.out}")
    if not args.quiet:
        for p in paths:
            print(f"  {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="MoE Workbench: routing analysis for Llama 4 MoE models")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="architecture of a checkpoint/preset, or a summary of a trace store")
    p.add_argument("path", help="checkpoint directory, preset name (scout, maverick), or trace store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("trace", help="record router decisions over a prompts file into a zarr trace store")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompts", required=True, help='JSONL file: {"text": ..., "images": [file, ...]} per line')
    p.add_argument("--images", help="folder the image file names resolve against (default: the prompts file's)")
    p.add_argument("--out", required=True, help="trace store to create (a directory, e.g. runs/x.zarr)")
    p.add_argument("--capture", default="router", help="comma list of router, logits, attention (default: router)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="longest prompt allowed (tokens); longer is an error")
    p.add_argument("--truncate", action="store_true", help="truncate prompts longer than --max-tokens instead")
    p.add_argument("--resume", action="store_true", help="continue an incomplete store from its committed length")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace at --out")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("demo", help="trace the bundled prompts with the embedded default model")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export figures (PDF/SVG/PNG), tables (CSV/LaTeX), trace subsets "
                                      "(NetCDF/Parquet) and a self-contained HTML report, with provenance")
    p.add_argument("store", help="trace store (a directory written by workbench trace / wb.record)")
    p.add_argument("--out", required=True, help="output folder (created; files of the same names are replaced)")
    p.add_argument("--what", default="figures,tables,data,report",
                   help="comma list of groups (figures, tables, data, report) and/or artifacts (load_heatmap, "
                        "imbalance, entropy, token_routing, transitions, coactivation, attention, layer_metrics, "
                        "layer_metrics_by_modality, vocab, domain, netcdf, parquet, report); default: all groups")
    p.add_argument("--layers", help="MoE layers to export, decoder indices, e.g. 1,3,5-9 (default: all)")
    p.add_argument("--sequences", help="sequences to export, e.g. 0,2-4 (default: all)")
    p.add_argument("--tokens", help="token rows START:STOP of the trace (default: all)")
    p.add_argument("--labels", help="sequence labels for the domain tables: JSON {seq: label} or list, or a JSONL "
                                     "prompts file with a 'domain'/'label' field per line")
    p.add_argument("--sequence", type=int, help="sequence shown by the token routing figure, the report and the "
                                                "attention overlay (default: the first selected)")
    p.add_argument("--transitions", help="two MoE layers A,B for the transition figure (default: the first two)")
    p.add_argument("--coactivation-layer", type=int, help="MoE layer of the co-activation figure (default: first)")
    p.add_argument("--attention-layer", type=int, help="decoder layer of the attention overlay (default: last recorded)")
    p.add_argument("--vocab-top", type=int, default=5, help="top tokens per expert in the vocabulary table (5)")
    p.add_argument("--min-count", type=int, default=5, help="min occurrences of a token id in the vocabulary tables (5)")
    p.add_argument("--formats", default="pdf,svg,png", help="figure formats (default: pdf,svg,png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no file list")
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    from workbench.checkpoint import CheckpointError
    from workbench.models.llama4.config import ConfigError
    from workbench.hooks.recorder import RecorderError
    from workbench.models.llama4.processor import ProcessorError
    from workbench.store import TraceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, ProcessorError, TraceError, RecorderError,
            FileNotFoundError) as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
