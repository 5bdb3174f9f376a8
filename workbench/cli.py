"""Command line: ``workbench info|trace|demo|export``.

    workbench info PATH            architecture of a checkpoint dir or preset (scout, maverick),
                                   or a summary of a trace store
    workbench trace MODEL --prompts FILE.jsonl --out STORE ...
    workbench demo                 trace the bundled prompts with the embedded default model
    workbench export STORE --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "describe_model"]


def _ranges(idx: list[int]) -> str:
    """[0,1,2,4,5] -> '0-2, 4-5'."""
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def _b(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_model(config, source: str = "") -> str:
    """Human-readable architecture summary of a :class:`~workbench.config.ModelConfig`."""
    t = config.text
    L = t.num_hidden_layers
    moe = t.moe_layers
    rope = [i for i in range(L) if t.uses_rope[i]]
    nope = [i for i in range(L) if not t.uses_rope[i]]
    counts = config.parameter_counts()
    lines = [f"{config.architecture}" + (f"  ({source})" if source else "")]
    lines.append(f"text decoder: {L} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads / "
                 f"{t.num_key_value_heads} KV heads (head_dim {t.head_dim}), vocab {t.vocab_size}")
    dense = [i for i in range(L) if i not in moe]
    lines.append(f"  MoE layers ({len(moe)}): {_ranges(moe)}; {t.num_local_experts} experts, top-{t.num_experts_per_tok}"
                 f" (sigmoid score on the expert input) + shared expert, expert FFN {t.intermediate_size}")
    lines.append(f"  dense layers ({len(dense)}): {_ranges(dense)}" + (f"; FFN {t.intermediate_size_mlp}" if dense else ""))
    chunk = f"chunked attention, {t.attention_chunk_size}-token chunks" if t.attention_chunk_size else "causal attention"
    lines.append(f"  RoPE layers ({len(rope)}): {_ranges(rope)}; {chunk}; theta {t.rope_theta:g}"
                 + (f", llama3 scaling x{t.rope_scaling['factor']:g}" if t.rope_scaling else "")
                 + (", L2 QK norm" if t.use_qk_norm else ", no QK norm"))
    temp = (f"temperature tuning (floor_scale {t.floor_scale}, attn_scale {t.attn_scale:g})"
            if t.attn_temperature_tuning else "no temperature tuning")
    lines.append(f"  NoPE layers ({len(nope)}): {_ranges(nope)}; global causal attention, {temp}")
    if config.vision is not None:
        v = config.vision
        per_tile = int((v.image_size // v.patch_size) ** 2 * v.pixel_shuffle_ratio ** 2)
        lines.append(f"vision tower: {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads, "
                     f"{v.image_size} px tiles of {v.patch_size} px patches -> {per_tile} tokens per tile "
                     f"(pixel shuffle {v.pixel_shuffle_ratio:g}), features {v.vision_output_dim} -> projector -> "
                     f"{t.hidden_size}; image token id {config.image_token_index}")
    else:
        lines.append("vision tower: none (text only)")
    lines.append(f"parameters: {_b(counts['total'])} total (text {_b(counts['text_total'])}, vision {_b(counts['vision'])}); "
                 f"{_b(counts['text_active'])} active per text token (top-{t.num_experts_per_tok} + shared expert, "
                 f"embedding lookup excluded)")
    return "\n".join(lines)


def _is_trace(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def cmd_info(args) -> int:
    path = Path(args.path)
    if _is_trace(path):
        from workbench.store import describe_trace

        print(describe_trace(path))
        return 0
    from workbench.config import PRESETS, ModelConfig, preset

    if not path.exists() and args.path in PRESETS:
        print(describe_model(preset(args.path), source=f"preset {args.path}"))
        return 0
    print(describe_model(ModelConfig.from_pretrained(path), source=str(path)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="MoE Workbench: routing analysis for Llama 4 MoE models")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="architecture of a checkpoint/preset, or a summary of a trace store")
    p.add_argument("path", help="checkpoint directory, preset name (scout, maverick), or trace store")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    from workbench.checkpoint import CheckpointError
    from workbench.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
