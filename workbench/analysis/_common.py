"""Shared helpers for the routing analyses: schema checks, filters and out-of-core block loops.

Every analysis reads a trace (schema ``workbench.trace/2``, :mod:`workbench.trace.schema`; a v1
trace as :func:`workbench.trace.open_trace` presents it) block by block along the ``token`` dim:
a block is a contiguous token range whose size follows the dask chunks of the trace (merged
up to :data:`BLOCK_TOKENS` rows and capped at :data:`BLOCK_BYTES` of data), is materialised
as numpy, reduced, and dropped.  Memory is therefore bounded by a few blocks whatever the
trace length.  Only 1-D per-token columns (``sequence``, ``position``, ``token_id``,
``modality``; a few bytes per token) are ever loaded whole, and only by the analyses that
need a global order (consecutive-token pairs, next-token ids, label lookup).
"""

from __future__ import annotations

import concurrent.futures as _cf
import math
import operator
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import xarray as xr

from workbench.trace.schema import Modality

#: largest number of token rows in one block
BLOCK_TOKENS = 65536
#: largest number of bytes (summed over the variables read) in one block
BLOCK_BYTES = 256 * 2**20
#: load block i+1 in a background thread while block i is reduced
PREFETCH = True

#: short name -> code of each :class:`~workbench.trace.schema.Modality` ({"text": 0, "image": 1, "special": 2})
MODALITY_CODES = {m.label: int(m) for m in Modality}
#: short name of each modality, indexed by code (the ``modality`` dim of ``by_modality=True`` results)
MODALITY_NAMES = tuple(Modality(c).label for c in range(len(Modality)))

_REQUIRED_DIMS = {
    "token_id": ("token",),
    "sequence": ("token",),
    "position": ("token",),
    "modality": ("token",),
    "topk_expert": ("token", "moe_layer", "k"),
    "topk_weight": ("token", "moe_layer", "k"),
    "router_logits": ("token", "moe_layer", "expert"),
}


# --------------------------------------------------------------------------- validation
def require(ds: xr.Dataset, *names: str, who: str = "analysis") -> None:
    """Raise a clear error when a variable the analysis needs is missing or mis-shaped."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{who}: expected an xarray.Dataset trace, got {type(ds).__name__}")
    for name in names:
        if name not in ds.variables:
            raise KeyError(
                f"{who}: trace has no variable {name!r} (has: {sorted(map(str, ds.variables))}); "
                "see the workbench.trace/2 schema (workbench.trace.schema)"
            )
        want = set(_REQUIRED_DIMS.get(name, ()))
        have = set(ds[name].dims)
        if want and have != want:
            raise ValueError(
                f"{who}: variable {name!r} has dims {ds[name].dims}, expected {_REQUIRED_DIMS[name]}"
            )


def get_n_experts(ds: xr.Dataset, n_experts: int | None = None, who: str = "analysis") -> int:
    """Number of routed experts E: the argument, else ``attrs['n_experts']``, else the
    size of ``router_logits``' expert dim; otherwise a clear error."""
    if n_experts is None:
        if "n_experts" in ds.attrs:
            n_experts = ds.attrs["n_experts"]
        elif "router_logits" in ds.variables:
            n_experts = ds["router_logits"].sizes["expert"]
        elif "expert" in ds.sizes:
            n_experts = ds.sizes["expert"]
        else:
            raise ValueError(
                f"{who}: cannot tell the number of experts: the trace has no 'n_experts' attribute "
                "and no router_logits; pass n_experts=<int>"
            )
    n = int(n_experts)
    if n < 1:
        raise ValueError(f"{who}: n_experts must be >= 1, got {n_experts!r}")
    return n


def resolve_modality(modality, who: str = "analysis") -> int | None:
    """None -> no filter; a :class:`~workbench.trace.schema.Modality`, a name ('text', 'image',
    'image_patch', 'patch', 'special') or a code (0/1/2) -> that code (``Modality.parse``)."""
    if modality is None:
        return None
    if isinstance(modality, (bool, np.bool_)):  # Modality.parse refuses bool, but not numpy's
        raise TypeError(f"{who}: modality must be None, a name or an int code, got {modality!r}")
    try:
        return int(Modality.parse(modality))
    except TypeError:
        raise TypeError(f"{who}: modality must be None, a name or an int code, got {modality!r}") from None
    except ValueError as e:
        raise ValueError(f"{who}: {e} (or None for all tokens)") from None


