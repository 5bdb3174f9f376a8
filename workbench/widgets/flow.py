"""RoutingFlow: Sankey of top-1 expert transitions between two MoE layers, and co-activation."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from workbench.analysis import coactivation, layer_transitions

from . import _common as W
from ._palette import SEQUENTIAL, expert_colors, rgba

__all__ = ["RoutingFlow", "sankey_links"]


def sankey_links(counts: np.ndarray, max_links: int | None = None) -> dict[str, np.ndarray]:
    """Sankey links from a transition count matrix n_ij (expert_a x expert_b): every nonzero cell,
    largest first, at most ``max_links`` of them. Node i is expert i at layer a, node E + j expert j
    at layer b. Returns ``source``, ``target``, ``value`` and ``dropped`` (tokens in links left out)."""
    n = np.asarray(counts)
    E = n.shape[0]
    i, j = np.nonzero(n)
    v = n[i, j]
    order = np.lexsort((j, i, -v))  # largest first; ties in (i, j) order
    i, j, v = i[order], j[order], v[order]
    dropped = 0
    if max_links is not None and v.size > max_links:
        dropped = int(v[max_links:].sum())
        i, j, v = i[:max_links], j[:max_links], v[:max_links]
    return {"source": i.astype(int), "target": (E + j).astype(int), "value": v.astype(np.int64), "dropped": dropped}


class RoutingFlow(W.ViewBase):
    """How tokens move between experts from MoE layer ``a`` to MoE layer ``b`` (Sankey of the top-1
    transition counts of :func:`workbench.analysis.layer_transitions`), and the co-activation matrix
    of :func:`workbench.analysis.coactivation` at layer ``a`` (top-k routing with k > 1).

    ``a``/``b``: decoder layer indices of two MoE layers of the trace (coordinate ``layer``), as in
    :func:`workbench.analysis.layer_transitions`; default the first MoE layer and the second (the
    first when there is only one). Any other index raises ValueError naming the MoE layers; the
    :attr:`a` / :attr:`b` properties read and set them. ``modality``: None (all tokens) or a
    :class:`~workbench.trace.schema.Modality` (code or name). ``max_links``: the Sankey keeps the
    largest links (128 x 128 experts would be unreadable); the status line says how many tokens the
    dropped links carry. Each (a, b, modality) result is computed once (one pass over the trace) and
    cached.
    """

    def __init__(self, trace: Any, *, a: int | None = None, b: int | None = None,
                 modality: int | str | None = None, max_links: int = 300, coactivation_mode: str = "probability"):
        import ipywidgets as ipw

        self.ds, self.path = W.open_any(trace)
        self.n_experts = W.n_experts_of(self.ds)
        self.n_layers = int(self.ds.sizes["moe_layer"])
        self.k = int(self.ds.sizes["k"])
        self.layer_values = W.layer_values(self.ds)
        self.layers = [f"L{x}" for x in self.layer_values]
        pa = W.layer_position(self.ds, a, "RoutingFlow (a)")
        pb = min(1, self.n_layers - 1) if b is None else W.layer_position(self.ds, b, "RoutingFlow (b)")
        if coactivation_mode not in ("probability", "count"):
            raise ValueError(f"coactivation_mode must be 'probability' or 'count', got {coactivation_mode!r}")
        self.max_links = int(max_links)
        self._cache: dict = {}
        opts = [(lab, i) for i, lab in enumerate(self.layers)]  # positions on moe_layer, labelled "L<decoder index>"
        self.w_a = ipw.Dropdown(options=opts, value=pa, description="From layer")
        self.w_b = ipw.Dropdown(options=opts, value=pb, description="To layer")
        self.w_modality = ipw.Dropdown(options=list(W.MODALITY_OPTIONS), description="Tokens",
                                       value=W.modality_value(modality))
        self.w_co = ipw.ToggleButtons(options=[("P(j | i)", "probability"), ("pair counts", "count")],
                                      value=coactivation_mode, description="Co-activation",
                                      disabled=self.k == 1)
        self.w_status = ipw.HTML()
        self._build_figures()
        self.compute_seconds = 0.0
        self._draw()
        for w in (self.w_a, self.w_b, self.w_modality, self.w_co):
            w.observe(lambda ch: self._draw(), "value")
        self.widget = ipw.VBox([ipw.HBox([self.w_a, self.w_b, self.w_modality]), self.w_co, self.w_status,
                                ipw.HBox([self.sankey.widget, self.coact.widget])])
        self.widget.add_class("wb-routing-flow")

    def _build_figures(self) -> None:
        import plotly.graph_objects as go

        E = self.n_experts
        colors = expert_colors(E)
        self.sankey = W.figure_widget(title=dict(text="", x=0.01), height=max(420, min(1400, 12 * E + 200)),
                                      width=640)
        self.sankey.add_trace(go.Sankey(
            arrangement="fixed",
            node=dict(label=[f"e{e}" for e in range(E)] * 2, color=colors * 2, pad=4, thickness=14,
                      line=dict(width=0.5, color="#444")),
            link=dict(source=[], target=[], value=[])))
        self.sankey.layout.meta = {"view": "RoutingFlow.sankey"}
        self.coact = W.figure_widget(title=dict(text="", x=0.01), height=480, width=480,
                                     xaxis=dict(title="expert j"), yaxis=dict(title="expert i", autorange="reversed"))
        self.coact.add_heatmap(z=np.zeros((E, E)), x=list(range(E)), y=list(range(E)), colorscale=SEQUENTIAL,
                               colorbar=dict(title=dict(text="")), hoverongaps=False)
        self.coact.layout.meta = {"view": "RoutingFlow.coactivation"}

    # ---------------------------------------------------------------- state
    @property
    def a(self) -> int:
        """Decoder layer index of the source MoE layer (set it to show another)."""
        return self.layer_values[int(self.w_a.value)]

    @a.setter
    def a(self, v: int) -> None:
        self.w_a.value = W.layer_position(self.ds, v, "RoutingFlow (a)")

    @property
    def b(self) -> int:
        """Decoder layer index of the target MoE layer (set it to show another)."""
        return self.layer_values[int(self.w_b.value)]

    @b.setter
    def b(self, v: int) -> None:
        self.w_b.value = W.layer_position(self.ds, v, "RoutingFlow (b)")

    # ---------------------------------------------------------------- data
    def transition_counts(self) -> np.ndarray:
        """n_ij for the selected layers and modality (expert at a, expert at b)."""
        key = ("t", self.w_a.value, self.w_b.value, self.w_modality.value)
        if key not in self._cache:
            self._cache[key] = np.asarray(layer_transitions(
                self.ds, self.a, self.b, counts=True,
                modality=W.modality_code(self.w_modality.value), n_experts=self.n_experts).values)
        return self._cache[key]

    def coactivation_matrix(self) -> np.ndarray | None:
        """Co-activation at layer a (None for top-1 routing): P(j | i) or the pair counts."""
        if self.k == 1:
            return None
        key = ("c", self.w_a.value, self.w_modality.value, self.w_co.value)
        if key not in self._cache:
            self._cache[key] = np.asarray(coactivation(
                self.ds, self.a, counts=self.w_co.value == "count",
                modality=W.modality_code(self.w_modality.value), n_experts=self.n_experts).values)
        return self._cache[key]

    def links(self) -> dict[str, np.ndarray]:
        return sankey_links(self.transition_counts(), self.max_links)

    # ---------------------------------------------------------------- drawing
    def _draw(self) -> None:
        t0 = time.perf_counter()
        E = self.n_experts
        la, lb = self.layers[self.w_a.value], self.layers[self.w_b.value]
        lk = self.links()
        colors = expert_colors(E)
        co = self.coactivation_matrix()
        self.compute_seconds = time.perf_counter() - t0
        total = int(self.transition_counts().sum())
        with self.sankey.batch_update():
            s = self.sankey.data[0]
            s.node.label = [f"e{e} @{la}" for e in range(E)] + [f"e{e} @{lb}" for e in range(E)]
            s.link.source = lk["source"].tolist()
            s.link.target = lk["target"].tolist()
            s.link.value = lk["value"].tolist()
            s.link.color = [rgba(colors[i], 0.45) for i in lk["source"]]
            s.link.hovertemplate = "%{source.label} \u2192 %{target.label}: %{value:,} tokens<extra></extra>"
            self.sankey.layout.title.text = (f"Top-1 expert transitions {la} \u2192 {lb} ({total:,} tokens; "
                                             "node color = expert)")
        with self.coact.batch_update():
            hm = self.coact.data[0]
            if co is None:
                hm.z = np.full((E, E), np.nan)
                self.coact.layout.title.text = f"Co-activation at {la}: none (top-1 routing has no expert pairs)"
            else:
                hm.z = co
                what = "P(j in S | i in S)" if self.w_co.value == "probability" else "pair count N_ij"
                hm.colorbar.title.text = "P(j|i)" if self.w_co.value == "probability" else "pairs"
                hm.hovertemplate = "i = %{y}, j = %{x}: %{z:.3f}<extra></extra>" if self.w_co.value == "probability" \
                    else "i = %{y}, j = %{x}: %{z:,}<extra></extra>"
                self.coact.layout.title.text = f"Co-activation at {la} (top-{self.k}): {what}"
        note = (f" &middot; {lk['dropped']:,} tokens in the smallest links not drawn (max_links={self.max_links})"
                if lk["dropped"] else "")
        self.w_status.value = f"{len(lk['value'])} links{note}"
