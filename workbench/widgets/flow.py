"""RoutingFlow: Sankey of top-1 expert transitions between two MoE layers, and co-activation."""
from __future__ import annotations

import html
import time
from typing import Any

import numpy as np

from workbench.analysis import coactivation, layer_transitions

from . import _common as W
from ._palette import SEQUENTIAL, expert_color_map, expert_colors, is_categorical, rgba
from ._text import plotly_text

__all__ = ["RoutingFlow", "sankey_links", "node_labels"]


def sankey_links(counts: np.ndarray, max_links: int | None = None, min_value: int = 0) -> dict[str, np.ndarray]:
    """Sankey links from a transition count matrix n_ij (expert_a x expert_b): every nonzero cell
    with at least ``min_value`` tokens, largest first, at most ``max_links`` of them. Node i is expert i
    at layer a, node E + j expert j at layer b. Returns ``source``, ``target``, ``value``, ``dropped``
    (tokens in links left out) and ``n_dropped`` (links left out)."""
    n = np.asarray(counts)
    E = n.shape[0]
    i, j = np.nonzero(n)
    v = n[i, j]
    order = np.lexsort((j, i, -v))  # largest first; ties in (i, j) order
    i, j, v = i[order], j[order], v[order]
    keep = v >= max(int(min_value), 1)
    if max_links is not None:
        keep &= np.arange(v.size) < int(max_links)
    dropped, n_dropped = int(v[~keep].sum()), int((~keep).sum())
    i, j, v = i[keep], j[keep], v[keep]
    return {"source": i.astype(int), "target": (E + j).astype(int), "value": v.astype(np.int64), "dropped": dropped,
            "n_dropped": n_dropped}


