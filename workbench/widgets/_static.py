"""Static fallbacks of the views: what a saved notebook shows without a kernel.

A widget output is only a reference to a model that lives in the kernel: reopened later (or
rendered by GitHub / nbviewer) it reads "Error displaying widget: model not found". ipywidgets 8's
renderer picks the widget mimetype whenever the output is trusted and never falls back to another
entry of the same bundle, so an image in the widget's own bundle would not help in JupyterLab.
Each view therefore displays a SECOND output right after its widget (:meth:`ViewBase._ipython_display_`):
a static snapshot (``text/html`` + ``image/png`` + ``text/plain``) of the view as it was drawn:

* every plot of the view as a PNG drawn by matplotlib (Agg, no network, no kaleido/Chrome: plotly's own
  static export needs kaleido and a browser), from the same plotly figure the browser draws
  (:func:`figure_png`: heatmaps, bars, lines/markers, images, Sankey nodes and links, titles, axis titles);
* the view's HTML panels (token pages, summaries, status lines) as they were.

While the live view is on the page its static twin is hidden by a CSS rule that ships with the snapshot
(``:has()``: the output before it holds a rendered widget), so nothing is shown twice; when the model is
gone the rule hides the renderer's "model not found" line instead. Untrusted notebooks (shared files)
and nbviewer / GitHub show the image as it is (their sanitizers drop the ``<style>``; the widget output
then shows its ``text/plain``).
"""
from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import numpy as np

__all__ = ["figure_png", "static_bundle", "STATIC_CLASS", "STATIC_CSS"]

STATIC_CLASS = "wb-static"
#: Live widget before the snapshot: hide the snapshot. Widget model gone (the renderer node carries
#: ``jupyter-widgets`` and holds only its error text): hide that line.
STATIC_CSS = (
    ".jp-OutputArea-child:has(.jp-OutputArea-output .jupyter-widgets) + .jp-OutputArea-child ."
    + STATIC_CLASS + "{display:none}"
    ".jp-OutputArea-child:has(+ .jp-OutputArea-child ." + STATIC_CLASS + ")"
    " > .jp-OutputArea-output.jupyter-widgets:not(:has(*)){display:none}"
    "." + STATIC_CLASS + " img{max-width:100%;height:auto;background:#fff}"
    "." + STATIC_CLASS + " .wb-static-note{font-size:11px;color:#777;margin:2px 0 6px}"
)

_TAG = re.compile(r"<[^>]*>")


def _plain(text: Any) -> str:
    """A plotly title / label (its tag subset, entities) as plain text for matplotlib."""
    if text is None:
        return ""
    s = str(text).replace("<br>", "\n").replace("<br/>", "\n")
    s = html.unescape(_TAG.sub("", s))
    return s.replace("$", r"\$")  # no mathtext


def _color(c: Any, default: str = "#444444"):
    """A plotly colour ("#rgb", "rgb(..)", "rgba(..)", a name) as something matplotlib takes."""
    from matplotlib.colors import to_rgba

    if c is None:
        return default
    if isinstance(c, str):
        m = re.match(r"rgba?\(([^)]*)\)", c.strip())
        if m:
            parts = [float(x) for x in m.group(1).split(",")]
            rgb = [min(max(p / 255.0, 0.0), 1.0) for p in parts[:3]]
            return (*rgb, parts[3] if len(parts) > 3 else 1.0)
        try:
            return to_rgba(c)
        except ValueError:
            return default
    return default


def _cmap(colorscale):
    from matplotlib.colors import LinearSegmentedColormap

    if not colorscale:
        import matplotlib

        return matplotlib.colormaps["viridis"]
    if isinstance(colorscale, str):
        import plotly.colors as pc

        colorscale = pc.get_colorscale(colorscale)
    pts = [(float(p), _color(c)) for p, c in colorscale]
    # plotly allows steps (two stops at one position): keep them, matplotlib needs increasing positions
    eps = 1e-9
    fixed = []
    for i, (p, c) in enumerate(pts):
        if fixed and p <= fixed[-1][0]:
            p = min(fixed[-1][0] + eps, 1.0)
        fixed.append((p, c))
    fixed[0] = (0.0, fixed[0][1])
    fixed[-1] = (1.0, fixed[-1][1])
    return LinearSegmentedColormap.from_list("plotly", fixed)


