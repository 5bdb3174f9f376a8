"""Adapters: how each model family's module tree reports its inputs and router decisions.

An :class:`Adapter` gives recorders and captures the same two kinds of hook point whatever the
model:

* ``inputs``: fired once per forward pass, before the first layer, with ``input_ids`` (B, T) long
  and ``batch`` (a :class:`~workbench.runtime.ForwardBatch`: positions, validity);
* ``routers[i]``, one per MoE layer in decoder order: ``router_logits`` (N, E) as top-k saw them,
  ``topk_ids`` (N, k) int64 and ``topk_weights`` (N, k) the weights as the model applies them
  (N = B*T flattened tokens);

and a :class:`RoutingSpec`: each MoE layer's routing rule, the image token, the special tokens.
Adapters are registered by (framework, model type) (:func:`register_adapter`) and looked up by
:func:`adapter_for`; supporting another family means one new adapter class.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.hooks.points import HookPoint, hook_points
from workbench.runtime import ForwardBatch
from workbench.trace.schema import LLAMA4_RULE, MoELayerRouting

__all__ = ["RoutingSpec", "Adapter", "WorkbenchLlama4Adapter", "TransformersLlama4Adapter", "register_adapter",
           "adapter_for", "ADAPTERS", "AdapterError"]


class AdapterError(RuntimeError):
    """No adapter knows the model, or the model's tree is not what its adapter expects."""


@dataclass
class RoutingSpec:
    """What a recording needs to know about a model: its routing, per MoE layer, and its tokens."""

    layers: list[MoELayerRouting]
    image_token_id: int | None = None
    special_ids: set[int] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    model_type: str = ""
    rule: str = ""

    @property
    def moe_layers(self) -> list[int]:
        """Decoder index of each MoE layer."""
        return [r.layer for r in self.layers]

    @property
    def n_experts(self) -> int:
        return max(r.n_experts for r in self.layers)

    @property
    def top_k(self) -> int:
        return max(r.top_k for r in self.layers)


class Adapter:
    """Connects one model tree to recorders and captures (see the module docstring).

    Subclasses set ``frameworks_and_types`` (registry keys) and implement :meth:`spec`, and either
    return the model's own hook points or install forward hooks that fire their own.
    ``close()`` removes whatever the adapter installed in the model.
    """

    frameworks_and_types: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def spec(self) -> RoutingSpec:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def inputs(self) -> HookPoint:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def routers(self) -> list[HookPoint]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Remove what the adapter installed in the model (nothing for models with hook points)."""


ADAPTERS: dict[tuple[str, str], type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of each of its (framework, model type) keys."""
    for key in cls.frameworks_and_types:
        ADAPTERS[key] = cls
    return cls


def model_key(model: nn.Module) -> tuple[str, str]:
    """(framework, model type) of a model: ("workbench", family) for workbench's own models,
    ("transformers", config.model_type) for transformers models."""
    module = type(model).__module__
    if module.startswith("workbench.models."):
        return "workbench", module.split(".")[2]
    if module.startswith("transformers."):
        return "transformers", str(getattr(getattr(model, "config", None), "model_type", ""))
    return module.split(".")[0], ""


def adapter_for(model: nn.Module) -> Adapter:
    """The registered adapter for ``model`` (AdapterError naming the class and what is supported)."""
    key = model_key(model)
    cls = ADAPTERS.get(key)
    if cls is None:
        known = ", ".join(f"{f} {t}" for f, t in sorted(ADAPTERS))
        raise AdapterError(f"no routing adapter knows {type(model).__name__} ({key[0]} model type {key[1]!r}); "
                           f"supported: {known}")
    return cls(model)


def _special(eos, *ids) -> set[int]:
    out = {int(i) for i in ids if i is not None}
    return out | {int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])}


@register_adapter
class WorkbenchLlama4Adapter(Adapter):
    """workbench's own Llama 4: its ``hook_inputs`` and each MoE block's ``hook_router`` points."""

    frameworks_and_types = (("workbench", "llama4"),)

    def spec(self) -> RoutingSpec:
        from workbench.models.llama4.config import ModelConfig

        cfg = self.model.config
        if not isinstance(cfg, ModelConfig):  # text-only model: its config is the TextConfig
            cfg = ModelConfig(text=cfg, vision=None, architecture="Llama4ForCausalLM")
        t = cfg.text
        special = _special(t.eos_token_id, t.bos_token_id, t.pad_token_id)
        if cfg.is_multimodal:
            special |= {cfg.boi_token_index, cfg.eoi_token_index}
        layers = [MoELayerRouting(i, t.num_local_experts, t.num_experts_per_tok) for i in t.moe_layers]
        return RoutingSpec(layers=layers, image_token_id=cfg.image_token_index if cfg.is_multimodal else None,
                           special_ids=special, config=cfg.to_hf_dict(), model_type="workbench llama4",
                           rule=LLAMA4_RULE)

    @property
    def inputs(self) -> HookPoint:
        points = [p for _, p in hook_points(self.model, "hook_inputs")]
        if len(points) != 1:
            raise AdapterError(f"expected one hook_inputs point in the model, found {len(points)}")
        return points[0]

    @property
    def routers(self) -> list[HookPoint]:
        return [p for _, p in hook_points(self.model, "hook_router")]


