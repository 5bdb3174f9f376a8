"""Expert co-activation within a token's top-k set."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C


CONVENTIONS = ("pinned", "olmoe")


def coactivation(ds: xr.Dataset, layer: int, *, counts: bool = False, modality=None,
                 n_experts: int | None = None, convention: str = "pinned") -> xr.DataArray:
    """Co-activation matrix of one MoE layer, dims ``(expert, expert_j)``.

    ``layer`` is a decoder layer index (a value of the ``layer`` coordinate); one that is not a MoE
    layer of the trace raises a ValueError (:func:`~workbench.analysis._common.layer_position`).
    Over the selected tokens t with top-k set S_t,

        N_i  = #{t : i in S_t}
        N_ij = #{t : i in S_t and j in S_t},  i != j

    counting ALL ordered pairs of distinct experts of each set, both directions (so N_ij = N_ji;
    a top-k set adds k(k-1) ordered pairs). Returns C_ij = N_ij / N_i = P(j in S_t | i in S_t),
    NaN on rows with N_i = 0 and NaN on the diagonal (i = j is not a pair). With ``counts=True``
    returns the integer matrix N_ij instead (diagonal 0). Coordinate ``n_i`` (dim expert) holds N_i.
    With k = 1 there are no pairs: C is 0 off the diagonal on used rows.

    ``convention="olmoe"`` reproduces OLMoE's analysis script (``run_moe_analysis.py``,
    ``do_correlation_analysis``): only NEIGHBOURING pairs of each token's ranked top-k list count,
    (S_t[a], S_t[a+1]) for a = 0 .. k-2, both directions (a list adds 2(k-1) ordered pairs), so
    N_ij = #{t, a : {S_t[a], S_t[a+1]} = {i, j}} and C_ij = N_ij / N_i as above. The list is ranked by
    applied weight (``topk_weight``), descending, ties in slot order (:func:`~._common.rank_by_weight`),
    so S_t[0] is the top-1 expert of every other analysis. For softmax routers (OLMoE, Mixtral, Qwen)
    this is the stored slot order and OLMoE's (its script ranks by logit); DeepSeek-V3 stores slots by
    its selection score s + b, which can differ from the weight order. For k <= 2 both conventions
    agree. The convention is in ``attrs``.
    """
    who = "coactivation"
    if convention not in CONVENTIONS:
        raise ValueError(f"{who}: convention must be one of {CONVENTIONS}, got {convention!r}")
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    li = C.layer_position(ds, layer, who)
    k = ds.sizes["k"]
    sub = ds.isel(moe_layer=[li])
    ranked = convention == "olmoe" and k > 1
    names = ["topk_expert"] + (["topk_weight"] if ranked else []) + (["modality"] if code is not None else [])
    if ranked:
        C.require(ds, "topk_weight", who=who)
    if code is not None:
        C.require(ds, "modality", who=who)
    nij = np.zeros(E * E, dtype=np.int64)
    ni = np.zeros(E, dtype=np.int64)
    for sl, blk in C.iter_blocks(sub, names):
        e = C.check_experts(blk["topk_expert"], E, sl.start, who)[:, 0, :]  # (n, k)
        if ranked:
            e = C.rank_by_weight(e, blk["topk_weight"][:, 0, :])
        if code is not None:
            e = e[blk["modality"] == code]
        ni += np.bincount(e.ravel(), minlength=E)
        if convention == "olmoe":
            for a in range(k - 1):
                nij += np.bincount(e[:, a] * E + e[:, a + 1], minlength=E * E)
                nij += np.bincount(e[:, a + 1] * E + e[:, a], minlength=E * E)
            continue
        for a in range(k):
            for b in range(k):
                if a != b:
                    nij += np.bincount(e[:, a] * E + e[:, b], minlength=E * E)
    nij = nij.reshape(E, E)
    coords = {"expert": np.arange(E), "expert_j": np.arange(E), "n_i": ("expert", ni),
              "layer": int(ds["layer"].values[li])}
    attrs = {"k": k, "n_experts": E, "modality_filter": C.modality_attr(code),
             "n_tokens": int(ni.sum() // k) if k else 0, "convention": convention}
    pairs = ("neighbours {S_t[a], S_t[a+1]} = {i, j} of the list ranked by applied weight (topk_weight), descending "
             "(OLMoE)" if convention == "olmoe"
             else "i in S_t and j in S_t")
    if counts:
        over = "t, a" if convention == "olmoe" else "t"
        attrs["definition"] = f"N_ij = #{{{over} : {pairs}}}, i != j (diagonal 0)"
        return xr.DataArray(nij, dims=("expert", "expert_j"), coords=coords, name="coactivation_count", attrs=attrs)
    cond = C.safe_div(nij, ni[:, None])
    np.fill_diagonal(cond, np.nan)
    attrs["definition"] = ("C_ij = N_ij / N_i = P(j in S_t | i in S_t), i != j; NaN if N_i = 0 or i = j"
                           if convention == "pinned" else
                           f"C_ij = N_ij / N_i, N_ij = #{{t, a : {pairs}}}, N_i = #{{t : i in S_t}}; NaN if N_i = 0 "
                           f"or i = j")
    return xr.DataArray(cond, dims=("expert", "expert_j"), coords=coords, name="coactivation", attrs=attrs)
