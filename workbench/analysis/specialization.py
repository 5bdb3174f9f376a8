"""Vocabulary and domain specialization of experts."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C
from .transitions import next_token_rows

#: refuse results with more cells than this (token ids x layers x experts)
MAX_CELLS = 1 << 30


def _grouped_counts(ds, group, n_groups, E, who, top1=False):
    """counts[g, l, i] = #{t : group[t] = g, i in S_t^l}, streaming top-k blocks; group -1 = skip.
    ``top1=True``: only each token's top-1 expert (:func:`~._common.top1`, largest ``topk_weight``) counts."""
    L = ds.sizes["moe_layer"]
    cells = n_groups * L * E
    if cells > MAX_CELLS:
        raise MemoryError(
            f"{who}: the result would have {n_groups} groups x {L} layers x {E} experts = {cells} cells "
            f"(limit {MAX_CELLS}); raise min_count or analyse fewer layers (ds.isel(moe_layer=...))"
        )
    counts = np.zeros(cells, dtype=np.int64)
    base = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    weighted = top1 and ds.sizes["k"] > 1
    if weighted:
        C.require(ds, "topk_weight", who=who)
    for sl, blk in C.iter_blocks(ds, ["topk_expert"] + (["topk_weight"] if weighted else [])):
        e = C.check_experts(blk["topk_expert"], E, sl.start, who)
        if top1:
            e = C.top1(e, blk.get("topk_weight"))[..., None]
        g = group[sl]
        sel = g >= 0
        if not sel.any():
            continue
        flat = (g[sel].astype(np.int64) * (L * E))[:, None, None] + base + e[sel]
        counts += np.bincount(flat.ravel(), minlength=cells)
    return counts.reshape(n_groups, L, E)


