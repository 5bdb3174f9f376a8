"""Train the embedded default model: a tiny Llama 4 (16 experts, top-1 + shared expert, early fusion).

    python -m workbench.train_tiny --out data/models/tiny-llama4 [--seed 0] [--minutes 26] [--steps 3200]
                                   [--device auto] [--threads 1]
    python -m workbench.train_tiny --write-demo data     # data/prompts/demo.jsonl + data/images/*.png

writes an HF-format checkpoint directory (config.json, model.safetensors, tokenizer files,
preprocessor_config.json, processor_config.json, README.md model card) loadable by
``wb.load_model`` / ``wb.load_processor`` and by transformers' Llama4ForConditionalGeneration.

Data (all offline, deterministic from the seed):

* prose  -- the Python documentation topics bundled with the interpreter (``pydoc_data.topics``);
* code   -- the top-level ``.py`` files of the Python standard library;
* math   -- generated arithmetic lines ("17 + 25 = 42");
* image  -- 2 x 2 grids of scikit-learn's 8x8 digit images (``load_digits``) in one 112 px tile,
  captioned ``top left 3, top right 7, bottom left 1, bottom right 0``. Digit images with sample
  index ``i % 5 == 0`` are held out (never trained on) and used for evaluation.

Prose topics and code files are split into train / validation by their sorted index (every 10th
is validation). Training is plain PyTorch AdamW on the workbench model itself (gradients flow
through ``workbench.kernels.moe_experts``' torch path and, for the router, through the sigmoid
score that scales each expert's input), plus a Switch-style load-balancing loss. Image captions
weight their 4 digit tokens above the fixed caption words, and 30% of the training grids repeat
one digit class (a curriculum that gets the vision features going early); see ``image_batch``.
The run ends at ``--steps`` or ``--minutes``, whichever comes first (the learning-rate schedule
follows whichever is further along); on one CPU thread a step-bound run is deterministic.

The helpers here (grid rendering, held-out grids, attention probabilities from the ``hook_attn``
hook point, caption evaluation) are also what tests/test_tiny_model.py uses.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.llama4.config import ModelConfig

__all__ = [
    "QUADRANTS", "TOKENS_PER_TILE", "tiny_config", "render_grid", "caption", "grid_prompt", "digit_split",
    "heldout_grids", "sample_grids", "attention_probs", "capture_attention", "capture_router", "caption_metrics",
    "greedy_captions", "load_cv", "router_loads", "balance_loss", "new_model", "image_batch", "train_step",
    "TrainSettings", "train", "write_demo", "main",
]

# ---------------------------------------------------------------------------------------------
# Model shape
# ---------------------------------------------------------------------------------------------
VOCAB_SIZE = 1024
TILE = 112  # vision image_size = processor tile size; one tile per image (max_patches 1)
PATCH = 14  # 8 x 8 patches per tile -> pixel shuffle 0.5 -> 4 x 4 = 16 <|patch|> tokens
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2
TOKEN_GRID = TILE // PATCH // 2  # 4: the patch tokens form a 4 x 4 row-major grid over the tile
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
# Special tokens whose ids the config takes from the tokenizer.
SPECIAL_IDS_NEEDED = ("<|begin_of_text|>", "<|end_of_text|>", "<|eom|>", "<|eot|>", "<|finetune_right_pad|>",
                      "<|patch|>", "<|image_start|>", "<|image_end|>")


def tiny_config(special_ids: dict[str, int], vocab_size: int = VOCAB_SIZE, hidden_size: int = 128,
                intermediate_size: int = 128) -> ModelConfig:
    """The shipped architecture. ``special_ids``: the tokenizer's {special token: id}."""
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        intermediate_size_mlp=2 * hidden_size,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        hidden_act="silu", max_position_embeddings=10485760, rms_norm_eps=1e-5,
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        # layers 0-2 use RoPE with chunked attention (chunks of 64 tokens), layer 3 is NoPE (global)
        no_rope_layers=[1, 1, 1, 0], attention_chunk_size=64, use_qk_norm=True,
        rope_theta=10000.0, rope_scaling=None,
        attn_temperature_tuning=True, floor_scale=32, attn_scale=0.1,
        tie_word_embeddings=False, attention_bias=False,
        bos_token_id=special_ids["<|begin_of_text|>"],
        eos_token_id=[special_ids["<|end_of_text|>"], special_ids["<|eom|>"], special_ids["<|eot|>"]],
        pad_token_id=special_ids["<|finetune_right_pad|>"],
    )
    vision = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        vision_output_dim=128, projector_input_dim=128, projector_output_dim=128,
        image_size=TILE, patch_size=PATCH, pixel_shuffle_ratio=0.5, rope_theta=10000.0, num_channels=3,
    )
    return ModelConfig.from_dict({
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "text_config": text, "vision_config": vision,
        "image_token_index": special_ids["<|patch|>"],
        "boi_token_index": special_ids["<|image_start|>"], "eoi_token_index": special_ids["<|image_end|>"],
        "dtype": "float32",
    }, source="tiny_config")


def processor_files(out: Path) -> None:
    """preprocessor_config.json + processor_config.json: 112 px tiles, one tile per image."""
    pre = {
        "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
        "size": {"height": TILE, "width": TILE}, "max_patches": 1, "resize_to_max_canvas": False,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "do_convert_rgb": True,
    }
    proc = {"processor_class": "Llama4Processor", "patch_size": PATCH, "pixel_shuffle_ratio": 0.5,
            "fake_image_token": "<|image|>", "image_token": "<|patch|>",
            "start_of_img_token": "<|image_start|>", "end_of_img_token": "<|image_end|>"}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Digit grids
# ---------------------------------------------------------------------------------------------
_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: images (1797, 8, 8) float in [0, 16], labels (1797,)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32), d.target.astype(np.int64))
    return _DIGITS


