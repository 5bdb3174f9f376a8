"""Patch token -> original-image pixel boxes, on real processor output (tiny tokenizer on disk)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.tokenizer_factory import make_llama4_tokenizer
from workbench.geometry import patch_boxes
from workbench.hooks.attention import patch_layout
from workbench.models.llama4.processor import ImageProcessorConfig, load_processor

SIZES = [(336, 336), (1000, 300), (300, 1000), (800, 600), (2000, 2000), (100, 50)]  # (width, height)


@pytest.fixture(scope="module")
def proc_and_ids(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    ids = make_llama4_tokenizer(d)
    return load_processor(d), ids


def _info(proc, w, h):
    out = proc(text="<|image|>what is this?", images=[Image.new("RGB", (w, h), (120, 30, 200))])
    return out.images[0]


def _overlap_total(b: np.ndarray) -> float:
    """Sum over pairs i < j of the intersection area of boxes i and j."""
    x0, y0, x1, y1 = (b[:, k] for k in range(4))
    w = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    h = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    return float(np.triu(w * h, 1).sum())


def _area(b: np.ndarray) -> float:
    return float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum())


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_boxes_tile_the_image_and_thumbnail_covers_it(proc_and_ids, size):
    proc, _ = proc_and_ids
    w, h = size
    info = _info(proc, w, h)
    rows, cols = info.grid
    boxes, inside = patch_boxes(info, return_mask=True)
    assert boxes.shape == (info.n_patch_tokens, 4)
    assert np.array_equal(np.isnan(boxes).any(1), ~inside)
    n_local = rows * cols * 144
    local = boxes[:n_local][inside[:n_local]]
    # inside the image, non-degenerate
    assert (local[:, 0] >= 0).all() and (local[:, 1] >= 0).all()
    assert (local[:, 2] <= w).all() and (local[:, 3] <= h).all()
    assert (local[:, 2] > local[:, 0]).all() and (local[:, 3] > local[:, 1]).all()
    # no gaps, no overlaps: disjoint boxes whose areas add up to the image area
    assert _overlap_total(local) <= 1e-9 * w * h
    assert _area(local) == pytest.approx(w * h, rel=1e-12)
    assert local[:, 2].max() == pytest.approx(w) and local[:, 3].max() == pytest.approx(h)
    if info.has_global_tile:
        thumb = boxes[n_local:]
        assert thumb.shape == (144, 4) and inside[n_local:].all()
        assert _overlap_total(thumb) <= 1e-9 * w * h
        assert _area(thumb) == pytest.approx(w * h, rel=1e-12)
        assert thumb[:, :2].min() == 0 and thumb[:, 2].max() == pytest.approx(w) and thumb[:, 3].max() == pytest.approx(h)
    else:
        assert n_local == boxes.shape[0]
    # from (original size, grid) alone, resized size recomputed with the processor's own planning
    again = patch_boxes(original_size=(h, w), grid=(rows, cols))
    np.testing.assert_array_equal(again, boxes)


def test_known_patches_map_to_hand_computed_rectangles(proc_and_ids):
    proc, _ = proc_and_ids
    # 800x600 (w x h): smallest canvas that needs no downscaling is 2x3 tiles (672 x 1008); the
    # image is never upscaled past what it needs, so it sits unscaled at the top-left.
    info = _info(proc, 800, 600)
    assert info.grid == (2, 3) and info.resized_size == (600, 800)
    b = patch_boxes(info)
    tok = lambda tile, i, j: tile * 144 + i * 12 + j  # noqa: E731
    np.testing.assert_allclose(b[tok(0, 0, 0)], [0, 0, 28, 28])
    np.testing.assert_allclose(b[tok(4, 8, 0)], [336, 560, 364, 588])  # tile row 1, col 1
    np.testing.assert_allclose(b[tok(4, 9, 0)], [336, 588, 364, 600])  # clipped at the bottom edge
    np.testing.assert_allclose(b[tok(2, 0, 4)], [784, 0, 800, 28])  # clipped at the right edge
    assert np.isnan(b[tok(5, 11, 11)]).all()  # x 980.. > 800: padding
    np.testing.assert_allclose(b[6 * 144 + 0 * 12 + 6], [400, 0, 800 * 7 / 12, 50])  # thumbnail (0, 6)

    # 2000x2000: downscaled to the 4x4 canvas (1344 px): scale 2000/1344
    info = _info(proc, 2000, 2000)
    assert info.grid == (4, 4) and info.resized_size == (1344, 1344) and info.n_patch_tokens == 2448
    b = patch_boxes(info)
    s = 2000 / 1344
    np.testing.assert_allclose(b[tok(5, 2, 3)], [420 * s, 392 * s, 448 * s, 420 * s])  # canvas (420, 392)+28
    np.testing.assert_allclose(b[tok(5, 2, 3)], [625.0, 583.3333333333, 666.6666666667, 625.0])

    # 100x50: upscaled to 336 x 168 in one tile (no thumbnail); rows 6.. are padding
    info = _info(proc, 100, 50)
    assert info.grid == (1, 1) and info.resized_size == (168, 336) and not info.has_global_tile
    b = patch_boxes(info)
    np.testing.assert_allclose(b[0], [0, 0, 100 / 12, 50 / 6])
    assert np.isnan(b[6 * 12:]).all() and not np.isnan(b[:6 * 12]).any()


def test_patch_order_matches_processor_token_layout(proc_and_ids):
    """The attention coordinates (image, tile, row, col) follow the processor's token layout."""
    proc, tok_ids = proc_and_ids
    imgs = [Image.new("RGB", (1000, 300)), Image.new("RGB", (336, 336)), Image.new("RGB", (300, 1000))]
    out = proc(text=["<|image|>a<|image|>b c<|image|>d"], images=[imgs])
    ids = out["input_ids"][0].numpy()
    lay = patch_layout(ids, np.ones(ids.shape, bool), tok_ids["<|patch|>"], tok_ids["<|image_start|>"], 144, 12)
    for k, info in enumerate(out.images):
        sel = lay["image"] == k
        assert sel.sum() == info.n_patch_tokens == patch_boxes(info).shape[0]
        assert lay["tile"][sel].max() + 1 == info.n_tiles
        assert np.array_equal(lay["row"][sel][:144], np.repeat(np.arange(12), 12))
        assert np.array_equal(lay["col"][sel][:144], np.tile(np.arange(12), 12))
    assert lay["image"].max() == 2


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="original_size"):
        patch_boxes(grid=(1, 1))
    with pytest.raises(ValueError, match="does not match the processor's plan"):
        patch_boxes(original_size=(600, 800), grid=(1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        patch_boxes(original_size=(600, 800), grid=(1, 1), resized_size=(600, 800))
    cfg = ImageProcessorConfig(max_patches=4)
    assert patch_boxes(original_size=(2000, 2000), config=cfg).shape == (5 * 144, 4)
