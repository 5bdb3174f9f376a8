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
matter, so a ring needs no reordering. The metadata is the same for every layer of a kind (ring or
full: same slots, same tokens), so it is held once per kind and written once per call, by the
first layer of that kind. Every row advances together (``length`` stream slots per row; padding
fills the gaps, as with left-padded batches). ``static=True`` is what CUDA graph capture of a decode
step needs: every call sees the whole buffer (fixed shapes), and where a call writes comes from
device tensors (the stream length ``stream`` and the rows' valid counts ``seen``, advanced in
place), so a replayed graph writes each step to its own slot; no Python number reaches a kernel.
By default a call sees only what its queries can attend: the filled prefix of a full buffer, and
of a ring the ``chunk + T - 1`` newest slots (a decode step of a chunked layer attends ``chunk``
keys, not ``chunk + block``), unless a row has padding between valid tokens (then every filled slot).
A decode step (one token per row) of rows without any padding, at positions counted by the cache,
sees exactly the keys it may attend (a chunked layer: its chunk so far) and no mask is built.

Memory: ``2 x B x Hkv x D x dtype`` bytes per slot and layer; :meth:`KVCache.nbytes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workbench.runtime.batch import ForwardBatch, Keys

__all__ = ["KVCache", "LayerCache", "CacheFullError"]


class CacheFullError(RuntimeError):
    """A call would write past a global layer's ``max_len`` slots, or more tokens than ``block``."""


@dataclass(eq=False)
class LayerCache:
    """One attention layer's slots.

    key / value: (B, Hkv, S, D) in the model dtype. index: (S,) int64 stream index of each slot
    (-1: empty). positions: (B, S) int64. valid: (B, S) bool (the three shared by the layers of
    the same ``ring``). ``ring``: True for chunked layers whose ring is shorter than ``max_len``
    (slot = stream index mod S), False otherwise (slot = stream index). ``chunked``: the layer
    attends within ``attention_chunk_size`` chunks (RoPE layers).
    """

    key: torch.Tensor
    value: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    ring: bool
    chunked: bool = False

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
        # static: ``length`` on the device too (advanced in place), and the call's offsets 0..T-1
        self.stream = torch.zeros((), dtype=torch.long, device=device) if static else None
        self._offsets: dict[int, torch.Tensor] = {}
        # Interior padding (pads after a row's first valid token, then valid tokens again: a
        # right-padded prefill continued by decode steps, or a mask with holes) leaves keys of a
        # query's chunk more than `chunk` stream slots behind it: the newest-slots window would miss
        # them (it is turned off), and a ring misses them once the pads outnumber `block` (refused).
        # Tracked on the host from the masks (a mask on a GPU is copied: a few bytes per call).
        self._had_valid = np.zeros(batch_size, bool)
        self._pads = np.zeros(batch_size, np.int64)  # pads after the row's first valid token
        self._window = not static
        # No padding in any row so far and positions counted by the cache: every token's position
        # is its stream index, so a decode step's allowed keys are one run of slots (no mask).
        self._exact = not static
        chunk = config.attention_chunk_size
        self.chunk = chunk
        B, Hkv, D = batch_size, config.num_key_value_heads, config.head_dim
        meta: dict[bool, tuple[torch.Tensor, ...]] = {}  # ring -> (index, positions, valid), shared
        self.layers: list[LayerCache] = []
        for rope in config.uses_rope:
            ring = bool(rope) and chunk is not None and chunk + self.block < max_len
            S = chunk + self.block if ring else max_len
            if ring not in meta:
                meta[ring] = (torch.full((S,), -1, dtype=torch.long, device=device),
                              torch.zeros(B, S, dtype=torch.long, device=device),
                              torch.zeros(B, S, dtype=torch.bool, device=device))
            index, positions, valid = meta[ring]
            self.layers.append(LayerCache(
                key=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
                value=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
                index=index, positions=positions, valid=valid, ring=ring,
                chunked=bool(rope) and chunk is not None))
        self._has_ring = any(c.ring for c in self.layers)

    @staticmethod
    def bytes_per_slot(config, dtype: torch.dtype) -> tuple[int, int]:
        """(bytes per slot and row of one layer's keys+values, element size): for planning."""
        size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_key_value_heads * config.head_dim * size, size

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        seen = {id(t): t for c in self.layers for t in (c.key, c.value, c.index, c.positions, c.valid)}
        return sum(t.numel() * t.element_size() for t in seen.values())

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
        self._note_padding(attention_mask)
        if position_ids is not None:
            self._exact = False  # positions given by the caller need not be the stream index
        if not self.static:
            return ForwardBatch.build(shape, device, attention_mask, position_ids, start=self.length,
                                      past_valid=self.seen if self.length else None)
        offsets = self._offsets.get(T)
        if offsets is None:
            offsets = self._offsets[T] = torch.arange(T, device=self.seen.device)
        return ForwardBatch.build(shape, device, attention_mask, position_ids, start=self.length,
                                  past_valid=self.seen, index=self.stream + offsets)

    def _note_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Track interior padding (see ``__init__``) before the call writes anything: the window
        is turned off when a row has some; ValueError when a ring may have dropped keys."""
        if attention_mask is not None and attention_mask.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # capture records kernels only; the replayed steps are checked by the caller's eager warm-up
        m = None if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool, copy=False)
        if m is not None and not m.all():
            self._exact = False
        if m is None or m.all():
            self._had_valid[:] = True
            interior, worst = self._pads > 0, self._pads
        else:
            had = self._had_valid[:, None] | np.logical_or.accumulate(m, axis=1)  # a valid token at or before
            pads = self._pads[:, None] + np.cumsum(~m & had, axis=1)  # pads after the first valid one, so far
            interior, worst = (m & (pads > 0)).any(axis=1), np.where(m, pads, 0).max(axis=1)
            self._had_valid, self._pads = had[:, -1].copy(), pads[:, -1].copy()
        if not interior.any():
            return
        self._window = False
        if self._has_ring and (worst[interior] > self.block).any():
            row = int(np.flatnonzero(interior & (worst > self.block))[0])
            raise ValueError(f"row {row} has {int(worst[row])} padding tokens between valid tokens, more than the "
                             f"chunked layers' ring keeps (block={self.block}): pad on the left, or use a KVCache "
                             f"whose block or max_len covers the padding (max_len <= attention_chunk_size + block "
                             "keeps every slot)")

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, Keys]:
        """Store one call's keys/values (B, Hkv, T, D) of layer ``layer_idx``; return the keys and
        values its queries attend, (B, Hkv, S', D) each, with their :class:`Keys` metadata.

        The call's own keys are written first, so a query sees itself (the rule's "itself" clause).
        """
        c = self.layers[layer_idx]
        if not self.static and key.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a CUDA graph of a decode step needs KVCache(static=True): this cache writes to "
                               "slots chosen on the host, which a replayed graph would reuse")
        slots = batch.derived(("kv_slots", id(self), c.ring), lambda: self._write_metadata(c, batch))
        if isinstance(slots, torch.Tensor):
            c.key.index_copy_(2, slots, key)
            c.value.index_copy_(2, slots, value)
        else:
            c.key[:, :, slots] = key
            c.value[:, :, slots] = value
        segments, keys = batch.derived(("kv_visible", id(self), c.ring, c.chunked), lambda: self._visible(c, batch))
        return _take(c.key, segments), _take(c.value, segments), keys

    def _write_metadata(self, c: LayerCache, batch: ForwardBatch):
        """Once per call and kind of layer (ring / full): write the call's slot metadata, shared by
        the layers of the kind. Returns where the call's keys go: slot indices (T,) in a ring or a
        static cache, a slice otherwise."""
        T, start = batch.shape[1], batch.start
        if c.ring or self.static:
            slots = batch.index % c.slots if c.ring else batch.index
            c.index.index_copy_(0, slots, batch.index)
            c.positions.index_copy_(1, slots, batch.positions)
            c.valid.index_copy_(1, slots, batch.valid)
        else:
            slots = slice(start, start + T)
            c.index[slots] = batch.index
            c.positions[:, slots] = batch.positions
            c.valid[:, slots] = batch.valid
        return slots

    def _visible(self, c: LayerCache, batch: ForwardBatch):
        """The slots the call's queries may see, as one or two [a, b) ranges, and their
        :class:`Keys`: every slot with ``static``; else the filled slots, and of a chunked layer
        only the newest ``chunk + T - 1`` of them while no row has interior padding (then a key in
        a query's chunk is fewer than ``chunk`` stream slots behind it: older ones, and never
        written ones, cannot be attended). A decode step while ``_exact`` holds sees its allowed
        keys only (``Keys.all_allowed``)."""
        T, start, S = batch.shape[1], batch.start, c.slots
        exact = self._exact and T == 1  # then the slots below are exactly the query's allowed keys
        if self.static:
            segments = [(0, S)]
        elif not c.chunked or not self._window:
            segments = [(0, min(S, start + T))]
        else:
            # the window: keys fewer than `chunk` slots back; exact: the query's own chunk so far
            lo = start // self.chunk * self.chunk if exact else max(0, start - self.chunk + 1)
            a, n = (lo % S, start + T - lo) if c.ring else (lo, start + T - lo)
            if a + n <= S:
                segments = [(a, a + n)]
            elif S <= 2 * n:  # a wrapped ring that is small: attend all of it (masked) rather than copy
                segments, exact = [(0, S)], False
            else:  # a wrapped ring: its two runs, copied together (less than attending the whole ring)
                segments = [(a, S), (0, a + n - S)]
        keys = Keys(index=_take(c.index, segments, dim=0), positions=_take(c.positions, segments, dim=1),
                    valid=_take(c.valid, segments, dim=1), all_allowed=exact and not self.static)
        return segments, keys

    def advance(self, batch: ForwardBatch) -> None:
        """Count a finished call's tokens (after every layer stored its keys)."""
        self.length += batch.shape[1]
        self.seen += batch.valid.sum(-1)
        if self.stream is not None:
            self.stream += batch.shape[1]

    def reset(self) -> None:
        """Forget every row (the buffers stay allocated)."""
        self.length = 0
        self.seen.zero_()
        if self.stream is not None:
            self.stream.zero_()
        self._had_valid[:] = False
        self._pads[:] = 0
        self._window = not self.static
        self._exact = not self.static
        for c in self.layers:
            c.index.fill_(-1)
            c.valid.fill_(False)


def _take(t: torch.Tensor, segments: list[tuple[int, int]], dim: int = 2) -> torch.Tensor:
    """The slots ``segments`` of ``t`` along ``dim``: a view for one range, a copy for a wrapped ring."""
    if len(segments) == 1:
        a, b = segments[0]
        return t.narrow(dim, a, b - a)
    return torch.cat([t.narrow(dim, a, b - a) for a, b in segments], dim=dim)
