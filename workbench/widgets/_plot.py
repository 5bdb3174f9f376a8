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

:class:`Plot` wraps a ``go.Figure`` with the FigureWidget-like bits the views use (``data``,
``layout``, ``batch_update()``), so view code mutates a validated plotly figure and the browser
gets it on exit of ``batch_update()``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import anywidget
import ipywidgets
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import traitlets as t

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

function schedule(fn) {
  DRAWS.tail = DRAWS.tail.then(fn).catch((e) => console.error("workbench plot:", e)).then(afterPaint);
  return DRAWS.tail;
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
  const drawNow = async () => {
    queued = false;
    const rev = model.get("revision");
    if (rev === drawn && !full) return;
    const start = performance.now(), recv = received;
    received = null;
    const raw = model.get("patch");
    const patch = !full && raw ? JSON.parse(raw) : null;
    let kind;
    if (patch && patch.from === drawn && patch.to === rev) {
      const assets = model.get("assets");
      const data = withAssets(patch.data, assets), layout = withAssets(patch.layout, assets);
      const hasData = Object.keys(data).length > 0, hasLayout = Object.keys(layout).length > 0;
      if (hasData && hasLayout) await Plotly.update(div, data, layout, patch.traces);
      else if (hasData) await Plotly.restyle(div, data, patch.traces);
      else if (hasLayout) await Plotly.relayout(div, layout);
      kind = "patch";
    } else {
      const fig = withAssets(JSON.parse(model.get("spec")), model.get("assets"));
      await Plotly.react(div, fig.data || [], fig.layout || {}, { displaylogo: false, responsive: false });
      kind = "full";
    }
    drawn = rev;
    full = false;
    // the figure's box is fixed: the page's layout stops at it (plotly measures text after each DOM change,
    // which otherwise lays out the whole notebook again)
    const fl = div._fullLayout;
    if (fl && fl.width > 0 && fl.height > 0) {
      div.style.width = fl.width + "px";
      div.style.height = fl.height + "px";
      div.style.contain = "strict";
    }
    div.dataset.revision = String(rev);
    div.dataset.drawKind = kind;
    const meta = div.layout && div.layout.meta;
    DRAWS.log.push({ view: meta && meta.view, revision: rev, kind, received: recv, start, end: performance.now() });
    if (DRAWS.log.length > 200) DRAWS.log.splice(0, DRAWS.log.length - 200);
  };
  const draw = () => {
    if (received === null) received = performance.now();
    if (queued) return DRAWS.tail;  // not started yet: it will draw the latest state
    queued = true;
    return schedule(drawNow);
  };
  model.on("change:revision", draw);
  model.on("change:assets", () => { full = true; draw(); });
  await draw();
  return () => { try { Plotly.purge(div); } catch (e) {} };
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
        self._depth = 0
        self.pushes = 0
        self._live = False  # nothing is sent until the first push() / batch_update(): views build first
        self._last_data: str | None = None
        self._datarevision = 0
        self._sent: dict | None = None  # the figure dict of the last push (what ``patch`` is relative to)
        #: send ``patch`` (a data-only / layout-only difference) along with the whole figure
        self.patches = True

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

    def push(self) -> None:
        """Send the figure to the browser: the whole figure (``spec``) and, when the traces are the same
        ones as at the previous push, the difference to it (``patch``, see :func:`figure_patch`), which
        a view showing the previous revision draws with one ``Plotly.update`` instead of a
        ``Plotly.react`` of everything.

        ``layout.datarevision`` is bumped only when the traces' JSON changed: ``Plotly.react`` then
        skips recomputing the traces for a layout-only change (a title, a moved highlight), which
        it would otherwise do since every push carries freshly parsed arrays."""
        from plotly.io.json import to_json_plotly

        fd = self.figure.to_dict()  # numpy arrays are base64 typed-array specs here
        compact_arrays(fd)
        data = fd.get("data", [])
        data_json = to_json_plotly(data)
        if data_json != self._last_data:
            self._last_data = data_json
            self._datarevision += 1
        layout = fd.get("layout", {})
        layout["datarevision"] = self._datarevision
        spec = '{"data": ' + data_json + ', "layout": ' + to_json_plotly(layout) + "}"
        patch = ""
        if self.patches and self._sent is not None:
            diff = figure_patch(self._sent, fd)
            if diff is not None:
                traces, tdata, tlayout = diff
                patch = to_json_plotly({"from": self.widget.revision, "to": self.widget.revision + 1,
                                        "traces": traces, "data": tdata, "layout": tlayout})
        with self.widget.hold_sync():  # one message: spec, patch and revision together
            self.widget.spec = spec
            self.widget.patch = patch
            self.widget.revision += 1
        self._sent = fd
        self.pushes += 1
        self._live = True

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# ------------------------------------------------------------------------------------- patches
_F32_MIN_BYTES = 2048  # float64 arrays at least this large travel as float32 (hover shows <= 7 digits anyway)
_SKIP_LAYOUT = ("datarevision",)  # relayout of datarevision would recompute the traces


def compact_arrays(obj) -> None:
    """In place: base64 float64 typed-array specs of >= 2 KB (``{"dtype": "f8", "bdata": ...}``, as
    ``Figure.to_dict()`` makes them) become float32 specs, half the bytes to send and decode."""
    import base64

    import numpy as np

    if isinstance(obj, dict):
        if obj.get("dtype") == "f8" and isinstance(obj.get("bdata"), str) and len(obj["bdata"]) * 3 // 4 >= _F32_MIN_BYTES:
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
        lists = {k for k in a.keys() | b.keys() if "[" not in k and (_is_dict_list(a.get(k)) or _is_dict_list(b.get(k)))}
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
