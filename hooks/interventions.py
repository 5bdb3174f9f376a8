"""Interventions on the router: edit listeners on the MoE layers' hook points.

An intervention is an edit listener like any other (:mod:`workbench.hooks.points`): it composes
with recorders and captures on the same model (they observe the edited decision, so the trace of
an intervened run shows the rerouting), and it is undone by removing its handles.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from workbench.hooks.points import Handles

__all__ = ["moe_layers", "block_experts"]


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> MoE block (the module that owns ``hook_router``) of a workbench model."""
    out = {}
    for module in model.modules():
        if hasattr(module, "hook_router") and hasattr(module, "layer_idx"):
            out[int(module.layer_idx)] = module
    if not out:
        raise ValueError(f"{type(model).__name__} has no MoE layers with router hook points (a workbench model)")
    return dict(sorted(out.items()))


def block_experts(model: nn.Module, blocked: Mapping[int, Iterable[int]]) -> Handles:
    """Forbid the router of each decoder layer in ``blocked`` to choose the given experts.

    ``blocked``: {decoder layer index: expert indices}. The experts' router logits become -inf
    before top-k (an edit on ``hook_router_logits``), so top-k picks among the others and their
    sigmoid scores are applied as usual. Returns the handles (a context manager).
    Raises ValueError for a layer that is not a MoE layer or an expert out of range.
    """
    layers = moe_layers(model)
    handles = Handles()
    try:
        for layer, experts in blocked.items():
            moe = layers.get(int(layer))
            if moe is None:
                raise ValueError(f"layer {layer} is not a MoE layer; MoE layers: {list(layers)}")
            experts = [int(e) for e in experts]
            bad = [e for e in experts if not 0 <= e < moe.num_experts]
            if bad:
                raise ValueError(f"experts {bad} out of range [0, {moe.num_experts}) at layer {layer}")
            mask = torch.zeros(moe.num_experts, dtype=torch.bool)
            mask[experts] = True
            handles.append(moe.hook_router_logits.add(_masker(mask), edit=True))
    except BaseException:
        handles.remove()
        raise
    return handles


def _masker(mask: torch.Tensor):
    on_device: dict = {}

    def edit(point, router_logits):
        m = on_device.get(router_logits.device)
        if m is None:  # moved to the logits' device once, not at every pass
            m = on_device[router_logits.device] = mask.to(router_logits.device)
        return {"router_logits": router_logits.masked_fill(m, float("-inf"))}

    return edit
