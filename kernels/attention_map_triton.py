"""Triton backend of :func:`workbench.kernels.attention_map.cross_attention_probs` (the GPU path).

Two kernels, both asynchronous and free of host synchronization (sizes come from tensor shapes,
masks and key ranges are computed on the device from positions, validity and chunk size). The
mask is :func:`workbench.runtime.masks.allowed_rule`, the model's own rule function compiled with
``triton.jit``.

``_lse_kernel``  grid (cdiv(Q, BLOCK_M), H_sel): one program owns BLOCK_M selected query rows of
    one query head. It loops over key blocks ``[0, max query index]`` (causality bounds the
    loop); for each block it loads the keys' positions and validity, computes the mask (the
    rule) and skips the block when no (query, key) pair is allowed (on chunked layers that
    skips every block outside the queries' chunks, so the work is O(Q * chunk) dot products
    plus O(Q * T / BLOCK_N) position loads); otherwise ``s = q . k^T * scale``, masked to -inf,
    and the online-softmax update of the running max ``m`` and sum ``l``. Writes ``lse = m + log l`` (H_sel, Q) float32.
``_probs_kernel`` grid (cdiv(Q, BLOCK_M), cdiv(P, BLOCK_P), H_out): gathers the BLOCK_P selected
    key rows (``key_index``), ``p = exp(q . k^T * scale - lse)``, 0 where masked, and stores
    them cast to the output dtype. With ``MEAN`` one program loops over all selected heads and
    stores the mean (one output head).

GQA: query head h reads key head ``h // G``. Dots accumulate in float32; float32 inputs use
``input_precision="ieee"`` (no TF32 rounding of the scores); bf16/fp16 inputs use the native
tensor-core dot. ``upcast=True`` converts bf16/fp16 tiles to float32 before the dot (used under
``TRITON_INTERPRET=1``, whose bf16 ``tl.dot`` is wrong). Head dim is padded to a power of two
>= 16 with masked loads.
"""
from __future__ import annotations

import os
import types

import torch
import triton
import triton.language as tl

from workbench.runtime import masks

__all__ = ["cross_attention_probs_triton"]


def _jit(fn, **calls):
    """``triton.jit`` of a rule function of workbench.runtime.masks: its globals gain triton.language
    (the interpreter, TRITON_INTERPRET=1, looks for it there) and the compiled rules it calls."""
    return triton.jit(types.FunctionType(fn.__code__, {**fn.__globals__, "tl": tl, **calls}, fn.__name__))


# The model's attention rule (workbench.runtime.masks), compiled from the same Python functions.
_allowed = _jit(masks.allowed_rule, visible_rule=_jit(masks.visible_rule),
                same_chunk_rule=_jit(masks.same_chunk_rule))


@triton.jit
def _mask(qi, qpos, q_ok, kj, kpos, kval, k_ok, chunk, HAS_CHUNK: tl.constexpr):
    allowed = _allowed(qi[:, None], qpos[:, None], kj[None, :], kpos[None, :], kval[None, :] != 0, chunk, HAS_CHUNK)
    return allowed & q_ok[:, None] & k_ok[None, :]


