"""A light plotly widget: a ``plotly.graph_objects.Figure`` drawn by plotly.js in an anywidget.

Why not ``plotly.graph_objects.FigureWidget``? Since plotly 6 every FigureWidget is an anywidget
whose ES module is the whole plotly.js bundle (~5 MB), sent to the browser once PER FIGURE and
evaluated there, and each update is followed by layout/trace "delta" messages back to the
kernel. A dashboard of three figures took ~9 s to appear and ~150 ms per update in the browser
test (2-core machine). Here:

* plotly.js (the ``plotly.min.js`` shipped with the ``plotly`` package, no network) travels ONCE
  per kernel, in a shared model (:class:`PlotlyLibrary`); each figure's module is ~2 KB and loads
  the library once per page (``globalThis`` promise);
* a figure is its JSON (``fig.to_json()``: numpy arrays as base64 typed arrays, NaN allowed),
  pushed in one message per change and drawn with ``Plotly.react`` (which redraws only what
  changed); nothing comes back except the revision the browser has drawn (``rendered``).

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

__all__ = ["Plot", "PlotlyLibrary", "PlotView", "plotly_library", "new_figure", "TEMPLATE"]

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
  let pending = Promise.resolve();
  const draw = () => {
    pending = pending.then(async () => {
      const fig = withAssets(JSON.parse(model.get("spec")), model.get("assets"));
      const rev = model.get("revision");
      await Plotly.react(div, fig.data || [], fig.layout || {}, { displaylogo: false, responsive: false });
      div.dataset.revision = String(rev);
    });
    return pending;
  };
  model.on("change:spec", draw);
  model.on("change:assets", draw);
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
        """Send the figure to the browser (``Plotly.react`` redraws what changed).

        ``layout.datarevision`` is bumped only when the traces' JSON changed: ``Plotly.react`` then
        skips recomputing the traces for a layout-only change (a title, a moved highlight), which
        it would otherwise do since every push carries freshly parsed arrays."""
        from plotly.io.json import to_json_plotly

        fd = self.figure.to_dict()
        data = to_json_plotly(fd.get("data", []))
        if data != self._last_data:
            self._last_data = data
            self._datarevision += 1
        layout = fd.get("layout", {})
        layout["datarevision"] = self._datarevision
        spec = '{"data": ' + data + ', "layout": ' + to_json_plotly(layout) + "}"
        with self.widget.hold_sync():  # one message: spec and revision together
            self.widget.spec = spec
            self.widget.revision += 1
        self.pushes += 1
        self._live = True

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
