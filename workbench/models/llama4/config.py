"""Llama 4 configuration: the fields the model reads, parsed from an HF ``config.json``.

Two layouts exist on disk and both are read here:
- ``Llama4ForConditionalGeneration``: top level with ``text_config`` and ``vision_config``;
- ``Llama4ForCausalLM``: the text fields at the top level (``model_type: llama4_text``).
RoPE parameters come either as ``rope_theta`` + ``rope_scaling`` (released checkpoints) or as
``rope_parameters`` (transformers >= 5); both are normalized to ``rope_theta`` / ``rope_scaling``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.models.llama4.vision import VisionConfig

__all__ = ["ConfigError", "TextConfig", "ModelConfig", "PRESETS", "preset"]


class ConfigError(ValueError):
    """A config.json that cannot describe a Llama 4 model (missing file, bad value, other architecture)."""


SUPPORTED_ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM")


@dataclass
class TextConfig:
    """The text decoder's hyper-parameters (names as in transformers' ``Llama4TextConfig``)."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # routed and shared experts
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 16, ...}
    no_rope_layers: list[int] | None = None  # 1 = the layer USES RoPE (chunked attention)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False

    def __post_init__(self) -> None:
        self._check_types()  # before the derived defaults below compute with these values
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # transformers treats an empty list as "use the default pattern"; so do we.
        if not self.no_rope_layers:
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers)
            ]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self._validate()

    def _bad(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"text config: {key}={_short(getattr(self, key))} {why}")

    def _check_types(self) -> None:
        """Each field alone: its JSON type and range. A config.json is hand-edited often enough that
        a string where a number belongs, a zero chunk size or a duplicated layer must be an error
        naming the key and the value, not a traceback deep in the model (or a silently wrong model:
        ``bool("false")`` is True)."""
        for key in _POSITIVE_INTS:
            if not _is_int(getattr(self, key)) or getattr(self, key) <= 0:
                raise self._bad(key, "must be a positive integer")
        for key in ("head_dim", "attention_chunk_size"):
            v = getattr(self, key)
            if v is not None and (not _is_int(v) or v <= 0):
                raise self._bad(key, "must be a positive integer or null")
        for key in ("rms_norm_eps", "rope_theta", "floor_scale"):
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise self._bad(key, "must be a positive finite number")
        if not _is_number(self.attn_scale):
            raise self._bad("attn_scale", "must be a finite number")
        for key in ("tie_word_embeddings", "use_qk_norm", "attention_bias"):
            if not isinstance(getattr(self, key), bool):
                raise self._bad(key, "must be true or false")
        # Released Llama 4 configs write an integer here (4); transformers reads it as a truth value.
        if not isinstance(self.attn_temperature_tuning, (bool, int)):
            raise self._bad("attn_temperature_tuning", "must be true, false or an integer")
        if not isinstance(self.hidden_act, str):
            raise self._bad("hidden_act", "must be a string")
        for key in ("pad_token_id", "bos_token_id"):
            if getattr(self, key) is not None and not _is_int(getattr(self, key)):
                raise self._bad(key, "must be an integer or null")
        eos = self.eos_token_id
        if not (eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(i) for i in eos))):
            raise self._bad("eos_token_id", "must be an integer, a list of integers or null")
        if self.moe_layers is not None:
            if not isinstance(self.moe_layers, list) or not all(_is_int(i) for i in self.moe_layers):
                raise self._bad("moe_layers", "must be a list of layer indices")
            dup = sorted({i for i in self.moe_layers if self.moe_layers.count(i) > 1})
            if dup:
                raise self._bad("moe_layers", f"lists layer(s) {dup} more than once")
        if self.no_rope_layers is not None and (
                not isinstance(self.no_rope_layers, list) or not all(_is_int(i) and i in (0, 1) for i in self.no_rope_layers)):
            raise self._bad("no_rope_layers", "must be a list of 0/1 flags, one per layer (1 = the layer uses RoPE)")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        s = self.rope_scaling
        if not isinstance(s, dict):
            raise self._bad("rope_scaling", "must be an object or null")
        kind = s.get("rope_type", s.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ConfigError(f"text config: rope_scaling type {kind!r} is not supported (default, llama3)")
        if kind != "llama3":
            return
        missing = [k for k in _LLAMA3_KEYS if k not in s]
        if missing:
            raise self._bad("rope_scaling", f"is llama3 scaling without {', '.join(missing)} "
                                            f"(it needs {', '.join(_LLAMA3_KEYS)})")
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if not _is_number(s[key]) or s[key] <= 0:
                raise ConfigError(f"text config: rope_scaling.{key}={_short(s[key])} must be a positive finite number")
        if not _is_int(s["original_max_position_embeddings"]) or s["original_max_position_embeddings"] <= 0:
            raise ConfigError(f"text config: rope_scaling.original_max_position_embeddings="
                              f"{_short(s['original_max_position_embeddings'])} must be a positive integer")

    def _validate(self) -> None:
        """Relations between fields (after the derived defaults are filled in)."""
        bad = self._bad
        if not _is_int(self.head_dim) or self.head_dim <= 0:
            raise bad("head_dim", "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE rotates pairs)")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise bad("num_experts_per_tok", f"must be in [1, num_local_experts={self.num_local_experts}]")
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise bad("no_rope_layers", f"needs one entry per layer ({self.num_hidden_layers})")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise bad("moe_layers", f"indices must lie in [0, {self.num_hidden_layers})")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported (Llama 4 uses 'silu')")

    # Derived facts, named the way the rest of the code asks for them.
    @property
    def uses_rope(self) -> list[bool]:
        """Per layer: True for RoPE layers (chunked attention), False for NoPE layers (global)."""
        return [bool(self.no_rope_layers[i]) for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        """Build from an HF ``text_config`` dict; unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"text config must be an object, got {_short(d)}")
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        for key, v in (("rope_parameters", rope), ("rope_scaling", d.get("rope_scaling"))):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"text config: {key}={_short(v)} must be an object or null")
        if rope:  # transformers >= 5 layout: theta and scaling in one dict
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", cls.rope_theta))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rope
        if d.get("rope_scaling") is not None:
            scaling = dict(d["rope_scaling"])
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "llama3":
                scaling.setdefault("original_max_position_embeddings",
                                   d.get("max_position_embeddings", cls.max_position_embeddings))
            d["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    """A whole checkpoint: text decoder, optional vision tower, and the image token ids."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = None
    architecture: str = "Llama4ForConditionalGeneration"
    image_token_index: int = 200092
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    dtype: str | None = None  # dtype the checkpoint was saved in, when config.json says

    @property
    def is_multimodal(self) -> bool:
        return self.architecture == "Llama4ForConditionalGeneration"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from an HF config dict. Every bad value is a ConfigError naming ``source``, the key
        and the value (see ``TextConfig._check_types`` for what is checked)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level, got {_short(d)}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: architectures={_short(archs)} must be a list of class names")
        for key in ("text_config", "vision_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{source}: {key}={_short(d[key])} must be an object")
        for key in ("image_token_index", "image_token_id", "boi_token_index", "eoi_token_index"):
            if key in d and not _is_int(d[key]):
                raise ConfigError(f"{source}: {key}={_short(d[key])} must be an integer")
        model_type = d.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type == "llama4":
            arch = "Llama4ForConditionalGeneration"
        elif model_type == "llama4_text":
            arch = "Llama4ForCausalLM"
        else:
            raise ConfigError(f"{source}: no 'architectures' and model_type={model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: architecture {arch!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        dtype = d.get("dtype") or d.get("torch_dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise ConfigError(f"{source}: dtype={_short(dtype)} must be a dtype name such as \"bfloat16\"")
        if arch == "Llama4ForCausalLM":
            text = d.get("text_config", d)
            return cls(text=_text_from_dict(text, source), vision=None, architecture=arch, dtype=dtype)
        if "text_config" not in d:
            raise ConfigError(f"{source}: {arch} needs a 'text_config' section")
        try:
            vision = VisionConfig.from_dict(d.get("vision_config") or {})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e
        return cls(
            text=_text_from_dict(d["text_config"], source),
            vision=vision,
            architecture=arch,
            image_token_index=d.get("image_token_index", d.get("image_token_id", cls.image_token_index)),
            boi_token_index=d.get("boi_token_index", cls.boi_token_index),
            eoi_token_index=d.get("eoi_token_index", cls.eoi_token_index),
            dtype=dtype or d["text_config"].get("dtype") or d["text_config"].get("torch_dtype"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself).

        Only a regular file is opened (a FIFO named config.json would block forever); invalid
        UTF-8 or JSON, JSON nested too deeply to parse, and a non-object top level are ConfigErrors.
        """
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no config.json in {path}: is this an HF-format Llama 4 checkpoint directory?")
        if not file.is_file():  # follows symlinks; False for directories, FIFOs, devices, sockets
            raise ConfigError(f"{file} is not a regular file")
        try:
            d = json.loads(file.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        except RecursionError:
            raise ConfigError(f"{file}: not a usable config (JSON nested too deeply to parse)") from None
        except OSError as e:
            raise ConfigError(f"{file}: cannot read it ({e.strerror or e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: expected a JSON object at the top level, got {type(d).__name__}")
        return cls.from_dict(d, source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as an HF ``config.json`` dict (``rope_theta``/``rope_scaling`` layout)."""
        text = self.text.to_dict()
        text["model_type"] = "llama4_text"
        if self.architecture == "Llama4ForCausalLM":
            return {"architectures": [self.architecture], **text, **({"dtype": self.dtype} if self.dtype else {})}
        vision = dataclasses.asdict(self.vision) if self.vision is not None else {}
        vision["model_type"] = "llama4_vision_model"
        out = {
            "architectures": [self.architecture], "model_type": "llama4",
            "text_config": text, "vision_config": vision,
            "image_token_index": self.image_token_index,
            "boi_token_index": self.boi_token_index, "eoi_token_index": self.eoi_token_index,
        }
        if self.dtype:
            out["dtype"] = self.dtype
        return out

    # ---- parameter counts (for `workbench info`) -------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters in total and active per token (routed top-k + shared expert), by part."""
        t = self.text
        H, D = t.hidden_size, t.head_dim
        attn = H * D * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
        if t.attention_bias:
            attn += D * (t.num_attention_heads * 2 + t.num_key_value_heads * 2) - D * t.num_attention_heads + H
        expert = 3 * H * t.intermediate_size
        norms = 2 * H
        total = active = 0
        for i in range(t.num_hidden_layers):
            layer = attn + norms
            if t.is_moe_layer(i):
                total += layer + t.num_local_experts * expert + expert + H * t.num_local_experts
                active += layer + t.num_experts_per_tok * expert + expert + H * t.num_local_experts
            else:
                total += layer + 3 * H * t.intermediate_size_mlp
                active += layer + 3 * H * t.intermediate_size_mlp
        embed = t.vocab_size * H
        head = 0 if t.tie_word_embeddings else t.vocab_size * H
        text_total = total + embed + head + H
        text_active = active + head + H  # an embedding lookup is not a multiply
        vision = _vision_parameter_count(self.vision, t.hidden_size) if self.vision is not None else 0
        return {"text_total": text_total, "text_active": text_active, "vision": vision,
                "total": text_total + vision, "embedding": embed}


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
                  "max_position_embeddings", "interleave_moe_layer_step", "no_rope_layer_interval")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a layer count


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any, limit: int = 80) -> str:
    """repr of a config value, cut to one readable line."""
    try:
        r = repr(v)
    except RecursionError:
        r = f"<{type(v).__name__} nested too deeply>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _text_from_dict(d: dict[str, Any], source: str) -> TextConfig:
    try:
        return TextConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{source}: text config: {e}") from e


def _vision_parameter_count(cfg: VisionConfig, text_hidden_size: int) -> int:
    """Vision tower + projector parameters, counted on the meta device (no memory)."""
    import torch

    from workbench.models.llama4.vision import MultiModalProjector, VisionModel

    with torch.device("meta"):
        n = sum(p.numel() for p in VisionModel(cfg).parameters())
        n += sum(p.numel() for p in MultiModalProjector(cfg, text_hidden_size).parameters())
    return n


def _scout_text() -> dict[str, Any]:
    # Released meta-llama/Llama-4-Scout-17B-16E(-Instruct) text_config values.
    return dict(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=10485760, rms_norm_eps=1e-5, pad_token_id=200018,
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008], num_experts_per_tok=1,
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
    )


def _maverick_text() -> dict[str, Any]:
    # Released meta-llama/Llama-4-Maverick-17B-128E(-Instruct) text_config values.
    d = _scout_text()
    d.update(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
             max_position_embeddings=1048576, rope_scaling=None)
    return d


def _released_vision() -> dict[str, Any]:
    return dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
                vision_output_dim=4096, image_size=336, patch_size=14, pixel_shuffle_ratio=0.5,
                projector_input_dim=4096, projector_output_dim=4096, norm_eps=1e-5, rope_theta=10000.0)


PRESETS: dict[str, dict[str, Any]] = {
    "scout": {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
              "text_config": _scout_text(), "vision_config": _released_vision(), "dtype": "bfloat16"},
    "maverick": {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                 "text_config": _maverick_text(), "vision_config": _released_vision(), "dtype": "bfloat16"},
}


def preset(name: str, **text_overrides: Any) -> ModelConfig:
    """The released configuration of ``scout`` or ``maverick`` (optionally with text fields changed)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    d = copy.deepcopy(PRESETS[name])
    d["text_config"].update(text_overrides)
    return ModelConfig.from_dict(d, source=f"preset {name!r}")


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict | None):
    """RoPE inverse frequencies (head_dim/2,) float32, with Llama 3 frequency scaling when configured."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    # Between the two wavelengths, interpolate smoothly (same arithmetic as Meta's reference).
    smooth = (old_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(wavelen)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
