"""Routing paths: each token's sequence of top-1 experts across MoE layers, as a first-class object.

Definitions (pinned). For the selected MoE layers l_1 .. l_m (``layers=``: decoder indices, in the
order given; default every MoE layer in trace order) the PATH of token t is

    p_t = (top1_{l_1}(t), ..., top1_{l_m}(t))

top1 = the slot of the top-k set with the largest applied weight (:func:`~._common.top1`; slot 0
when k = 1). The path's depth-d PREFIX is its first d entries.

* :func:`routing_paths`: the most frequent paths, with count_p = #{t : p_t = p} and share_p =
  count_p / N (N the selected tokens), split by modality or by sequence label on request.
* :func:`path_entropy`: per depth d = 1..m, the entropy of the prefix distribution
  H_d = -sum_p q_p log q_p (nats; q the depth-d prefix shares), its perplexity exp(H_d), the number of
  distinct prefixes, and H_d / log(min(N, E^d)) (1: as spread as the tokens and experts allow).
* :func:`path_tokens`: the tokens that follow one path (given, or that of a given token): trace
  row, sequence, position, token id, in trace order.

Out of core: the trace is streamed in token blocks (:func:`~._common.iter_blocks`); memory grows
with the number of DISTINCT paths (a dict of path -> count), not with the number of tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from . import _common as C

__all__ = ["routing_paths", "path_entropy", "path_tokens", "token_paths"]


def _positions(ds: xr.Dataset, layers, who: str) -> list[int]:
    if layers is None:
        return list(range(int(ds.sizes["moe_layer"])))
    if C.as_index(layers) is not None:
        layers = [layers]
    pos = [C.layer_position(ds, x, who) for x in layers]
    if not pos or len(set(pos)) != len(pos):
        raise ValueError(f"{who}: layers must be distinct decoder layer indices of MoE layers, got {list(layers)}")
    return pos


def _block_paths(blk: dict, pos: list[int], E: int, offset: int, who: str) -> np.ndarray:
    e = C.check_experts(blk["topk_expert"], E, offset, who)[:, pos, :]
    w = blk["topk_weight"][:, pos, :] if "topk_weight" in blk else None
    return np.ascontiguousarray(C.top1(e, w).astype(np.int16))  # (n, m)


def _names(ds: xr.Dataset, code, extra=()) -> list[str]:
    names = ["topk_expert"] + (["topk_weight"] if ds.sizes["k"] > 1 else [])
    if code is not None:
        names.append("modality")
    return names + list(extra)


def _keys(paths: np.ndarray) -> np.ndarray:
    """One hashable bytes key per row (a void view of the int16 row)."""
    return paths.view(np.dtype((np.void, paths.dtype.itemsize * paths.shape[1]))).ravel()


def token_paths(ds: xr.Dataset, *, layers=None, n_experts: int | None = None) -> xr.DataArray:
    """Every token's path, (token, moe_layer) int16, IN MEMORY (N x m values): for small traces and
    for checking the streaming functions. ``layers``: decoder indices (default all MoE layers)."""
    who = "token_paths"
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    pos = _positions(ds, layers, who)
    out = [_block_paths(blk, pos, E, sl.start, who) for sl, blk in C.iter_blocks(ds, _names(ds, None))]
    vals = np.concatenate(out) if out else np.zeros((0, len(pos)), np.int16)
    return xr.DataArray(vals, dims=("token", "moe_layer"), name="path",
                        coords={"layer": ("moe_layer", np.asarray(ds["layer"].values)[pos])})


def routing_paths(ds: xr.Dataset, *, layers=None, top: int | None = 20, modality=None, by_modality: bool = False,
                  labels=None, n_experts: int | None = None) -> xr.Dataset:
    """The most frequent routing paths (module docstring), largest count first (ties: smaller path
    first, lexicographically).

    Returns a Dataset with dims ``path`` (rank) and ``moe_layer`` (the selected layers, coordinate
    ``layer``): ``expert`` (path, moe_layer), ``count`` and ``share`` (path); with
    ``by_modality=True`` also ``count_by_modality`` (path, modality); with ``labels`` (sequence ->
    label, a mapping or an array indexed by sequence id; e.g. domains) ``count_by_label`` (path,
    label), tokens of unlabelled sequences counted in no label. attrs: ``n_tokens``, ``n_distinct``,
    ``other_count`` (tokens on paths outside the top), ``definition``. ``top=None``: every path.
    """
    who = "routing_paths"
    code = C.check_filters(modality, by_modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    pos = _positions(ds, layers, who)
    extra = []
    if by_modality:
        extra.append("modality")
    label_values = None
    if labels is not None:
        seq_ids = np.unique(C.load_column(ds, "sequence"))
        label_values, label_idx = C.labels_to_index(labels, seq_ids, who)
        extra.append("sequence")
    names = list(dict.fromkeys(_names(ds, code, extra)))
    counts: dict[bytes, int] = {}
    by_mod: dict[bytes, np.ndarray] = {}
    by_lab: dict[bytes, np.ndarray] = {}
    n_mod = len(C.MODALITY_NAMES)
    n = 0
    for sl, blk in C.iter_blocks(ds, names):
        p = _block_paths(blk, pos, E, sl.start, who)
        sel = np.ones(len(p), bool) if code is None else blk["modality"] == code
        p = p[sel]
        n += len(p)
        keys, inv, cnt = np.unique(_keys(p), return_inverse=True, return_counts=True)
        for key, c in zip(keys.tolist(), cnt.tolist()):
            counts[key] = counts.get(key, 0) + c
        if by_modality:
            m = blk["modality"][sel].astype(np.int64)
            _split(by_mod, keys, inv, m, n_mod)
        if label_values is not None:
            li = label_idx[np.searchsorted(seq_ids, blk["sequence"][sel])]
            ok = li >= 0
            _split(by_lab, keys, inv[ok], li[ok], len(label_values))
    items = sorted(counts.items(), key=lambda kv: (-kv[1], np.frombuffer(kv[0], np.int16).tolist()))
    kept = items if top is None else items[:int(top)]
    m = len(pos)
    experts = np.array([np.frombuffer(k, np.int16) for k, _ in kept], np.int16).reshape(len(kept), m)
    count = np.array([c for _, c in kept], np.int64)
    coords = {"path": np.arange(len(kept)), "layer": ("moe_layer", np.asarray(ds["layer"].values)[pos])}
    out = xr.Dataset({"expert": (("path", "moe_layer"), experts), "count": ("path", count),
                      "share": ("path", C.safe_div(count, n))}, coords=coords)
    if by_modality:
        out["count_by_modality"] = (("path", "modality"),
                                    np.array([by_mod[k] for k, _ in kept], np.int64).reshape(len(kept), n_mod))
        out = out.assign_coords(C.modality_coords())
    if label_values is not None:
        L = len(label_values)
        out["count_by_label"] = (("path", "label"), np.array([by_lab.get(k, np.zeros(L, np.int64)) for k, _ in kept],
                                                             np.int64).reshape(len(kept), L))
        out = out.assign_coords(label=np.array(label_values, dtype=object))
    out.attrs.update(n_tokens=int(n), n_distinct=len(counts), other_count=int(n - count.sum()), n_experts=E,
                     modality_filter=C.modality_attr(code),
                     definition="path of token t = (top1 expert at each selected MoE layer); count_p = #{t: p_t = p}, "
                                "share_p = count_p / N")
    return out


def _split(acc: dict, keys: np.ndarray, inv: np.ndarray, group: np.ndarray, n_groups: int) -> None:
    """acc[key][g] += #{rows with key and group g} for the block's unique keys."""
    flat = np.bincount(inv.reshape(-1) * n_groups + group, minlength=len(keys) * n_groups).reshape(len(keys), n_groups)
    for key, row in zip(keys.tolist(), flat):
        cur = acc.get(key)
        acc[key] = row.astype(np.int64) if cur is None else cur + row


