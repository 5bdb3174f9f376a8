"""``workbench demo``: trace the bundled prompts with the embedded model, summarize, export."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from workbench.cli._common import check_writable_dir, positive_int, trace_summary

__all__ = ["add_parser", "run"]


def _model_dir(out_dir: Path) -> Path:
    from workbench.embedded import EMBEDDED_MODEL, default_model_dir, is_trained_default

    if is_trained_default():
        print(f"model: embedded default {EMBEDDED_MODEL}")
    else:
        print("model: the trained embedded model (data/models/tiny-llama4) is not shipped yet; running on a small "
              "RANDOM Llama 4 preset (16 experts, top-1): its routing is arbitrary, not learned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said above, once
        return default_model_dir(out_dir / "random-tiny-llama4")


def _record(model_dir: Path, store: Path, prompts: list[dict], batch_size: int, quiet: bool) -> dict:
    import torch

    from workbench.checkpoint import load_model
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor

    model = load_model(model_dir, progress=False)
    proc = load_processor(model_dir)
    # router logits (entropy figure) and cross-modal attention (attention overlay) too: the report and the
    # paper export then skip nothing that the demo prompts can show
    rec = Recorder(model, store, ("router", "logits", "attention"), processor=proc, overwrite=True,
                   provenance={"command": "workbench demo"})
    ok = False
    try:
        with torch.no_grad():
            summary = rec.run(model, proc, prompts, batch_size=batch_size, progress=not quiet)
        ok = True
    finally:
        rec.close(complete=ok)
    return summary


def _print_domains(store: Path, labels: dict[int, str]) -> None:
    from workbench.analysis import domain_specialization
    from workbench.trace import open_trace

    spec = domain_specialization(open_trace(store), labels)
    share = spec["share"].mean("moe_layer")  # (label, expert) averaged over MoE layers
    print("top experts by domain (share of routed tokens, averaged over MoE layers):")
    for label in share["label"].values:
        row = share.sel(label=label).values
        top = np.argsort(-row)[:3]
        print(f"  {str(label):6s}: " + ", ".join(f"expert {e} {row[e]:.0%}" for e in top))
    print("domain specialization (normalized JSD, 0 = same routing everywhere): "
          + ", ".join(f"layer {int(i)} {v:.2f}" for i, v in zip(spec['layer'].values, spec['jsd_normalized'].values)))


def run(args) -> int:
    from workbench.embedded import demo_prompts
    from workbench.export import export_all

    out_dir = Path(args.out)
    check_writable_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(out_dir)
    items = demo_prompts()
    store = out_dir / "demo.zarr"
    summary = _record(model_dir, store, [{"text": p["text"], "images": p["images"]} for p in items],
                      args.batch_size, args.quiet)
    print(trace_summary(store, summary))
    labels = {i: p["domain"] for i, p in enumerate(items)}
    _print_domains(store, labels)
    files = export_all(store, out_dir / "paper", labels=labels, progress=False)
    report = next((f for f in files if f.name == "report.html"), None)
    print(f"paper export: {len(files)} files in {out_dir / 'paper'} (figures PDF/SVG/PNG, tables CSV/LaTeX, "
          f"NetCDF/Parquet)" + (f"; interactive report {report}" if report else ""))
    print(f"trace written to {store}; open it with workbench.open_trace({str(store)!r})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="trace the bundled prompts with the embedded default model")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts per forward pass (default: 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
