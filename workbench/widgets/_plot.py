"""A light plotly widget: a ``plotly.graph_objects.Figure`` drawn by plotly.js in an anywidget.

Why not ``plotly.graph_objects.FigureWidget``? Since plotly 6 every FigureWidget is an anywidget
whose ES module is the whole plotly.js bundle (~5 MB), sent to the browser once PER FIGURE and
evaluated there, and each update is followed by layout/trace "delta" messages back to the
kernel. A dashboard of three figures took ~9 s to appear and ~150 ms per update in the browser
test (2-core machine). Here:

* plotly.js (the ``plotly.min.js`` shipped with the ``plotly`` package, no network) travels ONCE
  per kernel, in a shared model (:class:`PlotlyLibrary`); each figure's module is ~2 KB and loads
  the library once per page (``globalThis`` promise);
* a figure is its JSON (``fig.to_json()``: numpy arrays as base64 typed arrays, NaN allowed; large
  float64 arrays travel as float32), pushed in one message per change. A view that has drawn the
  previous revision applies only the difference (``patch``: the changed trace and layout
  attributes, drawn with one ``Plotly.update``); a new view (or one that missed a revision) draws
  the whole figure (``spec``) with ``Plotly.react``. Nothing comes back to the kernel;
* the draws of all plots of a page run one at a time, and each is painted before the next starts,
  so the figure a control is about (pushed first) appears without waiting for the others.
* client-side variants (:meth:`Plot.set_variants`): a figure can carry a few attribute sets picked by a
  control (e.g. the load dashboard's "Show" toggle) plus base data to derive the one array that differs
  (counts -> count / share / deviation). The browser switches on the control's change itself, with no
  kernel round trip; the kernel still updates its figure and pushes it (exports, views opened later),
  marked ``variant_only``, which a view that already switched does not draw again.

:class:`Plot` wraps a ``go.Figure`` with the FigureWidget-like bits the views use (``data``,
``layout``, ``batch_update()``), so view code mutates a validated plotly figure and the browser
gets it on exit of ``batch_update()``.
"""
from __future__ import annotations

import base64
import contextlib
import copy
from pathlib import Path

import anywidget
import ipywidgets
import plotly
import plotly.graph_objects as go
import traitlets as t
from _plotly_utils.basevalidators import DataArrayValidator, is_homogeneous_array
from _plotly_utils.utils import plotlyjsShortTypes, to_typed_array_spec

__all__ = ["Plot", "PlotlyLibrary", "PlotView", "plotly_library", "new_figure", "TEMPLATE", "figure_patch",
           "compact_arrays"]

