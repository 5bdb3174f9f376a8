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

transformers' MoE families (forward hooks on each family's router module, :class:`TransformersAdapter`).
In every family the ids and weights come from the router module's OUTPUT, the very tensors the MoE
block hands its experts (so the recorded weight is the applied one, in the dtype applied, after
renormalization and scaling); nothing is recomputed except where a router does not return it:

=========================  =====================  ==============================================================
model type                 router                 recorded
=========================  =====================  ==============================================================
mixtral                    MixtralTopKRouter      read: softmax, top-k, renormalized (float32)
qwen2_moe                  Qwen2MoeTopKRouter     read: softmax, top-k, ``norm_topk_prob``; shared expert gate
                                                  value at ``shared_gates`` (sigmoid of the gate's output)
qwen3_moe                  Qwen3MoeTopKRouter     read: softmax, top-k, ``norm_topk_prob``
olmoe                      OlmoeTopKRouter        read: softmax, top-k, ``norm_topk_prob``
deepseek_v3                DeepseekV3TopkRouter   read (sigmoid, bias-corrected group-limited selection, renormalized,
                                                  scaled); the unsorted slots ordered by selection score
gpt_oss                    GptOssTopKRouter       read: top-k of the biased logits, softmax over them
llama4, llama4_text        Llama4Router           ids recomputed (the router returns none) by the router's own
                                                  ``topk`` call; weights read from its scores at those ids
=========================  =====================  ==============================================================

An unsupported model raises :class:`AdapterError` naming its class and model type and listing the
supported ones.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.hooks.points import HookPoint, hook_points
from workbench.runtime import ForwardBatch
from workbench.trace.schema import LLAMA4_RULE, MoELayerRouting

__all__ = ["RoutingSpec", "Adapter", "WorkbenchLlama4Adapter", "TransformersAdapter", "TransformersLlama4Adapter",
           "TransformersMixtralAdapter", "TransformersQwen2MoeAdapter", "TransformersQwen3MoeAdapter",
           "TransformersOlmoeAdapter", "TransformersDeepseekV3Adapter", "TransformersGptOssAdapter", "register_adapter",
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


# ---------------------------------------------------------------------------------------------
# transformers models
# ---------------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# transformers' generate loop that tracks finished rows (GenerationMixin._sample: greedy and
# sampling), and how many frames above the adapter's pre-hook it may be (hook, module call,
# compiled-call wrappers).
_SAMPLING_LOOPS = frozenset({"_sample"})
_LOOP_FRAME_DEPTH = 8


class TransformersAdapter(Adapter):
    """Base of the adapters for transformers' MoE models: forward hooks, nothing in the model changes.

    * ``inputs`` fires from a pre-hook on the top module, with the call's ``input_ids`` and a
      :class:`~workbench.runtime.ForwardBatch` built from its ``attention_mask`` and, in
      ``generate``'s decode steps, the cache length (:func:`_hf_batch`), so decode steps continue
      their sequences at the right positions. ``generate`` never runs its last generated token
      through the model: the trace holds every answer token but that one. A row that finished
      early is fed pads while the other rows run: those steps count as padding (not recorded), read
      from the sampling loop's own running rows (:meth:`_answer_rows`).
    * ``routers[i]`` fires from a forward hook on the i-th router module (instances of the family's
      ``router_class``, in decoder order). Each MoE layer's decoder index is read from the router's
      place in the module tree (``...layers.<i>....``), so models mixing dense and MoE layers
      (DeepSeek's ``first_k_dense_replace``, Qwen2-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``)
      get the decoder indices of their MoE layers. What fires is the family's :meth:`decision`
      on the router's output: the ids and weights the MoE block passes on to its experts.
    * ``shared_gates[i]`` (families whose shared expert is gated, ``shared_gate_attr``): fires
      ``shared_gate`` (N, 1), the gate value the model multiplies the shared expert's output by.

    A family is one subclass: registry keys, ``router_class`` ("module:Class"), ``rule`` (text),
    :meth:`_layer_routing` (its :class:`MoELayerRouting`) and :meth:`decision`.
    """

    router_class: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    shared_gate_attr: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._inputs = HookPoint()
        self._routers: list[HookPoint] = []
        self._shared: list[HookPoint] = []
        self._handles: list = []
        self._found: list[tuple[int, str, nn.Module]] | None = None
        self._running: tuple[int, torch.Tensor] | None = None  # (loop frame id, running rows at its last call)

    # -- what the subclasses define ------------------------------------------------------------
    def _layer_routing(self, layer: int, router: nn.Module) -> MoELayerRouting:  # pragma: no cover - interface
        raise NotImplementedError

    def decision(self, router: nn.Module, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_logits (N, E), topk_ids (N, k), topk_weights (N, k)) from the router's output.
        Default: transformers' ``*TopKRouter`` modules return (logits, applied weights, ids)."""
        logits, weights, ids = out
        return logits, ids, weights

    def image_token_id(self) -> int | None:
        return None

    # -- shared machinery ----------------------------------------------------------------------
    def _text_config(self):
        c = self.model.config
        return getattr(c, "text_config", None) or c

    def _router_type(self) -> type:
        module, _, name = self.router_class.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise AdapterError(f"{type(self).__name__}: this transformers version has no {name} ({e})") from None

    def router_modules(self) -> list[tuple[int, str, nn.Module]]:
        """(decoder index, qualified name, module) of each router, in decoder order."""
        if self._found is None:
            cls = self._router_type()
            found = []
            for name, m in self.model.named_modules():
                if isinstance(m, cls):
                    idx = _LAYER_INDEX.findall(name + ".")
                    if not idx:
                        raise AdapterError(f"{type(self.model).__name__}: router {name} ({cls.__name__}) is not "
                                           f"inside a decoder layer (no 'layers.N' in its name)")
                    found.append((int(idx[-1]), name, m))
            if not found:
                raise AdapterError(f"{type(self.model).__name__} has no {cls.__name__} module: it has no MoE layer "
                                   f"to record")
            found.sort(key=lambda x: x[0])
            layers = [i for i, _, _ in found]
            if len(set(layers)) != len(layers):
                raise AdapterError(f"{type(self.model).__name__}: several routers in one decoder layer "
                                   f"({[n for _, n, _ in found]}); no adapter handles that layout")
            self._found = found
        return self._found

    def spec(self) -> RoutingSpec:
        t, c = self._text_config(), self.model.config
        layers = [self._layer_routing(i, m) for i, _, m in self.router_modules()]
        return RoutingSpec(layers=layers, image_token_id=self.image_token_id(),
                           special_ids=_special(getattr(t, "eos_token_id", None), getattr(t, "bos_token_id", None),
                                                getattr(t, "pad_token_id", None)),
                           config=json.loads(c.to_json_string(use_diff=False)),
                           model_type=f"transformers {c.model_type}", rule=self.rule)

    @property
    def inputs(self) -> HookPoint:
        self._install()
        return self._inputs

    @property
    def routers(self) -> list[HookPoint]:
        self._install()
        return self._routers

    @property
    def shared_gates(self) -> list[HookPoint]:
        """One point per MoE layer firing ``shared_gate`` (N, 1) (empty: the family has no gated shared expert)."""
        self._install()
        return self._shared

    def _install(self) -> None:
        if self._handles:
            return
        point = self._inputs

        def pre(module, args, kwargs):
            if point.active:
                ids = kwargs.get("input_ids", args[0] if args else None)
                ref = ids if ids is not None else kwargs.get("inputs_embeds")
                if ref is None:
                    raise AdapterError(f"{type(module).__name__} was called without input_ids or inputs_embeds")
                mask, cache_position = kwargs.get("attention_mask"), kwargs.get("cache_position")
                past = _past_length(ref.shape[1], mask, cache_position)
                point(input_ids=ids, batch=_hf_batch(tuple(ref.shape[:2]), ref.device, mask, past,
                                                      keep=self._answer_rows(past)))

        found = self.router_modules()
        self._handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        modules = dict(self.model.named_modules())
        for _, name, r in found:
            p = HookPoint()
            self._routers.append(p)

            def hook(module, args, out, p=p):
                if p.active:
                    logits, ids, weights = self.decision(module, out)
                    p(router_logits=logits, topk_ids=ids, topk_weights=weights)
            self._handles.append(r.register_forward_hook(hook))
            gate = getattr(modules.get(name.rpartition(".")[0]), self.shared_gate_attr or "", None)
            if self.shared_gate_attr and gate is not None:
                q = HookPoint()
                self._shared.append(q)

                def gate_hook(module, args, out, q=q):
                    if q.active:
                        q(shared_gate=torch.sigmoid(out))  # what the block computes: F.sigmoid(gate(x))
                self._handles.append(gate.register_forward_hook(gate_hook))

    def _answer_rows(self, past: int) -> torch.Tensor | None:
        """Inside transformers' sampling loop: (B,) bool, the rows whose input token of this decode
        step is an answer token; None elsewhere (every row counts).

        Once a row has finished (an end-of-sequence token, a stop string, any stopping criterion),
        ``generate`` goes on feeding it the pad token while other rows run, and with deferred stop
        checks it may run a few steps past the end that it then drops. Those tokens are not the
        answer, and recording them would add routing of pads to the answer. The loop's own record of
        running rows is its local ``unfinished_sequences`` (the config's eos and pad ids are not
        enough: ``generate(eos_token_id=..., pad_token_id=..., stop_strings=...)`` overrides them);
        a step's input token was produced by the previous step, so it is an answer token iff its row
        was running at the previous model call."""
        frame = sys._getframe(2)
        for _ in range(_LOOP_FRAME_DEPTH):
            if frame is None:
                return None
            code = frame.f_code
            if code.co_name in _SAMPLING_LOOPS and "unfinished_sequences" in code.co_varnames and \
                    frame.f_globals.get("__name__", "").startswith("transformers.generation"):
                break
            frame = frame.f_back
        else:
            return None
        running = frame.f_locals.get("unfinished_sequences")
        if not isinstance(running, torch.Tensor):
            return None
        previous, self._running = self._running, (id(frame), running)  # the loop rebinds it: no copy needed
        if past == 0 or previous is None or previous[0] != id(frame):  # a prefill, or another generate call
            return None
        return previous[1].bool()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._routers, self._shared = [], [], []
        self._running = None


@register_adapter
class TransformersLlama4Adapter(TransformersAdapter):
    """transformers' ``Llama4ForCausalLM`` / ``Llama4ForConditionalGeneration``.

    ``Llama4Router`` returns (scores (N, E): sigmoid of the chosen logits, -inf->0 elsewhere,
    logits). The ids are not part of its output: they are recomputed from the logits by the same
    call the router makes (``torch.topk(logits, k, dim=1)``: identical ids), and the weights READ
    from its scores at those ids (the values the block multiplies the expert inputs by).

    Left-padded rows: transformers takes the NoPE layers' query temperature from the buffer index,
    not the token's position, so a padded row's router logits differ from the same prompt run alone
    (by up to ~5e-2 on the embedded model). The trace records what transformers computed, at the
    tokens' true positions; workbench's own model follows the position (it equals the unpadded run).
    """

    frameworks_and_types = (("transformers", "llama4"), ("transformers", "llama4_text"))
    router_class = "transformers.models.llama4.modeling_llama4:Llama4Router"
    rule = LLAMA4_RULE

    def image_token_id(self) -> int | None:
        c = self.model.config
        return getattr(c, "image_token_index", None) if hasattr(c, "text_config") else None

    def _layer_routing(self, layer: int, router: nn.Module) -> MoELayerRouting:
        return MoELayerRouting(layer, router.num_experts, router.top_k)

    def decision(self, router, out):
        scores, logits = out
        ids = torch.topk(logits, router.top_k, dim=1).indices
        return logits, ids, scores.gather(1, ids)


SOFTMAX_TOPK_RULE = ("logits = x W_r^T; p = softmax(logits) over all experts (float32); top-k of p; weight = p of "
                     "each chosen expert{norm}, applied to the expert OUTPUT: y = {shared}sum_k w_k SwiGLU_e(x)")


class _SoftmaxTopKAdapter(TransformersAdapter):
    """softmax over all experts, then top-k, renormalized when the router's ``norm_topk_prob`` (or
    always, ``always_renormalize``). Weights READ from the router's output (its ``router_scores``:
    exactly what the block hands the experts, in the dtype it hands them)."""

    always_renormalize: ClassVar[bool] = False
    shared_expert: ClassVar[bool] = False

    def _layer_routing(self, layer: int, router: nn.Module) -> MoELayerRouting:
        return MoELayerRouting(layer, router.num_experts, router.top_k, score="softmax",
                               renormalize=self._renormalize(router), weight_applied_to="output",
                               shared_expert=self.shared_expert, shared_expert_gate=self.shared_gate_attr is not None)

    def _renormalize(self, router) -> bool:
        return self.always_renormalize or bool(getattr(router, "norm_topk_prob", False))

    def spec(self) -> RoutingSpec:
        s = super().spec()
        renorm = {r.renormalize for r in s.layers}
        norm = (" / sum of the chosen p" if renorm == {True} else "" if renorm == {False} else
                " (divided by the sum of the chosen p on layers with renormalize)")
        s.rule = SOFTMAX_TOPK_RULE.format(norm=norm, shared="sigmoid(x w_s) shared(x) + " if self.shared_gate_attr
                                          else "shared(x) + " if self.shared_expert else "")
        return s


@register_adapter
class TransformersMixtralAdapter(_SoftmaxTopKAdapter):
    """Mixtral (``MixtralTopKRouter``): softmax, top-k, always renormalized (= softmax over the chosen logits)."""

    frameworks_and_types = (("transformers", "mixtral"),)
    router_class = "transformers.models.mixtral.modeling_mixtral:MixtralTopKRouter"
    always_renormalize = True


@register_adapter
class TransformersQwen2MoeAdapter(_SoftmaxTopKAdapter):
    """Qwen2-MoE (``Qwen2MoeTopKRouter``): softmax, top-k, ``norm_topk_prob``; a shared expert whose
    output is scaled by sigmoid(``shared_expert_gate``(x)) (``shared_gates`` hook points). Dense
    layers (``mlp_only_layers``, ``decoder_sparse_step``) have no router and are not MoE layers."""

    frameworks_and_types = (("transformers", "qwen2_moe"),)
    router_class = "transformers.models.qwen2_moe.modeling_qwen2_moe:Qwen2MoeTopKRouter"
    shared_expert = True
    shared_gate_attr = "shared_expert_gate"


@register_adapter
class TransformersQwen3MoeAdapter(_SoftmaxTopKAdapter):
    """Qwen3-MoE (``Qwen3MoeTopKRouter``): softmax, top-k, ``norm_topk_prob``; no shared expert."""

    frameworks_and_types = (("transformers", "qwen3_moe"),)
    router_class = "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter"


@register_adapter
class TransformersOlmoeAdapter(_SoftmaxTopKAdapter):
    """OLMoE (``OlmoeTopKRouter``): softmax, top-k, ``norm_topk_prob`` (False in the released model)."""

    frameworks_and_types = (("transformers", "olmoe"),)
    router_class = "transformers.models.olmoe.modeling_olmoe:OlmoeTopKRouter"


GPT_OSS_RULE = ("logits = x W_r^T + b_r; top-k of the logits; weight = softmax over the k chosen logits (= softmax "
                "over all experts renormalized over the chosen), applied to the expert OUTPUT: y = sum_k w_k "
                "expert_e(x) (clamped SwiGLU with biases)")


@register_adapter
class TransformersGptOssAdapter(TransformersAdapter):
    """gpt-oss (``GptOssTopKRouter``): top-k of the (biased) logits, softmax over the chosen ones.
    Weights READ from the router's output. (transformers can swap ``GptOssMLP.forward`` for a hub
    kernel, ``use_kernels=True``, that routes inside one fused call: the router module never runs,
    and the recorder then reports that it saw no router decisions. Load without ``use_kernels``.)"""

    frameworks_and_types = (("transformers", "gpt_oss"),)
    router_class = "transformers.models.gpt_oss.modeling_gpt_oss:GptOssTopKRouter"
    rule = GPT_OSS_RULE

    def _layer_routing(self, layer: int, router: nn.Module) -> MoELayerRouting:
        return MoELayerRouting(layer, router.num_experts, router.top_k, score="softmax", renormalize=True,
                               weight_applied_to="output", shared_expert=False)


DEEPSEEK_V3_RULE = ("logits = x W_r^T (float32); s = sigmoid(logits); experts CHOSEN by s + b (the learned "
                    "e_score_correction_bias): the n_group groups are ranked by the sum of their two best s + b, only "
                    "the topk_group best may be chosen, then top-k of s + b within them; weight = s of each chosen "
                    "expert (without b){norm}, times scale (routed_scaling_factor), applied to the expert OUTPUT: "
                    "y = shared(x) + sum_k w_k SwiGLU_e(x). Slots are ordered by s + b, best first (the model's "
                    "top-k is unsorted)")


@register_adapter
class TransformersDeepseekV3Adapter(TransformersAdapter):
    """DeepSeek-V3 (``DeepseekV3TopkRouter``): sigmoid scores, selection by score + correction bias,
    group-limited top-k, renormalized (``norm_topk_prob``), scaled by ``routed_scaling_factor``.

    Ids and weights are READ from the router's output. The router's top-k is unsorted
    (``sorted=False``): the adapter orders each token's slots by the selection score s + b, best
    first (the order ``sorted=True`` would give); the set of experts and each expert's weight are
    the model's, unchanged. The weights exclude the bias, so slot 0 need not hold the largest
    weight: the analyses' top-1 expert and ranked lists go by applied weight (as in every family;
    :func:`workbench.analysis._common.rank_by_weight`). The first ``first_k_dense_replace`` layers
    are dense (no router)."""

    frameworks_and_types = (("transformers", "deepseek_v3"),)
    router_class = "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter"

    def _layer_routing(self, layer: int, router: nn.Module) -> MoELayerRouting:
        shared = bool(getattr(self._text_config(), "n_shared_experts", 0) or 0)
        return MoELayerRouting(layer, router.num_experts, router.top_k, score="sigmoid",
                               renormalize=bool(router.norm_topk_prob), weight_applied_to="output",
                               shared_expert=shared, selection_bias=True, n_group=int(router.num_group),
                               topk_group=int(router.topk_group), scale=float(router.routed_scaling_factor))

    def spec(self) -> RoutingSpec:
        s = super().spec()
        s.rule = DEEPSEEK_V3_RULE.format(norm=" / their sum" if all(r.renormalize for r in s.layers) else "")
        return s

    def decision(self, router, out):
        logits, weights, ids = out
        choice = (torch.sigmoid(logits) + router.e_score_correction_bias).gather(1, ids)
        order = torch.argsort(choice, dim=1, descending=True, stable=True)
        return logits, ids.gather(1, order), weights.gather(1, order)


def _past_length(T: int, attention_mask, cache_position) -> int:
    """Tokens per row already in the cache of a transformers call of ``T`` new tokens."""
    if attention_mask is not None and attention_mask.shape[-1] > T:
        return attention_mask.shape[-1] - T  # host-side: no sync
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0])  # a call without a mask: one small sync
    return 0


def _hf_batch(shape: tuple[int, int], device, attention_mask, past: int, *,
              keep: torch.Tensor | None = None) -> ForwardBatch:
    """The ForwardBatch of a transformers call. In ``generate`` a call after the first continues
    its rows from a cache: ``past`` = S tokens per row (:func:`_past_length`), its ``attention_mask``
    covers past + new tokens (B, S + T). The call's tokens then start at stream index S, and positions
    count on from the valid past tokens (those of the mask's first S columns). keep: (B,) bool,
    rows whose tokens of this call are recorded (the others count as padding)."""
    past_valid = None
    if past:
        if attention_mask is not None:
            past_valid = attention_mask[:, :past].long().sum(-1)
            attention_mask = attention_mask[:, past:]
        else:
            past_valid = torch.full((shape[0],), past, dtype=torch.long, device=device)
    if keep is not None:
        call = attention_mask if attention_mask is not None else torch.ones(shape, dtype=torch.long, device=device)
        attention_mask = call * keep[:, None].to(device=call.device, dtype=call.dtype)
    if past == 0:
        return ForwardBatch.build(shape, device, attention_mask)
    return ForwardBatch.build(shape, device, attention_mask, start=past, past_valid=past_valid)
