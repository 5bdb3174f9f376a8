"""Tests for workbench.models.llama4.processor (the Llama 4 processor).

Parity with transformers 5.23's Llama4Processor comes in three layers:

* token ids: always checked against transformers' own tokenizer (PreTrainedTokenizerFast on the
  same tokenizer dir) and its own ``Llama4Processor._prompt_split_image`` expansion;
* pixels: transformers' Llama 4 image processor needs torchvision, which this project does not
  install (only a CUDA build exists for x86_64 next to torch 2.13 CPU). So the tests always compare
  against REFERENCE fingerprints recorded from transformers 5.23 + torchvision 0.29.1 (per tile and
  channel: mean and two position-weighted means; tolerance 2e-6, far below one bfloat16 step, 2^-8,
  of a single pixel in a tile: 3.5e-8 per flipped pixel) plus the tile grids;
* full end-to-end parity (``input_ids``, ``attention_mask`` identical, ``pixel_values`` equal
  bit for bit after ``.float()``) runs whenever torchvision is importable, and is skipped otherwise.

Everything runs on real files in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import workbench as wb
from tests.tokenizer_factory import (
    LLAMA4_SPECIAL_TOKENS,
    PAD_TOKEN,
    make_llama4_tokenizer,
    save_transformers_llama4_processor,
)
from workbench.models.llama4.processor import (
    DEFAULT_CHAT_TEMPLATE,
    ProcessorError,
    load_processor,
)

# --------------------------------------------------------------------------------------------
# Test images (deterministic; np.random.RandomState is stable across numpy versions)
# --------------------------------------------------------------------------------------------


def _rgb_array(w: int, h: int, seed: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    r = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    b = 127.5 + 127.5 * np.sin(12 * x + 7 * y + seed)
    img = np.stack([r, g, b], -1) + rs.normal(0, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def make_image(kind: str, w: int, h: int, seed: int = 0):
    arr = _rgb_array(w, h, seed)
    if kind == "RGB":
        return Image.fromarray(arr)
    if kind == "L":
        return Image.fromarray(arr).convert("L")
    if kind == "RGBA":
        alpha = (np.linspace(0, 255, w)[None, :] * np.ones((h, 1))).round().astype(np.uint8)
        return Image.fromarray(np.concatenate([arr, alpha[..., None]], -1))
    if kind == "P":  # palette with a transparent index
        im = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 3
        return im
    if kind == "np_rgb":
        return arr
    if kind == "np_rgba":
        alpha = (np.linspace(255, 0, h)[:, None] * np.ones((1, w))).round().astype(np.uint8)
        return np.concatenate([arr, alpha[..., None]], -1)
    if kind == "np_gray1":
        return np.asarray(Image.fromarray(arr).convert("L"))[..., None]
    if kind == "torch_chw":
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    raise ValueError(kind)


# (kind, width, height): the sizes asked for plus boundary cases.
CASES = [
    ("RGB", 336, 336),
    ("RGB", 100, 700),
    ("RGB", 1000, 300),
    ("RGB", 1200, 900),
    ("RGB", 50, 50),
    ("RGB", 337, 335),
    ("RGB", 5000, 40),
    ("RGB", 2, 900),
    ("L", 640, 480),
    ("RGBA", 400, 300),
    ("P", 120, 90),
    ("np_rgb", 640, 200),
    ("np_rgba", 200, 500),
    ("np_gray1", 300, 700),
    ("torch_chw", 700, 700),
]


def case_id(c):
    return f"{c[0]}-{c[1]}x{c[2]}"


def fingerprint(tiles: torch.Tensor) -> list[list[float]]:
    """Per tile and channel: mean, mean weighted by row position, mean weighted by column position."""
    t = tiles.to(torch.float64)
    n, c, h, w = t.shape
    ry = torch.linspace(0, 1, h, dtype=torch.float64)[:, None]
    rx = torch.linspace(0, 1, w, dtype=torch.float64)[None, :]
    stats = torch.stack([t.mean((2, 3)), (t * ry).mean((2, 3)), (t * rx).mean((2, 3))], -1)  # (n, c, 3)
    return [[round(v, 7) for v in row] for row in stats.reshape(n, c * 3).tolist()]


# Recorded with transformers 5.23.0 + torchvision 0.29.1 (torch 2.14.1, CPU) from
# Llama4Processor(...)(text="<|image|>", images=[make_image(*case)]): tile grid (rows, cols) and
# fingerprint(pixel_values.float()). See tests/test_processor.py::_record_reference.
REFERENCE: dict = {}  # filled below

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama4_tok")
    ids = make_llama4_tokenizer(d)
    return d, ids


@pytest.fixture(scope="module")
def proc(tok_dir):
    return load_processor(tok_dir[0])


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir[0]))


@pytest.fixture(scope="module")
def hf_split_image():
    mod = pytest.importorskip("transformers.models.llama4.processing_llama4")
    return lambda grid, n: mod.Llama4Processor._prompt_split_image(None, grid, n)


def _torchvision_ok() -> bool:
    try:
        import torchvision  # noqa: F401  (transformers needs it for the image processor)
        from transformers import Llama4ImageProcessor

        Llama4ImageProcessor()
        return True
    except Exception:
        return False


HAVE_TV = _torchvision_ok()
needs_tv = pytest.mark.skipif(
    not HAVE_TV, reason="transformers' Llama4ImageProcessor needs torchvision (not installed); pixel parity is "
    "covered by the recorded REFERENCE fingerprints"
)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers Llama4Processor, our processor) loaded from the SAME saved directory."""
    if not HAVE_TV:
        pytest.skip("torchvision not installed")
    d = tmp_path_factory.mktemp("llama4_hf")
    hf = save_transformers_llama4_processor(d)
    return hf, load_processor(d)