_ESM = r"""
const LIB_PREFIX = "IPY_MODEL_";

function loadPlotly(model) {
  if (!globalThis.__workbenchPlotly) {
    globalThis.__workbenchPlotly = (async () => {
      const ref = model.get("library");
      const lib = await model.widget_manager.get_model(ref.slice(LIB_PREFIX.length));
      const src = lib.get("source");
      const before = window.Plotly;
      const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
      try {
        await new Promise((resolve, reject) => {
          const s = document.createElement("script");
          s.src = url;
          s.onload = resolve;
          s.onerror = () => reject(new Error("workbench: could not load plotly.js"));
          document.head.appendChild(s);
        });
      } finally {
        URL.revokeObjectURL(url);
      }
      const mine = window.Plotly;
      if (before !== undefined) window.Plotly = before;  // leave another extension's Plotly alone
      if (!mine || !mine.react) throw new Error("workbench: plotly.js did not load");
      return mine;
    })();
  }
  return globalThis.__workbenchPlotly;
}

const ASSET = "__workbench_asset__:";

// Large constant values (e.g. an image's data URI) travel once in `assets`; the figure JSON holds
// "__workbench_asset__:<key>" in their place.
function withAssets(obj, assets) {
  if (typeof obj === "string") {
    const key = obj.startsWith(ASSET) ? obj.slice(ASSET.length) : null;
    return key !== null && assets && key in assets ? assets[key] : obj;
  }
  if (Array.isArray(obj)) return obj.map((x) => withAssets(x, assets));
  if (obj && typeof obj === "object") {
    const out = {};
    for (const k of Object.keys(obj)) out[k] = withAssets(obj[k], assets);
    return out;
  }
  return obj;
}

// One queue for the draws of every plot of the page: a draw runs, the browser paints it, then the next
// draw starts. A control change that updates several figures thus shows the first one (the one the
// kernel pushes first) without waiting for the others' drawing. `log` keeps the latest draws' timings
// (performance.now(): message received, draw started, draw done) for benchmarks.
const DRAWS = (globalThis.__workbenchDraws = globalThis.__workbenchDraws || { tail: Promise.resolve(), log: [] });

function afterPaint() {
  return new Promise((resolve) => {
    let done = false;
    const fin = () => { if (!done) { done = true; resolve(); } };
    requestAnimationFrame(() => setTimeout(fin, 0));  // a task queued in a frame callback runs after that frame
    setTimeout(fin, 100);                              // a hidden page draws no frames
  });
}

// JupyterLab's theme: a dark theme (body[data-jp-theme-light="false"]) gets the figure's template recoloured
// from the theme's own CSS variables (background, text, grid), so plots sit on the notebook's background.
// Colours a view sets explicitly (data colours, annotation boxes) are kept.
function isDark() {
  const b = document.body;
  return !!(b && b.dataset && b.dataset.jpThemeLight === "false");
}

function themed(layout) {
  if (!isDark()) return layout;
  const cs = getComputedStyle(document.body);
  const v = (name, dflt) => (cs.getPropertyValue(name) || "").trim() || dflt;
  const bg = v("--jp-layout-color0", "#111111"), fg = v("--jp-ui-font-color1", "#dddddd");
  const grid = v("--jp-border-color2", "#444444");
  const t = JSON.parse(JSON.stringify(layout.template || {}));
  const tl = (t.layout = t.layout || {});
  tl.paper_bgcolor = bg;
  tl.plot_bgcolor = bg;
  tl.font = Object.assign({}, tl.font || {}, { color: fg });
  for (const ax of ["xaxis", "yaxis"]) {
    tl[ax] = Object.assign({}, tl[ax] || {}, { gridcolor: grid, linecolor: grid, zerolinecolor: grid });
  }
  tl.legend = Object.assign({}, tl.legend || {}, { bgcolor: "rgba(0,0,0,0)" });
  // Bars get a thin outline in the theme's text colour: the darkest expert colours (black, dark
  // indigo, dark red) would otherwise vanish into a dark background. Identity colours stay as they are.
  const td = (t.data = t.data || {});
  td.bar = [{ marker: { line: { color: fg, width: 0.8 } } }];
  return Object.assign({}, layout, { template: t });
}

function onThemeChange(fn) {
  if (typeof MutationObserver === "undefined" || !document.body) return () => {};
  const obs = new MutationObserver(fn);
  obs.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light", "data-jp-theme-name"] });
  return () => obs.disconnect();
}

function schedule(fn) {
  DRAWS.tail = DRAWS.tail.then(fn).catch((e) => console.error("workbench plot:", e)).then(afterPaint);
  return DRAWS.tail;
}

// ---- client-side variants (Plot.set_variants): a control (a widget model with a `value`, e.g. a
// ToggleButtons) picks one of a few precomputed attribute sets of the figure, and the browser
// switches to it itself, with no round trip to the kernel. `variants` (JSON) = {order, trace, options,
// derive, modes: {value: {data: {path: value}, layout: {path: value}}}}; `derive` gives the array
// that differs per mode as a function of base data the page already has (see deriveValues).
const DTYPES = { i1: Int8Array, u1: Uint8Array, i2: Int16Array, u2: Uint16Array, i4: Int32Array,
                 u4: Uint32Array, f4: Float32Array, f8: Float64Array };

function decodeArray(spec) {  // {dtype, bdata (base64, little-endian), shape?} -> {flat, shape}
  const bin = atob(spec.bdata);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const flat = new DTYPES[spec.dtype](bytes.buffer);
  const shape = spec.shape ? String(spec.shape).split(",").map(Number) : [flat.length];
  return { flat, shape };
}

// The same arithmetic as workbench.widgets._common.derive, in float64 (so the values are identical):
// "count": N; "share": f = N / (k T) (NaN when k T = 0); "deviation": E f - 1.
function deriveValues(d, base, mode) {
  const N = base.flat, out = new Float64Array(N.length), den = d.den, E = d.n_experts;
  for (let i = 0; i < N.length; i++) {
    if (mode === "count") { out[i] = N[i]; continue; }
    const f = den === 0 ? NaN : N[i] / den;
    out[i] = mode === "share" ? f : E * f - 1.0;
  }
  if (base.shape.length !== 2) return out;
  const rows = [], w = base.shape[1];
  for (let r = 0; r < base.shape[0]; r++) rows.push(out.subarray(r * w, (r + 1) * w));
  return rows;
}

// The control's value: its `value`, or for a selection widget (ToggleButtons, Dropdown: ipywidgets 8 syncs
// only the option's `index`) the option at `index` of `options` (the option values, from the kernel).
function controlValue(control, V) {
  if (V.options) {
    const i = control.get("index");
    return i === null || i === undefined ? null : V.options[i];
  }
  const v = control.get("value");
  return v === undefined ? null : v;
}

// one listener per control model: the views following it draw in their `order` (the figure the
// control is about first), each through the page's draw queue
const CONTROLS = (globalThis.__workbenchControls = globalThis.__workbenchControls || new WeakMap());

function follow(control, view) {
  let views = CONTROLS.get(control);
  if (!views) {
    views = new Set();
    CONTROLS.set(control, views);
    control.on("change:value change:index", () => {
      const t = performance.now();
      [...views].sort((a, b) => a.order() - b.order()).forEach((v) => v.changed(t));
    });
  }
  views.add(view);
  return () => views.delete(view);
}

async function render({ model, el }) {
  const div = document.createElement("div");
  div.className = "wb-plot";
  el.appendChild(div);
  let Plotly;
  try {
    Plotly = await loadPlotly(model);
  } catch (e) {
    div.textContent = String(e);
    return;
  }
  let drawn = -1;         // revision this view shows
  let full = true;        // next draw must be a whole-figure draw (first draw, new assets)
  let received = null;    // when the first change not yet drawn arrived
  let queued = false;
  let kernelVariant = null;  // the variant of revision `drawn` (what the kernel's figure shows)
  const MIXED = {};          // shown after a kernel patch on top of a variant applied here
  let shown = null;          // the variant this view shows: kernelVariant, one applied here, or MIXED
  let localDraws = 0;        // client-side draws since the last whole-figure draw
  let control = null;        // the widget model that picks the variant (resolved below)
  let vCache = { raw: null, v: null, base: null };
  const variants = () => {
    const raw = model.get("variants") || "";
    if (raw !== vCache.raw) {
      const v = raw ? JSON.parse(raw) : null;
      vCache = { raw, v, base: v && v.derive ? decodeArray(v.derive.base) : null };
    }
    return vCache;
  };
  const drawNow = async () => {
    queued = false;
    const rev = model.get("revision");
    const { v: V, base } = variants();
    const want = V && control ? controlValue(control, V) : null;
    const local = want !== null && want !== undefined && V.modes && V.modes[want] !== undefined;
    const needRev = rev !== drawn || full;
    if (!needRev && !(local && want !== shown)) return;
    const start = performance.now(), recv = received;
    received = null;
    let kind = null;
    if (needRev) {
      const raw = model.get("patch");
      const patch = !full && raw ? JSON.parse(raw) : null;
      const next = model.get("variant") || null;
      if (patch && patch.from === drawn && patch.to === rev && patch.variant_only && local && shown !== MIXED) {
        // the kernel's figure changed only by switching variants (same base data, same variants): this view
        // already shows that base with variant `shown` - nothing to draw
      } else if (patch && patch.from === drawn && patch.to === rev) {
        const assets = model.get("assets");
        const data = withAssets(patch.data, assets), layout = withAssets(patch.layout, assets);
        const hasData = Object.keys(data).length > 0, hasLayout = Object.keys(layout).length > 0;
        if (hasData && hasLayout) await Plotly.update(div, data, layout, patch.traces);
        else if (hasData) await Plotly.restyle(div, data, patch.traces);
        else if (hasLayout) await Plotly.relayout(div, layout);
        // a patch is relative to the kernel's previous figure: on top of a variant applied here, the
        // variant's attributes are now mixed (re-applied below, or a whole draw when none can be)
        shown = shown === kernelVariant ? next : MIXED;
        kind = "patch";
      } else {
        const fig = withAssets(JSON.parse(model.get("spec")), model.get("assets"));
        const layout = themed(fig.layout || {});
        div.dataset.theme = isDark() ? "dark" : "light";
        // after client-side draws, the arrays on screen are not the spec's: make react recompute them
        if (localDraws > 0) layout.datarevision = `${layout.datarevision}:${rev}:${localDraws}`;
        await Plotly.react(div, fig.data || [], layout, { displaylogo: false, responsive: false });
        localDraws = 0;
        shown = next;
        kind = "full";
      }
      kernelVariant = next;
      drawn = rev;
      full = false;
      if (shown === MIXED && !local) {  // mixed and no variant to re-apply (the control went away): draw it all
        full = true;
        queued = true;
        schedule(drawNow);
      }
    }
    if (local && want !== shown) {
      const m = V.modes[want], data = {};
      for (const k of Object.keys(m.data || {})) data[k] = [m.data[k]];
      if (V.derive) data[V.derive.attr] = [deriveValues(V.derive, base, want)];
      await Plotly.update(div, data, m.layout || {}, [V.trace]);
      shown = want;
      localDraws += 1;
      kind = "local";
    }
    div.dataset.revision = String(rev);
    div.dataset.variant = shown === null || shown === MIXED ? "" : String(shown);
    if (kind === null) return;  // nothing drawn
    // the figure's box is fixed: the page's layout stops at it (plotly measures text after each DOM change,
    // which otherwise lays out the whole notebook again)
    const fl = div._fullLayout;
    if (fl && fl.width > 0 && fl.height > 0) {
      div.style.width = fl.width + "px";
      div.style.height = fl.height + "px";
      div.style.contain = "strict";
    }
    div.dataset.drawKind = kind;
    const meta = div.layout && div.layout.meta;
    DRAWS.log.push({ view: meta && meta.view, revision: rev, kind, received: recv, start, end: performance.now() });
    if (DRAWS.log.length > 200) DRAWS.log.splice(0, DRAWS.log.length - 200);
  };
  const draw = (t) => {
    if (received === null) received = t === undefined ? performance.now() : t;
    if (queued) return DRAWS.tail;  // not started yet: it will draw the latest state
    queued = true;
    return schedule(drawNow);
  };
  model.on("change:revision", () => draw());
  model.on("change:assets", () => { full = true; draw(); });
  const unTheme = onThemeChange(() => { full = true; draw(); });
  let unfollow = null;
  const ref = model.get("control");
  if (typeof ref === "string" && ref.startsWith(LIB_PREFIX) && model.widget_manager) {
    try {
      control = await model.widget_manager.get_model(ref.slice(LIB_PREFIX.length));
      unfollow = follow(control, { order: () => ((variants().v || {}).order || 0), changed: (t) => draw(t) });
    } catch (e) {
      control = null;  // no client-side variants: the kernel's redraws still arrive
    }
  }
  await draw();
  return () => {
    unTheme();
    if (unfollow) unfollow();
    try { Plotly.purge(div); } catch (e) {}
  };
}
export default { render };
"""

