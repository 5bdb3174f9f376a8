"""ExpertLoadDashboard: MoE layer x expert load heatmap, filters, imbalance metrics, load by position; live mode."""
from __future__ import annotations

import html
import threading
import time
from typing import Any

import numpy as np

from . import _common as W
from ._palette import DIVERGING, SEQUENTIAL, expert_colors
from ._text import plotly_text

__all__ = ["ExpertLoadDashboard"]

_MODES = {"count": "count", "share": "share", "deviation": "deviation from uniform"}
_AXIS_TITLE = {"count": "top-k slots", "share": "share", "deviation": "E·f − 1"}
_HOVER = {"count": "%{z:,}", "share": "%{z:.2%}", "deviation": "%{z:+.1%} vs uniform"}
_SCALES: dict[str, list] = {}


def _colorscale(name: str) -> list:
    """A named colorscale as plotly validates it ([[position, color], ...]; plotly.js lacks e.g. "RdBu_r")."""
    if name not in _SCALES:
        import plotly.graph_objects as go

        _SCALES[name] = [list(x) for x in go.Heatmap(colorscale=name).to_plotly_json()["colorscale"]]
    return _SCALES[name]
_MAX_HZ = 2.0
# A live redraw may take at most this share of the run's wall time in CPU time of the refresh thread.
# On a CPU-bound run the refresh thread competes with the model for the cores: benchmarks/live_overhead.py
# measured a 3.8% median slowdown at a fixed 2 Hz with 1.6% of the run's time spent refreshing (2 cores),
# i.e. about 2.4x the refresh CPU share; 0.8% keeps the slowdown within the 2% bound. A redraw costs
# 3.5-6 ms of CPU (4 x 16 to 48 x 128 experts) on the Intel VM, and 4.5-5 ms (5.5-10 ms in a busy
# kernel, with its messages) on a 2-core AMD EPYC VM where it cost 10-11 ms before the cheaper pushes of
# 2026-12-07; so this allows 1-2 Hz: the dashboard moves at least once a second while tokens arrive.
# The rule uses the (lower) median cost of the last 5 redraws, so that one slow redraw (a GC pass, a busy
# core) does not leave the last frame up for seconds; costs that persist count. The bound is on CPU
# time, not wall time: the wall time of a redraw includes waiting for the GIL while the model runs
# (20-50 ms in notebook 02), which costs the run nothing, and measuring it made the dashboard wait 5 s
# and more between redraws.
_MAX_DUTY = 0.008


def next_refresh_wait(period: float, cost: float, max_duty: float = _MAX_DUTY) -> float:
    """Seconds to wait before the next live refresh: the period, or longer after a costly redraw, so that
    ``cost / (cost + wait) <= max_duty`` (refreshes take at most that share of wall time). ``cost``: the
    refresh thread's CPU seconds for the last redraw (``time.thread_time``)."""
    return max(period, cost / max_duty - cost)


