"""Will this model run here? A memory plan computed from the config, before anything is loaded.

    plan = wb.plan("scout", gpus="1xH100-80GB", quantize="int4", context=32768, batch=1)
    print(plan)            # table by part, total against capacity, verdict, cheapest fitting configuration
    plan.fits, plan.total_bytes, plan.weights["routed_experts"]

CLI: ``workbench plan MODEL --gpus 1xH100-80GB --quantize int4 --context 32768 --batch 1``.

Every figure is arithmetic on the :class:`~workbench.models.llama4.config.ModelConfig` (a preset or a
checkpoint's config.json); nothing about a model is hard-coded here. Per device (one GPU, or one
rank of a tensor-parallel layout), in bytes:

**Weights by part** (``weights``; parameter counts in ``params``):

* ``attention``: q/k/v/o projections (+ biases, never quantized), quantized when ``quantize_modules``
  names ``attention``;
* ``routed_experts``: ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H) of every MoE layer,
  always quantized when ``quantize`` is set;
* ``router``: (E, H) per MoE layer, never quantized (it decides the routing);
* ``shared_expert``: the shared SwiGLU of every MoE layer, quantized when ``quantize_modules``
  names it;
* ``dense_mlp``: the SwiGLU of the dense layers (``intermediate_size_mlp``), likewise optional;
* ``norms``: RMSNorm weights, never quantized;
* ``embeddings``: ``embed_tokens`` and ``lm_head`` (once when tied), never quantized;
* ``vision``: vision tower + projector, never quantized.

Layouts (bytes per weight matrix of ``out`` output channels and ``red`` reduction elements):

* unquantized: ``out * red * sizeof(dtype)`` (bfloat16 by default);
* ``fp8``: float8_e4m3fn, 1 byte per weight + one float32 scale per output channel:
  ``out * red + 4 * out`` (transformers' fbgemm_fp8 layout: expert scales (E, 1, 2I) and (E, H, 1));
* ``int4``: weight-only, symmetric, group size 128 along the reduction dimension, two values per
  byte + one scale per group: ``out * ceil(red / 2) + out * ceil(red / 128) * sizeof(scale)``
  (``INT4_SCALE_BYTES``: bfloat16 scales).

For the experts (x @ W layout) the reduction dimension of ``gate_up_proj`` is H (2I output
channels), of ``down_proj`` I (H output channels); for a Linear (out, in) it is ``in``.

**KV cache** (``kv_cache``): exactly what :class:`~workbench.runtime.kv_cache.KVCache` allocates for
``batch`` rows of ``context`` slots with prefill blocks of ``block`` tokens: global (NoPE) layers
``context`` slots, chunked (RoPE) layers ``attention_chunk_size + block``; each slot
``2 x Hkv x D`` values in the model dtype, plus each slot's index/position/validity once per kind
of layer (the layers of a kind share them).

**Activations per prefill block** (``activations``): :func:`workbench.runtime.memory.prefill_bytes`
without its KV term: the hidden states of every token (twice: kept, then concatenated), the logits
(every token, or the last ``logits_to_keep``), one block's working set; plus, for quantized
weights, one expert's weights dequantized (the CPU reference path dequantizes per expert block).

**Recorder buffers** (``recorder``, device side; ``recorder_host``: pinned host memory, not counted
against the GPU): per forward pass of ``batch x block`` tokens (N), L MoE layers, top-k, E experts:
``router`` ids and weights as the listeners keep them and stacked (``N L k (2*8 + 2*size + 4)``);
``logits`` (N, L, E) kept per layer and stacked (``2 N L E size``); ``attention`` one (H, Q, P)
float16 map per row with images on the device plus the kernel's 128 MiB working blocks (Q <= block
text queries, P = ``image_tiles x tokens_per_tile`` patches). On the host, up to ``queue_size + 1``
passes (the recorder's queue, default 4, counted with per-token captures in places of the largest
size it has seen and at least 256 tokens, and the pass being built).

**Reserve** (``reserve``): CUDA context, library workspaces and allocator slack, 1 GiB per GPU by
default (not a model figure: a machine one).

Several GPUs (``8xH100-80GB``) mean tensor parallelism as the workbench's runtime defines it: heads,
the experts' and MLPs' intermediate dimension and the vocabulary are split over the ranks, the
router, the norms and the vision tower are replicated; KV heads are split (``ceil(Hkv / n)`` per
rank); activations are counted whole on every rank (an upper bound).

The verdict compares the per-GPU total with the card's memory, and names the cheapest
configuration that fits: the fewest GPU bytes (count x card memory), then the least lossy
quantization (none, fp8, int4), for the same context, batch, block and captures.

These are estimates, not promises: the allocator's fragmentation and the user's own tensors are not
in them. The activation estimate is checked to be an upper bound of the measured peak on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["plan", "Plan", "PlanError", "GPUSpec", "parse_gpus", "CARDS", "QUANTIZE_MODES", "QUANT_MODULES",
           "INT4_GROUP", "INT4_SCALE_BYTES", "FP8_SCALE_BYTES", "weight_bytes", "kv_cache_bytes"]


class PlanError(ValueError):
    """A request the planner cannot answer: bad GPU spec, quantize mode, module name, size."""


GiB = 1 << 30
MiB = 1 << 20

#: Memory of each known card, as ``nvidia-smi`` reports its total (MiB), by the names used in ``--gpus``
CARDS: dict[str, int] = {
    "H100-80GB": 81559 * MiB,
    "H200-141GB": 143771 * MiB,
}
#: Weight formats, from the least to the most lossy
QUANTIZE_MODES = ("none", "fp8", "int4")
#: Optional quantized modules (``quantize_modules=``, the names of :mod:`workbench.quant`); the routed
#: experts are always quantized
QUANT_MODULES = ("shared_expert", "dense_mlp", "attention")
_MODULE_ALIASES = {"shared_expert": "shared_expert", "shared": "shared_expert", "shared_experts": "shared_expert",
                   "dense_mlp": "dense_mlp", "dense": "dense_mlp", "mlp": "dense_mlp", "dense_layers": "dense_mlp",
                   "attention": "attention", "experts": None, "routed_experts": None}
#: int4 group size along the reduction dimension
INT4_GROUP = 128
#: bytes per int4 group scale (bfloat16)
INT4_SCALE_BYTES = 2
#: bytes per FP8 per-output-channel scale (float32)
FP8_SCALE_BYTES = 4
#: tensor-parallel rank counts tried by the search for the cheapest configuration
_SEARCH_COUNTS = (1, 2, 4, 8)
_CAPTURES = ("router", "logits", "attention")
_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
_GPU_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z][A-Za-z0-9]*)-(\d+(?:\.\d+)?)\s*GB\s*$")
PARTS = ("attention", "routed_experts", "router", "shared_expert", "dense_mlp", "norms", "embeddings", "vision")


def _quant_align() -> None:
    """Take the int4 group size and scale dtype from :mod:`workbench.quant.weights` (the loader's
    layout), so that the plan follows the weights the workbench actually builds."""
    global INT4_GROUP, INT4_SCALE_BYTES
    try:
        from workbench.quant import weights as Q
    except Exception:  # pragma: no cover - the layouts stated above
        return
    INT4_GROUP = int(getattr(Q, "INT4_GROUP_SIZE", INT4_GROUP))
    scale = getattr(Q, "INT4_SCALE_DTYPE", None)
    if scale is not None:
        INT4_SCALE_BYTES = int(scale.itemsize)


# ------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPUSpec:
    """``count`` GPUs of ``card`` with ``memory`` bytes each (``spec``: the text it was parsed from)."""

    count: int
    card: str
    memory: int

    @property
    def spec(self) -> str:
        return f"{self.count}x{self.card}"

    @property
    def total_memory(self) -> int:
        return self.count * self.memory


def parse_gpus(spec: str | GPUSpec) -> GPUSpec:
    """``"8xH100-80GB"`` -> GPUSpec(8, "H100-80GB", bytes). Known cards (:data:`CARDS`) use the memory
    ``nvidia-smi`` reports; another ``NAME-<n>GB`` counts n GiB. PlanError for anything else."""
    if isinstance(spec, GPUSpec):
        return spec
    m = _GPU_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise PlanError(f"bad GPU spec {spec!r}: expected COUNTxCARD-MEMORYGB, e.g. "
                        f"{', '.join('1x' + c for c in CARDS)} or 8xH100-80GB")
    count, name, size = int(m.group(1)), m.group(2), m.group(3)
    if count < 1:
        raise PlanError(f"bad GPU spec {spec!r}: the GPU count must be at least 1")
    card = f"{name.upper()}-{size}GB"
    memory = CARDS.get(card, int(float(size) * GiB))
    if memory <= 0:
        raise PlanError(f"bad GPU spec {spec!r}: the memory per GPU must be positive")
    return GPUSpec(count, card, memory)


# ---------------------------------------------------------------------------------- weights
def _dtype_bytes(dtype: Any) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return _DTYPE_BYTES[name]


def _matrix_bytes(out: int, red: int, fmt: str, size: int) -> int:
    """Bytes of one weight matrix with ``out`` output channels and ``red`` reduction elements."""
    if fmt == "none":
        return out * red * size
    if fmt == "fp8":
        return out * red + out * FP8_SCALE_BYTES
    if fmt == "int4":
        return out * math.ceil(red / 2) + out * math.ceil(red / INT4_GROUP) * INT4_SCALE_BYTES
    raise PlanError(f"unknown quantize mode {fmt!r}; choose from {', '.join(QUANTIZE_MODES)}")


def _modules(quantize_modules: Sequence[str] | str | None) -> tuple[str, ...]:
    if quantize_modules is None:
        return ()
    if isinstance(quantize_modules, str):
        quantize_modules = [m for m in quantize_modules.split(",") if m.strip()]
    out = []
    for m in quantize_modules:
        key = str(m).strip().lower()
        if key not in _MODULE_ALIASES:
            raise PlanError(f"unknown module {m!r} in quantize_modules; choose from {', '.join(QUANT_MODULES)} "
                            "(the routed experts are always quantized; router, norms, embeddings and vision never)")
        if _MODULE_ALIASES[key]:
            out.append(_MODULE_ALIASES[key])
    return tuple(dict.fromkeys(out))


def weight_bytes(config, quantize: str = "none", quantize_modules: Sequence[str] | str | None = None,
                 dtype: Any = "bfloat16", tp: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """``(bytes by part, parameters by part)`` of ``config``'s weights on one of ``tp`` ranks (see the
    module docstring for the parts and layouts). ``config``: a ModelConfig (or a TextConfig: no vision)."""
    _quant_align()
    if quantize not in QUANTIZE_MODES:
        raise PlanError(f"unknown quantize mode {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}")
    mods = _modules(quantize_modules)
    size = _dtype_bytes(dtype)
    text = getattr(config, "text", config)
    vision_cfg = getattr(config, "vision", None)
    H, D, V = text.hidden_size, text.head_dim, text.vocab_size
    E, inter, Im = text.num_local_experts, text.intermediate_size, text.intermediate_size_mlp
    nH, nKV = text.num_attention_heads, text.num_key_value_heads
    n_moe = sum(1 for i in range(text.num_hidden_layers) if text.is_moe_layer(i))
    n_dense = text.num_hidden_layers - n_moe
    L = text.num_hidden_layers
    fmt_exp = quantize
    fmt_shared = quantize if "shared_expert" in mods else "none"
    fmt_dense = quantize if "dense_mlp" in mods else "none"
    fmt_attn = quantize if "attention" in mods else "none"

    def split(n: int) -> int:  # a dimension divided over the ranks
        return math.ceil(n / tp)

    q_out, kv_out = split(nH) * D, split(nKV) * D
    attn_p = H * (q_out + 2 * kv_out) + q_out * H
    attn_b = (_matrix_bytes(q_out, H, fmt_attn, size) + 2 * _matrix_bytes(kv_out, H, fmt_attn, size)
              + _matrix_bytes(H, q_out, fmt_attn, size))
    if text.attention_bias:
        attn_p += q_out + 2 * kv_out + H
        attn_b += (q_out + 2 * kv_out + H) * size  # biases stay in the model dtype
    I_r, Im_r = split(inter), split(Im)
    mlp = lambda inter, fmt: 2 * _matrix_bytes(inter, H, fmt, size) + _matrix_bytes(H, inter, fmt, size)  # noqa: E731
    params = {
        "attention": L * attn_p,
        "routed_experts": n_moe * E * 3 * H * I_r,
        "router": n_moe * E * H,
        "shared_expert": n_moe * 3 * H * I_r,
        "dense_mlp": n_dense * 3 * H * Im_r,
        "norms": (2 * L + 1) * H,
        "embeddings": (1 if text.tie_word_embeddings else 2) * split(V) * H,
        "vision": 0,
    }
    if vision_cfg is not None:
        from workbench.models.llama4.config import _vision_parameter_count

        params["vision"] = _vision_parameter_count(vision_cfg, H)
    nbytes = {
        "attention": L * attn_b,
        "routed_experts": n_moe * E * (_matrix_bytes(2 * I_r, H, fmt_exp, size) + _matrix_bytes(H, I_r, fmt_exp, size)),
        "router": params["router"] * size,
        "shared_expert": n_moe * mlp(I_r, fmt_shared),
        "dense_mlp": n_dense * mlp(Im_r, fmt_dense),
        "norms": params["norms"] * size,
        "embeddings": params["embeddings"] * size,
        "vision": params["vision"] * size,
    }
    return nbytes, params


# --------------------------------------------------------------------------------- KV cache
def kv_cache_bytes(text, batch: int, context: int, block: int, dtype: Any = "bfloat16", tp: int = 1) -> int:
    """Bytes :class:`~workbench.runtime.kv_cache.KVCache` allocates (its ``nbytes()``) for ``batch`` rows
    of ``context`` slots and calls of at most ``block`` tokens, KV heads split over ``tp`` ranks."""
    size = _dtype_bytes(dtype)
    block = min(block, context)
    chunk = text.attention_chunk_size
    hkv = math.ceil(text.num_key_value_heads / tp)
    total, kinds = 0, set()
    for rope in text.uses_rope:
        ring = bool(rope) and chunk is not None and chunk + block < context
        S = chunk + block if ring else context
        total += 2 * batch * hkv * S * text.head_dim * size  # key, value
        if ring not in kinds:  # slot metadata, one set per kind of layer (ring / full)
            kinds.add(ring)
            total += S * 8 + batch * S * 8 + batch * S  # index (int64), positions (int64), valid (bool)
    return total


def _prefill_kv_term(text, batch: int, tokens: int, block: int, size: int) -> int:
    """The KV term of :func:`workbench.runtime.memory.prefill_bytes` (to take it out of its total)."""
    from workbench.runtime.memory import prefill_kv_bytes

    return prefill_kv_bytes(text, batch, tokens, block, size)


# --------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The memory plan of one configuration (bytes per GPU; see the module docstring)."""

    model: str
    gpus: GPUSpec
    quantize: str
    quantize_modules: tuple[str, ...]
    dtype: str
    context: int
    batch: int
    block: int
    logits_to_keep: int
    capture: tuple[str, ...]
    image_tiles: int
    weights: dict[str, int]
    params: dict[str, int]
    kv_cache: int
    activations: int
    activation_parts: dict[str, int]
    recorder: int
    recorder_host: int
    recorder_parts: dict[str, int]
    reserve: int
    notes: list[str] = field(default_factory=list)
    cheapest: dict | None = None  # {"gpus", "quantize", "total_bytes", "capacity_bytes"} or None

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total_bytes(self) -> int:
        """Per GPU: weights + KV cache + activations + recorder buffers + reserve."""
        return self.weights_total + self.kv_cache + self.activations + self.recorder + self.reserve

    @property
    def capacity_bytes(self) -> int:
        """Memory of one GPU."""
        return self.gpus.memory

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes

    @property
    def verdict(self) -> str:
        what = f"{self.model} on {self.gpus.spec} with {_quant_words(self.quantize, self.quantize_modules)}"
        per = " per GPU" if self.gpus.count > 1 else ""
        if self.fits:
            head = (f"FITS: {what} needs {_gib(self.total_bytes)} of {_gib(self.capacity_bytes)}{per} "
                    f"({_gib(self.headroom_bytes)} free).")
        else:
            head = (f"DOES NOT FIT: {what} needs {_gib(self.total_bytes)}{per}, the card has "
                    f"{_gib(self.capacity_bytes)} (short by {_gib(-self.headroom_bytes)}).")
        c = self.cheapest
        if c is None:
            tail = (" No configuration tried (1-8 x " + ", ".join(CARDS) + "; none/fp8/int4) fits this context and "
                    "batch: shorten the context, lower the batch or the block, or keep fewer logits.")
        elif c["gpus"] == self.gpus.spec and c["quantize"] == self.quantize:
            tail = " This is the cheapest configuration that fits."
        else:
            tail = (f" Cheapest configuration that fits: --gpus {c['gpus']} --quantize {c['quantize']} "
                    f"({_gib(c['total_bytes'])} of {_gib(c['capacity_bytes'])} per GPU).")
        return head + tail

    def to_dict(self) -> dict:
        """The numbers as JSON types (what ``workbench plan --json`` prints)."""
        d = dataclasses.asdict(self)
        d["gpus"] = {"spec": self.gpus.spec, "count": self.gpus.count, "card": self.gpus.card,
                     "memory_bytes": self.gpus.memory}
        d.update(weights_total=self.weights_total, total_bytes=self.total_bytes, capacity_bytes=self.capacity_bytes,
                 fits=self.fits, headroom_bytes=self.headroom_bytes, verdict=self.verdict)
        return d

    def table(self) -> str:
        """The plan as a text table (what ``workbench plan`` prints)."""
        g = self.gpus
        rows: list[tuple[str, str, str]] = []
        per = f" (per GPU, {g.count}-way tensor parallel)" if g.count > 1 else ""
        head = [f"memory plan: {self.model} on {g.spec} ({_gib(g.memory)} each), "
                f"{_quant_words(self.quantize, self.quantize_modules)}{per}",
                f"  context {self.context:,} tokens x batch {self.batch}, prefill blocks of {self.block:,}, "
                f"logits of {'every token' if self.logits_to_keep <= 0 else f'the last {self.logits_to_keep}'}, "
                f"capture {','.join(self.capture)}"
                + (f", {self.image_tiles} image tile(s) per row" if "attention" in self.capture else "")]
        labels = {"attention": "attention", "routed_experts": "routed experts", "router": "router",
                  "shared_expert": "shared expert", "dense_mlp": "dense MLP", "norms": "norms",
                  "embeddings": "embeddings + lm_head", "vision": "vision tower + projector"}
        for part in PARTS:
            if self.params[part] == 0 and part in ("dense_mlp", "vision"):
                continue
            rows.append((f"  {labels[part]}", f"{self.params[part] / 1e9:,.2f}B params", _gib(self.weights[part])))
        rows.append(("weights", f"{sum(self.params.values()) / 1e9:,.2f}B params", _gib(self.weights_total)))
        rows.append(("KV cache", "", _gib(self.kv_cache)))
        rows.append(("activations per prefill block", "", _gib(self.activations)))
        for k, v in self.activation_parts.items():
            rows.append((f"  {k}", "", _gib(v)))
        rows.append(("recorder buffers (device)", "", _gib(self.recorder)))
        for k, v in self.recorder_parts.items():
            rows.append((f"  {k}", "", _gib(v)))
        rows.append(("reserve (CUDA context, workspaces)", "", _gib(self.reserve)))
        rows.append(("total" + (" per GPU" if g.count > 1 else ""), "", _gib(self.total_bytes)))
        rows.append(("capacity" + (" per GPU" if g.count > 1 else ""), "", _gib(self.capacity_bytes)))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        lines = head + [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
        lines.append(f"recorder host memory (pinned, not on the GPU): {_gib(self.recorder_host)}")
        lines.append(self.verdict)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, p, cycle) -> None:  # IPython
        p.text(self.table())


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _quant_words(quantize: str, mods: Sequence[str]) -> str:
    if quantize == "none":
        return "unquantized weights"
    extra = " + ".join(["routed experts", *(m.replace("_", " ") for m in mods)])
    return f"{quantize} {extra}"


