"""Trace subsets as NetCDF and Parquet, with provenance.

NetCDF (``trace_subset.nc``): the trace's per-token variables restricted to the selection, same
names and dims as in the trace (:mod:`workbench.trace.schema`: ``token_id, sequence, position,
modality`` (token); ``generated`` (token) in traces that have it; ``topk_expert, topk_weight``
(token, moe_layer, k); ``router_logits`` (token, moe_layer, expert) when recorded; every other
per-token variable with one of those layouts, (token), (token, moe_layer), (token, moe_layer, k) or
(token, moe_layer, expert), e.g. ``router_margin``, ``expert_out_norm``, ``attribution``;
``token_text`` when the trace stores a vocabulary), with coordinates ``token_index`` (token: the
row in the source trace) and ``layer`` (moe_layer). Per-token variables with other dims (the
``expert_out_vec`` vectors) or whose Parquet columns would take the name of the table's own are left
out, and a note in the manifest names them; per-commit arrays
(``expert_load``, ``commit_end``) are left out too (commits do not survive a token subset). float16
variables (``router_logits``, ...) are written as float32 (float16 is not a NetCDF type; the values
are unchanged; attribute ``stored_dtype``). Written with the ``h5netcdf`` engine (NetCDF-4/HDF5)
when h5py is installed, else ``scipy`` (NetCDF-3 64-bit offset: int64 ``token_index`` becomes
int32, strings become char arrays). Global attributes: every provenance key (``routing`` and
``routing_rule`` among them), ``trace_provenance`` (the trace's full provenance as JSON),
``trace_routing`` (the trace's ``routing`` attribute, per-layer routing description and rule, as
JSON), ``schema = "workbench.trace_subset/1"``, ``n_experts``, ``top_k``.
Open with ``xr.open_dataset(path)``.

Text NetCDF cannot hold (NUL ends an HDF5 string; lone surrogates are not UTF-8) is escaped
Python-style (``\\x00``, ``\\udcXX``, :func:`~workbench.export._common.storable_text`); when any
was, ``token_text`` gets the attribute ``escaped`` (what and how) and the int8 variable
``token_text_escaped`` (token) flags the rows, and a note goes to the manifest.
The file is built in memory and then written with plain file I/O (HDF5 crashes the process when
the disk fills under it), unless its estimated size exceeds ``NETCDF_IN_MEMORY_BYTES``: then it is
written directly, after checking the free space.

Parquet (``trace_subset.parquet``): tidy, one row per (token, MoE layer): ``token_index``
(int64), ``sequence``, ``position``, ``token_id`` (int32), ``modality`` (int8), ``token`` (string,
when a vocabulary is stored), ``layer`` (int32, decoder layer index), ``expert_0..expert_{k-1}``
(int16), ``weight_0..weight_{k-1}`` (float32, slot order as stored), and ``router_logits``
(fixed-size list of E float32) when recorded; then the other variables of the NetCDF subset, as
columns of the same name: per token (``generated``, ``attribution_target``) repeated on the token's
rows, per (token, layer) one column (``router_margin``), per slot ``name_0..name_{k-1}``
(``expert_out_norm_j``), per expert a fixed-size list. Rows are sorted by token_index then layer order.
Written by pyarrow in row groups of a bounded number of tokens (memory does not grow with the
subset). Token strings keep NUL; lone surrogates are escaped (``\\udcXX``), with a note. Schema
metadata: ``workbench.provenance`` (JSON of the provenance keys, ``routing`` and ``routing_rule``
among them), ``workbench.trace_provenance`` and ``workbench.trace_routing`` (JSON, as in NetCDF);
read with ``pyarrow.parquet.read_table`` / ``pandas.read_parquet``.
"""
from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from ._common import ExportNote, Selection, atomic_path, jsonable, storable_text

__all__ = ["subset_dataset", "write_netcdf", "write_parquet", "netcdf_engine", "PARQUET_BLOCK_TOKENS",
           "NETCDF_IN_MEMORY_BYTES"]

PARQUET_BLOCK_TOKENS = 16384
NETCDF_IN_MEMORY_BYTES = 1 << 30
_TOKEN_VARS = ("token_id", "sequence", "position", "modality", "topk_expert", "topk_weight", "router_logits")
# per-token variables with these dims go into the subsets (the tidy Parquet table has a column layout for each)
_SUBSET_DIMS = (("token",), ("token", "moe_layer"), ("token", "moe_layer", "k"), ("token", "moe_layer", "expert"))
# the Parquet table's own columns, besides expert_j / weight_j
_PARQUET_FIXED = {"token_index", "sequence", "position", "token_id", "modality", "token", "layer", "router_logits"}


