"""Llama 4 vision tower and multimodal projector in plain PyTorch.

A line-for-line functional re-implementation of transformers' ``Llama4VisionModel`` and
``Llama4MultiModalProjector`` (checked against transformers 5.23 in tests/test_vision.py).
Module and parameter names equal transformers', so

    VisionModel(cfg).load_state_dict({k[len("vision_model."):]: v ...})
    MultiModalProjector(cfg, text_hidden).load_state_dict({k[len("multi_modal_projector."):]: v ...})

load a Llama4ForConditionalGeneration checkpoint with ``strict=True``.

Data flow for one 336x336 tile (Scout numbers; S = image_size, P = patch_size, G = S // P = 24):

    pixel_values (N, 3, 336, 336)
    -> unfold into G*G = 576 patches of 3*14*14 = 588 values, linear (no bias)   (N, 576, 1408)
    -> append the class token at the END                                        (N, 577, 1408)
    -> + learned positional embedding (577 rows), LayerNorm (layernorm_pre)
    -> 34 encoder layers: pre-LN, bidirectional attention with 2-D RoPE, pre-LN GELU MLP
    -> LayerNorm (layernorm_post), drop the class token                         (N, 576, 1408)
    -> pixel shuffle 0.5: 2x2 neighbouring patches concatenated channel-wise    (N, 144, 5632)
    -> MLP2: fc1 (no bias), GELU, dropout, fc2 (no bias), GELU                  (N, 144, 4096)
    == what transformers' get_image_features returns as last_hidden_state
    -> flatten tiles in order, projector linear_1 (no bias)                     (N*144, 5120)
    == the rows that replace the <|patch|> tokens, in order.

Details reproduced from transformers (some are surprising, all are deliberate):
- LayerNorms use PyTorch's default eps 1e-5; ``norm_eps`` in the config is not read.
- Activations are exact (erf) GELU; ``hidden_act`` in the config is not read.
- fc1 of the adapter maps ``intermediate_size`` -> ``projector_input_dim`` (the pixel-shuffled width
  hidden_size / ratio**2 must therefore equal intermediate_size); fc2 maps
  ``projector_output_dim`` -> ``projector_output_dim``; the projector maps ``vision_output_dim`` ->
  text hidden. The config validation below rejects combinations that cannot run.
- The projector has no bias whatever ``multi_modal_projector_bias`` says.
- ``vision_feature_layer`` / ``vision_feature_select_strategy`` are not read: the features are
  always the last encoder layer (after layernorm_post), class token dropped.
- RoPE is applied in float32 (as transformers does) for float32/bfloat16/float16 inputs. For a
  float64 input this module computes RoPE in float64, whereas transformers rounds q/k through
  float32 there; that is the one deliberate difference (it only makes float64 runs more precise).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VisionConfig",
    "VisionModel",
    "MultiModalProjector",
    "image_features",
    "pixel_shuffle",
    "vision_rope_table",
]


# ----------------------------------------------------------------------------------------------
# Config


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class VisionConfig:
    """The fields of transformers' Llama4VisionConfig that matter here.

    Defaults are Llama 4 Scout's (and Maverick's) released ``vision_config``. They are NOT
    transformers' Llama4VisionConfig() defaults (hidden 768, image 448, vision_output_dim 7680),
    which do not form a runnable model (768 * 4 != intermediate_size 5632).
    """

    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632
    vision_output_dim: int = 4096
    image_size: int = 336
    patch_size: int = 14
    norm_eps: float = 1e-5  # recorded only: transformers' LayerNorms use the default 1e-5
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    multi_modal_projector_bias: bool = False  # recorded only: transformers never adds the bias
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    vision_feature_select_strategy: str = "default"  # recorded only
    vision_feature_layer: int = -1  # recorded only
    hidden_act: str = "gelu"  # recorded only: transformers hard-codes nn.GELU()
    initializer_range: float = 0.02

    # ---- derived sizes ----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """G = image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """G*G patch tokens per tile (without the class token)."""
        return self.patches_per_side**2

    @property
    def shuffled_side(self) -> int:
        """Side of the token grid after pixel shuffle: G * ratio (12 for Scout)."""
        return round(self.patches_per_side * self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Number of <|patch|> tokens one tile turns into (144 for Scout)."""
        return self.shuffled_side**2

    @property
    def shuffled_dim(self) -> int:
        """Channel width after pixel shuffle: hidden_size / ratio**2 (5632 for Scout)."""
        return round(self.hidden_size / self.pixel_shuffle_ratio**2)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key for values that cannot form a working model."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for name, typ in types.items():
            v = getattr(self, name)
            if typ == "int" and not _is_int(v):
                raise ValueError(f"vision_config.{name} must be an int, got {v!r}")
            if typ == "float" and not _is_number(v):
                raise ValueError(f"vision_config.{name} must be a number, got {v!r}")
            if typ == "bool" and not isinstance(v, bool):
                raise ValueError(f"vision_config.{name} must be a bool, got {v!r}")
            if typ == "str" and not isinstance(v, str):
                raise ValueError(f"vision_config.{name} must be a string, got {v!r}")
        for name in ("hidden_size", "num_attention_heads", "num_channels", "intermediate_size",
                     "vision_output_dim", "image_size", "patch_size", "projector_input_dim",
                     "projector_output_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vision_config.{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"vision_config.num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        for name in ("projector_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"vision_config.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise ValueError(f"vision_config.rope_theta must be positive, got {self.rope_theta}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) is not divisible by "
                f"vision_config.patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) is not divisible by "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"vision_config.hidden_size / num_attention_heads = head_dim {self.head_dim} must be "
                "divisible by 4 (2-D RoPE splits each head into x and y halves of complex pairs)"
            )
        r = self.pixel_shuffle_ratio
        if not 0.0 < r <= 1.0:
            raise ValueError(f"vision_config.pixel_shuffle_ratio must be in (0, 1], got {r}")
        g = self.patches_per_side
        for what, value in (("patches_per_side * ratio", g * r), ("hidden_size / ratio", self.hidden_size / r),
                            ("hidden_size / ratio**2", self.hidden_size / r**2)):
            if abs(value - round(value)) > 1e-9:
                raise ValueError(
                    f"vision_config.pixel_shuffle_ratio {r} does not divide evenly: {what} = {value} "
                    f"(image_size {self.image_size}, patch_size {self.patch_size}, hidden_size {self.hidden_size})"
                )
        if self.shuffled_dim != self.intermediate_size:
            raise ValueError(
                f"vision_config.intermediate_size ({self.intermediate_size}) must equal hidden_size / "
                f"pixel_shuffle_ratio**2 = {self.shuffled_dim}: the adapter's fc1 reads the pixel-shuffled "
                "features with intermediate_size inputs"
            )
        if self.projector_input_dim != self.projector_output_dim:
            raise ValueError(
                f"vision_config.projector_input_dim ({self.projector_input_dim}) must equal "
                f"projector_output_dim ({self.projector_output_dim}): the adapter's fc2 is "
                "projector_output_dim x projector_output_dim and reads fc1's output"
            )
        if self.vision_output_dim != self.projector_output_dim:
            raise ValueError(
                f"vision_config.vision_output_dim ({self.vision_output_dim}) must equal "
                f"projector_output_dim ({self.projector_output_dim}): the multimodal projector reads "
                "the adapter's output with vision_output_dim inputs"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """Build from the ``vision_config`` dict of an HF config.json. Unknown keys are ignored.

        ``rope_theta`` is read from ``rope_theta`` (released checkpoints) or
        ``rope_parameters["rope_theta"]`` (transformers 5 serialisation). ``image_size`` and
        ``patch_size`` may be ``[s, s]`` lists (square only).
        """
        if not isinstance(d, dict):
            raise ValueError(f"vision_config must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, dict):
                raise ValueError(f"vision_config.rope_parameters must be a dict, got {rp!r}")
            rope_type = rp.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(
                    f"vision_config.rope_parameters.rope_type {rope_type!r} is not supported "
                    "(the Llama 4 vision RoPE has no scaling; expected 'default')"
                )
            if "rope_theta" in rp:
                if "rope_theta" in kw and kw["rope_theta"] != rp["rope_theta"]:
                    raise ValueError(
                        f"vision_config.rope_theta ({kw['rope_theta']}) disagrees with "
                        f"vision_config.rope_parameters.rope_theta ({rp['rope_theta']})"
                    )
                kw["rope_theta"] = rp["rope_theta"]
        for name in ("image_size", "patch_size"):
            v = kw.get(name)
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ValueError(f"vision_config.{name} must be an int or a square [s, s] pair, got {v!r}")
                kw[name] = v[0]
        for name in ("rope_theta", "norm_eps", "pixel_shuffle_ratio", "projector_dropout", "attention_dropout",
                     "initializer_range"):
            if name in kw and _is_int(kw[name]):
                kw[name] = float(kw[name])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# 2-D rotary embedding


def vision_rope_table(config: VisionConfig, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2-D RoPE angles, each (G*G + 1, head_dim // 2), in ``dtype``.

    Row p < G*G is patch p at (row y, col x) = divmod(p, G); the last row is the class token,
    whose angles are 0 (identity rotation). With head_dim D and f_j = theta**(-4j / D),
    j = 0 .. D/4 - 1, the angles are [(x+1) * f_0 .. (x+1) * f_{D/4-1}, (y+1) * f_0 .. (y+1) * f_{D/4-1}]
    (coordinates are 1-based). Angle i rotates the interleaved pair (q[2i], q[2i+1]).
    Same values as transformers' Llama4VisionRotaryEmbedding._compute_freqs_ci.
    """
    g = config.patches_per_side
    freq_dim = config.head_dim // 2  # complex pairs per head
    exponents = torch.arange(0, freq_dim, 2, device=device)[: freq_dim // 2].to(dtype) / freq_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (head_dim // 4,)
    idx = torch.arange(g * g, device=device)
    x = (idx % g + 1).to(dtype)
    y = (idx // g + 1).to(dtype)
    angles = torch.cat([x[:, None] * inv_freq[None, :], y[:, None] * inv_freq[None, :]], dim=-1)
    angles = torch.cat([angles, angles.new_zeros(1, freq_dim)], dim=0)  # class token: no rotation
    return torch.cos(angles), torch.sin(angles)


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, D) by angles (T, D/2); computed in cos's dtype."""
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    xr, xi = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Encoder


class UnfoldConvolution(nn.Module):
    """Non-overlapping PxP patches -> linear (no bias). (N, C, S, S) -> (N, G*G, hidden).

    Patch order is row-major over the G x G grid; a patch's 588 values are ordered (channel, dy, dx)
    as torch.nn.Unfold lays them out.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (N, C*P*P, G*G)
        return self.linear(x.transpose(1, 2))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with 2-D RoPE; q/k/v/o projections all have biases."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim)
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, is_causal=False,
            dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class VisionMLP(nn.Module):
    """fc1 -> GELU -> fc2, both with bias."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size)  # eps 1e-5, as in transformers
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


# ----------------------------------------------------------------------------------------------
# Pixel shuffle + adapter


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, G*G, C) -> (N, (G*r)**2, C / r**2), same op sequence as transformers' pixel_shuffle.

    For r = 0.5 each output token (i, j) (row-major over the (G/2) x (G/2) grid) is the 2x2 block of
    input patches rows 2i+dy, cols 2j+dx, concatenated in channel order (dy, dx, c).
    """
    n, t, c = x.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"pixel_shuffle needs a square number of tokens, got {t}")
    gr, cr, crr = round(g * ratio), round(c / ratio), round(c / ratio**2)
    x = x.view(n, g, g, c)
    x = x.view(n, g, gr, cr).permute(0, 2, 1, 3).contiguous()  # merge columns into channels
    x = x.view(n, gr, gr, crr).permute(0, 2, 1, 3).contiguous()  # merge rows into channels
    return x.view(n, gr * gr, crr)


class VisionMLP2(nn.Module):
    """fc1 (no bias) -> GELU -> dropout -> fc2 (no bias) -> GELU."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)
        self.dropout = config.projector_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return F.gelu(self.fc2(x))


class VisionPixelShuffleMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.mlp = VisionMLP2(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.pixel_shuffle_ratio))


