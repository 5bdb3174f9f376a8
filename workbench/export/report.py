"""A self-contained interactive HTML report of a trace (plotly.js inlined; opens offline).

Sections: provenance table, expert load heatmap, load imbalance per layer, token routing of one
sequence (cells colored by top-1 expert with the shared categorical expert palette and a legend as
the color key; hover shows the token and its top-k experts and weights), per-layer metrics table,
and notes on what was skipped.

Static first: every figure is a PNG (the paper figure of :mod:`workbench.export.figures`, drawn by
matplotlib) embedded as a data URI, shown when scripts may not run (JupyterLab's HTML viewer before "Trust
HTML", mail clients, browsers with JavaScript off). A one-line script in the head marks the page
``wb-js``; then the interactive plotly layer is shown in the image's place. Nothing is fetched.

Self-contained: the plotly.js bundle is inlined once (``include_plotlyjs=True`` on the first
figure), no MathJax, no external script, stylesheet, font or image; every token string and
provenance value is escaped exactly once for where it lands: ``html.escape`` in the page's own HTML,
:func:`workbench.widgets._text.plotly_text` (``& < >`` only) in plotly titles, tick labels and hover
text, which plotly parses as its own tag subset (``html.escape`` there showed ``&quot;``).
The provenance also goes into ``<meta name="workbench:KEY" content="...">`` tags.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from workbench.widgets._palette import NEUTRAL, expert_color_map, is_categorical
from workbench.widgets._text import plotly_text

from ._common import ArtifactSkipped, atomic_path, layer_labels, visible

__all__ = ["report_html", "write_report"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em} td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top} th{background:#f6f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#7a5b00;background:#fff8e1;padding:4px 8px;border-left:3px solid #e6a700;margin:4px 0;font-size:.9em}
code{font-size:.9em}
.wb-fig img.wb-static{max-width:100%;height:auto;display:block} .wb-fig .wb-live{display:none}
.wb-js .wb-fig .wb-live{display:block} .wb-js .wb-fig img.wb-static{display:none}
"""
#: runs first (in the head): the interactive layer replaces the static images only where scripts run
_JS_FLAG = "<script>document.documentElement.classList.add('wb-js')</script>"


def _static_png(make, *args, dpi: int = 150) -> str | None:
    """A paper figure (``make(*args)``, matplotlib) as a PNG data URI; None when it does not apply."""
    import base64
    import io

    try:
        fig = make(*args)
    except ArtifactSkipped:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_block(heading: str, live: str, static: str | None) -> str:
    img = (f'<img class="wb-static" src="{static}" alt="{html.escape(heading, quote=True)} (static image)">'
           if static else "")
    return f'<div class="wb-fig">{img}<div class="wb-live">{live}</div></div>'



def _fig_html(fig, first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})