def _arr(v) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        a = np.array([np.nan if x is None else x for x in np.asarray(v, dtype=object).ravel()], dtype=object)
    return a


def _labels(v):
    return None if v is None else [("" if x is None else x) for x in list(v)]


def _axis_names(tr) -> tuple[str, str]:
    return (getattr(tr, "xaxis", None) or "x"), (getattr(tr, "yaxis", None) or "y")


def _layout_axis(layout, name: str):
    key = name[0] + "axis" + name[1:]
    return layout[key] if key in layout else None


def _numeric(a) -> bool:
    try:
        np.asarray(a, dtype=float)
        return True
    except (TypeError, ValueError):
        return False


def _draw_heatmap(ax, tr):
    z = np.asarray(tr.z, dtype=float) if tr.z is not None else np.zeros((1, 1))
    if z.ndim == 1:
        z = z[None, :]
    cmap = _cmap(tr.colorscale)
    cmap = cmap.with_extremes(bad="#dddddd")
    zmin = tr.zmin if tr.zmin is not None else (np.nanmin(z) if np.isfinite(z).any() else 0)
    zmax = tr.zmax if tr.zmax is not None else (np.nanmax(z) if np.isfinite(z).any() else 1)
    if tr.zmid is not None and tr.zmin is None and tr.zmax is None:
        r = max(abs(zmax - tr.zmid), abs(tr.zmid - zmin))
        zmin, zmax = tr.zmid - r, tr.zmid + r
    im = ax.imshow(np.ma.masked_invalid(z), aspect="auto", cmap=cmap, vmin=zmin, vmax=zmax, interpolation="nearest",
                   origin="lower")
    rows, cols = z.shape
    for lab, n, setter, limit in ((_labels(tr.x), cols, "x", 40), (_labels(tr.y), rows, "y", 40)):
        if lab is None or len(lab) != n:
            continue
        step = max(1, int(np.ceil(n / limit)))
        pos = list(range(0, n, step))
        names = [_plain(lab[i])[:14] for i in pos]
        if setter == "x":
            ax.set_xticks(pos, names, rotation=90 if any(len(s) > 3 for s in names) else 0)
        else:
            ax.set_yticks(pos, names)
    if tr.showscale is not False:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        title = tr.colorbar.title.text if tr.colorbar and tr.colorbar.title else None
        if title:
            cb.set_label(_plain(title))


def _draw_bar(ax, tr):
    horizontal = tr.orientation == "h"
    x, y = _labels(tr.x), _labels(tr.y)
    vals = y if not horizontal else x
    cats = x if not horizontal else y
    if vals is None:
        return
    vals = np.asarray([np.nan if v is None else v for v in vals], float)
    if cats is None:
        cats = list(range(len(vals)))
    pos = np.arange(len(vals)) if not _numeric(cats) else np.asarray(cats, float)
    color = tr.marker.color if tr.marker is not None else None
    if isinstance(color, (list, tuple, np.ndarray)) and len(color) and isinstance(color[0], str):
        colors = [_color(c, "#0072B2") for c in color]
    else:
        colors = _color(color, "#0072B2") if isinstance(color, str) else "#0072B2"
    if horizontal:
        ax.barh(pos, vals, color=colors)
    else:
        ax.bar(pos, vals, color=colors, width=0.8 if len(pos) < 2 else 0.8 * float(np.min(np.diff(np.sort(pos))) or 1))
    if not _numeric(cats):
        step = max(1, int(np.ceil(len(cats) / 40)))
        names = [_plain(c)[:14] for c in cats]
        (ax.set_yticks if horizontal else ax.set_xticks)(pos[::step], names[::step])