# --------------------------------------------------------------------------------------------
# Tokenizer factory
# --------------------------------------------------------------------------------------------


def test_factory_is_deterministic_and_has_all_special_tokens(tmp_path):
    a = make_llama4_tokenizer(tmp_path / "a")
    b = make_llama4_tokenizer(tmp_path / "b")
    assert a == b
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert set(a) == set(LLAMA4_SPECIAL_TOKENS)
    assert sorted(a.values()) == list(range(1024 - len(a), 1024))
    p = load_processor(tmp_path / "a")
    assert p.vocab_size == 1024
    assert p.pad_token == PAD_TOKEN and p.pad_token_id == a[PAD_TOKEN]
    small = make_llama4_tokenizer(tmp_path / "c", vocab_size=512)
    assert max(small.values()) == 511
    with pytest.raises(ValueError, match="merges"):
        make_llama4_tokenizer(tmp_path / "d", vocab_size=100_000)


def test_decode_roundtrip(proc):
    text = "What is in this image? naïve café — 12345 ✓"
    out = proc(text=text, return_tensors=None)
    assert proc.decode(out["input_ids"][0]) == "<|begin_of_text|>" + text
    assert proc.decode(out["input_ids"][0], skip_special_tokens=True) == text
    assert proc.batch_decode(torch.tensor(out["input_ids"])) == ["<|begin_of_text|>" + text]
    from tokenizers import Tokenizer

    assert isinstance(proc.tokenizer, Tokenizer)
    assert isinstance(wb.load_processor, type(load_processor))


# --------------------------------------------------------------------------------------------
# Token-id parity with transformers' tokenizer and expansion code (always runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right", None])
def test_token_ids_match_transformers(proc, hf_tokenizer, hf_split_image, padding_side):
    images = [[make_image("RGB", 1000, 300)], [], [make_image("RGB", 50, 50), make_image("RGB", 100, 700)]]
    texts = [
        "<|image|>What is in this image?",
        "<|header_start|>user<|header_end|>\n\nNo image here, just text.<|eot|>",
        "Compare <|image|> with<|image|>: which is taller?",
    ]
    kw = {} if padding_side is None else {"padding_side": padding_side}
    ours = proc(text=texts, images=images, **kw)
    grids = ours["aspect_ratios"].tolist()
    assert grids == [[1, 3], [1, 1], [3, 1]]
    n = proc.image_config.patches_per_tile
    assert n == 144
    reps = iter(hf_split_image(tuple(g), n) for g in grids)
    expanded = [t.replace("<|image|>", "\0") for t in texts]
    expanded = ["".join(next(reps) if ch == "\0" else ch for ch in t) for t in expanded]
    ref = hf_tokenizer(expanded, padding=True, padding_side=padding_side or "left", return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    # structure of one expansion: image_start, 3 tiles with x separators, y separator, <|image|>, global
    ids = ours["input_ids"][0][ours["attention_mask"][0].bool()].tolist()
    tid = proc.token_ids
    assert ids[0] == tid["<|begin_of_text|>"] and ids[1] == tid["<|image_start|>"]
    assert ids.count(tid["<|patch|>"]) == 4 * 144
    assert ids.count(tid["<|tile_x_separator|>"]) == 2 and ids.count(tid["<|tile_y_separator|>"]) == 1
    assert ids.count(tid["<|image|>"]) == 1 and ids.count(tid["<|image_end|>"]) == 1


def test_add_special_tokens_false_and_unpadded(proc, hf_tokenizer):
    texts = ["short", "a much longer sentence than the first one"]
    ours = proc(text=texts, add_special_tokens=False, padding=False, return_tensors=None)
    ref = hf_tokenizer(texts, add_special_tokens=False)
    assert ours["input_ids"] == ref["input_ids"]
    assert ours["attention_mask"] == ref["attention_mask"]
    with pytest.raises(ProcessorError, match="different lengths"):
        proc(text=texts, padding=False)


def test_chat_template_matches_transformers(proc, hf_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": {"type": "string"}}}}]
    convs = [
        [{"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "  You are a helpful assistant.  "},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
        ],
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "sunny, 24 C"},
            {"role": "ipython", "content": {"temp": 24}},
        ],
    ]
    for conv in convs:
        for gen in (False, True):
            ref = hf_tokenizer.apply_chat_template(
                conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            assert proc.apply_chat_template(conv, add_generation_prompt=gen) == ref
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather in Paris?"}]
    ref = hf_tokenizer.apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, tools=tools)
    assert proc.apply_chat_template(conv, tools=tools) == ref
    # batch of conversations
    assert proc.apply_chat_template(convs[:2]) == [proc.apply_chat_template(c) for c in convs[:2]]


def test_custom_chat_template_from_directory(tmp_path):
    pytest.importorskip("jinja2")
    make_llama4_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    p = load_processor(tmp_path)
    conv = [{"role": "user", "content": "hi"}]
    assert p.apply_chat_template(conv, add_generation_prompt=True) == "<|begin_of_text|>[user] hi\n[assistant]"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ProcessorError, match="chat_template.jinja: the chat template does not compile"):
        load_processor(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)  # the built-in one: native renderer
    assert load_processor(tmp_path)._jinja is None