_LIBRARY = None
_ASSET = "__workbench_asset__:"


class PlotlyLibrary(ipywidgets.Widget):
    """plotly.js source, shared by every :class:`Plot` of a kernel (a plain widget model)."""

    source = t.Unicode("").tag(sync=True)


class PlotView(anywidget.AnyWidget):
    """Browser side of :class:`Plot`: draws ``spec`` (a plotly figure as JSON) with plotly.js."""

    _esm = _ESM
    _css = ".wb-plot { min-width: 10px; }"
    library = t.Instance(PlotlyLibrary).tag(sync=True, **ipywidgets.widget_serialization)
    spec = t.Unicode("{}").tag(sync=True)
    #: the change from revision ``from`` to ``to`` (= ``revision``): ``{"from", "to", "traces", "data",
    #: "layout"}`` as ``Plotly.update(gd, data, layout, traces)`` arguments; "" when only ``spec`` applies
    patch = t.Unicode("").tag(sync=True)
    assets = t.Dict().tag(sync=True)
    revision = t.Int(0).tag(sync=True)
    #: client-side variants (see :meth:`Plot.set_variants`): JSON ``{"order", "trace", "derive", "modes"}``
    #: or "" (none); resent only when it changes
    variants = t.Unicode("").tag(sync=True)
    #: the variant the figure of ``revision`` shows (a value of ``control``)
    variant = t.Unicode("").tag(sync=True)
    #: the widget whose ``value`` picks the variant in the browser (e.g. a ToggleButtons), or None
    control = t.Instance(ipywidgets.Widget, allow_none=True).tag(sync=True, **ipywidgets.widget_serialization)