def _draw_scatter(ax, tr) -> bool:
    x, y = _labels(tr.x), _labels(tr.y)
    if y is None or all(v is None for v in y):
        return False  # a legend-only entry
    yv = np.asarray([np.nan if v is None else v for v in y], dtype=float) if _numeric(
        [0 if v is None else v for v in y]) else None
    if yv is None:
        return False
    if x is None or not _numeric([0 if v is None else v for v in x]):
        xv = np.arange(len(yv), dtype=float)
        if x is not None:  # categories ("L1", "L3"): one tick each
            step = max(1, int(np.ceil(len(x) / 40)))
            ax.set_xticks(xv[::step], [_plain(v)[:14] for v in x][::step])
    else:
        xv = np.asarray([np.nan if v is None else v for v in x], dtype=float)
    mode = tr.mode or "lines+markers"
    line_color = _color(tr.line.color if tr.line is not None else None, "#0072B2")
    mcolor = tr.marker.color if tr.marker is not None else None
    if "lines" in mode:
        dash = tr.line.dash if tr.line is not None else None
        ax.plot(xv, yv, color=line_color, linestyle="--" if dash in ("dash", "dot", "dashdot") else "-",
                linewidth=float(tr.line.width or 2) * 0.75 if tr.line is not None else 1.5,
                label=_plain(tr.name) if tr.showlegend else None)
    if "markers" in mode:
        if isinstance(mcolor, (list, tuple, np.ndarray)) and len(mcolor) == len(yv) and isinstance(mcolor[0], str):
            ax.scatter(xv, yv, s=14, c=[_color(m, "#0072B2") for m in mcolor], zorder=3)
        else:
            ax.scatter(xv, yv, s=14, color=_color(mcolor, line_color) if isinstance(mcolor, str) else line_color,
                       zorder=3)
    return True


def _draw_image(ax, tr):
    from PIL import Image

    src = tr.source
    if isinstance(src, str) and src.startswith("data:image"):
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    elif tr.z is not None:
        img = np.asarray(tr.z, dtype=np.uint8)
    else:
        return
    x0, y0 = float(tr.x0 or 0), float(tr.y0 or 0)
    dx, dy = float(tr.dx or 1), float(tr.dy or 1)
    h, w = img.shape[:2]
    ax.imshow(img, extent=(x0 - dx / 2, x0 + (w - 0.5) * dx, y0 + (h - 0.5) * dy, y0 - dy / 2), zorder=0)


def _draw_sankey(ax, tr):
    from matplotlib.patches import Rectangle

    node, link = tr.node, tr.link
    labels = list(node.label or [])
    src = [int(s) for s in (link.source or [])]
    dst = [int(s) for s in (link.target or [])]
    val = np.asarray(link.value if link.value is not None else [], float)
    n = max([len(labels), *(s + 1 for s in src), *(d + 1 for d in dst)] or [0])
    if n == 0:
        return
    # column of each node: given x, else 0 for sources, 1 for targets
    xs = list(node.x) if node.x is not None and len(node.x) == n else [0.0 if i in set(src) else 1.0 for i in range(n)]
    inflow, outflow = np.zeros(n), np.zeros(n)
    for s, d, v in zip(src, dst, val):
        outflow[s] += v
        inflow[d] += v
    size = np.maximum(inflow, outflow)
    ys = np.zeros(n)
    heights = np.zeros(n)
    for col in sorted(set(xs)):
        idx = [i for i in range(n) if xs[i] == col]
        tot = max(sum(size[i] for i in idx), 1e-12)
        gap = 0.15 / max(len(idx), 1)
        y = 0.0
        for i in idx:
            heights[i] = size[i] / tot * 0.85
            ys[i] = y
            y += heights[i] + gap
    colors = list(node.color) if isinstance(node.color, (list, tuple)) else [node.color] * n
    out_off, in_off = ys.copy(), ys.copy()
    lcolors = link.color if isinstance(link.color, (list, tuple)) else [link.color] * len(src)
    t = np.linspace(0, 1, 30)
    smooth = 3 * t ** 2 - 2 * t ** 3
    for j, (s, d, v) in enumerate(zip(src, dst, val)):
        hs = v / max(size[s], 1e-12) * heights[s]
        hd = v / max(size[d], 1e-12) * heights[d]
        xa, xb = xs[s] + 0.015, xs[d] - 0.015
        top = out_off[s] + (in_off[d] - out_off[s]) * smooth
        bottom = out_off[s] + hs + (in_off[d] + hd - out_off[s] - hs) * smooth
        ax.fill_between(xa + (xb - xa) * t, top, bottom, color=_color(lcolors[j] if j < len(lcolors) else None,
                                                                      "#bbbbbb"), alpha=0.45, linewidth=0)
        out_off[s] += hs
        in_off[d] += hd
    for i in range(n):
        if heights[i] <= 0:
            continue
        ax.add_patch(Rectangle(
            (xs[i] - 0.015, ys[i]), 0.03, heights[i], color=_color(colors[i] if i < len(colors) else None)))
        if i < len(labels) and heights[i] > 0.012:
            right = xs[i] > 0.5
            ax.text(xs[i] + (-0.025 if right else 0.025), ys[i] + heights[i] / 2, _plain(labels[i]), fontsize=7,
                    va="center", ha="right" if right else "left")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(1.02, -0.02)
    ax.axis("off")


