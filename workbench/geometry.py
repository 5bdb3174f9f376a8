"""Where each image patch token sits on the ORIGINAL image (``workbench.geometry``).

The Llama 4 processor (:mod:`workbench.models.llama4.processor`) turns an image of ``original_size`` (h, w) into
patch tokens in four steps; :func:`patch_boxes` inverts them:

1. resize without distortion to ``resized_size`` (h', w') inside a best-fit canvas of
   ``grid = (rows, cols)`` tiles of ``tile_size`` (336) px, content at the top-left, zero padding
   at the bottom/right (the canvas and the resized size come from ``processor.plan_image``);
2. split the canvas into row-major tiles;
3. per tile, 14 px ViT patches merged 2x2 by the pixel shuffle: a ``token_grid`` of 12 x 12
   tokens per tile, row-major, each covering 28 x 28 canvas pixels;
4. when there is more than one tile, a global thumbnail: the WHOLE original image resized (with
   distortion) to one tile, its 12 x 12 tokens after the local tiles.

A canvas box maps back to the original with the resize's edge-to-edge scaling
``x_orig = x_canvas * w / w'``, ``y_orig = y_canvas * h / h'`` (bilinear resizing with
``align_corners=False`` maps pixel edges linearly); boxes are clipped to the image. A box lying
entirely in the padding covers no image pixel: its row is NaN (``return_mask=True`` also returns
a bool mask, True where the token covers image pixels). Thumbnail tokens map to ``w / 12`` by
``h / 12`` cells of the whole image.

Rows follow the token order of the image (tiles row-major, then the thumbnail), i.e. the order of
that image's patches in ``open_attention(...)`` (``att.sel(patch=att.image == i)``).
"""
from __future__ import annotations

import os
from pathlib import Path

from typing import Any, Mapping

import numpy as np

__all__ = ["patch_boxes"]


def _field(info: Any, name: str):
    if info is None:
        return None
    if isinstance(info, Mapping):
        return info.get(name)
    return getattr(info, name, None)


def _pair(v, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (height, width)-like pair of ints, got {v!r}") from None
    return a, b


def patch_boxes(info: Any = None, *, original_size=None, grid=None, resized_size=None, has_global_tile=None,
                tile_size: int | None = None, token_grid=None, config=None,
                return_mask: bool = False):
    """Pixel rectangle of each patch token of one image, in original-image pixels.

    Args:
        info: the processor's :class:`~workbench.models.llama4.processor.ImageInfo` for the image (or a mapping
            with the same field names). Keyword arguments override its fields.
        original_size: (height, width) of the input image.
        grid: (rows, cols) of tiles (the processor's ``aspect_ratios`` row).
        resized_size: (height, width) of the resized content in the canvas; when missing it is
            recomputed with the processor's own ``plan_image`` (and checked against ``grid``).
        has_global_tile: default: more than one tile.
        tile_size, token_grid: default from ``config`` (``ImageProcessorConfig()``: 336, (12, 12)).
        config: an :class:`~workbench.models.llama4.processor.ImageProcessorConfig` (tile size, max tiles,
            resize policy) used for the defaults and the recomputation.
        return_mask: also return a bool (n,) mask, True where the token covers image pixels.

    Returns:
        float64 array (n_patch_tokens, 4) of ``x0, y0, x1, y1`` (x right, y down, pixel edges,
        x1/y1 exclusive), clipped to the image; NaN rows for tokens that lie entirely in the
        canvas padding. n_patch_tokens = (rows * cols + global) * token_rows * token_cols.
    """
    from workbench.models.llama4.processor import ImageProcessorConfig, plan_image

    cfg = config if config is not None else ImageProcessorConfig()
    original_size = original_size if original_size is not None else _field(info, "original_size")
    if original_size is None:
        raise ValueError("patch_boxes needs original_size (height, width) or an ImageInfo")
    H0, W0 = _pair(original_size, "original_size")
    if H0 < 1 or W0 < 1:
        raise ValueError(f"original_size must be positive, got {(H0, W0)}")
    S = int(tile_size if tile_size is not None else (_field(info, "tile_size") or cfg.tile_size))
    token_grid = token_grid if token_grid is not None else (_field(info, "token_grid") or cfg.token_grid)
    gr, gc = _pair(token_grid, "token_grid")
    grid = grid if grid is not None else _field(info, "grid")
    resized_size = resized_size if resized_size is not None else _field(info, "resized_size")
    if resized_size is None:
        canvas, resized_size = plan_image((H0, W0), cfg)
        planned = (canvas[0] // cfg.tile_size, canvas[1] // cfg.tile_size)
        if grid is not None and _pair(grid, "grid") != planned:
            raise ValueError(f"grid {tuple(grid)} does not match the processor's plan {planned} for an image of "
                             f"(height, width) {(H0, W0)}; pass resized_size or the processor's ImageInfo/config")
        grid = planned if grid is None else grid
    if grid is None:
        raise ValueError("patch_boxes needs grid (rows, cols) or an ImageInfo")
    rows, cols = _pair(grid, "grid")
    Hr, Wr = _pair(resized_size, "resized_size")
    if rows < 1 or cols < 1 or Hr < 1 or Wr < 1:
        raise ValueError(f"grid {(rows, cols)} and resized_size {(Hr, Wr)} must be positive")
    if Hr > rows * S or Wr > cols * S:
        raise ValueError(f"resized_size {(Hr, Wr)} does not fit the {rows}x{cols} canvas of {S} px tiles")
    if has_global_tile is None:
        has_global_tile = _field(info, "has_global_tile")
    if has_global_tile is None:
        has_global_tile = rows * cols > 1

    i, j = np.meshgrid(np.arange(gr, dtype=np.float64), np.arange(gc, dtype=np.float64), indexing="ij")
    i, j = i.ravel(), j.ravel()
    th, tw = S / gr, S / gc
    parts, masks = [], []
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        cx0, cy0 = c * S + j * tw, r * S + i * th
        cx1, cy1 = np.minimum(cx0 + tw, Wr), np.minimum(cy0 + th, Hr)
        inside = (cx0 < Wr) & (cy0 < Hr)
        b = np.stack([cx0 * W0 / Wr, cy0 * H0 / Hr, cx1 * W0 / Wr, cy1 * H0 / Hr], axis=1)
        b[~inside] = np.nan
        parts.append(b)
        masks.append(inside)
    if has_global_tile:
        parts.append(np.stack([j * W0 / gc, i * H0 / gr, (j + 1) * W0 / gc, (i + 1) * H0 / gr], axis=1))
        masks.append(np.ones(gr * gc, bool))
    boxes = np.concatenate(parts)
    return (boxes, np.concatenate(masks)) if return_mask else boxes


def as_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, an array (H, W[, 3|4], uint8 or float in [0, 1]) or a path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"image file {p} does not exist")
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype.kind == "f":
        a = np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255)
    return a.astype(np.uint8)