def check_filters(modality, by_modality: bool, who: str) -> int | None:
    code = resolve_modality(modality, who)
    if by_modality and code is not None:
        raise ValueError(f"{who}: pass either modality= (a filter) or by_modality=True (a split), not both")
    return code


def as_index(value) -> int | None:
    """``value`` as a Python int when it is an integer (Python or numpy integer, 0-d integer array
    or DataArray); None for anything else (bool, float, str, ...)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, xr.DataArray):
        value = value.values
    if isinstance(value, np.ndarray):
        return int(value) if value.ndim == 0 and value.dtype.kind in "iu" else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def layer_position(ds: xr.Dataset, layer, who: str = "analysis") -> int:
    """Position on the moe_layer dim of decoder layer ``layer`` (a value of the ``layer`` coordinate).

    Raises TypeError when ``layer`` is not an integer (bool, float, str...) and ValueError, naming
    the trace's MoE layers, when decoder layer ``layer`` is not a MoE layer of the trace."""
    if "layer" not in ds.coords:
        raise KeyError(f"{who}: trace has no 'layer' coordinate on moe_layer (the trace schema requires one)")
    value = as_index(layer)
    if value is None:
        raise TypeError(f"{who}: layer must be a decoder layer index (int), got {layer!r}")
    layers = np.asarray(ds["layer"].values)
    hits = np.flatnonzero(layers == value)
    if hits.size == 0:
        raise ValueError(
            f"{who}: decoder layer {value} is not a MoE layer of this trace; "
            f"available MoE layers (coordinate 'layer'): {layers.tolist()}"
        )
    return int(hits[0])


def layer_coords(ds: xr.Dataset) -> dict:
    """The ``layer`` coordinate (dim moe_layer), to attach to results."""
    if "layer" in ds.coords:
        return {"layer": ("moe_layer", np.asarray(ds["layer"].values))}
    return {}


# --------------------------------------------------------------------------- blocks
def _token_chunks(var: xr.DataArray) -> tuple[int, ...] | None:
    chunks = var.chunks
    if chunks is None:
        return None
    return tuple(int(c) for c in chunks[var.dims.index("token")])