def _subset_vars(ds: xr.Dataset) -> tuple[list[str], list[str]]:
    """(the trace's per-token variables a subset holds: the core ones first, then the others by name;
    the per-token variables it leaves out, with their dims)."""
    per_token = [n for n in ds.data_vars if ds[n].dims[:1] == ("token",) and n != "token_text"]
    keep = [n for n in _TOKEN_VARS if n in per_token]
    keep += sorted(n for n in per_token if n not in keep and ds[n].dims in _SUBSET_DIMS
                   and not _parquet_clash(n, int(ds.sizes.get("k", 0))))
    left = [f"{n} {tuple(ds[n].dims)}" for n in sorted(per_token) if n not in keep]
    return keep, left


def _parquet_clash(name: str, k: int) -> bool:
    """Whether an extra variable's Parquet column(s) would take the name of one of the table's own."""
    own = _PARQUET_FIXED | {f"{w}_{j}" for w in ("expert", "weight") for j in range(k)}
    return name in own or any(f"{name}_{j}" in own for j in range(k))


def netcdf_engine() -> str:
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401

        return "h5netcdf"
    except ImportError:
        return "scipy"


def subset_dataset(ds: xr.Dataset, sel: Selection, prov: Mapping[str, str],
                   notes: list[str] | None = None) -> xr.Dataset:
    """The selected part of the trace as a (lazy) Dataset ready to write (see the module doc); the
    per-token variables it leaves out are named in a line of ``notes``."""
    sub = sel.apply(ds)
    n_src = int(ds.sizes["token"])
    rows = sel.token_rows if sel.token_rows is not None else np.arange(n_src)
    names, left = _subset_vars(sub)
    if left and notes is not None:
        msg = ("trace subset (NetCDF, Parquet): left out " + ", ".join(left)
               + " (only per-token variables over (token[, moe_layer[, k | expert]]) whose names do not clash with "
               "the table's columns go in); read them from the trace")
        if msg not in notes:
            notes.append(msg)
    data = {}
    for name in names:
        v = sub[name]
        if v.dtype == np.float16:
            v = v.astype(np.float32)
            v.attrs["stored_dtype"] = str(sub[name].dtype)
        data[name] = v.variable
    if "token_text" in sub.variables:
        texts = np.asarray(sub["token_text"].values, dtype=object)
        data["token_text"] = xr.Variable(("token",), np.array([str(t) for t in texts], dtype=object),
                                         attrs={"long_name": "token string (trace vocabulary)"})
    trace_prov = ds.attrs.get("provenance") or {}
    routing = ds.attrs.get("routing")
    attrs: dict[str, Any] = {k: str(v) for k, v in prov.items()}
    attrs.update({
        "schema": "workbench.trace_subset/1",
        "source_schema": str(ds.attrs.get("schema")),
        "n_experts": int(ds.attrs.get("n_experts")),
        "top_k": int(ds.attrs.get("top_k")),
        "moe_layers": np.asarray(sub["layer"].values, np.int32),
        "trace_provenance": json.dumps(jsonable(trace_prov), sort_keys=True),
        "trace_routing": json.dumps(jsonable(dict(routing) if isinstance(routing, Mapping) else {}), sort_keys=True),
    })
    out = xr.Dataset(
        data,
        coords={"token_index": ("token", np.asarray(rows, np.int64)),
                "layer": ("moe_layer", np.asarray(sub["layer"].values, np.int32))},
        attrs=attrs,
    )
    for name in out.variables:
        out[name].attrs.pop("coordinates", None)
        out[name].encoding = {}
    return out


