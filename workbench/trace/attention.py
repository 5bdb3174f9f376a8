"""Reading the cross-modal attention maps of a trace (the ``attention/seq_NNNNNN`` groups).

The groups are written by the attention capture (:class:`workbench.hooks.attention.AttentionCapture`)
through :meth:`workbench.trace.writer.TraceWriter.write_group`; their layout is in
:mod:`workbench.trace.schema`, "Attention groups": one group per sequence, and for a sequence whose
tokens came in several forward passes (long prefill in blocks, generation) one ``part_KKKK``
subgroup per later pass, which :func:`open_attention` concatenates along ``query``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from workbench.trace._util import format_ranges, quiet
from workbench.trace.errors import TraceError
from workbench.trace.integrity import array_problems, child_nodes, raise_problems
from workbench.trace.reader import HAVE_DASK, group_is_complete, read_root
from workbench.trace.schema import (ATTENTION_COORDS, ATTENTION_GROUP, ATTENTION_QUERIES, attention_group,
                                    attention_part_group)

__all__ = ["open_attention", "attention_sequences", "AttentionNotFoundError"]

_SEQ_RE = re.compile(r"^seq_(\d+)$")
_PART_RE = re.compile(r"^part_(\d+)$")
_PATCH_COORDS = ("patch_token", "image", "tile", "row", "col")


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


def _open_own(path: Path, name: str, n_tokens: int):
    """One complete attention group as a lazy Dataset, its own arrays only (a sequence group's parts
    are subgroups: each is checked when it is read). None when it is missing or incomplete."""
    import xarray as xr

    if not group_is_complete(path, name, n_tokens):
        return None
    problems = []
    for arr in child_nodes(path, name)[0]:
        problems += array_problems(path, arr, (int(n_tokens), 0))[1]
    raise_problems(path, problems)
    with quiet():
        ds = xr.open_zarr(path, group=name, consolidated=False, zarr_format=3, chunks={} if HAVE_DASK else None)
    small = {k: xr.Variable(v.dims, np.asarray(v.values), attrs=dict(v.attrs)) for k, v in ds.variables.items()
             if v.ndim == 1}
    return ds.assign_coords({k: v for k, v in small.items() if k in ds.coords}).assign(
        {k: v for k, v in small.items() if k not in ds.coords})


def _parts(path: Path, sequence: int, n_tokens: int, last_token: int) -> list:
    """The sequence's complete parts 1, 2, ... in order, up to the first missing or incomplete one (or
    one whose queries do not come after the previous group's: left over from an earlier recording of
    the same sequence number). ``last_token``: the sequence group's last query token."""
    base = path / attention_group(sequence)
    numbers = sorted(int(m.group(1)) for e in (base.iterdir() if base.is_dir() else ())
                     if (m := _PART_RE.match(e.name)) and e.is_dir())
    out = []
    for k, n in enumerate(numbers, start=1):
        ds = _open_own(path, attention_part_group(sequence, k), n_tokens) if n == k else None
        if ds is None:
            break
        q = np.asarray(ds["query_token"].values)
        if q.size and q.min() <= last_token:
            break
        last_token = int(q.max(initial=last_token))
        out.append(ds)
    return out


def _with_generated(da):
    """``generated`` (bool, per query) as a coordinate: stored since workbench.attention/2, else False."""
    gen = (np.asarray(da["generated"].values).astype(bool) if "generated" in da.coords
           else np.zeros(da.sizes["query"], bool))
    return da.assign_coords(generated=("query", gen))


def open_attention(store: str | os.PathLike, sequence: int):
    """Attention maps of one sequence: ``xarray.DataArray`` (layer, head, query, patch), lazy.

    Coordinates: ``layer`` (decoder layer index: ``att.sel(layer=3)``), ``head`` (query head; -1
    when averaged, with ``attrs["head_mean"]``), ``query_token`` / ``patch_token`` (indices on the
    trace's token dim, e.g. ``open_trace(store).token_id[att.query_token]``), ``query_position``,
    ``generated`` (bool per query: a token the model generated, e.g. ``att.isel(query=att.generated)``
    for the answer of ``wb.generate``), and per patch ``image``, ``tile``, ``row``, ``col``.

    A sequence recorded over several forward passes (a prompt prefilled in blocks, the decode steps of
    a generation) has its later passes in ``part_KKKK`` subgroups: they are concatenated along
    ``query`` (``attrs["parts"]``: how many), up to the first part that is missing or incomplete (a
    run killed mid-generation: every step written before the kill). Raises FileNotFoundError / NotATraceError
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
    n_tokens = int(read_root(p)["attributes"]["n_tokens"])
    ds = _open_own(p, attention_group(int(sequence)), n_tokens)
    if ds is None:  # its marker went away between the scan and now
        raise AttentionNotFoundError(f"{p}: the attention group of sequence {int(sequence)} is incomplete")
    da = ds["probs"]
    missing = [c for c in ATTENTION_COORDS if c not in da.coords]
    if missing:
        raise TraceError(f"{p}: attention group of sequence {sequence} lacks coordinates {missing}")
    attrs = {**da.attrs, "sequence": int(sequence), "head_mean": bool(ds.attrs.get("head_mean", False)),
             "queries": ds.attrs.get("queries", ATTENTION_QUERIES)}
    parts = _parts(p, int(sequence), n_tokens, int(np.asarray(da["query_token"].values).max(initial=-1)))
    if parts:
        da = _concat([da] + [x["probs"] for x in parts], p, int(sequence))
    da = _with_generated(da)
    da.attrs = {**attrs, "parts": len(parts)}
    return da


def _concat(das: list, path: Path, sequence: int):
    """The sequence group's maps and its parts' along ``query``; the patch dim padded with zeros to
    the last patch list (a part covers the patches known at its pass: a prefix of the list)."""
    import xarray as xr

    n = [d.sizes["patch"] for d in das]
    P = max(n)
    # the first group that reached P patches stores their coordinates (a group stores them when its list grew)
    full = next((i for i in range(len(das)) if n[i] == P and "patch_token" in das[i].coords), None)
    if full is None:
        raise TraceError(f"{path}: no attention group of sequence {sequence} holds the coordinates of its {P} patches")
    pcoords = {c: das[full][c].variable for c in _PATCH_COORDS}
    out = []
    for d in das:
        d = d.drop_vars([c for c in _PATCH_COORDS if c in d.coords])
        if "generated" not in d.coords:
            d = d.assign_coords(generated=("query", np.zeros(d.sizes["query"], np.int8)))
        if d.sizes["patch"] < P:  # patches that arrived after this pass: invisible to its queries
            d = d.pad(patch=(0, P - d.sizes["patch"]), constant_values=0)
        out.append(d)
    da = xr.concat(out, dim="query", coords="minimal", compat="override", join="override")
    return da.assign_coords(pcoords)