def path_entropy(ds: xr.Dataset, *, layers=None, modality=None, n_experts: int | None = None) -> xr.Dataset:
    """Entropy of the routing-path prefixes per depth (module docstring).

    Returns a Dataset over ``moe_layer`` (depth d = the first d selected layers; coordinate
    ``layer`` = the decoder index of the layer the prefix ends at, ``depth`` = d): ``entropy`` (nats),
    ``perplexity`` = exp(entropy), ``n_distinct`` and ``normalized`` = entropy / log(min(N, E^d))
    (NaN when that is 0)."""
    who = "path_entropy"
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    pos = _positions(ds, layers, who)
    m = len(pos)
    counts: list[dict[bytes, int]] = [{} for _ in range(m)]
    n = 0
    for sl, blk in C.iter_blocks(ds, _names(ds, code)):
        p = _block_paths(blk, pos, E, sl.start, who)
        if code is not None:
            p = p[blk["modality"] == code]
        n += len(p)
        for d in range(m):
            keys, cnt = np.unique(_keys(np.ascontiguousarray(p[:, :d + 1])), return_counts=True)
            acc = counts[d]
            for key, c in zip(keys.tolist(), cnt.tolist()):
                acc[key] = acc.get(key, 0) + c
    ent = np.array([C.entropy(np.array(list(c.values()), np.float64) / n) if n else np.nan for c in counts])
    cap = np.log(np.minimum(float(n), float(E) ** np.arange(1, m + 1))) if n else np.full(m, np.nan)
    out = xr.Dataset({"entropy": ("moe_layer", ent), "perplexity": ("moe_layer", np.exp(ent)),
                      "n_distinct": ("moe_layer", np.array([len(c) for c in counts], np.int64)),
                      "normalized": ("moe_layer", C.safe_div(ent, cap))},
                     coords={"layer": ("moe_layer", np.asarray(ds["layer"].values)[pos]),
                             "depth": ("moe_layer", np.arange(1, m + 1))})
    out.attrs.update(n_tokens=int(n), n_experts=E, modality_filter=C.modality_attr(code),
                     definition="H_d = -sum_p q_p log q_p over the depth-d path prefixes (nats); "
                                "normalized = H_d / log(min(N, E^d))")
    return out