def _load_figure(ds: xr.Dataset):
    import plotly.graph_objects as go

    from workbench.analysis import expert_load

    f = expert_load(ds)
    L, E = f.shape
    fig = go.Figure(go.Heatmap(
        z=f.values, x=list(range(E)), y=layer_labels(ds), colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": "load share"}},
        hovertemplate="layer %{y}<br>expert %{x}<br>share %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Expert load share f_i ({f.attrs['n_tokens']:,} tokens, top-{f.attrs['k']}; "
                            f"uniform = 1/{E} = {1 / E:.4f})",
                      xaxis_title="expert", yaxis_title="MoE layer", yaxis_autorange="reversed",
                      height=max(260, 90 + 22 * L), margin=dict(l=60, r=20, t=50, b=50))
    return fig


def _imbalance_figure(ds: xr.Dataset):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from workbench.analysis import load_imbalance

    imb = load_imbalance(ds)
    x = [int(v) for v in np.asarray(ds["layer"].values)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("CV = std f / mean f", "max f / mean f"))
    for c, key in enumerate(("cv", "max_over_mean"), 1):
        fig.add_trace(go.Scatter(x=x, y=imb[key].values, mode="lines+markers", name=key,
                                 line={"color": "#000000"}, showlegend=False,
                                 hovertemplate="layer %{x}<br>" + key + " %{y:.4f}<extra></extra>"), 1, c)
        fig.update_xaxes(title_text="MoE layer (decoder index)", row=1, col=c)
    fig.update_layout(title=f"Load imbalance per MoE layer ({imb.attrs['n_experts']} experts, top-{imb.attrs['k']})",
                      height=320, margin=dict(l=60, r=20, t=70, b=50))
    return fig, imb


def _routing_figure(ds: xr.Dataset, sequence: int | None, max_tokens: int):
    import plotly.graph_objects as go

    from .figures import routing_strip_data

    d = routing_strip_data(ds, sequence, max_tokens)
    E = int(ds.attrs.get("n_experts") or (int(d["experts"].max()) + 1))
    T, L = d["top1"].shape
    used = np.bincount(np.asarray(d["top1"], np.int64).ravel(), minlength=E)
    # expert identity is categorical: one band per expert in the palette of every view, and a legend
    # (a colorbar would read as a magnitude scale, and 16 tick labels on it collide). More than 16
    # experts: grey, with the 8 most used of the shown tokens highlighted (named in the legend).
    highlight = [] if is_categorical(E) else [int(e) for e in np.argsort(-used, kind="stable")[:8] if used[e]]
    colors = expert_color_map(E, highlight)
    scale = []
    for e, c in enumerate(colors):
        scale += [[e / E, c], [(e + 1) / E, c]]
    labels = layer_labels(ds)
    k = d["experts"].shape[2]
    text = []
    for li in range(L):
        row = []
        for t in range(T):
            # plotly text: escaped once, for plotly's own tag parser (see workbench.widgets._text)
            tok = plotly_text(visible(d["texts"][t]))
            topk = ", ".join(f"{int(d['experts'][t, li, j])} ({float(d['weights'][t, li, j]):.3f})" for j in range(k))
            row.append(f"token {int(d['rows'][t])} (pos {int(d['position'][t])}): {tok}<br>top-k: {topk}")
        text.append(row)
    ticks = [plotly_text(visible(s)[:12]) for s in d["texts"]]
    fig = go.Figure(go.Heatmap(
        # z = e maps to (e + 0.5) / E: the middle of expert e's color band
        z=d["top1"].T, x=list(range(T)), y=labels, colorscale=scale, zmin=-0.5, zmax=E - 0.5, text=text,
        hovertemplate="%{text}<br>layer %{y}, top-1 expert %{z}<extra></extra>", showscale=False,
        xgap=1, ygap=1))
    keyed = list(range(E)) if is_categorical(E) else highlight
    for e in keyed:  # legend entries: the color key
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"expert {e} ({int(used[e])})",
                                 marker={"color": colors[e], "symbol": "square", "size": 11,
                                         "line": {"color": "#888", "width": 1}},
                                 showlegend=True, hoverinfo="skip"))
    if not is_categorical(E):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"other {E - len(keyed)} experts",
                                 marker={"color": NEUTRAL, "symbol": "square", "size": 11,
                                         "line": {"color": "#888", "width": 1}}, showlegend=True, hoverinfo="skip"))
    step = max(1, int(np.ceil(T / 80)))
    fig.update_xaxes(tickvals=list(range(0, T, step)), ticktext=ticks[::step], tickangle=-90)
    shown = f"first {T} of {d['n_total']} tokens" if T < d["n_total"] else f"{T} tokens"
    fig.update_layout(title=f"Top-1 expert per token, sequence {d['sequence']} ({shown})",
                      yaxis_autorange="reversed", height=max(300, 160 + 22 * L),
                      legend={"title": {"text": "top-1 expert (cells)"}, "font": {"size": 11}},
                      margin=dict(l=60, r=20, t=50, b=110))
    return fig


def _table_html(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(f'<td class="num">{"–" if not np.isfinite(v) else f"{v:.4f}"}</td>')
            elif isinstance(v, (int, np.integer)):
                cells.append(f'<td class="num">{int(v)}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def report_html(ds: xr.Dataset, prov: Mapping[str, str], *, sequence: int | None = None, max_tokens: int = 256,
                notes: Sequence[str] = ()) -> str:
    """The report as one HTML string (see the module docstring)."""
    from .tables import layer_metrics_table

    title = f"MoE Workbench report: {prov.get('model', 'trace')} ({prov.get('trace_fingerprint', '')})"
    notes = list(notes)
    parts: list[str] = []
    first = True
    from . import figures as F

    figs: list[tuple[str, Any, str | None]] = []
    figs.append(("Expert load", _load_figure(ds), _static_png(F.plot_load_heatmap, ds)))
    imb_fig, _ = _imbalance_figure(ds)
    figs.append(("Load imbalance", imb_fig, _static_png(F.plot_imbalance, ds)))
    try:
        figs.append(("Token routing", _routing_figure(ds, sequence, max_tokens),
                     _static_png(F.plot_token_routing, ds, sequence, max_tokens)))
    except ArtifactSkipped as e:
        notes.append(str(e))
    for heading, fig, static in figs:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_figure_block(heading, _fig_html(fig, first), static))
        first = False
    table = layer_metrics_table(ds)
    parts.append("<h2>Per-layer metrics</h2>")
    parts.append(_table_html(table.rows, [c.key for c in table.columns]))
    parts.append("".join(f'<p class="note">{html.escape(n)}</p>' for n in table.notes))
    prov_rows = [(k, v) for k, v in prov.items()]
    meta = "\n".join(f'<meta name="workbench:{html.escape(k, quote=True)}" content="{html.escape(v, quote=True)}">'
                     for k, v in prov.items())
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    version = html.escape(prov.get('workbench_version', ''), quote=True)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"generator\" content=\"MoE Workbench {version}\">\n"
        f"{meta}\n<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n{_JS_FLAG}\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<h2>Provenance</h2>\n{_table_html(prov_rows, ['key', 'value'])}\n{note_html}\n"
        + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report(path: Path, ds: xr.Dataset, prov: Mapping[str, str], **kw) -> Path:
    text = report_html(ds, prov, **kw)
    with atomic_path(path) as tmp:  # lone surrogates (not UTF-8) as \\udcXX escapes
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace", newline="\n")
    return Path(path)
