"""TraceComparison: two traces' expert loads side by side and their difference."""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from . import _common as W
from ._text import plotly_text
from ._palette import DIVERGING, SEQUENTIAL

__all__ = ["TraceComparison"]

_MODES = {"share": "share", "count": "count", "deviation": "deviation from uniform"}


class TraceComparison(W.ViewBase):
    """Expert load of traces ``a`` and ``b`` (paths or Datasets) side by side, and ``b - a``.

    Both traces must have the same MoE layers and number of experts. ``mode``: ``"share"`` (the
    default: comparable across traces of different lengths), ``"count"`` or ``"deviation"`` (see
    :class:`ExpertLoadDashboard`); the difference is taken in the chosen mode. ``modality`` (None or a
    :class:`~workbench.trace.schema.Modality` code or name) filters the tokens of both. A line chart
    compares the per-layer CV (std f / mean f) of the two. No layer argument: every MoE layer is shown.
    """

    def __init__(self, a: Any, b: Any, *, labels: tuple[str, str] = ("A", "B"), mode: str = "share",
                 modality: int | str | None = None):
        import ipywidgets as ipw

        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        self.ds_a, _ = W.open_any(a)
        self.ds_b, _ = W.open_any(b)
        self.loads_a, self.loads_b = W.TraceLoads(self.ds_a), W.TraceLoads(self.ds_b)
        la, lb = W.layer_labels(self.ds_a), W.layer_labels(self.ds_b)
        if la != lb:
            raise ValueError(f"the traces have different MoE layers: {labels[0]} {la}, {labels[1]} {lb}")
        if self.loads_a.n_experts != self.loads_b.n_experts:
            raise ValueError(f"the traces have different numbers of experts: {labels[0]} "
                             f"{self.loads_a.n_experts}, {labels[1]} {self.loads_b.n_experts}")
        self.labels = tuple(str(x) for x in labels)
        self.layers = la
        self.n_experts = self.loads_a.n_experts
        self.w_mode = ipw.ToggleButtons(options=[(v, k) for k, v in _MODES.items()], value=mode, description="Show",
                                        style={"button_width": "180px"})
        self.w_modality = ipw.Dropdown(options=list(W.MODALITY_OPTIONS), description="Tokens",
                                       value=W.modality_value(modality))
        self.w_status = ipw.HTML()
        E, L = self.n_experts, len(la)
        h = max(320, min(900, 14 * L + 140))
        self.figs = []
        for name in (*self.labels, f"{self.labels[1]} \u2212 {self.labels[0]}"):
            f = W.figure_widget(title=dict(text=plotly_text(name), x=0.01), height=h, width=375,
                                xaxis=dict(title="expert"), yaxis=dict(title="MoE layer", autorange="reversed"))
            f.add_heatmap(z=np.zeros((L, E)), x=list(range(E)), y=la, colorscale=SEQUENTIAL, hoverongaps=False,
                          colorbar=dict(title=dict(text="")))
            f.layout.meta = {"view": f"TraceComparison.{name}"}
            self.figs.append(f)
        self.cv = W.figure_widget(title=dict(text="Imbalance (CV) per layer", x=0.01), height=300, width=760,
                                  xaxis=dict(title="MoE layer"), yaxis=dict(title="CV = std f / mean f"))
        for name, color in zip(self.labels, ("#0072B2", "#E69F00")):
            self.cv.add_scatter(x=la, y=np.zeros(L), mode="lines+markers", name=plotly_text(name),
                                line=dict(color=color))
        self._draw()
        self.w_mode.observe(lambda ch: self._draw(), "value")
        self.w_modality.observe(lambda ch: self._draw(), "value")
        self.widget = ipw.VBox([ipw.HBox([self.w_mode, self.w_modality]), self.w_status,
                                ipw.HBox([f.widget for f in self.figs]), self.cv.widget])
        self.widget.add_class("wb-trace-comparison")

    def values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, b - a) in the chosen mode and token filter."""
        m = W.modality_code(self.w_modality.value)
        (na, ta), (nb, tb) = self.loads_a.counts(None, m), self.loads_b.counts(None, m)
        self._n = (ta, tb)
        self._counts = (na, nb)
        za = W.derive(na, ta, self.loads_a.k, self.w_mode.value)
        zb = W.derive(nb, tb, self.loads_b.k, self.w_mode.value)
        return za, zb, zb.astype(np.float64) - za.astype(np.float64)

    def _draw(self) -> None:
        za, zb, d = self.values()
        mode = self.w_mode.value
        finite = np.concatenate([za[np.isfinite(za)].ravel(), zb[np.isfinite(zb)].ravel()]).astype(float)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        title = {"count": "top-k slots", "share": "share", "deviation": "E·f − 1"}[mode]
        for f, z in zip(self.figs[:2], (za, zb)):
            with f.batch_update():
                hm = f.data[0]
                hm.z = z
                if mode == "deviation":
                    lim = max(abs(lo), abs(hi), 1e-9)
                    hm.update(colorscale=DIVERGING, zmin=-lim, zmax=lim, zmid=0)
                else:
                    hm.update(colorscale=SEQUENTIAL, zmin=lo, zmax=hi, zmid=None)
                hm.colorbar.title.text = title
        lim = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 1.0
        with self.figs[2].batch_update():
            hm = self.figs[2].data[0]
            hm.z = d
            hm.update(colorscale=DIVERGING, zmin=-max(lim, 1e-9), zmax=max(lim, 1e-9), zmid=0)
            hm.colorbar.title.text = f"\u0394 {title}"
        na, nb = self._counts
        ta, tb = self._n
        with self.cv.batch_update():
            self.cv.data[0].y = W.imbalance(na, ta, self.loads_a.k)["cv"]
            self.cv.data[1].y = W.imbalance(nb, tb, self.loads_b.k)["cv"]
        la, lb = (html.escape(x) for x in self.labels)
        self.w_status.value = (f"{la}: {ta:,} tokens &middot; {lb}: {tb:,} tokens "
                               f"&middot; difference = {lb} \u2212 {la} ({_MODES[mode]})")