def figure_png(fig, dpi: int = 96) -> bytes:
    """A PNG of a plotly ``go.Figure`` drawn with matplotlib (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = fig.layout
    W = float(layout.width or 700)
    H = float(layout.height or 450)
    m = layout.margin
    ml, mr = float(m.l if m.l is not None else 80), float(m.r if m.r is not None else 80)
    mt, mb = float(m.t if m.t is not None else 100), float(m.b if m.b is not None else 80)
    out = Figure(figsize=(W / 100, H / 100), dpi=100)
    FigureCanvasAgg(out)
    out.patch.set_facecolor("white")
    axes: dict[tuple[str, str], Any] = {}

    def axes_for(xn: str, yn: str):
        if (xn, yn) in axes:
            return axes[(xn, yn)]
        xa, ya = _layout_axis(layout, xn), _layout_axis(layout, yn)
        xd = list(xa.domain) if xa is not None and xa.domain else [0, 1]
        yd = list(ya.domain) if ya is not None and ya.domain else [0, 1]
        pw, ph = max(W - ml - mr, 40), max(H - mt - mb, 40)
        rect = [(ml + xd[0] * pw) / W, (mb + yd[0] * ph) / H, (xd[1] - xd[0]) * pw / W * 0.97,
                (yd[1] - yd[0]) * ph / H * 0.97]
        ax = out.add_axes(rect)
        ax.tick_params(labelsize=8)
        for spine in ax.spines.values():
            spine.set_color("#cccccc")
        axes[(xn, yn)] = ax
        return ax

    legend = False
    for tr in fig.data:
        kind = tr.type
        if kind == "sankey":
            dom = tr.domain
            xd = list(dom.x) if dom is not None and dom.x else [0, 1]
            yd = list(dom.y) if dom is not None and dom.y else [0, 1]
            pw, ph = max(W - ml - mr, 40), max(H - mt - mb, 40)
            ax = out.add_axes([(ml + xd[0] * pw) / W, (mb + yd[0] * ph) / H, (xd[1] - xd[0]) * pw / W,
                               (yd[1] - yd[0]) * ph / H])
            _draw_sankey(ax, tr)
            continue
        ax = axes_for(*_axis_names(tr))
        if kind == "heatmap":
            _draw_heatmap(ax, tr)
        elif kind == "bar":
            _draw_bar(ax, tr)
        elif kind in ("scatter", "scattergl"):
            legend |= _draw_scatter(ax, tr) and bool(tr.showlegend and tr.name)
        elif kind == "image":
            _draw_image(ax, tr)
    for (xn, yn), ax in axes.items():
        xa, ya = _layout_axis(layout, xn), _layout_axis(layout, yn)
        if xa is not None and xa.title and xa.title.text:
            ax.set_xlabel(_plain(xa.title.text), fontsize=9)
        if ya is not None and ya.title and ya.title.text:
            ax.set_ylabel(_plain(ya.title.text), fontsize=9)
        if xa is not None and xa.range is not None:
            ax.set_xlim(*xa.range)
        if ya is not None and ya.range is not None:
            ax.set_ylim(*ya.range)
        if ya is not None and ya.autorange == "reversed":
            lo, hi = ax.get_ylim()
            if lo < hi:
                ax.invert_yaxis()
        for a, setter in ((xa, ax.set_xticks), (ya, ax.set_yticks)):
            if (a is not None and a.tickvals is not None and a.ticktext is not None
                    and len(a.tickvals) == len(a.ticktext)):
                step = max(1, int(np.ceil(len(a.tickvals) / 40)))
                setter([float(v) for v in a.tickvals][::step], [_plain(x)[:14] for x in a.ticktext][::step])
        if xa is not None and xa.visible is False:
            ax.set_xticks([])
        if ya is not None and ya.visible is False:
            ax.set_yticks([])
        if xa is not None and xa.showgrid is not False and not any(t.type in ("heatmap", "image") for t in fig.data):
            ax.grid(True, color="#E5ECF6", linewidth=0.6)
            ax.set_axisbelow(True)
    if legend:
        first = next(iter(axes.values()))
        handles, labs = first.get_legend_handles_labels()
        if handles:
            first.legend(fontsize=7, loc="best")
    title = layout.title.text if layout.title else None
    if title:
        out.text(0.01, 1 - 8 / H, _plain(title), ha="left", va="top", fontsize=10)
    for ann in (layout.annotations or ()):  # subplot titles, empty-state notes
        if ann.text and ann.xref in ("paper", None) and ann.yref in ("paper", None):
            pw, ph = max(W - ml - mr, 40), max(H - mt - mb, 40)
            x = (ml + float(ann.x if ann.x is not None else 0.5) * pw) / W
            y = (mb + float(ann.y if ann.y is not None else 0.5) * ph) / H
            out.text(x, min(y, 0.98), _plain(ann.text), ha="center", va="bottom" if y > 0.9 else "center",
                     fontsize=8, color="#555555")
    buf = io.BytesIO()
    out.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _walk(widget, out: list, seen: set) -> None:
    """The view's plots (PlotView -> its Plot) and HTML panels, in display order."""
    if id(widget) in seen or widget is None:
        return
    seen.add(id(widget))
    plot = getattr(widget, "_wb_plot", None)
    if plot is not None:
        out.append(("plot", plot))
        return
    own = getattr(widget, "_wb_static_html", None)
    if callable(own):  # a custom widget that knows its static look (the token strip)
        out.append(("html", own()))
        return
    layout = getattr(widget, "layout", None)
    if getattr(layout, "display", None) == "none" or getattr(layout, "visibility", None) == "hidden":
        return
    children = getattr(widget, "children", None)
    if children is not None:
        for c in children:
            _walk(c, out, seen)
        return
    cls = type(widget).__name__
    if cls in ("HTML", "HTMLMath") and getattr(widget, "value", ""):
        out.append(("html", widget.value))
    elif cls == "Label" and getattr(widget, "value", ""):
        out.append(("html", html.escape(widget.value)))
    elif hasattr(widget, "value") and hasattr(widget, "description") and cls not in ("Button", "Output"):
        label = widget.description or ""
        value = getattr(widget, "label", None) or widget.value
        if isinstance(value, (str, int, float, tuple)) and str(value) != "":
            out.append(("control", f"{label} {value}".strip()))


