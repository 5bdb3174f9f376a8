"""Inside the experts: what each chosen expert wrote into the residual stream, and why it was chosen.

Three captures (classes of :mod:`workbench.hooks.captures`, registered by name):

``expert_out`` (:class:`ExpertOutCapture`), per token and MoE layer (workbench models only:
transformers stores Llama 4's experts as fused 3-D weights with no per-expert output to see):

* ``expert_out_norm`` (token, moe_layer, k) float32: ||SwiGLU_e(w * x)||_2 of each chosen routed
  expert e of the token's top-k set (slot order of ``topk_expert``). Llama 4 scales the expert's
  INPUT by the router weight w, so this is the contribution as added, not w * ||SwiGLU_e(x)||.
* ``shared_out_norm`` (token, moe_layer) float32: ||shared(x)||_2.
* ``resid_norm`` (token, moe_layer) float32: ||r||_2 of the residual stream r entering the MoE
  sublayer (after the decoder layer's attention), so the layer's output is
  r + shared(x) + sum_k SwiGLU_{e_k}(w_k * x), x = post_attention_layernorm(r).
* optional ``expert_out_vec`` (token, vector_layer, part, hidden), ``vector_dtype`` (float16 by
  default), for the decoder layers ``vector_layers`` and the tokens at ``vector_positions`` (all
  tokens when None; other rows NaN): part j < k the routed slot j's output vector, part k the
  shared expert's, part k + 1 the residual r. Chunked by a few rows, for downstream probing.

``attribution`` (:class:`AttributionCapture`): direct logit attribution (DLA) of each chosen
routed expert and of the shared expert to a target token (default: the next token of the
sequence; ``target=<id>``: a fixed token):

    attribution[t, l, j] = s_t * < W_U[y_t] * g , c_{t,l,j} >,   s_t = 1 / sqrt(mean(h_t^2) + eps)

c the contribution vector (as above), g the final RMSNorm's weight, W_U the unembedding, h_t the
final residual stream (the final norm's input) at token t. The approximation: the final norm is
linearized at the position, i.e. its scale s_t is held at its value in the run, and only the
DIRECT path is counted (what later layers do with c, routing included, is not). At the last
decoder layer with the scale held fixed this is exactly the logit change from removing c; with
the scale recomputed it differs by the change of s_t (small when c is small against h_t).
Tokens without a target (the last token of a row or of a prefill block, a token before padding
under ``target="next"``) get NaN. ``attribution_target`` (token) int32 holds y_t (-1: none).

``margin`` (:class:`MarginCapture`): ``router_margin`` (token, moe_layer) float32, the top-1
minus the top-2 router logit as top-k saw them (after any edit of the logits): how fragile the
routing decision is. Works for any model with an adapter (router hook points only) whose top-k
ranks experts as their logits do; refused for DeepSeek-V3 (selection bias, group-limited choice).

Nothing here synchronizes with the device in the forward pass: per-layer reductions are queued
on the device and copied to pinned host memory without waiting (:func:`to_host`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from workbench.hooks.captures import Capture, Pass, RecorderError, kept_rows, register_capture, to_host
from workbench.trace.schema import MOE_LAYER, TOKEN, Variable

__all__ = ["ExpertOutCapture", "AttributionCapture", "MarginCapture", "model_parts", "ModelParts"]

VECTOR_DTYPES = ("float16", "float32")


@dataclass(eq=False)
class ModelParts:
    """The modules of a workbench Llama 4 the expert captures listen to.

    moes: decoder layer -> MoE block (``hook_router``, ``hook_experts``); resid_norms: decoder
    layer -> that layer's ``post_attention_layernorm`` (its input is the residual stream entering
    the MoE sublayer); final_norm: the text model's final RMSNorm; lm_head: the unembedding."""

    moes: dict[int, nn.Module]
    resid_norms: dict[int, nn.Module]
    final_norm: nn.Module
    lm_head: nn.Module