def digit_split(split: str) -> np.ndarray:
    """Sample indices of the digit images of ``split``: "heldout" (index % 5 == 0) or "train"."""
    n = len(_digits()[1])
    idx = np.arange(n)
    if split == "heldout":
        return idx[idx % 5 == 0]
    if split == "train":
        return idx[idx % 5 != 0]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def render_grid(digit_images: np.ndarray, shifts: np.ndarray | None = None, scale: int = 6) -> np.ndarray:
    """Four 8x8 digits (4, 8, 8) in [0, 16] -> a (112, 112, 3) uint8 RGB image, dark ink on white.

    Digit k goes to quadrant k (top left, top right, bottom left, bottom right), each quadrant
    56 x 56 px; a digit is upscaled ``scale`` x (nearest) and centred, or offset by ``shifts[k]``
    (dy, dx) pixels from the centre (training augmentation), clipped to its quadrant.
    """
    q = TILE // 2
    canvas = np.full((TILE, TILE), 255.0, dtype=np.float32)
    size = 8 * scale
    for k in range(4):
        big = np.kron(digit_images[k], np.ones((scale, scale), dtype=np.float32))  # (size, size)
        ink = 255.0 * (1.0 - big / 16.0)
        oy = ox = o0 = (q - size) // 2
        if shifts is not None:
            oy = int(np.clip(o0 + shifts[k][0], 0, q - size))
            ox = int(np.clip(o0 + shifts[k][1], 0, q - size))
        r0, c0 = (k // 2) * q + oy, (k % 2) * q + ox
        canvas[r0:r0 + size, c0:c0 + size] = ink
    img = np.round(canvas).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def caption(labels) -> str:
    """``top left 3, top right 7, bottom left 1, bottom right 0``."""
    return ", ".join(f"{q} {int(d)}" for q, d in zip(QUADRANTS, labels))


def grid_prompt(labels=None) -> str:
    """The text of one grid prompt, ``<|image|>top left 3, ..., bottom right 0<|eot|>`` (the processor
    expands ``<|image|>``); without labels just ``<|image|>`` (the prompt to caption from)."""
    return "<|image|>" if labels is None else "<|image|>" + caption(labels) + "<|eot|>"


@dataclass
class Grid:
    image: np.ndarray  # (112, 112, 3) uint8
    labels: tuple[int, int, int, int]
    indices: tuple[int, int, int, int]  # sklearn sample indices, quadrant order


def sample_grids(rng: np.random.Generator, split: str, n: int, augment: bool = False,
                 same_class_share: float = 0.0) -> list[Grid]:
    """``n`` random grids of digits drawn (with replacement) from ``split``.

    ``same_class_share``: the expected share of grids whose four digits are four images of one
    class (a training curriculum: there, attending to any quadrant already names the digit, so
    the vision features become informative before the attention has learned where to look).
    """
    images, labels = _digits()
    pool = digit_split(split)
    out = []
    for _ in range(n):
        if same_class_share and rng.random() < same_class_share:
            cls = int(rng.integers(0, 10))
            idx = rng.choice(pool[labels[pool] == cls], size=4, replace=True)
        else:
            idx = rng.choice(pool, size=4, replace=True)
        shifts = rng.integers(-2, 3, size=(4, 2)) if augment else None
        out.append(Grid(render_grid(images[idx], shifts), tuple(int(x) for x in labels[idx]),
                        tuple(int(x) for x in idx)))
    return out


def heldout_grids(n: int = 50, seed: int = 1234) -> list[Grid]:
    """``n`` evaluation grids of held-out digits (never seen in training), centred, deterministic."""
    return sample_grids(np.random.default_rng(seed), "heldout", n, augment=False)


# ---------------------------------------------------------------------------------------------
# Text corpora
# ---------------------------------------------------------------------------------------------
def prose_documents() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def code_documents() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for f in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        try:
            out.append(Path(f).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def math_documents(seed: int, n_lines: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        op = ("+", "-", "*")[int(rng.integers(0, 3))]
        c = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {c}")
    return ["\n".join(lines) + "\n"]


class TokenStream:
    """One domain's documents tokenized into one id stream (documents joined by <|end_of_text|>)."""

    def __init__(self, tokenizer, docs: list[str], eot_id: int):
        ids: list[int] = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot_id)
        self.ids = torch.tensor(ids, dtype=torch.long)

    def windows(self, starts, length: int, bos_id: int) -> torch.Tensor:
        """(len(starts), length) rows: BOS then ``length - 1`` tokens from each start."""
        rows = [torch.cat([torch.tensor([bos_id]), self.ids[s:s + length - 1]]) for s in starts]
        return torch.stack(rows)

    def random_windows(self, rng: np.random.Generator, n: int, length: int, bos_id: int) -> torch.Tensor:
        starts = rng.integers(0, len(self.ids) - length, size=n)
        return self.windows(starts, length, bos_id)

    def fixed_windows(self, n: int, length: int, bos_id: int) -> torch.Tensor:
        """``n`` evenly spaced windows (deterministic validation set)."""
        starts = np.linspace(0, len(self.ids) - length, n).astype(np.int64)
        return self.windows(starts, length, bos_id)


def build_corpora(tokenizer, special_ids: dict[str, int], seed: int,
                  limit: int | None = None) -> dict[str, dict[str, TokenStream]]:
    """{domain: {"train": stream, "val": stream}} for prose, code, math (``limit``: first documents only)."""
    eot = special_ids["<|end_of_text|>"]
    out = {}
    for name, docs in (("prose", prose_documents()), ("code", code_documents())):
        docs = docs[:limit] if limit else docs
        train = [d for i, d in enumerate(docs) if i % 10 != 0]
        val = [d for i, d in enumerate(docs) if i % 10 == 0]
        out[name] = {"train": TokenStream(tokenizer, train, eot), "val": TokenStream(tokenizer, val, eot)}
    n = 2000 if limit else 60000
    out["math"] = {"train": TokenStream(tokenizer, math_documents(seed, n), eot),
                   "val": TokenStream(tokenizer, math_documents(seed + 10_000, 2000), eot)}
    return out


# ---------------------------------------------------------------------------------------------
# Attention probabilities from the hook_attn hook point, routing loads
# ---------------------------------------------------------------------------------------------
def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) over allowed keys: (B, Hq, T, T) float32.

    query (B, Hq, T, D), key (B, Hkv, T, D), allowed (B, 1, T, T) bool; query head h reads key
    head h // (Hq / Hkv) (grouped-query attention), as the model's SDPA call does.
    """
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each decoder layer's attention probabilities (B, Hq, T, T) during forward passes.

    Yields a list filled in layer order (one entry per layer per forward pass).
    """
    layers = _text_model(model).layers
    out: list[torch.Tensor] = []

    def fn(tap, *, query, key, scale, allowed, **_):
        out.append(attention_probs(query.detach(), key.detach(), scale, allowed))

    handles = [layer.self_attn.hook_attn.add(fn) for layer in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_router(model: nn.Module, keep_graph: bool = False) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect (router_logits (N, E), topk_ids (N, k)) per MoE layer and forward pass, in layer order."""
    moes = [layer.feed_forward for layer in _text_model(model).layers if layer.is_moe_layer]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fn(tap, *, router_logits, topk_ids, **_):
        out.append((router_logits if keep_graph else router_logits.detach(), topk_ids.detach()))

    handles = [m.hook_router.add(fn) for m in moes]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _text_model(model: nn.Module):
    return model.language_model.model if hasattr(model, "language_model") else model.model


def balance_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss E * sum_i f_i * P_i (1.0 when perfectly balanced).

    f_i: share of the top-k assignments routed to expert i (no gradient); P_i: mean softmax
    probability of expert i over the tokens (differentiable).
    """
    E = router_logits.shape[-1]
    f = torch.bincount(topk_ids.reshape(-1), minlength=E).float() / topk_ids.numel()
    p = torch.softmax(router_logits.float(), dim=-1).mean(0)
    return E * (f * p).sum()


def router_loads(records, n_layers: int, n_experts: int, masks=None) -> np.ndarray:
    """Sum top-k counts per (MoE layer, expert) over captured forward passes -> (n_layers, E) int64.

    ``records`` as filled by :func:`capture_router` (layers in order, pass after pass);
    ``masks``: optional per-pass boolean (N,) selecting the tokens counted (e.g. non-padding).
    """
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    for i, (_, ids) in enumerate(records):
        sel = ids if masks is None else ids[masks[i // n_layers]]
        counts[i % n_layers] += np.bincount(sel.reshape(-1).cpu().numpy(), minlength=n_experts)
    return counts


def load_cv(counts: np.ndarray) -> np.ndarray:
    """Per layer: coefficient of variation std(f) / mean(f) of the load shares f (population std)."""
    f = counts / counts.sum(-1, keepdims=True)
    return f.std(-1) / f.mean(-1)


# ---------------------------------------------------------------------------------------------
# Caption evaluation
# ---------------------------------------------------------------------------------------------
def quadrant_of_patch_tokens() -> np.ndarray:
    """(16,) quadrant index (0 TL, 1 TR, 2 BL, 3 BR) of each patch token of a tile, in prompt order."""
    r, c = np.divmod(np.arange(TOKENS_PER_TILE), TOKEN_GRID)
    return (r // (TOKEN_GRID // 2)) * 2 + c // (TOKEN_GRID // 2)


def digit_positions(input_ids: torch.Tensor, proc) -> torch.Tensor:
    """(B, 4) positions of the four caption digits (the digit tokens after <|image_end|>)."""
    end_id = proc.token_ids["<|image_end|>"]
    digit_ids = {proc.tokenizer.token_to_id(str(d)): d for d in range(10)}
    out = []
    for row in input_ids.tolist():
        start = row.index(end_id)
        pos = [i for i in range(start + 1, len(row)) if row[i] in digit_ids]
        if len(pos) != 4:
            raise ValueError(f"expected 4 caption digits after <|image_end|>, found {len(pos)}")
        out.append(pos)
    return torch.tensor(out)


@torch.no_grad()
def caption_metrics(model: nn.Module, proc, grids: list[Grid], batch_size: int = 25,
                    layers: tuple[int, ...] | None = None) -> dict:
    """Caption accuracy and attention localization on ``grids`` (teacher-forced, one pass each).

    Accuracy: for each of the 4 digits, the argmax over the whole vocabulary of the logits at
    the position just before the digit, given the true caption up to it (teacher forcing); a
    caption is correct when all 4 digits are. Localization: at that same position, attention
    probabilities (softmax over all allowed keys, averaged over heads and over ``layers``,
    default the last half of the decoder layers) summed over each quadrant's 4 patch tokens;
    the digit is localized when its own quadrant gets the most. Also per layer.
    """
    n_layers = len(_text_model(model).layers)
    layers = tuple(range(n_layers // 2, n_layers)) if layers is None else tuple(layers)
    quad = torch.from_numpy(quadrant_of_patch_tokens())
    correct, local, local_layer, nll = [], [], [], []
    for b in range(0, len(grids), batch_size):
        chunk = grids[b:b + batch_size]
        batch = proc(text=[grid_prompt(g.labels) for g in chunk], images=[[g.image] for g in chunk])
        with capture_attention(model) as atts:
            logits = model(**batch.model_inputs()).logits.float().cpu()
        ids = batch["input_ids"].cpu()
        pos = digit_positions(ids, proc)  # (B, 4)
        pred_pos = pos - 1
        rows = torch.arange(len(chunk))[:, None]
        pred = logits[rows, pred_pos].argmax(-1)  # (B, 4)
        correct.append(pred == ids[rows, pos])
        nll.append(F.cross_entropy(logits[rows, pred_pos].reshape(-1, logits.shape[-1]), ids[rows, pos].reshape(-1),
                                   reduction="none").view(-1, 4))
        patch_pos = (ids == model.config.image_token_index).nonzero()[:, 1].view(len(chunk), -1)  # (B, 16)
        att = torch.stack([a.cpu() for a in atts])  # (L, B, H, T, T)
        att = att.mean(2)  # head mean: (L, B, T, T)
        a = att[:, rows, pred_pos]  # (L, B, 4, T)
        a = torch.gather(a, 3, patch_pos[None, :, None, :].expand(a.shape[0], -1, 4, -1))  # (L, B, 4, 16)
        per_quad = torch.zeros(*a.shape[:3], 4).index_add_(3, quad, a)  # (L, B, 4, 4)
        target = torch.arange(4)[None, None, :]
        local_layer.append(per_quad.argmax(-1) == target)  # (L, B, 4)
        local.append(per_quad[list(layers)].mean(0).argmax(-1) == torch.arange(4)[None, :])
    correct, local, local_layer = torch.cat(correct), torch.cat(local), torch.cat(local_layer, 1)
    return {
        "n_grids": len(grids),
        "digit_accuracy": correct.float().mean().item(),
        "caption_accuracy": correct.all(-1).float().mean().item(),
        "digit_nll": torch.cat(nll).mean().item(),
        "localization_layers": list(layers),
        "localization_digit_rate": local.float().mean().item(),
        "localization_caption_rate": local.all(-1).float().mean().item(),
        "localization_digit_rate_per_layer": local_layer.float().mean((1, 2)).tolist(),
    }


@torch.no_grad()
def greedy_captions(model: nn.Module, proc, grids: list[Grid], max_new_tokens: int = 40,
                    batch_size: int = 50) -> list[str]:
    """Free-running greedy decoding from ``<|image|>`` until ``<|eot|>``: the caption text of each grid."""
    eot = proc.tokenizer.token_to_id("<|eot|>")
    out = []
    for b in range(0, len(grids), batch_size):
        chunk = grids[b:b + batch_size]
        batch = proc(text=[grid_prompt() for _ in chunk], images=[[g.image] for g in chunk])
        ids, px = batch["input_ids"], batch["pixel_values"]
        embeds = model.embed(ids, px)  # image features once; then extend with token embeddings
        start = ids.shape[1]
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, inputs_embeds=embeds).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            embeds = torch.cat([embeds, model.language_model.model.embed_tokens(nxt)], 1)
            if (ids[:, start:] == eot).any(1).all():
                break
        for row in ids[:, start:].tolist():
            row = row[: row.index(eot)] if eot in row else row
            out.append(proc.decode(row))
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Fresh trainable float32 weights: N(0, 0.02), output projections scaled by 1/sqrt(2L), norms 1."""
    from workbench.checkpoint import _expected_tensors, _set_param, fresh_tensor

    gen = torch.Generator().manual_seed(seed)
    L = config.text.num_hidden_layers
    for name, p in _expected_tensors(model).items():
        std = 0.02
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) and "language_model" in name:
            std = 0.02 / math.sqrt(2 * L)
        if name.endswith(("class_embedding", "positional_embedding_vlm")):
            std = config.vision.hidden_size ** -0.5
        if "vision_adapter" in name:
            # unit gain through the adapter's two GELU layers: image features reach the language
            # model at about the text embeddings' scale instead of vanishing (0.02^3 x ...)
            std = p.shape[-1] ** -0.5
        _set_param(model, name, fresh_tensor(name, p.shape, gen, std))
    for p in model.parameters():
        p.requires_grad_(True)


def new_model(config: ModelConfig, seed: int, device="cpu") -> nn.Module:
    from workbench.models.llama4.model import build_model

    with torch.device("meta"):
        model = build_model(config)
    init_weights(model, config, seed)
    return model.to(device)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy; ``loss_mask`` (B, T) bool or float weights of the target tokens."""
    lg = logits[:, :-1].float()
    tgt = input_ids[:, 1:]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    if loss_mask is None:
        return loss.mean()
    m = loss_mask[:, 1:].float()
    return (loss * m).sum() / m.sum().clamp(min=1)


def caption_mask(input_ids: torch.Tensor, proc) -> torch.Tensor:
    """(B, T) True on the caption tokens (after <|image_end|>, the trained text of an image prompt)."""
    end = (input_ids == proc.token_ids["<|image_end|>"]).long()
    return end.cumsum(1).bool() & (end == 0)


@dataclass
class TrainSettings:
    steps: int = 3200
    minutes: float = 26.0
    text_batch: int = 9  # sequences per step, equal parts prose / code / math
    text_len: int = 128
    image_batch: int = 24
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.05
    balance_coef: float = 0.01
    grad_clip: float = 1.0
    augment: bool = True
    same_class_share: float = 0.3  # share of training grids showing one digit class four times
    rest_weight: float = 0.25  # image loss weight of a caption's fixed tokens relative to its 4 digits
    smoke: bool = False  # a few documents and a small evaluation: for tests of the script itself


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def lr_at(progress: float, step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cos)


def train_step(model, opt, batches: list[tuple[dict, torch.Tensor | None]], s: TrainSettings, lr: float) -> dict:
    """One optimizer step over ``batches`` [(model inputs, loss mask or None), ...]; losses summed."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    opt.zero_grad(set_to_none=True)
    stats = {}
    for k, (inputs, mask) in enumerate(batches):
        with capture_router(model, keep_graph=True) as rec:
            logits = model(**inputs).logits
        loss = lm_loss(logits, inputs["input_ids"], mask)
        bal = torch.stack([balance_loss(lg, ids) for lg, ids in rec]).mean()
        (loss + s.balance_coef * bal).backward()
        stats[f"loss{k}"] = loss.item()
        stats[f"bal{k}"] = bal.item()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    opt.step()
    stats["grad_norm"] = float(gn)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, proc, corpora, config: ModelConfig, n_windows: int = 24, text_len: int = 128,
             n_grids: int = 200, device="cpu") -> dict:
    """Validation loss per domain, caption metrics on held-out grids, per-layer load CV."""
    model.eval()
    bos = config.text.bos_token_id
    n_moe = len(config.text.moe_layers)
    E = config.text.num_local_experts
    res: dict = {"val_loss": {}, "load_cv": {}}
    all_counts = np.zeros((n_moe, E), dtype=np.int64)
    for dom in ("prose", "code", "math"):
        x = corpora[dom]["val"].fixed_windows(n_windows, text_len, bos).to(device)
        losses = []
        with capture_router(model) as rec:
            for b in range(0, len(x), 8):
                losses.append(lm_loss(model(input_ids=x[b:b + 8]).logits, x[b:b + 8]).item() * len(x[b:b + 8]))
        counts = router_loads(rec, n_moe, E)
        all_counts += counts
        res["val_loss"][dom] = sum(losses) / len(x)
        res["load_cv"][dom] = load_cv(counts).tolist()
    grids = heldout_grids(n_grids, seed=4321)
    losses = []
    with capture_router(model) as rec:
        for b in range(0, len(grids), 25):
            chunk = grids[b:b + 25]
            batch = proc(text=[grid_prompt(g.labels) for g in chunk], images=[[g.image] for g in chunk]).to(device)
            logits = model(**batch.model_inputs()).logits
            mask = caption_mask(batch["input_ids"], proc)
            losses.append(lm_loss(logits, batch["input_ids"], mask).item() * len(chunk))
    counts = router_loads(rec, n_moe, E)
    all_counts += counts
    res["val_loss"]["image"] = sum(losses) / len(grids)
    res["load_cv"]["image"] = load_cv(counts).tolist()
    res["load_cv"]["all"] = load_cv(all_counts).tolist()
    res["load_counts"] = all_counts.tolist()
    res["captions"] = caption_metrics(model, _DeviceProc(proc, device), grids)
    texts = greedy_captions(model, _DeviceProc(proc, device), grids)
    res["captions"]["greedy_exact_match"] = float(np.mean([t == caption(g.labels) for t, g in zip(texts, grids)]))
    res["captions"]["greedy_examples"] = [{"generated": t, "truth": caption(g.labels)}
                                          for t, g in zip(texts[:5], grids)]
    return res


class _DeviceProc:
    """A processor whose batches land on ``device`` (for caption_metrics on a GPU)."""

    def __init__(self, proc, device):
        self._p, self._d = proc, device

    def __call__(self, *a, **k):
        return self._p(*a, **k).to(self._d)

    def __getattr__(self, name):
        return getattr(self._p, name)


def image_batch(proc, rng, n: int, augment: bool, device, same_class_share: float = 0.0,
                rest_weight: float = 0.25) -> tuple[dict, torch.Tensor]:
    """``n`` training grids: (model inputs, (B, T) loss weights over the caption tokens).

    The four digit tokens of a caption share weight 1, its other tokens (``top left``, commas,
    ``<|eot|>``: the same in every caption) share ``rest_weight``: the digits carry the signal, and
    a plain mean would let the ~30 fixed tokens dominate the early gradients (measured: digit
    learning starts several hundred steps later).
    """
    grids = sample_grids(rng, "train", n, augment=augment, same_class_share=same_class_share)
    batch = proc(text=[grid_prompt(g.labels) for g in grids], images=[[g.image] for g in grids])
    ids = batch["input_ids"]
    cap = caption_mask(ids, proc).float()
    digits = torch.zeros_like(cap)
    digits[torch.arange(len(grids))[:, None], digit_positions(ids, proc)] = 1.0
    rest = cap - digits
    w = digits + rest * (rest_weight * digits.sum(1, keepdim=True) / rest.sum(1, keepdim=True))
    return batch.to(device).model_inputs(), w.to(device)


def train(out: str | os.PathLike, seed: int = 0, settings: TrainSettings | None = None, device: str = "auto",
          progress: bool = True, log=print) -> dict:
    """Build tokenizer + model, train, evaluate, write the checkpoint directory and its README."""
    from tqdm.auto import tqdm

    from workbench.checkpoint import save_model
    from workbench.models.llama4.processor import load_processor
    from workbench.tiny_tokenizer import make_llama4_tokenizer

    s = settings or TrainSettings()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(seed)
    special = make_llama4_tokenizer(out, vocab_size=VOCAB_SIZE)
    processor_files(out)
    proc = load_processor(out)
    config = tiny_config(special)
    corpora = build_corpora(proc.tokenizer, special, seed, limit=12 if s.smoke else None)
    model = new_model(config, seed, device)
    opt = make_optimizer(model, s)
    rng = np.random.default_rng(seed)
    bos = config.text.bos_token_id
    domains = ("prose", "code", "math")
    per_dom = max(1, s.text_batch // len(domains))

    t0 = time.time()
    budget = s.minutes * 60 if s.minutes and s.minutes > 0 else float("inf")
    bar = tqdm(total=s.steps, desc="train tiny-llama4", disable=not progress, dynamic_ncols=True)
    history = []
    step = 0
    ema = None
    while step < s.steps:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        progress_frac = max(step / s.steps, elapsed / budget)
        lr = lr_at(progress_frac, step, s)
        text = torch.cat([corpora[d]["train"].random_windows(rng, per_dom, s.text_len, bos) for d in domains])
        text = text.to(device)
        batches = [({"input_ids": text}, None),
                   image_batch(proc, rng, s.image_batch, s.augment, device, s.same_class_share, s.rest_weight)]
        st = train_step(model, opt, batches, s, lr)
        st.update(step=step, lr=lr, time=time.time() - t0)
        history.append(st)
        keys = [k for k in st if k.startswith(("loss", "bal"))]
        ema = dict(st) if ema is None else {k: 0.95 * ema[k] + 0.05 * st[k] for k in keys}
        step += 1
        bar.update(1)
        bar.set_postfix(text=f"{ema['loss0']:.3f}", img=f"{ema['loss1']:.3f}", bal=f"{ema['bal0']:.3f}",
                        lr=f"{lr:.1e}")
    bar.close()
    train_seconds = time.time() - t0
    log(f"trained {step} steps in {train_seconds / 60:.1f} min")

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if s.smoke:
        metrics = evaluate(model, proc, corpora, config, n_windows=2, text_len=s.text_len, n_grids=10, device=device)
    else:
        metrics = evaluate(model, proc, corpora, config, text_len=s.text_len, device=device)
    model = model.to("cpu")
    save_model(model, out, config)
    info = {
        "seed": seed, "steps": step, "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
        "settings": s.__dict__, "device": _device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "corpus_tokens": {d: {k: int(len(v.ids)) for k, v in corpora[d].items()} for d in domains},
        "final_train": {k: v for k, v in history[-1].items() if k.startswith(("loss", "bal"))} if history else {},
        "command": ("python -m workbench.train_tiny " + " ".join(sys.argv[1:])
                    if sys.argv[0].endswith("train_tiny.py") else None),
    }
    write_model_card(out, config, metrics, info)
    (out / "training_metrics.json").write_text(json.dumps({"metrics": metrics, "info": info}, indent=2) + "\n")
    return {"metrics": metrics, "info": info, "history": history}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def _grid_prompt_len() -> int:
    """Tokens of a grid prompt (BOS + 19 image tokens + caption), from the shipped tokenizer layout."""
    from workbench.tiny_tokenizer import _build_tokenizer

    tok, _ = _build_tokenizer(VOCAB_SIZE)
    text = grid_prompt((0, 0, 0, 0)).replace("<|image|>", "")
    return 1 + 3 + TOKENS_PER_TILE + len(tok.encode(text, add_special_tokens=False).ids)


def write_model_card(out: Path, config: ModelConfig, m: dict, info: dict) -> None:
    t, v = config.text, config.vision
    counts = config.parameter_counts()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    cap = m["captions"]
    L = t.num_hidden_layers
    lines = [
        "# tiny-llama4 — the MoE Workbench embedded default model",
        "",
        "A Llama 4 architecture model (early-fusion vision, 16 routed experts top-1 + a shared expert, "
        "chunked-attention RoPE layers and a global NoPE layer) small enough to ship in the repository and to "
        "run on a laptop CPU, trained so that its routing and its cross-modal attention have structure to analyse. "
        "It is a toy: it writes Python-looking text, doc-like prose and arithmetic lines, and captions 2x2 grids "
        "of handwritten digits. It is not a language model for any real use.",
        "",
        "Load it with `wb.load_model(\"data/models/tiny-llama4\")` and `wb.load_processor(...)` (the same code path "
        "as Llama 4 Scout), or with `transformers.Llama4ForConditionalGeneration.from_pretrained`.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| text | {L} decoder layers, hidden {t.hidden_size}, {t.num_attention_heads} query heads / "
        f"{t.num_key_value_heads} KV heads of dim {t.head_dim}, vocab {t.vocab_size} |",
        f"| MoE | every layer: {t.num_local_experts} routed experts (SwiGLU, intermediate {t.intermediate_size}), "
        f"top-{t.num_experts_per_tok}, sigmoid score scales the expert input, + shared expert |",
        f"| attention | `no_rope_layers` = {t.no_rope_layers}: layers "
        f"{[i for i in range(L) if t.uses_rope[i]]} RoPE (theta {t.rope_theta:g}) + L2 QK norm, chunked causal in "
        f"chunks of {t.attention_chunk_size} tokens; layer(s) {[i for i in range(L) if not t.uses_rope[i]]} NoPE, "
        f"global causal, query temperature (floor_scale {t.floor_scale}, attn_scale {t.attn_scale}) |",
        f"| context | `max_position_embeddings` {t.max_position_embeddings:,} (as Scout's): trained on short "
        f"sequences only, but nothing in the design limits the length (chunked RoPE layers see at most "
        f"{t.attention_chunk_size} tokens, the NoPE layer has no position table); 4096 in earlier versions was a "
        f"training artefact. Long inputs run in blocks against a KV cache (`prefill_chunk`) |",
        f"| vision | {v.image_size} px tile, {v.patch_size} px patches ({v.patches_per_side}x{v.patches_per_side}), "
        f"{v.num_hidden_layers} encoder layers, hidden {v.hidden_size}, {v.num_attention_heads} heads, pixel shuffle "
        f"{v.pixel_shuffle_ratio} -> {v.tokens_per_tile} `<|patch|>` tokens per tile ({TOKEN_GRID}x{TOKEN_GRID}), "
        f"adapter/projector width {v.vision_output_dim} |",
        f"| processor | one {v.image_size} px tile per image (`max_patches` 1, no thumbnail), mean = std = 0.5 |",
        f"| tokenizer | `workbench.tiny_tokenizer.make_llama4_tokenizer(dir, {t.vocab_size})`: byte-level BPE with "
        f"Llama 4's special tokens; image_token_index = `<|patch|>` = {config.image_token_index} |",
        f"| parameters | {counts['total']:,} total ({counts['text_total']:,} text, {counts['vision']:,} vision + "
        f"projector), {counts['text_active']:,} active text parameters per token |",
        f"| files | {size / 1e6:.1f} MB, float32 safetensors |",
        "",
        "## Data",
        "",
        "All offline and regenerated from the seed by the training script:",
        "",
        "* **prose**: the Python documentation topics shipped with the interpreter (`pydoc_data.topics`, "
        f"{len(prose_documents())} topics); every 10th topic (sorted by name) is validation.",
        f"* **code**: the top-level `.py` files of the Python {info['python']} standard library; every 10th file "
        "(sorted) is validation.",
        "* **math**: generated lines `a op b = c` with a, b in 0..99 and op in + - * (validation from another seed).",
        "* **image**: 2x2 grids of scikit-learn's 8x8 handwritten digits (`load_digits`, 1797 images) in one 112 px "
        "tile, each digit scaled 6x (48 px, dark ink on white) in its 56 px quadrant (training: shifted by up to "
        "2 px), captioned `<|image|>top left 3, top right 7, bottom left 1, bottom right 0<|eot|>` (the prompt "
        f"is {_grid_prompt_len()} tokens: shorter than a {t.attention_chunk_size}-token chunk, so every layer sees "
        "the image from the caption). Digit images with sample index `i % 5 == 0` (360) are **held out**: never "
        "trained on, used for every image metric below. Only the caption tokens (after `<|image_end|>`) carry the "
        f"image loss: the 4 digits with total weight 1, the other caption tokens (identical in every caption) with "
        f"total weight {info['settings'].get('rest_weight', 0.25):g}. Curriculum: "
        f"{info['settings'].get('same_class_share', 0.3):.0%} of the training grids show four images of one digit "
        "class (there, reading any quadrant names the digit, which gets the vision features going before the "
        "attention has learned where to look); evaluation grids are always four independent draws.",
        "",
        "Token counts (train / validation): " + ", ".join(
            f"{d} {c['train']:,} / {c['val']:,}" for d, c in info["corpus_tokens"].items()) + ".",
        "",
        "## Training",
        "",
        f"Plain PyTorch AdamW (betas 0.9/0.95, lr {info['settings']['lr']:g}, warm-up {info['settings']['warmup']} "
        f"steps, cosine decay to {info['settings']['min_lr_ratio']:g} x lr, weight decay "
        f"{info['settings']['weight_decay']:g}, gradient clipping {info['settings']['grad_clip']:g}) on the "
        "workbench model itself, float32. Each step: "
        f"{info['settings']['text_batch']} text windows of {info['settings']['text_len']} tokens (equal parts prose, "
        f"code, math; each starts with `<|begin_of_text|>`) + {info['settings']['image_batch']} digit grids, plus a "
        f"Switch-style load-balancing loss (coefficient {info['settings']['balance_coef']:g}; E * sum_i f_i P_i with "
        "f the top-1 shares and P the mean softmax of the router logits, averaged over layers). The run stops at "
        f"`--steps` ({info['settings']['steps']}) or `--minutes` ({info['settings']['minutes']:g}), whichever comes "
        "first; the learning-rate schedule follows whichever is further along.",
        "",
        f"* this checkpoint: seed {info['seed']}, **{info['steps']} steps in {info['train_seconds'] / 60:.1f} min** "
        f"(whole script incl. data and evaluation {info['total_seconds'] / 60:.1f} min)",
        f"* machine: {info['device']}; {info['platform']}; Python {info['python']}, torch {info['torch']}",
        f"* date: {info['date']}",
        f"* reproduce: `python -m workbench.train_tiny --out data/models/tiny-llama4 --seed {info['seed']} "
        f"--minutes {info['settings']['minutes']:g} --steps {info['settings']['steps']}`"
        + (" (about 25 minutes on this machine). This run ended on its time budget, and its learning-rate schedule "
           "followed the elapsed time, so a rerun follows the same recipe (same seed, data, initialization and "
           "batches) and lands at a similar quality but not at bit-identical weights; `--minutes 0 --steps N` gives a "
           "step-based schedule that is deterministic on one CPU thread (the default)."
           if info["steps"] < info["settings"]["steps"] else
           " (deterministic: the run ended on its step count, and the learning-rate schedule followed the steps)."),
        "",
        "## Use",
        "",
        "```python",
        "import torch, workbench as wb",
        "from workbench import train_tiny as tt",
        "model = wb.load_model(\"data/models/tiny-llama4\")           # float32",
        "proc = wb.load_processor(\"data/models/tiny-llama4\")",
        "grid = tt.heldout_grids(1)[0]                                # or any 112 x 112 2x2 digit picture",
        "print(tt.greedy_captions(model, proc, [grid]), grid.labels)  # prompt '<|image|>', greedy until <|eot|>",
        "```",
        "",
        f"Image prompts are `<|image|>` + caption ({_grid_prompt_len()} tokens), within one attention chunk. Text "
        f"prompts longer than {t.attention_chunk_size} tokens (the demo prompts in `data/prompts/demo.jsonl` are 130 to "
        "960 tokens) exercise the chunked layers: there, RoPE layers see only the current chunk, the NoPE layer sees "
        "everything.",
        "",
        "## Evaluation",
        "",
        "Validation loss (mean next-token cross-entropy, nats; text: 24 windows of "
        f"{info['settings']['text_len']} tokens per domain; image: caption tokens of {cap['n_grids']} held-out grids):",
        "",
        "| prose | code | math | image captions |",
        "|---|---|---|---|",
        "| " + " | ".join(f"{m['val_loss'][d]:.3f}" for d in ("prose", "code", "math", "image")) + " |",
        "",
        f"Captions of {cap['n_grids']} held-out grids (digits never seen in training), teacher-forced: each digit is "
        "the argmax over the whole vocabulary of the logits at the token just before it (the space after "
        "`top left` etc.), given the true caption up to it; a caption is correct when all four digits are.",
        "",
        f"* per-digit accuracy **{cap['digit_accuracy']:.1%}**, per-caption accuracy (all 4 right) "
        f"**{cap['caption_accuracy']:.1%}**",
        *([f"* free-running greedy decoding from `<|image|>` (no teacher forcing, up to `<|eot|>`): the whole caption "
           f"text exactly right for **{cap['greedy_exact_match']:.1%}** of the grids; e.g. "
           + "; ".join(f"`{e['generated']}` (truth `{e['truth']}`)" for e in cap["greedy_examples"][:2])]
          if "greedy_exact_match" in cap else []),
        "",
        "Attention localization: at the position that predicts each digit, the attention probabilities "
        "(softmax(q k^T * scale) over the allowed keys, from the `hook_attn` hook point; GQA head h reads KV head "
        f"h // {t.num_attention_heads // t.num_key_value_heads}) averaged over all heads of layers "
        f"{cap['localization_layers']} (the last half), summed over each quadrant's 4 `<|patch|>` tokens; the digit "
        "counts as localized when its own quadrant gets the most.",
        "",
        f"* localized digits **{cap['localization_digit_rate']:.1%}**; captions with all 4 digits localized "
        f"**{cap['localization_caption_rate']:.1%}**",
        "* per layer (head mean, each layer alone): " + ", ".join(
            f"layer {i} {r:.1%}" for i, r in enumerate(cap["localization_digit_rate_per_layer"])),
        "",
        "Routing balance: coefficient of variation (std / mean, population std) of the 16 experts' top-1 load "
        "shares per MoE layer, on the validation tokens (0 = perfectly even; a collapsed router gives ~3.9). "
        "Over all tokens the load is even (no collapse); within one domain it is uneven, i.e. the experts "
        "specialize by domain:",
        "",
        "| tokens | " + " | ".join(f"layer {i}" for i in t.moe_layers) + " |",
        "|---|" + "---|" * len(t.moe_layers),
    ]
    for d in ("prose", "code", "math", "image", "all"):
        lines.append(f"| {d} | " + " | ".join(f"{x:.2f}" for x in m["load_cv"][d]) + " |")
    lines += [
        "",
        "Experts used (load share > 0) per layer: " + ", ".join(
            f"layer {i} {int((np.asarray(c) > 0).sum())}/{t.num_local_experts}"
            for i, c in zip(t.moe_layers, m["load_counts"])),
        "",
        *(["Other runs of the same script (not shipped), as a check that the recipe is not a lucky seed:", ""]
          + [f"* {r['what']}: per-digit {r['digit_accuracy']:.1%}, per-caption {r['caption_accuracy']:.1%}, "
             f"localized digits {r['localization_digit_rate']:.1%} (captions {r['localization_caption_rate']:.1%}), "
             f"val loss prose/code/math {r['val_loss']['prose']:.2f}/{r['val_loss']['code']:.2f}/"
             f"{r['val_loss']['math']:.2f}, load CV per layer "
             + "/".join(f"{x:.2f}" for x in r["load_cv_all"]) for r in info.get("replications", [])] + [""]
          if info.get("replications") else []),
        "`training_metrics.json` holds these numbers in machine-readable form.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Demo prompts (data/prompts/demo.jsonl + data/images/*.png)
# ---------------------------------------------------------------------------------------------
DEMO_PROSE_TOPICS = ("bitwise", "comparisons", "identifiers", "numbers", "typesmapping")  # validation topics
DEMO_CODE = (("contextlib.py", "contextmanager"), ("shutil.py", "copyfileobj"), ("argparse.py", "_get_action_name"),
             ("warnings.py", "_formatwarnmsg_impl"))  # functions from validation files
N_DEMO_GRIDS = 6


def _demo_prose(topic: str, max_chars: int = 600) -> str:
    import pydoc_data.topics as topics

    text = topics.topics[topic].replace("-\n", "-")
    # running text only: no title, no indented grammar/code blocks, no paragraph that introduces one
    paras = [p for p in text.split("\n\n")[1:]
             if p.strip() and not p.startswith(" ") and "****" not in p and not p.rstrip().endswith(":")]
    out = ""
    for para in paras:
        para = " ".join(para.split())
        if out and len(out) + len(para) > max_chars:
            break
        out = (out + " " + para).strip()
    return out[: max_chars * 2]


def _demo_code(file: str, name: str) -> str:
    import ast

    src = Path(sysconfig.get_paths()["stdlib"], file).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(src, node, padded=False) + "\n"
    raise ValueError(f"no function {name} in {file}")


def write_demo(data_dir: str | os.PathLike) -> Path:
    """Write DATA_DIR/prompts/demo.jsonl and DATA_DIR/images/digits_NN.png (held-out digit grids).

    Each line: {"text": ..., "images": [...], "domain": "prose" | "code" | "math" | "image"}; image
    names resolve against the prompts file's folder (``../images/...``), as ``workbench trace`` does.
    Prose and code come from the validation documents; the grids from held-out digit images.
    """
    from PIL import Image

    data = Path(data_dir)
    (data / "prompts").mkdir(parents=True, exist_ok=True)
    (data / "images").mkdir(parents=True, exist_ok=True)
    lines = [{"text": _demo_prose(t), "images": [], "domain": "prose"} for t in DEMO_PROSE_TOPICS]
    lines += [{"text": _demo_code(f, n), "images": [], "domain": "code"} for f, n in DEMO_CODE]
    lines += [{"text": m, "images": [], "domain": "math"}
              for m in ("\n".join(math_documents(seed, 14)[0].splitlines()) + "\n" for seed in (101, 102, 103))]
    for k, g in enumerate(heldout_grids(N_DEMO_GRIDS, seed=777)):
        name = f"digits_{k:02d}.png"
        Image.fromarray(g.image).save(data / "images" / name, optimize=True)
        lines.append({"text": grid_prompt(g.labels), "images": [f"../images/{name}"], "domain": "image"})
    path = data / "prompts" / "demo.jsonl"
    path.write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.train_tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="checkpoint directory to write (e.g. data/models/tiny-llama4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=TrainSettings.minutes,
                   help="training time budget in minutes (0: no limit; evaluation comes on top)")
    p.add_argument("--steps", type=int, default=TrainSettings.steps, help="maximum optimizer steps")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine one thread is both faster and "
                        "steadier than two, and results do not depend on the core count; 0 = torch's choice)")
    p.add_argument("--no-augment", action="store_true", help="do not shift digits during training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true", help="tiny data and evaluation (to test the script)")
    p.add_argument("--write-demo", metavar="DATA_DIR", default=None,
                   help="only write the demo prompts (DATA_DIR/prompts/demo.jsonl) and images (DATA_DIR/images)")
    for f in ("text_batch", "text_len", "image_batch", "lr", "warmup", "balance_coef"):
        default = getattr(TrainSettings, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    a = p.parse_args(argv)
    if a.write_demo:
        path = write_demo(a.write_demo)
        print(f"wrote {path}")
        return 0
    if not a.out:
        p.error("--out is required (or --write-demo DATA_DIR)")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)


def _run(a) -> int:
    s = TrainSettings(steps=a.steps, minutes=a.minutes, text_batch=a.text_batch, text_len=a.text_len,
                      image_batch=a.image_batch, lr=a.lr, warmup=a.warmup, balance_coef=a.balance_coef,
                      augment=not a.no_augment, smoke=a.smoke)
    res = train(a.out, seed=a.seed, settings=s, device=a.device, progress=not a.quiet)
    m = res["metrics"]
    print(json.dumps({"val_loss": m["val_loss"], "captions": m["captions"], "load_cv_all": m["load_cv"]["all"],
                      "steps": res["info"]["steps"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