def test_chat_template_tokenize_with_images(proc):
    img1, img2 = make_image("RGB", 700, 300), make_image("L", 100, 100)
    conv = [
        {"role": "user", "content": [{"type": "image", "image": img1}, {"type": "text", "text": "and"}, {"type": "image", "image": img2}]}
    ]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>and<|image|><|eot|>")
    out = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ref = proc(text=[text], images=[[img1, img2]], add_special_tokens=False)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
    assert out["input_ids"][0].tolist().count(proc.bos_token_id) == 1


# --------------------------------------------------------------------------------------------
# Pixels: recorded transformers reference (always runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pixels_match_recorded_transformers_reference(proc, case):
    kind, w, h = case
    out = proc(text="<|image|>", images=[make_image(kind, w, h)])
    ref = REFERENCE[case_id(case)]
    assert out["aspect_ratios"].tolist() == [list(ref["grid"])]
    pv = out["pixel_values"]
    assert pv.dtype == torch.float32 and pv.shape[1:] == (3, 336, 336)
    rows, cols = ref["grid"]
    assert pv.shape[0] == rows * cols + (1 if rows * cols > 1 else 0)
    np.testing.assert_allclose(np.array(fingerprint(pv)), np.array(ref["fp"]), rtol=0, atol=2e-6)
    # every value is a bfloat16 value in [-1, 1]
    assert torch.equal(pv, pv.to(torch.bfloat16).float())
    assert pv.min() >= -1 and pv.max() <= 1
    info = out.images[0]
    assert info.original_size == (h, w)
    assert info.grid == (rows, cols) and info.n_tiles == pv.shape[0]
    assert out["image_sizes"].tolist() == [[h, w]]


def test_geometry_and_padding_layout(proc):
    # 1000x300 fits a 1x3 canvas (336 x 1008) without resizing: content at the top-left, zero
    # padding (-1 after normalisation) below and to the right.
    img = make_image("RGB", 1000, 300)
    out = proc(text="<|image|>", images=[img])
    info = out.images[0]
    assert info.canvas_size == (336, 1008) and info.resized_size == (300, 1000)
    pv = out["pixel_values"]
    assert torch.all(pv[0, :, 300:, :] == -1)
    assert torch.all(pv[2, :, :, 1000 - 672 :] == -1)
    # unresized content is exactly (x/255 - 0.5)/0.5 in bfloat16
    arr = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    expect = ((arr[:, :300, :336].to(torch.bfloat16) * (1 / 255)) - 0.5) / 0.5
    assert torch.equal(pv[0, :, :300, :], expect.float())


# --------------------------------------------------------------------------------------------
# End-to-end parity with transformers.Llama4Processor (needs torchvision)
# --------------------------------------------------------------------------------------------


def _assert_same(ours, ref):
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    if "pixel_values" in ref:
        assert ref["pixel_values"].dtype == torch.bfloat16
        assert ours["pixel_values"].dtype == torch.float32
        assert torch.equal(ours["pixel_values"], ref["pixel_values"].float())


@needs_tv
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_end_to_end_parity_single_image(hf_pair, case):
    hf, ours = hf_pair
    img = make_image(*case)
    text = ["<|image|>Describe the image."]
    ref = hf(text=text, images=[img], return_tensors="pt")
    _assert_same(ours(text=text, images=[img]), ref)


@needs_tv
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_end_to_end_parity_batch(hf_pair, padding_side):
    hf, ours = hf_pair
    imgs = [make_image(*c, seed=i) for i, c in enumerate(CASES[:5])]
    texts = ["<|image|><|image|>Compare.", "Only text, no image at all.", "<|image|>x <|image|> y <|image|>"]
    ref = hf(text=texts, images=imgs, padding=True, padding_side=padding_side, return_tensors="pt")
    _assert_same(ours(text=texts, images=imgs, padding=True, padding_side=padding_side), ref)
    nested = [imgs[:2], [], imgs[2:]]
    _assert_same(ours(text=texts, images=nested, padding_side=padding_side), ref)
    # default padding side (left) is the same
    ref = hf(text=texts, images=imgs, padding=True, return_tensors="pt")
    _assert_same(ours(text=texts, images=imgs), ref)


@needs_tv
def test_end_to_end_parity_chat_template(hf_pair):
    hf, ours = hf_pair
    img = make_image("RGB", 1200, 900)
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == hf.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=False
    )
    ref = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    _assert_same(ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True), ref)