#: A small light template (the look of "plotly_white" with the Okabe-Ito colorway). Passed when a
#: figure is created, so plotly does not deep-copy its default template into every figure (a
#: third of a view's construction time) and every push stays a few KB smaller.
_GRID = "#E5ECF6"
TEMPLATE = {"layout": {
    "paper_bgcolor": "white", "plot_bgcolor": "white",
    "font": {"family": '"Open Sans", verdana, arial, sans-serif', "size": 12, "color": "#2a3f5f"},
    "title": {"x": 0.05},
    "colorway": ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"],
    "xaxis": {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "ticks": "", "automargin": True},
    "yaxis": {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "ticks": "", "automargin": True},
    "hoverlabel": {"align": "left"},
}}


def new_figure(**layout) -> go.Figure:
    """An empty ``go.Figure`` with :data:`TEMPLATE` (and ``layout``)."""
    return go.Figure(layout={"template": TEMPLATE, **layout})


def plotly_library():
    """The kernel's shared plotly.js model (created on first use, recreated if it was closed)."""
    global _LIBRARY
    if _LIBRARY is None or getattr(_LIBRARY, "comm", None) is None:
        path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        if not path.is_file():
            raise FileNotFoundError(f"plotly.js not found at {path} (the plotly package ships it)")
        _LIBRARY = PlotlyLibrary(source=path.read_text(encoding="utf-8"))
    return _LIBRARY


