"""Masked attention of a call's queries over their keys, in bounded memory.

The mask of a call is the rule of :mod:`workbench.runtime.masks` over (query, key) pairs. For a
whole-sequence pass it is built once per call and shared by the layers (``batch.mask``). Against a
long KV cache a global layer's keys are every earlier token, and a (queries x keys) mask (plus the
additive float copy SDPA makes of it) would grow with T x prefill block; :func:`attend` then takes
the queries in slices whose mask stays under ``MASK_BUDGET`` elements. Each query row's softmax is
computed exactly as in one call (the same keys, the same kernel), so slicing changes no result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.kernels.attention_map import sdpa_with_lse
from workbench.runtime.batch import ForwardBatch, Keys
from workbench.runtime.masks import dense_mask

__all__ = ["attend", "MASK_BUDGET"]

# Mask elements per SDPA call against a cache: 8 Mi (8 MiB bool + 32 MiB as SDPA's float mask).
MASK_BUDGET = 1 << 23


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: ForwardBatch, keys: Keys | None,
           chunk_size: int | None, scale: float, *, want_lse: bool = False,
           budget: int = MASK_BUDGET) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the call's queries over ``key`` / ``value`` under the rule.

    query (B, Hq, T, D); key / value (B, Hkv, S, D) (GQA when Hkv < Hq); keys: the keys' metadata
    (None: the call's own tokens, S = T, mask shared through ``batch.mask``); chunk_size: the
    layer's chunk (None on global layers). Returns the output (B, Hq, T, D) in the query dtype and,
    with ``want_lse``, the rows' log-sum-exp (B, Hq, T) float32 where the backend gives it
    (:func:`~workbench.kernels.attention_map.sdpa_with_lse`; else None).
    """
    gqa = key.shape[1] != query.shape[1]

    def run(q, mask):
        if want_lse:
            return sdpa_with_lse(q, key, value, mask, scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa), None

    if keys is None:
        return run(query, batch.mask(chunk_size))
    if keys.all_allowed:  # the cache gave exactly the keys the rule allows: nothing to mask
        return run(query, None)
    B, _, T, _ = query.shape
    S = key.shape[2]
    step = max(1, budget // max(1, B * S))
    if step >= T:  # one mask; the layers of one kind share it (same slots, same metadata)
        mask = batch.derived(("cache_mask", chunk_size, S, query.dtype),
                             lambda: _additive(batch.mask(chunk_size, keys), query.dtype))
        return run(query, mask)
    outs, lses = [], []
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        mask = dense_mask(batch.index[sl], batch.positions[:, sl], keys.index, keys.positions, keys.valid, chunk_size)
        out, lse = run(query[:, :, sl], mask)
        outs.append(out)
        lses.append(lse)
    lse = torch.cat(lses, dim=-1) if want_lse and all(x is not None for x in lses) else None
    return torch.cat(outs, dim=2), lse


# Masks up to this many elements (decode steps) are shared as SDPA's additive float mask, so the
# bool -> float conversion SDPA makes of a bool mask runs once per call instead of once per layer.
_ADDITIVE_MAX = 1 << 16


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A small bool mask as 0 / -inf in ``dtype`` (what SDPA turns it into: the same result)."""
    if mask.numel() > _ADDITIVE_MAX:
        return mask
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)