class ExpertLoadDashboard(W.ViewBase):
    """Load of every expert at every MoE layer, from a stored trace or live from a Recorder.

    ``source``: a trace path, an ``xarray.Dataset`` from :func:`workbench.open_trace`, or a running
    :class:`workbench.hooks.Recorder` (live mode). Controls:

    * ``mode``: ``"count"`` (top-k slots N_i), ``"share"`` (f_i = N_i / (k T), see
      :func:`workbench.analysis.expert_load`) or ``"deviation"`` (E f_i - 1: 0 = uniform);
    * ``modality``: None (all tokens) or a :class:`~workbench.trace.schema.Modality` (code or name:
      0 text, 1 image patches, 2 special) - stored traces only;
    * ``seq_range``: inclusive (first, last) sequence ids - stored traces only;
    * ``layer``: the decoder layer index of the MoE layer shown as per-expert bars (default: the first
      MoE layer); it must be one of the trace's MoE layers (coordinate ``layer``; live: of
      ``recorder.loads()``), else ValueError. The :attr:`layer` property reads and sets it.

    The panel on the right shows per layer the imbalance metrics of
    :func:`workbench.analysis.load_imbalance`: CV, max/mean and normalized load entropy.

    The "by position" panel (toggle ``w_position``, or ``by_position=True``; stored traces only) shows
    for the bars' layer the load share per position bucket (:func:`workbench.analysis.load_by_position`,
    buckets ``position_bucket``: ``"log2"`` by default, an int width, ``"chunk"`` or edges) and the
    same-top-1 rate of consecutive tokens per bucket with its independent-draws baseline
    (:func:`workbench.analysis.same_expert_rate_by_position`), under the same token and sequence
    filters. It is computed (one pass over the selected tokens, all layers) only while shown.

    Live mode polls ``recorder.loads()`` (a copy of the writer's running totals) in a daemon thread
    at ``refresh_hz`` (capped at 2 Hz) and redraws only when the committed token count changed (so
    at most once per recorder commit: ``wb.record(..., commit_every_seconds=0.5)`` for 2 Hz); a
    redraw that took c seconds of the thread's CPU time delays the next by at least c / 0.008, so
    refreshing takes at most 0.8% of the run's wall time (about 1.3-2 Hz). The status line shows the
    progress: tokens committed, tokens per second (over the last few seconds) and redraws. It stops
    when the recorder is closed or on :meth:`stop`.
    """

    def __init__(self, source: Any, *, mode: str = "share", modality: int | str | None = None,
                 seq_range: tuple[int, int] | None = None, layer: int | None = None, refresh_hz: float = 2.0,
                 autostart: bool = True, by_position: bool = False, position_bucket: Any = "log2"):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        self._init_refresh_state(refresh_hz)
        seq_lo, seq_hi = self._open_source(source)
        li = W.layer_position(self._layer_coords, layer, "ExpertLoadDashboard")
        if self.live and (modality is not None or seq_range is not None):
            raise ValueError("modality / seq_range filters need a stored trace (live mode shows all tokens)")
        self._build_controls(mode, modality, seq_range, (seq_lo, seq_hi), li)
        self.heatmap = self._build_heatmap(li)
        self.bars = self._build_bars()
        self.metrics = self._build_metrics()
        self.position_bucket = position_bucket
        self.position = self._build_position()
        self.position_data: dict | None = None  # {"load": DataArray, "rate": Dataset} of the current filters
        self._position_key = None

        self.counts = np.zeros((self.n_layers, self.n_experts), np.int64)
        self.n_selected = 0
        self._seen_tokens = -1
        self.compute_seconds = 0.0
        self._recompute()
        self._opened, self._opened_tokens = time.perf_counter(), self.n_selected
        self._redraw()
        self._wire_events()
        self.widget = self._layout()
        if by_position:
            if self.live:
                raise ValueError("by_position needs a stored trace (live mode shows the recorder's load totals)")
            self.w_position.value = True
        if self.live and autostart:
            self.start()

    # ---------------------------------------------------------------- construction
    def _init_refresh_state(self, refresh_hz: float) -> None:
        """The live refresh thread's state (also used by :meth:`refresh` on stored traces)."""
        self._update_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.refresh_hz = min(float(refresh_hz), _MAX_HZ)
        if self.refresh_hz <= 0:
            raise ValueError(f"refresh_hz must be > 0, got {refresh_hz}")
        self.n_refreshes = 0
        self.refresh_times: list[float] = []  # perf_counter() of each live redraw (redraw cadence)
        self._progress: list[tuple[float, int]] = []  # (time, committed tokens) of recent refreshes
        self._quiet = False
        self.refresh_cpu_seconds = 0.0  # CPU time the live thread spent refreshing (its cost to the run)

    def _open_source(self, source: Any) -> tuple[int, int]:
        """Open a stored trace or attach to a recorder: sizes, layers; returns the sequence id range."""
        self.live = W.is_recorder(source)
        if self.live:
            self.recorder = source
            da = source.loads()
            self.n_layers, self.n_experts = (int(x) for x in da.shape)
            self.k = int(getattr(getattr(source, "spec", None), "top_k", 0) or 0)
            self._layer_coords = da.coords.to_dataset()  # decoder index of each MoE layer (coordinate "layer")
            self.loads = None
            self.ds = None
            seq = (0, 0)
        else:
            self.recorder = None
            self.ds, self.path = W.open_any(source)
            self.loads = W.TraceLoads(self.ds)
            self.n_layers, self.n_experts, self.k = self.loads.n_layers, self.loads.n_experts, self.loads.k
            self._layer_coords = self.ds
            seq = self.loads.sequence_range()
        self.layer_values = W.layer_values(self._layer_coords)
        self.layers = [f"L{x}" for x in self.layer_values]
        return seq

    def _build_controls(self, mode: str, modality, seq_range, seq_bounds: tuple[int, int], li: int) -> None:
        import ipywidgets as ipw

        seq_lo, seq_hi = seq_bounds
        self.w_mode = ipw.ToggleButtons(options=[(v, k) for k, v in _MODES.items()], value=mode,
                                        description="Show", style={"button_width": "180px"})
        self.w_modality = ipw.Dropdown(options=list(W.MODALITY_OPTIONS), description="Tokens", disabled=self.live,
                                       value=W.modality_value(modality))
        self.w_seq = ipw.IntRangeSlider(value=tuple(seq_range) if seq_range is not None else (seq_lo, seq_hi),
                                        min=seq_lo, max=max(seq_hi, seq_lo), description="Sequences",
                                        continuous_update=False, disabled=self.live or seq_hi == seq_lo,
                                        layout=ipw.Layout(width="420px"))
        # positions on moe_layer, labelled with the decoder indices
        self.w_layer = ipw.SelectionSlider(options=[(lab, i) for i, lab in enumerate(self.layers)],
                                           value=li, description="Layer", continuous_update=False)
        self.w_position = ipw.ToggleButton(value=False, description="by position", disabled=self.live,
                                           tooltip="load share and same-expert rate per position bucket")
        self.w_status = ipw.HTML()

    def _build_heatmap(self, li: int):
        E, L = self.n_experts, self.n_layers
        # fixed margins (no autoexpand): a control change that alters the colorbar's or the axes' label widths
        # then redraws once, instead of a second time with margins pushed to fit (also the first draw)
        fig = W.figure_widget(
            title=dict(text="Expert load<br><sup> </sup>", x=0.01), height=max(320, min(900, 14 * L + 140)),
            width=600, margin=dict(l=60, r=100, t=70, b=50, autoexpand=False),
            # at most 24 layer labels (every 2nd of 48): each redraw measures every label, a third of the
            # heatmap's drawing time with all 48; hover names the exact layer
            xaxis=dict(title="expert", constrain="domain"), yaxis=dict(title="MoE layer (decoder index)",
                                                                       autorange="reversed", dtick=-(-L // 24)))
        fig.add_heatmap(z=np.zeros((L, E)), x=list(range(E)), y=self.layers, colorscale=SEQUENTIAL,
                        colorbar=dict(title=dict(text="share")), hoverongaps=False, name="load")
        fig.layout.meta = {"view": "ExpertLoadDashboard.heatmap"}
        # the highlight of the bars' layer: rows are the moe_layer positions on the categorical y axis
        fig.layout.shapes = [dict(type="rect", xref="paper", x0=0, x1=1, yref="y", y0=li - 0.5,
                                  y1=li + 0.5, line=dict(color="#D55E00", width=2))]
        self._scale = SEQUENTIAL
        return fig

    def _build_bars(self):
        E = self.n_experts
        fig = W.figure_widget(title=dict(text="", x=0.01), height=300, width=760,
                              margin=dict(l=75, r=20, t=50, b=50, autoexpand=False),
                              xaxis=dict(title="expert"), yaxis=dict(title="share"), showlegend=False)
        fig.add_bar(x=list(range(E)), y=np.zeros(E), marker=dict(color=expert_colors(E)), name="experts")
        fig.layout.meta = {"view": "ExpertLoadDashboard.bars"}
        return fig

    def _build_metrics(self):
        from plotly.subplots import make_subplots

        from ._plot import Plot, new_figure

        L = self.n_layers
        sp = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.11,
                           subplot_titles=("CV = std f / mean f", "max / mean = E max f",
                                           "load entropy / log E"), figure=new_figure())
        fig = Plot(sp)
        fig.update_layout(height=max(420, min(900, 14 * L + 140)), width=330,
                          title=dict(text="Imbalance per layer", x=0.01), showlegend=False,
                          margin=dict(l=50, r=10, t=70, b=40))
        for row, name in enumerate(("cv", "max_over_mean", "load_entropy"), start=1):
            fig.add_scatter(x=self.layers, y=np.zeros(L), mode="lines+markers", name=name,
                            line=dict(color="#0072B2"), row=row, col=1)
        fig.update_xaxes(title_text="MoE layer", row=3, col=1)
        fig.layout.meta = {"view": "ExpertLoadDashboard.metrics"}
        return fig

    def _build_position(self):
        from plotly.subplots import make_subplots

        from ._plot import Plot, new_figure

        sp = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.62, 0.38], horizontal_spacing=0.04,
                           subplot_titles=("load share by position", "same top-1 expert as the previous token"),
                           figure=new_figure())
        fig = Plot(sp)
        fig.update_layout(height=320, width=760, title={"text": "By position", "x": 0.01}, showlegend=True,
                          legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": -0.18},
                          margin={"l": 90, "r": 20, "t": 70, "b": 70, "autoexpand": False})
        fig.add_heatmap(z=np.zeros((1, self.n_experts)), x=list(range(self.n_experts)), y=["0"], colorscale=SEQUENTIAL,
                        showscale=False, hoverongaps=False, name="load share", showlegend=False,
                        hovertemplate="positions %{y}, expert %{x}: %{z:.2%}<extra></extra>", row=1, col=1)
        fig.add_scatter(x=[0.0], y=["0"], mode="lines+markers", name="same top-1 rate", line={"color": "#0072B2"},
                        hovertemplate="positions %{y}: %{x:.1%}<extra></extra>", row=1, col=2)
        fig.add_scatter(x=[0.0], y=["0"], mode="lines", name="baseline (independent draws)",
                        line={"color": "#999999", "dash": "dash"},
                        hovertemplate="positions %{y}: %{x:.1%}<extra></extra>", row=1, col=2)
        fig.update_xaxes(title_text="expert", row=1, col=1)
        fig.update_xaxes(title_text="rate", range=[0, 1], row=1, col=2)
        fig.update_yaxes(title_text="position", autorange="reversed", type="category", row=1, col=1)
        fig.layout.meta = {"view": "ExpertLoadDashboard.position"}
        return fig

    def _wire_events(self) -> None:
        self.w_mode.observe(lambda ch: self._on_mode(), "value")
        self.w_layer.observe(lambda ch: self._on_layer(), "value")
        self.w_modality.observe(lambda ch: self._on_filter(), "value")
        self.w_seq.observe(lambda ch: self._on_filter(), "value")
        self.w_position.observe(lambda ch: self._on_position(), "value")

    def _layout(self):
        import ipywidgets as ipw

        controls = ipw.VBox([ipw.HBox([self.w_mode]), ipw.HBox([self.w_modality, self.w_seq]),
                             ipw.HBox([self.w_layer, self.w_position]), self.w_status])
        self.position_box = ipw.VBox([])  # holds the position panel while it is shown
        widget = ipw.VBox([controls, ipw.HBox([self.heatmap.widget, self.metrics.widget]), self.bars.widget,
                           self.position_box])
        widget.add_class("wb-load-dashboard")
        return widget

    # ---------------------------------------------------------------- state (also for tests)
    @property
    def mode(self) -> str:
        return self.w_mode.value

    @mode.setter
    def mode(self, v: str) -> None:
        self.w_mode.value = v

    @property
    def layer(self) -> int:
        """Decoder layer index of the MoE layer shown as per-expert bars (set it to show another)."""
        return self.layer_values[int(self.w_layer.value)]

    @layer.setter
    def layer(self, v: int) -> None:
        self.w_layer.value = W.layer_position(self._layer_coords, v, "ExpertLoadDashboard")

    @property
    def z(self) -> np.ndarray:
        """The heatmap values currently shown, (moe_layer, expert)."""
        return np.asarray(self.heatmap.data[0].z, dtype=float)

    def values(self, mode: str | None = None) -> np.ndarray:
        """Heatmap values for ``mode`` from the current counts (see :func:`_common.derive`)."""
        return W.derive(self.counts, self.n_selected, self.k, mode or self.mode)

    def metrics_values(self) -> dict[str, np.ndarray]:
        return W.imbalance(self.counts, self.n_selected, self.k)

    # ---------------------------------------------------------------- updates
    def _recompute(self) -> None:
        t0 = time.perf_counter()
        if self.live:
            rec = self.recorder
            n = int(rec.n_tokens)
            da = rec.loads()
            self.counts = np.asarray(da.values, np.int64)
            if not self.k:  # no spec: infer k from the totals
                self.k = max(1, int(round(self.counts[0].sum() / n))) if n else 1
            self.n_selected = n
            self._seen_tokens = n
        else:
            seq = tuple(self.w_seq.value)
            lo, hi = self.loads.sequence_range()
            seq_range = None if seq == (lo, hi) else seq
            self.counts, self.n_selected = self.loads.counts(seq_range, W.modality_code(self.w_modality.value))
        self.compute_seconds = time.perf_counter() - t0

    def tokens_per_second(self, window: float = 5.0) -> float | None:
        """Live: committed tokens per second over the last ``window`` seconds of refreshes (None before two)."""
        pts = self._progress
        if len(pts) < 2:
            return None
        t1, n1 = pts[-1]
        t0, n0 = next(((t, n) for t, n in pts if t1 - t <= window), pts[0])
        if t1 - t0 <= 0:
            t0, n0 = pts[-2]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def empty_reason(self) -> str | None:
        """Why the selection holds no token (a stored trace's filters), in words; None when it holds some.

        E.g. "No image patch tokens in this trace: it holds 120 text and 4 special tokens (a text-only
        trace)" for the image-patch filter on a text-only trace."""
        if self.live or self.n_selected > 0:
            return None
        seq = tuple(self.w_seq.value)
        full = seq == self.loads.sequence_range()
        where = "this trace" if full else f"sequences {seq[0]}\u2013{seq[1]}"
        code = W.modality_code(self.w_modality.value)
        if code is None:
            return f"No tokens in {where}" + ("" if self.loads.n_tokens else " (the trace is empty)")
        per = self.loads._by_modality(None if full else seq)
        held = [(W.MODALITY_LABELS[m], int(per[m][1])) for m in sorted(per) if int(per[m][1]) > 0]
        what = ", ".join(f"{n:,} {label}" for label, n in held) if held else "no tokens"
        label = W.modality_name(code)
        note = (" (a text-only trace: record images to see image-patch routing)"
                if code == 1 and {lab for lab, _ in held} <= {"text", "special"} and held else "")
        return f"No {label} tokens in {where}: it holds {what}{note}."

    def _status_html(self) -> str:
        if self.live:
            state = "live" if self._thread is not None and self._thread.is_alive() else "stopped"
            rate = self.tokens_per_second()
            speed = f"{rate:,.0f} tokens/s" if rate is not None else "&ndash; tokens/s"
            return (f"<b>{state}</b> &middot; <span class='wb-progress'>{self.n_selected:,} tokens committed "
                    f"&middot; {speed}</span> &middot; refresh &le; {self.refresh_hz:g} Hz &middot; "
                    f"{self.n_refreshes} redraws")
        mod = dict((v, k) for k, v in W.MODALITY_OPTIONS)[self.w_modality.value]
        why = self.empty_reason()
        if why:
            return f"<b style='color:#D55E00'>{html.escape(why)}</b> Pick another token filter or range."
        return (f"{self.n_selected:,} of {self.loads.n_tokens:,} tokens selected ({mod}, sequences "
                f"{self.w_seq.value[0]}-{self.w_seq.value[1]}) &middot; top-{self.k} of {self.n_experts} experts")

    def _variant_attrs(self, lim: float, li: int) -> tuple[dict, dict]:
        """Per mode, the attributes that differ between the modes, as ``{mode: (trace attrs, layout attrs)}``
        for the heatmap and for the bars (besides the values themselves: z, y). The Python figures get
        exactly these (:meth:`Plot.apply_variant`) and the browser switches between them itself
        (:meth:`Plot.set_variants`), deriving the values from the counts as :func:`_common.derive` does."""
        hm, bars = {}, {}
        for mode, label in _MODES.items():
            dev = mode == "deviation"
            title, hover = _AXIS_TITLE[mode], _HOVER[mode]
            hm[mode] = ({"colorscale": _colorscale(DIVERGING if dev else SEQUENTIAL),
                         "zmid": 0 if dev else None, "zmin": -lim if dev else None, "zmax": lim if dev else None,
                         "zauto": not dev, "colorbar.title.text": title,
                         "hovertemplate": "layer %{y}, expert %{x}: " + hover + "<extra></extra>"},
                        # two short lines in every mode: the title fits beside the toolbar, same top margin
                        {"title.text": f"Expert load<br><sup>{label} — {self.n_selected:,} tokens</sup>"})
            bars[mode] = ({"hovertemplate": "expert %{x}: " + hover.replace("%{z", "%{y") + "<extra></extra>"},
                          {"yaxis.title.text": title,
                           "title.text": f"Layer {self.layer_values[li]}: {label} per expert"})
        return hm, bars

    def _redraw(self, heatmap: bool = True, layer: bool = True, metrics: bool = True) -> None:
        """Push the current state to the figures (only the parts a control change affects).

        The heatmap and the bars also carry their three modes as client-side variants: the "Show"
        toggle switches them in the browser with no kernel round trip; the push that follows here
        (the Python figures, for exports and views opened later) is then not drawn again."""
        mode = self.mode
        z = self.values(mode)
        li = int(self.w_layer.value)
        dev = self.values("deviation")
        lim = float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 1.0
        lim = max(lim, 1e-9)
        hm_modes, bar_modes = self._variant_attrs(lim, li)
        derive = {"kind": "load", "den": int(self.k) * int(self.n_selected), "n_experts": int(self.n_experts)}
        why = self.empty_reason()
        # an empty selection says why on the figures themselves (not empty axes)
        note = [dict(text=plotly_text(why).replace(": ", ":<br>", 1), xref="paper", yref="paper", x=0.5, y=0.5,
                     showarrow=False, bgcolor="rgba(255,255,255,0.92)", font=dict(color="#D55E00", size=12))
                ] if why else []

        def annotate(fig):
            have = fig.figure._layout.get("annotations") or []  # raw props: no plotly objects built per redraw
            if len(have) != len(note) or (note and have[0].get("text") != note[0]["text"]):
                fig.layout.annotations = note

        def draw_heatmap():
            with self.heatmap.batch_update():
                annotate(self.heatmap)
                if heatmap:
                    self.heatmap.set_array(0, "z", z)
                    attrs, lay = hm_modes[mode]
                    scale = DIVERGING if mode == "deviation" else SEQUENTIAL
                    if self._scale == scale:  # colorscale validation is the slow part: only on a change
                        attrs = {k: v for k, v in attrs.items() if k != "colorscale"}
                    self.heatmap.apply_variant(attrs, lay)
                    self._scale = scale
                    self.heatmap.set_variants(self.w_mode, mode, hm_modes, derive={**derive, "attr": "z",
                                                                                   "base": self.counts}, order=0)
                box = (self.heatmap.figure._layout.get("shapes") or [{}])[0]  # raw props: cheap to read
                if layer and (box.get("y0"), box.get("y1")) != (li - 0.5, li + 0.5):
                    self.heatmap.layout.shapes[0].update(y0=li - 0.5, y1=li + 0.5)

        def draw_bars():
            with self.bars.batch_update():
                annotate(self.bars)
                self.bars.set_array(0, "y", np.asarray(z[li], np.float64))
                self.bars.apply_variant(*bar_modes[mode])
                self.bars.set_variants(self.w_mode, mode, bar_modes, derive={**derive, "attr": "y",
                                                                             "base": self.counts[li]}, order=1)

        with self._update_lock:
            # the figure the control is about goes first (messages are drawn in order)
            if heatmap:
                draw_heatmap()
                draw_bars()
            elif layer:
                draw_bars()
                draw_heatmap()
            if metrics:
                m = self.metrics_values()
                with self.metrics.batch_update():
                    for i, name in enumerate(("cv", "max_over_mean", "load_entropy")):
                        self.metrics.set_array(i, "y", np.asarray(m[name]))
            self.w_status.value = self._status_html()

    def _on_layer(self) -> None:
        self._redraw(heatmap=False, layer=True, metrics=False)
        self._redraw_position()

    # ---------------------------------------------------------------- by position
    def _selected_trace(self):
        """The stored trace restricted to the sequence range (all of it when the range is full)."""
        seq = tuple(self.w_seq.value)
        if seq == self.loads.sequence_range():
            return self.ds, None
        rows = self.loads._token_rows(seq)
        return self.ds.isel(token=rows), seq

    def _recompute_position(self) -> None:
        """Load by position and same-expert rate by position of the selected tokens (all layers; cached per
        filter, so a layer change only redraws)."""
        from workbench.analysis.position import (
            load_by_position,
            same_expert_rate_by_position,
        )

        sub, seq = self._selected_trace()
        code = W.modality_code(self.w_modality.value)
        key = (seq, code, self.loads.n_tokens)
        if key == self._position_key and self.position_data is not None:
            return
        kw = {"bucket": self.position_bucket, "modality": code, "n_experts": self.n_experts}
        self.position_data = {"load": load_by_position(sub, **kw), "rate": same_expert_rate_by_position(sub, **kw)}
        self._position_key = key

    def position_values(self) -> dict[str, np.ndarray]:
        """What the position panel shows for the bars' layer: ``labels`` (one per bucket), ``share``
        (bucket, expert), ``same_top1_rate``, ``baseline`` and ``n_pairs`` per bucket."""
        if self.position_data is None:
            self._recompute_position()
        load, rate = self.position_data["load"], self.position_data["rate"]
        li = int(self.w_layer.value)
        start = np.asarray(load["position_start"].values)
        stop = np.asarray(load["position_stop"].values)
        labels = [str(a) if b - a == 1 else f"{a}\u2013{b - 1}" for a, b in zip(start.tolist(), stop.tolist())]
        return {"labels": labels, "share": np.asarray(load.isel(moe_layer=li).values, np.float64),
                "n_tokens": np.asarray(load["n_tokens"].values),
                "same_top1_rate": np.asarray(rate["same_top1_rate"].isel(moe_layer=li).values, np.float64),
                "baseline": np.asarray(rate["same_top1_baseline"].isel(moe_layer=li).values, np.float64),
                "n_pairs": np.asarray(rate["n_pairs"].values)}

    def _redraw_position(self) -> None:
        if not self.w_position.value or self.live:
            return
        self._recompute_position()
        v = self.position_values()
        with self._update_lock, self.position.batch_update():
            hm, line, base = self.position.data[:3]
            hm.z, hm.y = v["share"], v["labels"]
            hm.customdata = np.repeat(v["n_tokens"][:, None], self.n_experts, axis=1)
            hm.hovertemplate = "positions %{y} (%{customdata:,} tokens), expert %{x}: %{z:.2%}<extra></extra>"
            line.x, line.y = v["same_top1_rate"], v["labels"]
            line.customdata = v["n_pairs"]
            line.hovertemplate = "positions %{y}: %{x:.1%} of %{customdata:,} pairs<extra></extra>"
            base.x, base.y = v["baseline"], v["labels"]
            self.position.layout.title.text = (f"By position, layer {self.layer_values[int(self.w_layer.value)]} "
                                               f"({self.position_data['load'].attrs['bucket']} buckets)")

    def _on_position(self) -> None:
        if self.w_position.value:
            self.w_status.value = "computing&hellip;"
            self._redraw_position()
            self.position_box.children = [self.position.widget]
            self.w_status.value = self._status_html()
        else:
            self.position_box.children = []

    def _on_mode(self) -> None:
        self._redraw(heatmap=True, layer=False, metrics=False)

    def _on_filter(self) -> None:
        if self._quiet:
            return
        self.w_status.value = "computing&hellip;"
        self._recompute()
        self._redraw()
        self._redraw_position()

    def refresh(self) -> bool:
        """Re-read the source and redraw if it changed; returns whether it redrew.

        Live: new totals from the recorder. Stored trace: re-open the path (a trace still being
        written has more committed tokens)."""
        with self._update_lock:  # the live thread and the user's thread may both call it
            if self.live:
                if int(self.recorder.n_tokens) == self._seen_tokens:
                    return False
                self._recompute()
                now = time.perf_counter()
                if not self._progress:  # the start of the run: the tokens seen when the dashboard opened
                    self._progress.append((self._opened, self._opened_tokens))
                self._progress.append((now, self.n_selected))
                self._progress = [p for p in self._progress if now - p[0] <= 30.0][-64:]
                self._redraw()
                self.n_refreshes += 1
                self.refresh_times.append(now)
                return True
            if self.path is None:
                return False
            ds, _ = W.open_any(self.path)
            if int(ds.attrs.get("n_tokens", -1)) == self.loads.n_tokens:
                return False
            was_full = tuple(self.w_seq.value) == self.loads.sequence_range()
            self.ds, self.loads = ds, W.TraceLoads(ds)
            lo, hi = self.loads.sequence_range()
            self._quiet = True  # the slider updates below must not trigger a recompute each
            try:
                self.w_seq.max = max(hi, self.w_seq.min)
                self.w_seq.min = lo
                self.w_seq.disabled = hi == lo
                if was_full:
                    self.w_seq.value = (lo, hi)
            finally:
                self._quiet = False
            self._recompute()
            self._redraw()
            self._redraw_position()
            return True

    # ---------------------------------------------------------------- live thread
    def start(self) -> None:
        """Start the live refresh thread (live mode only)."""
        if not self.live:
            raise RuntimeError("start(): the dashboard shows a stored trace; use refresh() to re-read it")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="wb-load-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the live refresh thread (after one last refresh)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None
        if self.live:
            self.refresh()
            self.w_status.value = self._status_html()
            self.update_static()  # the saved notebook shows the final loads, not the empty start

    def _loop(self) -> None:
        period = 1.0 / self.refresh_hz
        wait = period
        costs: list[float] = []  # CPU seconds of the last redraws
        while not self._stop.wait(wait):
            c0 = time.thread_time()
            drew = False
            try:
                drew = self.refresh()
            except Exception as e:  # shown, never raised into the recording thread
                msg = html.escape(f"{type(e).__name__}: {e}")
                self.w_status.value = f"<span style='color:#D55E00'>refresh failed: {msg}</span>"
            finally:
                cost = time.thread_time() - c0  # CPU time: what the refresh takes from the run
                self.refresh_cpu_seconds += cost
            if drew:
                costs = [*costs[-4:], cost]
                wait = next_refresh_wait(period, sorted(costs)[(len(costs) - 1) // 2])  # the lower median
            if getattr(self.recorder, "_closed", False):
                self.refresh()
                break
        self._thread = None
        self.w_status.value = self._status_html()
