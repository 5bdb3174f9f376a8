"""Quantized modules and which modules a quantization mode covers.

* :class:`QuantizedTextExperts` -- drop-in for ``Llama4TextExperts``: parameters ``gate_up_proj``,
  ``gate_up_proj_scale``, ``down_proj``, ``down_proj_scale`` (the checkpoint keys: for FP8 exactly
  transformers' ``FbgemmFp8Llama4TextExperts`` layout), while the attributes ``.gate_up_proj`` /
  ``.down_proj`` return the typed weights (:class:`~workbench.quant.weights.Fp8Weight` /
  :class:`~workbench.quant.weights.Int4Weight`) that ``workbench.kernels.moe_experts`` takes.
* :class:`QuantLinear` -- drop-in for ``nn.Linear``: ``weight`` (quantized data, (out, in) or
  packed) + ``weight_scale`` (+ ``bias`` unquantized); ``.qweight`` is the typed weight. The
  forward dequantizes the weight in the input's dtype and calls ``F.linear`` (one transient copy
  of that matrix).

What a mode may quantize (:func:`select_modules`): routed experts always; ``shared_expert``,
``dense_mlp`` (the feed-forward of non-MoE layers) and ``attention`` (q/k/v/o projections) when
asked. The router (it decides routing), norms, embeddings, ``lm_head`` and the vision tower are
never quantized on the fly: asking for them is an error, not a silent no-op.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.llama4.model import Llama4TextExperts
from workbench.quant.weights import (FP8_DTYPE, INT4_GROUP_SIZE, INT4_SCALE_DTYPE, KINDS, Fp8Weight, Int4Weight,
                                     QuantizedWeight)

__all__ = ["QuantizedTextExperts", "QuantLinear", "QUANTIZABLE", "NEVER_QUANTIZED", "parse_modules",
           "select_modules", "fbgemm_converts", "apply_structure", "storage_shapes"]

QUANTIZABLE = ("experts", "shared_expert", "dense_mlp", "attention")
NEVER_QUANTIZED = ("router", "embed_tokens", "norm", "lm_head", "vision_model", "multi_modal_projector")


def storage_shapes(kind: str, shape, layout: str, group_size: int = INT4_GROUP_SIZE,
                   expert_scale: str | None = None):
    """(data shape, data dtype, scale shape, scale dtype) of a weight of logical ``shape``.

    ``expert_scale``: for FP8 experts the checkpoint's scale shapes: ``"gate_up"`` (E, 1, 2I),
    ``"down"`` (E, H, 1) (transformers' FbgemmFp8Llama4TextExperts)."""
    shape = list(shape)
    kd = len(shape) - 2 if layout == "kn" else len(shape) - 1
    if kind == "fp8":
        s = list(shape)
        s[kd] = 1
        if expert_scale == "down":  # stored (E, H, 1): one scale per output channel h
            s = [shape[0], shape[2], 1]
        return tuple(shape), FP8_DTYPE, tuple(s), torch.float32
    if kind == "int4":
        d, s = list(shape), list(shape)
        d[kd] //= 2
        s[kd] = math.ceil(shape[kd] / group_size)
        return tuple(d), torch.uint8, tuple(s), INT4_SCALE_DTYPE
    raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")


def _typed(kind: str, data: torch.Tensor, scale: torch.Tensor, layout: str, shape, group_size: int,
           expert_scale: str | None = None) -> QuantizedWeight:
    data, scale = data.detach(), scale.detach()
    if kind == "fp8":
        if expert_scale == "down":
            scale = scale.transpose(-1, -2)  # (E, H, 1) -> (E, 1, H), a view
        return Fp8Weight(data, scale, layout, shape)
    return Int4Weight(data, scale, layout, shape, group_size=group_size)


def _empty_param(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantizedTextExperts(Llama4TextExperts):
    """Routed experts with quantized weights (x @ W layout, "kn"): ``gate_up_proj`` logical (E, H, 2I)
    gate first, ``down_proj`` logical (E, I, H).

    Stored parameters (= checkpoint keys): FP8: ``gate_up_proj`` (E, H, 2I) float8_e4m3fn,
    ``gate_up_proj_scale`` (E, 1, 2I) float32, ``down_proj`` (E, I, H) float8_e4m3fn,
    ``down_proj_scale`` (E, H, 1) float32 (per output channel). int4: ``gate_up_proj`` (E, H/2, 2I)
    uint8, ``gate_up_proj_scale`` (E, ceil(H/g), 2I) bfloat16, ``down_proj`` (E, I/2, H) uint8,
    ``down_proj_scale`` (E, ceil(I/g), H) bfloat16 (see :mod:`workbench.quant.weights`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, kind: str,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        nn.Module.__init__(self)  # not Llama4TextExperts.__init__: its float parameters are replaced
        if kind not in KINDS:
            raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.group_size = kind, int(group_size)
        E, H, I = num_experts, hidden_size, intermediate_size
        self._logical = {"gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H)}
        for name, shape in self._logical.items():
            ds, dd, ss, sd = storage_shapes(kind, shape, "kn", self.group_size, name.removesuffix("_proj"))
            self._parameters[name] = _empty_param(ds, dd)
            self._parameters[name + "_scale"] = _empty_param(ss, sd)

    @classmethod
    def from_float(cls, experts: nn.Module, kind: str, group_size: int = INT4_GROUP_SIZE) -> "QuantizedTextExperts":
        """Quantize a float ``Llama4TextExperts`` (its weights are read, not changed)."""
        gu, dp = experts.gate_up_proj.detach(), experts.down_proj.detach()
        E, H, I2 = gu.shape
        with torch.device("meta"):
            q = cls(E, H, I2 // 2, kind, group_size)
        q.load_float("gate_up_proj", gu)
        q.load_float("down_proj", dp)
        return q

    def load_float(self, name: str, w: torch.Tensor) -> None:
        """Quantize the float weight ``w`` (logical shape) into parameters ``name`` + ``name_scale``."""
        from workbench.quant.weights import quantize

        if tuple(w.shape) != self._logical[name]:
            raise ValueError(f"{name}: expected shape {self._logical[name]}, got {tuple(w.shape)}")
        qw = quantize(w, self.kind, "kn", self.group_size)
        scale = qw.scale
        if self.kind == "fp8" and name == "down_proj":
            scale = scale.transpose(-1, -2).contiguous()  # (E, 1, H) -> stored (E, H, 1)
        self._parameters[name] = nn.Parameter(qw.data, requires_grad=False)
        self._parameters[name + "_scale"] = nn.Parameter(scale, requires_grad=False)

    def _weight(self, name: str) -> QuantizedWeight:
        return _typed(self.kind, self._parameters[name], self._parameters[name + "_scale"], "kn",
                      self._logical[name], self.group_size, name.removesuffix("_proj"))

    @property
    def gate_up_proj(self) -> QuantizedWeight:  # what Llama4TextMoe passes to moe_experts
        return self._weight("gate_up_proj")

    @property
    def down_proj(self) -> QuantizedWeight:
        return self._weight("down_proj")

    def extra_repr(self) -> str:
        E, H, I2 = self._logical["gate_up_proj"]
        g = f", group_size={self.group_size}" if self.kind == "int4" else ""
        return f"{self.kind}, experts={E}, hidden={H}, intermediate={I2 // 2}{g}"


class QuantLinear(nn.Module):
    """``nn.Linear`` with a quantized weight ("nk" layout); see the module docstring.

    Parameters: ``weight`` (FP8: (out, in) float8_e4m3fn; int4: (out, in/2) uint8), ``weight_scale``
    (FP8: (out, 1) float32 as transformers' FbgemmFp8Linear; int4: (out, ceil(in/g)) bfloat16),
    ``bias`` (out,) unquantized or absent.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.group_size = kind, int(group_size)
        ds, dd, ss, sd = storage_shapes(kind, (out_features, in_features), "nk", self.group_size)
        self.weight = _empty_param(ds, dd)
        self.weight_scale = _empty_param(ss, sd)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, kind: str, group_size: int = INT4_GROUP_SIZE) -> "QuantLinear":
        with torch.device("meta"):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, kind, group_size)
        q.load_float(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def load_float(self, w: torch.Tensor) -> None:
        from workbench.quant.weights import quantize

        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape {(self.out_features, self.in_features)}, got {tuple(w.shape)}")
        qw = quantize(w, self.kind, "nk", self.group_size)
        self._parameters["weight"] = nn.Parameter(qw.data, requires_grad=False)
        self._parameters["weight_scale"] = nn.Parameter(qw.scale, requires_grad=False)

    @property
    def qweight(self) -> QuantizedWeight:
        return _typed(self.kind, self.weight, self.weight_scale, "nk", (self.out_features, self.in_features),
                      self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.qweight.dequantize(x.dtype), b)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.kind == "int4" else ""
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}{g}"


# --------------------------------------------------------------------------- which modules

def parse_modules(quantize_modules) -> tuple[str, ...]:
    """Normalize ``quantize_modules`` (None, a comma-separated string or an iterable of names) to a
    sorted tuple that always holds ``"experts"``. Unknown names and never-quantized parts raise
    ValueError naming them."""
    if quantize_modules is None:
        names = []
    elif isinstance(quantize_modules, str):
        names = [n.strip() for n in quantize_modules.split(",") if n.strip()]
    else:
        names = list(quantize_modules)
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"quantize_modules: names must be strings, got {n!r}")
        if n in NEVER_QUANTIZED or n in ("vision", "embeddings", "norms"):
            raise ValueError(f"quantize_modules: {n!r} is never quantized (the router decides routing; norms, "
                             f"embeddings, lm_head and the vision tower stay in the model dtype); quantizable: "
                             f"{', '.join(QUANTIZABLE)}")
        if n not in QUANTIZABLE:
            raise ValueError(f"quantize_modules: unknown part {n!r}; quantizable: {', '.join(QUANTIZABLE)}")
    return tuple(sorted(set(names) | {"experts"}, key=QUANTIZABLE.index))


