"""Publication figures of a trace: vector PDF and SVG plus a PNG preview, with provenance.

Style: matplotlib with a private ``rc_context`` (the user's global rcParams are left alone),
DejaVu Sans (shipped with matplotlib, so always available), 8 pt text, single-column width
(3.5 in) unless the data needs more.

Fonts: PDF uses ``pdf.fonttype = 42`` (TrueType subsets embedded; text stays selectable and
searchable, no Type 3 bitmaps). SVG uses ``svg.fonttype = "path"``: glyphs are drawn as paths, so
the SVG looks identical on every machine without the font installed (the price: SVG text is not
editable as text; edit the PDF, or re-plot, to change labels). PNG: 200 dpi preview.

Colors: experts always get :func:`workbench.widgets.expert_color`, the categorical colorblind-safe
palette of :mod:`workbench.widgets._palette` (16 colors, Okabe-Ito first; more experts: neutral grey
with the most used ones highlighted and named in the legend), never a value ramp; values use viridis
(sequential, its range fitted to the data) or RdBu (signed).

Provenance (see :func:`workbench.export._common.export_provenance`): PDF Info dictionary
(Title, Subject = what the figure shows + the provenance as ``key: value`` lines, Keywords =
``key=value; ...``, Creator, CreationDate); SVG Dublin Core RDF metadata (title, description =
provenance lines, identifier = trace fingerprint, source = store path, date, creator, keywords =
``key=value``); PNG ``tEXt``/``iTXt`` chunks (Title, Description, Software, Source, Creation
Time, and one chunk per provenance key).

Every ``plot_*`` function takes a (selected) trace Dataset and returns a
``matplotlib.figure.Figure``; it raises :class:`ArtifactSkipped` when the figure does not apply
to the trace (no router logits, top-1 routing, a single MoE layer, no attention maps).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from workbench.trace.schema import Modality

from ._common import (ArtifactSkipped, ExportError, as_index, atomic_path, check_moe_layer, expert_palette,
                      layer_labels, moe_layers_of, provenance_text, token_texts, visible)

__all__ = [
    "STYLE", "FIGURE_FORMATS", "save_figure",
    "plot_load_heatmap", "plot_imbalance", "plot_entropy", "plot_token_routing", "plot_transitions",
    "plot_coactivation", "plot_attention", "plot_position", "plot_importance",
]

FIGURE_FORMATS = ("pdf", "svg", "png")
PNG_DPI = 200
SINGLE = 3.5  # in, single column
DOUBLE = 7.0  # in, two columns

STYLE: dict[str, Any] = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "figure.dpi": 100,
}

# presentation of each Modality (keys are Modality members, which also match the int codes)
_MODALITY_LABEL = {m: m.label for m in Modality} | {Modality.IMAGE_PATCH: "image patches"}  # legend text
# Okabe-Ito orange, blue, vermillion
_MODALITY_COLOR = {Modality.TEXT: "#E69F00", Modality.IMAGE_PATCH: "#0072B2", Modality.SPECIAL: "#D55E00"}
_MODALITY_STYLE = {Modality.TEXT: dict(ls="--", marker="s"), Modality.IMAGE_PATCH: dict(ls=":", marker="^"),
                   Modality.SPECIAL: dict(ls="-.", marker="v")}
# the modality row under the token-routing strip
_MODALITY_SHADE = {Modality.TEXT: "#FFFFFF", Modality.IMAGE_PATCH: "#888888", Modality.SPECIAL: "#000000"}


def _rc():
    import matplotlib

    return matplotlib.rc_context(STYLE)


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    with _rc():
        return Figure(figsize=(w, h), layout="constrained")


# ------------------------------------------------------------------------------------- saving
def _creator() -> str:
    import matplotlib

    import workbench

    return f"MoE Workbench {workbench.__version__} (workbench.export, matplotlib {matplotlib.__version__})"


def _parse_date(s: str) -> _dt.datetime:
    try:
        d = _dt.datetime.fromisoformat(s)
    except ValueError:
        d = _dt.datetime.now(_dt.timezone.utc)
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d


def _latin1(s: str) -> str:
    return s.encode("latin-1", "replace").decode("latin-1")


def figure_metadata(fmt: str, prov: Mapping[str, str], title: str, description: str) -> dict[str, Any]:
    """The matplotlib ``metadata=`` dict of one format (see the module docstring)."""
    creator = _creator()
    lines = provenance_text(prov)
    if fmt == "pdf":
        return {"Title": title, "Subject": f"{description}\n{lines}", "Creator": creator,
                "Keywords": "; ".join(f"{k}={v}" for k, v in prov.items()),
                "CreationDate": _parse_date(prov.get("exported", ""))}
    if fmt == "svg":
        return {"Title": title, "Description": f"{description}\n{lines}", "Creator": creator,
                "Identifier": f"workbench-trace:{prov.get('trace_fingerprint', 'n/a')}",
                "Source": prov.get("trace", "n/a"), "Date": prov.get("exported", ""),
                "Keywords": [f"{k}={v}" for k, v in prov.items()]}
    if fmt == "png":
        md = {"Title": title, "Description": description, "Software": creator, "Source": prov.get("trace", "n/a"),
              "Creation Time": prov.get("exported", "")}
        for k, v in prov.items():
            md[_latin1(k)[:79]] = v
        return md
    raise ExportError(f"unknown figure format {fmt!r}; choose from {FIGURE_FORMATS}")


def save_figure(fig, base: str | Path, prov: Mapping[str, str], *, title: str, description: str,
                formats: Sequence[str] = FIGURE_FORMATS, png_dpi: int = PNG_DPI) -> list[Path]:
    """Write ``fig`` as ``base.pdf``, ``base.svg`` and ``base.png`` (each atomically, with provenance)."""
    base = Path(base)
    out = []
    for fmt in formats:
        path = base.with_name(base.name + "." + fmt)
        md = figure_metadata(fmt, prov, title, description)
        with _rc(), atomic_path(path) as tmp:
            kw = {"dpi": png_dpi} if fmt == "png" else {}
            if fmt == "svg":
                import matplotlib

                matplotlib.rcParams["svg.hashsalt"] = prov.get("trace_fingerprint", "workbench")
            fig.savefig(tmp, format=fmt, metadata=md, **kw)
        out.append(path)
    return out


# ------------------------------------------------------------------------------------ helpers
def _experts_axis(ax, E: int, axis: str = "x") -> None:
    step = 1 if E <= 32 else (8 if E <= 128 else 16)
    ticks = np.arange(0, E, step)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    (ax.set_xticklabels if axis == "x" else ax.set_yticklabels)([str(t) for t in ticks])


def _expert_strip(ax, E: int, orientation: str = "horizontal") -> None:
    """A row (or column) of the experts' palette colors, aligned with a heatmap's expert axis."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(expert_palette(E))
    data = np.arange(E)[None, :] if orientation == "horizontal" else np.arange(E)[:, None]
    ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest", vmin=-0.5, vmax=E - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _heatmap_with_strips(fig, values: np.ndarray, E_x: int, *, E_y: int | None = None, cmap="viridis",
                         vmin=None, vmax=None, bad="#DDDDDD"):
    """Main heatmap axes with an expert color strip above (and left when E_y is given)."""
    import matplotlib

    if E_y is None:
        gs = fig.add_gridspec(2, 2, height_ratios=[0.05, 1], width_ratios=[1, 0.04], hspace=0.01, wspace=0.02)
        ax_top = fig.add_subplot(gs[0, 0])
        ax = fig.add_subplot(gs[1, 0])
        cax = fig.add_subplot(gs[1, 1])
        ax_left = None
    else:
        gs = fig.add_gridspec(2, 3, height_ratios=[0.05, 1], width_ratios=[0.05, 1, 0.05], hspace=0.01, wspace=0.02)
        ax_top = fig.add_subplot(gs[0, 1])
        ax = fig.add_subplot(gs[1, 1])
        ax_left = fig.add_subplot(gs[1, 0])
        cax = fig.add_subplot(gs[1, 2])
    cm = (matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap).with_extremes(bad=bad)
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cm, vmin=vmin, vmax=vmax)
    _expert_strip(ax_top, E_x, "horizontal")
    if ax_left is not None:
        _expert_strip(ax_left, E_y, "vertical")
        ax.set_yticklabels([])
        ax.tick_params(axis="y", length=0)
    fig.colorbar(im, cax=cax)
    return ax, ax_top, ax_left, cax


