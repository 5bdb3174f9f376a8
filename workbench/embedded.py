"""The embedded default model and demo prompts shipped in ``data/`` (with a labelled fallback).

Until ``data/models/tiny-llama4`` holds trained weights, :func:`default_model_dir` builds a small
RANDOM Llama 4 (16 experts, top-1, NoPE + chunked layers) with the tiny tokenizer, and says so.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

__all__ = ["DATA_DIR", "EMBEDDED_MODEL", "DEMO_PROMPTS", "default_model_dir", "demo_prompts", "is_trained_default"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED_MODEL = DATA_DIR / "models" / "tiny-llama4"
DEMO_PROMPTS = DATA_DIR / "prompts" / "demo.jsonl"

_FALLBACK_PROMPTS = [
    {"text": "The quick brown fox jumps over the lazy dog while the river flows to the sea.", "domain": "prose"},
    {"text": "Reading a book on a rainy afternoon is one of the small pleasures of life.", "domain": "prose"},
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))", "domain": "code"},
    {"text": "for i in range(10):\n    if i % 2 == 0:\n        print(i)", "domain": "code"},
    {"text": "17 + 25 = 42\n8 * 7 = 56\n100 - 37 = 63", "domain": "math"},
]


def is_trained_default() -> bool:
    """True when the trained embedded model is shipped in data/models/tiny-llama4."""
    return (EMBEDDED_MODEL / "model.safetensors").is_file() and (EMBEDDED_MODEL / "tokenizer.json").is_file()


def _random_model_dir(folder: Path) -> Path:
    import torch

    from workbench.checkpoint import random_model, save_model
    from workbench.models.llama4.config import ModelConfig
    from workbench.tiny_tokenizer import make_llama4_tokenizer

    if (folder / "model.safetensors").is_file():
        return folder
    ids = make_llama4_tokenizer(folder, vocab_size=1024)
    cfg = ModelConfig.from_dict({"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
                                 "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 64,
                                 "intermediate_size_mlp": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 16,
                                 "attention_chunk_size": 32, "bos_token_id": ids["<|begin_of_text|>"],
                                 "eos_token_id": ids["<|eot|>"], "pad_token_id": ids["<|finetune_right_pad|>"]})
    save_model(random_model(cfg, dtype=torch.float32, seed=0, std=0.5), folder, cfg)
    return folder


def default_model_dir(fallback_dir: str | Path = "runs/random-tiny-llama4") -> Path:
    """The embedded trained model, or (warning) a small random Llama 4 written to ``fallback_dir``."""
    if is_trained_default():
        return EMBEDDED_MODEL
    warnings.warn("the trained embedded model (data/models/tiny-llama4) is not shipped yet: using a small "
                  "RANDOM Llama 4 (16 experts, top-1) whose routing is arbitrary, not learned", UserWarning,
                  stacklevel=2)
    return _random_model_dir(Path(fallback_dir))


def demo_prompts() -> list[dict]:
    """The bundled demo prompts: dicts with 'text', 'images' (paths) and 'domain'."""
    if DEMO_PROMPTS.is_file() and is_trained_default():
        out = []
        for line in DEMO_PROMPTS.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                # Image names resolve against the prompts file's folder (as `workbench trace` does).
                out.append({"text": d.get("text", ""), "domain": d.get("domain", "other"),
                            "images": [DEMO_PROMPTS.parent / i for i in d.get("images", [])]})
        return out
    return [dict(p, images=[]) for p in _FALLBACK_PROMPTS]