def node_labels(links: dict, n_experts: int, height_px: float, pad_px: float = 4.0,
                min_px: float = 13.0) -> list[str]:
    """Sankey node labels that do not collide: ``"e<i>"`` on nodes drawn at least ``min_px`` pixels
    tall (about one 11 px text line), "" on thinner nodes and on nodes without a drawn link (hover
    still names every node). A node's height is its share of the column's drawn tokens times the
    column's height less the padding between its linked nodes."""
    E = int(n_experts)
    val = np.zeros(2 * E)
    np.add.at(val, links["source"], links["value"])
    np.add.at(val, links["target"], links["value"])
    out = [""] * (2 * E)
    for col in (slice(0, E), slice(E, 2 * E)):
        v = val[col]
        tot, used = float(v.sum()), int((v > 0).sum())
        if tot <= 0:
            continue
        room = max(height_px - pad_px * max(used - 1, 0), 0.0)
        for i in np.flatnonzero(v > 0):
            if room * v[i] / tot >= min_px:
                out[col.start + int(i)] = f"e{int(i)}"
    return out


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

    Readable by default: the Sankey draws the ``max_links`` (default 40) largest links, a "Top links"
    slider and a "Min share" threshold (links carrying less than that share of the tokens are left
    out) change that, and node labels are drawn only on nodes tall enough to hold one
    (:func:`node_labels`; hover names every node and link; the layers head the two columns). With
    more than 16 experts nodes are grey except the 8 with the largest outflow (see
    :mod:`~workbench.widgets._palette`). With top-1 routing the co-activation panel is not shown (no
    expert pairs exist) and the status line says so; an empty token filter says why.
    """

    def __init__(self, trace: Any, *, a: int | None = None, b: int | None = None,
                 modality: int | str | None = None, max_links: int = 40, min_share: float = 0.0,
                 coactivation_mode: str = "probability"):
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
        E_ = self.n_experts
        self._cache: dict = {}
        opts = [(lab, i) for i, lab in enumerate(self.layers)]  # positions on moe_layer, labelled "L<decoder index>"
        self.w_a = ipw.Dropdown(options=opts, value=pa, description="From layer")
        self.w_b = ipw.Dropdown(options=opts, value=pb, description="To layer")
        self.w_modality = ipw.Dropdown(options=list(W.MODALITY_OPTIONS), description="Tokens",
                                       value=W.modality_value(modality))
        self.w_co = ipw.ToggleButtons(options=[("P(j | i)", "probability"), ("pair counts", "count")],
                                      value=coactivation_mode, description="Co-activation",
                                      disabled=self.k == 1)
        self.w_top = ipw.IntSlider(value=max(1, self.max_links), min=1, max=max(self.max_links, min(300, E_ * E_)),
                                   description="Top links", continuous_update=False)
        self.w_min = ipw.FloatSlider(value=float(min_share), min=0.0, max=0.2, step=0.005, description="Min share",
                                     readout_format=".1%", continuous_update=False,
                                     tooltip="leave out links carrying less than this share of the tokens")
        self.w_status = ipw.HTML()
        self._build_figures()
        self.compute_seconds = 0.0
        self._draw()
        for w in (self.w_a, self.w_b, self.w_modality, self.w_co, self.w_top, self.w_min):
            w.observe(lambda ch: self._draw(), "value")
        # top-1 routing: no expert pairs, so no co-activation panel (the status line says why)
        panels = [self.sankey.widget] + ([self.coact.widget] if self.k > 1 else [])
        self.widget = ipw.VBox([ipw.HBox([self.w_a, self.w_b, self.w_modality]),
                                ipw.HBox([self.w_top, self.w_min]), self.w_co, self.w_status, ipw.HBox(panels)])
        if self.k == 1:
            self.w_co.layout.display = "none"
        self.widget.add_class("wb-routing-flow")

    def _build_figures(self) -> None:
        import plotly.graph_objects as go

        E = self.n_experts
        colors = expert_colors(E)
        self._sankey_height = max(460, min(1400, 12 * E + 200))
        self.sankey = W.figure_widget(title=dict(text="", x=0.01), height=self._sankey_height, width=640,
                                      margin=dict(l=20, r=20, t=80, b=20),
                                      annotations=[dict(text="", x=0, y=1.0, xref="paper", yref="paper",
                                                        xanchor="left", yanchor="bottom", showarrow=False),
                                                   dict(text="", x=1, y=1.0, xref="paper", yref="paper",
                                                        xanchor="right", yanchor="bottom", showarrow=False)])
        self.sankey.add_trace(go.Sankey(
            arrangement="fixed",
            node=dict(label=[f"e{e}" for e in range(E)] * 2, color=colors * 2, pad=4, thickness=14,
                      line=dict(width=0.5, color="#444"), customdata=[f"e{e}" for e in range(E)] * 2,
                      hovertemplate="%{customdata}: %{value:,} tokens<extra></extra>"),
            link=dict(source=[], target=[], value=[]), textfont=dict(size=11)))
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
        """The drawn links: the "Top links" largest with at least the "Min share" of the tokens."""
        n = self.transition_counts()
        min_value = int(np.ceil(float(self.w_min.value) * int(n.sum()))) if self.w_min.value > 0 else 0
        return sankey_links(n, int(self.w_top.value), min_value)

    def node_colors(self) -> list[str]:
        """Node colors of the Sankey (layer a then layer b): the expert palette; more than 16 experts: grey
        with the 8 experts of the largest outflow at layer a highlighted (also at layer b)."""
        E = self.n_experts
        if is_categorical(E):
            return expert_colors(E) * 2
        out = self.transition_counts().sum(axis=1)
        hl = [int(e) for e in np.argsort(-out, kind="stable")[:8] if out[e] > 0]
        return expert_color_map(E, hl) * 2

    def empty_reason(self, total: int | None = None) -> str | None:
        """Why no transition is drawn (an empty token filter), in words; None when there are some."""
        total = int(self.transition_counts().sum()) if total is None else int(total)
        if total > 0:
            return None
        code = W.modality_code(self.w_modality.value)
        if code is None:
            return "No tokens in this trace."
        label = W.modality_name(code)
        held = np.bincount(np.asarray(self.ds["modality"].values, np.int64), minlength=3)
        what = ", ".join(f"{int(n):,} {W.MODALITY_LABELS[m]}" for m, n in enumerate(held[:3]) if n)
        return f"No {label} tokens in this trace: it holds {what or 'no tokens'}."

    # ---------------------------------------------------------------- drawing
    def _draw(self) -> None:
        t0 = time.perf_counter()
        E = self.n_experts
        la, lb = self.layers[self.w_a.value], self.layers[self.w_b.value]
        lk = self.links()
        colors = self.node_colors()
        co = self.coactivation_matrix()
        self.compute_seconds = time.perf_counter() - t0
        total = int(self.transition_counts().sum())
        names = [f"e{e} @{la}" for e in range(E)] + [f"e{e} @{lb}" for e in range(E)]
        why = self.empty_reason(total)
        with self.sankey.batch_update():
            s = self.sankey.data[0]
            s.node.label = node_labels(lk, E, self._sankey_height - 100)
            s.node.customdata = names
            s.node.color = colors
            s.link.source = lk["source"].tolist()
            s.link.target = lk["target"].tolist()
            s.link.value = lk["value"].tolist()
            s.link.color = [rgba(colors[i], 0.45) for i in lk["source"]]
            s.link.customdata = [f"{names[i]} \u2192 {names[j]}" for i, j in zip(lk["source"], lk["target"])]
            s.link.hovertemplate = "%{customdata}: %{value:,} tokens<extra></extra>"
            shown = int(lk["value"].sum())
            self.sankey.layout.title.text = (
                f"Top-1 expert transitions {la} \u2192 {lb}<br><sup>{len(lk['value'])} largest links, "
                f"{shown:,} of {total:,} tokens; node color = expert</sup>" if not why else
                f"Top-1 expert transitions {la} \u2192 {lb}<br><sup>{plotly_text(why)}</sup>")
            self.sankey.layout.annotations[0].text = f"<b>{la}</b> (from)"
            self.sankey.layout.annotations[1].text = f"<b>{lb}</b> (to)"
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
        note = (f" &middot; {lk['n_dropped']:,} smaller links ({lk['dropped']:,} tokens) not drawn: raise "
                "'Top links' or lower 'Min share' to see them" if lk["dropped"] else "")
        co_note = (" &middot; co-activation panel hidden: top-1 routing has no expert pairs" if self.k == 1 else "")
        self.w_status.value = (f"<b style='color:#D55E00'>{html.escape(why)}</b>" if why
                               else f"{len(lk['value'])} links{note}") + co_note