def _escape_texts(texts: np.ndarray, nul: bool, what: str, notes: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Token strings made storable (:func:`storable_text`) and the flags of the escaped ones; says so
    when any was escaped: a line in ``notes``, or without ``notes`` an :class:`ExportNote` warning."""
    pairs = [storable_text(str(t), nul=nul) for t in texts]
    flags = np.array([changed for _, changed in pairs], dtype=bool)
    if flags.any():
        example = "\\x00" if nul else "\\udc80"
        msg = (f"{what}: {int(flags.sum())} token string(s) held characters {what.split()[0]} cannot store "
               f"({'NUL or ' if nul else ''}lone surrogates): written with Python escapes such as {example}")
        if notes is not None:
            notes.append(msg)
        else:
            warnings.warn(msg, ExportNote, stacklevel=3)
    return [t for t, _ in pairs], flags


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def write_netcdf(sub: xr.Dataset, path: Path, engine: str | None = None, notes: list[str] | None = None) -> Path:
    """Write a :func:`subset_dataset` result to NetCDF (atomically; text escaped as the module doc
    says, with a line in ``notes``; a full disk is an OSError, never a crash)."""
    engine = engine or netcdf_engine()
    path = Path(path)
    sub = sub.copy()
    sub.attrs["netcdf_engine"] = engine
    enc: dict[str, dict] = {}
    if "token_text" in sub.variables:
        texts, flags = _escape_texts(np.asarray(sub["token_text"].values, dtype=object), True,
                                     f"NetCDF {path.name}", notes)
        attrs = dict(sub["token_text"].attrs)
        if flags.any():
            attrs["escaped"] = ("NUL as \\x00 and lone surrogates as \\udcXX (Python escapes); "
                                "token_text_escaped = 1 flags the rows")
            sub["token_text_escaped"] = xr.Variable(("token",), flags.astype(np.int8),
                                                    attrs={"long_name": "1: token_text was escaped"})
        sub["token_text"] = xr.Variable(("token",), np.array(texts, dtype=object), attrs=attrs)
        if engine == "h5netcdf":
            enc["token_text"] = {"dtype": str}  # variable-length strings (NetCDF-3 gets char arrays)
    if engine == "scipy" and "token_index" in sub.variables:
        sub["token_index"] = sub["token_index"].astype(np.int32)
    fmt = None if engine == "h5netcdf" else "NETCDF3_64BIT"
    path.parent.mkdir(parents=True, exist_ok=True)
    # HDF5 segfaults when the disk fills under it (at close): build the file in memory and write the
    # bytes with Python, whose write raises a plain OSError. Too big for memory: check the space first.
    estimate = int(sub.nbytes) + (1 << 20)
    if estimate > NETCDF_IN_MEMORY_BYTES:
        free = _free_bytes(path.parent)
        if free < estimate * 1.1:
            raise OSError(errno.ENOSPC, f"{free / 1e6:.0f} MB free for a NetCDF file of about {estimate / 1e6:.0f} "
                                        "MB: no space left on device", str(path))
        with atomic_path(path) as tmp:
            sub.to_netcdf(tmp, engine=engine, encoding=enc or None, format=fmt)
        return path
    data = sub.to_netcdf(engine=engine, encoding=enc or None, format=fmt)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_parquet(sub: xr.Dataset, path: Path, prov: Mapping[str, str], trace_provenance: Mapping | None = None,
                  block_tokens: int = PARQUET_BLOCK_TOKENS, notes: list[str] | None = None) -> Path:
    """Write a :func:`subset_dataset` result as a tidy Parquet table (one row per token x layer);
    lone surrogates in token strings are escaped, with a line in ``notes``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    L, k = int(sub.sizes["moe_layer"]), int(sub.sizes["k"])
    has_logits = "router_logits" in sub.variables
    E = int(sub.sizes["expert"]) if has_logits else int(sub.attrs.get("n_experts", 0))
    has_text = "token_text" in sub.variables
    if has_text:  # Arrow strings are UTF-8: no lone surrogates
        texts_all = np.array(_escape_texts(np.asarray(sub["token_text"].values, dtype=object), False,
                                           f"Parquet {Path(path).name}", notes)[0] + [""], dtype=object)[:-1]
    layers = np.asarray(sub["layer"].values, np.int32)
    fields = [pa.field("token_index", pa.int64()), pa.field("sequence", pa.int32()), pa.field("position", pa.int32()),
              pa.field("token_id", pa.int32()), pa.field("modality", pa.int8())]
    if has_text:
        fields.append(pa.field("token", pa.string()))
    fields.append(pa.field("layer", pa.int32()))
    fields += [pa.field(f"expert_{j}", pa.int16()) for j in range(k)]
    fields += [pa.field(f"weight_{j}", pa.float32()) for j in range(k)]
    if has_logits:
        fields.append(pa.field("router_logits", pa.list_(pa.float32(), E)))
    core = {"token_id", "sequence", "position", "modality", "topk_expert", "topk_weight", "router_logits"}
    extras = [n for n in sub.data_vars if n not in core and n != "token_text" and n != "token_text_escaped"]
    for name in extras:
        fields += _extra_fields(name, sub[name], k)
    meta = {
        "workbench.provenance": json.dumps(dict(prov), sort_keys=False),
        "workbench.trace_provenance": json.dumps(jsonable(trace_provenance or {}), sort_keys=True),
        "workbench.trace_routing": str(sub.attrs.get("trace_routing", "{}")),
        "workbench.layout": "one row per (token, moe_layer); expert_j/weight_j = top-k slot j as stored",
        "workbench.n_experts": str(E),
        "workbench.top_k": str(k),
    }
    schema = pa.schema(fields, metadata={k_: v.encode("utf-8") for k_, v in meta.items()})
    n = int(sub.sizes["token"])
    names = ["token_id", "sequence", "position", "modality", "topk_expert", "topk_weight"]
    names += (["router_logits"] if has_logits else []) + extras
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for s in range(0, n, block_tokens):
                blk = sub[names].isel(token=slice(s, min(s + block_tokens, n))).load()
                T = blk.sizes["token"]
                rep = lambda a: np.repeat(np.asarray(a), L)  # noqa: E731
                cols = {
                    "token_index": rep(sub["token_index"].values[s:s + T]).astype(np.int64),
                    "sequence": rep(blk["sequence"].values).astype(np.int32),
                    "position": rep(blk["position"].values).astype(np.int32),
                    "token_id": rep(blk["token_id"].values).astype(np.int32),
                    "modality": rep(blk["modality"].values).astype(np.int8),
                }
                arrays = [pa.array(cols[c]) for c in ("token_index", "sequence", "position", "token_id", "modality")]
                if has_text:
                    texts = texts_all[s:s + T]
                    arrays.append(pa.array(np.repeat(texts, L).tolist(), type=pa.string()))
                arrays.append(pa.array(np.tile(layers, T)))
                e = np.asarray(blk["topk_expert"].transpose("token", "moe_layer", "k").values).reshape(T * L, k)
                wgt = np.asarray(blk["topk_weight"].transpose("token", "moe_layer", "k").values).reshape(T * L, k)
                arrays += [pa.array(e[:, j].astype(np.int16)) for j in range(k)]
                arrays += [pa.array(wgt[:, j].astype(np.float32)) for j in range(k)]
                if has_logits:
                    lg = np.asarray(blk["router_logits"].transpose("token", "moe_layer", "expert").values,
                                    np.float32).reshape(T * L * E)
                    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(lg), E))
                for name in extras:
                    arrays += _extra_arrays(blk[name], T, L)
                w.write_table(pa.Table.from_arrays(arrays, schema=schema))
    return Path(path)


