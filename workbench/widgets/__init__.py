"""Interactive JupyterLab views of traces (ipywidgets + anywidget + plotly.js; see ``_plot`` for why not FigureWidget).

    from workbench.widgets import ExpertLoadDashboard, TokenRoutingView, CrossModalAttentionView, \
        RoutingFlow, TraceComparison
    ExpertLoadDashboard("runs/x.zarr")             # heatmap, filters, imbalance metrics
    with wb.record(model, "runs/y.zarr") as rec:
        dash = ExpertLoadDashboard(rec)            # live: redraws at <= 2 Hz while the run streams
        display(dash); ...
    TokenRoutingView("runs/x.zarr")                # tokens colored by top-1 expert, click to pin
    CrossModalAttentionView("runs/x.zarr", sequence=0, image="cat.jpg", image_info=batch.images[0])
    RoutingFlow("runs/x.zarr", a=1, b=3)           # Sankey of expert transitions (decoder layers 1 -> 3)
    TraceComparison("runs/a.zarr", "runs/b.zarr")  # side by side + difference
    PathExplorer("runs/x.zarr", layers=[1, 3])     # frequent routing paths; pick one, see its tokens
    RoutingShiftView("runs/bf16.zarr", "runs/int4.zarr")  # how quantization moved routing

``layer=`` (and RoutingFlow's ``a=`` / ``b=``) is a decoder layer index, as everywhere in the workbench
(the ``layer`` coordinate of a trace's ``moe_layer`` dimension, or of the attention maps); the
default is the first MoE (or recorded attention) layer, and an index that is not one raises
ValueError naming the valid ones. Layer sliders and dropdowns are labelled with decoder indices ("L3").

Every view reads stored traces lazily (per-commit load arrays, token pages, one attention map at a
time) and colors experts with :func:`expert_color` (fixed, colorblind-safe). Each view's
``widget`` is the ipywidgets container; the view object itself displays as that widget.
"""
from __future__ import annotations

import importlib

from ._palette import expert_color, expert_colors, text_color_on

_LAZY = {
    "ExpertLoadDashboard": "workbench.widgets.load",
    "TokenRoutingView": "workbench.widgets.tokens",
    "token_page_html": "workbench.widgets.tokens",
    "CrossModalAttentionView": "workbench.widgets.attention",
    "RoutingFlow": "workbench.widgets.flow",
    "sankey_links": "workbench.widgets.flow",
    "TraceComparison": "workbench.widgets.compare",
    "PathExplorer": "workbench.widgets.paths",
    "path_context_html": "workbench.widgets.paths",
    "RoutingShiftView": "workbench.widgets.shift",
}

__all__ = ["expert_color", "expert_colors", "text_color_on", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