def _size_for_heatmap(n_rows: int, n_cols: int) -> tuple[float, float]:
    w = SINGLE if n_cols <= 24 else DOUBLE
    h = min(9.0, max(1.6, 0.6 + 0.16 * n_rows))
    return w, h


def _modalities_present(ds: xr.Dataset) -> list[int]:
    mod = np.asarray(ds["modality"].values)
    return [int(m) for m in np.unique(mod) if int(m) in _MODALITY_LABEL]


# ------------------------------------------------------------------------------------ figures
def plot_load_heatmap(ds: xr.Dataset):
    """Load share f_i (``workbench.analysis.expert_load``) as a (MoE layer x expert) heatmap."""
    from workbench.analysis import expert_load

    f = expert_load(ds)
    L, E = f.shape
    with _rc():
        fig = _figure(*_size_for_heatmap(L, E))
        ax, ax_top, _, cax = _heatmap_with_strips(fig, f.values, E, vmin=0.0)
        ax.set_yticks(np.arange(L))
        ax.set_yticklabels(layer_labels(ds))
        _experts_axis(ax, E)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer (decoder index)")
        cax.set_ylabel(f"load share f_i (uniform = 1/{E})")
        ax_top.set_title(f"Expert load share, {f.attrs['n_tokens']:,} tokens, top-{f.attrs['k']}", loc="left")
    return fig


