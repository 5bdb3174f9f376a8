"""Will it fit? Memory estimates of long passes, checked before anything is allocated.

A prompt too long for the machine should end in one clear sentence, not in the allocator asking
for 32 GB halfway through. The estimate counts what grows with the sequence (KV cache, hidden
states, logits) plus a bounded working set per block; it is an estimate, not a promise (the
allocator's fragmentation and the user's own tensors are not in it). Measured on CPU
(benchmarks/RESULTS.md, "Long context"): a 256k-token recorded prefill of the embedded model
peaked 1.8 GiB above the loaded model where this estimate says ~0.55 GB: glibc's heap fragments
under the per-block temporaries of the global layer while the recorder's thread allocates too
(``MALLOC_MMAP_THRESHOLD_=131072`` in the environment brought a 64k run from 1.2 to 0.8 GiB).
The guard therefore catches the impossible (a prompt needing tens of GB), not the marginal.
"""
from __future__ import annotations

import torch

__all__ = ["InsufficientMemoryError", "ContextLengthError", "prefill_bytes", "generation_bytes", "available_bytes",
           "check_fits", "check_context", "format_bytes"]


class InsufficientMemoryError(MemoryError):
    """The estimated need of a pass exceeds the memory free on its device."""


class ContextLengthError(ValueError):
    """An input, or a generation, longer than the model's ``max_position_embeddings``."""


def check_context(tokens: int, config, what: str) -> None:
    """Raise ContextLengthError naming ``what`` when ``tokens`` per row exceed the model's
    ``max_position_embeddings`` (config: the text config)."""
    if tokens > config.max_position_embeddings:
        raise ContextLengthError(f"{what} needs {tokens:,} positions per row but the model's "
                                 f"max_position_embeddings is {config.max_position_embeddings:,}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def prefill_kv_bytes(config, batch_size: int, tokens: int, block: int, size: int) -> int:
    """The KV cache term of :func:`prefill_bytes`: global layers ``tokens`` slots, chunked layers
    ``attention_chunk_size + block``; k and v of ``size``-byte elements per slot and layer, plus the
    slots' index/position/validity once per kind of layer."""
    per_slot = 2 * config.num_key_value_heads * config.head_dim * size
    chunk = config.attention_chunk_size
    kv, kinds = 0, {}
    for rope in config.uses_rope:
        slots = min(tokens, chunk + block) if rope and chunk is not None else tokens
        kv += batch_size * slots * per_slot
        kinds[slots] = batch_size * slots * 9 + slots * 8
    return kv + sum(kinds.values())


def prefill_bytes(config, batch_size: int, tokens: int, block: int, dtype: torch.dtype,
                  logits_to_keep: int = 0) -> int:
    """Estimated peak bytes of a blocked prefill of ``tokens`` per row (model weights excluded).

    config: the text config. Counts the KV cache (global layers ``tokens`` slots, chunked layers
    ``attention_chunk_size + block``), the hidden states of every token (kept, then concatenated:
    twice), the logits (all tokens, or the last ``logits_to_keep``) and one block's working set.
    """
    from workbench.runtime.attend import MASK_BUDGET

    size = torch.empty((), dtype=dtype).element_size()
    B, T = batch_size, tokens
    kv = prefill_kv_bytes(config, B, T, block, size)
    hidden = 2 * B * T * config.hidden_size * size
    logits = B * (T if logits_to_keep <= 0 else min(T, logits_to_keep)) * config.vocab_size * size
    widest = max(config.hidden_size, config.intermediate_size * 2, config.intermediate_size_mlp * 2,
                 config.num_attention_heads * config.head_dim)
    working = 12 * B * block * widest * size + 5 * MASK_BUDGET
    return kv + hidden + logits + working


def generation_bytes(config, batch_size: int, prompt_tokens: int, new_tokens: int, block: int,
                     dtype: torch.dtype) -> int:
    """Estimated peak bytes of generating ``new_tokens`` after ``prompt_tokens`` per row (padding
    included; model weights excluded): the prompt's blocked prefill (:func:`prefill_bytes`, last
    logits only) with its KV cache sized for prompt + new tokens, as ``wb.generate`` allocates it."""
    size = torch.empty((), dtype=dtype).element_size()
    B, T = batch_size, prompt_tokens
    return (prefill_bytes(config, B, T, block, dtype, logits_to_keep=1) - prefill_kv_bytes(config, B, T, block, size)
            + prefill_kv_bytes(config, B, T + new_tokens, block, size))


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device``: the GPU's free bytes, or the host's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(nbytes: int, device: torch.device | str, what: str, hint: str | None = None) -> None:
    """Raise InsufficientMemoryError naming ``what`` (and ``hint``: what to change; default: shorter
    inputs, fewer rows or ``logits_to_keep=1``) when ``nbytes`` exceed the free memory of ``device``."""
    if hint is None:
        hint = "shorter inputs, fewer rows, or logits_to_keep=1 when only the last token's logits are needed"
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(nbytes)} but only {format_bytes(free)} is free on {device} ({hint})")
