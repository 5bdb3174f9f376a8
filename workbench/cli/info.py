"""``workbench info PATH``: a checkpoint's or preset's architecture, or what a trace holds.

A checkpoint is a Llama 4 one (workbench's own config and model) or a transformers checkpoint of a
family ``workbench trace`` records through transformers (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3...)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.cli._common import CLIError, checkpoint_loader, format_ranges, trace_summary, transformers_config

__all__ = ["add_parser", "run", "describe_model", "describe_trace", "describe_transformers"]


def _b(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_model(config, source: str = "") -> str:
    """Human-readable architecture summary of a :class:`~workbench.models.llama4.config.ModelConfig`."""
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
    lines.append(f"  MoE layers ({len(moe)}): {format_ranges(moe)}; {t.num_local_experts} experts, top-{t.num_experts_per_tok}"
                 f" (sigmoid score on the expert input) + shared expert, expert FFN {t.intermediate_size}")
    lines.append(f"  dense layers ({len(dense)}): {format_ranges(dense)}" + (f"; FFN {t.intermediate_size_mlp}" if dense else ""))
    chunk = f"chunked attention, {t.attention_chunk_size}-token chunks" if t.attention_chunk_size else "causal attention"
    lines.append(f"  RoPE layers ({len(rope)}): {format_ranges(rope)}; {chunk}; theta {t.rope_theta:g}"
                 + (f", llama3 scaling x{t.rope_scaling['factor']:g}" if t.rope_scaling else "")
                 + (", L2 QK norm" if t.use_qk_norm else ", no QK norm"))
    temp = (f"temperature tuning (floor_scale {t.floor_scale}, attn_scale {t.attn_scale:g})"
            if t.attn_temperature_tuning else "no temperature tuning")
    lines.append(f"  NoPE layers ({len(nope)}): {format_ranges(nope)}; global causal attention, {temp}")
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


def describe_transformers(path: Path) -> str:
    """`workbench info DIR` of a transformers checkpoint of a family with a routing adapter (Mixtral,
    Qwen-MoE, DeepSeek-V3...): its decoder and MoE layers, as the adapter that traces it sees them,
    read from config.json by building the model on the meta device (no weight is loaded)."""
    import torch

    from workbench.hooks.adapters import AdapterError, adapter_for

    cfg, auto = transformers_config(path)
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            model = auto.from_config(cfg)
        spec = adapter_for(model).spec()
    except (AdapterError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CLIError(f"{path}: transformers cannot build the model of its config.json ({e})") from None
    t = cfg.get_text_config()
    L = t.num_hidden_layers
    moe = spec.moe_layers
    dense = [i for i in range(L) if i not in moe]
    heads, kv = getattr(t, "num_attention_heads", "?"), getattr(t, "num_key_value_heads", None)
    shared = " + shared expert" if any(r.shared_expert for r in spec.layers) else ""
    arch = (cfg.architectures or [type(model).__name__])[0]
    lines = [f"{arch}  ({path})",
             f"transformers model type {cfg.model_type!r}: `workbench trace` records it through transformers "
             f"(its routing adapter), not workbench's own model",
             f"text decoder: {L} layers, hidden {t.hidden_size}, {heads} heads" + (f" / {kv} KV heads" if kv else "")
             + f", vocab {t.vocab_size}, max positions {getattr(t, 'max_position_embeddings', '?')}",
             f"  MoE layers ({len(moe)}): {format_ranges(moe)}; {spec.n_experts} experts, top-{spec.top_k}{shared}",
             f"  dense layers ({len(dense)}): {format_ranges(dense)}",
             f"  routing: {spec.rule}",
             f"parameters: {_b(sum(p.numel() for p in model.parameters()))} total"]
    return "\n".join(lines)


def _traced_with_transformers(path: Path) -> bool:
    """A checkpoint directory `workbench trace` loads with transformers (a family with a routing adapter)."""
    try:
        return path.is_dir() and checkpoint_loader(path) == "transformers"
    except CLIError:  # no adapter for its model type: ModelConfig says what is wrong with it, as before
        return False


def describe_trace(store: Path) -> str:
    """`workbench info STORE`: what a trace holds, where it came from, and its load imbalance."""
    from workbench.trace import open_trace

    ds = open_trace(store)
    a = ds.attrs
    prov = a.get("provenance", {})
    arch = (prov.get("model_config") or {}).get("architectures", ["?"])[0]
    n_seq = len(np.unique(ds["sequence"].values))
    arrays = ", ".join(sorted(v for v in ds.data_vars if "token" in ds[v].dims))
    captures = ", ".join(f"{k}({', '.join(f'{o}={v}' for o, v in opts.items())})" if opts else k
                         for k, opts in a.get("captures", {}).items())
    lines = [f"trace {store} (schema {a['schema']}, complete={a['complete']})",
             f"  {ds.sizes['token']:,} tokens in {n_seq} sequences, {a['n_commits']} commits; "
             f"{len(a['moe_layers'])} MoE layers, {a['n_experts']} experts, top-{a['top_k']}",
             f"  captures: {captures}; arrays: {arrays}",
             f"  routing: {a.get('routing', {}).get('rule', '?')}",
             f"  model: {arch} on {prov.get('device', '?')} ({prov.get('dtype', '?')})"
             + (f", checkpoint {prov['checkpoint_path']} [{prov.get('checkpoint_fingerprint')}]"
                if prov.get("checkpoint_path") else ""),
             f"  created {prov.get('created', '?')}, updated {prov.get('updated', '?')}; "
             f"workbench {prov.get('versions', {}).get('workbench', '?')}"]
    return "\n".join(lines + trace_summary(store).splitlines()[1:])


def _is_trace(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def run(args) -> int:
    path = Path(args.path)
    if _is_trace(path):
        print(describe_trace(path))
        return 0
    from workbench.models.llama4.config import PRESETS, ModelConfig, preset

    if not path.exists() and args.path in PRESETS:
        print(describe_model(preset(args.path), source=f"preset {args.path}"))
        return 0
    if not path.exists():
        raise CLIError(f"{path} does not exist (a checkpoint directory, a trace store, or a preset: "
                       f"{', '.join(sorted(PRESETS))})")
    if _traced_with_transformers(path):
        print(describe_transformers(path))
        return 0
    print(describe_model(ModelConfig.from_pretrained(path), source=str(path)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture of a checkpoint/preset, or a summary of a trace store")
    p.add_argument("path", help="checkpoint directory, preset name (scout, maverick), or trace store")
    p.set_defaults(func=run)
