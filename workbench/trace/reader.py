"""Reading a trace: :func:`open_trace` (the token table as a lazy xarray Dataset), per-commit expert
loads, and the child groups captures write (:func:`open_group`).

``open_trace`` validates the root (clear errors for a missing path, a file, a non-zarr directory,
a zarr v2 store, a foreign zarr v3 group, an unknown ``workbench.trace/N``), trims every variable
to the committed length and ignores child groups. It reads ``workbench.trace/2`` and
``workbench.trace/1`` stores; a v1 trace is presented with the v2 names (see
:mod:`workbench.trace.schema`). Every reader first checks, without decoding, that each array and
each chunk file over the committed rows exists (:mod:`workbench.trace.integrity`): a damaged store
raises :class:`~workbench.trace.errors.TraceCorruptError` instead of reading fill values as data.
Plain ``xr.open_zarr`` also works on a cleanly closed store and on one being written
(``consolidated=False``), but shows uncommitted rows and fails with "conflicting sizes" on a store
killed between two resizes (``open_trace`` handles that).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import xarray as xr
import zarr
from zarr.storage import LocalStore

from workbench.trace._util import quiet
from workbench.trace.errors import NotATraceError, TraceCorruptError, TraceError, UnknownSchemaError
from workbench.trace.integrity import check_group, check_root, committed_lengths
from workbench.trace.schema import (ADDED_CORE, COMMIT, COMMIT_END, CORE_VARIABLES, EXPERT, LAYER_COORD, MOE_LAYER,
                                    READABLE_SCHEMAS, SCHEMA, SCHEMA_PREFIX, SCHEMA_V1, TOKEN, Variable,
                                    logits_variable, routing_variables, v1_routing)

try:  # dask is optional: open_trace is dask-backed when it is installed
    import dask.array as _da  # noqa: F401

    HAVE_DASK = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_DASK = False

__all__ = ["open_trace", "expert_loads", "read_root", "trace_attrs", "open_group", "group_is_complete",
           "loads_dataarray"]


def read_root(path: str | os.PathLike) -> dict:
    """Validate that ``path`` is a workbench trace this code reads; return its root zarr.json as a dict."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no trace at {p}: the path does not exist")
    if not p.is_dir():
        raise NotATraceError(f"{p} is a file, not a trace (a trace is a zarr v3 directory store)")
    zj = p / "zarr.json"
    if not zj.is_file():
        if (p / ".zgroup").exists() or (p / ".zarray").exists():
            raise NotATraceError(f"{p} is a zarr v2 store, not a {SCHEMA} trace (traces are zarr v3 groups)")
        raise NotATraceError(f"{p} is not a trace: it has no zarr.json (not a zarr v3 store)")
    try:
        meta = json.loads(zj.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise NotATraceError(f"{zj} is not valid JSON ({e}); {p} is not a readable trace") from e
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise NotATraceError(f"{p} is not a trace: {zj} is not zarr v3 metadata")
    if meta.get("node_type") != "group":
        raise NotATraceError(f"{p} is a zarr {meta.get('node_type')!r}, not a trace (a trace is a zarr group)")
    attrs = meta.get("attributes") or {}
    schema = attrs.get("schema")
    if schema is None:
        shown = ", ".join(sorted(map(str, attrs))[:8]) or "none"
        raise NotATraceError(f"{p} is a zarr v3 group but not a workbench trace: no 'schema' attribute "
                             f"(attributes: {shown})")
    if schema not in READABLE_SCHEMAS:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise UnknownSchemaError(f"{p} has schema {schema!r}, which this workbench cannot read (it reads "
                                     f"{', '.join(READABLE_SCHEMAS)}); use the workbench version that wrote it")
        raise NotATraceError(f"{p} has schema attribute {schema!r}: not a workbench trace")
    required = ("n_tokens", "moe_layers", "n_experts", "top_k")
    if schema != SCHEMA_V1:
        required += ("n_commits", "variables")
    for key in required:
        if key not in attrs:
            raise TraceCorruptError(f"{p}: root attribute {key!r} is missing (damaged trace)")
    if schema != SCHEMA_V1:
        _check_variables(p, attrs["variables"])
    try:
        committed_lengths(attrs)
    except TraceCorruptError as e:
        raise TraceCorruptError(f"{p}: {e}", e.problems) from None
    return meta


def _check_variables(p: Path, variables) -> None:
    """TraceCorruptError unless the ``variables`` root attribute is {name: a Variable's JSON}."""
    from workbench.trace.schema import Variable

    if not isinstance(variables, dict):
        raise TraceCorruptError(f"{p}: root attribute 'variables' is a {type(variables).__name__}, not a mapping "
                                "of array names to their declarations (damaged trace)")
    for name, d in variables.items():
        try:
            Variable.from_json(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise TraceCorruptError(f"{p}: root attribute 'variables' has an unreadable declaration of {name!r} "
                                    f"({type(e).__name__}: {e}) (damaged trace)") from None


def trace_attrs(attrs: dict) -> dict:
    """Root attributes in the v2 vocabulary: a v1 trace's ``n_batches`` becomes ``n_commits``, its
    fixed arrays become ``variables`` / ``captures``, and it gets the Llama 4 ``routing``."""
    if attrs.get("schema") != SCHEMA_V1:
        return dict(attrs)
    a = {k: v for k, v in attrs.items() if k not in ("n_batches", "capture_logits", "logits_dtype")}
    L, E, k = len(attrs["moe_layers"]), int(attrs["n_experts"]), int(attrs["top_k"])
    variables = [v for v in CORE_VARIABLES if v.name not in ADDED_CORE] + routing_variables(L, E, k)
    captures = {"router": {}}
    if attrs.get("capture_logits"):
        variables.append(logits_variable(L, E, attrs.get("logits_dtype") or "float16"))
        captures["logits"] = {"dtype": attrs.get("logits_dtype") or "float16"}
    if "attention" in ((attrs.get("provenance") or {}).get("capture") or []):
        captures["attention"] = {}  # v1 kept the attention options in each group's attributes only
    a.update(n_commits=int(attrs.get("n_batches", 0)), variables={v.name: v.to_json() for v in variables},
             captures=captures, routing=v1_routing(attrs["moe_layers"], E, k))
    return a


def _declared(attrs: dict) -> dict[str, str]:
    """Array name -> its first dimension (token or commit), for every array a trace must hold."""
    out = {name: Variable.from_json(v).dims[0] for name, v in attrs["variables"].items()}
    out[COMMIT_END] = COMMIT
    return out


def required_arrays(attrs: dict) -> list[str]:
    """The arrays a trace must hold under their names on disk (v1: ``batch_end``), ``layer`` included."""
    names = list(_declared(attrs)) + [LAYER_COORD]
    return ["batch_end" if (n == COMMIT_END and attrs.get("schema") == SCHEMA_V1) else n for n in names]


def _v1_names(ds: xr.Dataset) -> xr.Dataset:
    """A v1 dataset with the v2 names (dimension ``batch`` -> ``commit``, ``batch_end`` -> ``commit_end``)."""
    if "batch" in ds.dims:
        ds = ds.rename_dims({"batch": COMMIT})
    if "batch_end" in ds.variables:
        ds = ds.rename_vars({"batch_end": COMMIT_END})
    return ds


def _open_raw(path: Path, consolidated: bool, n: int, nc: int) -> xr.Dataset:
    kw = dict(consolidated=consolidated, zarr_format=3, chunks={} if HAVE_DASK else None)
    with quiet():
        try:
            return xr.open_zarr(path, **kw)
        except ValueError as e:
            if "conflicting" not in str(e):
                raise
        # an interrupted commit left arrays of different lengths: open them in groups of equal
        # length, trim each to the committed length and merge
        g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", use_consolidated=False)
        by_len: dict[tuple, list[str]] = {}
        names = []
        for name, arr in g.arrays():
            names.append(name)
            dims = arr.metadata.dimension_names or ()
            key = tuple((d, s) for d, s in zip(dims, arr.shape) if d in (TOKEN, COMMIT, "batch"))
            by_len.setdefault(key, []).append(name)
        parts = []
        for key, members in by_len.items():
            for dim, size in key:
                want = n if dim == TOKEN else nc
                if size < want:
                    raise TraceError(f"{path}: array(s) {', '.join(sorted(members))} have {size} rows along "
                                     f"{dim!r} but {want} are committed (damaged trace)")
            keep = set(members) | {LAYER_COORD}
            ds = xr.open_zarr(path, drop_variables=[x for x in names if x not in keep], **kw)
            if LAYER_COORD in ds.data_vars:
                ds = ds.set_coords(LAYER_COORD)
            parts.append(_trim(_v1_names(ds), n, nc))
        return xr.merge(parts, combine_attrs="override", compat="override", join="outer")


def _trim(ds: xr.Dataset, n: int, nc: int) -> xr.Dataset:
    sel = {d: slice(0, m) for d, m in ((TOKEN, n), (COMMIT, nc)) if d in ds.dims}
    return ds.isel(sel) if sel else ds


def open_trace(path: str | os.PathLike, *, tokens: bool = False) -> xr.Dataset:
    """Open a trace as a lazy ``xarray.Dataset`` (dask-backed when dask is installed).

    Trimmed to the committed ``n_tokens`` (and ``n_commits``), so a trace that is still being
    written, or whose writer was killed, reads as exactly its committed rows. Child groups
    (attention maps, vocabulary) are not included. ``tokens=True`` adds ``token_text`` (token):
    the string of each token id, when the trace stores a vocabulary (else a warning). Attributes
    are the root attributes in the v2 vocabulary (:func:`trace_attrs`; ``schema`` says which
    version wrote the store).
    Raises FileNotFoundError, NotATraceError (not a trace / foreign zarr store),
    UnknownSchemaError (other ``workbench.trace/N`` version), TraceCorruptError (a missing or
    unreadable array, chunk or metadata file over the committed rows, bad root attributes:
    checked at open without decoding, see :mod:`workbench.trace.integrity`), TraceError (other damage).
    """
    p = Path(path)
    meta = read_root(p)
    attrs = trace_attrs(meta["attributes"])
    check_root(p, meta, required_arrays(attrs))
    n, nc = int(attrs["n_tokens"]), int(attrs["n_commits"])
    ds = _v1_names(_open_raw(p, meta.get("consolidated_metadata") is not None, n, nc))
    for name in list(_declared(attrs)) + [LAYER_COORD]:
        if name not in ds.variables:
            raise TraceError(f"{p}: array {name!r} is missing (creation interrupted or damaged trace)")
    for name, var in ds.variables.items():
        for dim, want in ((TOKEN, n), (COMMIT, nc)):
            if dim in var.dims and var.sizes[dim] < want:
                raise TraceError(f"{p}: array {name!r} has {var.sizes[dim]} rows along {dim!r} but {want} are "
                                 "committed (damaged trace)")
    ds = _trim(ds, n, nc)
    _check_agrees(p, ds, attrs, n, nc)
    for name, (_, default) in ADDED_CORE.items():  # core columns an older schema lacks
        if name not in ds.variables:
            var = next(v for v in CORE_VARIABLES if v.name == name)
            ds[name] = xr.DataArray(np.full(n, default, dtype=var.dtype), dims=(TOKEN,), attrs=dict(var.attrs))
    ds.attrs = attrs  # the attributes n_tokens was read from (a writer may have moved on)
    if tokens:
        _add_token_text(ds, p)
    return ds


def _check_agrees(path: Path, ds: xr.Dataset, attrs: Mapping, n: int, nc: int) -> None:
    """TraceCorruptError when the root attributes disagree with the arrays (an edited or damaged
    ``zarr.json``): the last committed ``commit_end`` is ``n_tokens``; ``n_experts``, ``top_k`` and
    ``moe_layers`` are the arrays' expert and slot counts and layer coordinate. Reads a few values."""
    from workbench.trace.integrity import Problem

    problems = []
    if nc and COMMIT_END in ds.variables and int(ds[COMMIT_END].values[-1]) != n:
        problems.append(Problem("", f"n_tokens = {n} but the last committed commit ends at token "
                                    f"{int(ds[COMMIT_END].values[-1])}"))
    for key, dim in (("n_experts", EXPERT), ("top_k", "k")):
        if dim in ds.sizes and int(attrs[key]) != int(ds.sizes[dim]):
            problems.append(Problem("", f"{key} = {attrs[key]} but the arrays hold {ds.sizes[dim]} along {dim!r}"))
    layers = [int(x) for x in np.asarray(ds[LAYER_COORD].values)]
    if layers != [int(x) for x in attrs["moe_layers"]]:
        problems.append(Problem("", f"moe_layers = {list(attrs['moe_layers'])} but the layer array holds {layers}"))
    if problems:
        raise TraceCorruptError(f"{path}: the root attributes disagree with the arrays: "
                                + "; ".join(p.what for p in problems), problems)


def _add_token_text(ds: xr.Dataset, path: Path) -> None:
    from workbench.trace.vocab import trace_vocab

    vocab = trace_vocab(path)
    if vocab is None:
        warnings.warn(f"{path} stores no vocabulary: token_text not added", UserWarning, stacklevel=3)
        return
    V = len(vocab)
    lut = np.empty(V + 1, dtype=object)
    lut[:V] = vocab
    lut[V] = "\ufffd"

    def lookup(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return lut[np.where((ids >= 0) & (ids < V), ids, V)]

    data = ds["token_id"].data
    text = data.map_blocks(lookup, dtype=object) if HAVE_DASK and hasattr(data, "map_blocks") else lookup(np.asarray(data))
    ds["token_text"] = xr.Variable((TOKEN,), text, attrs={"long_name": "token string"})


# ---------------------------------------------------------------------------------------------
# Expert loads
# ---------------------------------------------------------------------------------------------
def loads_dataarray(counts: np.ndarray, layers: Sequence[int]) -> xr.DataArray:
    """(moe_layer, expert) load counts labelled with the ``layer`` coordinate."""
    return xr.DataArray(np.asarray(counts, np.int64), dims=(MOE_LAYER, EXPERT),
                        coords={LAYER_COORD: (MOE_LAYER, np.asarray(layers, np.int32))}, name="expert_load",
                        attrs={"long_name": "top-k slots routed to each expert (committed tokens)"})


def _loads_from_topk(ds: xr.Dataset) -> np.ndarray:
    te = ds["topk_expert"].data
    L, E = ds.sizes[MOE_LAYER], int(ds.attrs["n_experts"])
    offs = (np.arange(L, dtype=np.int64) * E)[None, :, None]

    def block(b: np.ndarray) -> np.ndarray:
        return np.bincount((np.asarray(b).astype(np.int64) + offs).ravel(), minlength=L * E)[None]

    if HAVE_DASK and hasattr(te, "map_blocks"):
        te = te.rechunk({1: -1, 2: -1})
        parts = te.map_blocks(block, dtype=np.int64, drop_axis=[1, 2], new_axis=[1],
                              chunks=((1,) * te.numblocks[0], (L * E,)))
        return np.asarray(parts.sum(0).compute()).reshape(L, E)
    return block(np.asarray(te))[0].reshape(L, E)


def expert_loads(trace: str | os.PathLike | xr.Dataset, *, from_topk: bool = False) -> xr.DataArray:
    """Per-layer expert load of a whole trace: (moe_layer, expert) int64 with coordinate ``layer``.

    Sums the per-commit ``expert_load`` array (one small read). ``from_topk=True`` counts
    ``topk_expert`` instead (one pass over the token table); that is also what happens for a
    Dataset whose token or commit dimension was subset (the commits no longer match the tokens)
    or that has no ``expert_load``.
    """
    ds = trace if isinstance(trace, xr.Dataset) else open_trace(trace)
    whole = ds.sizes.get(TOKEN) == ds.attrs.get("n_tokens") and ds.sizes.get(COMMIT) == ds.attrs.get("n_commits")
    if not from_topk and "expert_load" in ds and whole:
        counts = np.asarray(ds["expert_load"].data.sum(axis=0, dtype=np.int64))
    else:
        counts = _loads_from_topk(ds)
    return loads_dataarray(counts, ds[LAYER_COORD].values)


# ---------------------------------------------------------------------------------------------
# Child groups (written by TraceWriter.write_group)
# ---------------------------------------------------------------------------------------------
def group_is_complete(store: Path, name: str, n_tokens: int) -> bool | None:
    """True: the group is complete and refers only to committed tokens; False: it exists but is not
    (a write was interrupted); None: no such group."""
    zj = store / name / "zarr.json"
    if not zj.is_file():
        return None
    try:
        attrs = json.loads(zj.read_bytes()).get("attributes") or {}
    except (OSError, ValueError):
        return False
    return attrs.get("complete") is True and int(attrs.get("token_end", 0)) <= n_tokens


def open_group(store: str | os.PathLike, name: str) -> xr.Dataset:
    """A complete child group of the trace as a lazy Dataset (1-D arrays read now).

    Raises TraceError when the group is missing or incomplete (an interrupted write),
    TraceCorruptError when one of its arrays or chunk files is missing or unreadable."""
    p = Path(store)
    n_tokens = int(read_root(p)["attributes"]["n_tokens"])
    state = group_is_complete(p, name, n_tokens)
    if not state:
        raise TraceError(f"{p}: group {name!r} is {'missing' if state is None else 'incomplete (interrupted write)'}")
    check_group(p, name, n_tokens)
    with quiet():
        ds = xr.open_zarr(p, group=name, consolidated=False, zarr_format=3, chunks={} if HAVE_DASK else None)
    small = {k: xr.Variable(v.dims, np.asarray(v.values), attrs=dict(v.attrs)) for k, v in ds.variables.items()
             if v.ndim == 1}
    return ds.assign_coords({k: v for k, v in small.items() if k in ds.coords}).assign(
        {k: v for k, v in small.items() if k not in ds.coords})
