"""Llama 4 (Scout / Maverick) in plain PyTorch, readable top to bottom.

Module and parameter names equal the HF checkpoint keys (``language_model.model.layers.N.
feed_forward.experts.gate_up_proj`` ...), so a state dict loads without renaming. The forward
pass knows nothing of stores or widgets: it exposes hook points
(:class:`~workbench.hooks.points.HookPoint`: ``hook_inputs``, ``hook_router_logits``,
``hook_router``, ``hook_attn``, ``hook_attn_lse``) that cost nothing unless a listener is
attached. Each call builds one :class:`~workbench.runtime.ForwardBatch` (positions, validity,
stream indices) and every layer takes ``(x, batch, cache)``; which key a query may see is decided
by :mod:`workbench.runtime.masks` alone.

Semantics reproduce transformers' ``Llama4ForConditionalGeneration`` / ``Llama4ForCausalLM``:
- router: logits = x W^T; top-k on logits; score = sigmoid(logit) multiplies the expert INPUT;
  y = shared(x) + sum_k SwiGLU_e(s_k * x). Only the selected experts run (sorted dispatch in
  :func:`workbench.kernels.moe_experts`).
- RoPE layers (``no_rope_layers[i] == 1``): complex interleaved-pair RoPE (llama3 scaling when
  configured), weightless L2 QK norm after RoPE, block-diagonal causal attention in chunks of
  ``attention_chunk_size``. NoPE layers: global causal attention, query temperature
  log1p(floor((pos+1)/floor_scale)) * attn_scale + 1 when tuning is on.
- Tensor parallelism (:mod:`workbench.runtime.parallel`, ``load_model(path, tp=N)``): the layout
  module splits the weights and gives layers a ``tp`` group (None: one process); the decoder
  layer all-reduces after attention and after the feed-forward, attention gathers head shards
  only for recorded layers, MoE layers feed the routing checksum.
- Padding: positions come from the attention mask, so every sequence of a padded batch (left
  or right padding) computes what it computes alone. (transformers derives the NoPE temperature
  from the buffer index instead, which differs under left padding; we follow the position.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.hooks.points import HookPoint
from workbench.kernels import moe_expert_outputs, moe_experts
from workbench.models.llama4.config import ModelConfig, TextConfig, llama3_inv_freq
from workbench.models.llama4.vision import MultiModalProjector, VisionModel
from workbench.runtime import ForwardBatch
from workbench.runtime.attend import attend
from workbench.runtime.kv_cache import CacheFullError, KVCache
from workbench.runtime.memory import ContextLengthError, check_fits, prefill_bytes

__all__ = [
    "Llama4ForCausalLM", "Llama4ForConditionalGeneration", "Llama4TextModel", "ModelOutput", "build_model",
    "run_blocks", "DEFAULT_PREFILL_CHUNK",
]

# Inputs longer than this go through the decoder in blocks against a KV cache (run_blocks): up to
# here one pass with dense masks is the fastest path; past it its T x T masks outgrow the cache's
# O(T x chunk) blocks.
DEFAULT_PREFILL_CHUNK = 4096


@dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: (B, T, vocab) in the model dtype. hidden_states: (B, T, H) after the final norm.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None

    def __getitem__(self, i):  # tuple-style access, as with transformers outputs
        return (self.logits, self.hidden_states)[i]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class Llama4TextRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one call, the same arithmetic (bit for bit) as the general expression below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # as transformers: normalize in float32, cast, then scale in the model dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalization over the last dim, computed in float32 (Llama 4 QK norm):
    x * rsqrt(mean(x^2) + eps)."""
    return F.rms_norm(x.float(), x.shape[-1:], None, eps).type_as(x)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers.

    x: (B, T, heads, D); freqs_cis: (B, T, 1, D/2) complex64 (one rotation per token, broadcast
    over the heads). Returns x's shape and dtype.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)


