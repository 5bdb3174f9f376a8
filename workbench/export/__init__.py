"""Export a trace for papers: figures (PDF/SVG/PNG), tables (CSV/LaTeX), trace subsets
(NetCDF/Parquet) and a self-contained interactive HTML report, every file with provenance.

    from workbench.export import export_all
    paths = export_all("runs/x.zarr", "paper/", what="figures,tables", layers=[1, 3], sequences=[0, 2])
    paths.skipped        # {artifact: why it did not apply}, e.g. entropy without router logits

    workbench export runs/x.zarr --out paper/ --what figures,tables --layers 1,3 --sequences 0,2

One function per artifact (``export_load_heatmap``, ``export_imbalance``, ``export_entropy``,
``export_token_routing``, ``export_transitions``, ``export_coactivation``, ``export_attention``,
``export_layer_metrics``, ``export_layer_metrics_by_modality``, ``export_vocab_tables``,
``export_domain_tables``, ``export_netcdf``, ``export_parquet``, ``export_report``), the
``plot_*`` functions of :mod:`workbench.export.figures` (return matplotlib Figures), and the
table builders of :mod:`workbench.export.tables`.

Provenance of every file (:func:`export_provenance`): ``trace_fingerprint`` (see
:func:`trace_fingerprint`), store path, schema, trace creation time and length, model
architecture, its routing rule (``routing``: per-layer score sigmoid/softmax, renormalize, selection
bias, groups, scale...; ``routing_rule``: the rule text), checkpoint path and fingerprint, tokenizer
and inputs hashes, the workbench
versions that recorded and exported it, the export date, the selection and the artifact name.
Where it goes: PDF Info dictionary, SVG RDF metadata, PNG text chunks, ``# key: value`` CSV
lines, ``% key: value`` LaTeX lines, NetCDF global attributes, Parquet schema metadata, HTML
``<meta>`` tags and provenance table, and ``manifest.json``.

Failures: every file is written under a temporary name and renamed into place, and
``manifest.json`` is kept equal to the files written (:mod:`workbench.export.manifest`), so a
failed export (e.g. a full disk: :class:`ExportFailedError`) leaves the earlier files intact and
listed. Text a format cannot hold (NUL in NetCDF, lone surrogates anywhere) is escaped and
reported in ``result.notes`` and the manifest; CSV text cells that look like formulas get a ``'``.
"""
from __future__ import annotations

from ._common import (ArtifactSkipped, ExportError, ExportFailedError, ExportNote, Selection, export_provenance,
                      trace_fingerprint)
from .api import (ARTIFACTS, GROUPS, ExportContext, ExportResult, export_all, export_attention, export_coactivation,
                  export_domain_tables, export_entropy, export_imbalance, export_layer_metrics,
                  export_layer_metrics_by_modality, export_load_heatmap, export_netcdf, export_parquet,
                  export_importance, export_position, export_report, export_routing_paths, export_routing_shift,
                  export_token_routing, export_transitions, export_vocab_tables, resolve_what)
from .figures import (FIGURE_FORMATS, STYLE, plot_attention, plot_coactivation, plot_entropy, plot_imbalance,
                      plot_importance, plot_load_heatmap, plot_position, plot_token_routing, plot_transitions,
                      save_figure)
from .tables import latex_escape, read_labels

__all__ = [
    "export_all", "ExportResult", "ExportContext", "ExportError", "ExportFailedError", "ExportNote", "ArtifactSkipped",
    "Selection",
    "ARTIFACTS", "GROUPS", "resolve_what",
    "export_load_heatmap", "export_imbalance", "export_entropy", "export_token_routing", "export_transitions",
    "export_coactivation", "export_attention", "export_layer_metrics", "export_layer_metrics_by_modality",
    "export_vocab_tables", "export_domain_tables", "export_netcdf", "export_parquet", "export_report", "export_position", "export_routing_paths",
    "export_routing_shift", "export_importance", "plot_importance",
    "export_provenance", "trace_fingerprint", "save_figure", "FIGURE_FORMATS", "STYLE",
    "plot_load_heatmap", "plot_imbalance", "plot_entropy", "plot_token_routing", "plot_transitions",
    "plot_coactivation", "plot_attention", "plot_position", "latex_escape", "read_labels",
]