@needs_tv
def test_end_to_end_parity_configured(tmp_path):
    hf = save_transformers_llama4_processor(tmp_path, max_patches=4, resize_to_max_canvas=True)
    ours = load_processor(tmp_path)
    assert ours.image_config.max_patches == 4 and ours.image_config.resize_to_max_canvas
    imgs = [make_image("RGB", 1200, 900), make_image("RGB", 100, 700), make_image("RGB", 50, 50)]
    texts = ["<|image|><|image|><|image|>"]
    _assert_same(ours(text=texts, images=imgs), hf(text=texts, images=imgs, return_tensors="pt"))


# --------------------------------------------------------------------------------------------
# Configuration from the checkpoint directory
# --------------------------------------------------------------------------------------------


def test_config_files_are_read(tmp_path):
    make_llama4_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Llama4ImageProcessor", "max_patches": 4, "size": {"height": 336, "width": 336}})
    )
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14, "processor_class": "Llama4Processor"}))
    p = load_processor(tmp_path)
    assert p.image_config.max_patches == 4
    out = p(text="<|image|>", images=[make_image("RGB", 5000, 40)])
    assert out["aspect_ratios"].tolist() == [[1, 4]]
    p2 = load_processor(tmp_path, max_patches=2, max_length=64)
    assert p2.image_config.max_patches == 2 and p2.max_length == 64
    with pytest.raises(ProcessorError, match="unknown load_processor option"):
        load_processor(tmp_path, max_patchez=3)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": PAD_TOKEN, "padding_side": "right", "model_max_length": 50})
    )
    p3 = load_processor(tmp_path)
    assert p3.padding_side == "right" and p3.max_length == 50
    out = p3(text=["a", "a b c d e"])
    assert out["attention_mask"][0].tolist()[-1] == 0


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}, {}])
def test_bos_eos_flags_match_transformers(tmp_path, flags):
    transformers = pytest.importorskip("transformers")
    make_llama4_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(flags)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    p = load_processor(tmp_path)
    texts = ["Hello world", "<|image|> no"]
    ours = p(text=texts, images=[make_image("RGB", 30, 30)], padding=False, return_tensors=None)
    expanded = [texts[0], texts[1].replace("<|image|>", p.image_token_string((1, 1)))]
    assert ours["input_ids"] == ref(expanded)["input_ids"]
    # transformers 5.23 ignores these flags for a tokenizer.json-backed tokenizer: the file's
    # post-processor (BOS only) decides, and so do we.
    assert ours["input_ids"][0][0] == p.bos_token_id
    assert ours["input_ids"][0][-1] != p.tokenizer.token_to_id("<|eot|>")


def test_nonsquare_size_rejected(tmp_path):
    make_llama4_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 336, "width": 448}}))
    with pytest.raises(ProcessorError, match="preprocessor_config.json.*square"):
        load_processor(tmp_path)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ProcessorError) as e:
        load_processor(tmp_path)
    assert "tokenizer.json" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(ProcessorError, match="does not exist"):
        load_processor(tmp_path / "nope")
    with pytest.raises(ProcessorError, match="not a directory"):
        load_processor(tmp_path / "tokenizer_config.json")


def test_corrupt_tokenizer_json(tmp_path):
    make_llama4_tokenizer(tmp_path)
    f = tmp_path / "tokenizer.json"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated mid-file: invalid JSON
    with pytest.raises(ProcessorError) as e:
        load_processor(tmp_path)
    msg = str(e.value)
    assert str(f) in msg and "corrupt" in msg and "line" in msg
    f.write_bytes(b"\x00\xff\xfe garbage \x80")  # not even UTF-8
    with pytest.raises(ProcessorError, match="tokenizer.json"):
        load_processor(tmp_path)
    f.write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))  # valid JSON, not a tokenizer
    with pytest.raises(ProcessorError, match="tokenizer.json is corrupt"):
        load_processor(tmp_path)


def test_corrupt_config_and_missing_special_tokens(tmp_path):
    make_llama4_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"max_patches": 16,')
    with pytest.raises(ProcessorError, match=r"preprocessor_config.json is not valid JSON \(line 1"):
        load_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ProcessorError, match=r"lacks Llama 4 special tokens: <\|begin_of_text\|>"):
        load_processor(tmp_path)


def test_placeholder_image_count_mismatch(proc):
    img = make_image("RGB", 64, 64)
    with pytest.raises(ProcessorError) as e:
        proc(text=["<|image|>a", "b <|image|><|image|>"], images=[img, img])
    assert "3 <|image|> placeholder(s)" in str(e.value) and "2 image(s)" in str(e.value)
    assert "[1, 2]" in str(e.value)
    with pytest.raises(ProcessorError, match=r"sample 1 has 2 <\|image\|> placeholder\(s\) in its text but 1 image"):
        proc(text=["<|image|>a", "b <|image|><|image|>"], images=[[img], [img]])
    with pytest.raises(ProcessorError, match="sample 0 has 1 .* no images were passed"):
        proc(text=["<|image|>a"])
    with pytest.raises(ProcessorError, match="0 <|image|> placeholder"):
        proc(text=["no placeholder"], images=[img])
    with pytest.raises(ProcessorError, match="2 per-sample lists but there are 1"):
        proc(text=["<|image|>"], images=[[img], []])