def plot_imbalance(ds: xr.Dataset):
    """Load imbalance per layer (``workbench.analysis.load_imbalance``): CV and max/mean,
    all tokens and (when the trace mixes modalities) per modality."""
    from workbench.analysis import load_imbalance

    imb = load_imbalance(ds)
    mods = _modalities_present(ds)
    split = load_imbalance(ds, by_modality=True) if len(mods) > 1 else None
    x = np.asarray(ds["layer"].values)
    with _rc():
        fig = _figure(SINGLE, 2.6)
        axes = fig.subplots(2, 1, sharex=True)
        for ax, key, label in ((axes[0], "cv", "CV (std/mean)"), (axes[1], "max_over_mean", "max/mean")):
            ax.plot(x, imb[key].values, color="#000000", marker="o", label="all tokens")
            if split is not None:
                for m in mods:
                    ax.plot(x, split[key].sel(modality=m).values, color=_MODALITY_COLOR[m],
                            label=_MODALITY_LABEL[m], **_MODALITY_STYLE[m])
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
        axes[1].axhline(1.0, color="#999999", lw=0.6, ls="-", zorder=0)
        axes[1].set_xlabel("MoE layer (decoder index)")
        axes[1].set_xticks(x)
        axes[0].set_title(f"Load imbalance per MoE layer ({imb.attrs['n_experts']} experts, top-{imb.attrs['k']})",
                          loc="left")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4)
    return fig


def plot_entropy(ds: xr.Dataset):
    """Mean normalized router entropy per layer, p = softmax(router logits)
    (``workbench.analysis.router_entropy``); needs recorded router logits. For a model that does not
    apply a softmax over all experts (a sigmoid router: Llama 4, DeepSeek-V3) the title carries the
    caveat of ``router_entropy().attrs['probabilities_are']``."""
    import textwrap

    from workbench.analysis import router_entropy

    if "router_logits" not in ds.variables:
        raise ArtifactSkipped("router entropy figure skipped: the trace has no router_logits (record with "
                              "capture=('router', 'logits')); the entropy of softmax(logits) needs them")
    ent = router_entropy(ds, source="logits", per_token=False)
    mods = _modalities_present(ds)
    split = router_entropy(ds, source="logits", per_token=False, by_modality=True) if len(mods) > 1 else None
    x = np.asarray(ds["layer"].values)
    title = f"Router entropy of softmax(logits), {ent.attrs['n_experts']} experts"
    caveat = []
    if ent.attrs.get("routing_score", "softmax") != "softmax" and ent.attrs.get("probabilities_are"):
        caveat = textwrap.wrap(f"softmax(logits) is {ent.attrs['probabilities_are']}", 58)
    with _rc():
        fig = _figure(SINGLE, 1.9 + 0.14 * len(caveat))  # room for the caveat lines
        ax = fig.subplots()
        ax.plot(x, ent["mean_entropy"].values, color="#000000", marker="o", label="all tokens")
        if split is not None:
            for m in mods:
                ax.plot(x, split["mean_entropy"].sel(modality=m).values, color=_MODALITY_COLOR[m],
                        label=_MODALITY_LABEL[m], **_MODALITY_STYLE[m])
        ax.set_ylim(0, 1.02)
        ax.set_xticks(x)
        ax.set_xlabel("MoE layer (decoder index)")
        ax.set_ylabel("mean H / log E")
        ax.set_title("\n".join([title] + caveat), loc="left", linespacing=1.1)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4)
    return fig


