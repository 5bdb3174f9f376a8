"""Llama 4 processor: tokenizer.json + Llama 4 image tiling, in plain torch / PIL / numpy.

``proc = load_processor(path)`` reads a checkpoint (or tokenizer) directory and returns a
:class:`Llama4Processor`; ``proc(text=[...], images=[...])`` returns a :class:`ProcessorOutput`
(a dict) with ``input_ids``, ``attention_mask`` and, when images were given, ``pixel_values`` plus
per-image geometry. It reproduces ``transformers.Llama4Processor`` (v5.23, with its default
torchvision image processor) without importing transformers or torchvision:

Images (per image, the same arithmetic as ``Llama4ImageProcessor``):

1. To RGB, as transformers does. PIL images: an image with an alpha band or a ``transparency``
   entry (RGBA, LA, PA, P with transparency, ...) is composited onto WHITE with
   ``Image.alpha_composite``; every other mode (L, P, CMYK, I;16, 1, ...) goes through
   ``Image.convert("RGB")``. uint8 numpy arrays / torch tensors, ``(H, W)`` or with a channel axis
   of 1, 3 or 4 first or last (first wins when both fit, as in transformers): 1 channel is
   repeated, 4 channels are composited onto white in float32 (``x/255``, ``rgb*a + (1-a)``, then
   ``*255.999`` truncated, torchvision's ``to_dtype``). Other dtypes are refused (pass uint8 or
   PIL). Local file paths (``str`` / ``os.PathLike``) are opened with PIL; URLs are refused.
2. Canvas: all ``rows x cols`` tile grids with ``rows*cols <= max_patches`` (16) of 336 px tiles;
   ``get_best_fit`` picks the smallest canvas that needs no downscaling (the least downscaling
   when none fits), ties to the smallest area. With ``resize_to_max_canvas=False`` (default) an
   image is never upscaled beyond what it needs to reach one tile side (336 px).
3. Resize without distortion into the canvas: bilinear with antialiasing, on the uint8 image
   (``torch.nn.functional.interpolate(..., antialias=True)`` directly on uint8 where torchvision
   does so, i.e. on CPUs with AVX2/AVX512 and on aarch64; elsewhere in float32 then rounded),
   then zero padding at the bottom/right up to the canvas.
4. ``x.to(bfloat16) * rescale_factor`` then ``(x - mean) / std`` in bfloat16 (what transformers and
   Meta's reference do), split into row-major tiles, plus a global thumbnail (the whole image
   resized, with distortion, to one tile) when there is more than one tile.
   ``pixel_values`` are returned as float32 (exactly the bfloat16 values).

Text: every ``<|image|>`` becomes ``<|image_start|>`` + for each tile row, the tiles'
``<|patch|>`` x 144 separated by ``<|tile_x_separator|>`` and followed by ``<|tile_y_separator|>``
(only when tiled) + ``<|image|>`` + 144 ``<|patch|>`` for the global thumbnail (the single tile
when not tiled) + ``<|image_end|>``. The expanded text is tokenized with ``tokenizers`` with
``add_special_tokens=True`` by default (tokenizer.json's post-processor prepends
``<|begin_of_text|>``), padded on the LEFT by default (Llama4Processor's default; a
``padding_side`` in tokenizer_config.json wins, as in transformers) with the pad token.

Limits (each a :class:`ProcessorError`): images with a side below ``min_image_side`` (2 px) or
more than ``max_image_pixels`` pixels (PIL's decompression-bomb threshold, 89,478,485, by default;
checked before a file is decoded); token sequences longer than ``max_length`` (argument, else
``model_max_length`` of tokenizer_config.json) unless ``truncation=True``.

Nothing is unpickled: every file read is JSON, text, or an image decoded by PIL.

Where this differs from transformers (outputs are otherwise identical: same ``input_ids`` and
``attention_mask``, ``pixel_values`` equal to transformers' bfloat16 ones after ``.float()``):

* ``padding`` defaults to True (transformers: False, which fails for unequal lengths with
  ``return_tensors="pt"``); ``pixel_values`` are float32 (same values).
* Extra keys ``aspect_ratios``, ``image_sizes``, ``images_per_sample`` (transformers drops
  ``aspect_ratios``) and ``ProcessorOutput.images`` with per-image geometry.
* Placeholder/image counts are checked per sample when images are given per sample (transformers
  checks the total only); 2-D uint8 arrays are accepted as grayscale (transformers cannot flatten
  them); URLs are refused (no network); the size limits above are ours.
* The built-in Llama 4 chat template is rendered in plain Python (a ``None`` message content
  renders as ""; Jinja would fail); a different template found in the directory is rendered with
  ``jinja2`` (sandboxed, transformers' settings) and needs that package.
* ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json are ignored, as transformers 5.23
  ignores them for a tokenizer.json-backed tokenizer: tokenizer.json's post-processor decides.
* Like transformers, EXIF orientation is not applied.
"""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ImageInfo",
    "ImageProcessorConfig",
    "Llama4Processor",
    "ProcessorError",
    "ProcessorOutput",
    "load_processor",
]


class ProcessorError(ValueError):
    """Bad processor input or a bad processor/tokenizer file."""


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

BOS_TOKEN = "<|begin_of_text|>"
IMAGE_TOKEN = "<|image|>"
IMAGE_START_TOKEN = "<|image_start|>"
IMAGE_END_TOKEN = "<|image_end|>"
PATCH_TOKEN = "<|patch|>"
TILE_X_SEPARATOR_TOKEN = "<|tile_x_separator|>"
TILE_Y_SEPARATOR_TOKEN = "<|tile_y_separator|>"
DEFAULT_PAD_TOKEN = "<|finetune_right_pad|>"
_REQUIRED_TOKENS = (
    BOS_TOKEN,
    IMAGE_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    PATCH_TOKEN,
    TILE_X_SEPARATOR_TOKEN,
    TILE_Y_SEPARATOR_TOKEN,
)
# transformers marks control tokens typed by users with this character; a placeholder right after
# it is not expanded (processing_utils._UNMARKED).
_CONTROL_TOKEN_START = "\U000f0000"

