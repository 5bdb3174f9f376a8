"""Expert load shares and load imbalance."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C


def _commit_loads(ds, E, k):
    """The store's per-commit ``expert_load`` (commit, moe_layer, expert) summed over commits, when
    it provably covers exactly the token rows of ``ds``: ``commit_end[-1]`` equals the number of
    tokens and the counts sum to k T (so a token subset of ``ds`` falls back to counting)."""
    if "expert_load" not in ds.variables or "commit_end" not in ds.variables:
        return None
    var = ds["expert_load"]
    if set(var.dims) != {"commit", "moe_layer", "expert"} or var.sizes["expert"] != E:
        return None
    T = ds.sizes["token"]
    ends = np.asarray(ds["commit_end"].values)
    if ends.size == 0 or int(ends[-1]) != T:
        return None
    counts = np.asarray(var.sum("commit").transpose("moe_layer", "expert").values, dtype=np.int64)
    if counts.shape != (ds.sizes["moe_layer"], E) or (counts.sum(axis=1) != k * T).any() or (counts < 0).any():
        return None
    return counts


def _load_counts(ds, code, by_modality, n_experts, who, use_commit_loads=True):
    """Counts N[m?, l, i] = #{t : i in S_t^l} and token counts T[m?] over the selected tokens."""
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    L = ds.sizes["moe_layer"]
    k = ds.sizes["k"]
    if use_commit_loads and code is None and not by_modality:
        fast = _commit_loads(ds, E, k)
        if fast is not None:
            return fast[None], np.array([ds.sizes["token"]], dtype=np.int64), E, k
    need_mod = by_modality or code is not None
    names = ["topk_expert"] + (["modality"] if need_mod else [])
    if need_mod:
        C.require(ds, "modality", who=who)
    groups = len(C.MODALITY_NAMES) if by_modality else 1
    counts = np.zeros((groups, L * E), dtype=np.int64)
    ntok = np.zeros(groups, dtype=np.int64)
    base = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    for sl, blk in C.iter_blocks(ds, names):
        e = C.check_experts(blk["topk_expert"], E, sl.start, who) + base
        if by_modality:
            mod = blk["modality"]
            for m in range(groups):
                sel = mod == m
                n = int(sel.sum())
                if n:
                    counts[m] += np.bincount(e[sel].ravel(), minlength=L * E)
                    ntok[m] += n
        else:
            if code is not None:
                e = e[blk["modality"] == code]
            counts[0] += np.bincount(e.ravel(), minlength=L * E)
            ntok[0] += e.shape[0]
    counts = counts.reshape(groups, L, E)
    return counts, ntok, E, k


def _wrap(values, ds, E, by_modality, name, attrs, ntok):
    coords = {"expert": np.arange(E), **C.layer_coords(ds)}
    if by_modality:
        coords.update(C.modality_coords())
        coords["n_tokens"] = ("modality", ntok)
        return xr.DataArray(values, dims=("modality", "moe_layer", "expert"), coords=coords, name=name, attrs=attrs)
    return xr.DataArray(values[0], dims=("moe_layer", "expert"), coords=coords, name=name, attrs=attrs)


def expert_load(ds: xr.Dataset, *, normalize: bool = True, modality=None, by_modality: bool = False,
                n_experts: int | None = None, use_commit_loads: bool = True) -> xr.DataArray:
    """Expert load per MoE layer, dims ``(moe_layer, expert)`` (``(modality, moe_layer, expert)`` with
    ``by_modality=True``).

    With ``normalize=True`` the load share

        f_i = (1 / (k T)) * sum_t 1[i in S_t]

    where S_t is token t's top-k expert set at that layer, T the number of (selected) tokens and k
    the routing top-k; shares sum to 1 over experts. NaN when T = 0. With ``normalize=False`` the
    integer counts N_i = sum_t 1[i in S_t] (sum to k T).

    ``modality``: None (all tokens) or "text"/"image"/"special"/int code keeps only those tokens.
    ``by_modality=True`` splits by modality instead (codes 0, 1, 2; coordinate ``n_tokens`` = T
    per modality). ``n_experts`` overrides ``attrs['n_experts']``.
    Out of core: one pass of ``np.bincount`` over token blocks. Without a modality filter/split,
    the trace's per-commit ``expert_load`` counts are summed instead
    when they provably cover exactly the rows of ``ds`` (``commit_end[-1]`` = T and the counts sum
    to k T); ``use_commit_loads=False`` always counts ``topk_expert``.
    """
    who = "expert_load"
    code = C.check_filters(modality, by_modality, who)
    counts, ntok, E, k = _load_counts(ds, code, by_modality, n_experts, who, use_commit_loads)
    attrs = {"k": k, "n_experts": E, "modality_filter": C.modality_attr(code)}
    if normalize:
        values = C.safe_div(counts, (k * ntok)[:, None, None])
        attrs["definition"] = "f_i = (1/(k T)) sum_t 1[i in S_t]"
    else:
        values = counts
        attrs["definition"] = "N_i = sum_t 1[i in S_t]"
    if not by_modality:
        attrs["n_tokens"] = int(ntok[0])
    return _wrap(values, ds, E, by_modality, "load_share" if normalize else "load_count", attrs, ntok)


