"""``workbench export STORE --out DIR``: figures, tables, trace subsets and the HTML report."""
from __future__ import annotations

import sys
import warnings

from workbench.cli._common import CLIError

__all__ = ["add_parser", "run"]


def _layer_pair(text: str | None):
    if text is None:
        return None
    parts = [x for x in text.replace("-", ",").split(",") if x.strip()]
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        raise CLIError(f"--transitions: expected two MoE layers A,B (decoder layer indices), got {text!r}") from None
    return a, b


def run(args) -> int:
    """Figures, tables, trace subsets and the HTML report of a trace (workbench.export.export_all).

    A bad request is a CLIError (exit 2); a failed write (disk full) one line and exit 1."""
    from workbench.export import ExportError, ExportFailedError, ExportNote, export_all

    warnings.simplefilter("ignore", ExportNote)  # printed below as "note:" lines
    try:
        paths = export_all(args.store, args.out, what=args.what, layers=args.layers, sequences=args.sequences,
                           tokens=args.tokens, labels=args.labels, sequence=args.sequence,
                           transitions=_layer_pair(args.transitions), coactivation_layer=args.coactivation_layer,
                           attention_layer=args.attention_layer, vocab_top=args.vocab_top,
                           vocab_min_count=args.min_count, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                           progress=not args.quiet)
    except ExportError as e:
        raise CLIError(str(e)) from None
    except ExportFailedError as e:
        print(f"workbench export: error: {e}", file=sys.stderr)
        return 1
    for name, why in paths.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    for note in paths.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(paths)} files to {args.out}")
    if not args.quiet:
        for p in paths:
            print(f"  {p}")
    return 0


def add_parser(sub) -> None:
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
    p.add_argument("--labels", help="sequence labels for the domain tables: a file holding JSON ({seq: label} or a "
                                     "list), or a JSONL prompts file with a 'domain'/'label' field per line")
    p.add_argument("--sequence", type=int, help="sequence shown by the token routing figure, the report and the "
                                                "attention overlay (default: the first selected)")
    p.add_argument("--transitions", help="two MoE layers A,B for the transition figure (default: the first two)")
    p.add_argument("--coactivation-layer", type=int, help="MoE layer (decoder index) of the co-activation figure (default: first)")
    p.add_argument("--attention-layer", type=int, help="decoder layer of the attention overlay (default: last recorded)")
    p.add_argument("--vocab-top", type=int, default=5, help="top tokens per expert in the vocabulary table (5)")
    p.add_argument("--min-count", type=int, default=5, help="min occurrences of a token id in the vocabulary tables (5)")
    p.add_argument("--formats", default="pdf,svg,png", help="figure formats (default: pdf,svg,png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no file list")
    p.set_defaults(func=run)