# PIL's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
DEFAULT_MIN_IMAGE_SIDE = 2


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# PIL resample codes (as stored in preprocessor configs) -> (torch mode, antialias).
_RESAMPLE = {
    0: ("nearest-exact", False),
    2: ("bilinear", True),
    3: ("bicubic", True),
}
_RESAMPLE_NAMES = {"nearest": 0, "bilinear": 2, "bicubic": 3}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Image settings. Defaults are Llama 4 Scout/Maverick's."""

    tile_size: int = 336
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 2
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    min_image_side: int = DEFAULT_MIN_IMAGE_SIDE

    @property
    def downsample_ratio(self) -> int:
        return int(round(1.0 / (self.pixel_shuffle_ratio**2)))

    @property
    def patches_per_tile(self) -> int:
        """Number of ``<|patch|>`` tokens per tile (144 for 336 px tiles, 14 px patches, ratio 0.5)."""
        side = self.tile_size // self.patch_size
        return int(side * side // self.downsample_ratio)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch tokens inside one tile (12 x 12 by default)."""
        side = int(round(self.tile_size // self.patch_size * self.pixel_shuffle_ratio))
        return side, side


@dataclass
class ImageInfo:
    """Geometry of one processed image (enough to place each patch token on the pixels).

    ``original_size``: (height, width) of the input. ``resized_size``: (height, width) of the
    image content inside the canvas (top-left aligned, zero padded to ``canvas_size``).
    ``grid``: (rows, cols) of tiles of ``tile_size``. ``tile_start``: index of the first tile in
    ``pixel_values``; tiles are row-major, then the global thumbnail when ``has_global_tile``.
    Each tile holds ``token_grid`` (12 x 12) patch tokens in row-major order.
    """

    sample: int
    index_in_sample: int
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    canvas_size: tuple[int, int]
    grid: tuple[int, int]
    tile_size: int
    tile_start: int
    n_tiles: int
    has_global_tile: bool
    patches_per_tile: int
    token_grid: tuple[int, int]

    @property
    def n_patch_tokens(self) -> int:
        return self.n_tiles * self.patches_per_tile


class ProcessorOutput(dict):
    """A dict of model inputs with attribute access, ``.to(device)`` and ``.images``.

    Keys: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long and, when images were given,
    ``pixel_values`` (N_tiles, 3, tile, tile) float32, ``aspect_ratios`` (N_images, 2) long
    (tile rows, cols), ``image_sizes`` (N_images, 2) long (original height, width) and
    ``images_per_sample`` (B,) long. ``.images`` is the list of :class:`ImageInfo`, one per image
    in order (sample, tile offsets, resized size, ...). Images take tiles in order: rows x cols
    tiles, plus one global thumbnail when rows x cols > 1.
    """

    images: list[ImageInfo]

    def __init__(self, *args, images: list[ImageInfo] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.images = list(images or [])

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ProcessorOutput":
        """Move tensors to ``device``; ``dtype`` applies to floating tensors only."""
        out = ProcessorOutput(images=self.images)
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[k] = v
        return out

    def model_inputs(self) -> dict[str, Any]:
        """Only ``input_ids``, ``attention_mask`` and ``pixel_values`` (when present)."""
        return {k: self[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in self}


# --------------------------------------------------------------------------------------------
# Canvas selection (ported from transformers' image_processing_llama4.py, Apache-2.0, keeping its
# torch float32 / Python float arithmetic exactly, since floors at the boundaries depend on it)
# --------------------------------------------------------------------------------------------


def _get_factors(dividend: int) -> set[int]:
    factors = set()
    for i in range(1, int(dividend**0.5) + 1):
        if dividend % i == 0:
            factors.add(i)
            factors.add(dividend // i)
    return factors


@lru_cache(maxsize=16)
def _supported_resolutions(max_num_chunks: int, tile: int) -> tuple[tuple[int, int], ...]:
    asp_dict: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunk_size in range(max_num_chunks, 0, -1):
        for factor in sorted(_get_factors(chunk_size)):
            h, w = factor, chunk_size // factor
            asp_dict[h / w].append((h, w))
    return tuple((h * tile, w * tile) for value in asp_dict.values() for h, w in value)


def _get_best_fit(image_size: tuple[int, int], possible: torch.Tensor, resize_to_max_canvas: bool) -> torch.Tensor:
    original_height, original_width = image_size
    target_heights, target_widths = possible[:, 0], possible[:, 1]
    scale_w = target_widths / original_width
    scale_h = target_heights / original_height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    upscaling_options = scales[scales >= 1]
    if len(upscaling_options) > 0:
        selected_scale = torch.max(upscaling_options) if resize_to_max_canvas else torch.min(upscaling_options)
    else:
        selected_scale = torch.max(scales[scales < 1])
    chosen = possible[scales == selected_scale]
    if len(chosen) > 1:
        areas = chosen[:, 0] * chosen[:, 1]
        return chosen[torch.argmin(areas)]
    return chosen[0]


def _get_max_res_without_distortion(image_size, target_size):
    original_height, original_width = image_size
    target_height, target_width = target_size
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.floor(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.floor(original_width * scale_h), target_width)
    return new_height, new_width


def plan_image(image_size: tuple[int, int], cfg: ImageProcessorConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ``(canvas (h, w), resized (h, w))`` for an image of ``image_size`` (h, w)."""
    possible = torch.tensor(_supported_resolutions(cfg.max_patches, cfg.tile_size))
    target = _get_best_fit(image_size, possible, cfg.resize_to_max_canvas)
    if not cfg.resize_to_max_canvas:
        limit = cfg.tile_size
        target_wo = (min(max(image_size[0], limit), target[0]), min(max(image_size[1], limit), target[1]))
    else:
        target_wo = target
    new_h, new_w = _get_max_res_without_distortion(image_size, target_wo)
    resized = (max(int(new_h), 1), max(int(new_w), 1))
    return (int(target[0]), int(target[1])), resized


# --------------------------------------------------------------------------------------------
# Pixel operations
# --------------------------------------------------------------------------------------------


def _native_uint8_resize(mode: str) -> bool:
    # torchvision.transforms.v2.functional._geometry._do_native_uint8_resize_on_cpu
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return True  # bicubic, nearest-exact: uint8 is handled natively on CPU


def _resize_uint8(img: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize a (C, H, W) uint8 CPU tensor as torchvision's ``resize`` does."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    mode, antialias = _RESAMPLE[resample]
    x = img.unsqueeze(0)
    align = None if mode == "nearest-exact" else False
    if _native_uint8_resize(mode):
        out = F.interpolate(x, size=list(size), mode=mode, align_corners=align, antialias=antialias)
    else:
        out = F.interpolate(x.to(torch.float32), size=list(size), mode=mode, align_corners=align, antialias=antialias)
        if mode == "bicubic":  # pragma: no cover - bicubic takes the native path on CPU
            out = out.clamp_(0, 255)
        out = out.round_().to(torch.uint8)
    return out[0]


def _rescale_normalize(img: torch.Tensor, cfg: ImageProcessorConfig) -> torch.Tensor:
    # Llama4ImageProcessor.rescale_and_normalize + torchvision normalize, in bfloat16.
    x = img.to(dtype=torch.bfloat16) * cfg.rescale_factor
    mean = torch.as_tensor(cfg.image_mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(cfg.image_std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub(mean).div_(std)


def _split_to_tiles(img: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    c, h, w = img.shape
    x = img.view(c, rows, h // rows, cols, w // cols)
    return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, c, h // rows, w // cols)


# --------------------------------------------------------------------------------------------
# Image decoding / conversion
# --------------------------------------------------------------------------------------------


def _pil():
    from PIL import Image

    return Image


def _where(sample: int, index: int) -> str:
    return f"image {index} of sample {sample}"


def _check_size(h: int, w: int, where: str, cfg: ImageProcessorConfig) -> None:
    if h < cfg.min_image_side or w < cfg.min_image_side:
        raise ProcessorError(
            f"{where} is {w}x{h} (width x height) pixels; the minimum side is {cfg.min_image_side} px. "
            f"Upscale or pad the image first."
        )
    if h * w > cfg.max_image_pixels:
        raise ProcessorError(
            f"{where} is {w}x{h} = {h * w:,} pixels, above the limit of {cfg.max_image_pixels:,} pixels "
            f"(a guard against decompression bombs). Downscale it first, or raise the limit with "
            f"load_processor(..., max_image_pixels=N)."
        )


def _pil_to_rgb_array(image, where: str, cfg: ImageProcessorConfig) -> np.ndarray:
    Image = _pil()
    w, h = image.size
    _check_size(h, w, where, cfg)
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
        arr = np.array(rgb)
    except ProcessorError:
        raise
    except Exception as e:  # truncated / undecodable data surfaces here for lazily opened files
        raise ProcessorError(f"{where}: could not decode the image ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ProcessorError(f"{where}: conversion to RGB gave an array of shape {arr.shape} {arr.dtype}")
    return arr


def _open_path(path, where: str, cfg: ImageProcessorConfig) -> np.ndarray:
    Image = _pil()
    s = os.fspath(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if "://" in s:
        raise ProcessorError(f"{where}: {s!r} looks like a URL; only local files and in-memory images are accepted")
    p = Path(s)
    if not p.is_file():
        raise ProcessorError(f"{where}: no image file at {str(p)!r}")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own threshold; our limit (checked on the header size, before any
            # pixel is decoded) is the one that applies. PIL still refuses at twice its threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return _pil_to_rgb_array(im, f"{where} ({p})", cfg)
    except ProcessorError:
        raise
    except Image.DecompressionBombError as e:
        raise ProcessorError(
            f"{where} ({p}) was refused by PIL's decompression-bomb guard: {e} (PIL.Image.MAX_IMAGE_PIXELS; "
            f"the processor's own limit is max_image_pixels={cfg.max_image_pixels:,})"
        ) from e
    except Exception as e:
        raise ProcessorError(f"{where}: {p} is not a readable image ({type(e).__name__}: {e})") from e


def _array_to_rgb_chw(arr: torch.Tensor, where: str, cfg: ImageProcessorConfig) -> torch.Tensor:
    if arr.dtype != torch.uint8:
        raise ProcessorError(
            f"{where} is an array of dtype {str(arr.dtype).replace('torch.', '')}; only uint8 arrays "
            f"(0..255) are accepted. Convert it, e.g. (x * 255).round().astype(np.uint8), or pass a PIL image."
        )
    if arr.ndim == 2:
        arr = arr.unsqueeze(0)
    elif arr.ndim == 3:
        first, last = arr.shape[0], arr.shape[2]
        if first in (1, 3, 4):
            pass  # channels first (transformers' rule: first wins when both are plausible)
        elif last in (1, 3, 4):
            arr = arr.permute(2, 0, 1)
        else:
            raise ProcessorError(
                f"{where} has shape {tuple(arr.shape)}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4"
            )
    else:
        raise ProcessorError(f"{where} has {arr.ndim} dimensions (shape {tuple(arr.shape)}); expected 2 or 3")
    _check_size(int(arr.shape[1]), int(arr.shape[2]), where, cfg)
    if arr.shape[0] == 1:
        arr = arr.repeat(3, 1, 1)
    elif arr.shape[0] == 4:
        x = arr.movedim(0, -1).to(torch.float32).mul_(1.0 / 255)
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        arr = x.mul(255 + 1.0 - 1e-3).to(torch.uint8).movedim(-1, 0)
    return arr.contiguous()


def _to_rgb_uint8_chw(image, where: str, cfg: ImageProcessorConfig) -> torch.Tensor:
    Image = _pil()
    if isinstance(image, Image.Image):
        return torch.from_numpy(_pil_to_rgb_array(image, where, cfg)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype == object:
            raise ProcessorError(f"{where} is an object array, not an image")
        arr = np.ascontiguousarray(image)
        if not arr.flags.writeable:
            arr = arr.copy()
        return _array_to_rgb_chw(torch.from_numpy(arr), where, cfg)
    if isinstance(image, torch.Tensor):
        return _array_to_rgb_chw(image.detach().to("cpu"), where, cfg)
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(_open_path(image, where, cfg)).permute(2, 0, 1).contiguous()
    raise ProcessorError(
        f"{where} has type {type(image).__module__}.{type(image).__qualname__}; expected a PIL.Image.Image, "
        f"a uint8 numpy array or torch tensor ((H, W), (H, W, C) or (C, H, W)), or a local file path"
    )


def process_image(rgb: torch.Tensor, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, dict]:
    """(3, H, W) uint8 -> (tiles (n, 3, t, t) float32, geometry dict)."""
    h, w = int(rgb.shape[1]), int(rgb.shape[2])
    canvas, resized = plan_image((h, w), cfg)
    x = _resize_uint8(rgb, resized, cfg.resample)
    x = F.pad(x, [0, canvas[1] - resized[1], 0, canvas[0] - resized[0]], mode="constant", value=0.0)
    x = _rescale_normalize(x, cfg)
    rows, cols = canvas[0] // cfg.tile_size, canvas[1] // cfg.tile_size
    tiles = _split_to_tiles(x, rows, cols)
    has_global = rows * cols > 1
    if has_global:
        g = _rescale_normalize(_resize_uint8(rgb, (cfg.tile_size, cfg.tile_size), cfg.resample), cfg)
        tiles = torch.cat([tiles, g.unsqueeze(0)], dim=0)
    geom = dict(original_size=(h, w), resized_size=resized, canvas_size=canvas, grid=(rows, cols), has_global_tile=has_global)
    return tiles.to(torch.float32), geom


# --------------------------------------------------------------------------------------------
# Chat template (Llama 4's, as shipped with the released checkpoints and transformers)
# --------------------------------------------------------------------------------------------

DEFAULT_CHAT_TEMPLATE = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}    \n    {%- if messages[0]['content'] is string %}\n        {%- set system_message = messages[0]['content']|trim %}\n    {%- else %}\n        {#- FIXME: The processor requires an array, always. #}\n        {%- set system_message = messages[0]['content'][0]['text']|trim %}\n    {%- endif %}\n    {%- set messages = messages[1:] %}\n    {%- set user_supplied_system_message = true %}\n{%- else %}\n    {%- set system_message = \"\" %}\n    {%- set user_supplied_system_message = false %}\n{%- endif %}\n\n{#- System message if the user supplied one #}\n{%- if user_supplied_system_message %}\n    {{- \"<|header_start|>system<|header_end|>\n\n\" }}\n    {%- if tools is not none %}\n        {{- \"Environment: ipython\n\" }}\n    {%- endif %}\n    {%- if tools is not none and not tools_in_user_message %}\n        {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n        {{- \"Do not use variables.\n\n\" }}\n        {%- for t in tools %}\n            {{- t | tojson(indent=4) }}\n            {{- \"\n\n\" }}\n        {%- endfor %}\n    {%- endif %}\n    {{- system_message }}\n    {{- \"<|eot|>\" }}\n{%- endif %}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|header_start|>user<|header_end|>\n\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\n\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\n\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\n\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}\n        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n        {{- \"<|eot|>\" }}\n    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}\n       {{- '<|header_start|>assistant<|header_end|>\n\n' -}}\n       {{- '<|python_start|>' }}\n        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n       {{- '<|python_end|>' }}\n        {%- for tool_call in message.tool_calls %}\n           {{- '{\"name\": \"' + tool_call.function.name + '\", ' }}\n           {{- '\"parameters\": ' }}\n           {{- tool_call.function.arguments | tojson }}\n           {{- \"}\" }}\n        {%- endfor %}\n       {{- \"<|eot|>\" }}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|header_start|>ipython<|header_end|>\n\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|header_start|>assistant<|header_end|>\n\n' }}\n{%- endif %}\n"  # noqa: E501


def _tojson(x, indent=None) -> str:
    # transformers' tojson filter (no HTML escaping, keys in insertion order)
    return json.dumps(x, ensure_ascii=False, indent=indent)


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if not isinstance(part, dict):
            raise ProcessorError(f"message content parts must be dicts, got {type(part).__name__}")
        if part.get("type") == "image":
            out.append(IMAGE_TOKEN)
        elif part.get("type") == "text":
            out.append(str(part.get("text", "")))
    return "".join(out)


def _render_llama4_chat(
    messages: Sequence[dict],
    *,
    bos_token: str,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    tools_in_user_message: bool = True,
) -> str:
    """Plain-Python rendering of ``DEFAULT_CHAT_TEMPLATE`` (Llama 4's chat format)."""
    msgs = list(messages)
    out = [bos_token]
    if msgs and msgs[0].get("role") == "system":
        c = msgs[0].get("content")
        system_message = (c if isinstance(c, str) else str(c[0]["text"])).strip()
        msgs = msgs[1:]
        out.append("<|header_start|>system<|header_end|>\n\n")
        if tools is not None:
            out.append("Environment: ipython\n")
        if tools is not None and not tools_in_user_message:
            out.append(
                "You have access to the following functions. To call a function, please respond with JSON for a "
                "function call."
                'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                'value}.'
                "Do not use variables.\n\n"
            )
            for t in tools:
                out.append(_tojson(t, indent=4) + "\n\n")
        out.append(system_message + "<|eot|>")
    if tools_in_user_message and tools is not None:
        if not msgs:
            raise ProcessorError("Cannot put tools in the first user message when there's no first user message!")
        c = msgs[0].get("content")
        first_user_message = (c if isinstance(c, str) else str(c)).strip()
        msgs = msgs[1:]
        out.append(
            "<|header_start|>user<|header_end|>\n\n"
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
            "Do not use variables.\n\n"
        )
        for t in tools:
            out.append(_tojson(t, indent=4) + "\n\n")
        out.append(first_user_message + "<|eot|>")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m:
            raise ProcessorError(f"each chat message must be a dict with a 'role'; got {m!r:.80}")
        role = m["role"]
        if not (role in ("ipython", "tool") or "tool_calls" in m):
            out.append(f"<|header_start|>{role}<|header_end|>\n\n{_content_text(m.get('content'))}<|eot|>")
        elif "tool_calls" in m and len(m["tool_calls"] or ()) > 0:
            out.append("<|header_start|>assistant<|header_end|>\n\n<|python_start|>")
            out.append(_content_text(m.get("content")))
            out.append("<|python_end|>")
            for tc in m["tool_calls"]:
                fn = tc["function"]
                out.append('{"name": "' + fn["name"] + '", "parameters": ' + _tojson(fn["arguments"]) + "}")
            out.append("<|eot|>")
        elif role in ("tool", "ipython"):
            c = m.get("content")
            body = _tojson(c) if isinstance(c, (str, dict, list, tuple)) else ("" if c is None else str(c))
            out.append(f"<|header_start|>ipython<|header_end|>\n\n{body}<|eot|>")
    if add_generation_prompt:
        out.append("<|header_start|>assistant<|header_end|>\n\n")
    return "".join(out)


def _jinja_renderer(template: str, source: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ProcessorError(
            f"{source} holds a chat template that differs from Llama 4's built-in one; rendering it needs "
            f"the 'jinja2' package (pip install jinja2)"
        ) from e

    def raise_exception(message):
        raise ProcessorError(f"chat template: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise ProcessorError(f"{source}: the chat template does not compile: {e}") from e
    return compiled


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProcessorError(f"cannot read {path}: {e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProcessorError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(obj, dict):
        raise ProcessorError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def _token_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ProcessorError(
            f"no tokenizer.json in {path}: a Llama 4 checkpoint directory must contain the 'tokenizer.json' "
            f"file (the Hugging Face tokenizers format)"
        )
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        detail = str(e)
        try:
            json.loads(tok_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as je:
            detail = f"invalid JSON at line {je.lineno}, column {je.colno}: {je.msg}"
        except (OSError, UnicodeDecodeError) as oe:
            detail = f"unreadable: {oe}"
        raise ProcessorError(f"{tok_file} is corrupt or not a tokenizers file ({detail})") from e
    tok.no_padding()
    tok.no_truncation()
    return tok


def _image_config_from(d: dict, src: str, base: dict) -> dict:
    out = dict(base)
    size = d.get("size")
    if size is not None:
        if isinstance(size, dict) and "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ProcessorError(f"{src}: 'size' must be square, got {size}")
            out["tile_size"] = int(size["height"])
        elif isinstance(size, int):
            out["tile_size"] = int(size)
        else:
            raise ProcessorError(f"{src}: 'size' must be {{'height': N, 'width': N}}, got {size!r}")
    for key in ("max_patches",):
        if key in d and d[key] is not None:
            out[key] = int(d[key])
    if "resize_to_max_canvas" in d and d["resize_to_max_canvas"] is not None:
        out["resize_to_max_canvas"] = bool(d["resize_to_max_canvas"])
    for key in ("image_mean", "image_std"):
        if key in d and d[key] is not None:
            v = d[key]
            v = [v] * 3 if isinstance(v, (int, float)) else list(v)
            if len(v) != 3:
                raise ProcessorError(f"{src}: '{key}' must have 3 values, got {d[key]!r}")
            out[key] = tuple(float(x) for x in v)
    if "rescale_factor" in d and d["rescale_factor"] is not None:
        out["rescale_factor"] = float(d["rescale_factor"])
    if "resample" in d and d["resample"] is not None:
        r = d["resample"]
        r = _RESAMPLE_NAMES.get(r, r) if isinstance(r, str) else r
        if r not in _RESAMPLE:
            raise ProcessorError(f"{src}: unsupported 'resample' {d['resample']!r} (supported: 0 nearest, 2 bilinear, 3 bicubic)")
        out["resample"] = int(r)
    for flag in ("do_rescale", "do_normalize", "do_resize"):
        if d.get(flag) is False:
            raise ProcessorError(f"{src}: '{flag}': false is not supported by the Llama 4 processor")
    for key in ("patch_size",):
        if key in d and d[key] is not None:
            out[key] = int(d[key])
    if "pixel_shuffle_ratio" in d and d["pixel_shuffle_ratio"] is not None:
        out["pixel_shuffle_ratio"] = float(d["pixel_shuffle_ratio"])
    return out


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


class Llama4Processor:
    """Tokenizer + image tiling for Llama 4. Build it with :func:`load_processor`."""

    def __init__(
        self,
        tokenizer,
        image_config: ImageProcessorConfig | None = None,
        *,
        pad_token: str | None = None,
        bos_token: str = BOS_TOKEN,
        padding_side: str = "left",
        truncation_side: str = "right",
        max_length: int | None = None,
        chat_template: str | None = None,
        chat_template_source: str = "chat template",
        name_or_path: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageProcessorConfig()
        self.name_or_path = name_or_path
        cfg = self.image_config
        if cfg.tile_size <= 0 or cfg.patch_size <= 0 or cfg.tile_size % cfg.patch_size:
            raise ProcessorError(f"tile size {cfg.tile_size} must be a positive multiple of patch_size {cfg.patch_size}")
        if cfg.max_patches < 1:
            raise ProcessorError(f"max_patches must be >= 1, got {cfg.max_patches}")
        if not (0 < cfg.pixel_shuffle_ratio <= 1):
            raise ProcessorError(f"pixel_shuffle_ratio must be in (0, 1], got {cfg.pixel_shuffle_ratio}")
        if any(s == 0 for s in cfg.image_std):
            raise ProcessorError("image_std must not contain 0")
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in _REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise ProcessorError(
                f"the tokenizer{' in ' + name_or_path if name_or_path else ''} lacks Llama 4 special tokens: "
                f"{', '.join(missing)}"
            )
        self.token_ids = {t: vocab[t] for t in _REQUIRED_TOKENS}
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.patch_token_id = vocab[PATCH_TOKEN]
        self.bos_token = bos_token
        self.bos_token_id = vocab.get(bos_token)
        if pad_token is None and DEFAULT_PAD_TOKEN in vocab:
            pad_token = DEFAULT_PAD_TOKEN
        self.pad_token = pad_token
        self.pad_token_id = vocab.get(pad_token) if pad_token is not None else None
        if pad_token is not None and self.pad_token_id is None:
            raise ProcessorError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ProcessorError(
                f"padding_side / truncation_side must be 'left' or 'right', got {padding_side!r} / {truncation_side!r}"
            )
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        if max_length is not None and int(max_length) < 1:
            raise ProcessorError(f"max_length must be >= 1, got {max_length}")
        self.max_length = None if max_length is None else int(max_length)
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self._chat_template_source = chat_template_source
        self._jinja = None
        if self.chat_template.strip() != DEFAULT_CHAT_TEMPLATE.strip():
            self._jinja = _jinja_renderer(self.chat_template, chat_template_source)

    # ---- introspection -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        c = self.image_config
        return (
            f"Llama4Processor(path={self.name_or_path!r}, vocab_size={self.vocab_size}, tile={c.tile_size}, "
            f"max_patches={c.max_patches}, patches_per_tile={c.patches_per_tile}, max_length={self.max_length})"
        )

    # ---- text ----------------------------------------------------------------------------

    def image_token_string(self, grid: tuple[int, int]) -> str:
        """The expansion of one ``<|image|>`` for a tile grid (rows, cols) (Llama4Processor._prompt_split_image)."""
        n = self.image_config.patches_per_tile
        rows, cols = grid
        parts = [IMAGE_START_TOKEN]
        if rows * cols > 1:
            for _y in range(rows):
                for x in range(cols):
                    parts.append(PATCH_TOKEN * n)
                    if x < cols - 1:
                        parts.append(TILE_X_SEPARATOR_TOKEN)
                parts.append(TILE_Y_SEPARATOR_TOKEN)
        parts.append(IMAGE_TOKEN)
        parts.append(PATCH_TOKEN * n)
        parts.append(IMAGE_END_TOKEN)
        return "".join(parts)

    @staticmethod
    def _placeholder_spans(text: str) -> list[int]:
        out = []
        start = 0
        while True:
            i = text.find(IMAGE_TOKEN, start)
            if i < 0:
                return out
            if not (i > 0 and text[i - 1] == _CONTROL_TOKEN_START):
                out.append(i)
            start = i + len(IMAGE_TOKEN)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ---- images --------------------------------------------------------------------------

    def _normalize_images(self, images, texts: list[str]) -> list[list[Any]]:
        """Return images per sample, checking placeholder counts."""
        counts = [len(self._placeholder_spans(t)) for t in texts]
        if images is None:
            bad = [(i, c) for i, c in enumerate(counts) if c]
            if bad:
                s, c = bad[0]
                raise ProcessorError(
                    f"sample {s} has {c} {IMAGE_TOKEN} placeholder(s) but no images were passed "
                    f"(placeholders per sample: {counts})"
                )
            return [[] for _ in texts]
        if isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ProcessorError(
                    f"images is a nested list of {len(images)} per-sample lists but there are {len(texts)} "
                    f"text samples; pass one list per sample (empty for text-only samples)"
                )
            per = [list(x) for x in images]
            for s, (imgs, c) in enumerate(zip(per, counts)):
                if len(imgs) != c:
                    raise ProcessorError(
                        f"sample {s} has {c} {IMAGE_TOKEN} placeholder(s) in its text but {len(imgs)} image(s) "
                        f"were passed for it"
                    )
            return per
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if sum(counts) != len(flat):
            raise ProcessorError(
                f"the text has {sum(counts)} {IMAGE_TOKEN} placeholder(s) in total (per sample: {counts}) but "
                f"{len(flat)} image(s) were passed; each placeholder takes one image, in order"
            )
        per, k = [], 0
        for c in counts:
            per.append(flat[k : k + c])
            k += c
        return per

    def preprocess_images(self, images: Iterable, sample: int = 0) -> tuple[torch.Tensor, list[dict]]:
        """Tiles for a list of images: ``(pixel_values (N, 3, t, t) float32, geometry dicts)``."""
        tiles, geoms = [], []
        for j, img in enumerate(images):
            rgb = _to_rgb_uint8_chw(img, _where(sample, j), self.image_config)
            t, g = process_image(rgb, self.image_config)
            tiles.append(t)
            geoms.append(g)
        t = self.image_config.tile_size
        pv = torch.cat(tiles, 0) if tiles else torch.empty(0, 3, t, t, dtype=torch.float32)
        return pv, geoms

    # ---- main entry point ----------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        *,
        padding: bool | str = True,
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
    ) -> ProcessorOutput:
        """Tokenize ``text`` (one string or a list) and tile ``images``.

        ``images``: None, one image, a flat list (assigned to the ``<|image|>`` placeholders in
        order across the batch) or one list per sample. ``padding``: True / "longest" (pad to the
        longest sample), "max_length" (pad to ``max_length``) or False. ``padding_side``: "left"
        (the default unless tokenizer_config.json says otherwise) or "right". ``max_length``
        defaults to the processor's; a longer sample raises :class:`ProcessorError` unless
        ``truncation=True`` (then it is cut on the truncation side, and an image cut by it raises).
        ``return_tensors``: "pt" (tensors) or None (lists; ``pixel_values`` stays a tensor).
        """
        texts, side, limit = self._check_call(text, padding, padding_side, max_length, return_tensors)
        per_sample = self._normalize_images(images, texts)
        expanded, infos, tile_chunks = self._expand_images(texts, per_sample)
        ids_list = self._encode(expanded, add_special_tokens, limit, truncation, infos, per_sample)
        lengths = [len(x) for x in ids_list]
        target = None  # padding=False / "do_not_pad"
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            target = max(limit, max(lengths))
        ids_list, masks = self._pad(ids_list, target, side)

        out = ProcessorOutput(images=infos)
        if return_tensors == "pt":
            if len(set(len(x) for x in ids_list)) != 1:
                raise ProcessorError(
                    f"samples have different lengths {lengths} and padding={padding!r}; pass padding=True "
                    f"or return_tensors=None"
                )
            out["input_ids"] = torch.tensor(ids_list, dtype=torch.long)
            out["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        else:
            out["input_ids"] = ids_list
            out["attention_mask"] = masks
        if infos:
            out["pixel_values"] = torch.cat(tile_chunks, 0)
            out["aspect_ratios"] = torch.tensor([list(i.grid) for i in infos], dtype=torch.long)
            out["image_sizes"] = torch.tensor([list(i.original_size) for i in infos], dtype=torch.long)
            out["images_per_sample"] = torch.tensor([len(x) for x in per_sample], dtype=torch.long)
        return out

    def _check_call(self, text, padding, padding_side, max_length, return_tensors) -> tuple[list[str], str, int | None]:
        """Validate ``__call__``'s arguments: (texts, padding side, max_length limit)."""
        if text is None:
            raise ProcessorError("text is required (use '<|image|>' placeholders for images)")
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise ProcessorError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ProcessorError("text is an empty list")
        if return_tensors not in ("pt", None):
            raise ProcessorError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ProcessorError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        limit = self.max_length if max_length is None else int(max_length)
        if padding == "max_length" and limit is None:
            raise ProcessorError("padding='max_length' needs max_length")
        return texts, side, limit

    def _expand_images(self, texts: list[str], per_sample: list[list]) -> tuple[list[str], list[ImageInfo], list]:
        """Tile every image and replace each ``<|image|>`` placeholder by its tile tokens.

        Returns (expanded texts, one ImageInfo per image in batch order, pixel tiles per sample)."""
        cfg = self.image_config
        infos: list[ImageInfo] = []
        tile_chunks: list[torch.Tensor] = []
        expanded: list[str] = []
        n_tiles_total = 0
        for s, (t, imgs) in enumerate(zip(texts, per_sample)):
            if not imgs:
                expanded.append(t)
                continue
            pv, geoms = self.preprocess_images(imgs, sample=s)
            tile_chunks.append(pv)
            reps = []
            for j, g in enumerate(geoms):
                n = g["grid"][0] * g["grid"][1] + (1 if g["has_global_tile"] else 0)
                infos.append(ImageInfo(sample=s, index_in_sample=j, tile_size=cfg.tile_size, tile_start=n_tiles_total,
                                       n_tiles=n, patches_per_tile=cfg.patches_per_tile, token_grid=cfg.token_grid,
                                       **g))
                n_tiles_total += n
                reps.append(self.image_token_string(g["grid"]))
            pieces, last = [], 0
            for k, pos in enumerate(self._placeholder_spans(t)):
                pieces.append(t[last:pos])
                pieces.append(reps[k])
                last = pos + len(IMAGE_TOKEN)
            pieces.append(t[last:])
            expanded.append("".join(pieces))
        return expanded, infos, tile_chunks

    def _encode(self, expanded: list[str], add_special_tokens: bool, limit: int | None, truncation: bool,
                infos: list[ImageInfo], per_sample: list[list]) -> list[list[int]]:
        """Token ids per sample; a sample longer than ``limit`` raises, or is truncated (never into an image)."""
        encodings = self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)
        ids_list = [list(e.ids) for e in encodings]
        if limit is None:
            return ids_list
        for s, ids in enumerate(ids_list):
            if len(ids) <= limit:
                continue
            if not truncation:
                raise ProcessorError(
                    f"sample {s} is {len(ids)} tokens long (images expanded), above max_length={limit}; "
                    f"shorten it, pass a larger max_length, or truncation=True"
                )
            try:
                self.tokenizer.enable_truncation(limit, direction=self.truncation_side)
                enc = self.tokenizer.encode(expanded[s], add_special_tokens=add_special_tokens)
            finally:
                self.tokenizer.no_truncation()
            ids_list[s] = list(enc.ids)
            expected = sum(i.n_patch_tokens for i in infos if i.sample == s)
            if ids_list[s].count(self.patch_token_id) != expected or ids_list[s].count(self.image_token_id) != len(
                per_sample[s]
            ):
                raise ProcessorError(
                    f"truncating sample {s} to max_length={limit} would cut into its image tokens "
                    f"({len(encodings[s].ids)} tokens before truncation); raise max_length or drop images"
                )
        return ids_list

    def _pad(self, ids_list: list[list[int]], target: int | None, side: str) -> tuple[list[list[int]], list[list[int]]]:
        """Pad every sample to ``target`` tokens on ``side`` (None: no padding); returns (ids, masks)."""
        lengths = [len(x) for x in ids_list]
        masks = [[1] * n for n in lengths]
        if target is None or all(n == target for n in lengths):
            return ids_list, masks
        if self.pad_token_id is None:
            raise ProcessorError("padding needs a pad token; the tokenizer has none (set pad_token in tokenizer_config.json)")
        for s, n in enumerate(lengths):
            pad = target - n
            if pad:
                if side == "left":
                    ids_list[s] = [self.pad_token_id] * pad + ids_list[s]
                    masks[s] = [0] * pad + masks[s]
                else:
                    ids_list[s] = ids_list[s] + [self.pad_token_id] * pad
                    masks[s] = masks[s] + [0] * pad
        return ids_list, masks

    # ---- chat ----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: list | None = None,
        **kwargs,
    ):
        """Render a conversation (list of ``{"role", "content"}`` dicts; ``content`` a string or a
        list of ``{"type": "text", "text": ...}`` / ``{"type": "image"[, "image": img]}`` parts) in
        Llama 4's chat format. A list of conversations gives a list of strings.

        ``tokenize=True`` returns ``self(text=..., images=<images found in the messages>,
        add_special_tokens=False, **kwargs)`` (the rendered text already starts with
        ``<|begin_of_text|>``), as transformers does.
        """
        batched = isinstance(messages, (list, tuple)) and len(messages) > 0 and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batched else [messages]
        tools_in_user_message = kwargs.pop("tools_in_user_message", True)
        template_kwargs = dict(kwargs.pop("template_kwargs", None) or {})
        rendered = []
        for conv in convs:
            if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
                raise ProcessorError("a conversation must be a non-empty list of message dicts")
            if self._jinja is not None:
                ctx = dict(template_kwargs)
                ctx.setdefault("tools_in_user_message", tools_in_user_message)
                if tools is not None:
                    ctx["tools"] = tools
                try:
                    rendered.append(
                        self._jinja.render(
                            messages=list(conv),
                            add_generation_prompt=add_generation_prompt,
                            bos_token=self.bos_token,
                            **ctx,
                        )
                    )
                except ProcessorError:
                    raise
                except Exception as e:
                    raise ProcessorError(f"{self._chat_template_source}: rendering the chat template failed: {e}") from e
            else:
                rendered.append(
                    _render_llama4_chat(
                        conv,
                        bos_token=self.bos_token,
                        add_generation_prompt=add_generation_prompt,
                        tools=tools,
                        tools_in_user_message=tools_in_user_message,
                    )
                )
        if not tokenize:
            return rendered if batched else rendered[0]
        images = []
        for conv in convs:
            found = []
            for m in conv:
                c = m.get("content")
                if isinstance(c, (list, tuple)):
                    for part in c:
                        if isinstance(part, dict) and part.get("type") == "image":
                            for key in ("image", "url", "path"):
                                if key in part:
                                    found.append(part[key])
                                    break
            images.append(found)
        has_images = any(images)
        kwargs.setdefault("add_special_tokens", False)
        return self(text=rendered, images=images if has_images else None, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_processor(
    path: str | os.PathLike,
    *,
    max_length: int | None = None,
    max_image_pixels: int | None = None,
    min_image_side: int | None = None,
    **image_overrides,
) -> Llama4Processor:
    """Load a Llama 4 processor from a checkpoint (or tokenizer) directory.

    Reads ``tokenizer.json`` (required) and, when present, ``tokenizer_config.json`` (pad/bos
    tokens, ``padding_side``, ``truncation_side``, ``model_max_length``, ``chat_template``),
    ``preprocessor_config.json`` (image settings at top level), ``processor_config.json``
    (``patch_size``, ``pixel_shuffle_ratio``, nested ``image_processor`` settings,
    ``chat_template``) and ``chat_template.jinja`` / ``chat_template.json``.
    Keyword overrides: ``max_length`` (token limit; default tokenizer_config's ``model_max_length``),
    ``max_image_pixels``, ``min_image_side`` and any :class:`ImageProcessorConfig` field
    (``tile_size``, ``patch_size``, ``max_patches``, ``resize_to_max_canvas``, ``image_mean``, ...).
    Raises :class:`ProcessorError` naming the directory/file on missing or corrupt files.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise ProcessorError(f"processor directory {p} does not exist")
    if not p.is_dir():
        raise ProcessorError(f"{p} is not a directory; pass the checkpoint directory holding tokenizer.json")
    tokenizer = _load_tokenizer(p)
    tok_cfg = _read_json(p / "tokenizer_config.json") or {}
    pre_cfg = _read_json(p / "preprocessor_config.json") or {}
    proc_cfg = _read_json(p / "processor_config.json") or {}

    img: dict = {}
    img = _image_config_from(pre_cfg, str(p / "preprocessor_config.json"), img)
    nested = proc_cfg.get("image_processor")
    if isinstance(nested, dict):
        img = _image_config_from(nested, str(p / "processor_config.json") + " ['image_processor']", img)
    top = {k: proc_cfg[k] for k in ("patch_size", "pixel_shuffle_ratio") if k in proc_cfg}
    img = _image_config_from(top, str(p / "processor_config.json"), img)
    if max_image_pixels is not None:
        img["max_image_pixels"] = int(max_image_pixels)
    if min_image_side is not None:
        img["min_image_side"] = int(min_image_side)
    valid = set(ImageProcessorConfig.__dataclass_fields__)
    unknown = sorted(set(image_overrides) - valid)
    if unknown:
        raise ProcessorError(f"unknown load_processor option(s): {', '.join(unknown)} (valid: {', '.join(sorted(valid))})")
    img.update(image_overrides)
    if "image_mean" in img:
        img["image_mean"] = tuple(img["image_mean"])
    if "image_std" in img:
        img["image_std"] = tuple(img["image_std"])
    image_config = ImageProcessorConfig(**img)

    # chat template: chat_template.jinja > chat_template.json > processor_config > tokenizer_config
    template, source = None, "chat template"
    if (p / "chat_template.jinja").is_file():
        template, source = (p / "chat_template.jinja").read_text(encoding="utf-8"), str(p / "chat_template.jinja")
    elif (p / "chat_template.json").is_file():
        ct = _read_json(p / "chat_template.json") or {}
        template, source = ct.get("chat_template"), str(p / "chat_template.json")
    elif isinstance(proc_cfg.get("chat_template"), str):
        template, source = proc_cfg["chat_template"], str(p / "processor_config.json")
    elif isinstance(tok_cfg.get("chat_template"), str):
        template, source = tok_cfg["chat_template"], str(p / "tokenizer_config.json")

    # add_bos_token / add_eos_token in tokenizer_config.json are ignored, as transformers 5.23 does
    # for a tokenizer.json-backed tokenizer: tokenizer.json's post-processor decides.

    if max_length is None:
        mml = tok_cfg.get("model_max_length")
        if isinstance(mml, (int, float)) and 0 < mml < 1e15:
            max_length = int(mml)

    return Llama4Processor(
        tokenizer,
        image_config,
        pad_token=_token_str(tok_cfg.get("pad_token")),
        bos_token=_token_str(tok_cfg.get("bos_token")) or BOS_TOKEN,
        padding_side=tok_cfg.get("padding_side") or "left",
        truncation_side=tok_cfg.get("truncation_side") or "right",
        max_length=max_length,
        chat_template=template,
        chat_template_source=source,
        name_or_path=str(p),
    )