@pytest.mark.parametrize(
    "bad, match",
    [
        (42, "has type builtins.int"),
        ({"image": 1}, "has type builtins.dict"),
        (b"\x89PNG", "has type builtins.bytes"),
        (np.zeros((20, 20, 3), dtype=np.float32), "dtype float32; only uint8"),
        (torch.zeros(3, 20, 20), "dtype float32; only uint8"),
        (np.zeros((2, 20, 20, 3), dtype=np.uint8), "4 dimensions"),
        (np.zeros((20, 20, 2), dtype=np.uint8), r"shape \(20, 20, 2\)"),
        ("/definitely/not/here.png", "no image file"),
        ("https://example.com/cat.png", "looks like a URL"),
    ],
)
def test_not_an_image(proc, bad, match):
    with pytest.raises(ProcessorError, match=match) as e:
        proc(text="<|image|>", images=[bad])
    assert "image 0 of sample 0" in str(e.value)


def test_non_image_file(proc, tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("this is not a png")
    with pytest.raises(ProcessorError, match="not a readable image"):
        proc(text="<|image|>", images=[f])
    g = tmp_path / "ok.png"
    make_image("RGB", 80, 60).save(g)
    assert proc(text="<|image|>", images=[str(g)])["pixel_values"].shape == (1, 3, 336, 336)


def test_tiny_images(proc):
    for w, h in [(1, 100), (100, 1), (1, 1)]:
        with pytest.raises(ProcessorError, match="minimum side is 2 px"):
            proc(text="<|image|>", images=[Image.new("RGB", (w, h))])
    with pytest.raises(ProcessorError, match="minimum side"):
        proc(text="<|image|>", images=[np.zeros((1, 50), dtype=np.uint8)])
    out = proc(text="<|image|>", images=[Image.new("RGB", (2, 2), (255, 0, 0))])
    assert out["pixel_values"].shape == (1, 3, 336, 336)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # far too little data: must never be decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_images(tok_dir, tmp_path):
    p = load_processor(tok_dir[0], max_image_pixels=10_000)
    with pytest.raises(ProcessorError, match=r"200x100 = 20,000 pixels, above the limit of 10,000") as e:
        p(text="<|image|>", images=[make_image("RGB", 200, 100)])
    assert "max_image_pixels" in str(e.value)
    # a decompression bomb on disk: a PNG header announcing 100000 x 100000 pixels (30 GB decoded)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    default = load_processor(tok_dir[0])
    with pytest.raises(ProcessorError, match=r"decompression-bomb guard.*10000000000 pixels") as e:
        default(text="<|image|>", images=[bomb])
    assert str(bomb) in str(e.value)
    # above our default limit (89,478,485) but below PIL's own refusal (2x that): our check, before decoding
    bomb.write_bytes(_png_header_only(10_000, 10_000))
    with pytest.raises(ProcessorError, match="10000x10000 = 100,000,000 pixels, above the limit of 89,478,485"):
        default(text="<|image|>", images=[bomb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(_png_header_only(10_000, 10_000)))  # an opened, still undecoded image
    with im, pytest.raises(ProcessorError, match="decompression bombs"):
        default(text="<|image|>", images=[im])
    with pytest.raises(ProcessorError, match="above the limit"):
        p(text="<|image|>", images=[np.zeros((101, 100), dtype=np.uint8)])


def test_max_length_and_truncation(proc, tok_dir, hf_tokenizer):
    p = load_processor(tok_dir[0], max_length=12)
    text = "the quick brown fox jumps over the lazy dog and keeps running far away"
    n = len(proc(text=text)["input_ids"][0])
    assert n > 12
    with pytest.raises(ProcessorError, match=f"sample 0 is {n} tokens long.*max_length=12"):
        p(text=text)
    out = p(text=[text, "hi"], truncation=True)
    assert out["input_ids"].shape == (2, 12)
    ref = hf_tokenizer([text, "hi"], truncation=True, max_length=12, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    # per call override
    assert proc(text=text, max_length=n)["input_ids"].shape == (1, n)
    with pytest.raises(ProcessorError, match="max_length=5"):
        proc(text=text, max_length=5)
    # truncation that would cut an image's tokens is refused
    img = make_image("RGB", 64, 64)
    with pytest.raises(ProcessorError, match="cut into its image tokens"):
        proc(text="<|image|>" + text, images=[img], max_length=100, truncation=True)
    out = proc(text="<|image|>" + text, images=[img], max_length=150, truncation=True)
    assert out["input_ids"].shape == (1, 150)
    # padding to max_length
    out = p(text="hi", padding="max_length")
    n_hi = len(proc(text="hi")["input_ids"][0])
    assert out["input_ids"].shape == (1, 12) and out["attention_mask"].sum() == n_hi
    assert out["input_ids"][0, 0] == proc.pad_token_id


def test_bad_text_and_options(proc):
    with pytest.raises(ProcessorError, match="text is required"):
        proc(images=None)
    with pytest.raises(ProcessorError, match="string or a list of strings"):
        proc(text=[1, 2])
    with pytest.raises(ProcessorError, match="padding_side"):
        proc(text="a", padding_side="middle")
    with pytest.raises(ProcessorError, match="return_tensors"):
        proc(text="a", return_tensors="np")


def test_output_helpers(proc):
    img = make_image("RGB", 1200, 900)
    out = proc(text=["<|image|>a", "<|image|>b"], images=[img, make_image("RGB", 50, 50)])
    assert out.input_ids is out["input_ids"]
    moved = out.to("cpu", dtype=torch.bfloat16)
    assert moved["pixel_values"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long
    assert set(out.model_inputs()) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["images_per_sample"].tolist() == [1, 1]
    assert [i.n_tiles for i in out.images] == [13, 1] and [i.sample for i in out.images] == [0, 1]
    assert [i.tile_start for i in out.images] == [0, 13]
    assert out.images[0].n_patch_tokens == 13 * 144
    assert out.images[0].token_grid == (12, 12)
    n_patch = (out["input_ids"] == proc.patch_token_id).sum(1).tolist()
    assert n_patch == [13 * 144, 144]


# --------------------------------------------------------------------------------------------
# Recording the reference (run by hand where torchvision is installed):
#   python -c "from tests.test_processor import _record_reference as r; r()"
# --------------------------------------------------------------------------------------------


def _record_reference():  # pragma: no cover - tooling
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf = save_transformers_llama4_processor(d)
        lines = ["REFERENCE.update(", "    {"]
        for case in CASES:
            img = make_image(*case)
            grid = hf.image_processor(images=[img], return_tensors="pt")["aspect_ratios"][0].tolist()
            fp = fingerprint(hf(text=["<|image|>"], images=[img], return_tensors="pt")["pixel_values"].float())
            lines.append(f"        {case_id(case)!r}: {{")
            lines.append(f"            \"grid\": {tuple(grid)!r},")
            lines.append("            \"fp\": [")
            lines += [f"                {row!r}," for row in fp]
            lines.append("            ],")
            lines.append("        },")
        lines += ["    }", ")"]
        print("\n".join(lines))


# fmt: off
REFERENCE.update(
    {
        'RGB-336x336': {
            "grid": (1, 1),
            "fp": [
                [0.0007702, 0.0003721, 0.1653926, 0.0017937, 0.165773, 0.00093, 0.0003992, 0.0051383, -0.0082322],
            ],
        },
        'RGB-100x700': {
            "grid": (3, 1),
            "fp": [
                [-0.7020384, -0.3508943, -0.4412574, -0.8550361, -0.4041994, -0.4785836, -0.7084128, -0.3545817, -0.4576493],
                [-0.7021672, -0.3511818, -0.4412877, -0.5711672, -0.2622001, -0.4366355, -0.6955731, -0.3479134, -0.4552308],
                [-0.9752064, -0.4989997, -0.4951174, -0.9524566, -0.4980747, -0.4929759, -0.9754577, -0.4990162, -0.4969344],
                [0.0009244, 0.0004152, 0.1665051, 0.002112, 0.1657977, 0.0010349, 0.0008481, 0.0047906, -0.0077546],
            ],
        },
        'RGB-1000x300': {
            "grid": (1, 3),
            "fp": [
                [-0.6923922, -0.3627077, -0.2989251, -0.1057062, 0.0305849, -0.0527356, -0.0798884, -0.0600153, -0.0539909],
                [-0.0975285, -0.0972526, 0.0017516, -0.1055018, 0.0305278, -0.0527123, -0.1014678, -0.1395868, -0.0315198],
                [0.4509762, 0.1476426, 0.2514372, -0.1277277, 0.0177169, -0.0741685, -0.1608549, -0.1020431, -0.1010739],
                [0.0014822, 0.0008026, 0.1654203, 0.001481, 0.1656763, 0.0006764, 0.0002322, 0.0052902, -0.008095],
            ],
        },
        'RGB-1200x900': {
            "grid": (3, 4),
            "fp": [
                [-0.7110054, -0.3554558, -0.3126478, -0.6184461, -0.2498251, -0.3090292, 0.0679055, -0.0697732, -0.113958],
                [-0.1585672, -0.0796029, -0.0322937, -0.619116, -0.2502158, -0.3094376, 0.0261471, 0.1177927, 0.1629054],
                [0.4030677, 0.2013927, 0.2481581, -0.6187023, -0.2499349, -0.3094163, -0.1163839, -0.1588581, -0.20246],
                [0.0413083, 0.0206285, -0.1959279, -0.7825945, -0.3575169, -0.438029, -0.5029734, -0.1667562, -0.3251369],
                [-0.710929, -0.3553356, -0.3125942, 0.1223985, 0.1237404, 0.0613371, -0.2678704, -0.0526478, -0.0178148],
                [-0.1588395, -0.0793944, -0.0324488, 0.1223165, 0.1238357, 0.0610718, 0.1906433, 0.0013132, -0.0384736],
                [0.4027934, 0.2015817, 0.248079, 0.1224978, 0.1237965, 0.0614595, -0.1017194, 0.050963, 0.0947434],
                [0.041091, 0.0204817, -0.1960576, -0.3588956, -0.1435808, -0.3172216, -0.1920613, -0.1599856, -0.2949094],
                [-0.8037891, -0.433339, -0.3727717, 0.1777956, -0.0833601, 0.088892, 0.0184309, -0.1526744, 0.0166099],
                [-0.4288112, -0.3064489, -0.1824629, 0.1782641, -0.083292, 0.0891159, -0.6568326, -0.377696, -0.3089993],
                [-0.0480257, -0.1775287, 0.0075718, 0.1782795, -0.0832178, 0.0890461, -0.0056457, -0.1768236, -0.0477779],
                [-0.2931845, -0.2605308, -0.2936507, -0.3269652, -0.2619761, -0.3081034, -0.8901727, -0.4662781, -0.4718098],
                [0.0009168, 0.0004701, 0.1652377, 0.0010898, 0.1651964, 0.0005247, 0.0003175, 0.0054048, -0.0079853],
            ],
        },
        'RGB-50x50': {
            "grid": (1, 1),
            "fp": [
                [-0.0003601, -0.0004676, 0.1679807, -0.0010085, 0.1668778, -0.0004703, -0.0008092, 0.0039703, -0.0083002],
            ],
        },
        'RGB-337x335': {
            "grid": (1, 2),
            "fp": [
                [-0.0050328, -0.0039755, 0.1616063, -0.0011599, 0.1618248, -0.0006692, -0.0022038, 0.0026747, -0.0093956],
                [-0.994285, -0.4971523, -0.5, -0.9970562, -0.4980442, -0.5, -0.9970944, -0.498892, -0.5],
                [0.0007125, 0.0003828, 0.1653816, 0.0018019, 0.1657862, 0.000801, 0.0007348, 0.0053104, -0.0079355],
            ],
        },
        'RGB-5000x40': {
            "grid": (1, 15),
            "fp": [
                [-0.9876407, -0.4992806, -0.4929331, -0.880641, -0.490672, -0.4403133, -0.8713374, -0.4935604, -0.4349935],
                [-0.9749071, -0.4985343, -0.4863098, -0.8805715, -0.490664, -0.4402441, -0.8674996, -0.492288, -0.4338154],
                [-0.9597622, -0.4976517, -0.4786115, -0.8808728, -0.4906801, -0.4404816, -0.8713513, -0.4914562, -0.4363039],
                [-0.9441717, -0.4967414, -0.4707562, -0.880868, -0.4906834, -0.4403917, -0.8816782, -0.49165, -0.4417863],
                [-0.9278743, -0.4958089, -0.4625938, -0.88079, -0.4906861, -0.4403677, -0.8912205, -0.4926986, -0.4461316],
                [-0.912159, -0.4948825, -0.4547999, -0.8808837, -0.4906934, -0.4404009, -0.8940496, -0.4939534, -0.4470483],
                [-0.8957242, -0.4939253, -0.4464686, -0.8808838, -0.4906888, -0.4404606, -0.8896746, -0.4947172, -0.4441507],
                [-0.8794851, -0.4929699, -0.438355, -0.8808141, -0.4906853, -0.4404219, -0.8791724, -0.4944228, -0.4385793],
                [-0.8637454, -0.492055, -0.4306029, -0.8808611, -0.4906925, -0.4404431, -0.8696641, -0.4932847, -0.4343483],
                [-0.8476673, -0.4911355, -0.4225182, -0.8807055, -0.4906742, -0.4403449, -0.8679191, -0.4920767, -0.4340691],
                [-0.8316259, -0.490204, -0.414431, -0.8807157, -0.4906773, -0.4403171, -0.8728265, -0.4913982, -0.4371364],
                [-0.8155993, -0.4892571, -0.4063334, -0.8806553, -0.4906711, -0.4403053, -0.8835117, -0.4917834, -0.4426579],
                [-0.799937, -0.4883546, -0.3986761, -0.8805099, -0.4906596, -0.4402664, -0.8926857, -0.4929827, -0.4467641],
                [-0.7850778, -0.4874897, -0.3914119, -0.8805554, -0.490667, -0.4403079, -0.8941081, -0.4942068, -0.4468734],
                [-0.8003856, -0.4883812, -0.4115082, -0.8953746, -0.4918145, -0.453887, -0.9015613, -0.4953667, -0.4561688],
                [0.0016002, 0.0010548, 0.1653662, 0.0016091, 0.1686709, 0.0007897, 0.0001401, 0.0049153, -0.0097917],
            ],
        },
        'RGB-2x900': {
            "grid": (3, 1),
            "fp": [
                [-0.9940464, -0.4970285, -0.4999827, -0.9977558, -0.4985297, -0.4999966, -0.9905878, -0.4947496, -0.4999869],
                [-0.9940534, -0.4970288, -0.4999827, -0.9933316, -0.4962813, -0.49999, -0.9960362, -0.498911, -0.4999924],
                [-0.995967, -0.4986388, -0.4999883, -0.9929656, -0.4975069, -0.4999895, -0.9973891, -0.4987964, -0.4999974],
                [-0.0002369, -0.0005921, 0.2164246, 0.000196, 0.1659829, 0.0011954, 0.0028251, -0.1085772, -0.0045453],
            ],
        },
        'L-640x480': {
            "grid": (2, 2),
            "fp": [
                [-0.3133181, -0.0888372, -0.1276444, -0.3133181, -0.0888372, -0.1276444, -0.3133181, -0.0888372, -0.1276444],
                [-0.1119921, 0.0066075, -0.0771029, -0.1119921, 0.0066075, -0.0771029, -0.1119921, 0.0066075, -0.0771029],
                [-0.4566565, -0.3790315, -0.2231939, -0.4566565, -0.3790315, -0.2231939, -0.4566565, -0.3790315, -0.2231939],
                [-0.3920017, -0.3659506, -0.2219279, -0.3920017, -0.3659506, -0.2219279, -0.3920017, -0.3659506, -0.2219279],
                [0.002098, 0.0984708, 0.0494205, 0.002098, 0.0984708, 0.0494205, 0.002098, 0.0984708, 0.0494205],
            ],
        },
        'RGBA-400x300': {
            "grid": (1, 2),
            "fp": [
                [0.4575288, 0.1504923, 0.2085367, 0.4123599, 0.1853006, 0.1435373, 0.4149889, 0.1390827, 0.1457378],
                [-0.6869566, -0.3603104, -0.4699976, -0.8162477, -0.3949196, -0.4831498, -0.8284516, -0.4294236, -0.4841539],
                [0.665829, 0.3329374, 0.331407, 0.501715, 0.3331369, 0.1672228, 0.4926955, 0.2480742, 0.1584861],
            ],
        },
        'P-120x90': {
            "grid": (1, 1),
            "fp": [
                [-0.2259327, -0.209728, 0.0072175, -0.225726, -0.1186912, -0.1057331, -0.2093874, -0.1980817, -0.1079235],
            ],
        },
        'np_rgb-640x200': {
            "grid": (1, 2),
            "fp": [
                [-0.6844615, -0.406226, -0.2913358, -0.4036001, -0.2643776, -0.2019444, -0.4041536, -0.3231925, -0.2111825],
                [-0.1806286, -0.2566016, -0.0921609, -0.4604125, -0.2867039, -0.2561391, -0.4614201, -0.3364079, -0.2656224],
                [0.0010489, 0.0006455, 0.1653488, 0.002028, 0.1662579, 0.0008733, 0.0005878, 0.005426, -0.0083024],
            ],
        },
        'np_rgba-200x500': {
            "grid": (2, 1),
            "fp": [
                [-0.2034323, -0.0680233, -0.2243883, -0.3758051, -0.0996399, -0.3146585, -0.209206, -0.0695006, -0.266029],
                [-0.4653538, -0.3660386, -0.3365429, -0.4388368, -0.3609666, -0.3333249, -0.4639752, -0.3658882, -0.3416735],
                [0.5029346, 0.3354615, 0.3343099, 0.3382933, 0.3355966, 0.1690378, 0.4979806, 0.3355041, 0.2455891],
            ],
        },
        'np_gray1-300x700': {
            "grid": (3, 1),
            "fp": [
                [-0.3781113, -0.1483716, -0.1837149, -0.3781113, -0.1483716, -0.1837149, -0.3781113, -0.1483716, -0.1837149],
                [0.1274466, 0.1051332, 0.0422914, 0.1274466, 0.1051332, 0.0422914, 0.1274466, 0.1051332, 0.0422914],
                [-0.8856016, -0.4953761, -0.4462698, -0.8856016, -0.4953761, -0.4462698, -0.8856016, -0.4953761, -0.4462698],
                [0.0020234, 0.0983776, 0.0495296, 0.0020234, 0.0983776, 0.0495296, 0.0020234, 0.0983776, 0.0495296],
            ],
        },
        'torch_chw-700x700': {
            "grid": (3, 3),
            "fp": [
                [-0.5139521, -0.2567964, -0.1792089, -0.5139648, -0.1793604, -0.2568705, -0.0493721, -0.0273474, -0.041408],
                [0.4404459, 0.2202755, 0.2991899, -0.5133838, -0.1787197, -0.2567568, -0.0388872, -0.0308479, -0.0852584],
                [-0.8403199, -0.4201521, -0.4935386, -0.9594361, -0.4732266, -0.498366, -0.8803857, -0.4294786, -0.4950732],
                [-0.5145931, -0.2575284, -0.1794387, 0.4403344, 0.2991854, 0.2201779, 0.0513657, 0.0245569, 0.0188808],
                [0.4391555, 0.2196233, 0.2986272, 0.4398417, 0.2990412, 0.2199425, 0.046515, 0.0312869, 0.069285],
                [-0.8403981, -0.4201871, -0.4935379, -0.8801134, -0.4334601, -0.4951679, -0.9586821, -0.4869696, -0.4984061],
                [-0.959684, -0.4983762, -0.4733173, -0.8401516, -0.4935294, -0.4200839, -0.9187142, -0.4967415, -0.4734906],
                [-0.8800834, -0.4951706, -0.4334463, -0.8403165, -0.4935372, -0.4201391, -0.9152266, -0.4966, -0.4721326],
                [-0.9866494, -0.4994617, -0.49946, -0.9866494, -0.4994605, -0.4994613, -0.9945267, -0.4997654, -0.4997582],
                [0.0008472, 0.0003018, 0.1651856, 0.0013768, 0.165429, 0.0006879, 0.0004398, 0.0054988, -0.0080679],
            ],
        },
    }
)
# fmt: on