def _extra_fields(name: str, var: xr.DataArray, k: int) -> list:
    """The Parquet columns of a subset variable beyond the core ones (layouts in the module doc)."""
    import pyarrow as pa

    t = pa.from_numpy_dtype(var.dtype)
    dims = tuple(var.dims)
    if dims in (("token",), ("token", "moe_layer")):
        return [pa.field(name, t)]
    if dims == ("token", "moe_layer", "k"):
        return [pa.field(f"{name}_{j}", t) for j in range(k)]
    if dims == ("token", "moe_layer", "expert"):
        return [pa.field(name, pa.list_(t, int(var.sizes["expert"])))]
    raise ValueError(f"{name}: no Parquet layout for dims {dims}")


def _extra_arrays(var: xr.DataArray, T: int, L: int) -> list:
    """The column arrays of :func:`_extra_fields` for a block of ``T`` tokens (rows token-major, then layer)."""
    import pyarrow as pa

    a = np.asarray(var.values)
    if var.dims == ("token",):
        return [pa.array(np.repeat(a, L))]
    if var.dims == ("token", "moe_layer"):
        return [pa.array(a.reshape(T * L))]
    if var.dims == ("token", "moe_layer", "k"):
        flat = a.reshape(T * L, -1)
        return [pa.array(np.ascontiguousarray(flat[:, j])) for j in range(flat.shape[1])]
    E = int(var.sizes["expert"])
    return [pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(T * L * E)), E)]
