"""The trace store (zarr v3): what a recording writes and every reader reads.

Modules by job: :mod:`.schema` (the ``workbench.trace/2`` definition, glossary, variables,
modality), :mod:`.writer` (append, commit, resume), :mod:`.reader` (``open_trace``, v1 and v2),
:mod:`.lock`, :mod:`.vocab`, :mod:`.attention` (reading the attention maps), :mod:`.integrity`
(the cheap open-time check that every committed chunk exists), :mod:`.verify` (the full check).

The names below are imported on first use, so that importing :mod:`.schema` (the model's and the
recorder's dependency) needs neither zarr nor xarray.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "open_trace": "reader", "expert_loads": "reader", "trace_vocab": "vocab", "open_attention": "attention",
    "attention_sequences": "attention", "AttentionNotFoundError": "attention", "TraceWriter": "writer",
    "LOCK_NAME": "lock", "Variable": "schema", "MoELayerRouting": "schema", "Modality": "schema", "SCHEMA": "schema",
    "TraceError": "errors", "NotATraceError": "errors", "UnknownSchemaError": "errors", "TraceExistsError": "errors",
    "TraceLockedError": "errors", "TraceWriteError": "errors", "TraceCorruptError": "errors",
    "verify_trace": "verify", "Problem": "integrity",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