def model_parts(model: nn.Module) -> ModelParts:
    """The :class:`ModelParts` of a workbench Llama 4 model; RecorderError for another model."""
    moes = {int(m.layer_idx): m for m in model.modules()
            if hasattr(m, "hook_experts") and hasattr(m, "hook_router") and hasattr(m, "layer_idx")}
    if not moes:
        raise RecorderError(f"{type(model).__name__} has no MoE blocks with a hook_experts point: the expert "
                            "captures need a workbench Llama 4 model (wb.load_model); on transformers models the "
                            "adapters expose the routers only (captures router, logits and, but on DeepSeek-V3, "
                            "margin)")
    if getattr(model, "tp", None) is not None:
        raise RecorderError("the expert captures (expert_out, attribution) do not run under tensor parallelism: each "
                            "rank holds a slice of every expert and of the unembedding; record them in one process "
                            "(the router, logits and attention captures work under tensor parallelism)")
    by_block = {id(m): layer for layer, m in moes.items()}
    resid = {by_block[id(m.feed_forward)]: m.post_attention_layernorm for m in model.modules()
             if id(getattr(m, "feed_forward", None)) in by_block and hasattr(m, "post_attention_layernorm")}
    text = [m for m in model.modules() if hasattr(m, "embed_tokens") and hasattr(m, "layers") and hasattr(m, "norm")]
    heads = [m.lm_head for m in model.modules() if isinstance(getattr(m, "lm_head", None), nn.Linear)]
    if len(text) != 1 or len(heads) != 1 or set(resid) != set(moes):
        raise RecorderError(f"{type(model).__name__}: expected one text model with a final norm, one lm_head and "
                            "a post_attention_layernorm per MoE layer (a workbench Llama 4 model)")
    return ModelParts(dict(sorted(moes.items())), resid, text[0].norm, heads[0])


def _check_layout(parts: ModelParts, spec, who: str) -> None:
    if list(parts.moes) != spec.moe_layers:
        raise RecorderError(f"capture {who!r}: the model's MoE blocks {list(parts.moes)} differ from the adapter's "
                            f"MoE layers {spec.moe_layers}")


class _PassCapture(Capture):
    """Per-pass bookkeeping shared by the expert captures: one slot per MoE layer, filled by listeners."""

    payload_per_token: ClassVar[bool] = True  # (N, layers, ...) tensors

    def _begin(self, n: int) -> None:
        self._n = n
        self._cur: dict[str, list] | None = None

    def _slot(self, key: str, i: int, value) -> None:
        if self._cur is None:
            raise RecorderError(f"capture {self.name!r}: a hook point fired before the inputs of its forward pass")
        self._cur[key][i] = value

    def _new(self, *keys: str) -> None:
        self._cur = {k: [None] * self._n for k in keys}

    def _take(self) -> dict[str, list]:
        cur, self._cur = self._cur, None
        for key, vals in (cur or {}).items():
            seen = sum(v is not None for v in vals)
            if seen != self._n:
                raise RecorderError(f"capture {self.name!r}: saw {key} of {seen} of the {self._n} MoE layers "
                                    "in this forward pass")
        return cur or {}