class Plot:
    """A ``go.Figure`` shown in the notebook by a :class:`PlotView` widget (``.widget``).

    Mutate ``plot.data`` / ``plot.layout`` (validated by plotly) inside ``with plot.batch_update():``
    or call :meth:`push` afterwards; one message carries the new figure to the browser.
    """

    def __init__(self, figure=None, **layout):
        self.figure = figure if figure is not None else new_figure()
        if layout:
            self.figure.update_layout(**layout)
        self.widget = PlotView(library=plotly_library())
        self.widget._wb_plot = self  # the static snapshot of a view finds its figures through its widgets
        self._depth = 0
        self.pushes = 0
        self._live = False  # nothing is sent until the first push() / batch_update(): views build first
        self._last_data: str | None = None
        self._datarevision = 0
        self._sent: dict | None = None  # the figure dict of the last push (what ``patch`` is relative to)
        #: send ``patch`` (a data-only / layout-only difference) along with the whole figure
        self.patches = True
        self._variants: dict | None = None
        self._variant = ""
        self._variants_json = ""
        self._sent_variants: str | None = None

    # FigureWidget-like access
    @property
    def data(self):
        return self.figure.data

    @property
    def layout(self):
        return self.figure.layout

    def add_trace(self, *a, **kw):
        self.figure.add_trace(*a, **kw)
        self._maybe_push()
        return self

    def __getattr__(self, name):  # add_heatmap, add_scatter, update_layout, ...
        if name.startswith(("add_", "update_")):
            fn = getattr(self.figure, name)

            def call(*a, **kw):
                out = fn(*a, **kw)
                self._maybe_push()
                return out

            return call
        raise AttributeError(name)

    @contextlib.contextmanager
    def batch_update(self):
        self._depth += 1
        try:
            yield self.figure
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.push()

    def _maybe_push(self):
        if self._depth == 0 and self._live:
            self.push()

    def asset(self, key: str, value: str) -> str:
        """Store a large constant ``value`` (sent to the browser once) and return the placeholder to put
        in the figure instead (e.g. an image trace's ``source``): pushes then stay small."""
        if self.widget.assets.get(key) != value:
            self.widget.assets = {**self.widget.assets, key: value}
        return _ASSET + key

    def set_variants(self, control, current: str, modes: dict, *, trace: int = 0, derive: dict | None = None,
                     order: int = 0) -> None:
        """Let the browser switch this figure between variants itself when ``control.value`` changes.

        ``modes``: ``{value: (trace attributes, layout attributes)}``, each a ``{plotly path: value}``
        dict (``"colorbar.title.text"``, ``"title.text"``; JSON-ready values; None resets), for trace
        ``trace``. Every variant must list the same paths, and the Python figure must hold exactly
        those values for the ``current`` variant (the view code applies them with :meth:`apply_variant`).
        ``derive``: one array that differs per variant, computed in the browser from base data:
        ``{"kind": "load", "attr": "z", "base": counts, "den": k * T, "n_experts": E}`` gives
        :func:`workbench.widgets._common.derive` of the counts (``base``: an integer ndarray).

        Takes effect with the next :meth:`push` (in the same message as the figure). A push whose only
        change is the variant (same base data, same variants, changed paths among the variants' ones)
        is marked ``variant_only``: a view that already switched in the browser does not redraw."""
        data_keys = {frozenset(a) for a, _ in modes.values()}
        layout_keys = {frozenset(b) for _, b in modes.values()}
        if len(data_keys) != 1 or len(layout_keys) != 1:
            raise ValueError("every variant must set the same trace and layout paths")
        if current not in modes:
            raise ValueError(f"current variant {current!r} is not one of {list(modes)}")
        v = {"order": int(order), "trace": int(trace),
             "modes": {str(k): {"data": a, "layout": b} for k, (a, b) in modes.items()}}
        if isinstance(control, ipywidgets.widgets.widget_selection._Selection):  # the browser has only `index`
            v["options"] = [str(x) for x in control._options_values]
        if derive is not None:
            v["derive"] = {**{k: x for k, x in derive.items() if k != "base"}, "base": _int_array_spec(derive["base"])}
        self._variants = v
        self._variant = str(current)
        if self.widget.control is not control:
            self.widget.control = control

    def apply_variant(self, attrs: dict, layout: dict, trace: int = 0) -> None:
        """Set ``{path: value}`` attributes on trace ``trace`` and on the layout (None removes one)."""
        tr = self.figure.data[trace]
        for k, v in attrs.items():
            if not holds(tr._props, k, v):  # plotly's validated set is the costly part of a live redraw
                tr[k] = v
        for k, v in layout.items():
            if not holds(self.figure._layout, k, v):
                self.figure.layout[k] = v

    def set_array(self, trace: int, attr: str, values) -> None:
        """``figure.data[trace].<attr> = values`` for a data array (``z``, ``y``...) of a numeric ndarray,
        storing what plotly's validator would (a read-only contiguous copy) without its per-call machinery
        (validators, narwhals, change callbacks: a large part of a live redraw). Anything else (lists, other
        dtypes, attributes that are not plain data arrays) goes through plotly's validated set."""
        import numpy as np

        tr = self.figure.data[trace]
        if (type(values) is np.ndarray and values.dtype.kind in "uif"
                and type(tr._get_validator(attr)) is DataArrayValidator):
            a = np.ascontiguousarray(values.copy())
            a.flags.writeable = False
            self.figure._data[trace][attr] = a
        else:
            tr[attr] = values

    def _variant_only(self, diff) -> bool:
        """Whether the figure changed since the last push only in the variants' paths (same variants)."""
        v = self._variants
        if v is None or diff is None or self._sent_variants is None or self._sent_variants != self._variants_json:
            return False
        traces, tdata, tlayout = diff
        first = next(iter(v["modes"].values()))
        dkeys = set(first["data"]) | ({v["derive"]["attr"]} if "derive" in v else set())
        return set(traces) <= {v["trace"]} and set(tdata) <= dkeys and set(tlayout) <= set(first["layout"])

    def push(self) -> None:
        """Send the figure to the browser: the whole figure (``spec``) and, when the traces are the same
        ones as at the previous push, the difference to it (``patch``, see :func:`figure_patch`), which
        a view showing the previous revision draws with one ``Plotly.update`` instead of a
        ``Plotly.react`` of everything.

        ``layout.datarevision`` is bumped only when the traces' JSON changed: ``Plotly.react`` then
        skips recomputing the traces for a layout-only change (a title, a moved highlight), which
        it would otherwise do since every push carries freshly parsed arrays."""
        from plotly.io.json import to_json_plotly

        fd = figure_dict(self.figure)  # numpy arrays are base64 typed-array specs here
        compact_arrays(fd)
        fit_title(fd.get("layout", {}))
        data = fd.get("data", [])
        data_json = to_json_plotly(data)
        if data_json != self._last_data:
            self._last_data = data_json
            self._datarevision += 1
        layout = fd.get("layout", {})
        layout["datarevision"] = self._datarevision
        spec = '{"data": ' + data_json + ', "layout": ' + to_json_plotly(layout) + "}"
        self._variants_json = to_json_plotly(self._variants) if self._variants is not None else ""
        patch = ""
        if self.patches and self._sent is not None:
            diff = figure_patch(self._sent, fd)
            if diff is not None:
                traces, tdata, tlayout = diff
                patch = to_json_plotly({"from": self.widget.revision, "to": self.widget.revision + 1,
                                        "traces": traces, "data": tdata, "layout": tlayout,
                                        "variant_only": self._variant_only(diff)})
        with self.widget.hold_sync():  # one message: spec, patch, variants and revision together
            self.widget.spec = spec
            self.widget.patch = patch
            self.widget.variants = self._variants_json
            self.widget.variant = self._variant if self._variants is not None else ""
            self.widget.revision += 1
        self._sent = fd
        self._sent_variants = self._variants_json
        self.pushes += 1
        self._live = True

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def holds(props: dict, path: str, value) -> bool:
    """Whether a figure part's raw props (``trace._props``, ``figure._layout``) already hold ``value`` at the
    dotted ``path`` ("colorbar.title.text"; None: the attribute is unset), so setting it again through
    plotly's validators would change nothing. Only scalars and strings of the same type compare (a stored
    value is the validated one, and plotly's validators return a valid value unchanged); anything else,
    and indexed paths, answer False (set it)."""
    if "[" in path:
        return False
    node = props
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return value is None
        node = node[part]
    return isinstance(value, _SCALARS) and value is not None and type(node) is type(value) and node == value


