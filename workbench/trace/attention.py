"""Reading the cross-modal attention maps of a trace (the ``attention/seq_NNNNNN`` groups).

The groups are written by the attention capture (:class:`workbench.hooks.attention.AttentionCapture`)
through :meth:`workbench.trace.writer.TraceWriter.write_group`; their layout is in
:mod:`workbench.trace.schema`, "Attention groups".
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from workbench.trace._util import format_ranges
from workbench.trace.errors import TraceError
from workbench.trace.reader import group_is_complete, open_group, read_root
from workbench.trace.schema import ATTENTION_COORDS, ATTENTION_GROUP, ATTENTION_QUERIES, attention_group

__all__ = ["open_attention", "attention_sequences", "AttentionNotFoundError"]

_SEQ_RE = re.compile(r"^seq_(\d+)$")


class AttentionNotFoundError(TraceError, LookupError):
    """The trace has no (complete) attention maps for the requested sequence."""


def _scan(path: Path) -> tuple[list[int], list[int]]:
    """(complete, incomplete) sequence numbers of the attention groups of a trace."""
    base = path / ATTENTION_GROUP
    done, partial = [], []
    if not base.is_dir():
        return done, partial
    n_tokens = int(read_root(path)["attributes"]["n_tokens"])
    for entry in base.iterdir():
        m = _SEQ_RE.match(entry.name)
        if m and entry.is_dir():
            ok = group_is_complete(path, f"{ATTENTION_GROUP}/{entry.name}", n_tokens)
            (done if ok else partial).append(int(m.group(1)))
    return sorted(done), sorted(partial)


def attention_sequences(store: str | os.PathLike) -> list[int]:
    """Sequence numbers that have complete attention maps in the trace at ``store``."""
    p = Path(store)
    read_root(p)  # a clear error for a path that is not a trace
    return _scan(p)[0]


def open_attention(store: str | os.PathLike, sequence: int):
    """Attention maps of one sequence: ``xarray.DataArray`` (layer, head, query, patch), lazy.

    Coordinates: ``layer`` (decoder layer index: ``att.sel(layer=3)``), ``head`` (query head; -1
    when averaged, with ``attrs["head_mean"]``), ``query_token`` / ``patch_token`` (indices on the
    trace's token dim, e.g. ``open_trace(store).token_id[att.query_token]``), ``query_position``,
    and per patch ``image``, ``tile``, ``row``, ``col``. Raises FileNotFoundError / NotATraceError
    for a path that is not a trace, :class:`AttentionNotFoundError` when the trace has no
    attention maps or none for ``sequence`` (the message lists the sequences that have them).
    """
    p = Path(store)
    read_root(p)
    if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)):
        raise TypeError(f"sequence must be an int, got {type(sequence).__name__}")
    done, partial = _scan(p)
    if not done:
        extra = f" ({len(partial)} incomplete group(s): a run was interrupted while writing)" if partial else ""
        raise AttentionNotFoundError(f"{p} holds no attention maps{extra}; record them with "
                                     "wb.record(model, path, capture=('router', 'attention'))")
    if int(sequence) not in done:
        why = (" (its group is incomplete: the run was interrupted while writing it)" if int(sequence) in partial
               else " (sequences without image patch tokens have none)")
        raise AttentionNotFoundError(f"{p}: no attention maps for sequence {int(sequence)}{why}; "
                                     f"available sequences: {format_ranges(done)}")
    ds = open_group(p, attention_group(int(sequence)))
    da = ds["probs"]
    missing = [c for c in ATTENTION_COORDS if c not in da.coords]
    if missing:
        raise TraceError(f"{p}: attention group of sequence {sequence} lacks coordinates {missing}")
    da.attrs.update({"sequence": int(sequence), "head_mean": bool(ds.attrs.get("head_mean", False)),
                     "queries": ds.attrs.get("queries", ATTENTION_QUERIES)})
    return da
