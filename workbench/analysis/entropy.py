"""Router entropy."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C

_MAX_ELEMENTS = 1 << 22  # elements per vectorised step (bounds temporaries to ~16 MB)

PROB_LOGITS = "softmax(logits)"
PROB_SCORES = "applied top-k scores normalized to sum 1"


def _entropy_logits(x: np.ndarray, n_experts: int) -> np.ndarray:
    """Normalized entropy of softmax(x) over the last axis; float32 result in [0, 1].

    Works on (experts, rows) float32 copies of at most ``_MAX_ELEMENTS`` elements so every
    reduction runs across contiguous rows (numpy reduces a short last axis slowly)."""
    E = x.shape[-1]
    out = np.empty(x.shape[:-1], dtype=np.float32)
    flat_x = x.reshape(-1, E)
    flat_o = out.reshape(-1)
    step = max(1, _MAX_ELEMENTS // max(E, 1))
    denom = np.log(n_experts) if n_experts > 1 else np.inf
    for s in range(0, flat_x.shape[0], step):
        z = flat_x[s:s + step].T.astype(np.float32, order="C")  # (E, n)
        z -= z.max(axis=0)
        ez = np.exp(z)
        tot = ez.sum(axis=0)
        if np.isfinite(z).all():
            ez *= z
        else:  # -inf logits: 0 * -inf -> 0
            ez = np.where(ez > 0, ez * np.where(np.isfinite(z), z, 0.0), 0.0)
        h = np.log(tot) - ez.sum(axis=0) / tot  # H = log sum e^z - sum p z
        flat_o[s:s + step] = np.clip(h / denom, 0.0, 1.0)
    return out


def _entropy_scores(w: np.ndarray, n_experts: int) -> np.ndarray:
    """Normalized entropy of the top-k scores renormalized to sum 1 (last axis)."""
    w = w.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = w / w.sum(axis=-1, keepdims=True)
        h = C.entropy(p)
    denom = np.log(n_experts) if n_experts > 1 else np.inf
    return np.clip(h / denom, 0.0, 1.0).astype(np.float32)


def router_entropy(ds: xr.Dataset, *, source: str = "auto", modality=None, by_modality: bool = False,
                   per_token: bool = True, n_experts: int | None = None) -> xr.Dataset:
    """Router entropy per token and its mean per MoE layer.

    For token t at a layer, with a probability vector p_t over experts,

        H_t = -sum_i p_{t,i} log p_{t,i} / log E        (0 log 0 = 0; in [0, 1])

    The probabilities (recorded in ``attrs['probabilities']``):

    - ``"softmax(logits)"``: p_t = softmax(router_logits_t) over all E experts — used when the
      trace records ``router_logits`` (``source="auto"`` or ``"logits"``). For softmax routers
      (Mixtral, Qwen-MoE, OLMoE, gpt-oss) it is the distribution the model applies; Llama 4 and
      DeepSeek-V3 score experts with a sigmoid, so there it is the router's implied distribution.
      The trace's ``routing`` attribute says which: ``attrs['routing_score']`` and
      ``attrs['probabilities_are']`` carry it into the result.
    - ``"applied top-k scores normalized to sum 1"``: p_t = w_t / sum_k w_t over the k chosen experts
      (``topk_weight``, the score the model applies) — used without logits or with
      ``source="scores"``. Still divided by log E, so it is at most log k / log E.
      With k = 1 and no logits this is a point mass: entropy is undefined and a ValueError is raised.

    Returns a Dataset with ``entropy`` (token, moe_layer), float32, for the selected tokens
    (coordinate ``token_index`` = row in the trace; lazy/dask when the trace is dask-backed;
    omitted with ``per_token=False``), and ``mean_entropy`` (moe_layer) — the mean of H_t over
    selected tokens, NaN if none — or (modality, moe_layer) with ``by_modality=True``.
    Values are clipped to [0, 1] to remove float rounding. E = 1 gives 0.
    """
    who = "router_entropy"
    code = C.check_filters(modality, by_modality, who)
    C.require(ds, "topk_expert", who=who)
    E = C.get_n_experts(ds, n_experts, who)
    var, func, prob = _probability_source(ds, source, E, who)
    if by_modality or code is not None:
        C.require(ds, "modality", who=who)
    lazy = ds[var].chunks is not None
    sums, ntok, eager = _stream_entropy(ds, var, func, E, code, by_modality, keep=per_token and not lazy)
    mean = C.safe_div(sums, ntok[:, None])
    if not per_token:
        per_tok = None
    elif lazy:
        per_tok = _lazy_entropy(ds, var, func, E, code)
    else:
        per_tok = eager
    return _entropy_dataset(ds, mean, ntok, per_tok, prob=prob, code=code, by_modality=by_modality, E=E)


def _probability_source(ds: xr.Dataset, source: str, E: int, who: str):
    """``(variable, per-block entropy function, attrs['probabilities'])`` of the probabilities
    chosen by ``source`` (see :func:`router_entropy`); clear errors when the trace lacks them."""
    has_logits = "router_logits" in ds.variables
    if source not in ("auto", "logits", "scores"):
        raise ValueError(f"{who}: source must be 'auto', 'logits' or 'scores', got {source!r}")
    if source == "logits" and not has_logits:
        raise KeyError(f"{who}: source='logits' but the trace has no 'router_logits' variable")
    if has_logits and source != "scores":
        C.require(ds, "router_logits", who=who)
        if ds["router_logits"].sizes["expert"] != E:
            raise ValueError(
                f"{who}: router_logits has {ds['router_logits'].sizes['expert']} experts but n_experts={E}"
            )
        return "router_logits", _entropy_logits, PROB_LOGITS
    if ds.sizes["k"] == 1 and has_logits:  # source="scores"
        raise ValueError(
            f"{who}: entropy of the scores is undefined with top-k = 1 (the single chosen expert's applied "
            "score is a point mass); use source='logits' (the trace records router_logits)"
        )
    if ds.sizes["k"] == 1:
        raise ValueError(
            f"{who}: entropy is undefined for this trace: it has no router_logits and top-k = 1, so "
            "the only recorded probability is the single chosen expert's applied score (a point "
            "mass). Record router logits (the capture 'logits': capture=('router', 'logits')) to get "
            "a distribution over experts."
        )
    C.require(ds, "topk_weight", who=who)
    return "topk_weight", _entropy_scores, PROB_SCORES


def _stream_entropy(ds: xr.Dataset, var: str, func, E: int, code: int | None, by_modality: bool, keep: bool):
    """One pass over token blocks: per-layer sums of H_t and token counts per group (the modalities
    with ``by_modality``, else one group of the selected tokens), and with ``keep`` the per-token
    values ``(entropy (n, L) float32, token rows)`` of the selected tokens (None otherwise)."""
    L = ds.sizes["moe_layer"]
    names = [var] + (["modality"] if by_modality or code is not None else [])
    groups = len(C.MODALITY_NAMES) if by_modality else 1
    sums = np.zeros((groups, L), dtype=np.float64)
    ntok = np.zeros(groups, dtype=np.int64)
    pieces, rows = [], []
    for sl, blk in C.iter_blocks(ds, names):
        h = func(blk[var], E)
        if by_modality:
            mod = blk["modality"]
            for m in range(groups):
                sel = mod == m
                sums[m] += h[sel].sum(axis=0, dtype=np.float64)
                ntok[m] += int(sel.sum())
            idx = np.arange(sl.start, sl.stop)
        else:
            if code is not None:
                sel = blk["modality"] == code
                h = h[sel]
                idx = sl.start + np.flatnonzero(sel)
            else:
                idx = np.arange(sl.start, sl.stop)
            sums[0] += h.sum(axis=0, dtype=np.float64)
            ntok[0] += h.shape[0]
        if keep:
            pieces.append(h)
            rows.append(idx)
    if not keep:
        return sums, ntok, None
    vals = np.concatenate(pieces) if pieces else np.zeros((0, L), dtype=np.float32)
    sel_idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return sums, ntok, (vals, sel_idx)


def _lazy_entropy(ds: xr.Dataset, var: str, func, E: int, code: int | None):
    """Per-token entropy of a dask-backed trace as a lazy (token, moe_layer) array over the selected
    tokens, and their rows."""
    core = "expert" if var == "router_logits" else "k"
    src = ds[var].transpose("token", "moe_layer", core)
    if code is not None:
        sel_idx = np.flatnonzero(C.load_column(ds, "modality") == code)
        src = src.isel(token=sel_idx)
    else:
        sel_idx = np.arange(ds.sizes["token"])
    ent = xr.apply_ufunc(func, src.variable, input_core_dims=[[core]], dask="parallelized",
                         output_dtypes=[np.float32], kwargs={"n_experts": E})
    return ent.data, sel_idx


def _entropy_dataset(ds: xr.Dataset, mean: np.ndarray, ntok: np.ndarray, per_tok, *, prob: str,
                     code: int | None, by_modality: bool, E: int) -> xr.Dataset:
    """The result Dataset of :func:`router_entropy`: ``mean`` (groups, L) means, ``ntok`` token counts
    per group, ``per_tok`` ``(entropy (n, L), token rows)`` or None, with definitions in attrs."""
    data = {}
    coords = dict(C.layer_coords(ds))
    if per_tok is not None:
        vals, sel_idx = per_tok
        data["entropy"] = (("token", "moe_layer"), vals)
        coords["token_index"] = ("token", sel_idx)
    if by_modality:
        coords.update(C.modality_coords())
        coords["n_tokens"] = ("modality", ntok)
        data["mean_entropy"] = (("modality", "moe_layer"), mean)
    else:
        data["mean_entropy"] = (("moe_layer",), mean[0])
    out = xr.Dataset(data, coords=coords)
    definition = "H_t = -sum_i p_ti log p_ti / log E"
    if per_tok is not None:
        out["entropy"].attrs.update({"definition": definition, "probabilities": prob})
    out["mean_entropy"].attrs.update({"definition": "mean over selected tokens of " + definition,
                                      "probabilities": prob})
    out.attrs.update({"probabilities": prob, "normalizer": "log(E)", "n_experts": E, "k": ds.sizes["k"],
                      "modality_filter": C.modality_attr(code)})
    if not by_modality:
        out.attrs["n_tokens"] = int(ntok[0])
    if prob == PROB_SCORES:
        out.attrs["note"] = "scores cover only the k chosen experts: values are at most log k / log E"
    out.attrs.update(routing_attrs(ds, prob))
    return out


def routing_attrs(ds: xr.Dataset, prob: str) -> dict:
    """What the entropy's probabilities are for the recorded model: ``routing_score`` (from the trace's
    ``routing`` attribute) and, for ``prob`` = softmax(logits), ``probabilities_are`` (the router's own
    distribution for a softmax router, a convention for a sigmoid one); empty when the trace does not say.
    Every result that reports a router entropy carries these attrs."""
    score = _routing_score(ds)
    if score is None:
        return {}
    out = {"routing_score": score}
    if prob == PROB_LOGITS:
        out["probabilities_are"] = (
            "the router's own distribution (the model applies a softmax over the logits)" if score == "softmax"
            else f"a convention: the model scores experts with a {score}, not a softmax over all experts, so "
                 "softmax(logits) is the router's implied distribution, not one it applies")
    return out


def _routing_score(ds: xr.Dataset) -> str | None:
    """How the recorded model turns router logits into weights ("softmax", "sigmoid"), from the trace's
    ``routing`` attribute (the same for every MoE layer), or None when the trace does not say."""
    layers = ((ds.attrs.get("routing") or {}).get("layers")) or []
    scores = {str(x.get("score")) for x in layers if isinstance(x, dict) and x.get("score")}
    return scores.pop() if len(scores) == 1 else None