def routing_strip_data(ds: xr.Dataset, sequence: int | None = None, max_tokens: int | None = 128):
    """Rows, top-1 experts (T, L), top-k experts/weights, texts, modality of one sequence's tokens
    (in position order; the first ``max_tokens``). Top-1 = ``workbench.analysis`` top-1 rule."""
    from workbench.analysis._common import top1

    seq = np.asarray(ds["sequence"].values)
    if seq.size == 0:
        raise ExportError("the selection holds no tokens")
    if sequence is None:
        sequence = int(seq[0])
    rows = np.flatnonzero(seq == int(sequence))
    if rows.size == 0:
        have = np.unique(seq)
        raise ExportError(f"sequence {sequence} is not in the selection; it holds sequences "
                          f"{', '.join(map(str, have[:20].tolist()))}{' ...' if have.size > 20 else ''}")
    pos = np.asarray(ds["position"].isel(token=rows).values)
    rows = rows[np.argsort(pos, kind="stable")]
    n_total = rows.size
    if max_tokens is not None and rows.size > max_tokens:
        rows = rows[:max_tokens]
    sub = ds[["topk_expert", "topk_weight", "modality", "position"]].isel(token=rows).load()
    e = np.asarray(sub["topk_expert"].transpose("token", "moe_layer", "k").values)
    w = np.asarray(sub["topk_weight"].transpose("token", "moe_layer", "k").values)
    t1 = top1(e, w)
    return {"sequence": int(sequence), "rows": rows, "n_total": n_total, "top1": t1, "experts": e, "weights": w,
            "texts": token_texts(ds, rows), "modality": np.asarray(sub["modality"].values),
            "position": np.asarray(sub["position"].values)}