class Llama4TextMLP(nn.Module):
    """SwiGLU MLP: dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama4TextExperts(nn.Module):
    """The routed experts' weights, x @ W layout: gate_up_proj (E, H, 2I) gate first, down_proj (E, I, H)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))


class Llama4TextMoe(nn.Module):
    """Top-k sigmoid router + routed experts + shared expert.

    Hook points, per flattened token (N = B*T):

    * ``hook_router_logits``: ``router_logits`` (N, E) in the model dtype before top-k; editable,
      so an edit changes the choice (blocking experts: their logits set to -inf).
    * ``hook_router``: the decision: ``router_logits`` (N, E) as top-k saw them, ``topk_ids``
      (N, k) int64 and ``topk_weights`` (N, k) the scores as applied (model dtype); ids and
      weights are editable (forcing an expert, scaling a weight).
    * ``hook_experts``: what the experts did: ``x`` (N, H) the block's input (the normed residual
      stream), ``topk_ids`` / ``topk_weights`` as applied, ``expert_out`` (N, k, H) each chosen
      expert's contribution SwiGLU_e(w * x) (the weight scales the expert's INPUT), ``shared_out``
      (N, H) the shared expert's. The block returns shared_out + sum_k expert_out (slots summed
      in float32). ``expert_out`` and ``shared_out`` are editable (e.g. zero one contribution and
      keep the routing). While it has listeners the routed experts run through
      :func:`workbench.kernels.moe_expert_outputs` (the torch path; the same products, the
      output unchanged on the torch path for k <= 2); otherwise it costs one attribute check.
    """

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Llama4TextExperts(config)
        self.shared_expert = Llama4TextMLP(config.hidden_size, config.intermediate_size)
        self.hook_router_logits = HookPoint(editable=("router_logits",))
        self.hook_router = HookPoint(editable=("topk_ids", "topk_weights"))
        self.hook_experts = HookPoint(editable=("expert_out", "shared_out"))
        self.tp = None  # tensor parallelism: the routing checksum (the router itself is replicated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.router(x)
        if self.hook_router_logits.active:
            router_logits = self.hook_router_logits(router_logits=router_logits)["router_logits"]
        top_logits, topk_ids = torch.topk(router_logits, self.top_k, dim=-1)
        topk_weights = torch.sigmoid(top_logits.float()).to(x.dtype)
        # Ids from topk over E logits are in range, so the range check (a host sync on GPU) runs
        # only when a listener may have replaced them.
        check_ids = self.hook_router.editing
        if self.hook_router.active:
            out = self.hook_router(router_logits=router_logits, topk_ids=topk_ids, topk_weights=topk_weights)
            topk_ids, topk_weights = out["topk_ids"], out["topk_weights"]
        if self.tp is not None:
            self.tp.note_routing(self.layer_idx, topk_ids)
        if self.hook_experts.active:
            return self._observed_experts(x, topk_ids, topk_weights, check_ids).view(shape)
        routed = moe_experts(x, topk_ids, topk_weights, self.experts.gate_up_proj, self.experts.down_proj,
                             scale="input", check_ids=check_ids, validate=check_ids)
        return (self.shared_expert(x) + routed).view(shape)

    def _observed_experts(self, x, topk_ids, topk_weights, check_ids) -> torch.Tensor:
        """The experts with each assignment's output kept, for ``hook_experts``."""
        expert_out = moe_expert_outputs(x, topk_ids, topk_weights, self.experts.gate_up_proj,
                                        self.experts.down_proj, scale="input", check_ids=check_ids)
        out = self.hook_experts(x=x, topk_ids=topk_ids, topk_weights=topk_weights, expert_out=expert_out,
                                shared_out=self.shared_expert(x))
        expert_out = out["expert_out"]
        routed = expert_out[:, 0] if expert_out.shape[1] == 1 else expert_out.float().sum(1).to(x.dtype)
        return out["shared_out"] + routed