# ----------------------------------------------------------------------------------------------
# Public modules


class VisionModel(nn.Module):
    """Llama 4 vision tower; state_dict keys equal ``vision_model.*`` of an HF checkpoint.

    Parameters (Scout sizes): patch_embedding.linear.weight (1408, 588), class_embedding (1408,),
    positional_embedding_vlm (577, 1408), layernorm_pre/post.{weight,bias},
    model.layers.{i}.{self_attn.{q,k,v,o}_proj, mlp.fc1, mlp.fc2, input_layernorm,
    post_attention_layernorm}.{weight,bias}, vision_adapter.mlp.fc1.weight (4096, 5632),
    vision_adapter.mlp.fc2.weight (4096, 4096). No buffers (the RoPE table is computed per call).
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        scale = d**-0.5
        self.patch_embedding = UnfoldConvolution(config)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding_vlm = nn.Parameter(scale * torch.randn(config.num_patches + 1, d))
        self.layernorm_pre = nn.LayerNorm(d)  # eps 1e-5, as in transformers
        self.layernorm_post = nn.LayerNorm(d)
        self.model = VisionEncoder(config)
        self.vision_adapter = VisionPixelShuffleMLP(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tiles -> patch features.

        Args:
            pixel_values: (n_tiles, num_channels, image_size, image_size), floating point
                (normalised pixels, mean=std=0.5 for Llama 4). Moved/cast to the parameters'
                device and dtype (transformers would instead fail on a dtype mismatch).
        Returns:
            (n_tiles, tokens_per_tile, vision_output_dim) in the parameters' dtype; for Scout
            (n_tiles, 144, 4096). Equals transformers' ``get_image_features(pv).last_hidden_state``
            (last encoder layer, layernorm_post, class token dropped, pixel shuffle, MLP2), i.e.
            BEFORE the multimodal projector.
        """
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (n_tiles, {', '.join(map(str, expected))}); "
                f"got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        w = self.patch_embedding.linear.weight
        x = self.patch_embedding(pixel_values.to(device=w.device, dtype=w.dtype))  # (N, G*G, d)
        n = x.shape[0]
        cls = self.class_embedding.to(x.dtype).expand(n, 1, -1)
        x = torch.cat([x, cls], dim=1)  # class token LAST: (N, G*G + 1, d)
        x = x + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)

        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = vision_rope_table(cfg, device=x.device, dtype=rope_dtype)
        x = self.model(x, cos, sin)

        x = self.layernorm_post(x)
        x = x[:, :-1, :]  # drop the class token
        return self.vision_adapter(x)