@triton.jit
def _dot(q, k, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _lse_kernel(Q_ptr, K_ptr, QIDX, POS, VALID, HEADS, LSE,
                s_qh, s_qt, s_qd, s_kh, s_kt, s_kd,
                n_q, T, D, G, scale, chunk,
                HAS_CHUNK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    o = tl.program_id(1)
    h = tl.load(HEADS + o).to(tl.int64)
    kvh = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < n_q
    qi = tl.load(QIDX + offs_m, mask=q_ok, other=0)
    qpos = tl.load(POS + qi, mask=q_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q_ptr + h * s_qh + qi.to(tl.int64)[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    hi = tl.max(tl.where(q_ok, qi, 0), axis=0) + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        k_ok = kj < T
        kpos = tl.load(POS + kj, mask=k_ok, other=0)
        kval = tl.load(VALID + kj, mask=k_ok, other=0)
        allowed = _mask(qi, qpos, q_ok, kj, kpos, kval, k_ok, chunk, HAS_CHUNK)
        if tl.max(tl.max(allowed.to(tl.int32), axis=1), axis=0) > 0:
            k = tl.load(K_ptr + kvh * s_kh + kj.to(tl.int64)[:, None] * s_kt + offs_d[None, :] * s_kd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = _dot(q, k, IEEE) * scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(p, axis=1)
            m_i = m_new
    lse = m_i + tl.log(tl.where(l_i > 0, l_i, 1.0))  # rows past n_q: never stored
    tl.store(LSE + o * n_q + offs_m, lse, mask=q_ok)


@triton.jit
def _probs_kernel(Q_ptr, K_ptr, QIDX, KIDX, POS, VALID, HEADS, LSE, OUT,
                  s_qh, s_qt, s_qd, s_kh, s_kt, s_kd, s_oh, s_oq, s_op,
                  n_q, n_p, n_heads, T, D, G, scale, chunk,
                  HAS_CHUNK: tl.constexpr, MEAN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    o = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < n_q
    qi = tl.load(QIDX + offs_m, mask=q_ok, other=0)
    qpos = tl.load(POS + qi, mask=q_ok, other=0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < n_p
    kj = tl.load(KIDX + offs_p, mask=p_ok, other=0)
    kpos = tl.load(POS + kj, mask=p_ok, other=0)
    kval = tl.load(VALID + kj, mask=p_ok, other=0)
    allowed = _mask(qi, qpos, q_ok, kj, kpos, kval, p_ok, chunk, HAS_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    if MEAN:
        o_lo = 0
        o_hi = n_heads
    else:
        o_lo = o
        o_hi = o + 1
    for oo in range(o_lo, o_hi):
        h = tl.load(HEADS + oo).to(tl.int64)
        kvh = h // G
        q = tl.load(Q_ptr + h * s_qh + qi.to(tl.int64)[:, None] * s_qt + offs_d[None, :] * s_qd,
                    mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K_ptr + kvh * s_kh + kj.to(tl.int64)[:, None] * s_kt + offs_d[None, :] * s_kd,
                    mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        lse = tl.load(LSE + oo * n_q + offs_m, mask=q_ok, other=0.0)
        s = _dot(q, k, IEEE) * scale
        acc += tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
    if MEAN:
        acc = acc / n_heads
    # 64-bit: an all-heads output passes 2^31 elements (40 heads x 30k queries x 2448 patches)
    tl.store(OUT + o.to(tl.int64) * s_oh + offs_m.to(tl.int64)[:, None] * s_oq + offs_p[None, :] * s_op,
             acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & p_ok[None, :])


_HEADS_CACHE: dict = {}


def _heads_tensor(head_idx, dev) -> torch.Tensor:
    """Device int32 tensor of the selected heads, cached: a fresh host->device copy from pageable
    memory would synchronize the stream at every call."""
    key = (tuple(head_idx), str(dev))
    t = _HEADS_CACHE.get(key)
    if t is None:
        t = _HEADS_CACHE[key] = torch.tensor(head_idx, dtype=torch.int32, device=dev)
    return t


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cross_attention_probs_triton(query, key, scale, positions, valid, chunk_size, query_index, key_index,
                                 head_idx, mean, *, out=None, out_dtype=torch.float32, BLOCK_M: int | None = None,
                                 BLOCK_N: int | None = None, BLOCK_P: int | None = None,
                                 upcast: bool | None = None, num_warps: int = 4) -> torch.Tensor:
    """Triton backend (arguments already validated by ``cross_attention_probs``)."""
    Hq, T, D = query.shape
    G = Hq // key.shape[0]
    Q, P = query_index.shape[0], key_index.shape[0]
    dev = query.device
    Hs = len(head_idx)
    if out is None:
        out = torch.empty((1 if mean else Hs, Q, P), dtype=out_dtype, device=dev)
    if Q == 0 or P == 0:
        return out
    if query.dtype == torch.float64:
        raise ValueError("backend='triton' takes float32/float16/bfloat16 query/key, got float64")
    interp = _interpreting()
    if upcast is None:
        upcast = interp and query.dtype != torch.float32
    ieee = query.dtype == torch.float32 or bool(upcast)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if BLOCK_M is None:
        BLOCK_M = 16 if interp else 64
    # H100, 32k tokens x 2448 patches, 40/8 heads x 128 (RESULTS.md): N=P=128 beat 64 by 1.16-1.24x
    if BLOCK_N is None:
        BLOCK_N = 16 if interp else 128
    if BLOCK_P is None:
        BLOCK_P = 16 if interp else 128
    heads_t = _heads_tensor(head_idx, dev)
    qidx = query_index.to(device=dev, dtype=torch.int32).contiguous()
    kidx = key_index.to(device=dev, dtype=torch.int32).contiguous()
    pos = positions.to(device=dev, dtype=torch.int32).contiguous()
    val = valid.to(device=dev, dtype=torch.int8).contiguous()
    lse = torch.empty((Hs, Q), dtype=torch.float32, device=dev)
    has_chunk = chunk_size is not None
    chunk = int(chunk_size) if has_chunk else 1
    _lse_kernel[(triton.cdiv(Q, BLOCK_M), Hs)](
        query, key, qidx, pos, val, heads_t, lse,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        Q, T, D, G, scale, chunk,
        HAS_CHUNK=has_chunk, UPCAST=bool(upcast), IEEE=ieee,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps)
    n_out = 1 if mean else Hs
    _probs_kernel[(triton.cdiv(Q, BLOCK_M), triton.cdiv(P, BLOCK_P), n_out)](
        query, key, qidx, kidx, pos, val, heads_t, lse, out,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Q, P, Hs, T, D, G, scale, chunk,
        HAS_CHUNK=has_chunk, MEAN=bool(mean), UPCAST=bool(upcast), IEEE=ieee,
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return out
