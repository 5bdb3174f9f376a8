"""Quantized weight types: data + scales + layout, never loose tuples.

Two layouts name where the reduction (input) dimension K and the output dimension N lie:

* ``"kn"``: ``x @ W`` with W (..., K, N) -- the routed experts (``gate_up_proj`` (E, H, 2I),
  ``down_proj`` (E, I, H)).
* ``"nk"``: ``F.linear(x, W)`` with W (..., N, K) -- ``nn.Linear.weight`` (out, in).

:class:`Fp8Weight` -- FP8 per output channel (transformers' fbgemm_fp8 / Maverick's official
checkpoint): ``data`` float8_e4m3fn with the logical shape; ``scale`` float32 with size 1 along K
and N along the output dimension, broadcastable against ``data`` ("kn": (..., 1, N), "nk":
(..., N, 1)); W = data * scale. Quantization: s = amax_K |W| / 448 (1 where a channel is all
zero), q = clamp(W / s, -448, 448) rounded to the nearest float8_e4m3fn (ties to even).

:class:`Int4Weight` -- int4 weight-only, symmetric, groups of ``group_size`` (default 128)
consecutive elements along K, two values per byte: with G = ceil(K / group_size) groups (the last
may be shorter) and q in [-8, 7], ``data`` uint8 holds q + 8 with element 2j of K in the LOW
nibble and element 2j+1 in the HIGH nibble of byte j ("kn": (..., K/2, N), "nk": (..., N, K/2));
``scale`` bfloat16 per (group, output channel) ("kn": (..., G, N), "nk": (..., N, G)); W[k, n] =
q[k, n] * scale[k // group_size, n]. Quantization: s = amax_group |W| / 7 rounded to bfloat16 (1
for an all-zero group), q = clamp(round_half_even(W / s), -8, 7). K must be even.

Dequantization computes q * s in float32 (float64 when asked for float64) and rounds once to the
requested dtype.
"""
from __future__ import annotations

import math

import torch

__all__ = ["QuantizedWeight", "Fp8Weight", "Int4Weight", "quantize", "quantize_fp8", "quantize_int4",
           "FP8_DTYPE", "FP8_MAX", "INT4_GROUP_SIZE", "INT4_SCALE_DTYPE", "KINDS", "quantized_nbytes"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUP_SIZE = 128
INT4_SCALE_DTYPE = torch.bfloat16
KINDS = ("fp8", "int4")
_LAYOUTS = ("kn", "nk")
# elements quantized per step: keeps the float32 temporaries of one tensor small (host memory)
_CHUNK_ELEMENTS = 1 << 26


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'kn' (x @ W, W (..., K, N)) or 'nk' (nn.Linear, W (..., N, K)), "
                         f"got {layout!r}")


class QuantizedWeight:
    """Base of the quantized weight types: ``data``, ``scale``, ``layout`` and the logical ``shape``.

    Behaves enough like a tensor for shape checks (``shape``, ``dim()``, ``device``, ``ndim``) and
    is never a ``torch.Tensor``, so code that needs values must call :meth:`dequantize`.
    """

    kind: str = ""
    requires_grad = False
    is_quantized = True

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, layout: str, shape) -> None:
        _check_layout(layout)
        self.data, self.scale, self.layout = data, scale, layout
        self.shape = torch.Size(shape)

    # tensor-like metadata
    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of data plus scales (what the weight occupies in memory)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, e: int) -> "QuantizedWeight":
        """Leading-dimension index (one expert of an (E, K, N) weight), same type and layout."""
        if self.dim() < 3:
            raise IndexError(f"index a stacked (E, ...) weight, this one has shape {tuple(self.shape)}")
        return type(self)(self.data[e], self.scale[e], self.layout, self.shape[1:], **self._extra())

    def to(self, device=None) -> "QuantizedWeight":
        return type(self)(self.data.to(device), self.scale.to(device), self.layout, self.shape, **self._extra())

    def _extra(self) -> dict:
        return {}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, layout={self.layout!r}, data={self.data.dtype}, "
                f"scale={tuple(self.scale.shape)} {self.scale.dtype}{self._repr_extra()}, device={self.device})")

    def _repr_extra(self) -> str:
        return ""