def static_bundle(widget, name: str) -> dict:
    """``{mimetype: data}`` of the static snapshot of a view whose container is ``widget``."""
    items: list = []
    _walk(widget, items, set())
    parts, controls, pngs = [], [], []
    for kind, x in items:
        if kind == "control":
            controls.append(x)
            continue
        if controls:
            parts.append(f"<div class='wb-static-note'>{html.escape(' · '.join(controls))}</div>")
            controls = []
        if kind == "html":
            parts.append(f"<div>{x}</div>")
        else:
            try:
                png = figure_png(x.figure)
            except Exception as e:  # a snapshot never breaks the live view
                parts.append(f"<div class='wb-static-note'>(static image unavailable: {html.escape(repr(e))})</div>")
                continue
            pngs.append(png)
            b64 = base64.b64encode(png).decode("ascii")
            title = _plain(x.figure.layout.title.text if x.figure.layout.title else "") or name
            parts.append(f"<img src='data:image/png;base64,{b64}' alt='{html.escape(title, quote=True)}'>")
    note = (f"<div class='wb-static-note'>Static snapshot of {html.escape(name)} (shown when the interactive "
            f"view is not available, e.g. in a saved notebook without its kernel; run the cell again to "
            f"interact).</div>")
    doc = (f"<style>{STATIC_CSS}</style><div class='{STATIC_CLASS}' data-view='{html.escape(name, quote=True)}'>"
           + note + "".join(parts) + "</div>")
    bundle = {"text/html": doc, "text/plain": f"<{name}: static snapshot, {len(pngs)} figure(s)>"}
    if pngs:
        bundle["image/png"] = base64.b64encode(pngs[0]).decode("ascii")
    return bundle
