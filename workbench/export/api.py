"""Export entry points: one function per artifact and :func:`export_all`."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from ._common import (ArtifactSkipped, ExportError, ExportFailedError, ExportNote, Selection, check_moe_layer,
                      export_provenance, on_written, open_for_export, prepare_out_dir, with_artifact)
from .figures import FIGURE_FORMATS, save_figure
from .manifest import Manifest

__all__ = [
    "ExportResult", "ExportContext", "export_all", "ARTIFACTS", "GROUPS",
    "export_load_heatmap", "export_imbalance", "export_entropy", "export_token_routing", "export_transitions",
    "export_coactivation", "export_attention", "export_layer_metrics", "export_layer_metrics_by_modality",
    "export_vocab_tables", "export_domain_tables", "export_netcdf", "export_parquet", "export_report",
    "export_routing_shift", "export_importance", "export_routing_paths",
]


class ExportResult(list):
    """``list[Path]`` of the files written, plus ``skipped``: {artifact: reason} for the
    artifacts that did not apply to this trace, and ``notes`` (e.g. text that had to be escaped)."""

    def __init__(self, paths=(), skipped: Mapping[str, str] | None = None):
        super().__init__(paths)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.notes: list[str] = []


@dataclass
class ExportContext:
    """An opened trace, its selection and the output folder, shared by the artifact writers."""

    ds: xr.Dataset  # the whole trace
    path: Path | None
    sel: Selection
    sub: xr.Dataset  # the selected part
    prov: dict[str, str]  # provenance common to every file
    out: Path
    notes: list[str] = field(default_factory=list)  # what the writers had to change (escaped text...)

    @classmethod
    def open(cls, store: Any, out_dir: Any, *, layers=None, sequences=None, tokens=None,
             exported: str | None = None) -> "ExportContext":
        prepare_out_dir(out_dir, create=False)  # fail early, but create nothing before the request is valid
        ds, path = open_for_export(store)
        if int(ds.sizes.get("token", 0)) == 0:
            raise ExportError(f"{path if path is not None else 'the trace'} holds no committed tokens (n_tokens = 0): "
                              "nothing to export")
        sel = Selection.make(ds, layers, sequences, tokens)
        sub = sel.apply(ds)
        prov = export_provenance(ds, path, exported=exported, selection=sel)
        return cls(ds, path, sel, sub, prov, prepare_out_dir(out_dir))

    def vocab(self) -> list[str] | None:
        if self.path is None or not self.ds.attrs.get("has_vocab"):
            return None
        from workbench.trace import trace_vocab

        return trace_vocab(self.path)

    def figure(self, name: str, fig, description: str, formats: Sequence[str]) -> list[Path]:
        title = f"{description} [{self.prov['model']}, trace {self.prov['trace_fingerprint']}]"
        try:
            return save_figure(fig, self.out / "figures" / name, with_artifact(self.prov, name), title=title,
                               description=description, formats=formats)
        finally:
            fig.clear()

    def table(self, table, csv: bool = True, tex: bool = True, tex_table=None) -> list[Path]:
        from .tables import write_csv, write_latex

        prov = with_artifact(self.prov, table.name)
        out = []
        if csv:
            out.append(write_csv(table, self.out / "tables" / f"{table.name}.csv", prov))
        if tex:
            out.append(write_latex(tex_table or table, self.out / "tables" / f"{table.name}.tex", prov))
        return out


# --------------------------------------------------------------------------------- artifacts
def _check_formats(formats: Sequence[str]) -> list[str]:
    formats = [formats] if isinstance(formats, str) else list(formats)
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown figure format(s) {bad or formats}; choose from {list(FIGURE_FORMATS)}")
    return formats


def _a_load_heatmap(ctx: ExportContext, formats=FIGURE_FORMATS, **_) -> list[Path]:
    from .figures import plot_load_heatmap

    return ctx.figure("load_heatmap", plot_load_heatmap(ctx.sub), "Expert load share per MoE layer", formats)


def _a_imbalance(ctx: ExportContext, formats=FIGURE_FORMATS, **_) -> list[Path]:
    from .figures import plot_imbalance

    return ctx.figure("imbalance", plot_imbalance(ctx.sub), "Load imbalance per MoE layer", formats)


def _a_entropy(ctx: ExportContext, formats=FIGURE_FORMATS, **_) -> list[Path]:
    from .figures import plot_entropy

    return ctx.figure("entropy", plot_entropy(ctx.sub), "Router entropy per MoE layer", formats)


def _a_token_routing(ctx: ExportContext, formats=FIGURE_FORMATS, sequence=None, max_tokens=128, **_) -> list[Path]:
    from .figures import plot_token_routing

    seq = sequence if sequence is not None else int(np.asarray(ctx.sub["sequence"].isel(token=0).values))
    fig = plot_token_routing(ctx.sub, seq, max_tokens=max_tokens)
    return ctx.figure(f"token_routing_seq{seq}", fig, f"Top-1 expert per token of sequence {seq}", formats)


def _layer_pair(transitions) -> tuple:
    """``transitions`` as ``(a, b)`` (``(None, None)`` when not given); ExportError unless two layers."""
    if transitions is None:
        return (None, None)
    try:
        pair = tuple(transitions)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ExportError(f"transitions: expected two MoE layers (a, b), got {transitions!r}")
    return pair


def _a_transitions(ctx: ExportContext, formats=FIGURE_FORMATS, transitions=None, **_) -> list[Path]:
    from .figures import _pick_layers, plot_transitions

    a, b = _pick_layers(ctx.sub, *_layer_pair(transitions))
    return ctx.figure(f"transitions_L{a}_L{b}", plot_transitions(ctx.sub, a, b),
                      f"Top-1 expert transitions from layer {a} to layer {b}", formats)


def _a_coactivation(ctx: ExportContext, formats=FIGURE_FORMATS, coactivation_layer=None, **_) -> list[Path]:
    from .figures import plot_coactivation

    layer = coactivation_layer if coactivation_layer is not None else int(ctx.sub["layer"].values[0])
    fig = plot_coactivation(ctx.sub, layer)
    return ctx.figure(f"coactivation_L{layer}", fig, f"Expert co-activation at layer {layer}", formats)


def _a_attention(ctx: ExportContext, formats=FIGURE_FORMATS, sequence=None, attention_layer=None, query=None,
                 image_index=0, image=None, image_info=None, **_) -> list[Path]:
    from .figures import attention_values, plot_attention

    d = attention_values(ctx.path, ctx.sub, sequence, attention_layer, query, image_index, ctx.sel.token_rows)
    fig = plot_attention(ctx.path, ctx.sub, d["sequence"], d["layer"], query=query, image_index=image_index,
                         image=image, image_info=image_info, token_rows=ctx.sel.token_rows)
    name = f"attention_seq{d['sequence']}_L{d['layer']}_img{d['image']}"
    return ctx.figure(name, fig, f"Cross-modal attention, sequence {d['sequence']}, layer {d['layer']}", formats)


def _a_position(ctx: ExportContext, formats=FIGURE_FORMATS, **_) -> list[Path]:
    """Routing by position (mean over the selected MoE layers; select one with ``layers=[l]``)."""
    from .figures import plot_position

    return ctx.figure("routing_by_position", plot_position(ctx.sub),
                      "Routing by position in the sequence and at attention-chunk edges", formats)


def _a_layer_metrics(ctx: ExportContext, **_) -> list[Path]:
    from .tables import layer_metrics_table

    return ctx.table(layer_metrics_table(ctx.sub))


def _a_routing_paths(ctx: ExportContext, **_) -> list[Path]:
    from .tables import routing_paths_table

    return ctx.table(routing_paths_table(ctx.sub))


def _a_layer_metrics_by_modality(ctx: ExportContext, **_) -> list[Path]:
    from .tables import layer_metrics_by_modality_table

    return ctx.table(layer_metrics_by_modality_table(ctx.sub))


def _a_vocab(ctx: ExportContext, vocab_top=5, vocab_min_count=5, vocab_target="input", **_) -> list[Path]:
    from .tables import vocab_tables

    long, compact, scores = vocab_tables(ctx.sub, ctx.vocab(), top=vocab_top, min_count=vocab_min_count,
                                         target=vocab_target)
    return ctx.table(long, tex_table=compact) + ctx.table(scores)


def _a_domain(ctx: ExportContext, labels=None, **_) -> list[Path]:
    from .tables import domain_tables, read_labels

    if labels is None:
        raise ArtifactSkipped("domain tables skipped: no sequence labels given (labels= or --labels FILE)")
    if isinstance(labels, (str, Path)):
        labels = read_labels(labels)
    main, shares = domain_tables(ctx.sub, labels)
    return ctx.table(main) + ctx.table(shares)


def _a_routing_shift(ctx: ExportContext, compare=None, compare_labels=("reference", "other"), **_) -> list[Path]:
    """Routing shift of the trace ``compare`` (e.g. int4) against this one (e.g. bf16), same inputs:
    ``tables/routing_shift.{csv,tex}`` per layer and ``tables/routing_shift_tokens.csv``."""
    from .tables import routing_shift_tables

    if compare is None:
        raise ArtifactSkipped("routing shift skipped: no second trace of the same inputs given (compare=)")
    other, _ = open_for_export(compare)
    try:
        other = ctx.sel.apply(other)
        per_layer, tokens = routing_shift_tables(ctx.sub, other, ctx.vocab(), labels=tuple(compare_labels))
    except (ValueError, KeyError, IndexError) as e:
        raise ExportError(f"routing shift: {e}") from None
    return ctx.table(per_layer) + ctx.table(tokens, tex=False)


def _read_importance(importance):
    """An :func:`workbench.analysis.expert_importance` Dataset, or its netCDF file."""
    if isinstance(importance, xr.Dataset):
        return importance
    path = Path(importance)
    if not path.is_file():
        raise ExportError(f"importance: {path} is not a file (pass the Dataset of "
                          "workbench.analysis.expert_importance or its .nc file)")
    return xr.load_dataset(path)


def _a_importance(ctx: ExportContext, formats=FIGURE_FORMATS, importance=None, **_) -> list[Path]:
    """Causal vs observational expert importance (``importance=``: the Dataset of
    :func:`workbench.analysis.expert_importance` or its netCDF file): ``tables/causal_vs_observational.{csv,tex}``
    and ``figures/causal_vs_observational.*``, restricted to the selected MoE layers."""
    from .figures import plot_importance
    from .tables import importance_table

    if importance is None:
        raise ArtifactSkipped("causal vs observational importance skipped: no expert_importance result given "
                              "(importance=)")
    imp = _read_importance(importance)
    selected = {int(x) for x in np.asarray(ctx.sub["layer"].values)}
    keep = [i for i, x in enumerate(np.asarray(imp["layer"].values)) if int(x) in selected]
    if not keep:
        raise ArtifactSkipped("causal vs observational importance skipped: none of its layers is selected")
    imp = imp.isel(moe_layer=keep)
    return ctx.table(importance_table(imp)) + ctx.figure(
        "causal_vs_observational", plot_importance(imp), "Observational vs causal expert importance", formats)


def _a_netcdf(ctx: ExportContext, **_) -> list[Path]:
    from .data import subset_dataset, write_netcdf

    sub = subset_dataset(ctx.ds, ctx.sel, with_artifact(ctx.prov, "trace_subset"), notes=ctx.notes)
    return [write_netcdf(sub, ctx.out / "data" / "trace_subset.nc", notes=ctx.notes)]


def _a_parquet(ctx: ExportContext, **_) -> list[Path]:
    from .data import subset_dataset, write_parquet

    prov = with_artifact(ctx.prov, "trace_subset")
    sub = subset_dataset(ctx.ds, ctx.sel, prov, notes=ctx.notes)
    return [write_parquet(sub, ctx.out / "data" / "trace_subset.parquet", prov, ctx.ds.attrs.get("provenance"),
                          notes=ctx.notes)]


def _a_report(ctx: ExportContext, sequence=None, report_max_tokens=256, notes=(), **_) -> list[Path]:
    from .report import write_report

    return [write_report(ctx.out / "report.html", ctx.sub, with_artifact(ctx.prov, "report"), sequence=sequence,
                         max_tokens=report_max_tokens, notes=notes)]


ARTIFACTS: dict[str, Callable[..., list[Path]]] = {
    "load_heatmap": _a_load_heatmap,
    "imbalance": _a_imbalance,
    "entropy": _a_entropy,
    "token_routing": _a_token_routing,
    "transitions": _a_transitions,
    "coactivation": _a_coactivation,
    "attention": _a_attention,
    "position": _a_position,
    "layer_metrics": _a_layer_metrics,
    "layer_metrics_by_modality": _a_layer_metrics_by_modality,
    "routing_paths": _a_routing_paths,
    "vocab": _a_vocab,
    "domain": _a_domain,
    "routing_shift": _a_routing_shift,
    "importance": _a_importance,
    "netcdf": _a_netcdf,
    "parquet": _a_parquet,
    "report": _a_report,
}
GROUPS: dict[str, tuple[str, ...]] = {
    "figures": ("load_heatmap", "imbalance", "entropy", "token_routing", "transitions", "coactivation", "attention",
                "position"),
    "tables": ("layer_metrics", "layer_metrics_by_modality", "routing_paths", "vocab", "domain", "routing_shift",
               "importance"),
    "data": ("netcdf", "parquet"),
    "report": ("report",),
}


def _items(what: str | Sequence[str]) -> list[str]:
    return [str(w).strip() for w in (what.split(",") if isinstance(what, str) else what) if str(w).strip()]


def resolve_what(what: str | Sequence[str]) -> list[str]:
    """``"figures,tables"`` / ``["figures", "netcdf"]`` -> artifact names, in a stable order."""
    items = _items(what)
    if not items:
        raise ExportError(f"nothing to export: what={what!r}; choose from {list(GROUPS)} or {list(ARTIFACTS)}")
    names: list[str] = []
    for w in items:
        if w in GROUPS:
            names += GROUPS[w]
        elif w in ARTIFACTS:
            names.append(w)
        else:
            raise ExportError(f"unknown export item {w!r}; choose from the groups {', '.join(GROUPS)} or the "
                              f"artifacts {', '.join(ARTIFACTS)}")
    return list(dict.fromkeys(names))


def _single(name: str) -> Callable[..., list[Path]]:
    fn = ARTIFACTS[name]

    def export_one(store, out_dir, *, layers=None, sequences=None, tokens=None, **opts) -> list[Path]:
        if "formats" in opts:
            opts["formats"] = _check_formats(opts["formats"])
        ctx = ExportContext.open(store, out_dir, layers=layers, sequences=sequences, tokens=tokens)
        return fn(ctx, **opts)

    export_one.__name__ = f"export_{name}"
    export_one.__doc__ = (f"Export the ``{name}`` artifact of the trace ``store`` (path or open_trace Dataset) into "
                          f"``out_dir``; returns the paths written. Selection: ``layers`` (decoder indices of MoE "
                          f"layers), ``sequences``, ``tokens`` (``(start, stop)`` rows). Raises ArtifactSkipped when "
                          f"it does not apply to the trace, ExportError for a bad request.\n\n{fn.__doc__ or ''}")
    return export_one


export_load_heatmap = _single("load_heatmap")
export_imbalance = _single("imbalance")
export_entropy = _single("entropy")
export_token_routing = _single("token_routing")
export_transitions = _single("transitions")
export_coactivation = _single("coactivation")
export_attention = _single("attention")
export_position = _single("position")
export_layer_metrics = _single("layer_metrics")
export_layer_metrics_by_modality = _single("layer_metrics_by_modality")
export_routing_paths = _single("routing_paths")
export_vocab_tables = _single("vocab")
export_domain_tables = _single("domain")
export_routing_shift = _single("routing_shift")
export_importance = _single("importance")
export_netcdf = _single("netcdf")
export_parquet = _single("parquet")
export_report = _single("report")


def _check_options(ctx: ExportContext, names: Sequence[str], sequence, transitions, coactivation_layer,
                   attention_layer) -> None:
    """Refuse bad figure options before anything is written."""
    if sequence is not None:
        seqs = np.unique(np.asarray(ctx.sub["sequence"].values)).tolist()
        if int(sequence) not in seqs:
            raise ExportError(f"sequence {sequence} is not in the selection; it holds sequences "
                              f"{', '.join(map(str, seqs[:20]))}{' ...' if len(seqs) > 20 else ''}")
    for v in _layer_pair(transitions):
        if v is not None:
            check_moe_layer(ctx.sub, v, what="transitions")
    if coactivation_layer is not None:
        check_moe_layer(ctx.sub, coactivation_layer, what="coactivation_layer")
    if attention_layer is not None and "attention" in names:
        from .figures import attention_source

        try:  # a decoder layer with recorded attention maps (dense or MoE)
            attention_source(ctx.path, ctx.sub, sequence, attention_layer)
        except ArtifactSkipped:
            pass  # the artifact will be skipped, whatever the layer


def export_all(store, out_dir, what: str | Sequence[str] = ("figures", "tables", "data", "report"), *,
               layers=None, sequences=None, tokens=None, labels=None, sequence: int | None = None,
               transitions: tuple[int, int] | None = None, coactivation_layer: int | None = None,
               attention_layer: int | None = None, image=None, image_info=None,
               vocab_top: int = 5, vocab_min_count: int = 5, formats: Sequence[str] = FIGURE_FORMATS,
               progress: bool = True, compare=None, compare_labels: tuple[str, str] = ("reference", "other"),
               importance=None) -> ExportResult:
    """Export figures, tables, trace subsets and the HTML report of a trace into ``out_dir``.

    ``what``: groups ``figures, tables, data, report`` and/or artifact names (``load_heatmap,
    imbalance, entropy, token_routing, transitions, coactivation, attention, position, layer_metrics,
    layer_metrics_by_modality, vocab, domain, netcdf, parquet, report``); a comma string or a list.
    Selection (applies to every artifact): ``layers`` (decoder layer indices, each a MoE layer),
    ``sequences`` (sequence ids), ``tokens`` (``(start, stop)`` or ``"start:stop"`` rows).
    ``labels`` (sequence -> domain: a dict, list, or a JSON/JSONL file) enables the domain tables.
    ``sequence``: the sequence shown by the token-routing figure, the report and the attention
    overlay (default: the first selected one). ``transitions=(a, b)`` and ``coactivation_layer``:
    decoder layer indices of MoE layers of the selection; ``attention_layer``: a decoder layer
    index at which attention maps were recorded (any decoder layer, dense or MoE; default: the
    last recorded). A bad layer is an ExportError, raised before anything is written.
    ``image``/``image_info``: draw the attention overlay on the image's pixels (see
    :func:`workbench.export.figures.plot_attention`).
    ``compare``: a second trace of the same inputs (path or Dataset; e.g. the quantized model's) enables
    the ``routing_shift`` tables (part of ``tables`` then), labelled ``compare_labels`` (this trace, it).
    ``importance``: the result of :func:`workbench.analysis.expert_importance` (or its netCDF file) enables
    the ``importance`` table and figure, causal vs observational (part of ``tables`` then).

    Layout: ``figures/*.{pdf,svg,png}``, ``tables/*.{csv,tex}``,
    ``data/trace_subset.{nc,parquet}``, ``report.html``, ``manifest.json`` (provenance, files,
    skipped artifacts). Every file is written atomically and carries the provenance of
    :func:`workbench.export.export_provenance`. Artifacts that do not apply (no router logits, top-1
    routing, one MoE layer, no attention maps, one modality, no labels) are skipped: the reasons
    are in ``result.skipped`` and ``manifest.json``. Returns the list of paths written.
    """
    from tqdm.auto import tqdm

    names = resolve_what(what)
    formats = _check_formats(formats)
    for key, v in (("vocab_top", vocab_top), ("vocab_min_count", vocab_min_count)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ExportError(f"{key} must be a positive integer, got {v!r}")
    if labels is None and "domain" in names and "domain" not in _items(what):
        names.remove("domain")  # part of the "tables" group only when labels are given
    if compare is None and "routing_shift" in names and "routing_shift" not in _items(what):
        names.remove("routing_shift")  # likewise, only with a second trace
    if importance is None and "importance" in names and "importance" not in _items(what):
        names.remove("importance")  # likewise, only with an expert_importance result
    if importance is not None and "importance" in names:
        importance = _read_importance(importance)  # a bad file fails before anything is written
    if isinstance(labels, (str, Path)):
        from .tables import read_labels

        labels = read_labels(labels)
    ctx = ExportContext.open(store, out_dir, layers=layers, sequences=sequences, tokens=tokens)
    _check_options(ctx, names, sequence, transitions, coactivation_layer, attention_layer)
    if compare is not None and "routing_shift" in names:
        open_for_export(compare)  # a bad second trace fails before anything is written
    opts = dict(formats=formats, sequence=sequence, transitions=transitions, coactivation_layer=coactivation_layer,
                attention_layer=attention_layer, image=image, image_info=image_info, labels=labels,
                vocab_top=vocab_top, vocab_min_count=vocab_min_count, compare=compare, compare_labels=compare_labels,
                importance=importance)
    result = ExportResult()
    manifest = Manifest(ctx.out, ctx.prov, ctx.ds.attrs.get("provenance") or {}, _routing_attr(ctx.ds))
    try:
        manifest.save()  # first: a previous export's manifest must not describe this export's files
    except OSError as e:
        raise ExportFailedError(f"cannot write {manifest.path}: {_os_error(e)}; nothing was exported") from None
    order = [n for n in names if n != "report"] + (["report"] if "report" in names else [])
    bar = tqdm(order, desc="export", unit="artifact", disable=not progress, file=sys.stderr)
    token = on_written.set(manifest.add)  # every file renamed into place is listed at once
    try:
        for name in bar:
            bar.set_postfix_str(name)
            try:
                if name == "report":
                    notes = [f"{k}: {v}" for k, v in result.skipped.items()] + ctx.notes
                    result += ARTIFACTS[name](ctx, notes=notes, **opts)
                else:
                    result += ARTIFACTS[name](ctx, **opts)
            except ArtifactSkipped as e:
                result.skipped[name] = manifest.skipped[name] = str(e)
            except OSError as e:  # a full disk, a read-only folder: stop, keep what is written
                manifest.notes[:] = ctx.notes
                manifest.finish("failed", {name: _os_error(e)})
                raise ExportFailedError(
                    f"writing {name} into {ctx.out} failed: {_os_error(e)}; the {len(manifest.files)} file(s) written "
                    f"before are intact and {manifest.path.name} lists exactly them") from None
            except BaseException as e:
                manifest.notes[:] = ctx.notes
                manifest.finish("failed", {name: f"{type(e).__name__}: {e}"})
                raise
    finally:
        on_written.reset(token)
        bar.close()
    result.notes[:] = manifest.notes[:] = ctx.notes
    for note in ctx.notes:
        warnings.warn(note, ExportNote, stacklevel=2)
    path = manifest.finish("complete")
    if path is None:
        raise ExportFailedError(f"every file was written but {manifest.path} could not be completed (disk full?); it "
                                "lists every file, with status 'running'")
    result.append(path)
    return result


def _routing_attr(ds: xr.Dataset) -> dict:
    """The trace's ``routing`` attribute ({"layers": [...], "rule": text}), or {} when it has none."""
    routing = ds.attrs.get("routing")
    return dict(routing) if isinstance(routing, Mapping) else {}


def _os_error(e: OSError) -> str:
    """An OSError in one line: "No space left on device [errno 28]: /out/figures/x.pdf"."""
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    text = e.strerror or str(e)
    return " ".join(f"{text} [errno {e.errno}]{where}".split()) if e.errno else " ".join(f"{text}{where}".split())