class Llama4TextAttention(nn.Module):
    """GQA self-attention; RoPE + L2 QK norm + chunked mask on RoPE layers, temperature on NoPE layers.

    ``hook_attn`` sees the exact query/key the softmax uses: ``query`` (B, Hq, T, D) already scaled
    by the NoPE temperature, ``key`` (B, Hkv, S, D) (S = T without a cache; with one, the cached
    keys the queries attend, the call's own among them), ``scale`` (float), ``allowed``
    (B, 1, T, S) bool mask, ``batch`` (the call's :class:`~workbench.runtime.ForwardBatch`) and
    ``keys`` (:class:`~workbench.runtime.Keys`: each key's stream index, position, validity).

    Under tensor parallelism a rank holds its heads only (``num_heads`` / ``num_kv_heads`` stay the
    model's); for the layers the recorder captures (``tp.gathers(layer)``) every rank gathers the
    query/key/lse head shards, so a listener (on rank 0) sees every head.

    ``hook_attn_lse`` fires after the attention with ``query``, ``key``, ``scale``, ``batch``,
    ``keys`` and ``lse``: the (B, Hq, T) row log-sum-exp of the layer's softmax, or None. While it has listeners
    the attention runs through :func:`workbench.kernels.attention_map.sdpa_with_lse`: the same
    kernel that ``F.scaled_dot_product_attention`` dispatches to (the same output, bit for bit),
    which on CPU (aten's fused flash attention) also returns the log-sum-exp; on other backends
    ``lse`` is None.
    """

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = self.head_dim ** -0.5
        self.use_rope = config.uses_rope[layer_idx]
        # RoPE layers attend inside their chunk, NoPE layers globally (workbench.runtime.masks)
        self.chunk_size = config.attention_chunk_size if self.use_rope else None
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.qk_norm_eps = config.rms_norm_eps
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        bias = config.attention_bias
        H, D = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.hook_attn = HookPoint()
        self.hook_attn_lse = HookPoint()
        self.tp = None  # tensor parallelism: gathers head shards for hook listeners

    def temperature(self, batch: ForwardBatch) -> torch.Tensor:
        """(B, T, 1, 1) float32 query temperature of NoPE layers at each token's position."""
        pos = batch.positions.float()
        temp = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
        return temp[:, :, None, None]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). ``cache``: the :class:`~workbench.runtime.kv_cache.KVCache` the
        call continues (its keys are stored there, and the queries see the cached ones); None: the
        keys are the call's own tokens."""
        B, T, _ = x.shape
        hq, hkv = self.q_proj.out_features // self.head_dim, self.k_proj.out_features // self.head_dim  # this rank's
        q = self.q_proj(x).view(B, T, hq, self.head_dim)
        k = self.k_proj(x).view(B, T, hkv, self.head_dim)
        v = self.v_proj(x).view(B, T, hkv, self.head_dim)
        if self.use_rope:
            # queries and keys rotated (and normed) as one tensor: per-head ops, half the calls
            qk = apply_rope(torch.cat([q, k], dim=2), batch.derived("rope", _rope_missing))
            if self.use_qk_norm:
                qk = l2_norm(qk, self.qk_norm_eps)
            q, k = qk.split([hq, hkv], dim=2)
        if self.temperature_tuning:
            temp = batch.derived(("nope_temperature", self.floor_scale, self.attn_scale),
                                 lambda: self.temperature(batch))
            q = (q * temp).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        keys = None  # the keys' metadata when they come from a cache (None: the call's own tokens)
        if cache is not None:
            k, v, keys = cache.update(self.layer_idx, k, v, batch)
        gather = self.tp is not None and self.tp.gathers(self.layer_idx)  # the same on every rank
        if self.hook_attn.active or gather:
            qh, kh = (self.tp.gather_heads(q, self.num_heads), self.tp.gather_heads(k, self.num_kv_heads)) \
                if gather else (q, k)
            if self.hook_attn.active:
                self.hook_attn(query=qh, key=kh, scale=self.scale, allowed=batch.mask(self.chunk_size, keys),
                               batch=batch, keys=batch.keys() if keys is None else keys)
        want_lse = self.hook_attn_lse.active or gather
        out, lse = attend(q, k, v, batch, keys, self.chunk_size, self.scale, want_lse=want_lse)
        if want_lse:
            if gather:
                q, k, lse = qh, kh, self.tp.gather_heads(lse, self.num_heads)
            if self.hook_attn_lse.active:
                self.hook_attn_lse(query=q, key=k, scale=self.scale, lse=lse, batch=batch,
                                   keys=batch.keys() if keys is None else keys)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _rope_missing():
    raise RuntimeError("the forward batch carries no RoPE rotations: Llama4TextModel.forward puts them there")


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe_layer = config.is_moe_layer(layer_idx)
        self.self_attn = Llama4TextAttention(config, layer_idx)
        self.feed_forward = (Llama4TextMoe(config, layer_idx) if self.is_moe_layer
                             else Llama4TextMLP(config.hidden_size, config.intermediate_size_mlp))
        self.input_layernorm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tp = None  # tensor parallelism (workbench.runtime.parallel): each rank adds its heads' / slices' part

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        """Sum a block's partial outputs over the tensor-parallel ranks (identity in one process)."""
        return h if self.tp is None else self.tp.all_reduce(h)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache=None) -> torch.Tensor:
        x = x + self.reduce(self.self_attn(self.input_layernorm(x), batch, cache))
        return x + self.reduce(self.feed_forward(self.post_attention_layernorm(x)))