# ------------------------------------------------------------------------------------- titles
#: pixels at the top right of a figure that plotly's toolbar (the mode bar) covers while hovered
MODEBAR_PX = 230
_TITLE_PX = 16.8  # plotly's title font: 1.4 x the layout font (12 px)


def _visible_len(line: str) -> int:
    import re

    return len(re.sub(r"<[^>]*>", "", re.sub(r"&[#\w]+;", "_", line)))


def wrap_title(text: str, width_px: float, font_px: float = _TITLE_PX, reserve_px: float = MODEBAR_PX) -> str:
    """``text`` with ``<br>`` inserted at spaces so that no line runs under the toolbar: each line's
    estimated width (0.55 x font size per character; lines inside ``<sup>`` at 0.7 x) stays within
    ``width_px - reserve_px`` less the left margin. Existing ``<br>`` breaks are kept."""
    budget_px = max(width_px - reserve_px - 20, 120)
    out = []
    for line in text.split("<br>"):
        scale = 0.7 if line.startswith("<sup>") else 1.0
        per = max(int(budget_px / (0.55 * font_px * scale)), 12)
        if _visible_len(line) <= per:
            out.append(line)
            continue
        words, cur = line.split(" "), ""
        for w in words:
            if cur and _visible_len(cur + " " + w) > per:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        out.append(cur)
    if any(x.startswith("<sup>") for x in out):  # keep a <sup>...</sup> span closed on each line
        fixed, open_ = [], False
        for x in out:
            y = ("<sup>" if open_ and not x.startswith("<sup>") else "") + x
            open_ = y.count("<sup>") > y.count("</sup>")
            fixed.append(y + ("</sup>" if open_ else ""))
        out = fixed
    return "<br>".join(out)