def imbalance_from_shares(f: np.ndarray, E: int) -> dict[str, np.ndarray]:
    """Imbalance metrics from load shares f (..., E) (rows summing to 1, or NaN)."""
    f = np.asarray(f, dtype=np.float64)
    mean = f.mean(axis=-1)
    std = f.std(axis=-1)  # population std (ddof = 0)
    mx = f.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = std / mean
        max_over_mean = E * mx
        maxvio = (mx - mean) / mean
        h = C.entropy(f) / np.log(E) if E > 1 else np.where(np.isnan(mean), np.nan, 1.0)
    return {"cv": cv, "max_over_mean": max_over_mean, "maxvio": maxvio, "load_entropy": h}


def load_imbalance(ds: xr.Dataset, *, modality=None, by_modality: bool = False,
                   n_experts: int | None = None, use_commit_loads: bool = True) -> xr.Dataset:
    """Load-imbalance metrics per MoE layer (dim ``moe_layer``; plus ``modality`` with
    ``by_modality=True``), from the load shares f_i of :func:`expert_load`:

    - ``cv`` = std(f) / mean(f), std the POPULATION standard deviation (ddof=0) over the E experts;
      since mean(f) = 1/E this is E * std(f). 0 for perfect balance.
    - ``max_over_mean`` = max_i f_i / mean(f) = E * max_i f_i (1 = balanced, E = all on one expert).
    - ``maxvio`` = (max_i load_i - mean load) / mean load, the "MaxVio" of the auxiliary-loss-free
      load-balancing paper (Wang et al. 2024, arXiv:2408.15664), with load_i the token count of
      expert i; equals max_over_mean - 1.
    - ``load_entropy`` = -sum_i f_i log f_i / log E, in [0, 1] (1 = balanced). (1 when E = 1.)

    All NaN when no token is selected. Filters and ``use_commit_loads`` as in :func:`expert_load`.
    """
    who = "load_imbalance"
    code = C.check_filters(modality, by_modality, who)
    counts, ntok, E, k = _load_counts(ds, code, by_modality, n_experts, who, use_commit_loads)
    f = C.safe_div(counts, (k * ntok)[:, None, None])
    m = imbalance_from_shares(f, E)
    coords = dict(C.layer_coords(ds))
    dims = ("moe_layer",)
    if by_modality:
        coords.update(C.modality_coords())
        coords["n_tokens"] = ("modality", ntok)
        dims = ("modality", "moe_layer")
        data = {n: (dims, v) for n, v in m.items()}
    else:
        data = {n: (dims, v[0]) for n, v in m.items()}
    out = xr.Dataset(data, coords=coords)
    out["cv"].attrs["definition"] = "std(f)/mean(f), population std (ddof=0) over experts"
    out["max_over_mean"].attrs["definition"] = "E * max_i f_i"
    out["maxvio"].attrs["definition"] = (
        "(max_i load_i - mean load)/mean load (MaxVio, arXiv:2408.15664) = E*max f - 1"
    )
    out["load_entropy"].attrs["definition"] = "-sum_i f_i log f_i / log E"
    out.attrs.update({"k": k, "n_experts": E, "modality_filter": C.modality_attr(code)})
    if not by_modality:
        out.attrs["n_tokens"] = int(ntok[0])
    return out