def token_blocks(ds: xr.Dataset, names: Sequence[str], n_tokens: int | None = None) -> list[slice]:
    """Contiguous token slices covering the trace: dask chunk boundaries merged greedily up
    to the block size (chunks larger than a block are split)."""
    n = int(ds.sizes["token"]) if n_tokens is None else int(n_tokens)
    row_bytes = 0
    chunks = None
    for name in names:
        var = ds[name]
        row_bytes += var.dtype.itemsize * math.prod(s for d, s in var.sizes.items() if d != "token")
        if chunks is None:
            chunks = _token_chunks(var)
    rows = int(min(BLOCK_TOKENS, max(1024, BLOCK_BYTES // max(row_bytes, 1))))
    if chunks is None:
        return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]
    out: list[slice] = []
    start = 0
    cur = 0
    for c in chunks:
        if cur + c > rows and cur > 0:
            out.append(slice(start, start + cur))
            start += cur
            cur = 0
        if c > rows:  # split a big chunk
            for s in range(0, c, rows):
                out.append(slice(start + s, start + min(s + rows, c)))
            start += c
            continue
        cur += c
    if cur:
        out.append(slice(start, start + cur))
    return out


def _load(ds: xr.Dataset, names: Sequence[str], sl) -> dict[str, np.ndarray]:
    sub = ds[list(names)].isel(token=sl)
    sub = sub.load()  # one dask.compute for all variables
    return {name: np.asarray(sub[name].values) for name in names}


def iter_blocks(
    ds: xr.Dataset, names: Sequence[str], slices: Sequence[slice] | None = None
) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """Yield ``(slice, {name: numpy block})`` over the token dim, with the variables transposed
    to the schema's dim order (token first). The next block is loaded in a thread meanwhile."""
    names = list(dict.fromkeys(names))
    order = {}
    for name in names:
        want = _REQUIRED_DIMS.get(name)
        if want and ds[name].dims != want:
            order[name] = want
    if order:
        ds = ds.assign({n: ds[n].transpose(*d) for n, d in order.items()})
    if slices is None:
        slices = token_blocks(ds, names)
    if not PREFETCH or len(slices) < 2:
        for sl in slices:
            yield sl, _load(ds, names, sl)
        return
    with _cf.ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(_load, ds, names, slices[0])
        for i, sl in enumerate(slices):
            data = fut.result()
            if i + 1 < len(slices):
                fut = pool.submit(_load, ds, names, slices[i + 1])
            yield sl, data


def load_column(ds: xr.Dataset, name: str) -> np.ndarray:
    """A whole 1-D per-token column (small: a few bytes per token)."""
    return np.asarray(ds[name].values)


# --------------------------------------------------------------------------- block maths
def check_experts(experts: np.ndarray, n_experts: int, offset: int, who: str) -> np.ndarray:
    """Validate a (tokens, layers, k) block of expert ids; return it as int64."""
    e = experts.astype(np.int64, copy=False)
    if e.size:
        lo, hi = int(e.min()), int(e.max())
        if lo < 0 or hi >= n_experts:
            bad = np.argwhere((e < 0) | (e >= n_experts))[0]
            raise ValueError(
                f"{who}: topk_expert holds expert id {int(e[tuple(bad)])} at token {offset + int(bad[0])}, "
                f"moe_layer position {int(bad[1])}, outside [0, {n_experts}) (n_experts={n_experts})"
            )
        if e.shape[-1] > 1:
            s = np.sort(e, axis=-1)
            dup = s[..., 1:] == s[..., :-1]
            if dup.any():
                bad = np.argwhere(dup)[0]
                raise ValueError(
                    f"{who}: topk_expert repeats an expert within one token's top-k set at token "
                    f"{offset + int(bad[0])}, moe_layer position {int(bad[1])}: {e[bad[0], bad[1]].tolist()}"
                )
    return e


def top1(experts: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Top-1 expert of each (token, layer): the slot with the largest ``topk_weight`` (first slot on
    ties; slot 0 when k == 1). ``experts``/``weights``: (..., k). Equals ``rank_by_weight(...)[..., 0]``."""
    if experts.shape[-1] == 1 or weights is None:
        return experts[..., 0]
    slot = np.argmax(weights, axis=-1)
    return np.take_along_axis(experts, slot[..., None], axis=-1)[..., 0]


def rank_by_weight(experts: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Each (token, layer)'s top-k list ranked by applied weight (``topk_weight``), descending; ties keep
    the slot order (a stable sort), so element 0 is :func:`top1`. ``experts``/``weights``: (..., k).

    Softmax families store slots by weight already (unchanged); DeepSeek-V3 stores them by its selection
    score s + b while the weight excludes b, so there the order differs."""
    if experts.shape[-1] == 1 or weights is None:
        return experts
    order = np.argsort(-np.asarray(weights), axis=-1, kind="stable")
    return np.take_along_axis(experts, order, axis=-1)


def safe_div(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den == 0, np.nan, out)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats with 0 log 0 = 0; NaN rows stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    t = np.where(np.isnan(p), np.nan, t)
    return -t.sum(axis=axis)


def modality_coords() -> dict:
    return {
        "modality": ("modality", np.arange(len(MODALITY_NAMES), dtype=np.int8)),
        "modality_name": ("modality", np.array(MODALITY_NAMES)),
    }


def modality_attr(code: int | None) -> str:
    if code is None:
        return "all"
    name = MODALITY_NAMES[code] if 0 <= code < len(MODALITY_NAMES) else str(code)
    return f"{name} ({code})"


def labels_to_index(labels, seq_ids: np.ndarray, who: str):
    """Map sequence ids to label indices. ``labels``: a mapping sequence -> label (sequences missing
    from it are left out, index -1) or an array indexed by sequence id (must cover every id).
    Returns (label values, index per seq id)."""
    if isinstance(labels, Mapping) or (hasattr(labels, "items") and not isinstance(labels, np.ndarray)):
        mapping = dict(labels.items())
        per_seq = [mapping.get(int(s), _MISSING) for s in seq_ids]
    else:
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise ValueError(f"{who}: labels must be a mapping or a 1-D array indexed by sequence id, got shape {arr.shape}")
        if seq_ids.size and (seq_ids.min() < 0 or seq_ids.max() >= arr.shape[0]):
            raise ValueError(
                f"{who}: labels array has length {arr.shape[0]} but the trace has sequence ids "
                f"{int(seq_ids.min())}..{int(seq_ids.max())}; give one label per sequence id or a dict"
            )
        per_seq = [arr[int(s)].item() if hasattr(arr[int(s)], "item") else arr[int(s)] for s in seq_ids]
    present = [v for v in per_seq if v is not _MISSING]
    uniq = list(dict.fromkeys(present))
    try:
        uniq = sorted(uniq)
    except TypeError:
        pass
    pos = {v: i for i, v in enumerate(uniq)}
    idx = np.array([pos[v] if v is not _MISSING else -1 for v in per_seq], dtype=np.int64)
    return uniq, idx


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