class Llama4TextModel(nn.Module):
    """Embedding, decoder layers, final norm.

    ``hook_inputs`` fires once per call, before the first layer, with ``input_ids`` (B, T) long
    (or None) and ``batch`` (the call's :class:`~workbench.runtime.ForwardBatch`).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Llama4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_inputs = HookPoint()
        self.tp = None  # tensor parallelism: ends each pass (routing checksum)
        self.cache_config = config  # what a KV cache of this model holds (under TP: this rank's heads)
        self._inv_freq: dict = {}  # (device, RoPE settings) -> inverse frequencies, computed once

    def rope_freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, head_dim/2) complex64 rotations for the given positions."""
        c = self.config
        key = (position_ids.device, c.head_dim, c.rope_theta, repr(c.rope_scaling))
        inv_freq = self._inv_freq.get(key)
        if inv_freq is None:
            inv_freq = self._inv_freq[key] = llama3_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(
                position_ids.device)
        angles = position_ids[..., None].float() * inv_freq
        return torch.polar(torch.ones_like(angles), angles)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) long and/or inputs_embeds (B, T, H) -> hidden states (B, T, H).

        attention_mask (B, T): 1 for real tokens, 0 for padding (default all real); position_ids
        (B, T): default counted from the mask. With both ids and embeddings, the embeddings are
        used and the ids only describe the tokens to ``hook_inputs`` (the multimodal model passes
        fused embeddings this way). cache: a :class:`~workbench.runtime.kv_cache.KVCache` whose rows
        this call continues (positions go on from the cached tokens; the call's keys are added).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        shape = tuple(x.shape[:2])
        if cache is None:
            batch = ForwardBatch.build(shape, x.device, attention_mask, position_ids)
        else:
            batch = cache.batch(shape, x.device, attention_mask, position_ids)
        batch.derived("rope", lambda: self.rope_freqs(batch.positions)[:, :, None, :])  # (B, T, 1, D/2)
        if self.hook_inputs.active:
            self.hook_inputs(input_ids=input_ids, batch=batch)
        for layer in self.layers:
            x = layer(x, batch, cache)
        if cache is not None:
            cache.advance(batch)
        if self.tp is not None:
            self.tp.end_pass()
        return self.norm(x)


class Llama4ForCausalLM(nn.Module):
    """Text-only Llama 4 (checkpoint keys ``model.*``, ``lm_head.weight``)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Llama4TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK

    @property
    def text_config(self) -> TextConfig:
        """The text config as this process runs it (under tensor parallelism: its heads)."""
        return self.model.cache_config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, *,
                cache: KVCache | None = None, prefill_chunk: int | None = None, logits_to_keep: int = 0,
                **batch_extras) -> ModelOutput:
        """(B, T) ids -> ModelOutput(logits (B, T, vocab)). Extra processor keys are ignored.

        Long inputs go through in blocks against a KV cache (:func:`run_blocks`); ``cache``,
        ``prefill_chunk`` and ``logits_to_keep`` are described there.
        """
        _check_extras(batch_extras)
        _check_ids(input_ids, self.config.vocab_size)
        return run_blocks(self.model, self.lm_head, input_ids, attention_mask, position_ids, inputs_embeds,
                          cache=cache, prefill_chunk=prefill_chunk or self.prefill_chunk,
                          logits_to_keep=logits_to_keep)


class Llama4ForConditionalGeneration(nn.Module):
    """Vision tower + projector + text decoder with early fusion.

    Image features replace the ``<|patch|>`` (image_token_index) embeddings in order.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision, config.text.hidden_size)
        self.language_model = Llama4ForCausalLM(config.text)

    @property
    def text_config(self) -> TextConfig:
        """The text config as this process runs it (under tensor parallelism: its heads)."""
        return self.language_model.model.cache_config

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids (+ (N_tiles, 3, S, S) pixels) -> (B, T, H) input embeddings with images fused."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        feats = self.multi_modal_projector(self.vision_model(pixel_values.to(embeds.dtype)))
        feats = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        slots = input_ids == self.config.image_token_index
        # A count check is a host sync, but images already force one through the vision tower's
        # shapes; the clear error is worth it.
        n_slots = int(slots.sum())
        if n_slots != feats.shape[0]:
            raise ValueError(f"the prompt has {n_slots} <|patch|> tokens but the images give {feats.shape[0]} "
                             f"patch features ({pixel_values.shape[0]} tiles): prompts and images do not match")
        return embeds.masked_scatter(slots[..., None], feats)

    @property
    def prefill_chunk(self) -> int:
        return self.language_model.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int) -> None:
        self.language_model.prefill_chunk = value

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, position_ids=None,
                inputs_embeds=None, *, cache: KVCache | None = None, prefill_chunk: int | None = None,
                logits_to_keep: int = 0, **batch_extras) -> ModelOutput:
        """input_ids (B, T) long, attention_mask (B, T), pixel_values (N_tiles, 3, S, S) float.

        Returns ModelOutput(logits (B, T, vocab)). Extra processor keys are ignored. The images are
        encoded once; the text decoder runs in blocks on long inputs (:func:`run_blocks`).
        """
        _check_extras(batch_extras)
        _check_ids(input_ids, self.config.text.vocab_size)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pass pixel_values with input_ids, not with inputs_embeds")
        lm = self.language_model
        return run_blocks(lm.model, lm.lm_head, input_ids, attention_mask, position_ids, inputs_embeds,
                          cache=cache, prefill_chunk=prefill_chunk or lm.prefill_chunk, logits_to_keep=logits_to_keep)


