"""Routing over consecutive tokens (repetition) and across layers (transitions)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C


def _top1_names(ds, k):
    return ["topk_expert"] + (["topk_weight"] if k > 1 else [])


def next_token_rows(ds: xr.Dataset, who: str) -> np.ndarray:
    """For each row t, the row of the next token of the same sequence in position order
    (tokens sorted by ``position`` within each ``sequence``), or -1 for a sequence's last token.
    Loads the 1-D ``sequence`` and ``position`` columns whole (8 bytes per token)."""
    C.require(ds, "sequence", "position", who=who)
    seq = C.load_column(ds, "sequence").astype(np.int64)
    pos = C.load_column(ds, "position").astype(np.int64)
    n = seq.shape[0]
    nxt = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return nxt
    if np.all((seq[1:] > seq[:-1]) | ((seq[1:] == seq[:-1]) & (pos[1:] > pos[:-1]))):
        order = np.arange(n)  # already sorted (the usual layout): skip the sort
    else:
        order = np.lexsort((pos, seq))
    so, po = seq[order], pos[order]
    same = so[1:] == so[:-1]
    dup = same & (po[1:] == po[:-1])
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(
            f"{who}: sequence {int(so[i])} has two tokens at position {int(po[i])} "
            f"(rows {int(order[i])} and {int(order[i + 1])}); consecutive tokens are ambiguous"
        )
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def repetition_rate(ds: xr.Dataset, *, modality=None, n_experts: int | None = None) -> xr.Dataset:
    """Routing repetition between consecutive tokens, per MoE layer.

    Pairs: (t, t') with t' the next token after t in the same sequence, tokens ordered by
    ``position`` within each ``sequence`` (pairs never cross sequences; a single-token sequence
    has none). With a modality filter a pair counts when BOTH tokens have that modality (they
    stay adjacent in the full sequence). P = number of pairs.

    - ``same_top1_rate`` = (1/P) sum_pairs 1[top1_t = top1_t'], top1 = the expert of the slot
      with the largest ``topk_weight`` (first slot on ties).
    - ``same_top1_baseline`` = sum_i g_i^2, g_i the share of selected tokens whose top-1 expert
      is i (for k = 1, g = the load share f): the rate expected if the two top-1 experts were
      independent draws from the layer's top-1 distribution.
    - ``overlap`` = (1/P) sum_pairs |S_t ∩ S_t'| / k.
    - ``overlap_baseline`` = k sum_i f_i^2, f the load share (:func:`expert_load`): if S_t and
      S_t' are independent draws of top-k sets with P(i in S) = k f_i, then
      E|S ∩ S'| = sum_i P(i in S) P(i in S') = sum_i (k f_i)^2, divided by k.
      (For k = 1 both baselines are sum_i f_i^2.)

    f and g are over all selected tokens (not only those in pairs). Rates NaN when P = 0,
    baselines NaN when no token is selected. ``n_pairs`` (scalar) = P.
    Out of core: the 1-D sequence/position columns are loaded to order tokens; top-k blocks are
    streamed, a pair whose tokens are in the current or previous block is read from memory,
    others (traces not stored in sequence order) are gathered per block.
    """
    who = "repetition_rate"
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    k = ds.sizes["k"]
    if k > 1:
        C.require(ds, "topk_weight", who=who)
    nxt = next_token_rows(ds, who)
    ok = None
    if code is not None:
        C.require(ds, "modality", who=who)
        ok = C.load_column(ds, "modality") == code
    src, dst, hi = _consecutive_pairs(nxt, ok)
    n = _repetition_counts(ds, E, k, ok, src, dst, hi, who)
    return _repetition_dataset(ds, n, E, k, int(src.shape[0]), code)


def _consecutive_pairs(nxt: np.ndarray, ok: np.ndarray | None):
    """Rows ``(src, dst)`` of the consecutive-token pairs (``dst`` the next token of ``src``; both
    selected by ``ok`` when given) and ``hi = max(src, dst)``, sorted by ``hi``: a pair can be
    compared once the block holding its later row has been read."""
    src = np.flatnonzero(nxt >= 0)
    dst = nxt[src]
    if ok is not None:
        keep = ok[src] & ok[dst]
        src, dst = src[keep], dst[keep]
    hi = np.maximum(src, dst)
    o = np.argsort(hi, kind="stable")
    return src[o], dst[o], hi[o]


def _repetition_counts(ds: xr.Dataset, E: int, k: int, ok, src, dst, hi, who: str) -> dict[str, np.ndarray]:
    """One pass over top-k blocks. Per MoE layer: ``counts`` (L*E) top-k slots per expert and
    ``top1_counts`` (L*E) top-1 per expert over the selected tokens, ``ntok`` selected tokens,
    ``same`` pairs with the same top-1, ``inter`` summed |S_t ∩ S_t'| over pairs."""
    L = ds.sizes["moe_layer"]
    names = _top1_names(ds, k)
    counts = np.zeros(L * E, dtype=np.int64)
    top1_counts = np.zeros(L * E, dtype=np.int64)
    ntok = 0
    same = np.zeros(L, dtype=np.int64)
    inter = np.zeros(L, dtype=np.int64)
    base = (np.arange(L, dtype=np.int64) * E)
    prev = None
    for sl, blk in C.iter_blocks(ds, names):
        e64 = C.check_experts(blk["topk_expert"], E, sl.start, who)
        e = blk["topk_expert"]  # the stored (small) int dtype: cheaper to gather and compare
        t1 = C.top1(e, blk.get("topk_weight"))
        cur_data = {"e": e, "t1": t1}
        es = e64 if ok is None else e64[ok[sl]]
        counts += np.bincount((es + base[None, :, None]).ravel(), minlength=L * E)
        if k > 1:
            ts = t1 if ok is None else t1[ok[sl]]
            top1_counts += np.bincount((ts.astype(np.int64) + base[None, :]).ravel(), minlength=L * E)
        ntok += es.shape[0]
        a, b = np.searchsorted(hi, [sl.start, sl.stop])
        if b > a:
            cur = (sl, cur_data)
            ps = _read_pairs(ds, names, src[a:b], cur, prev)
            pd = _read_pairs(ds, names, dst[a:b], cur, prev)
            same += (ps["t1"] == pd["t1"]).sum(axis=0)
            if k > 1:
                for x in range(k):
                    for y in range(k):
                        inter += (ps["e"][..., x] == pd["e"][..., y]).sum(axis=0)
        prev = (sl, cur_data)
    if k == 1:  # the set is the top-1 expert
        top1_counts, inter = counts, same
    return {"counts": counts, "top1_counts": top1_counts, "ntok": ntok, "same": same, "inter": inter}


def _repetition_dataset(ds: xr.Dataset, n: dict, E: int, k: int, n_pairs: int, code: int | None) -> xr.Dataset:
    """The result Dataset of :func:`repetition_rate` from the counts of :func:`_repetition_counts`."""
    L, ntok = ds.sizes["moe_layer"], n["ntok"]
    f = C.safe_div(n["counts"].reshape(L, E), k * ntok)
    g = C.safe_div(n["top1_counts"].reshape(L, E), ntok)
    out = xr.Dataset(
        {
            "same_top1_rate": (("moe_layer",), C.safe_div(n["same"], n_pairs)),
            "same_top1_baseline": (("moe_layer",), (g ** 2).sum(axis=1)),
            "overlap": (("moe_layer",), C.safe_div(n["inter"], k * n_pairs)),
            "overlap_baseline": (("moe_layer",), k * (f ** 2).sum(axis=1)),
            "n_pairs": ((), n_pairs),
        },
        coords=C.layer_coords(ds),
    )
    out["same_top1_rate"].attrs["definition"] = "(1/P) sum_pairs 1[top1_t == top1_t+1]"
    out["same_top1_baseline"].attrs["definition"] = "sum_i g_i^2, g = top-1 share (independent draws)"
    out["overlap"].attrs["definition"] = "(1/P) sum_pairs |S_t ∩ S_t+1| / k"
    out["overlap_baseline"].attrs["definition"] = "k sum_i f_i^2 = sum_i (k f_i)^2 / k (independent draws)"
    out.attrs.update({"k": k, "n_experts": E, "modality_filter": C.modality_attr(code), "n_tokens": int(ntok)})
    return out


def _read_pairs(ds, names, rows, cur, prev):
    """Expert sets ``e`` (n, L, k) and top-1 ``t1`` (n, L) at global ``rows``: taken from the
    current block, else the previous block, else gathered from the store (traces not stored in
    sequence order); every row here lies at or before the current block."""
    cs, cdat = cur
    n = cs.stop - cs.start
    idx = rows - cs.start
    in_cur = (idx >= 0) & (idx < n)
    out = {key: np.take(arr, np.clip(idx, 0, n - 1), axis=0) for key, arr in cdat.items()}
    if in_cur.all():
        return out
    rest = np.flatnonzero(~in_cur)
    r = rows[rest]
    if prev is not None:
        ps, pdat = prev
        m = (r >= ps.start) & (r < ps.stop)
        if m.any():
            for key in out:
                out[key][rest[m]] = pdat[key][r[m] - ps.start]
        rest, r = rest[~m], r[~m]
    if rest.size:
        u = np.unique(r)
        sub = ds[list(names)].isel(token=u).load()
        # these rows lie in earlier blocks, already validated when they were streamed
        ge = np.asarray(sub["topk_expert"].transpose("token", "moe_layer", "k").values)
        gw = (np.asarray(sub["topk_weight"].transpose("token", "moe_layer", "k").values)
              if "topk_weight" in names else None)
        j = np.searchsorted(u, r)
        out["e"][rest] = ge[j]
        out["t1"][rest] = C.top1(ge, gw)[j]
    return out


def layer_transitions(ds: xr.Dataset, a: int, b: int, *, counts: bool = False, modality=None,
                      n_experts: int | None = None) -> xr.DataArray:
    """Cross-layer transition matrix of top-1 experts, dims ``(expert_a, expert_b)``.

    ``a`` and ``b`` are decoder layer indices (values of the ``layer`` coordinate); one that is not
    a MoE layer of the trace raises a ValueError. Over the selected tokens, with
    n_ij = #{t : top1_t(a) = i and top1_t(b) = j},

        P_ij = P(top-1 at layer b = j | top-1 at layer a = i) = n_ij / sum_j n_ij

    Rows sum to 1; rows of experts never top-1 at layer a are NaN. top-1 = the slot with the
    largest ``topk_weight`` (first slot on ties). ``counts=True`` returns n_ij (int). Coordinate
    ``n_a`` (dim expert_a) = row totals.
    """
    who = "layer_transitions"
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    ia = C.layer_position(ds, a, who)
    ib = C.layer_position(ds, b, who)
    k = ds.sizes["k"]
    names = _top1_names(ds, k)
    if k > 1:
        C.require(ds, "topk_weight", who=who)
    if code is not None:
        C.require(ds, "modality", who=who)
        names = names + ["modality"]
    sub = ds.isel(moe_layer=[ia, ib])
    n = np.zeros(E * E, dtype=np.int64)
    for sl, blk in C.iter_blocks(sub, names):
        e = C.check_experts(blk["topk_expert"], E, sl.start, who)
        t1 = C.top1(e, blk.get("topk_weight"))
        if code is not None:
            t1 = t1[blk["modality"] == code]
        n += np.bincount(t1[:, 0] * E + t1[:, 1], minlength=E * E)
    n = n.reshape(E, E)
    rows = n.sum(axis=1)
    coords = {"expert_a": np.arange(E), "expert_b": np.arange(E), "n_a": ("expert_a", rows),
              "layer_a": int(a), "layer_b": int(b)}
    attrs = {"k": k, "n_experts": E, "modality_filter": C.modality_attr(code), "n_tokens": int(rows.sum())}
    if counts:
        attrs["definition"] = "n_ij = #{t : top1_t(a) = i and top1_t(b) = j}"
        return xr.DataArray(n, dims=("expert_a", "expert_b"), coords=coords, name="transition_count", attrs=attrs)
    attrs["definition"] = "P_ij = n_ij / sum_j n_ij = P(top1 at b = j | top1 at a = i); NaN rows if unused"
    return xr.DataArray(C.safe_div(n, rows[:, None]), dims=("expert_a", "expert_b"), coords=coords,
                        name="transition", attrs=attrs)
