"""Interventions on the router: edit listeners on the MoE layers' hook points (:func:`block_experts`,
:func:`intervene`: block, force and scale experts at chosen tokens).

An intervention is an edit listener like any other (:mod:`workbench.hooks.points`): it composes
with recorders and captures on the same model (they observe the edited decision, so the trace of
an intervened run shows the rerouting), and it is undone by removing its handles.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from workbench.hooks.points import Handles

__all__ = ["moe_layers", "block_experts", "intervene", "Intervention", "FORCE_WEIGHT_RULES"]


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> MoE block (the module that owns ``hook_router``) of a workbench model."""
    out = {}
    for module in model.modules():
        if hasattr(module, "hook_router") and hasattr(module, "layer_idx"):
            out[int(module.layer_idx)] = module
    if not out:
        raise ValueError(f"{type(model).__name__} has no MoE layers with editable router hook points: "
                         "interventions, steering_effect and expert_importance need a workbench Llama 4 model "
                         "(wb.load_model); on transformers models the adapters only observe the routers")
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


# ----------------------------------------------------------------------------------------------
# wb.intervene: block, force and scale experts, at chosen tokens
# ----------------------------------------------------------------------------------------------
FORCE_WEIGHT_RULES = ("router", "top1")


class Intervention(Handles):
    """Edits on a workbench model's router hook points, undone together (``remove()`` or leaving the
    ``with`` block). Made by :func:`intervene`; ``spec`` holds what it does, normalized."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self._where_mask: torch.Tensor | None = None  # (N,) bool of the current pass, None = every token

    def __repr__(self) -> str:
        return f"Intervention({self.spec}, {'active' if self else 'removed'})"


def intervene(model: nn.Module, *, block: Mapping[int, Iterable[int]] | None = None,
              force: Mapping[int, Any] | None = None, scale: Mapping[tuple[int, int], float] | None = None,
              where=None) -> Intervention:
    """Change the routing of a workbench model while the returned object is active (a context manager).

    Keys are decoder layer indices of MoE layers, experts are routed expert indices:

    * ``block={layer: [experts]}``: the experts' router logits become -inf before top-k (an edit of
      ``hook_router_logits``), so top-k picks among the others with their usual sigmoid weights;
      with ``where=None`` this is :func:`block_experts`.
    * ``force={layer: expert}`` or ``{layer: (expert, weight)}``: the expert takes the top-1 slot of
      every selected token (an edit of ``hook_router``'s ids and weights). The applied-weight rule:
      ``weight`` a number -> that weight; ``"router"`` (the default) -> sigmoid(the expert's own
      router logit), the weight the router would have applied had it chosen the expert; ``"top1"``
      -> the weight the router gave its own top-1 choice. With k > 1 the other slots hold the
      router's top-(k-1) among the remaining experts, with their sigmoid weights. Llama 4 applies
      the weight to the expert's INPUT: the contribution is SwiGLU_e(weight * x).
    * ``scale={(layer, expert): factor}``: the applied weight of that expert, where chosen (or
      forced), is multiplied by ``factor`` (after forcing); with Llama 4 this scales the expert's
      input, SwiGLU_e(factor * w * x), not its output.
    * ``where``: the tokens the edits apply to: None (all), a (B, T) bool tensor (a pass of T
      tokens, or a longer one of which each prefill block takes its columns), or a callable
      ``fn(input_ids, batch) -> (B, T) bool`` called at the start of every pass (``batch``: the
      :class:`~workbench.runtime.ForwardBatch`, e.g. ``lambda ids, b: b.positions >= 5``).

    Recorders and captures attached to the model observe the edited decision (edits run before
    observers), so the trace of an intervened run shows the rerouting. Nothing synchronizes with
    the device. Raises ValueError for a layer that is not a MoE layer, an expert out of range, an
    expert both blocked and forced at a layer, or a bad weight rule.
    """
    layers = moe_layers(model)
    blocked = _normalize_block(layers, block or {})
    forced = _normalize_force(layers, force or {})
    scaled = _normalize_scale(layers, scale or {})
    for layer, (e, _) in forced.items():
        if e in blocked.get(layer, ()):
            raise ValueError(f"expert {e} is both blocked and forced at layer {layer}")
    spec = {"block": blocked, "force": forced, "scale": scaled, "where": where}
    iv = Intervention(spec)
    if where is not None and not (callable(where) or isinstance(where, torch.Tensor)):
        raise ValueError(f"where must be None, a (B, T) bool tensor or a callable (input_ids, batch) -> (B, T) bool, "
                         f"got {type(where).__name__}")
    try:
        if where is not None:
            from workbench.hooks.points import hook_points

            points = [p for _, p in hook_points(model, "hook_inputs")]
            if len(points) != 1:
                raise ValueError(f"where= needs the model's hook_inputs point; found {len(points)}")
            iv.append(points[0].add(_where_listener(iv, where)))
        for layer, experts in blocked.items():
            mask = torch.zeros(layers[layer].num_experts, dtype=torch.bool)
            mask[experts] = True
            iv.append(layers[layer].hook_router_logits.add(_masker(mask, iv), edit=True))
        for layer in sorted(set(forced) | {lay for lay, _ in scaled}):
            f = forced.get(layer)
            s = {e: v for (lay, e), v in scaled.items() if lay == layer}
            iv.append(layers[layer].hook_router.add(_router_edit(f, s, iv), edit=True))
    except BaseException:
        iv.remove()
        raise
    return iv


def _check_layer(layers: dict, layer) -> nn.Module:
    moe = layers.get(int(layer)) if not isinstance(layer, bool) else None
    if moe is None:
        raise ValueError(f"layer {layer} is not a MoE layer; MoE layers: {list(layers)}")
    return moe


def _check_expert(moe: nn.Module, layer: int, e) -> int:
    if isinstance(e, bool) or not 0 <= int(e) < moe.num_experts:
        raise ValueError(f"expert {e} out of range [0, {moe.num_experts}) at layer {layer}")
    return int(e)


def _normalize_block(layers, block) -> dict[int, list[int]]:
    out = {}
    for layer, experts in block.items():
        moe = _check_layer(layers, layer)
        experts = [experts] if isinstance(experts, int) else list(experts)
        out[int(layer)] = sorted({_check_expert(moe, layer, e) for e in experts})
    return out


def _normalize_force(layers, force) -> dict[int, tuple[int, Any]]:
    out = {}
    for layer, value in force.items():
        moe = _check_layer(layers, layer)
        e, w = (value, "router") if not isinstance(value, (tuple, list)) else tuple(value)
        if isinstance(w, str):
            if w not in FORCE_WEIGHT_RULES:
                raise ValueError(f"force weight at layer {layer} must be a number or one of {FORCE_WEIGHT_RULES}, "
                                 f"got {w!r}")
        else:
            w = float(w)
        out[int(layer)] = (_check_expert(moe, layer, e), w)
    return out


def _normalize_scale(layers, scale) -> dict[tuple[int, int], float]:
    out = {}
    for key, factor in scale.items():
        try:
            layer, e = key
        except (TypeError, ValueError):
            raise ValueError(f"scale keys are (layer, expert) pairs, got {key!r}") from None
        moe = _check_layer(layers, layer)
        out[(int(layer), _check_expert(moe, layer, e))] = float(factor)
    return out


def _where_listener(iv: Intervention, where):
    def on_inputs(point, input_ids, batch):
        B, T = batch.shape
        if callable(where):
            m = where(input_ids, batch)
        else:
            m = where
            if m.dim() == 2 and m.shape[0] == B and m.shape[1] >= batch.start + T and m.shape[1] != T:
                m = m[:, batch.start:batch.start + T]  # a prefill block of a longer pass
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (B, T):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"intervene: where must give a ({B}, {T}) bool mask for this pass, got {got}")
        iv._where_mask = m.to(batch.positions.device, non_blocking=True).bool().reshape(-1)
    return on_inputs


def _masker(mask: torch.Tensor, iv: Intervention | None = None):
    on_device: dict = {}

    def edit(point, router_logits):
        m = on_device.get(router_logits.device)
        if m is None:  # moved to the logits' device once, not at every pass
            m = on_device[router_logits.device] = mask.to(router_logits.device)
        sel = iv._where_mask if iv is not None else None
        if sel is not None:
            m = sel[:, None] & m
        return {"router_logits": router_logits.masked_fill(m, float("-inf"))}

    return edit


def _router_edit(forced: tuple[int, Any] | None, scaled: dict[int, float], iv: Intervention):
    def edit(point, router_logits, topk_ids, topk_weights):
        ids, w = topk_ids, topk_weights
        if forced is not None:
            e, rule = forced
            N, k = ids.shape
            first = torch.full_like(ids[:, :1], e)
            if rule == "router":
                w0 = torch.sigmoid(router_logits[:, e:e + 1].float()).to(w.dtype)
            elif rule == "top1":
                w0 = w.gather(1, w.float().argmax(1, keepdim=True))
            else:
                w0 = torch.full_like(w[:, :1], rule)
            if k > 1:
                others = router_logits.clone()
                others[:, e] = float("-inf")
                vals, rest = torch.topk(others, k - 1, dim=-1)
                new_ids = torch.cat([first, rest], 1)
                new_w = torch.cat([w0, torch.sigmoid(vals.float()).to(w.dtype)], 1)
            else:
                new_ids, new_w = first, w0
            ids, w = _select(iv, new_ids, ids), _select(iv, new_w, w)
        for e, factor in scaled.items():
            hit = ids == e
            sel = iv._where_mask
            if sel is not None:
                hit = hit & sel[:, None]
            w = torch.where(hit, (w.float() * factor).to(w.dtype), w)
        return {"topk_ids": ids, "topk_weights": w}

    return edit


def _select(iv: Intervention, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    sel = iv._where_mask
    return new if sel is None else torch.where(sel[:, None], new, old)