def fit_title(layout: dict) -> None:
    """In place, on a figure's layout dict: wrap a left-aligned title so it does not run under the toolbar
    (:func:`wrap_title`) and make the top margin tall enough for its lines. Figures narrower than twice
    the toolbar get an upright toolbar at the right edge (and a right margin of at least 40 px)."""
    title = layout.get("title")
    if not isinstance(title, dict) or not title.get("text"):
        return
    width = float(layout.get("width") or 700)
    reserve = MODEBAR_PX
    if width < 2 * MODEBAR_PX:  # a narrow figure: the toolbar stands upright at the right edge instead
        layout.setdefault("modebar", {})["orientation"] = "v"
        margin = layout.setdefault("margin", {})
        if float(margin.get("r", 80)) < 40:
            margin["r"] = 40
        reserve = 45
    text = wrap_title(str(title["text"]), width, reserve_px=reserve)
    title["text"] = text
    lines = text.count("<br>") + 1
    if lines > 1:
        margin = layout.setdefault("margin", {})
        need = 24 + 21 * lines
        if float(margin.get("t", 100)) < need:
            margin["t"] = need
        title.setdefault("y", 1.0)
        title.setdefault("yref", "container")
        title.setdefault("yanchor", "top")
        title.setdefault("pad", {"t": 8})


# ------------------------------------------------------------------------------------- patches
_SCALARS = (str, int, float, bool, type(None))  # bool is an int: listed for the reader
_NO_ARRAY = (*_SCALARS, dict, list, tuple)  # never a plotly "homogeneous array"
_SKIP_B64 = frozenset(("geojson", "layer", "layers", "range"))  # keys plotly's convert_to_base64 leaves alone


def figure_dict(fig: go.Figure) -> dict:
    """``fig.to_dict()``, equal to it, in one pass: plotly's deep-copies the whole figure and then walks the
    copy again to turn arrays into base64 specs (~4 ms of a ~12 ms live dashboard redraw on a 2-core CPU);
    here the JSON-like props are copied as they are walked and arrays converted on the way (plotly >= 6: its
    typed-array specs and helpers)."""
    if fig._frame_objs:  # no view here has frames; keep plotly's own path for them
        return fig.to_dict()
    return {"data": [_props_copy(tr, True) for tr in fig._data], "layout": _props_copy(fig._layout, True)}