class MultiModalProjector(nn.Module):
    """linear_1: vision_output_dim -> text hidden size, no bias (key ``multi_modal_projector.linear_1.weight``)."""

    def __init__(self, config: VisionConfig, text_hidden_size: int = 5120):
        super().__init__()
        if not _is_int(text_hidden_size) or text_hidden_size <= 0:
            raise ValueError(f"text_hidden_size must be a positive int, got {text_hidden_size!r}")
        self.linear_1 = nn.Linear(config.vision_output_dim, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., vision_output_dim) -> (..., text_hidden_size)."""
        return self.linear_1(x)


def image_features(
    vision_model: VisionModel, projector: MultiModalProjector, pixel_values: torch.Tensor
) -> torch.Tensor:
    """All tiles -> the embedding rows that replace ``<|patch|>`` tokens, in order.

    Args:
        pixel_values: (n_tiles, C, S, S), tiles of all images in prompt order (each image's tiles,
            then its global thumbnail, as the processor emits them).
    Returns:
        (n_tiles * tokens_per_tile, text_hidden_size), tile-major then row-major over each tile's
        shuffled grid; in the projector's dtype. Equivalent to transformers'
        ``multi_modal_projector(get_image_features(pv).last_hidden_state.view(-1, D))``; the caller
        casts to the text embedding dtype and scatters into the ``<|patch|>`` positions.
    """
    feats = vision_model(pixel_values)  # (N, T, vision_output_dim)
    flat = feats.reshape(-1, feats.shape[-1])
    w = projector.linear_1.weight
    return projector(flat.to(device=w.device, dtype=w.dtype))