def _positions_option(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    try:
        out = sorted({int(v) for v in value})
    except (TypeError, ValueError):
        raise RecorderError(f"expected a list of integers, got {value!r}") from None
    return out


@register_capture
@dataclass(eq=False)
class ExpertOutCapture(_PassCapture):
    """Norms of each chosen routed expert's output, of the shared expert's output and of the residual
    stream entering the MoE sublayer; optionally the vectors (see the module docstring)."""

    name: ClassVar[str] = "expert_out"
    vector_layers: list[int] | None = field(default=None, metadata={
        "help": "decoder layers (MoE) whose output vectors are stored (comma list; default none)",
        "parse": _positions_option})
    vector_positions: list[int] | None = field(default=None, metadata={
        "help": "positions whose vectors are stored (comma list; default all tokens of vector_layers)",
        "parse": _positions_option})
    vector_dtype: str = field(default="float16", metadata={"help": "storage dtype of the vectors: float16 or float32"})

    def bind(self, model, adapter, spec) -> None:
        self._parts = model_parts(model)
        _check_layout(self._parts, spec, self.name)
        if self.vector_dtype not in VECTOR_DTYPES:
            raise RecorderError(f"expert_out: vector_dtype must be one of {VECTOR_DTYPES}, got {self.vector_dtype!r}")
        self.vector_layers = _positions_option(self.vector_layers)
        self.vector_positions = _positions_option(self.vector_positions)
        if self.vector_layers is not None:
            bad = [x for x in self.vector_layers if x not in self._parts.moes]
            if bad or not self.vector_layers:
                raise RecorderError(f"expert_out: vector_layers {bad or self.vector_layers} are not MoE layers; "
                                    f"MoE layers: {list(self._parts.moes)}")
        self._hidden = int(self._parts.final_norm.weight.shape[0])

    def variables(self, spec) -> list[Variable]:
        L, k = len(spec.layers), spec.top_k
        out = [Variable("expert_out_norm", (TOKEN, MOE_LAYER, "k"), (L, k), "float32", codec="float",
                        capture=self.name, attrs={"long_name": "L2 norm of each chosen routed expert's output "
                                                               "SwiGLU_e(w * x), slot order of topk_expert"}),
               Variable("shared_out_norm", (TOKEN, MOE_LAYER), (L,), "float32", codec="float", capture=self.name,
                        attrs={"long_name": "L2 norm of the shared expert's output"}),
               Variable("resid_norm", (TOKEN, MOE_LAYER), (L,), "float32", codec="float", capture=self.name,
                        attrs={"long_name": "L2 norm of the residual stream entering the MoE sublayer"})]
        if self.vector_layers:
            shape = (len(self.vector_layers), k + 2, self._hidden)
            row_bytes = int(np.prod(shape)) * np.dtype(self.vector_dtype).itemsize
            out.append(Variable(
                "expert_out_vec", (TOKEN, "vector_layer", "part", "hidden"), shape, self.vector_dtype, codec="float",
                chunk_rows=max(1, (1 << 21) // row_bytes), capture=self.name,
                attrs={"long_name": "output vectors: parts 0..k-1 routed slots, k shared expert, k+1 residual",
                       "layers": list(self.vector_layers)}))
        return out

    def attach(self, adapter) -> list:
        parts = self._parts
        layers = list(parts.moes)
        self._begin(len(layers))
        self._vec_index = {layer: i for i, layer in enumerate(self.vector_layers or [])}
        handles = []
        for i, layer in enumerate(layers):
            handles.append(parts.moes[layer].hook_experts.add(self._on_experts(i, layer)))
            handles.append(parts.resid_norms[layer].register_forward_pre_hook(self._on_resid(i, layer)))
        return handles

    def _on_experts(self, i: int, layer: int):
        def fn(point, expert_out, shared_out, **_):
            self._slot("expert", i, expert_out.float().norm(dim=-1))
            self._slot("shared", i, shared_out.float().norm(dim=-1))
            if layer in self._vec_index:
                self._slot_vec(layer, "routed", expert_out)
                self._slot_vec(layer, "shared", shared_out)
        return fn

    def _on_resid(self, i: int, layer: int):
        def fn(module, args):
            if self._cur is None:  # a forward pass outside a recording (the pre-hook is a torch hook)
                return
            r = args[0].reshape(-1, args[0].shape[-1])
            self._slot("resid", i, r.float().norm(dim=-1))
            if layer in self._vec_index:
                self._slot_vec(layer, "resid", r)
        return fn

    def _slot_vec(self, layer: int, part: str, t: torch.Tensor) -> None:
        self._vecs[self._vec_index[layer]][part] = t.to(getattr(torch, self.vector_dtype))

    def start(self, pass_: Pass) -> None:
        self._new("expert", "shared", "resid")
        self._vecs = [{} for _ in self._vec_index]
        self._keep_pos = None
        if self.vector_layers and self.vector_positions is not None:
            pos = pass_.batch.positions.reshape(-1)
            want = torch.tensor(self.vector_positions, dtype=pos.dtype).to(pos.device, non_blocking=True)
            self._keep_pos = torch.isin(pos, want)

    def finish(self) -> Any:
        cur = self._take()
        payload = {"expert": to_host(torch.stack(cur["expert"], 1)), "shared": to_host(torch.stack(cur["shared"], 1)),
                   "resid": to_host(torch.stack(cur["resid"], 1))}
        if self.vector_layers:
            vecs = []
            for layer, d in zip(self.vector_layers, self._vecs):
                if set(d) != {"routed", "shared", "resid"}:
                    raise RecorderError(f"expert_out: the vectors of layer {layer} were not all seen in this pass")
                vecs.append(torch.cat([d["routed"], d["shared"][:, None], d["resid"][:, None]], 1))
            v = torch.stack(vecs, 1)  # (N, Lv, k + 2, H)
            if self._keep_pos is not None:
                v = v.masked_fill(~self._keep_pos[:, None, None, None], float("nan"))
            payload["vec"] = to_host(v)
        self._vecs = []
        return payload

    def rows(self, payload, keep: np.ndarray) -> dict[str, np.ndarray]:
        out = {"expert_out_norm": kept_rows(payload["expert"].numpy(), keep),
               "shared_out_norm": kept_rows(payload["shared"].numpy(), keep),
               "resid_norm": kept_rows(payload["resid"].numpy(), keep)}
        if "vec" in payload:
            out["expert_out_vec"] = kept_rows(payload["vec"].numpy(), keep)
        return out


def _target_option(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


@register_capture
@dataclass(eq=False)
class AttributionCapture(_PassCapture):
    """Direct logit attribution of each chosen routed expert and of the shared expert (module docstring)."""

    name: ClassVar[str] = "attribution"
    target: Any = field(default="next", metadata={
        "help": "'next' (the next token of the sequence) or a token id", "parse": _target_option})

    def bind(self, model, adapter, spec) -> None:
        self._parts = model_parts(model)
        _check_layout(self._parts, spec, self.name)
        vocab = int(self._parts.lm_head.weight.shape[0])
        if isinstance(self.target, bool) or not (self.target == "next" or isinstance(self.target, int)):
            raise RecorderError(f"attribution: target must be 'next' or a token id, got {self.target!r}")
        if isinstance(self.target, int) and not 0 <= self.target < vocab:
            raise RecorderError(f"attribution: target token {self.target} is outside the vocabulary [0, {vocab})")

    def variables(self, spec) -> list[Variable]:
        L, k = len(spec.layers), spec.top_k
        rule = "s_t <W_U[y_t] * g, c> (final norm linearized at the token; direct path only)"
        return [Variable("attribution", (TOKEN, MOE_LAYER, "k"), (L, k), "float32", codec="float", capture=self.name,
                         attrs={"long_name": f"direct logit attribution of each chosen routed expert: {rule}"}),
                Variable("attribution_shared", (TOKEN, MOE_LAYER), (L,), "float32", codec="float", capture=self.name,
                         attrs={"long_name": f"direct logit attribution of the shared expert: {rule}"}),
                Variable("attribution_target", (TOKEN,), (), "int32", valid_range=(-1, 2**31 - 1), capture=self.name,
                         attrs={"long_name": "target token of the attribution (-1: none)"})]

    def attach(self, adapter) -> list:
        parts = self._parts
        self._begin(len(parts.moes))
        handles = [m.hook_experts.add(self._on_experts(i)) for i, m in enumerate(parts.moes.values())]
        handles.append(parts.final_norm.register_forward_pre_hook(self._on_final))
        return handles

    def start(self, pass_: Pass) -> None:
        ids, valid = pass_.input_ids, pass_.batch.valid
        if self.target == "next":
            target = torch.full_like(ids, -1)
            target[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], -1)
        else:
            target = torch.full_like(ids, int(self.target))
        target = target.masked_fill(~valid, -1).reshape(-1)
        w_u = self._parts.lm_head.weight
        # u_t = W_U[y_t] * g: the target's unembedding through the final norm's weight (float32)
        self._u = w_u[target.clamp(min=0)].float() * self._parts.final_norm.weight.float()
        self._target = target
        self._scale = None
        self._new("routed", "shared")

    def _on_experts(self, i: int):
        def fn(point, expert_out, shared_out, **_):
            u = self._u
            self._slot("routed", i, torch.einsum("nkh,nh->nk", expert_out.float(), u))
            self._slot("shared", i, (shared_out.float() * u).sum(-1))
        return fn

    def _on_final(self, module, args):
        if self._cur is None:
            return
        h = args[0].float()
        self._scale = torch.rsqrt(h.pow(2).mean(-1) + module.eps).reshape(-1)

    def finish(self) -> Any:
        cur = self._take()
        if self._scale is None:
            raise RecorderError("attribution: the final norm did not run in this forward pass")
        none = self._target < 0
        s = self._scale.masked_fill(none, float("nan"))
        routed = torch.stack(cur["routed"], 1) * s[:, None, None]
        shared = torch.stack(cur["shared"], 1) * s[:, None]
        payload = (to_host(routed), to_host(shared), to_host(self._target.int()))
        self._u = self._target = self._scale = None
        return payload

    def rows(self, payload, keep: np.ndarray) -> dict[str, np.ndarray]:
        routed, shared, target = payload
        return {"attribution": kept_rows(routed.numpy(), keep), "attribution_shared": kept_rows(shared.numpy(), keep),
                "attribution_target": kept_rows(target.numpy(), keep)}


@register_capture
@dataclass(eq=False)
class MarginCapture(_PassCapture):
    """``router_margin``: top-1 minus top-2 router logit per token and MoE layer (routing fragility)."""

    name: ClassVar[str] = "margin"

    def bind(self, model, adapter, spec) -> None:
        if spec.n_experts < 2:
            raise RecorderError("margin: a router with one expert has no second choice")
        # Top-k of a monotone function of the logits (softmax, sigmoid, biased logits as gpt-oss
        # stores them) ranks as the logits do; a per-expert selection bias or group-limited choice
        # (DeepSeek-V3) does not, and a raw-logit gap would say nothing about how close a choice was.
        odd = [r.layer for r in spec.layers if r.selection_bias or r.n_group > 1]
        if odd:
            raise RecorderError(f"margin: MoE layers {odd} choose experts by score + selection bias within the best "
                                f"groups, not by the logits, so a top-1 minus top-2 logit gap would not measure how "
                                f"close their choice was; record logits ('--capture logits') instead")

    def variables(self, spec) -> list[Variable]:
        return [Variable("router_margin", (TOKEN, MOE_LAYER), (len(spec.layers),), "float32", codec="float",
                         capture=self.name, attrs={"long_name": "top-1 minus top-2 router logit, as top-k saw them"})]

    def attach(self, adapter) -> list:
        routers = adapter.routers
        self._begin(len(routers))
        return [p.add(self._on_router(i)) for i, p in enumerate(routers)]

    def _on_router(self, i: int):
        def fn(point, router_logits, **_):
            top2 = torch.topk(router_logits.float(), 2, dim=-1).values
            self._slot("margin", i, top2[:, 0] - top2[:, 1])
        return fn

    def start(self, pass_: Pass) -> None:
        self._new("margin")

    def finish(self) -> Any:
        return to_host(torch.stack(self._take()["margin"], 1))

    def rows(self, payload, keep: np.ndarray) -> dict[str, np.ndarray]:
        return {"router_margin": kept_rows(payload.numpy(), keep)}