def _kl_rows(p, f):
    """KL(p || f) over the last axis, 0 log 0 = 0 (p: (..., L, E), f: (L, E))."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(f > 0, f, 1.0)), 0.0)
    return t.sum(axis=-1)


CONVENTIONS = ("pinned", "olmoe")


def vocab_specialization(ds: xr.Dataset, *, target: str = "input", min_count: int | None = None, modality=None,
                         n_experts: int | None = None, convention: str = "pinned") -> xr.Dataset:
    """Expert share per token id and a per-layer vocabulary-specialization score.

    Token t is keyed by v(t) = its own ``token_id`` (``target="input"``) or the ``token_id`` of the
    next token of its sequence (``target="next"``; a sequence's last token is left out). Only ids
    occurring at least ``min_count`` times among the selected tokens are kept (n_v = count).

    - ``share`` (token_id, moe_layer, expert): p(i | v) = (1/(k n_v)) sum_{t: v(t)=v} 1[i in S_t];
      the ``token_id`` dim lists only the kept ids (sorted), so the result is as large as the ids
      that occur, not the vocabulary.
    - ``load`` (moe_layer, expert): f_i = sum_v (n_v/N) p(i|v), the load share over the kept tokens,
      N = sum_v n_v.
    - ``score`` (moe_layer) = sum_v (n_v/N) KL(p(.|v) || f), in nats: the frequency-weighted KL of
      each id's expert distribution from the layer's load share, 0 when routing does not depend on
      the token id. It equals the mutual information I(V; X) between the token id and the expert
      X of a uniformly chosen top-k slot (for k = 1, the top-1 expert).
    - ``score_normalized`` = score / H(f), in [0, 1] (Theil's uncertainty coefficient: the fraction
      of the expert entropy explained by the token id; NaN when H(f) = 0).

    Small n_v inflate the score (a rare id looks specialized); ``min_count`` (default 5) guards
    against this. Loads the 1-D ``token_id`` (and for "next" ``sequence``/``position``) columns
    whole, streams top-k blocks; memory ~ 16 bytes x kept ids x layers x experts.

    ``convention="olmoe"`` reproduces OLMoE's token analysis (``run_moe_analysis.py``,
    ``do_token_analysis``): only each token's TOP-1 expert counts, top1_t = the first of its top-k list
    ranked by applied weight (``topk_weight``), descending (first slot on ties; the top-1 of every
    other analysis, :func:`~._common.top1`; for softmax routers such as OLMoE's, slot 0; DeepSeek-V3
    stores slots by its selection score s + b instead, so there it can differ from slot 0). For each
    kept id v, ``top_expert`` (token_id, moe_layer) = its most frequent top-1 expert (ties: the lowest
    index; OLMoE's script takes the one seen first, the share is the same) and ``top_share`` = the share
    of v's occurrences routed to it, max_i #{t: v(t)=v, top1_t=i} / n_v; ``score`` (moe_layer) =
    the UNWEIGHTED mean of ``top_share`` over the kept ids. ``min_count`` defaults to 10 there
    (OLMoE lists ids seen >= 10 times; its printed "Average probability" averages every id:
    ``min_count=1``). Every output names its convention in ``attrs``.
    """
    who = "vocab_specialization"
    if convention not in CONVENTIONS:
        raise ValueError(f"{who}: convention must be one of {CONVENTIONS}, got {convention!r}")
    if min_count is None:
        min_count = 10 if convention == "olmoe" else 5
    code = C.resolve_modality(modality, who)
    if target not in ("input", "next"):
        raise ValueError(f"{who}: target must be 'input' or 'next', got {target!r}")
    if int(min_count) < 1:
        raise ValueError(f"{who}: min_count must be >= 1, got {min_count!r}")
    C.require(ds, "topk_expert", "token_id", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    L, k = ds.sizes["moe_layer"], ds.sizes["k"]
    tid = C.load_column(ds, "token_id").astype(np.int64)
    valid = np.ones(tid.shape[0], dtype=bool)
    if target == "next":
        nxt = next_token_rows(ds, who)
        valid = nxt >= 0
        key = np.where(valid, tid[np.maximum(nxt, 0)], -1)
    else:
        key = tid
    if code is not None:
        C.require(ds, "modality", who=who)
        valid &= C.load_column(ds, "modality") == code
    ids, inv, cnt = np.unique(key[valid], return_inverse=True, return_counts=True)
    kept = cnt >= int(min_count)
    remap = np.full(ids.shape[0], -1, dtype=np.int64)
    remap[kept] = np.arange(int(kept.sum()))
    group = np.full(tid.shape[0], -1, dtype=np.int64)
    group[valid] = remap[inv.ravel()]
    ids, n_v = ids[kept], cnt[kept]
    U = ids.shape[0]
    if convention == "olmoe":
        return _olmoe_vocab(ds, group, ids, n_v, E, who, dict(k=k, n_experts=E, target=target, min_count=int(min_count),
                                                               n_tokens=int(n_v.sum()),
                                                               modality_filter=C.modality_attr(code)))
    counts = _grouped_counts(ds, group, U, E, who)
    del group
    share = counts / (k * n_v)[:, None, None].astype(np.float64) if U else np.zeros((0, L, E))
    N = int(n_v.sum())
    f = C.safe_div(counts.sum(axis=0), k * N)
    del counts
    w = (n_v / N) if N else np.zeros(0)
    score = np.einsum("v,vl->l", w, _kl_rows(share, f)) if U else np.full(L, np.nan)
    hf = C.entropy(f)
    with np.errstate(invalid="ignore", divide="ignore"):
        score_norm = np.where(hf > 0, score / np.where(hf > 0, hf, 1.0), np.nan)
    coords = {"token_id": ids, "expert": np.arange(E), "count": ("token_id", n_v), **C.layer_coords(ds)}
    out = xr.Dataset(
        {
            "share": (("token_id", "moe_layer", "expert"), share),
            "load": (("moe_layer", "expert"), f),
            "score": (("moe_layer",), score),
            "score_normalized": (("moe_layer",), score_norm),
        },
        coords=coords,
    )
    out["share"].attrs["definition"] = "p(i|v) = (1/(k n_v)) sum_{t: v(t)=v} 1[i in S_t]"
    out["load"].attrs["definition"] = "f_i = sum_v (n_v/N) p(i|v) over kept ids"
    out["score"].attrs["definition"] = "sum_v (n_v/N) KL(p(.|v) || f) [nats] = I(token id; expert)"
    out["score_normalized"].attrs["definition"] = "score / H(f) (uncertainty coefficient)"
    out.attrs.update({"k": k, "n_experts": E, "target": target, "min_count": int(min_count),
                      "n_tokens": N, "modality_filter": C.modality_attr(code), "convention": "pinned"})
    return out


def _olmoe_vocab(ds, group, ids, n_v, E, who, attrs) -> xr.Dataset:
    """The ``olmoe`` convention of :func:`vocab_specialization` (top-1 share of each id's most frequent expert)."""
    L = ds.sizes["moe_layer"]
    U = ids.shape[0]
    counts = _grouped_counts(ds, group, U, E, who, top1=True)  # (U, L, E): top-1 experts only
    top_expert = counts.argmax(axis=-1) if U else np.zeros((0, L), np.int64)
    top_share = counts.max(axis=-1) / n_v[:, None].astype(np.float64) if U else np.zeros((0, L))
    score = top_share.mean(axis=0) if U else np.full(L, np.nan)
    out = xr.Dataset(
        {
            "top_expert": (("token_id", "moe_layer"), top_expert.astype(np.int64)),
            "top_share": (("token_id", "moe_layer"), top_share),
            "score": (("moe_layer",), score),
        },
        coords={"token_id": ids, "count": ("token_id", n_v), **C.layer_coords(ds)},
    )
    out["top_expert"].attrs["definition"] = ("argmax_i #{t: v(t)=v, top1_t=i} (ties: lowest index); top1_t = first of "
                                             "the top-k list ranked by applied weight (topk_weight), descending")
    out["top_share"].attrs["definition"] = "max_i #{t: v(t)=v, top1_t=i} / n_v"
    out["score"].attrs["definition"] = "unweighted mean of top_share over the kept ids (OLMoE's token analysis)"
    out.attrs.update({**attrs, "convention": "olmoe"})
    return out


def domain_specialization(ds: xr.Dataset, labels, *, modality=None, n_experts: int | None = None) -> xr.Dataset:
    """Expert share per domain label and a per-layer domain-specialization score.

    ``labels`` maps sequence id -> label: a dict (or anything with ``.items()``; sequences absent
    from it are left out, their token count in ``attrs['n_unlabeled_tokens']``) or a 1-D array
    indexed by sequence id (must cover every sequence id of the trace). Labels are sorted when
    sortable.

    - ``share`` (label, moe_layer, expert): p_l(i) = (1/(k n_l)) sum_{t in label l} 1[i in S_t]
      (n_l = ``count``; NaN for a label without selected tokens).
    - ``jsd`` (moe_layer): the generalized Jensen-Shannon divergence with EQUAL weights over the
      m labels having tokens: JSD = H((1/m) sum_l p_l) - (1/m) sum_l H(p_l), in nats
      (0 = identical routing in every domain; at most log m).
    - ``jsd_normalized`` = JSD / log m, in [0, 1] (1 = disjoint experts per domain; NaN if m < 2).
    """
    who = "domain_specialization"
    code = C.resolve_modality(modality, who)
    C.require(ds, "topk_expert", "sequence", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    L, k = ds.sizes["moe_layer"], ds.sizes["k"]
    seq = C.load_column(ds, "sequence").astype(np.int64)
    seq_ids, seq_inv = np.unique(seq, return_inverse=True)
    values, idx = C.labels_to_index(labels, seq_ids, who)
    group = idx[seq_inv.ravel()]
    if code is not None:
        C.require(ds, "modality", who=who)
        group = np.where(C.load_column(ds, "modality") == code, group, -1)
        n_unlab = int(((idx[seq_inv.ravel()] < 0) & (C.load_column(ds, "modality") == code)).sum())
    else:
        n_unlab = int((group < 0).sum())
    G = len(values)
    counts = _grouped_counts(ds, group, G, E, who)
    n_l = np.bincount(group[group >= 0], minlength=G).astype(np.int64)
    share = C.safe_div(counts, (k * n_l)[:, None, None])
    used = n_l > 0
    m = int(used.sum())
    if m:
        pu = share[used]
        jsd = C.entropy(pu.mean(axis=0)) - C.entropy(pu).mean(axis=0)
        jsd = np.maximum(jsd, 0.0)
    else:
        jsd = np.full(L, np.nan)
    jsd_norm = jsd / np.log(m) if m >= 2 else np.full(L, np.nan)
    out = xr.Dataset(
        {
            "share": (("label", "moe_layer", "expert"), share),
            "jsd": (("moe_layer",), jsd),
            "jsd_normalized": (("moe_layer",), jsd_norm),
        },
        coords={"label": _label_array(values), "count": ("label", n_l), "expert": np.arange(E), **C.layer_coords(ds)},
    )
    out["share"].attrs["definition"] = "p_l(i) = (1/(k n_l)) sum_{t in l} 1[i in S_t]"
    out["jsd"].attrs["definition"] = "H(mean_l p_l) - mean_l H(p_l) over labels with tokens, equal weights [nats]"
    out["jsd_normalized"].attrs["definition"] = "jsd / log(m), m = labels with tokens"
    out.attrs.update({"k": k, "n_experts": E, "n_labels_used": m, "n_unlabeled_tokens": n_unlab,
                      "modality_filter": C.modality_attr(code)})
    return out


def _label_array(values):
    if values and len({type(v) for v in values}) == 1:
        return np.array(values)
    return np.array(values, dtype=object)