@register_adapter
class TransformersLlama4Adapter(Adapter):
    """transformers' ``Llama4ForCausalLM`` / ``Llama4ForConditionalGeneration`` (forward hooks).

    ``inputs`` fires from a pre-hook on the top module, with the call's ``input_ids`` and a
    :class:`~workbench.runtime.ForwardBatch` built from its ``attention_mask`` and, in
    ``generate``'s decode steps, the cache length (:func:`_hf_batch`), so decode steps continue
    their sequences at the right positions. Each
    ``Llama4Router``'s (scores, logits) output fires ``routers[i]``; top-k ids are recomputed from
    the logits exactly as the router does (``torch.topk``), the applied weights as sigmoid of the
    chosen logits.
    """

    frameworks_and_types = (("transformers", "llama4"), ("transformers", "llama4_text"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._inputs = HookPoint()
        self._routers: list[HookPoint] = []
        self._handles: list = []

    def _text_config(self):
        c = self.model.config
        return getattr(c, "text_config", c)

    def spec(self) -> RoutingSpec:
        t = self._text_config()
        c = self.model.config
        image_id = getattr(c, "image_token_index", None) if hasattr(c, "text_config") else None
        layers = [MoELayerRouting(int(i), t.num_local_experts, t.num_experts_per_tok) for i in t.moe_layers]
        return RoutingSpec(layers=layers, image_token_id=image_id,
                           special_ids=_special(t.eos_token_id, t.bos_token_id, t.pad_token_id),
                           config=json.loads(c.to_json_string(use_diff=False)),
                           model_type=f"transformers {c.model_type}", rule=LLAMA4_RULE)

    @property
    def inputs(self) -> HookPoint:
        self._install()
        return self._inputs

    @property
    def routers(self) -> list[HookPoint]:
        self._install()
        return self._routers

    def _install(self) -> None:
        if self._handles:
            return
        k = self._text_config().num_experts_per_tok
        point = self._inputs

        def pre(module, args, kwargs):
            if point.active:
                ids = kwargs.get("input_ids", args[0] if args else None)
                shape = tuple(ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2])
                device = (ids if ids is not None else kwargs["inputs_embeds"]).device
                point(input_ids=ids, batch=_hf_batch(shape, device, kwargs.get("attention_mask"),
                                                      kwargs.get("cache_position")))

        self._handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        from transformers.models.llama4.modeling_llama4 import Llama4Router

        routers = [m for m in self.model.modules() if isinstance(m, Llama4Router)]
        for r in routers:
            p = HookPoint()
            self._routers.append(p)

            def hook(module, args, out, p=p):
                if p.active:
                    logits = out[1]
                    vals, ids = torch.topk(logits, k, dim=-1)
                    p(router_logits=logits, topk_ids=ids, topk_weights=torch.sigmoid(vals.float()).to(logits.dtype))
            self._handles.append(r.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._routers = []



def _hf_batch(shape: tuple[int, int], device, attention_mask, cache_position) -> ForwardBatch:
    """The ForwardBatch of a transformers call. In ``generate`` a call after the first continues
    its rows from a cache: its ``attention_mask`` covers past + new tokens (B, S + T) and
    ``cache_position`` starts at S. The call's tokens then start at stream index S, and positions
    count on from the valid past tokens (those of the mask's first S columns)."""
    T = shape[1]
    past = 0
    if attention_mask is not None and attention_mask.shape[-1] > T:
        past = attention_mask.shape[-1] - T  # host-side: no sync
    elif cache_position is not None and cache_position.numel():
        past = int(cache_position.reshape(-1)[0])  # a call without a mask: one small sync
    if past == 0:
        return ForwardBatch.build(shape, device, attention_mask)
    past_valid = None
    if attention_mask is not None:
        past_valid = attention_mask[:, :past].long().sum(-1)
        attention_mask = attention_mask[:, past:]
    else:
        past_valid = torch.full((shape[0],), past, dtype=torch.long, device=device)
    return ForwardBatch.build(shape, device, attention_mask, start=past, past_valid=past_valid)