def _props_copy(obj, convert: bool):
    """A copy of a figure's props, as ``deepcopy`` + ``convert_to_base64``: with ``convert``, a dict value
    that plotly sees as an array (numpy, pandas...) becomes a typed-array spec, except under the keys
    plotly skips (and anywhere below them)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            conv = convert and k not in _SKIP_B64
            if conv and not isinstance(v, _NO_ARRAY) and is_homogeneous_array(v):
                out[k] = _typed_array(v)
            else:
                out[k] = _props_copy(v, conv)
        return out
    if isinstance(obj, list):
        return [_props_copy(v, convert) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_props_copy(v, convert) for v in obj)
    if isinstance(obj, _SCALARS):
        return obj
    return copy.deepcopy(obj)  # arrays inside lists, dates...: as plotly's deepcopy


def _typed_array(v):
    """plotly's ``to_typed_array_spec``; for a numeric numpy array of a plotly.js dtype the same spec made
    directly (plotly's first makes a read-only copy through narwhals: most of the cost of small arrays)."""
    import numpy as np

    short = plotlyjsShortTypes.get(str(v.dtype)) if type(v) is np.ndarray and v.size else None
    if short is None:  # int64 (narrowed by plotly), empty, object, pandas...: plotly's own path
        return to_typed_array_spec(v)
    spec = {"dtype": short, "bdata": base64.b64encode(np.ascontiguousarray(v)).decode("ascii")}
    if v.ndim > 1:
        spec["shape"] = str(v.shape)[1:-1]
    return spec


_F32_MIN_BYTES = 2048  # float64 arrays at least this large travel as float32 (hover shows <= 7 digits anyway)
_SKIP_LAYOUT = ("datarevision",)  # relayout of datarevision would recompute the traces


def _int_array_spec(a) -> dict:
    """An integer ndarray as a base64 typed-array spec: int32 when it fits, else float64 (exact to 2**53)."""
    import numpy as np

    a = np.ascontiguousarray(a)
    if a.size == 0 or (a.min() >= -2**31 and a.max() < 2**31):
        b, dt = a.astype("<i4"), "i4"
    else:
        b, dt = a.astype("<f8"), "f8"
    return {"dtype": dt, "bdata": base64.b64encode(b.tobytes()).decode("ascii"),
            "shape": ", ".join(str(x) for x in a.shape)}


def compact_arrays(obj) -> None:
    """In place: base64 float64 typed-array specs of >= 2 KB (``{"dtype": "f8", "bdata": ...}``, as
    ``Figure.to_dict()`` makes them) become float32 specs, half the bytes to send and decode."""
    import numpy as np

    if isinstance(obj, dict):
        if (obj.get("dtype") == "f8" and isinstance(obj.get("bdata"), str)
                and len(obj["bdata"]) * 3 // 4 >= _F32_MIN_BYTES):
            a = np.frombuffer(base64.b64decode(obj["bdata"]), np.float64)
            with np.errstate(over="ignore"):
                a32 = a.astype(np.float32)
            if np.array_equal(np.isfinite(a32), np.isfinite(a)):  # nothing overflowed to inf
                obj["dtype"], obj["bdata"] = "f4", base64.b64encode(a32.tobytes()).decode("ascii")
            return
        for v in obj.values():
            if isinstance(v, (dict, list, tuple)):
                compact_arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if isinstance(v, (dict, list, tuple)):
                compact_arrays(v)


def _flatten(d: dict, prefix: str, out: dict, arrays: bool) -> dict:
    """Attribute paths (plotly's "a.b.c" / "shapes[0].y0" syntax) -> values. Typed-array specs, lists
    (data arrays, colorscales) and empty dicts are values; with ``arrays`` a list of dicts (layout
    ``shapes``, ``annotations``) is flattened per element."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "bdata" not in v:
            _flatten(v, key + ".", out, arrays)
        elif arrays and _is_dict_list(v):
            out[key] = v  # the whole list (used when the element count changed)
            for i, x in enumerate(v):
                _flatten(x, f"{key}[{i}].", out, False)
        else:
            out[key] = v
    return out


def _changes(old: dict, new: dict, arrays: bool) -> dict:
    """Paths whose value differs between two figure-part dicts -> the new value (None: removed)."""
    a, b = _flatten(old, "", {}, arrays), _flatten(new, "", {}, arrays)
    out = {}
    for k in a.keys() | b.keys():
        if a.get(k, _MISSING) != b.get(k, _MISSING):
            out[k] = b.get(k)
    if arrays:  # a list of dicts: per-element paths when its length is unchanged, else the whole list
        lists = {k for k in a.keys() | b.keys()
                 if "[" not in k and (_is_dict_list(a.get(k)) or _is_dict_list(b.get(k)))}
        for k in lists:
            same_len = _is_dict_list(a.get(k)) and _is_dict_list(b.get(k)) and len(a[k]) == len(b[k])
            if same_len:
                out.pop(k, None)
            else:
                for p in [p for p in out if p.startswith(k + "[")]:
                    del out[p]
    return out


def _is_dict_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


_MISSING = object()


def figure_patch(old: dict, new: dict):
    """The difference between two ``Figure.to_dict()`` results as ``Plotly.update`` arguments:
    ``(trace indices, {attribute path: [value per listed trace]}, {layout path: value})``, or None when
    the traces differ in number or type (then only a whole redraw applies).

    Removed attributes map to None (``Plotly.update`` resets them to their defaults)."""
    od, nd = old.get("data", []), new.get("data", [])
    if len(od) != len(nd) or any(a.get("type") != b.get("type") for a, b in zip(od, nd)):
        return None
    per_trace = [_changes(a, b, False) for a, b in zip(od, nd)]
    traces = [i for i, c in enumerate(per_trace) if c]
    keys = sorted({k for c in per_trace for k in c})
    flat_new = {i: _flatten(nd[i], "", {}, False) for i in traces}
    tdata = {k: [flat_new[i].get(k) for i in traces] for k in keys}
    ol = {k: v for k, v in old.get("layout", {}).items() if k not in _SKIP_LAYOUT}
    nl = {k: v for k, v in new.get("layout", {}).items() if k not in _SKIP_LAYOUT}
    return traces, tdata, _changes(ol, nl, True)
