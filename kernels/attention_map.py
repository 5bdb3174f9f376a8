"""Cross-modal attention maps without the T x T matrix (``workbench.kernels.attention_map``).

For one sequence of one attention layer, :func:`cross_attention_probs` returns the softmax
probabilities ``p[h, i, j]`` from a chosen set of query tokens (``query_index``, e.g. the text
tokens) to a chosen set of key tokens (``key_index``, e.g. the image patch tokens), exactly the
entries of the (T, T) attention matrix the layer's softmax produces, without ever building it:

1. **row log-sum-exp, blockwise** -- for each block of selected queries, an online softmax over
   blocks of keys (running max ``m`` and running sum ``l`` of ``exp(s - m)``; on CPU the torch
   backend lets aten's fused flash-attention kernel do this per key block, it returns the
   log-sum-exp, and combines blocks with ``logaddexp``) gives
   ``lse[h, i] = log sum_{k allowed} exp(q_i . k_k * scale)`` over *all* allowed keys;
2. **selected columns** -- ``p[h, i, j] = exp(q_i . k_{key_index[j]} * scale - lse[h, i])``,
   and 0 where the mask forbids the key.

Which key each query may see is the model's rule, :mod:`workbench.runtime.masks` (causal on the
token index, valid keys only, chunks of ``chunk_size`` positions on chunked layers, every query
keeps itself); the mask is computed blockwise with it and its consequences
(:func:`~workbench.runtime.masks.key_lower_bounds`, :func:`~workbench.runtime.masks.column_ranges`)
bound the work. Token index = stream index here (one sequence from its start).

Scores are computed in float32 from the query/key as given (bf16/fp16 inputs are upcast). The
log-sum-exp applies ``scale`` after the dot product (as transformers' eager attention does); the
column pass multiplies the query by ``scale`` first (one GEMM of ``[scale * q, -lse]`` with
``[k, 1]``), a float32 rounding difference of ~1e-7 relative on the scores.

Memory: the output (H', Q, P) plus bounded working blocks (``torch_block_sizes``), never (T, T).
Work: the log-sum-exp pass touches only key blocks that can be allowed for the query block
(``[first allowed key, last query]``), so on chunked (RoPE) layers it costs O(Q * chunk) instead
of O(Q * T), and O(Q * T / 2) on global (NoPE) layers; query blocks that cannot see any selected
key (e.g. text in a later chunk than the image) are written as zeros without any work.

Backends: ``"torch"`` (any device; CPU default) and ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``; :mod:`workbench.kernels.attention_map_triton`). The torch backend plans
its key ranges on the host from the positions (a device sync if they live on a GPU); the Triton
backend computes ranges and masks on the device (no host sync, asynchronous).

When the layer's own attention already produced the row log-sum-exp -- :func:`sdpa_with_lse`
runs ``F.scaled_dot_product_attention`` through the same aten kernel it dispatches to, aten's
fused CPU flash attention, which returns it -- :func:`cross_attention_probs_from_lse` does only
step 2 (the capture's CPU path: the log-sum-exp pass was most of its cost).

:func:`cross_attention_probs_reference` is the dense float64 reference (T x T; tests only).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workbench.runtime import masks

__all__ = ["cross_attention_probs", "cross_attention_probs_from_lse", "cross_attention_probs_torch",
           "cross_attention_probs_reference", "cross_attention_probs_keys", "sdpa_with_lse", "resolve_heads",
           "torch_block_sizes"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Working memory of the torch backend: each block of scores / keys / masks stays near this size
# (large blocks: few, big tensor ops, which matters on a busy CPU).
_BLOCK_BYTES = 128 << 20
# The column pass alone (log-sum-exp given): cache-sized score blocks.
_COL_BLOCK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def resolve_heads(heads, n_heads: int) -> tuple[list[int], bool]:
    """``heads`` ("all", "mean", or a sequence of head indices) -> (head indices, mean?)."""
    if isinstance(heads, str):
        if heads == "all":
            return list(range(n_heads)), False
        if heads == "mean":
            return list(range(n_heads)), True
        raise ValueError(f"heads must be 'all', 'mean' or a list of head indices, got {heads!r}")
    try:
        sel = [int(h) for h in heads]
    except TypeError:
        raise ValueError(f"heads must be 'all', 'mean' or a list of head indices, got {heads!r}") from None
    if not sel:
        raise ValueError("heads: empty list of head indices")
    bad = [h for h in sel if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads: indices {bad} out of range for {n_heads} query heads")
    if len(set(sel)) != len(sel):
        raise ValueError(f"heads: repeated head indices in {sel}")
    return sel, False


def _validate(query, key, scale, positions, valid, chunk_size, query_index, key_index, out, out_dtype, heads):
    for name, t in (("query", query), ("key", key), ("query_index", query_index), ("key_index", key_index)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query must be (Hq, T, D) and key (Hkv, T, D) for one sequence; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    Hq, T, D = query.shape
    Hkv = key.shape[0]
    if key.shape[1:] != (T, D):
        raise ValueError(f"key must be (Hkv, T, D) = (Hkv, {T}, {D}) like query, got {tuple(key.shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of key heads {Hkv} (GQA)")
    if query.dtype not in _FLOAT_DTYPES or key.dtype != query.dtype:
        raise ValueError(f"query/key must share a float dtype, got {query.dtype} / {key.dtype}")
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    for name, t in (("query_index", query_index), ("key_index", key_index)):
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if positions is None:
        positions = torch.arange(T, device=query.device)
    if valid is None:
        valid = torch.ones(T, dtype=torch.bool, device=query.device)
    if positions.shape != (T,) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be a (T,) = ({T},) integer tensor, got {tuple(positions.shape)} {positions.dtype}")
    if valid.shape != (T,):
        raise ValueError(f"valid must be a (T,) = ({T},) tensor, got {tuple(valid.shape)}")
    head_idx, mean = resolve_heads(heads, Hq)
    Hout = 1 if mean else len(head_idx)
    shape = (Hout, query_index.shape[0], key_index.shape[0])
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or not out.dtype.is_floating_point:
            desc = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a floating tensor of shape (heads, Q, P) = {shape}, got {desc}")
    elif out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a float dtype, got {out_dtype}")
    return positions.to(query.device), valid.to(device=query.device, dtype=torch.bool), head_idx, mean, shape


def _check_index_range(query_index, key_index, T):
    for name, t in (("query_index", query_index), ("key_index", key_index)):
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= T:
                raise ValueError(f"{name} values must lie in [0, T) = [0, {T}), got min {lo}, max {hi}")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def cross_attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float, *,
                          query_index: torch.Tensor, key_index: torch.Tensor,
                          positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                          chunk_size: int | None = None, heads: str | Sequence[int] = "all",
                          out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                          backend: str | None = None, check_indices: bool = True,
                          **backend_options) -> torch.Tensor:
    """Softmax probabilities from the queries ``query_index`` to the keys ``key_index`` of one sequence.

    Args:
        query: (Hq, T, D) the query the layer's softmax uses (after RoPE, QK norm and temperature).
        key: (Hkv, T, D); query head h reads key head ``h // (Hq // Hkv)`` (GQA).
        scale: softmax scale (``head_dim ** -0.5``), applied after the dot product.
        query_index: (Q,) integer token indices of the query rows wanted.
        key_index: (P,) integer token indices of the key columns wanted.
        positions: (T,) integer positions (default ``arange(T)``); only chunk membership uses them.
        valid: (T,) bool, False for padding (padding keys are never attended; default all True).
        chunk_size: attention chunk of a chunked (RoPE) layer, None for global (NoPE) layers.
        heads: ``"all"`` (output heads = query heads), ``"mean"`` (one output head, the mean over
            query heads of the probabilities) or a list of query head indices.
        out: optional (H', Q, P) floating tensor on query's device to write into (every element
            is written; probabilities are computed in float32 and cast).
        out_dtype: dtype of the returned tensor when ``out`` is None.
        backend: None (Triton for CUDA tensors when triton imports, torch otherwise), "torch" or
            "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
        check_indices: check that the indices lie in [0, T) (a host sync on CUDA).
        **backend_options: torch: ``block_q``, ``block_k``, ``block_bytes``, ``fused``; triton: ``BLOCK_M``, ``BLOCK_N``,
            ``BLOCK_P``, ``upcast``.

    Returns:
        (H', Q, P) tensor: ``p[h, i, j] = softmax_k(q_{query_index[i]} . k_k * scale)`` at
        ``k = key_index[j]``, 0 where the mask forbids that key.
    """
    positions, valid, head_idx, mean, shape = _validate(query, key, scale, positions, valid, chunk_size,
                                                         query_index, key_index, out, out_dtype, heads)
    if check_indices and not (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        _check_index_range(query_index, key_index, query.shape[1])
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend is None:
        backend = "triton" if (query.is_cuda and _triton_ok()) else "torch"
    if backend == "triton":
        if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (query is on {query.device}) or "
                             "TRITON_INTERPRET=1 set before triton is imported")
        from .attention_map_triton import cross_attention_probs_triton

        return cross_attention_probs_triton(query, key, float(scale), positions, valid, chunk_size, query_index,
                                            key_index, head_idx, mean, out=out, out_dtype=out_dtype,
                                            **backend_options)
    return cross_attention_probs_torch(query, key, float(scale), positions, valid, chunk_size, query_index,
                                       key_index, head_idx, mean, out=out, out_dtype=out_dtype, **backend_options)


def cross_attention_probs_from_lse(query: torch.Tensor, key: torch.Tensor, scale: float, lse: torch.Tensor, *,
                                   query_index: torch.Tensor, key_index: torch.Tensor,
                                   positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                                   chunk_size: int | None = None, heads: str | Sequence[int] = "all",
                                   out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                                   check_indices: bool = True, block_bytes: int = _COL_BLOCK_BYTES,
                                   num_threads: int | None = None) -> torch.Tensor:
    """:func:`cross_attention_probs` given the rows' log-sum-exp: only the patch columns are computed.

    ``lse`` (Hq, T) float: ``lse[h, t] = log sum_{k allowed} exp(q_t . k_k * scale)`` over every key
    the layer's mask allows for token t (natural log, after ``scale``), e.g. the log-sum-exp that
    :func:`sdpa_with_lse` returns with the layer's attention output. The other arguments and the
    result are those of :func:`cross_attention_probs` (torch ops on query's device).
    ``p = exp(scale * q . k - lse)``, computed in float32: one GEMM of ``[scale * q, -lse]`` with
    ``[k, 1]`` per block of queries, ``exp`` written into the output dtype, 0 where the mask forbids
    the key; query blocks that cannot see any selected key are zero-filled without work.

    ``block_bytes``: size of the float32 score block (default 8 MiB: cache-sized blocks, measured
    faster than 128 MiB ones on CPU). ``num_threads``: torch intra-op threads for this call (None:
    leave torch's setting; set back afterwards) -- on a CPU shared with other jobs one thread can be
    faster than several for these short, memory-bound ops.
    """
    positions, valid, head_idx, mean, _ = _validate(query, key, scale, positions, valid, chunk_size,
                                                    query_index, key_index, out, out_dtype, heads)
    Hq, T, _ = query.shape
    if not isinstance(lse, torch.Tensor) or lse.shape != (Hq, T) or not lse.dtype.is_floating_point:
        desc = f"{tuple(lse.shape)} {lse.dtype}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a floating (Hq, T) = ({Hq}, {T}) tensor, got {desc}")
    if lse.device != query.device:
        raise ValueError(f"lse is on {lse.device} but query is on {query.device}")
    if check_indices and not (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        _check_index_range(query_index, key_index, T)
    prev = torch.get_num_threads()
    if num_threads is not None and num_threads != prev:
        torch.set_num_threads(int(num_threads))
    try:
        return cross_attention_probs_torch(query, key, float(scale), positions, valid, chunk_size, query_index,
                                           key_index, head_idx, mean, out=out, out_dtype=out_dtype, lse=lse,
                                           block_bytes=block_bytes)
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


_FLASH_CHOICE = 1  # sdp::SDPBackend::flash_attention, as torch._fused_sdp_choice numbers it


def sdpa_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  scale: float, enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale,
    enable_gqa=enable_gqa)`` and, when it comes for free, the rows' log-sum-exp.

    When torch's own backend choice for these inputs (``torch._fused_sdp_choice``, what
    ``F.scaled_dot_product_attention`` dispatches on) is the fused CPU flash kernel, this calls
    that kernel directly, as ``F.scaled_dot_product_attention`` does (a boolean mask converted to
    the additive 0 / -inf mask of the query dtype first), so the output is the same tensor bit for
    bit, and returns its log-sum-exp too: (B, Hq, T) float32 (float64 for float64 inputs),
    ``log sum_k exp(q . k * scale + mask)``. Any other backend (CUDA, math): the plain call and
    None. Dropout and ``is_causal`` are not supported (the model uses neither).
    """
    op = _flash_lse_op()
    if op is not None and query.device.type == "cpu":
        try:
            choice = int(torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, False, scale=scale,
                                                 enable_gqa=enable_gqa))
        except Exception:  # an older/newer signature: take the plain path
            choice = -1
        if choice == _FLASH_CHOICE:
            mask = attn_mask
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, torch.tensor(float("-inf"), dtype=query.dtype))
            out, lse = op(query, key, value, 0.0, False, attn_mask=mask, scale=scale)
            return out, lse
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=enable_gqa), None


def _triton_ok() -> bool:
    from . import _module_imports

    return _module_imports("attention_map_triton")


# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------
def _flash_lse_op():
    """aten's fused CPU flash attention, which also returns the rows' log-sum-exp (or None)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _Plan:
    """Host-side facts about positions/validity used to classify (query block, key block) pairs."""

    def __init__(self, positions, valid, chunk_size, query_index, key_index):
        self.pos = positions.detach().to("cpu", torch.int64).numpy()
        self.val = valid.detach().cpu().numpy().astype(bool)
        self.qidx = query_index.detach().to("cpu", torch.int64).numpy()
        self.kidx = key_index.detach().to("cpu", torch.int64).numpy()
        self.chunk = chunk_size
        self.cid = self.pos // chunk_size if chunk_size is not None else np.zeros_like(self.pos)
        self.invalid_prefix = np.concatenate([[0], np.cumsum(~self.val)])
        self.lo = masks.key_lower_bounds(self.pos, self.val, chunk_size, self.qidx)

    def column_ranges(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per query, its allowed selected keys as one range of key_index positions, or None
        (:func:`workbench.runtime.masks.column_ranges`)."""
        return masks.column_ranges(self.pos, self.val, self.chunk, self.qidx, self.kidx)

    def all_allowed(self, qi: np.ndarray, keys: np.ndarray | None, k0: int = 0, k1: int = 0) -> bool:
        """True when every (query, key) pair is allowed (keys: an index array, or the range [k0, k1))."""
        if keys is None:
            if k1 <= k0:
                return True
            kmax, kval = k1 - 1, self.invalid_prefix[k1] == self.invalid_prefix[k0]
            kc = self.cid[k0:k1]
        else:
            if keys.size == 0:
                return True
            kmax, kval, kc = keys.max(), bool(self.val[keys].all()), self.cid[keys]
        if kmax > qi.min() or not kval:
            return False
        if self.chunk is None:
            return True
        qc = self.cid[qi]
        c = qc[0]
        return bool((qc == c).all() and (kc == c).all())

    def none_allowed(self, qi: np.ndarray, keys: np.ndarray) -> bool:
        """True when no query of the block may attend any of the keys (index array)."""
        if keys.size == 0:
            return True
        if np.intersect1d(qi, keys).size:  # the diagonal is always allowed
            return False
        if keys.min() > qi.max():
            return True
        if self.chunk is not None and np.intersect1d(self.cid[qi], self.cid[keys[self.val[keys]]]).size == 0:
            return True
        return False


def torch_block_sizes(n_heads: int, head_dim: int, n_keys: int, fused: bool, block_bytes: int = _BLOCK_BYTES,
                      block_q: int | None = None, block_k: int | None = None) -> tuple[int, int, int]:
    """(block_q, block_k, mask_k) of the torch backend for ``n_heads`` selected heads and ``n_keys``
    patch columns: each of its working tensors -- the (heads, block_q, n_keys) float32 column block,
    the fused path's (heads, block_k, head_dim) K and V blocks or the online path's (heads, block_q,
    block_k) scores, the (block_q, mask_k) additive masks -- stays near ``block_bytes``."""
    budget = max(1, int(block_bytes))
    if block_q is None:
        block_q = int(max(16, min(4096, budget // (4 * n_heads * max(n_keys, 1)))))
    block_q = max(1, int(block_q))
    if block_k is None:
        per_key = 8 * n_heads * head_dim if fused else 4 * n_heads * block_q
        block_k = int(max(16, min(65536, budget // per_key)))
    block_k = max(1, int(block_k))
    mask_k = int(max(1, min(block_k, budget // (4 * block_q))))
    return block_q, block_k, mask_k


def cross_attention_probs_torch(query, key, scale, positions, valid, chunk_size, query_index, key_index,
                                head_idx, mean, *, out=None, out_dtype=torch.float32, block_q: int | None = None,
                                block_k: int | None = None, fused: bool | None = None,
                                block_bytes: int = _BLOCK_BYTES, lse: torch.Tensor | None = None) -> torch.Tensor:
    """torch backend of :func:`cross_attention_probs` (arguments already validated).

    Per block of ``block_q`` selected queries: skip it (zeros) when no patch column can be
    allowed; else the row log-sum-exp over key blocks ``[first allowed key, last query]`` of
    ``block_k`` keys -- on CPU with aten's fused flash attention (it returns the log-sum-exp;
    no mask for blocks that are fully allowed, ``is_causal`` for the aligned diagonal block, an
    additive block mask otherwise), elsewhere (``fused=False``) an online softmax in plain torch
    ops -- then ``p = exp(scale * q . k - lse)`` for the patch columns: one GEMM of ``[scale * q, -lse]``
    with ``[k, 1]`` and one ``exp`` written straight into the output dtype. With ``lse`` (Hq, T),
    the rows' log-sum-exp given (:func:`cross_attention_probs_from_lse`), only the column pass runs.
    """
    Hq, T, D = query.shape
    G = Hq // key.shape[0]
    Q, P = query_index.shape[0], key_index.shape[0]
    Hs = len(head_idx)
    dev = query.device
    if out is None:
        out = torch.empty((1 if mean else Hs, Q, P), dtype=out_dtype, device=dev)
    if Q == 0 or P == 0:
        return out
    if fused is None:
        fused = dev.type == "cpu" and _flash_lse_op() is not None
    block_q, block_k, mask_k = torch_block_sizes(Hs, D, P, fused, block_bytes, block_q, block_k)

    plan = _Plan(positions, valid, chunk_size, query_index, key_index)
    heads_t = torch.tensor(head_idx, device=dev)
    kv_t = heads_t // G
    kv = G if list(head_idx) == list(range(Hq)) else kv_t  # all heads: expand instead of gather
    qidx = query_index.to(dev, torch.long)
    kidx = key_index.to(dev, torch.long)
    # patch keys with a column of ones: [scale * q, -lse] . [k, 1] = scale * q.k - lse in one GEMM
    k_cols = _per_head(key.index_select(1, kidx), kv)  # (Hs, P, D)
    k_aug_t = torch.cat([k_cols, k_cols.new_ones(k_cols.shape[:-1] + (1,))], -1).transpose(1, 2)  # (Hs, D+1, P)
    all_heads = list(head_idx) == list(range(Hq))
    pos_d, val_d = positions.to(dev), valid.to(dev)
    lse_rows = None if lse is None else (lse if all_heads else lse[heads_t])  # (Hs, T)
    zeros_v = torch.zeros((1, Hs, min(block_k, T), D), device=dev) if (fused and lse is None) else None

    for b0, b1, c0, c1 in _query_blocks(plan, Q, P, block_q):
        qi_np = plan.qidx[b0:b1]
        nothing = (c0 == c1) if c0 is not None else plan.none_allowed(qi_np, plan.kidx)
        if nothing:  # e.g. queries in a later chunk than every patch: zeros, no work
            out[:, b0:b1] = 0
            continue
        qi = qidx[b0:b1]
        qb = query.transpose(0, 1)[qi].transpose(0, 1)  # (Hq, Qb, D): a row gather in the model's layout
        qb = (qb if all_heads else qb[heads_t]).float().contiguous()  # (Hs, Qb, D)
        lo, hi = int(plan.lo[b0:b1].min()), int(qi_np.max()) + 1
        if lse_rows is not None:
            lse_b = lse_rows.index_select(1, qi).float()  # (Hs, Qb)
        elif fused:
            lse_b = _lse_fused(qb, key, kv, scale, plan, qi, qi_np, lo, hi, block_k, mask_k, pos_d, val_d, zeros_v)
        else:
            lse_b = _lse_online(qb, key, kv, scale, plan, qi, qi_np, lo, hi, block_k, pos_d, val_d)
        # every selected query row has its diagonal: lse is finite
        if c0 is None:  # general block: all columns, then the mask
            c0, c1 = 0, P
            dead = None if plan.all_allowed(qi_np, plan.kidx) else ~masks.allowed(qi, kidx, pos_d, val_d, chunk_size)
        else:  # every row of the block may attend exactly the columns [c0, c1): zeros elsewhere, no mask
            dead = None
            if c0 > 0:
                out[:, b0:b1, :c0] = 0
            if c1 < P:
                out[:, b0:b1, c1:] = 0
        k_t = k_aug_t if (c0, c1) == (0, P) else k_aug_t[:, :, c0:c1]
        s = torch.bmm(torch.cat([qb * scale, -lse_b[..., None]], -1), k_t)  # (Hs, Qb, C) = scale q.k - lse
        if mean:
            s.exp_()
            if dead is not None:
                s.masked_fill_(dead[None], 0.0)
            torch.mean(s, 0, out=out[0, b0:b1, c0:c1])
        else:
            dst = out[:, b0:b1, c0:c1]
            torch.exp(s, out=dst)  # exp, then the cast into the output dtype
            if dead is not None:
                dst.masked_fill_(dead[None], 0.0)
    return out


def _query_blocks(plan: _Plan, Q: int, P: int, block_q: int):
    """(b0, b1, c0, c1): blocks of consecutive selected queries. When the allowed columns of each
    query are one range (:meth:`_Plan.column_ranges`) and the range changes at most
    ``max(64, Q / 32)`` times along the queries, a block never straddles a change and carries its
    range as ``[c0, c1)`` (rows sized to keep ``rows x (c1 - c0)`` near ``block_q x P``); otherwise
    blocks of ``block_q`` rows with ``c0 = c1 = None`` (the caller masks)."""
    rng = plan.column_ranges()
    change = None
    if rng is not None:
        a, b = rng
        change = np.flatnonzero((a[1:] != a[:-1]) | (b[1:] != b[:-1])) + 1
    if change is None or change.size > max(64, Q // 32):  # no ranges, or too many tiny runs of rows
        for b0 in range(0, Q, block_q):
            yield b0, min(Q, b0 + block_q), None, None
        return
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [Q]])
    for r0, r1 in zip(starts.tolist(), ends.tolist()):
        c0, c1 = int(a[r0]), int(b[r0])
        if c0 == c1:  # nothing allowed: one zero fill for the whole run
            yield r0, r1, c0, c1
            continue
        # block rows so that the (heads, rows, c1 - c0) block stays near the budget of block_q x P
        rows = max(1, block_q * P // (c1 - c0))
        for b0 in range(r0, r1, rows):
            yield b0, min(r1, b0 + rows), c0, c1


def _per_head(k: torch.Tensor, kv) -> torch.Tensor:
    """(Hkv, K, D) keys -> (H_sel, K, D) float32: row h is key head ``kv[h]`` (a tensor), or, when
    ``kv`` is an int G (all query heads selected), each key head repeated G times (GQA)."""
    k = k.float()
    if isinstance(kv, int):
        return k[:, None].expand(k.shape[0], kv, *k.shape[1:]).reshape(k.shape[0] * kv, *k.shape[1:])
    return k[kv]


def _key_blocks(qi_np, lo, hi, block_k):
    """Key ranges for one query block: below the first query in ``block_k`` steps, then the rest."""
    q_min = int(qi_np.min())
    cut = min(max(q_min, lo), hi)
    ranges = [(k0, min(cut, k0 + block_k)) for k0 in range(lo, cut, block_k)]
    ranges += [(k0, min(hi, k0 + block_k)) for k0 in range(cut, hi, block_k)]
    return ranges


def _lse_fused(qb, key, kv, scale, plan, qi, qi_np, lo, hi, block_k, mask_k, pos_d, val_d, zeros_v):
    op = _flash_lse_op()
    Hs, Qb, _ = qb.shape
    q4 = qb[None]
    lse = None
    contiguous = bool((np.diff(qi_np) == 1).all()) if qi_np.size > 1 else True
    for k0, k1 in _key_blocks(qi_np, lo, hi, block_k):
        kb = _per_head(key[:, k0:k1], kv)[None]  # (1, Hs, Kb, D) float32
        v = zeros_v[:, :, : k1 - k0]
        if plan.all_allowed(qi_np, None, k0, k1):
            _, l = op(q4, kb, v, 0.0, False, scale=scale)
        elif (contiguous and k0 == qi_np[0] and k1 == qi_np[-1] + 1
              and plan.invalid_prefix[k1] == plan.invalid_prefix[k0]
              and (plan.chunk is None or np.unique(plan.cid[k0:k1]).size == 1)):
            _, l = op(q4, kb, v, 0.0, True, scale=scale)  # the aligned diagonal block: causal
        else:  # general block: an additive mask, in sub-blocks of mask_k keys
            for j0 in range(k0, k1, mask_k):
                j1 = min(k1, j0 + mask_k)
                m = masks.allowed(qi, torch.arange(j0, j1, device=qb.device), pos_d, val_d, plan.chunk)
                dead = ~m.any(1)
                bias = torch.zeros(m.shape, device=qb.device).masked_fill_(~m, float("-inf"))
                _, l = op(q4, kb[:, :, j0 - k0:j1 - k0], v[:, :, :j1 - j0], 0.0, False, attn_mask=bias[None, None],
                          scale=scale)
                l = l[0]
                if bool(dead.any()):
                    l = l.masked_fill(dead[None], float("-inf"))  # flash returns 0 for fully masked rows
                lse = l if lse is None else torch.logaddexp(lse, l)
            continue
        l = l[0]
        lse = l if lse is None else torch.logaddexp(lse, l)
    return lse


def _lse_online(qb, key, kv, scale, plan, qi, qi_np, lo, hi, block_k, pos_d, val_d):
    Hs, Qb, _ = qb.shape
    neg_inf = float("-inf")
    m = torch.full((Hs, Qb), neg_inf, device=qb.device)
    l = torch.zeros((Hs, Qb), device=qb.device)
    for k0, k1 in _key_blocks(qi_np, lo, hi, block_k):
        kb = _per_head(key[:, k0:k1], kv)  # (Hs, Kb, D) float32
        if plan.all_allowed(qi_np, None, k0, k1):
            s = torch.bmm(qb, kb.transpose(1, 2)).mul_(scale)
        else:
            kk = torch.arange(k0, k1, device=qb.device)
            bias = torch.zeros((Qb, k1 - k0), device=qb.device).masked_fill_(
                ~masks.allowed(qi, kk, pos_d, val_d, plan.chunk), neg_inf)
            s = torch.baddbmm(bias[None], qb, kb.transpose(1, 2), alpha=scale)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == neg_inf, 0.0)
        s.sub_(m_safe[..., None]).exp_()
        l = l * torch.exp(m - m_safe) + s.sum(-1)
        m = m_new
    return m + torch.log(l)


# ---------------------------------------------------------------------------------------------
# Keys in any slot order (a KV cache): one call's queries against the keys they attend
# ---------------------------------------------------------------------------------------------
def cross_attention_probs_keys(query: torch.Tensor, key: torch.Tensor, scale: float, *, query_rows: torch.Tensor,
                               query_index: torch.Tensor, query_positions: torch.Tensor, key_index: torch.Tensor,
                               key_positions: torch.Tensor, key_valid: torch.Tensor, columns: torch.Tensor,
                               chunk_size: int | None = None, heads: str | Sequence[int] = "all",
                               lse: torch.Tensor | None = None, out: torch.Tensor | None = None,
                               out_dtype: torch.dtype = torch.float32,
                               block_bytes: int = _COL_BLOCK_BYTES) -> torch.Tensor:
    """Softmax probabilities from some of a call's queries to chosen keys, for one row, when the keys
    are not the call's own tokens in stream order (a KV cache: ring slots, earlier blocks).

    query: (Hq, T, D) the call's queries as the softmax uses them; query_rows (Q,): which of the T
    rows; query_index / query_positions (Q,): their stream indices and positions. key: (Hkv, S, D)
    the keys the queries attend, any slot order, with their metadata key_index (S,) (stream index,
    -1 for an empty slot), key_positions (S,), key_valid (S,) bool. columns: (P,) stream indices of
    the wanted keys (e.g. the row's image patches); a column whose stream index is not among the
    slots (evicted from a chunked layer's ring) gets probability 0, as does one the rule
    (:mod:`workbench.runtime.masks`) forbids. lse: (Hq, T) the rows' log-sum-exp over all allowed
    keys when the layer gave it; else it is computed here over the S slots under the rule, in
    blocks of about ``block_bytes``. Returns (H', Q, P) (H' = selected heads, 1 for "mean").
    """
    Hq, D = query.shape[0], query.shape[2]
    Hkv, S = key.shape[0], key.shape[1]
    if key.dim() != 3 or key.shape[2] != D or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"key must be (Hkv, S, D) with Hq a multiple of Hkv; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    head_idx, mean = resolve_heads(heads, Hq)
    G = Hq // Hkv
    dev = query.device
    Q, P = int(query_rows.shape[0]), int(columns.shape[0])
    if out is None:
        out = torch.empty((1 if mean else len(head_idx), Q, P), dtype=out_dtype, device=dev)
    if Q == 0 or P == 0:
        return out
    heads_t = torch.tensor(head_idx, device=dev)
    kv_t = heads_t // G
    chunk = 1 if chunk_size is None else int(chunk_size)
    has_chunk = chunk_size is not None
    rows = query_rows.to(dev, torch.long)
    q_idx, q_pos = query_index.to(dev, torch.long), query_positions.to(dev, torch.long)
    k_idx, k_pos = key_index.to(dev, torch.long), key_positions.to(dev, torch.long)
    k_val = key_valid.to(dev, torch.bool)
    cols = columns.to(dev, torch.long)
    # the slot of each wanted key: match stream indices (slot order is the cache's business)
    order = torch.argsort(k_idx)
    srt = k_idx[order]
    at = torch.searchsorted(srt, cols).clamp_(max=S - 1)
    found = srt[at] == cols
    slot = order[at]
    c_pos, c_val = k_pos[slot], k_val[slot] & found
    k_cols = key.index_select(1, slot).float()[kv_t]  # (Hs, P, D)
    k_aug_t = torch.cat([k_cols, k_cols.new_ones(k_cols.shape[:-1] + (1,))], -1).transpose(1, 2)  # (Hs, D+1, P)
    Hs = len(head_idx)
    step_q = max(1, int(block_bytes) // (4 * Hs * max(P, S if lse is None else 1)))
    for b0 in range(0, Q, step_q):
        b1 = min(Q, b0 + step_q)
        qb = query.index_select(1, rows[b0:b1]).float()[heads_t]  # (Hs, Qb, D)
        qi, qp = q_idx[b0:b1, None], q_pos[b0:b1, None]
        if lse is not None:
            lse_b = lse.index_select(1, rows[b0:b1]).float()[heads_t]  # (Hs, Qb)
        else:  # the rows' log-sum-exp over every allowed slot, in key blocks
            lse_b = None
            step_k = max(1, int(block_bytes) // (4 * Hs * (b1 - b0)))
            for k0 in range(0, S, step_k):
                k1 = min(S, k0 + step_k)
                ok = masks.allowed_rule(qi, qp, k_idx[None, k0:k1], k_pos[None, k0:k1], k_val[None, k0:k1],
                                        chunk, has_chunk)
                s = torch.bmm(qb, key[:, k0:k1].float()[kv_t].transpose(1, 2)).mul_(scale)
                s.masked_fill_(~ok[None], float("-inf"))
                part = torch.logsumexp(s, -1)
                lse_b = part if lse_b is None else torch.logaddexp(lse_b, part)
        ok = masks.allowed_rule(qi, qp, cols[None], c_pos[None], c_val[None], chunk, has_chunk) & found[None]
        s = torch.bmm(torch.cat([qb * scale, -lse_b[..., None]], -1), k_aug_t).exp_()  # (Hs, Qb, P)
        s.masked_fill_(~ok[None], 0.0)
        if mean:
            out[0, b0:b1] = s.mean(0)
        else:
            out[:, b0:b1] = s
    return out



# ---------------------------------------------------------------------------------------------
# Dense reference (tests only: materializes T x T in float64)
# ---------------------------------------------------------------------------------------------
def cross_attention_probs_reference(query, key, scale, *, query_index, key_index, positions=None, valid=None,
                                    chunk_size=None, heads="all") -> torch.Tensor:
    """Dense float64 softmax over the full (T, T) masked score matrix, then the selected entries."""
    Hq, T, D = query.shape
    G = Hq // key.shape[0]
    positions = torch.arange(T) if positions is None else positions.cpu()
    valid = torch.ones(T, dtype=torch.bool) if valid is None else valid.cpu().bool()
    q = query.detach().cpu().double()
    k = key.detach().cpu().double().repeat_interleave(G, dim=0)
    s = q @ k.transpose(1, 2) * scale
    idx = torch.arange(T)
    s = s.masked_fill(~masks.allowed(idx, idx, positions, valid, chunk_size)[None], float("-inf"))
    p = torch.softmax(s, -1)[:, query_index.cpu().long()][:, :, key_index.cpu().long()]
    head_idx, mean = resolve_heads(heads, Hq)
    p = p[head_idx]
    return p.mean(0, keepdim=True) if mean else p