def _config_of(model) -> tuple[Any, str]:
    from workbench.models.llama4.config import PRESETS, ModelConfig, TextConfig, preset

    if isinstance(model, ModelConfig):
        return model, "model"
    if isinstance(model, TextConfig):
        return ModelConfig(text=model, vision=None, architecture="Llama4ForCausalLM"), "model"
    if isinstance(model, str) and model in PRESETS and not Path(model).exists():
        return preset(model), model
    if isinstance(model, (str, Path)):
        return ModelConfig.from_pretrained(model), str(model)
    cfg = getattr(model, "config", None)  # a loaded model
    if isinstance(cfg, (ModelConfig, TextConfig)):
        return _config_of(cfg)[0], type(model).__name__
    raise PlanError(f"model must be a preset name ({', '.join(PRESETS)}), a checkpoint directory, a ModelConfig "
                    f"or a loaded model, got {type(model).__name__}")


def _positive(name: str, v: Any, zero_ok: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        raise PlanError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")
    return v


def _captures(capture) -> tuple[str, ...]:
    if capture is None:
        capture = ()
    if isinstance(capture, str):
        capture = [c for c in capture.split(",") if c.strip()]
    out = ["router"]
    for c in capture:
        c = str(c).strip()
        if c not in _CAPTURES:
            raise PlanError(f"unknown capture {c!r}; choose from {', '.join(_CAPTURES)}")
        out.append(c)
    return tuple(dict.fromkeys(out))


def _recorder(text, vision, batch: int, block: int, size: int, capture: tuple[str, ...], image_tiles: int,
              tp: int, queue_size: int) -> tuple[dict[str, int], int]:
    from workbench.hooks.inbox import PLACE_TOKENS

    N = batch * block
    L = len(text.moe_layers)
    k, E = text.num_experts_per_tok, text.num_local_experts
    # host: queue_size places of the queue (with per-token captures only: at least PLACE_TOKENS
    # tokens each) and the pass being built
    held = queue_size * (N if "attention" in capture else max(N, PLACE_TOKENS)) + N
    dev: dict[str, int] = {}
    host = 0
    if "router" in capture:
        dev["router capture"] = N * L * k * (2 * 8 + 2 * size + 4)
        host += held * L * k * (8 + 4)
    if "logits" in capture:
        dev["logits capture"] = 2 * N * L * E * size
        host += held * L * E * size + N * L * E * 4
    if "attention" in capture:
        P = image_tiles * (vision.tokens_per_tile if vision is not None else 0)
        Q = max(0, block - P)
        heads = math.ceil(text.num_attention_heads / tp)
        if P:
            try:
                from workbench.kernels.attention_map import _BLOCK_BYTES as work
            except Exception:  # pragma: no cover - the kernel's documented working block
                work = 128 * MiB
            dev["attention capture"] = batch * heads * Q * P * 2 + work
            host += (queue_size + 1) * batch * text.num_hidden_layers * text.num_attention_heads * Q * P * 2
        else:
            dev["attention capture"] = 0
    return dev, host


def _one(config, name: str, gpus: GPUSpec, quantize: str, mods: tuple[str, ...], dtype: str, context: int,
         batch: int, block: int, logits_to_keep: int, capture: tuple[str, ...], image_tiles: int, reserve: int,
         queue_size: int) -> Plan:
    from workbench.runtime.memory import prefill_bytes

    text = config.text
    tp = gpus.count
    size = _dtype_bytes(dtype)
    weights, params = weight_bytes(config, quantize, mods, dtype, tp)
    kv = kv_cache_bytes(text, batch, context, block, dtype, tp)
    import torch

    tdtype = {2: torch.bfloat16, 4: torch.float32}[size]
    acts_all = prefill_bytes(text, batch, context, block, tdtype, logits_to_keep)
    acts = acts_all - _prefill_kv_term(text, batch, context, block, size)
    parts = {
        "hidden states (kept + concatenated)": 2 * batch * context * text.hidden_size * size,
        "logits": batch * (context if logits_to_keep <= 0 else min(context, logits_to_keep)) * text.vocab_size * size,
    }
    parts["one block's working set"] = acts - sum(parts.values())
    if quantize != "none":
        H, inter = text.hidden_size, math.ceil(text.intermediate_size / tp)
        widest = max(inter, math.ceil(text.intermediate_size_mlp / tp) if "dense_mlp" in mods else 0)
        parts["one expert dequantized (CPU path)"] = 3 * H * widest * size
        acts += parts["one expert dequantized (CPU path)"]
    rec, rec_host = _recorder(text, config.vision, batch, block, size, capture, image_tiles, tp, queue_size)
    notes = []
    logits = parts["logits"]
    if logits_to_keep <= 0 and context > 1 and logits > 0.1 * (sum(weights.values()) + kv + acts):
        notes.append(f"the logits of every token take {_gib(logits)}; keeping only the last token's "
                     f"(logits_to_keep=1, --logits-to-keep 1, what generation does) saves "
                     f"{_gib(logits - batch * text.vocab_size * size)}")
    if context > text.max_position_embeddings:
        notes.append(f"context {context:,} exceeds the model's max_position_embeddings "
                     f"{text.max_position_embeddings:,}: the model refuses such inputs")
    if "attention" in capture and image_tiles == 0:
        notes.append("attention capture with no image tiles (--image-tiles N): the maps are empty")
    if quantize == "none" and mods:
        notes.append("quantize_modules has no effect without --quantize fp8|int4")
    return Plan(model=name, gpus=gpus, quantize=quantize, quantize_modules=mods, dtype=dtype, context=context,
                batch=batch, block=block, logits_to_keep=logits_to_keep, capture=capture, image_tiles=image_tiles,
                weights=weights, params=params, kv_cache=kv, activations=acts, activation_parts=parts,
                recorder=sum(rec.values()), recorder_host=rec_host, recorder_parts=rec,
                reserve=reserve, notes=notes)


def _check_tp(text, gpus: GPUSpec) -> str | None:
    n = gpus.count
    if n == 1:
        return None
    for key in ("num_attention_heads", "intermediate_size"):
        v = getattr(text, key)
        if v % n:
            return f"{n} GPUs cannot split {key}={v} evenly (tensor parallelism splits heads and intermediate dims)"
    return None


def plan(model: Any = "scout", gpus: str | GPUSpec = "1xH100-80GB", quantize: str = "none", *,
         context: int = 8192, batch: int = 1, capture: Sequence[str] | str | None = ("router",),
         quantize_modules: Sequence[str] | str | None = None, dtype: str = "bfloat16", block: int | None = None,
         logits_to_keep: int = 0, image_tiles: int | None = None, reserve: int = GiB,
         queue_size: int = 4) -> Plan:
    """The memory plan of running ``model`` on ``gpus`` (see the module docstring for every figure).

    model: a preset name (``"scout"``, ``"maverick"``), a checkpoint directory (its config.json), a
    ModelConfig / TextConfig or a loaded model. gpus: ``"1xH100-80GB"``, ``"8xH100-80GB"``,
    ``"1xH200-141GB"`` (COUNTxCARD-MEMORYGB). quantize: ``"none"``, ``"fp8"`` or ``"int4"`` (routed
    experts always; ``quantize_modules``: also ``"shared_expert"`` and/or ``"dense_mlp"``). context:
    tokens per row (prompt + generated); batch: rows. capture: what a recording captures (``router``
    always; ``logits``, ``attention``). dtype: of the unquantized weights, activations and KV cache.
    block: prefill block (default: the model's ``DEFAULT_PREFILL_CHUNK``). logits_to_keep: 0 = logits
    of every token (a plain forward, ``workbench trace``), n = the last n (generation: 1).
    image_tiles: image tiles per row for the attention capture (default 17 when ``attention`` is
    captured: 16 tiles + the global thumbnail, the processor's largest image; else 0). reserve: bytes
    per GPU kept for the CUDA context and workspaces. queue_size: the recorder's queue.

    Returns a :class:`Plan`: ``weights`` by part, ``kv_cache``, ``activations``, ``recorder``,
    ``total_bytes`` vs ``capacity_bytes`` per GPU, ``fits``, ``verdict`` and ``cheapest`` (the cheapest
    configuration that fits). PlanError for a bad request.
    """
    config, name = _config_of(model)
    g = parse_gpus(gpus)
    if quantize not in QUANTIZE_MODES:
        raise PlanError(f"unknown quantize mode {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}")
    mods = _modules(quantize_modules)
    _dtype_bytes(dtype)
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(dtype).removeprefix("torch."),
                                                                          str(dtype).removeprefix("torch."))
    _positive("context", context)
    _positive("batch", batch)
    _positive("logits_to_keep", logits_to_keep, zero_ok=True)
    _positive("reserve", reserve, zero_ok=True)
    _positive("queue_size", queue_size)
    caps = _captures(capture)
    if block is None:
        from workbench.models.llama4.model import DEFAULT_PREFILL_CHUNK

        block = DEFAULT_PREFILL_CHUNK
    _positive("block", block)
    block = min(block, context)
    if image_tiles is None:
        image_tiles = 17 if "attention" in caps and config.vision is not None else 0
    _positive("image_tiles", image_tiles, zero_ok=True)
    if image_tiles and config.vision is None:
        raise PlanError(f"image_tiles={image_tiles}, but {name} has no vision tower")
    why = _check_tp(config.text, g)
    if why:
        raise PlanError(why)
    args = dict(mods=mods, dtype=dtype, context=context, batch=batch, block=block, logits_to_keep=logits_to_keep,
                capture=caps, image_tiles=image_tiles, reserve=reserve, queue_size=queue_size)
    result = _one(config, name, g, quantize, **args)
    result.cheapest = _cheapest(config, name, result, args)
    return result


def _cheapest(config, name: str, mine: Plan, args: dict) -> dict | None:
    """The fitting configuration with the fewest GPU bytes, then the least lossy quantization."""
    cands = [GPUSpec(n, card, mem) for n in _SEARCH_COUNTS for card, mem in CARDS.items()]
    if mine.gpus not in cands:
        cands.append(mine.gpus)
    cands.sort(key=lambda g: (g.total_memory, g.count))
    for g in cands:
        if _check_tp(config.text, g):
            continue
        for q in QUANTIZE_MODES:
            p = mine if (g == mine.gpus and q == mine.quantize) else _one(config, name, g, q, **args)
            if p.fits:
                return {"gpus": g.spec, "quantize": q, "total_bytes": p.total_bytes, "capacity_bytes": p.capacity_bytes}
    return None


def plan_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2, default=str)