def run_blocks(text_model: Llama4TextModel, lm_head: nn.Linear, input_ids, attention_mask, position_ids,
               inputs_embeds, *, cache: KVCache | None, prefill_chunk: int, logits_to_keep: int = 0) -> ModelOutput:
    """The decoder over (B, T) tokens, in blocks of at most ``prefill_chunk`` against a KV cache.

    Without a cache, an input of at most ``prefill_chunk`` tokens is one pass over whole
    sequences (dense masks, no cache); a longer one goes through in blocks against a temporary
    :class:`~workbench.runtime.kv_cache.KVCache`, so no T x T tensor exists: chunked layers cost
    O(T x chunk), global layers O(T) memory (their time stays O(T^2)). With ``cache`` the call
    continues its rows (generation), in blocks of at most ``cache.block``. Each block is one
    pass for hook listeners (``hook_inputs`` fires per block, its ``batch.start`` is the block's
    stream offset). attention_mask: (B, T) for this call's tokens (a (B, past + T) mask as
    transformers passes it is cut to its last T columns). logits_to_keep: 0 -> logits of every
    token; n -> of the last n only (what generation needs; a 256k-token prompt's full logits
    alone take B x T x vocab x 4 bytes). Refuses inputs past the model's
    ``max_position_embeddings`` (ContextLengthError, a ValueError) or larger than the memory that
    is free (InsufficientMemoryError), before allocating.
    """
    ref = input_ids if inputs_embeds is None else inputs_embeds
    B, T = ref.shape[:2]
    config = text_model.config
    past = 0 if cache is None else cache.length
    if past + T > config.max_position_embeddings:
        raise ContextLengthError(f"the input has {past + T} tokens per row (padding and cached tokens included) but "
                                 f"the model's max_position_embeddings is {config.max_position_embeddings}")
    if cache is not None and past + T > cache.max_len:  # before any block runs: nothing half-done
        raise CacheFullError(f"the cache holds {cache.max_len} tokens per row: {past} used, {T} more do not fit")
    if attention_mask is not None and cache is not None and attention_mask.shape[-1] == past + T and past:
        attention_mask = attention_mask[:, past:]

    def head(h: torch.Tensor) -> torch.Tensor:
        return lm_head(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])

    if cache is None and T <= prefill_chunk:
        h = text_model(input_ids, attention_mask, position_ids, inputs_embeds)
        return ModelOutput(logits=head(h), hidden_states=h)
    if cache is None:
        dtype = (inputs_embeds if inputs_embeds is not None else text_model.embed_tokens.weight).dtype
        check_fits(prefill_bytes(config, B, T, prefill_chunk, dtype, logits_to_keep), ref.device,
                   f"a {T}-token prefill of {B} row(s)",
                   hint=None if logits_to_keep <= 0 else "shorter inputs or fewer rows")
        cache = KVCache(text_model.cache_config, B, T, block=prefill_chunk, dtype=dtype, device=ref.device)
    step = min(prefill_chunk, cache.block)
    hs = []
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        hs.append(text_model(None if input_ids is None else input_ids[:, sl],
                             None if attention_mask is None else attention_mask[:, sl],
                             None if position_ids is None else position_ids[:, sl],
                             None if inputs_embeds is None else inputs_embeds[:, sl], cache=cache))
    h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
    return ModelOutput(logits=head(h), hidden_states=h)


# Keys a processor batch carries for bookkeeping; the model accepts and ignores them.
_PROCESSOR_KEYS = frozenset({"image_sizes", "aspect_ratios", "tile_grids", "original_sizes", "token_type_ids",
                             "image_grid", "images_per_sample", "patch_grids"})


def _check_ids(input_ids: torch.Tensor | None, vocab_size: int) -> None:
    """ValueError for token ids outside the vocabulary, instead of the embedding's IndexError. CPU
    tensors only: on a GPU the check would cost a host sync per call (there the embedding asserts)."""
    if input_ids is None or input_ids.device.type != "cpu" or not input_ids.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids hold token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                         f"[0, {vocab_size})")


def _check_extras(extras: dict) -> None:
    unknown = set(extras) - _PROCESSOR_KEYS
    if unknown:
        raise TypeError(f"unexpected forward() arguments: {', '.join(sorted(unknown))}")


def build_model(config: ModelConfig) -> nn.Module:
    """An uninitialized model for ``config`` (use inside ``torch.device('meta')`` to allocate nothing)."""
    if config.is_multimodal:
        return Llama4ForConditionalGeneration(config)
    return Llama4ForCausalLM(config.text)