def plot_token_routing(ds: xr.Dataset, sequence: int | None = None, max_tokens: int = 128):
    """Tokens of one sequence (x) by MoE layer (y), each cell colored by the token's top-1 expert."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from workbench.widgets._palette import NEUTRAL, expert_color_map, is_categorical, text_color_on

    d = routing_strip_data(ds, sequence, max_tokens)
    E = int(ds.attrs.get("n_experts") or (int(d["experts"].max()) + 1))
    T, L = d["top1"].shape
    counts = np.bincount(np.asarray(d["top1"], np.int64).ravel(), minlength=E)
    # identity colors (workbench.widgets._palette): up to 16 experts each its own color; more experts
    # are grey except the 8 most used of the shown tokens, which the legend names
    highlight = [] if is_categorical(E) else [int(e) for e in np.argsort(-counts, kind="stable")[:8] if counts[e]]
    colors = expert_color_map(E, highlight)
    w = min(DOUBLE, max(SINGLE, 1.0 + 0.12 * T))
    h = min(9.0, 1.3 + 0.17 * L)
    with _rc():
        fig = _figure(w, h)
        used = sorted(set(int(x) for x in np.unique(d["top1"]))) if not highlight else highlight
        gs = fig.add_gridspec(2, 1, height_ratios=[1, 0.06], hspace=0.02)
        ax = fig.add_subplot(gs[0])
        axm = fig.add_subplot(gs[1], sharex=ax)
        ax.imshow(d["top1"].T, cmap=ListedColormap(colors), vmin=-0.5, vmax=E - 0.5, aspect="auto",
                  interpolation="nearest")
        if T <= 48 and L <= 16:
            for t in range(T):
                for li in range(L):
                    e = int(d["top1"][t, li])
                    ax.text(t, li, str(e), ha="center", va="center", fontsize=5, color=text_color_on(colors[e]))
        ax.set_yticks(np.arange(L))
        ax.set_yticklabels(layer_labels(ds))
        ax.set_ylabel("MoE layer")
        ax.tick_params(axis="x", labelbottom=False, length=0)
        mrow = np.array([[int(m) for m in d["modality"]]])
        axm.imshow(mrow, cmap=ListedColormap([_MODALITY_SHADE[m] for m in sorted(Modality)]), vmin=-0.5,
                   vmax=max(Modality) + 0.5, aspect="auto", interpolation="nearest")
        axm.set_yticks([0])
        axm.set_yticklabels(["modality"])
        step = max(1, int(np.ceil(T / 64)))
        ticks = np.arange(0, T, step)
        labels = [visible(d["texts"][t])[:14] for t in ticks]
        axm.set_xticks(ticks)
        axm.set_xticklabels(labels, rotation=90, fontsize=6, parse_math=False)
        for s in axm.spines.values():
            s.set_linewidth(0.4)
        handles = [Patch(facecolor=colors[e], edgecolor="#888888", lw=0.3, label=f"expert {e}") for e in used]
        if highlight and len(highlight) < int((counts > 0).sum()):
            handles.append(Patch(facecolor=NEUTRAL, edgecolor="#888888", lw=0.3,
                                 label=f"other {int((counts > 0).sum()) - len(highlight)} experts"))
        handles += [Patch(facecolor=_MODALITY_SHADE[m], edgecolor="#555555", lw=0.4, label=_MODALITY_LABEL[m])
                    for m in sorted(set(Modality(int(x)) for x in d["modality"]))]
        fig.legend(handles=handles, loc="outside right upper", ncol=1 if len(handles) <= 14 else 2,
                   handlelength=1.0, handleheight=1.0, fontsize=6)
        shown = f"first {T} of {d['n_total']} tokens" if T < d["n_total"] else f"{T} tokens"
        ax.set_title(f"Top-1 expert per token, sequence {d['sequence']} ({shown})", loc="left")
    return fig


def _pick_layers(ds: xr.Dataset, a, b) -> tuple[int, int]:
    """Decoder layers ``(a, b)`` of the transitions figure: both checked MoE layers of ``ds``, or
    (neither given) its first two MoE layers."""
    layers = moe_layers_of(ds)
    if a is None and b is None:
        if len(layers) < 2:
            raise ArtifactSkipped(f"transitions figure skipped: the selection has a single MoE layer ({layers}); "
                                  "transitions need two")
        return layers[0], layers[1]
    if a is None or b is None:
        raise ExportError("transitions: give both layers a and b, or neither")
    return check_moe_layer(ds, a, what="transitions"), check_moe_layer(ds, b, what="transitions")


def plot_transitions(ds: xr.Dataset, a: int | None = None, b: int | None = None):
    """Top-1 transition matrix P(expert at layer b | expert at layer a)
    (``workbench.analysis.layer_transitions``). ``a``, ``b``: decoder layer indices of MoE layers of
    ``ds`` (ExportError otherwise); default: the first two selected MoE layers."""
    from workbench.analysis import layer_transitions

    a, b = _pick_layers(ds, a, b)
    P = layer_transitions(ds, a, b)
    E = P.shape[0]
    side = SINGLE if E <= 32 else DOUBLE * 0.75
    with _rc():
        fig = _figure(side, side * 0.9)
        # the color scale fits the data (0 to the largest probability): a fixed 0-1 scale left most
        # cells dark when the largest transition probability is, e.g., 0.35
        vals = np.asarray(P.values, np.float64)
        top = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
        ax, ax_top, ax_left, cax = _heatmap_with_strips(fig, vals, E, E_y=E, vmin=0.0, vmax=max(top, 1e-9))
        _experts_axis(ax, E, "x")
        ax.set_xlabel(f"top-1 expert at layer {b}")
        ax_left.set_ylabel(f"top-1 expert at layer {a}")
        step = 1 if E <= 32 else 8
        ax_left.set_yticks(np.arange(0, E, step))
        ax_left.set_yticklabels([str(t) for t in range(0, E, step)])
        ax_left.tick_params(axis="y", length=2)
        cax.set_ylabel("P(b = j | a = i)")
        ax_top.set_title(f"Top-1 transitions, layer {a} -> {b} ({P.attrs['n_tokens']:,} tokens)", loc="left")
    return fig


def plot_coactivation(ds: xr.Dataset, layer: int | None = None):
    """Co-activation P(j in S_t | i in S_t) within the top-k set at one MoE layer
    (``workbench.analysis.coactivation``); top-k > 1 only. ``layer``: the decoder layer index of a
    MoE layer of ``ds`` (ExportError otherwise, whatever k); default: the first selected layer."""
    from workbench.analysis import coactivation

    layer = moe_layers_of(ds)[0] if layer is None else check_moe_layer(ds, layer, what="coactivation")
    k = int(ds.sizes["k"])
    if k < 2:
        raise ArtifactSkipped("co-activation figure skipped: top-1 routing (k = 1) has no expert pairs")
    C = coactivation(ds, layer)
    E = C.shape[0]
    side = SINGLE if E <= 32 else DOUBLE * 0.75
    with _rc():
        fig = _figure(side, side * 0.9)
        ax, ax_top, ax_left, cax = _heatmap_with_strips(fig, C.values, E, E_y=E, vmin=0.0)
        _experts_axis(ax, E, "x")
        step = 1 if E <= 32 else 8
        ax_left.set_yticks(np.arange(0, E, step))
        ax_left.set_yticklabels([str(t) for t in range(0, E, step)])
        ax_left.tick_params(axis="y", length=2)
        ax_left.set_ylabel("expert i")
        ax.set_xlabel("expert j")
        cax.set_ylabel("P(j in S | i in S)")
        ax_top.set_title(f"Expert co-activation, layer {int(layer)}, top-{k} ({C.attrs['n_tokens']:,} tokens)",
                         loc="left")
    return fig


def plot_position(ds: xr.Dataset, layer: int | None = None, bucket: Any = "log2", chunk_size: int | None = None):
    """Routing by position in the sequence (``workbench.analysis.position``): same-top-1 rate of
    consecutive tokens and load entropy per position bucket (``bucket``, log2 by default), and,
    when the attention chunk size is known (``chunk_size`` or the trace's provenance), the
    same-top-1 rate of pairs inside a chunk vs pairs straddling a chunk edge, with their counts.
    ``layer``: the decoder layer index of a MoE layer of ``ds`` (ExportError otherwise); default:
    the mean over the selected MoE layers with their min-max range shaded."""
    from workbench.analysis.position import (
        by_chunk_offset,
        entropy_by_position,
        same_expert_rate_by_position,
    )

    if layer is not None:
        layer = check_moe_layer(ds, layer, what="position")
    if int(ds.sizes["token"]) == 0:
        raise ArtifactSkipped("position figure skipped: the selection holds no tokens")
    rate = same_expert_rate_by_position(ds, bucket=bucket, layer=layer)
    ent = entropy_by_position(ds, bucket=bucket, layer=layer, source=None)
    try:
        jump = by_chunk_offset(ds, chunk_size=chunk_size, layer=layer, source=None)
    except ValueError:  # no attention chunk size recorded: the chunk-edge panel is left out
        jump = None
    x = np.asarray(rate["position_start"].values)
    where = f"layer {int(layer)}" if layer is not None else f"mean of {ds.sizes['moe_layer']} MoE layers"

    def line(ax, da, color, label, **kw):
        v = np.asarray(da.values, np.float64)
        if v.ndim == 2:  # (bucket, moe_layer): mean with the min-max range
            import warnings

            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (empty buckets) stay NaN
                lo, hi, v = np.nanmin(v, 1), np.nanmax(v, 1), np.nanmean(v, 1)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        ax.plot(x, v, color=color, label=label, **kw)

    rows = 3 if jump is not None else 2
    with _rc():
        fig = _figure(SINGLE, 1.35 * rows + 0.5)
        axes = fig.subplots(rows, 1)
        ax = axes[0]
        line(ax, rate["same_top1_rate"], "#0072B2", "same top-1 as previous token", marker="o")
        line(ax, rate["same_top1_baseline"], "#999999", "independent draws", ls="--")
        ax.set_ylabel("rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Routing by position, {where} ({int(rate['n_pairs'].sum()):,} pairs)", loc="left")
        ax.legend(loc="best")
        ax = axes[1]
        line(ax, ent["load_entropy"], "#E69F00", "load entropy", marker="s")
        ax.set_ylabel("H(f) / log E")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Load entropy per position bucket ({rate.attrs['bucket']})", loc="left")
        for a in axes[:2]:
            if x.size > 2 and x[-1] > 16 * max(x[1], 1):
                a.set_xscale("symlog", linthresh=1)
            a.set_xlabel("position (bucket start)")
        if jump is not None:
            ax = axes[2]
            r = jump["jump_same_top1_rate"]
            n = jump["jump_n_pairs"].values
            if layer is None:
                xs = np.asarray(ds["layer"].values)
                for kind, color, m in (("inside", "#0072B2", "o"), ("edge", "#D55E00", "^")):
                    ax.plot(xs, r.sel(pair_kind=kind).values, color=color, marker=m, label=kind)
                ax.set_xticks(xs)
                ax.set_xlabel("MoE layer (decoder index)")
            else:
                vals = [float(r.sel(pair_kind=kind)) for kind in ("inside", "edge")]
                ax.bar([0, 1], vals, color=["#0072B2", "#D55E00"], width=0.6)
                ax.set_xticks([0, 1])
                ax.set_xticklabels([f"inside (n={n[0]:,})", f"edge (n={n[1]:,})"])
            ax.set_ylabel("same top-1 rate")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"Chunk edges (chunk {jump.attrs['chunk_size']}): {n[0]:,} inside / {n[1]:,} edge pairs",
                         loc="left")
            if layer is None:
                ax.legend(loc="best")
    return fig


# --------------------------------------------------------------------------------- attention
def _rgb(image: Any) -> np.ndarray:
    from workbench.geometry import as_rgb_array

    try:
        return as_rgb_array(image)
    except ValueError as e:
        raise ExportError(str(e)) from None


def attention_source(store: Path | None, ds: xr.Dataset, sequence: int | None = None, layer: int | None = None):
    """``(sequence, attention maps of that sequence, decoder layer)`` to draw: ``sequence`` (default:
    the first selected sequence with maps) and ``layer``, a decoder layer index at which the maps
    were recorded (any decoder layer, dense or MoE; default: the last recorded). ArtifactSkipped
    when there is nothing to draw, ExportError for a sequence or layer without maps."""
    from workbench.trace import attention_sequences, open_attention

    if store is None:
        raise ArtifactSkipped("attention overlay skipped: the trace was given as a Dataset without a store path")
    seqs = attention_sequences(store)
    if not seqs:
        raise ArtifactSkipped("attention overlay skipped: the trace has no cross-modal attention maps (record with "
                              "capture=('router', 'attention') on a multimodal model)")
    chosen = np.unique(np.asarray(ds["sequence"].values)).tolist()
    usable = [s for s in seqs if s in chosen]
    if sequence is None:
        if not usable:
            raise ArtifactSkipped(f"attention overlay skipped: none of the selected sequences has attention maps "
                                  f"(sequences with maps: {seqs[:20]})")
        sequence = usable[0]
    elif int(sequence) not in seqs:
        raise ExportError(f"sequence {sequence} has no attention maps; sequences with maps: {seqs}")
    att = open_attention(store, int(sequence))
    layers = [int(x) for x in att["layer"].values]
    if layer is None:
        return int(sequence), att, layers[-1]
    value = as_index(layer)
    if value is None:
        raise ExportError(f"attention layer must be a decoder layer index (int), got {layer!r}")
    if value not in layers:
        raise ExportError(f"attention maps of sequence {sequence} were recorded at decoder layers {layers}, "
                          f"not {value}")
    return int(sequence), att, value


def attention_values(store: Path, ds: xr.Dataset, sequence: int | None = None, layer: int | None = None,
                     query: int | None = None, image_index: int = 0, token_rows: np.ndarray | None = None):
    """Per-patch attention of one image: mean over heads and over the query tokens (or one query
    token row), at one recorded decoder layer (:func:`attention_source`). Returns a dict."""
    sequence, att, layer = attention_source(store, ds, sequence, layer)
    a = att.sel(layer=layer)
    qtok = np.asarray(att["query_token"].values)
    if query is not None:
        hit = np.flatnonzero(qtok == int(query))
        if hit.size == 0:
            raise ExportError(f"token {query} is not a query of sequence {sequence}'s attention maps "
                              f"(queries: token rows {qtok[:10].tolist()}...)")
        a = a.isel(query=hit)
        what = f"query token {query}"
    else:
        if token_rows is not None:
            keep = np.flatnonzero(np.isin(qtok, token_rows))
            if keep.size and keep.size < qtok.size:
                a = a.isel(query=keep)
        what = f"mean over {a.sizes['query']} text queries"
    images = np.asarray(att["image"].values)
    if image_index not in set(images.tolist()):
        raise ExportError(f"sequence {sequence} has images {sorted(set(images.tolist()))}, not {image_index}")
    psel = np.flatnonzero(images == image_index)
    vals = np.asarray(a.isel(patch=psel).astype("float64").mean(("head", "query")).values)
    heads = "head mean" if att.attrs.get("head_mean") else f"mean of {att.sizes['head']} heads"
    return {"sequence": int(sequence), "layer": int(layer), "values": vals,
            "tile": np.asarray(att["tile"].values)[psel], "row": np.asarray(att["row"].values)[psel],
            "col": np.asarray(att["col"].values)[psel], "what": what, "heads": heads, "image": int(image_index)}


def plot_attention(store: Path | None, ds: xr.Dataset, sequence: int | None = None, layer: int | None = None, *,
                   query: int | None = None, image_index: int = 0, image: Any = None, image_info: Any = None,
                   token_rows: np.ndarray | None = None):
    """Cross-modal attention of text queries over one image's patches.

    Without ``image``: one small heatmap per tile on its token grid (row x col), tiles in token
    order. With ``image`` (PIL image, array or file) and ``image_info`` (the processor's
    ``ImageInfo`` of that image, or a mapping accepted by :func:`workbench.geometry.patch_boxes`):
    the attention drawn over the pixels, one translucent box per patch token of the local tiles
    (the global thumbnail's tokens are left out: they would cover the image a second time).
    """
    from matplotlib.colors import Normalize

    d = attention_values(store, ds, sequence, layer, query, image_index, token_rows)
    vals = d["values"]
    vmax = float(np.nanmax(vals)) if vals.size and np.nanmax(vals) > 0 else 1.0
    norm = Normalize(0.0, vmax)
    title = (f"Attention to image {d['image']}, sequence {d['sequence']}, layer {d['layer']}\n"
             f"({d['what']}, {d['heads']})")
    if image is not None:
        return _attention_on_pixels(d, _rgb(image), image_info, norm, title)
    tiles = np.unique(d["tile"])
    nt = tiles.size
    ncol = min(nt, 4)
    nrow = int(np.ceil(nt / ncol))
    gr, gc = int(d["row"].max()) + 1, int(d["col"].max()) + 1
    with _rc():
        fig = _figure(min(DOUBLE, 1.2 + 1.3 * ncol), 0.6 + 1.3 * nrow)
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
        im = None
        for ax, t in zip(axes, tiles):
            grid = np.full((gr, gc), np.nan)
            m = d["tile"] == t
            grid[d["row"][m], d["col"][m]] = vals[m]
            im = ax.imshow(grid, cmap="viridis", norm=norm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"tile {int(t)}", fontsize=7)
        for ax in axes[nt:]:
            ax.set_visible(False)
        cb = fig.colorbar(im, ax=list(axes[:nt]), shrink=0.9)
        cb.set_label("attention probability")
        fig.suptitle(title, fontsize=7, x=0.0, ha="left")
    return fig


def _attention_on_pixels(d: dict, rgb: np.ndarray, image_info: Any, norm, title: str):
    import matplotlib
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from workbench.geometry import patch_boxes

    if image_info is None:
        raise ExportError("attention overlay on the image needs image_info (the processor's ImageInfo of the image, "
                          "or a mapping with original_size, grid, ...)")
    try:
        boxes = patch_boxes(image_info)
    except ValueError as e:
        raise ExportError(f"image_info: {e}") from None
    vals = d["values"]
    if boxes.shape[0] != vals.shape[0]:
        raise ExportError(f"image_info describes {boxes.shape[0]} patch tokens but image {d['image']} of sequence "
                          f"{d['sequence']} has {vals.shape[0]} in the trace; pass the ImageInfo of that image")
    tiles = d["tile"]
    info_global = image_info.get("has_global_tile") if isinstance(image_info, Mapping) else getattr(
        image_info, "has_global_tile", None)
    n_tiles = int(tiles.max()) + 1 if tiles.size else 0
    has_global = bool(info_global) if info_global is not None else n_tiles > 1
    keep = ~(tiles == n_tiles - 1) if has_global else np.ones(tiles.shape, bool)
    keep &= np.isfinite(boxes).all(axis=1)
    H, W = rgb.shape[:2]
    cmap = matplotlib.colormaps["viridis"]
    with _rc():
        fig = _figure(SINGLE, SINGLE * H / max(W, 1) + 0.5)
        ax = fig.subplots()
        ax.imshow(rgb, extent=(0, W, H, 0), interpolation="bilinear")
        rects = [Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1]) for b in boxes[keep]]
        pc = PatchCollection(rects, facecolors=cmap(norm(vals[keep])), edgecolors="none", alpha=0.55)
        ax.add_collection(pc)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, ax=ax, shrink=0.85)
        cb.set_label("attention probability")
        ax.set_title(title, fontsize=7, loc="left")
    return fig


def plot_importance(imp: xr.Dataset, layer: int | None = None):
    """Causal vs observational importance (:func:`workbench.analysis.expert_importance`): two scatter
    panels, load share and mean contribution norm (x) against the loss increase when the expert is
    blocked (y), one point per (layer, expert) colored by expert, with the Spearman rank correlation
    in each title. ``layer``: a decoder layer index of the dataset's MoE layers (default: all)."""
    from workbench.analysis import spearman

    layers = [int(x) for x in np.asarray(imp["layer"].values)]
    if layer is not None:
        value = as_index(layer)
        if value is None or value not in layers:
            raise ExportError(f"importance figure: decoder layer {layer} is not a MoE layer of the importance "
                              f"data; its MoE layers: {layers}")
        imp = imp.isel(moe_layer=[layers.index(value)])
    E = int(imp.sizes["expert"])
    colors = expert_palette(int(np.asarray(imp["expert"].values).max()) + 1)
    dl = imp["delta_loss"].values
    with _rc():
        fig = _figure(DOUBLE * 0.75, SINGLE * 0.8)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, label in ((axes[0], "load_share", "load share"), (axes[1], "mean_norm", "mean ||contribution||")):
            x = imp[key].values
            for xi, e in enumerate(np.asarray(imp["expert"].values)):
                ax.scatter(x[:, xi], dl[:, xi], s=12, color=colors[int(e)], edgecolor="none",
                           label=str(int(e)) if E <= 16 else None)
            ax.set_xlabel(label)
            ax.set_title(f"Spearman rho = {spearman(x, dl):.2f}", loc="left")
        axes[0].set_ylabel("loss increase when blocked (nats)")
        shown = [int(x) for x in imp["layer"].values]
        which = f"layer {shown[0]}" if len(shown) == 1 else f"layers {', '.join(map(str, shown))}"
        fig.suptitle(f"Observational vs causal expert importance, {which}", x=0.02, ha="left", fontsize=8)
    return fig
