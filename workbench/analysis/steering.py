"""Steering (SteerMoE-style) and causal vs observational expert importance.

* :func:`risk_difference` (stored traces, out of core): per MoE layer and expert, the activation
  rate in a behaviour set minus that in a baseline set,
  RD_{l,i} = P(i in S_t^l | t in behaviour) - P(i in S_t^l | t in baseline), S_t^l the token's top-k
  set; :func:`top_experts` lists the largest |RD| (or signed) as (layer, expert) pairs.
* :func:`steering_effect` (a model run): what interventions (:func:`workbench.hooks.interventions.intervene`
  keyword sets: ``block``, ``force``, ``scale``, ``where``) do to the model's predictions on a batch:
  next-token loss on a target continuation, top-1 agreement and KL(base || steered).
* :func:`expert_importance` (a model run): per (layer, expert) the OBSERVATIONAL load share and mean
  contribution norm next to the CAUSAL loss increase when the expert is blocked, with their
  Spearman rank correlations (the export's ``importance`` table and figure).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from . import _common as C

__all__ = ["risk_difference", "top_experts", "steering_effect", "expert_importance", "spearman"]


def _activation_counts(ds: xr.Dataset, E: int, code, who: str) -> tuple[np.ndarray, int]:
    C.require(ds, "topk_expert", who=who)
    L = int(ds.sizes["moe_layer"])
    counts = np.zeros((L, E), np.int64)
    n = 0
    names = ["topk_expert"] + (["modality"] if code is not None else [])
    for sl, blk in C.iter_blocks(ds, names):
        e = C.check_experts(blk["topk_expert"], E, sl.start, who)
        if code is not None:
            e = e[blk["modality"] == code]
        n += len(e)
        for li in range(L):
            counts[li] += np.bincount(e[:, li].ravel(), minlength=E)
    return counts, n


def risk_difference(behaviour: xr.Dataset, baseline: xr.Dataset, *, modality=None,
                    n_experts: int | None = None) -> xr.Dataset:
    """Per (moe_layer, expert): ``p_behaviour`` and ``p_baseline``, the fraction of tokens whose top-k set
    holds the expert (token-level activation rate), and ``risk_difference`` = p_behaviour - p_baseline.
    The two traces must have the same number of experts (``n_experts``, when given, overrides both) and
    the same MoE layers; a ValueError naming both otherwise. attrs ``n_behaviour``, ``n_baseline``."""
    who = "risk_difference"
    code = C.resolve_modality(modality, who)
    E = C.get_n_experts(behaviour, n_experts, who)
    Eb = C.get_n_experts(baseline, n_experts, who)
    if E != Eb:  # expert i of one model is not expert i of the other: refuse before counting
        raise ValueError(f"{who}: the traces have different expert counts: {E} vs {Eb} (behaviour vs baseline)")
    la, lb = (np.asarray(d["layer"].values).tolist() for d in (behaviour, baseline))
    if la != lb:
        raise ValueError(f"{who}: the traces have different MoE layers ({la} vs {lb})")
    ca, na = _activation_counts(behaviour, E, code, who)
    cb, nb = _activation_counts(baseline, E, code, who)
    pa, pb = C.safe_div(ca, na), C.safe_div(cb, nb)
    out = xr.Dataset({"p_behaviour": (("moe_layer", "expert"), pa), "p_baseline": (("moe_layer", "expert"), pb),
                      "risk_difference": (("moe_layer", "expert"), pa - pb)},
                     coords={"layer": ("moe_layer", np.asarray(la)), "expert": np.arange(E)})
    out.attrs.update(n_behaviour=int(na), n_baseline=int(nb), modality_filter=C.modality_attr(code),
                     definition="RD = P(expert in top-k | behaviour token) - P(expert in top-k | baseline token)")
    return out


def top_experts(rd: xr.Dataset, n: int = 5, *, sign: str = "abs") -> list[tuple[int, int]]:
    """The ``n`` (decoder layer, expert) pairs with the largest risk difference: ``sign="abs"`` by
    |RD|, ``"positive"`` the most behaviour-specific, ``"negative"`` the most baseline-specific.
    Ties: smaller layer, then expert, first."""
    v = np.asarray(rd["risk_difference"].values, np.float64)
    key = {"abs": np.abs(v), "positive": v, "negative": -v}.get(sign)
    if key is None:
        raise ValueError(f"top_experts: sign must be 'abs', 'positive' or 'negative', got {sign!r}")
    key = np.where(np.isnan(key), -np.inf, key)
    order = np.lexsort((np.arange(v.size), -key.ravel()))[:int(n)]
    layers = np.asarray(rd["layer"].values)
    E = v.shape[1]
    return [(int(layers[i // E]), int(i % E)) for i in order]


def _forward_inputs(inputs: Mapping[str, torch.Tensor]) -> dict:
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def _metrics(base: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, pairs: torch.Tensor, real: torch.Tensor):
    """loss over the target pairs (predicting token t+1 at t where ``pairs[:, t]``), KL(base || new) and
    top-1 agreement over real tokens."""
    lp = F.log_softmax(logits.double(), -1)
    blp = F.log_softmax(base.double(), -1)
    nll = -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = nll[pairs].mean() if pairs.any() else torch.tensor(float("nan"))
    kl = (blp.exp() * (blp - lp)).sum(-1)[real].mean()
    agree = (logits.argmax(-1) == base.argmax(-1))[real].double().mean()
    return float(loss), float(kl), float(agree)


@torch.no_grad()
def steering_effect(model, inputs: Mapping[str, torch.Tensor], interventions: Mapping[str, Mapping[str, Any]], *,
                    target_mask: torch.Tensor | None = None) -> xr.Dataset:
    """Run ``inputs`` once plainly and once per named intervention (keyword sets of
    :func:`~workbench.hooks.interventions.intervene`, e.g. ``{"block 3:[5]": {"block": {3: [5]}}}``);
    per intervention: ``loss`` (mean next-token cross-entropy in nats over the target pairs: token t+1
    predicted at t where ``target_mask[:, t + 1]`` (B, T) is set, e.g. the continuation that shows the
    behaviour; default every real pair), ``delta_loss`` = loss - the plain loss, ``kl`` = mean over
    real tokens of KL(p_plain || p_steered) of the next-token distributions, ``top1_agreement`` =
    fraction of real tokens whose argmax prediction is unchanged. Dim ``intervention``; attrs
    ``baseline_loss``."""
    from workbench.hooks.interventions import intervene

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = (torch.ones_like(ids) if mask is None else mask).bool()
    pairs = real[:, 1:] & real[:, :-1]
    if target_mask is not None:
        if tuple(target_mask.shape) != tuple(ids.shape):
            raise ValueError(f"steering_effect: target_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                             f"{tuple(target_mask.shape)}")
        pairs = pairs & target_mask.bool()[:, 1:]
    fwd = _forward_inputs(inputs)
    base = model(**fwd).logits
    base_loss, _, _ = _metrics(base, base, ids, pairs, real)
    out = {k: [] for k in ("loss", "delta_loss", "kl", "top1_agreement")}
    names = list(interventions)
    for name in names:
        with intervene(model, **interventions[name]):
            logits = model(**fwd).logits
        loss, kl, agree = _metrics(base, logits, ids, pairs, real)
        out["loss"].append(loss)
        out["delta_loss"].append(loss - base_loss)
        out["kl"].append(kl)
        out["top1_agreement"].append(agree)
    ds = xr.Dataset({k: ("intervention", np.array(v, np.float64)) for k, v in out.items()},
                    coords={"intervention": np.array(names, dtype=object)})
    ds.attrs.update(baseline_loss=base_loss, n_tokens=int(real.sum()), n_target_pairs=int(pairs.sum()))
    return ds


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties) over the pairs where both are finite; NaN
    with fewer than 3 such pairs or a constant side."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    r = np.empty(v.size, np.float64)
    r[order] = np.arange(v.size, dtype=np.float64)
    uniq, inv = np.unique(v, return_inverse=True)
    sums = np.bincount(inv, weights=r)
    return (sums / np.bincount(inv))[inv]


@torch.no_grad()
def expert_importance(model, inputs: Mapping[str, torch.Tensor], *, layers: Iterable[int] | None = None,
                      experts: Iterable[int] | None = None) -> xr.Dataset:
    """Causal vs observational importance of every (MoE layer, expert) on one batch.

    Observational (one plain run, real tokens only): ``load_share`` f_i = (1/kT) sum_t 1[i in S_t];
    ``mean_norm`` = mean over the (token, slot) assignments to the expert of ||SwiGLU_i(w x)||_2 (its
    contribution as added; NaN when never chosen); ``contribution`` = f_i x mean_norm (its share
    of the routed output mass). Causal (one run per expert, the expert blocked at that layer:
    router logit -inf before top-k, :func:`~workbench.hooks.interventions.intervene`): ``delta_loss``
    = next-token loss (nats, real pairs) blocked - plain, ``kl`` = mean KL(p_plain || p_blocked).
    Spearman rank correlations between each observational metric and ``delta_loss``, per layer
    (``rho_load``, ``rho_norm``, ``rho_contribution``; dim moe_layer) and over all (layer, expert) pairs
    (attrs). ``layers``: decoder indices (default every MoE layer); ``experts``: default all.
    """
    from workbench.hooks.interventions import intervene, moe_layers

    moes = moe_layers(model)
    if layers is None:
        layers = list(moes)
    layers = [int(x) for x in ([layers] if C.as_index(layers) is not None else layers)]
    bad = [x for x in layers if x not in moes]
    if bad:
        raise ValueError(f"expert_importance: layers {bad} are not MoE layers; MoE layers: {list(moes)}")
    E = next(iter(moes.values())).num_experts
    experts = list(range(E)) if experts is None else [int(e) for e in experts]
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = (torch.ones_like(ids) if mask is None else mask).bool()
    pairs = real[:, 1:] & real[:, :-1]
    keep = real.reshape(-1)
    fwd = _forward_inputs(inputs)
    seen: dict[int, tuple] = {}
    handles = [moes[lay].hook_experts.add(lambda p, topk_ids, expert_out, lay=lay, **_: seen.__setitem__(
        lay, (topk_ids[keep], expert_out[keep].float().norm(dim=-1)))) for lay in layers]
    try:
        base = model(**fwd).logits
    finally:
        for h in handles:
            h.remove()
    base_loss, _, _ = _metrics(base, base, ids, pairs, real)
    L, X = len(layers), len(experts)
    load = np.zeros((L, X))
    norm = np.full((L, X), np.nan)
    dloss = np.zeros((L, X))
    kl = np.zeros((L, X))
    for li, layer in enumerate(layers):
        tid, nrm = seen[layer]
        tid, nrm = tid.cpu().numpy(), nrm.cpu().numpy()
        for xi, e in enumerate(experts):
            hit = tid == e
            load[li, xi] = hit.sum() / max(tid.size, 1)
            if hit.any():
                norm[li, xi] = nrm[hit].mean()
            with intervene(model, block={layer: [e]}):
                logits = model(**fwd).logits
            loss, k_, _ = _metrics(base, logits, ids, pairs, real)
            dloss[li, xi], kl[li, xi] = loss - base_loss, k_
    contribution = load * np.nan_to_num(norm)
    dims = ("moe_layer", "expert")
    ds = xr.Dataset({"load_share": (dims, load), "mean_norm": (dims, norm), "contribution": (dims, contribution),
                     "delta_loss": (dims, dloss), "kl": (dims, kl)},
                    coords={"layer": ("moe_layer", np.array(layers)), "expert": np.array(experts)})
    for name, key in (("rho_load", "load_share"), ("rho_norm", "mean_norm"), ("rho_contribution", "contribution")):
        ds[name] = ("moe_layer", np.array([spearman(ds[key].values[i], dloss[i]) for i in range(L)]))
        ds.attrs[name] = spearman(ds[key].values, dloss)
    ds.attrs.update(baseline_loss=base_loss, n_tokens=int(real.sum()),
                    definition="observational: load share, mean ||contribution||; causal: loss increase when blocked "
                               "(router logit -inf); rho: Spearman rank correlation with delta_loss")
    return ds
