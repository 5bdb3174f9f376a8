"""Expert ablation: what changes when the router may not choose some experts."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from workbench.hooks.interventions import block_experts, moe_layers

from ._common import as_index

__all__ = ["expert_ablation"]


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from t over real (unpadded) pairs, float64."""
    lp = F.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return nll[valid].mean()


@torch.no_grad()
def expert_ablation(model, inputs: Mapping[str, torch.Tensor], layer: int, experts: Iterable[int]) -> xr.Dataset:
    """Mask each expert in ``experts`` at decoder layer ``layer`` (a MoE layer: its router logit -> -inf,
    so top-k picks among the remaining experts) and report, per expert, against the unablated model:

    - ``delta_loss`` = L_ablated - L_base, L the mean next-token cross-entropy (nats) over real
      token pairs of ``inputs`` (input_ids (B,T), attention_mask (B,T), pixel_values optional);
    - ``kl`` = mean over real tokens of KL(p_base || p_ablated) of the next-token distributions;
    - ``top1_agreement`` = fraction of real tokens whose argmax prediction is unchanged;
    - ``rerouted`` = fraction of real tokens that had the expert in their top-k set at ``layer``
      (those whose routing the ablation changes).
    Returns an xarray.Dataset with dim ``expert``; ``attrs['baseline_loss']``. The ablation is an
    edit on the router's hook point (:func:`workbench.hooks.interventions.block_experts`), so
    recorders attached to the model keep recording (the rerouted decisions).
    Raises TypeError when ``layer`` is not an integer, ValueError (naming the MoE layers) when decoder
    layer ``layer`` is not a MoE layer of the model, or for an expert out of range.
    """
    moes = moe_layers(model)
    value = as_index(layer)
    if value is None:
        raise TypeError(f"expert_ablation: layer must be a decoder layer index (int), got {layer!r}")
    layer = value
    if layer not in moes:
        raise ValueError(f"expert_ablation: layer {layer} is not a MoE layer; MoE layers: {list(moes)}")
    moe = moes[layer]
    E = moe.num_experts
    experts = [int(e) for e in experts]
    bad = [e for e in experts if not 0 <= e < E]
    if bad:
        raise ValueError(f"expert_ablation: experts {bad} out of range [0, {E})")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    fwd = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    chosen = []
    with moe.hook_router.add(lambda point, topk_ids, **_: chosen.append(topk_ids)):
        base = model(**fwd).logits
    valid = mask.reshape(-1).bool()
    topk = chosen[0][valid]
    base_lp = F.log_softmax(base.double(), -1)
    base_loss = _next_token_loss(base, ids, mask)
    real = mask.bool()
    out = {k: [] for k in ("delta_loss", "kl", "top1_agreement", "rerouted")}
    for e in experts:
        with block_experts(model, {layer: [e]}):
            logits = model(**fwd).logits
        lp = F.log_softmax(logits.double(), -1)
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1)[real].mean()
        out["delta_loss"].append(float(_next_token_loss(logits, ids, mask) - base_loss))
        out["kl"].append(float(kl))
        out["top1_agreement"].append(float((logits.argmax(-1) == base.argmax(-1))[real].float().mean()))
        out["rerouted"].append(float((topk == e).any(-1).float().mean()))
    ds = xr.Dataset({k: ("expert", np.array(v)) for k, v in out.items()}, coords={"expert": experts})
    ds.attrs.update(layer=layer, baseline_loss=float(base_loss), n_tokens=int(real.sum()),
                    method="router logit of the ablated expert set to -inf before top-k")
    return ds