def path_tokens(ds: xr.Dataset, path: Sequence[int] | None = None, *, token: int | None = None, layers=None,
                modality=None, limit: int | None = None, n_experts: int | None = None) -> xr.Dataset:
    """The tokens whose path equals ``path`` (one expert per selected layer), or the path of trace row
    ``token`` (tokens that share its path, itself included). Returns a Dataset over ``match``:
    ``token`` (trace row), ``sequence``, ``position``, ``token_id``, in trace order, at most ``limit``
    rows; attrs ``path`` and ``n_matches`` (all matches, whatever ``limit``)."""
    who = "path_tokens"
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    pos = _positions(ds, layers, who)
    if (path is None) == (token is None):
        raise ValueError(f"{who}: pass either path= or token=")
    if token is not None:
        t = C.as_index(token)
        if t is None or not 0 <= t < int(ds.sizes["token"]):
            raise ValueError(f"{who}: token must be a trace row in [0, {int(ds.sizes['token'])}), got {token!r}")
        blk = {k: np.asarray(ds[k].isel(token=slice(t, t + 1)).values) for k in _names(ds, None)}
        want = _block_paths(blk, pos, E, t, who)[0]
    else:
        want = np.asarray(list(path), dtype=np.int64)
        if want.shape != (len(pos),):
            raise ValueError(f"{who}: path has {want.size} experts for {len(pos)} selected MoE layers")
        if ((want < 0) | (want >= E)).any():
            raise ValueError(f"{who}: path experts must lie in [0, {E}), got {want.tolist()}")
    rows = []
    for sl, blk in C.iter_blocks(ds, _names(ds, code)):
        p = _block_paths(blk, pos, E, sl.start, who)
        hit = (p == want[None, :]).all(1)
        if code is not None:
            hit &= blk["modality"] == code
        rows.append(sl.start + np.flatnonzero(hit))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    n_matches = len(rows)
    if limit is not None:
        rows = rows[:int(limit)]
    cols = {k: np.asarray(ds[k].isel(token=rows).values) for k in ("sequence", "position", "token_id") if k in ds}
    out = xr.Dataset({"token": ("match", rows.astype(np.int64)), **{k: ("match", v) for k, v in cols.items()}})
    out.attrs.update(path=[int(x) for x in want], n_matches=int(n_matches),
                     layers=[int(x) for x in np.asarray(ds["layer"].values)[pos]])
    return out