def _text_layers(model: nn.Module):
    lm = getattr(model, "language_model", model)
    return lm.model.layers, ("language_model.model.layers" if lm is not model else "model.layers")


def select_modules(model: nn.Module, parts) -> dict[str, str]:
    """{module name: "experts" | "linear"} of the modules that ``parts`` (from :func:`parse_modules`)
    quantize in ``model`` (a workbench Llama 4, e.g. on the meta device)."""
    layers, prefix = _text_layers(model)
    out: dict[str, str] = {}
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        ff = layer.feed_forward
        if getattr(layer, "is_moe_layer", False):
            if "experts" in parts:
                out[f"{base}.feed_forward.experts"] = "experts"
            if "shared_expert" in parts:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{base}.feed_forward.shared_expert.{p}"] = "linear"
        elif "dense_mlp" in parts:
            for p in ("gate_proj", "up_proj", "down_proj"):
                if isinstance(getattr(ff, p, None), nn.Linear):
                    out[f"{base}.feed_forward.{p}"] = "linear"
        if "attention" in parts:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{base}.self_attn.{p}"] = "linear"
    return out


def fbgemm_converts(name: str, modules_to_not_convert) -> bool:
    """Whether transformers' fbgemm_fp8 integration converts module ``name`` (its
    ``should_convert_module`` rule): a pattern skips the module when it matches from the start up
    to a module boundary (``layers.1`` matches ``layers.1.x``, not ``layers.11``), as a regex with
    that boundary, or as a suffix. None converts everything (callers drop ``lm_head`` first, as
    transformers' default skip list does)."""
    if modules_to_not_convert is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in modules_to_not_convert:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return False
        except re.error:
            pass
        if name.endswith(key):
            return False
    return True


def apply_structure(model: nn.Module, selected: dict[str, str], kind: str,
                    group_size: int = INT4_GROUP_SIZE) -> None:
    """Replace the selected modules of ``model`` (built on the meta device) by empty quantized ones."""
    for name, what in selected.items():
        old = model.get_submodule(name)
        if what == "experts":
            E, H, I2 = old.gate_up_proj.shape
            with torch.device(old.gate_up_proj.device):
                new = QuantizedTextExperts(E, H, I2 // 2, kind, group_size)
        else:
            if not isinstance(old, nn.Linear):
                raise ValueError(f"{name} is a {type(old).__name__}, not a Linear layer: it cannot be quantized")
            with torch.device(old.weight.device):
                new = QuantLinear(old.in_features, old.out_features, old.bias is not None, kind, group_size)
        model.set_submodule(name, new)
