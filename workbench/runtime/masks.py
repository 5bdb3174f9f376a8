"""Which key may a query see: the one attention rule, and what follows from it.

Every token of a row has a *stream index* (its place in the row's stream of tokens, padding
included, in order of arrival: ``0 .. T-1`` for a whole-sequence pass, ``S + t`` for the t-th
token of a call that continues a row with S tokens already processed), a *position* (its place
in its sequence: RoPE angle, NoPE temperature, chunk) and a *validity* (False for padding). A
query ``q`` may attend key ``k`` of the same row when

    (index[k] <= index[q]  and  valid[k]  and  (chunk is None  or
     position[k] // chunk == position[q] // chunk))          or  index[k] == index[q]

causality on the stream index, chunks (RoPE layers, ``attention_chunk_size``) on the position,
and every query keeps itself, so that padding queries stay finite (their outputs are never
read). NoPE layers pass ``chunk=None`` (global causal attention).

:func:`allowed_rule` is that rule written once with plain operators, as the conjunction of its two
clauses (:func:`visible_rule`: causal, valid, itself; :func:`same_chunk_rule`), so that the same
functions serve the model's dense masks (torch tensors; a chunked layer's mask is the global mask
and the chunk clause), the torch attention-map kernel and, compiled with ``triton.jit``, the Triton
attention-map kernel. :func:`key_lower_bounds` and :func:`column_ranges` are host-side
consequences of the rule that the kernels use to skip work.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["allowed_rule", "visible_rule", "same_chunk_rule", "allowed", "dense_mask", "key_lower_bounds",
           "column_ranges"]

# Plain operators only in the three rule functions: they are also compiled by ``triton.jit``.


def visible_rule(q_index, k_index, k_valid):
    """The global (NoPE) clause: a valid key at or before the query in the stream, or the query itself."""
    return ((k_index <= q_index) & k_valid) | (k_index == q_index)


def same_chunk_rule(q_pos, k_pos, chunk):
    """The chunk clause of RoPE layers: key and query positions in the same ``chunk``-token chunk (a
    token is in its own chunk, so a chunked mask is the global mask and this clause)."""
    return (k_pos // chunk) == (q_pos // chunk)


def allowed_rule(q_index, q_pos, k_index, k_pos, k_valid, chunk, HAS_CHUNK: "tl.constexpr"):  # noqa: F821
    """The rule on broadcastable operands (torch tensors, or Triton tensors inside a kernel).

    q_index/q_pos: query stream index and position; k_index/k_pos/k_valid: the keys' (k_valid
    boolean); chunk: chunk size (ignored unless HAS_CHUNK). Returns the boolean "may attend".
    """
    ok = visible_rule(q_index, k_index, k_valid)
    if HAS_CHUNK:
        ok = ok & same_chunk_rule(q_pos, k_pos, chunk)
    return ok


def allowed(q_index: torch.Tensor, k_index: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
            chunk_size: int | None) -> torch.Tensor:
    """(len(q_index), len(k_index)) bool for one row: may query token ``q_index[i]`` attend key
    ``k_index[j]``. ``positions`` (T,) integer and ``valid`` (T,) bool are indexed by stream index."""
    q_index, k_index = q_index.long(), k_index.long()
    return allowed_rule(q_index[:, None], positions[q_index][:, None], k_index[None, :],
                        positions[k_index][None, :], valid.bool()[k_index][None, :],
                        1 if chunk_size is None else chunk_size, chunk_size is not None)


def dense_mask(q_index: torch.Tensor, q_pos: torch.Tensor, k_index: torch.Tensor, k_pos: torch.Tensor,
               k_valid: torch.Tensor, chunk_size: int | None, *, unchunked: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool "may attend" for every (query, key) pair of each row (:func:`allowed_rule`).

    q_index (Tq,) or (B, Tq), q_pos (B, Tq); k_index (Tk,) or (B, Tk), k_pos / k_valid (B, Tk).
    unchunked: the same tokens' mask for ``chunk_size=None`` when it is built already (a chunked
    mask is then that mask and the chunk clause: half the work). O(Tq x Tk) memory: what the
    model's SDPA call takes today.
    """
    # operands as (rows, 1, queries, 1) and (rows, 1, 1, keys) views: one view call each (a decode
    # step builds these masks every call, and each indexing step would be an op of its own)
    if unchunked is None:
        unchunked = visible_rule(_as_queries(q_index), _as_keys(k_index), _as_keys(k_valid.bool()))
    if chunk_size is None:
        return unchunked
    return unchunked & same_chunk_rule(_as_queries(q_pos), _as_keys(k_pos), chunk_size)


def _as_queries(t: torch.Tensor) -> torch.Tensor:
    """(T,) or (B, T) -> (1 or B, 1, T, 1) view."""
    return t.view(t.shape[0] if t.dim() == 2 else 1, 1, t.shape[-1], 1)


def _as_keys(t: torch.Tensor) -> torch.Tensor:
    """(T,) or (B, T) -> (1 or B, 1, 1, T) view."""
    return t.view(t.shape[0] if t.dim() == 2 else 1, 1, 1, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# Host-side consequences of the rule, for kernels that skip work (numpy, one row)
# ---------------------------------------------------------------------------------------------
def key_lower_bounds(pos: np.ndarray, valid: np.ndarray, chunk_size: int | None, q_index: np.ndarray) -> np.ndarray:
    """Per query (stream index ``q_index``), a key index below which the rule allows no key.

    Global layers: the first valid key (or the query itself). Chunked layers: the first valid key
    whose position is in the query's chunk (positions are assumed to increase along the valid
    tokens, as positions derived from an attention mask do).
    """
    vidx = np.flatnonzero(valid)
    if vidx.size == 0:
        return q_index.copy()
    if chunk_size is None:
        return np.minimum(q_index, vidx[0])
    cid = pos // chunk_size
    uniq, first = np.unique(cid[vidx], return_index=True)  # first valid token of each chunk id
    j = np.searchsorted(uniq, cid[q_index])
    j_c = np.minimum(j, len(uniq) - 1)
    found = (j < len(uniq)) & (uniq[j_c] == cid[q_index])
    lo = np.where(found, vidx[first[j_c]], q_index)
    return np.minimum(lo, q_index)


def column_ranges(pos: np.ndarray, valid: np.ndarray, chunk_size: int | None, q_index: np.ndarray,
                  k_index: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per query, the selected keys ``k_index`` it may attend as one range ``[a, b)`` of positions
    in ``k_index``, or None when that does not hold in general.

    It holds when k_index is strictly increasing, every selected key is valid and (chunked
    layers) the keys' chunk ids do not decrease: then query q may attend exactly the selected
    keys at or before q in q's chunk, a contiguous run (the rule's "itself" clause adds nothing:
    a selected q is among them).
    """
    k = k_index
    if k.size == 0 or (k.size > 1 and not (np.diff(k) > 0).all()) or not valid[k].all():
        return None
    b = np.searchsorted(k, q_index, side="right")
    if chunk_size is None:
        return np.zeros_like(b), b
    cid = pos // chunk_size
    ck = cid[k]
    if ck.size > 1 and not (np.diff(ck) >= 0).all():
        return None
    cq = cid[q_index]
    a = np.searchsorted(ck, cq, side="left")
    b = np.minimum(b, np.searchsorted(ck, cq, side="right"))
    empty = b <= a
    return np.where(empty, 0, a), np.where(empty, 0, b)