class Fp8Weight(QuantizedWeight):
    """FP8 (float8_e4m3fn) per-output-channel weight; see the module docstring for the layout."""

    kind = "fp8"

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, layout: str = "kn", shape=None) -> None:
        super().__init__(data, scale, layout, data.shape if shape is None else shape)
        if data.dtype != FP8_DTYPE:
            raise ValueError(f"Fp8Weight data must be {FP8_DTYPE}, got {data.dtype}")
        if scale.dtype != torch.float32:
            raise ValueError(f"Fp8Weight scale must be float32, got {scale.dtype}")
        want = list(data.shape)
        want[-2 if layout == "kn" else -1] = 1
        if tuple(scale.shape) != tuple(want):
            raise ValueError(f"Fp8Weight scale must have shape {tuple(want)} for data {tuple(data.shape)} "
                             f"(layout {layout!r}: one scale per output channel), got {tuple(scale.shape)}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ct = torch.promote_types(torch.float32, dtype)
        return (self.data.to(ct) * self.scale.to(ct)).to(dtype)


class Int4Weight(QuantizedWeight):
    """int4 weight-only, symmetric, grouped along K, two values per byte; see the module docstring."""

    kind = "int4"

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, layout: str = "kn", shape=None, *,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        if shape is None:
            shape = list(data.shape)
            shape[-2 if layout == "kn" else -1] *= 2
        super().__init__(data, scale, layout, shape)
        self.group_size = int(group_size)
        if data.dtype != torch.uint8:
            raise ValueError(f"Int4Weight data must be uint8 (two values per byte), got {data.dtype}")
        if scale.dtype != INT4_SCALE_DTYPE:
            raise ValueError(f"Int4Weight scale must be {INT4_SCALE_DTYPE}, got {scale.dtype}")
        kd = -2 if layout == "kn" else -1
        K = self.shape[kd]
        if K % 2 or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"Int4Weight needs an even K and an even group size, got K={K}, "
                             f"group_size={self.group_size}")
        want_d, want_s = list(self.shape), list(self.shape)
        want_d[kd] = K // 2
        want_s[kd] = math.ceil(K / self.group_size)
        if tuple(data.shape) != tuple(want_d) or tuple(scale.shape) != tuple(want_s):
            raise ValueError(f"Int4Weight of shape {tuple(self.shape)} (layout {layout!r}, group {self.group_size}) "
                             f"needs data {tuple(want_d)} and scale {tuple(want_s)}, got {tuple(data.shape)} and "
                             f"{tuple(scale.shape)}")

    def _extra(self) -> dict:
        return {"group_size": self.group_size}

    def _repr_extra(self) -> str:
        return f", group_size={self.group_size}"

    def int_values(self) -> torch.Tensor:
        """The integers q in [-8, 7] (int8, logical shape)."""
        d = self.data if self.layout == "kn" else self.data.transpose(-1, -2)
        lo = (d & 0xF).to(torch.int8) - 8
        hi = (d >> 4).to(torch.int8) - 8
        q = torch.stack((lo, hi), dim=-2).flatten(-3, -2)  # (..., K/2, 2, N) -> (..., K, N)
        return q if self.layout == "kn" else q.transpose(-1, -2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kd = -2 if self.layout == "kn" else -1
        K = self.shape[kd]
        ct = torch.promote_types(torch.float32, dtype)
        s = self.scale.to(ct).repeat_interleave(self.group_size, dim=kd).narrow(kd, 0, K)
        return (self.int_values().to(ct) * s).to(dtype)


# --------------------------------------------------------------------------- quantization

def _chunks(w: torch.Tensor):
    """Slices of the leading dimension (or of rows, for a 2-D weight) holding about
    _CHUNK_ELEMENTS elements each: the float32 temporaries stay one chunk large."""
    if w.dim() >= 3:
        per = max(1, _CHUNK_ELEMENTS // max(1, w[0].numel()))
        return [slice(i, i + per) for i in range(0, w.shape[0], per)]
    return [slice(None)]


def quantize_fp8(w: torch.Tensor, layout: str = "kn") -> Fp8Weight:
    """:class:`Fp8Weight` of ``w`` (float tensor), per output channel; computed on w's device,
    one leading-dim chunk at a time (float32 temporaries of one chunk)."""
    _check_layout(layout)
    if w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"quantize a floating weight of 2 or more dims, got {tuple(w.shape)} {w.dtype}")
    kd = -2 if layout == "kn" else -1
    data = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    sshape = list(w.shape)
    sshape[kd] = 1
    scale = torch.empty(sshape, dtype=torch.float32, device=w.device)
    for sl in _chunks(w):
        wf = w[sl].float()
        amax = wf.abs().amax(dim=kd, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        data[sl] = (wf / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[sl] = s
    return Fp8Weight(data, scale, layout)


def quantize_int4(w: torch.Tensor, layout: str = "kn", group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """:class:`Int4Weight` of ``w`` (float tensor): symmetric, groups of ``group_size`` along K."""
    _check_layout(layout)
    if w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"quantize a floating weight of 2 or more dims, got {tuple(w.shape)} {w.dtype}")
    if layout == "nk":  # quantize the transposed view in "kn", store back in "nk"
        q = quantize_int4(w.transpose(-1, -2), "kn", group_size)
        return Int4Weight(q.data.transpose(-1, -2).contiguous(), q.scale.transpose(-1, -2).contiguous(), "nk",
                          w.shape, group_size=group_size)
    K, N = w.shape[-2], w.shape[-1]
    if K % 2 or group_size < 2 or group_size % 2:
        raise ValueError(f"int4 needs an even reduction size K and an even group size, got K={K}, "
                         f"group_size={group_size} for a weight of shape {tuple(w.shape)}")
    G = math.ceil(K / group_size)
    lead = tuple(w.shape[:-2])
    data = torch.empty(*lead, K // 2, N, dtype=torch.uint8, device=w.device)
    scale = torch.empty(*lead, G, N, dtype=INT4_SCALE_DTYPE, device=w.device)
    pad = G * group_size - K
    for sl in _chunks(w) if lead else [slice(None)]:
        wf = w[sl].float() if lead else w.float()
        if pad:
            wf = torch.nn.functional.pad(wf, (0, 0, 0, pad))
        g = wf.unflatten(-2, (G, group_size))                            # (..., G, group, N)
        amax = g.abs().amax(dim=-2)                                       # (..., G, N)
        s = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax)).to(INT4_SCALE_DTYPE)
        q = torch.round(g / s.float().unsqueeze(-2)).clamp_(-8, 7).flatten(-3, -2)[..., :K, :]
        u = (q + 8).to(torch.uint8)
        packed = u[..., 0::2, :] | (u[..., 1::2, :] << 4)
        if lead:
            data[sl], scale[sl] = packed, s
        else:
            data.copy_(packed)
            scale.copy_(s)
    return Int4Weight(data, scale, "kn", w.shape, group_size=group_size)


def quantize(w: torch.Tensor, kind: str, layout: str = "kn", group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """``quantize_fp8`` or ``quantize_int4`` by name."""
    if kind == "fp8":
        return quantize_fp8(w, layout)
    if kind == "int4":
        return quantize_int4(w, layout, group_size)
    raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")


def quantized_nbytes(shape, kind: str, layout: str = "kn", group_size: int = INT4_GROUP_SIZE) -> int:
    """Bytes of a weight of logical ``shape`` quantized as ``kind`` (data + scales), without
    building it: what a memory planner needs."""
    shape = list(shape)
    kd = len(shape) - 2 if layout == "kn" else len(shape) - 1
    n = math.prod(shape)
    if kind == "fp8":
        return n + 4 * n // shape[kd]
    if kind == "int4":
        s = list(shape)
        s[kd] = math.ceil(shape[kd] / group_size)
        return n // 2 + 2 * math.prod(s)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
