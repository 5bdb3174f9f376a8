"""RoutingShiftView: how much quantization moved routing, per layer, per expert and per token."""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from workbench.analysis import routing_shift

from . import _common as W
from ._text import plotly_text
from ._palette import DIVERGING, SEQUENTIAL

__all__ = ["RoutingShiftView"]


class RoutingShiftView(W.ViewBase):
    """Two traces of the same inputs, ``reference`` (e.g. bf16) and ``other`` (e.g. int4), compared with
    :func:`workbench.analysis.routing_shift`:

    * ``agreement``: top-1 agreement and top-k overlap per MoE layer (lines);
    * ``load``: load-share change f_other - f_reference per layer and expert (diverging heatmap);
    * ``flow``: at the selected layer, tokens by (reference top-1, other top-1) (heatmap; off the
      diagonal: the tokens whose top-1 expert moved);
    * ``table``: the tokens whose routing changed at the selected layer, with their text (HTML-escaped),
      sequence, position and the experts before and after (the first ``max_rows``).

    ``layer``: decoder layer index of a MoE layer (default the first); the :attr:`layer` property reads
    and sets it, any other index raises ValueError naming the MoE layers. ``modality``: None (all
    tokens) or a :class:`~workbench.trace.schema.Modality` (code or name); results are computed once
    per token filter (one pass over both traces) and cached. ``labels``: names of the two traces.
    """

    def __init__(self, reference: Any, other: Any, *, labels: tuple[str, str] = ("bf16", "quantized"),
                 layer: int | None = None, modality: int | str | None = None, max_rows: int = 200):
        import ipywidgets as ipw

        self.ds_a, _ = W.open_any(reference, tokens=True)
        self.ds_b, _ = W.open_any(other)
        self.labels = tuple(str(x) for x in labels)
        self.max_rows = int(max_rows)
        self.layer_values = W.layer_values(self.ds_a)
        self.layers = [f"L{x}" for x in self.layer_values]
        pos = W.layer_position(self.ds_a, layer, "RoutingShiftView")
        self._cache: dict = {}
        self.result(W.modality_code(W.modality_value(modality)))  # validates the pair before building anything
        self.n_experts = int(self._cache[next(iter(self._cache))].attrs["n_experts"])
        E, L = self.n_experts, len(self.layer_values)
        self.w_layer = ipw.Dropdown(options=[(lab, i) for i, lab in enumerate(self.layers)], value=pos,
                                    description="Layer")
        self.w_modality = ipw.Dropdown(options=list(W.MODALITY_OPTIONS), description="Tokens",
                                       value=W.modality_value(modality))
        self.w_status = ipw.HTML()
        self.w_table = ipw.HTML()
        a, b = (plotly_text(x) for x in self.labels)  # plotly titles: escaped once (see _text)
        self.agreement = W.figure_widget(title=dict(text=f"Routing agreement, {a} vs {b}", x=0.01), height=300,
                                         width=520, xaxis=dict(title="MoE layer", type="category"),
                                         yaxis=dict(title="fraction of tokens", range=[0, 1.02]))
        self.agreement.add_scatter(x=self.layers, y=np.zeros(L), mode="lines+markers", name="top-1 agreement",
                                   line=dict(color="#0072B2"))
        self.agreement.add_scatter(x=self.layers, y=np.zeros(L), mode="lines+markers", name="top-k overlap",
                                   line=dict(color="#E69F00"))
        self.agreement.layout.meta = {"view": "RoutingShiftView.agreement"}
        self.load = W.figure_widget(title=dict(text=f"Load share change ({b} \u2212 {a})", x=0.01),
                                    height=max(300, min(900, 14 * L + 140)), width=520,
                                    xaxis=dict(title="expert"), yaxis=dict(title="MoE layer", autorange="reversed"))
        self.load.add_heatmap(z=np.zeros((L, E)), x=list(range(E)), y=self.layers, colorscale=DIVERGING, zmid=0,
                              colorbar=dict(title=dict(text="\u0394 f")))
        self.load.layout.meta = {"view": "RoutingShiftView.load"}
        self.flow = W.figure_widget(title=dict(text="Top-1 expert", x=0.01), height=420, width=460,
                                    xaxis=dict(title=f"{b} top-1"), yaxis=dict(title=f"{a} top-1",
                                                                              autorange="reversed"))
        self.flow.add_heatmap(z=np.zeros((E, E)), x=list(range(E)), y=list(range(E)), colorscale=SEQUENTIAL,
                              colorbar=dict(title=dict(text="tokens")))
        self.flow.layout.meta = {"view": "RoutingShiftView.flow"}
        self._draw()
        self.w_modality.observe(lambda ch: self._draw(), "value")
        self.w_layer.observe(lambda ch: self._draw_layer(), "value")
        self.widget = ipw.VBox([ipw.HBox([self.w_layer, self.w_modality]), self.w_status,
                                ipw.HBox([self.agreement.widget, self.load.widget]),
                                ipw.HBox([self.flow.widget, self.w_table])])
        self.widget.add_class("wb-routing-shift")

    # -- state -------------------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        """The selected decoder layer index."""
        return self.layer_values[int(self.w_layer.value)]

    @layer.setter
    def layer(self, v: int) -> None:
        self.w_layer.value = W.layer_position(self.ds_a, v, "RoutingShiftView")

    def result(self, code: int | None = None):
        """The :func:`~workbench.analysis.routing_shift` Dataset for a token filter (cached)."""
        if code not in self._cache:
            self._cache[code] = routing_shift(self.ds_a, self.ds_b, modality=code)
        return self._cache[code]

    def current(self):
        return self.result(W.modality_code(self.w_modality.value))

    def changed_rows(self) -> list[dict]:
        """The changed tokens at the selected layer (all of them listed by the analysis), as dicts."""
        r = self.current()
        sel = np.flatnonzero(np.asarray(r["change_layer"].values) == self.layer)
        cols = {name: np.asarray(r[name].values)[sel] for name in
                ("change_token", "sequence", "position", "text", "top1_a", "top1_b", "experts_a", "experts_b",
                 "top1_moved") if name in r.variables}
        return [{k: (v[i].tolist() if isinstance(v[i], np.ndarray) else v[i]) for k, v in cols.items()}
                for i in range(sel.size)]

    # -- drawing -----------------------------------------------------------------------------------
    def _draw(self) -> None:
        r = self.current()
        with self.agreement.batch_update():
            self.agreement.data[0].y = np.asarray(r["top1_agreement"].values)
            self.agreement.data[1].y = np.asarray(r["overlap"].values)
        d = np.asarray(r["load_change"].values)
        lim = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 1.0
        with self.load.batch_update():
            hm = self.load.data[0]
            hm.z = d
            hm.update(zmin=-max(lim, 1e-9), zmax=max(lim, 1e-9), zmid=0)
        self._draw_layer()

    def _draw_layer(self) -> None:
        r = self.current()
        li = int(self.w_layer.value)
        a, b = (plotly_text(x) for x in self.labels)
        with self.flow.batch_update():
            self.flow.data[0].z = np.asarray(r["top1_flow"].values[li])
            self.flow.layout.title.text = f"Top-1 expert at layer {self.layer}: {a} (rows) \u2192 {b} (columns)"
        T = int(r.attrs["n_tokens"])
        moved = int(r["top1_changed"].values[li])
        sets = int(r["set_changed"].values[li])
        agree = float(r["top1_agreement"].values[li])
        self.w_status.value = (f"layer {self.layer}: {moved:,} of {T:,} tokens changed their top-1 expert "
                               f"(agreement {agree:.3f}), {sets:,} their top-{r.attrs['k']} set"
                               + (f" &middot; only the first {r.attrs['changes_listed']:,} of "
                                  f"{r.attrs['n_changes']:,} changes are listed" if r.attrs["changes_truncated"]
                                  else ""))
        rows = self.changed_rows()
        esc = lambda s: html.escape(str(s), quote=True)  # noqa: E731
        body = "".join(
            f"<tr><td>{x['change_token']}</td><td>{x.get('sequence', '')}</td><td>{x.get('position', '')}</td>"
            f"<td><code>{esc(repr(x['text']))}</code></td><td>{x['top1_a']} \u2192 {x['top1_b']}</td>"
            f"<td>{esc(x['experts_a'])} \u2192 {esc(x['experts_b'])}</td></tr>"
            for x in rows[:self.max_rows])
        more = (f"<p>{len(rows) - self.max_rows:,} more not shown</p>" if len(rows) > self.max_rows else "")
        self.w_table.value = (
            f"<div style='max-height:400px;overflow:auto'><table class='wb-shift-table'>"
            f"<thead><tr><th>token</th><th>seq</th><th>pos</th><th>text</th><th>top-1 {esc(self.labels[0])} \u2192 "
            f"{esc(self.labels[1])}</th>"
            f"<th>top-k set</th></tr></thead><tbody>{body}</tbody></table>{more}</div>"
            if rows else f"<p>No token changed its routing at layer {self.layer}.</p>")
