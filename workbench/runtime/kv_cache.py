"""A static key/value cache that follows Llama 4's attention: what each layer must remember, no more.

Which keys a query may see is :mod:`workbench.runtime.masks`' rule: global (NoPE) layers see every
earlier valid key of the row; chunked (RoPE) layers only the keys whose *position* is in the
query's ``attention_chunk_size`` chunk. So

* a global layer keeps every key/value: a buffer of ``max_len`` slots, filled in stream order;
* a chunked layer keeps a ring of ``chunk + block`` slots (``block``: the most tokens one call
  adds, e.g. the prefill block). That is enough: along a row, positions grow by one per valid
  token and not at all on padding, so a key in the query's chunk is less than ``chunk`` stream
  slots behind it; the queries of a call span at most ``block`` slots, so writing them overwrites
  only keys no query of the call can see.

Buffers are allocated once (no growth copies). Each slot carries the metadata the rule needs:
its stream index (``-1``: empty, never allowed), position and validity; attention order does not
matter, so a ring needs no reordering. Every row advances together (``length`` stream slots per
row; padding fills the gaps, as with left-padded batches). ``static=True`` makes every call see the
whole buffer (fixed shapes, what CUDA graph capture of a decode step needs); by default a call sees
only the filled prefix of a buffer that has not wrapped (less work).

Memory: ``2 x B x Hkv x D x dtype`` bytes per slot and layer; :meth:`KVCache.nbytes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.runtime.batch import ForwardBatch, Keys

__all__ = ["KVCache", "LayerCache", "CacheFullError"]


class CacheFullError(RuntimeError):
    """A call would write past a global layer's ``max_len`` slots, or more tokens than ``block``."""


@dataclass(eq=False)
class LayerCache:
    """One attention layer's slots.

    key / value: (B, Hkv, S, D) in the model dtype. index: (S,) int64 stream index of each slot
    (-1: empty). positions: (B, S) int64. valid: (B, S) bool. ``ring``: True for chunked layers
    (slot = stream index mod S), False for global layers (slot = stream index).
    """

    key: torch.Tensor
    value: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    ring: bool

    @property
    def slots(self) -> int:
        return self.key.shape[2]


class KVCache:
    """Static keys and values of every attention layer for ``batch_size`` rows.

    config: the text config (:class:`~workbench.models.llama4.config.TextConfig`): heads, head_dim,
    which layers are chunked (``uses_rope``) and ``attention_chunk_size``. max_len: stream slots per
    row (prompt, padding and generated tokens together). block: the most tokens one call may add
    (the prefill block; 1 for pure decoding). dtype / device: of the buffers (the model's).

    A layer calls :meth:`update` with its new keys/values; the model calls :meth:`advance` once
    per call, after its last layer.
    """

    def __init__(self, config, batch_size: int, max_len: int, *, block: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", static: bool = False) -> None:
        if batch_size < 1 or max_len < 1 or block < 1:
            raise ValueError(f"KVCache: batch_size, max_len and block must be >= 1 "
                             f"(got {batch_size}, {max_len}, {block})")
        self.batch_size, self.max_len, self.block, self.static = batch_size, max_len, min(block, max_len), static
        self.length = 0  # stream slots used per row
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # valid tokens per row
        chunk = config.attention_chunk_size
        B, Hkv, D = batch_size, config.num_key_value_heads, config.head_dim
        self.layers: list[LayerCache] = []
        for rope in config.uses_rope:
            ring = bool(rope) and chunk is not None and chunk + self.block < max_len
            S = chunk + self.block if ring else max_len
            self.layers.append(LayerCache(
                key=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
                value=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
                index=torch.full((S,), -1, dtype=torch.long, device=device),
                positions=torch.zeros(B, S, dtype=torch.long, device=device),
                valid=torch.zeros(B, S, dtype=torch.bool, device=device), ring=ring))

    @staticmethod
    def bytes_per_slot(config, dtype: torch.dtype) -> tuple[int, int]:
        """(bytes per slot and row of one layer's keys+values, element size): for planning."""
        size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_key_value_heads * config.head_dim * size, size

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for c in self.layers
                   for t in (c.key, c.value, c.index, c.positions, c.valid))

    def batch(self, shape: tuple[int, int], device, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> ForwardBatch:
        """The :class:`ForwardBatch` of a call that continues the cached rows with ``shape`` (B, T)
        new tokens: stream indices from ``length``, positions counted on from the rows' valid tokens.
        Raises CacheFullError when the call does not fit."""
        B, T = shape
        if B != self.batch_size:
            raise ValueError(f"KVCache holds {self.batch_size} rows, the call has {B}")
        if T > self.block:
            raise CacheFullError(f"a call adds {T} tokens but this cache takes at most block={self.block} per call")
        if self.length + T > self.max_len:
            raise CacheFullError(f"the cache holds {self.max_len} tokens per row: {self.length} used, "
                                 f"{T} more do not fit")
        return ForwardBatch.build(shape, device, attention_mask, position_ids, start=self.length,
                                  past_valid=self.seen if self.length else None)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, Keys]:
        """Store one call's keys/values (B, Hkv, T, D) of layer ``layer_idx``; return the keys and
        values its queries attend, (B, Hkv, S', D) each, with their :class:`Keys` metadata.

        The call's own keys are written first, so a query sees itself (the rule's "itself" clause).
        """
        c = self.layers[layer_idx]
        T = key.shape[2]
        start = batch.start
        if c.ring:
            slots = batch.index % c.slots
            c.key.index_copy_(2, slots, key)
            c.value.index_copy_(2, slots, value)
            c.index.index_copy_(0, slots, batch.index)
            c.positions.index_copy_(1, slots, batch.positions)
            c.valid.index_copy_(1, slots, batch.valid)
        else:
            c.key[:, :, start:start + T] = key
            c.value[:, :, start:start + T] = value
            c.index[start:start + T] = batch.index
            c.positions[:, start:start + T] = batch.positions
            c.valid[:, start:start + T] = batch.valid
        n = c.slots if self.static else min(c.slots, start + T)
        return (c.key[:, :, :n], c.value[:, :, :n],
                Keys(index=c.index[:n], positions=c.positions[:, :n], valid=c.valid[:, :n]))

    def advance(self, batch: ForwardBatch) -> None:
        """Count a finished call's tokens (after every layer stored its keys)."""
        self.length += batch.shape[1]
        self.seen += batch.valid.sum(-1)

    def reset(self) -> None:
        """Forget every row (the buffers stay allocated)."""
        self.length = 0
        self.seen.zero_()
        for c in self.layers:
            c.index.fill_(-1)
            c.valid.fill_(False)
