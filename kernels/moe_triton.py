"""Fused MoE expert kernels in Triton (the GPU path), modeled on vLLM's ``fused_moe``.

Pipeline for N = T*k (token, slot) assignments, all on the device and with fixed shapes (no
``.item()``/``.tolist()``/data-dependent sizes), so the whole call can be captured in a CUDA graph:

1. :func:`align_block_size` -- sort the assignments by expert and pad each expert's segment to a
   multiple of ``BLOCK_M``. Buffers have the worst-case padded size
   ``N + min(E, N) * (BLOCK_M - 1)``; the true padded length stays on the device
   (``num_tokens_post_padded``) and programs past it exit at once.
2. ``_gate_up_kernel`` -- grouped GEMM over the BLOCK_M tiles: each program reads its token rows
   of ``x`` through the sorted index (no permuted copy of x), optionally scales them by the router
   weight (``scale="input"``: rounded to x's dtype before the matmul, as transformers does),
   accumulates the gate tile AND the matching up tile (columns n and I+n) in fp32, and writes
   ``silu(gate) * up`` into the intermediate (N, I), row = rank of the assignment in sorted order.
3. ``_down_kernel`` -- grouped GEMM of the intermediate with ``down_proj[e]`` and the combine to
   token order fused in the store: for k == 1 each token has one row, stored directly into the
   (T, H) output (``scale="output"`` multiplies here); for k > 1 each (token, slot) row is stored
   in a float32 (T, k, H) buffer and summed over k afterwards (deterministic, fp32 accumulation).

Tile configurations come from JSON files in ``configs/`` (:func:`get_config`); a kernel section
with ``"TMA": true`` loads the weight tiles through a tensor descriptor (Hopper's copy engine) where
the weight is contiguous and K is a multiple of BLOCK_K, else through pointers. The launchers lower
``num_stages`` / ``BLOCK_K`` when a config would not fit the GPU's shared memory (e.g. bf16 tiles
used for float32). ``benchmarks/gpu_session.py`` sweeps and writes these files.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

__all__ = ["moe_experts_triton", "align_block_size", "launch_gate_up", "launch_down", "get_config", "config_file_name",
           "default_config", "device_name"]

CONFIG_DIR = Path(__file__).with_name("configs")
#: where scale="input" applies the router weight in the gate_up kernel (see moe_experts_triton)
DEFAULT_INPUT_SCALE = "operand"
_KERNEL_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


# --------------------------------------------------------------------------- configs

def device_name(device: torch.device | None = None) -> str:
    """Name used in config file names: CUDA device name with spaces -> '_', or 'cpu'."""
    if device is not None and torch.device(device).type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    idx = torch.device(device).index if device is not None else None
    return _cuda_name(torch.cuda.current_device() if idx is None else idx)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def config_file_name(E: int, H: int, I: int, dev_name: str, dtype: torch.dtype | str = "bf16") -> str:
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, dtype)
    return f"E={E},H={H},I={I},device_name={dev_name},dtype={dt}.json"


def _check_config(cfg: dict, where: str, quant: str | None = None) -> dict:
    """``cfg`` when it is a valid tile config, else ValueError naming ``where``. ``quant="w4a16"``
    also needs BLOCK_K >= 32 (each K tile is two dots over BLOCK_K/2 packed rows)."""
    if quant == "w4a16":
        for part in ("gate_up", "down"):
            bk = (cfg.get(part) or {}).get("BLOCK_K") if isinstance(cfg, dict) else None
            if isinstance(bk, int) and bk < 32:
                raise ValueError(f"{where}: '{part}.BLOCK_K' must be >= 32 for int4 weights (two dots over "
                                 f"BLOCK_K/2 packed rows), got {bk}")
    if not isinstance(cfg.get("BLOCK_M"), int) or cfg["BLOCK_M"] < 16 or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1):
        raise ValueError(f"{where}: BLOCK_M must be a power of two >= 16, got {cfg.get('BLOCK_M')!r}")
    for part in ("gate_up", "down"):
        sub = cfg.get(part)
        if not isinstance(sub, dict):
            raise ValueError(f"{where}: missing '{part}' section")
        for key in _KERNEL_KEYS:
            if not isinstance(sub.get(key), int) or sub[key] < 1:
                raise ValueError(f"{where}: '{part}.{key}' must be a positive int, got {sub.get(key)!r}")
        for key in ("BLOCK_N", "BLOCK_K"):
            if sub[key] < 16 or sub[key] & (sub[key] - 1):
                raise ValueError(f"{where}: '{part}.{key}' must be a power of two >= 16, got {sub[key]}")
    return cfg


@functools.lru_cache(maxsize=None)
def _load_default_file() -> dict:
    path = CONFIG_DIR / "default.json"
    with open(path) as f:
        data = json.load(f)
    gpu = {float(k): _check_config(v, f"{path} gpu bucket {k}") for k, v in data["gpu"].items()}
    return {"gpu": dict(sorted(gpu.items())),
            "interpreter": _check_config(data["interpreter"], f"{path} interpreter")}


@functools.lru_cache(maxsize=None)
def _load_default_quant_file() -> dict:
    path = CONFIG_DIR / "default_quant.json"
    with open(path) as f:
        data = json.load(f)
    out = {}
    for quant, d in data.items():
        if quant.startswith("_"):
            continue
        gpu = {float(k): _check_config(v, f"{path} {quant} gpu bucket {k}", quant) for k, v in d["gpu"].items()}
        out[quant] = {"gpu": dict(sorted(gpu.items())),
                      "interpreter": _check_config(d["interpreter"], f"{path} {quant} interpreter", quant)}
    return out


def default_config(T: int, k: int, E: int, H: int, I: int, dev_name: str = "cpu", quant: str | None = None) -> dict:
    """Config for shapes/GPUs without a tuned file, from ``configs/default.json``: the average
    number of assignments per expert (T*k/E) picks BLOCK_M and tiles; CPU (interpreter) gets
    the smallest tiles (fewest program instances). ``quant`` ("w8a16" / "w4a16"): the section of
    ``configs/default_quant.json`` for quantized expert weights."""
    d = _load_default_file() if quant is None else _load_default_quant_file()[quant]
    if dev_name == "cpu":
        return d["interpreter"]
    per_expert = T * k / max(E, 1)
    for bound, cfg in d["gpu"].items():
        if per_expert <= bound:
            return cfg
    return cfg


@functools.lru_cache(maxsize=None)
def _load_config_file(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    buckets = {}
    for key, cfg in data.items():
        if key.startswith("_"):  # comments / provenance
            continue
        try:
            t = int(key)
        except ValueError:
            raise ValueError(f"{path}: bucket keys must be token counts (ints), got {key!r}") from None
        buckets[t] = _check_config(cfg, f"{path} bucket {key}")
    if not buckets:
        raise ValueError(f"{path}: no token buckets")
    return buckets


@functools.lru_cache(maxsize=None)
def _buckets_for(E: int, H: int, I: int, dev_name: str, dtype) -> dict | None:
    path = CONFIG_DIR / config_file_name(E, H, I, dev_name, dtype)
    return _load_config_file(str(path)) if path.is_file() else None


def get_config(T: int, k: int, E: int, H: int, I: int, dtype: torch.dtype = torch.bfloat16,
               dev_name: str | None = None, quant: str | None = None) -> dict:
    """Tile config for T tokens: the bucket of the matching JSON file nearest to T (log scale),
    else :func:`default_config`. Files: ``configs/E=..,H=..,I=..,device_name=..,dtype=...json``
    mapping token-count buckets to ``{"BLOCK_M", "gate_up": {...}, "down": {...}}``.
    ``quant`` ("w8a16" / "w4a16", quantized expert weights): files named with
    ``dtype=w4a16-bf16`` (weight format - activation dtype), else ``configs/default_quant.json``.
    Returns a fresh dict (callers may modify it)."""
    if dev_name is None:
        dev_name = device_name()
    if quant is not None:
        short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        dtype = f"{quant}-{short.get(dtype, dtype)}"
    buckets = _buckets_for(E, H, I, dev_name, dtype)
    if buckets is not None:
        lt = math.log(max(T, 1))
        best = min(buckets, key=lambda b: (abs(math.log(max(b, 1)) - lt), b))
        return _check_config(copy.deepcopy(buckets[best]), f"config for {dtype}", quant)
    return copy.deepcopy(default_config(T, k, E, H, I, dev_name, quant))


# --------------------------------------------------------------------------- alignment

def max_padded_len(N: int, E: int, block_m: int) -> int:
    """Worst-case length of the padded sorted index: every non-empty expert wastes < BLOCK_M slots."""
    return N + min(E, N) * (block_m - 1)


def align_block_size(topk_ids: torch.Tensor, E: int, block_m: int):
    """Sort the (token, slot) assignments by expert and pad each expert to a multiple of block_m.

    Device-side, fixed shapes, no host synchronization. With N = topk_ids.numel() and
    P = max_padded_len(N, E, block_m), nb = ceil(P / block_m), returns

    * ``sorted_ids`` (P,) int32: flat assignment id t*k+j at its padded slot, N in padding slots;
    * ``block_expert`` (nb,) int32: expert of each block (clamped to E-1 past the end);
    * ``block_shift`` (nb,) int32: padded slot - sorted rank for the rows of each block;
    * ``num_tokens_post_padded`` (1,) int32: the true padded length (blocks at or past it are idle).
    """
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    N = flat.numel()
    P = max_padded_len(N, E, block_m)
    nb = triton.cdiv(P, block_m)
    # scatter_add instead of bincount: CUDA bincount syncs to size its output
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    padded = (counts + block_m - 1) // block_m * block_m
    pends = torch.cumsum(padded, 0)
    pstarts = pends - padded
    sorted_e, order = torch.sort(flat, stable=True)
    dest = pstarts[sorted_e] + torch.arange(N, device=dev) - starts[sorted_e]
    sorted_ids = torch.full((P,), N, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(nb, device=dev, dtype=torch.int64) * block_m
    be = torch.searchsorted(pends, block_start, right=True).clamp_(max=E - 1)
    block_shift = (pstarts - starts)[be]
    return sorted_ids, be.to(torch.int32), block_shift.to(torch.int32), pends[-1:].to(torch.int32)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M consecutive M-blocks share B tiles in L2 (M-blocks of one
    # expert are consecutive, so a group mostly reads one expert's weights)
    pid = tl.program_id(0)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _block_rows(pid_m, sorted_ids_ptr, block_expert_ptr, block_shift_ptr, N, BLOCK_M: tl.constexpr):
    """The rows of M-block pid_m: its expert (int64), the flat assignment id t*k+j of each row,
    which rows are real (padding slots hold N) and each row's rank in sorted order (int64)."""
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    aid = tl.load(sorted_ids_ptr + offs_slot)
    rank = (offs_slot - tl.load(block_shift_ptr + pid_m)).to(tl.int64)
    return e, aid, aid < N, rank


@triton.jit
def _int4_tile(packed, s_tile, LOW: tl.constexpr, UPCAST: tl.constexpr, DT: tl.constexpr):
    """Dequantize one nibble of a packed int4 tile: (nibble - 8) * scale in fp32, rounded to DT
    (the activations' dtype, as the torch path's dequantize(x.dtype)); back to fp32 under UPCAST."""
    if LOW:
        q = (packed & 0xF).to(tl.int32) - 8
    else:
        q = (packed >> 4).to(tl.int32) - 8
    w = (q.to(tl.float32) * s_tile).to(DT)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit(do_not_specialize=["N", "num_pid_m", "GROUP"])  # one compile per tile config, any T
def _gate_up_kernel(
    x_ptr, w_ptr, w_desc, inter_ptr, topk_w_ptr,
    sorted_ids_ptr, block_expert_ptr, block_shift_ptr, ntpp_ptr,
    N, H, I, num_pid_m, K_TOP,
    stride_xm, stride_xh, stride_we, stride_wh, stride_wn, stride_im, stride_in,
    s_ptr, stride_se, stride_sg, stride_sn, GROUP,
    SCALE_INPUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, QUANT: tl.constexpr,
):
    # TMA: weight tiles come through a tensor descriptor over gate_up_proj viewed as (E*H, 2I)
    # (the copy engine on Hopper; H % BLOCK_K == 0 so a tile never crosses into the next expert)
    # SCALE_INPUT: 0 none, 1 scale the A tile in the K loop (w*x rounded to x's dtype, exactly
    # transformers' numerics), 2 scale the fp32 accumulators in the epilogue ((w*x)@W = w*(x@W):
    # the same function without the bf16 rounding of w*x, and no per-tile work in the K loop)
    # QUANT: 0 float weights; 1 FP8 (W8A16): float8_e4m3fn tiles converted exactly to the
    # operand dtype, the per-output-channel scale applied to the fp32 accumulators after the K
    # loop; 2 int4 (W4A16): uint8 tiles of (BLOCK_K/2, BLOCK_N) bytes, low nibble = even k, high
    # nibble = odd k, each dequantized (q - 8) * scale[k // GROUP, n] in fp32 then rounded to the
    # operand dtype, and two dots per K tile (even and odd columns of x)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):  # past the padded length: nothing to do
        return
    e, aid, valid, rank = _block_rows(pid_m, sorted_ids_ptr, block_expert_ptr, block_shift_ptr, N, BLOCK_M)
    tok = (aid // K_TOP).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    if SCALE_INPUT != 0:
        # router weight rounded to x's dtype, as the model applies it
        rw = tl.load(topk_w_ptr + aid, mask=valid, other=0.0)
        rw = rw.to(x_ptr.dtype.element_ty).to(tl.float32)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANT == 2:
        offs_j = tl.arange(0, BLOCK_K // 2)  # packed rows: k = 2j (low nibble), 2j + 1 (high)
        a_ptrs = x_ptr + tok[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xh
        g_ptrs = w_ptr + e * stride_we + offs_j[:, None] * stride_wh + offs_n[None, :].to(tl.int64) * stride_wn
        u_ptrs = g_ptrs + I * stride_wn
        s_base = s_ptr + e * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
        for kk in range(0, tl.cdiv(H, BLOCK_K)):
            k_left = H - kk * BLOCK_K
            kmask = (2 * offs_j) < k_left
            amask = valid[:, None] & kmask[None, :]
            a0 = tl.load(a_ptrs, mask=amask, other=0.0)
            a1 = tl.load(a_ptrs + stride_xh, mask=amask, other=0.0)
            if SCALE_INPUT == 1:
                a0 = (a0.to(tl.float32) * rw[:, None]).to(x_ptr.dtype.element_ty)
                a1 = (a1.to(tl.float32) * rw[:, None]).to(x_ptr.dtype.element_ty)
            if UPCAST:
                a0 = a0.to(tl.float32)
                a1 = a1.to(tl.float32)
            bmask = kmask[:, None] & mask_n[None, :]
            grp = ((kk * BLOCK_K + 2 * offs_j) // GROUP).to(tl.int64)
            sg = tl.load(s_base + grp[:, None] * stride_sg, mask=bmask, other=0.0).to(tl.float32)
            su = tl.load(s_base + I * stride_sn + grp[:, None] * stride_sg, mask=bmask, other=0.0).to(tl.float32)
            pg = tl.load(g_ptrs, mask=bmask, other=0)
            pu = tl.load(u_ptrs, mask=bmask, other=0)
            DT = x_ptr.dtype.element_ty
            acc_g = tl.dot(a0, _int4_tile(pg, sg, True, UPCAST, DT), acc_g, input_precision=PRECISION)
            acc_g = tl.dot(a1, _int4_tile(pg, sg, False, UPCAST, DT), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a0, _int4_tile(pu, su, True, UPCAST, DT), acc_u, input_precision=PRECISION)
            acc_u = tl.dot(a1, _int4_tile(pu, su, False, UPCAST, DT), acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xh
            g_ptrs += (BLOCK_K // 2) * stride_wh
            u_ptrs += (BLOCK_K // 2) * stride_wh
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xh
        g_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wh + offs_n[None, :].to(tl.int64) * stride_wn
        u_ptrs = g_ptrs + I * stride_wn
        for kk in range(0, tl.cdiv(H, BLOCK_K)):
            k_left = H - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
            if SCALE_INPUT == 1:
                a = (a.to(tl.float32) * rw[:, None]).to(x_ptr.dtype.element_ty)
            if TMA:
                k_row = (e * H + kk * BLOCK_K).to(tl.int32)
                bg = w_desc.load([k_row, pid_n * BLOCK_N])
                bu = w_desc.load([k_row, I + pid_n * BLOCK_N])  # columns past 2I read as zeros
            else:
                bmask = (offs_k[:, None] < k_left) & mask_n[None, :]
                bg = tl.load(g_ptrs, mask=bmask, other=0.0)
                bu = tl.load(u_ptrs, mask=bmask, other=0.0)
            if QUANT == 1:  # fp8 values are exact in bf16 / fp16 / fp32
                bg = bg.to(x_ptr.dtype.element_ty)
                bu = bu.to(x_ptr.dtype.element_ty)
            if UPCAST:
                a = a.to(tl.float32)
                bg = bg.to(tl.float32)
                bu = bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xh
            g_ptrs += BLOCK_K * stride_wh
            u_ptrs += BLOCK_K * stride_wh
        if QUANT == 1:
            s_row = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
            acc_g = acc_g * tl.load(s_row, mask=mask_n, other=0.0)[None, :]
            acc_u = acc_u * tl.load(s_row + I * stride_sn, mask=mask_n, other=0.0)[None, :]

    if SCALE_INPUT == 2:
        acc_g = acc_g * rw[:, None]
        acc_u = acc_u * rw[:, None]
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    i_ptrs = inter_ptr + rank[:, None] * stride_im + offs_n[None, :] * stride_in
    tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["N", "num_pid_m", "GROUP"])
def _down_kernel(
    inter_ptr, w_ptr, w_desc, c_ptr, topk_w_ptr,
    sorted_ids_ptr, block_expert_ptr, block_shift_ptr, ntpp_ptr,
    N, I, H, num_pid_m,
    stride_im, stride_in, stride_we, stride_wi, stride_wh, stride_cm, stride_ch,
    s_ptr, stride_se, stride_sg, stride_sn, GROUP,
    SCALE_OUTPUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, QUANT: tl.constexpr,
):
    # QUANT: as in _gate_up_kernel (the reduction dim is I here)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    e, aid, valid, rank = _block_rows(pid_m, sorted_ids_ptr, block_expert_ptr, block_shift_ptr, N, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANT == 2:
        offs_j = tl.arange(0, BLOCK_K // 2)
        a_ptrs = inter_ptr + rank[:, None] * stride_im + (2 * offs_j)[None, :] * stride_in
        b_ptrs = w_ptr + e * stride_we + offs_j[:, None] * stride_wi + offs_n[None, :].to(tl.int64) * stride_wh
        s_base = s_ptr + e * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
        for kk in range(0, tl.cdiv(I, BLOCK_K)):
            k_left = I - kk * BLOCK_K
            kmask = (2 * offs_j) < k_left
            amask = valid[:, None] & kmask[None, :]
            a0 = tl.load(a_ptrs, mask=amask, other=0.0)
            a1 = tl.load(a_ptrs + stride_in, mask=amask, other=0.0)
            if UPCAST:
                a0 = a0.to(tl.float32)
                a1 = a1.to(tl.float32)
            bmask = kmask[:, None] & mask_n[None, :]
            grp = ((kk * BLOCK_K + 2 * offs_j) // GROUP).to(tl.int64)
            sb = tl.load(s_base + grp[:, None] * stride_sg, mask=bmask, other=0.0).to(tl.float32)
            pb = tl.load(b_ptrs, mask=bmask, other=0)
            DT = inter_ptr.dtype.element_ty
            acc = tl.dot(a0, _int4_tile(pb, sb, True, UPCAST, DT), acc, input_precision=PRECISION)
            acc = tl.dot(a1, _int4_tile(pb, sb, False, UPCAST, DT), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_in
            b_ptrs += (BLOCK_K // 2) * stride_wi
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = inter_ptr + rank[:, None] * stride_im + offs_k[None, :] * stride_in
        b_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wi + offs_n[None, :].to(tl.int64) * stride_wh
        for kk in range(0, tl.cdiv(I, BLOCK_K)):
            k_left = I - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
            if TMA:  # down_proj viewed as (E*I, H); I % BLOCK_K == 0
                b = w_desc.load([(e * I + kk * BLOCK_K).to(tl.int32), pid_n * BLOCK_N])
            else:
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            if QUANT == 1:
                b = b.to(inter_ptr.dtype.element_ty)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_in
            b_ptrs += BLOCK_K * stride_wi
        if QUANT == 1:
            acc = acc * tl.load(s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn, mask=mask_n,
                                other=0.0)[None, :]

    if SCALE_OUTPUT:
        rw = tl.load(topk_w_ptr + aid, mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
    # combine fused into the store: row = flat assignment id (= token for k == 1)
    c_ptrs = c_ptr + aid.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_ch
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- entry point

def _precision(dtype: torch.dtype, upcast: bool) -> str | None:
    """tl.dot input precision: fp32 follows torch's matmul setting (TF32 off by default ->
    "ieee"); None (the backend default) for fp16/bf16 operands, where it does not apply."""
    if dtype == torch.float32 or upcast:
        return "tf32" if (torch.backends.cuda.matmul.allow_tf32 and not upcast) else "ieee"
    return None


def _shared_memory_limit(device) -> int:
    if device.type != "cuda":
        return 1 << 30  # interpreter: no limit
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _weight_descriptor(w: torch.Tensor, cfg: dict):
    """Tensor descriptor over a contiguous (E, K, N) weight viewed as (E*K, N) with
    (BLOCK_K, BLOCK_N) tiles, or None where the pointer path must be used: non-contiguous weights,
    K % BLOCK_K != 0 (a tile would cross into the next expert), unaligned rows, or no descriptor
    support in this triton."""
    E, K, N = w.shape
    if not w.is_contiguous() or K % cfg["BLOCK_K"] or (N * w.element_size()) % 16 or w.data_ptr() % 16:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor.from_tensor(w.view(E * K, N), [cfg["BLOCK_K"], cfg["BLOCK_N"]])


def fit_shared_memory(cfg: dict, block_m: int, itemsize: int, n_b: int, limit: int) -> dict:
    """``cfg`` with num_stages, then BLOCK_K, then BLOCK_N lowered until the pipelined tiles
    (stages x (A tile + n_b B tiles)) fit in ``limit`` bytes of shared memory: tuned bf16 tiles
    reused for float32, or a config from another GPU, run instead of failing to launch."""
    c = dict(cfg)

    def need(c):
        return c["num_stages"] * (block_m * c["BLOCK_K"] + n_b * c["BLOCK_K"] * c["BLOCK_N"]) * itemsize

    while need(c) > limit:
        if c["num_stages"] > 2:
            c["num_stages"] -= 1
        elif c["BLOCK_K"] > 16:
            c["BLOCK_K"] //= 2
        elif c["BLOCK_N"] > 16:
            c["BLOCK_N"] //= 2
        else:
            break
    return c


def _quant_args(w):
    """(weight data, kernel args for the scale: ptr, strides (e, group, n), group size, QUANT) for a
    float weight or a workbench.quant weight ("kn" layout: scale broadcast shape (E, 1 or G, N))."""
    if isinstance(w, torch.Tensor):
        return w, (w, 0, 0, 0, 1), 0
    s = w.scale
    if w.kind == "fp8":
        return w.data, (s, s.stride(0), s.stride(1), s.stride(2), 1), 1
    if w.kind == "int4":
        return w.data, (s, s.stride(0), s.stride(1), s.stride(2), w.group_size), 2
    raise ValueError(f"unsupported quantized weight kind {w.kind!r}")


def launch_gate_up(x, gate_up_proj, inter, tw, alignment, k, block_m, cfg, scale_mode=2,
                   upcast=False, precision=None):
    """Launch the gate_up kernel: inter[rank] = silu(g) * u for every assignment (see module doc).

    x (T, H); gate_up_proj (E, H, 2I), or a workbench.quant Fp8Weight / Int4Weight of that logical
    shape (dequantized in the kernel; no TMA); inter (T*k, I) written in sorted-rank order; tw
    (T*k,) router weights; alignment = :func:`align_block_size`'s result for ``block_m``; cfg = the
    config's ``gate_up`` section; scale_mode 0 none / 1 operand / 2 epilogue."""
    sorted_ids, block_expert, block_shift, ntpp = alignment
    num_pid_m = block_expert.numel()
    I = inter.shape[1]
    w, sargs, quant = _quant_args(gate_up_proj)
    cfg = fit_shared_memory(cfg, block_m, x.element_size(), 2, _shared_memory_limit(x.device))
    desc = _weight_descriptor(w, cfg) if cfg.get("TMA") and not quant else None
    grid = (num_pid_m * triton.cdiv(I, cfg["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x, w, desc, inter, tw, sorted_ids, block_expert, block_shift, ntpp,
        inter.shape[0], x.shape[1], I, num_pid_m, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        inter.stride(0), inter.stride(1), *sargs,
        SCALE_INPUT=scale_mode, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        TMA=desc is not None, QUANT=quant, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def launch_down(inter, down_proj, c, tw, alignment, block_m, cfg, scale_output=False, upcast=False,
                precision=None):
    """Launch the down kernel: c[assignment] = inter[rank] @ down_proj[e] (times w if scale_output).

    inter (N, I) in sorted-rank order; down_proj (E, I, H) or a quantized weight of that logical
    shape; c (N, H): the output for k == 1, a float32 per-slot buffer otherwise; cfg = the
    config's ``down`` section."""
    sorted_ids, block_expert, block_shift, ntpp = alignment
    num_pid_m = block_expert.numel()
    H = c.shape[1]
    w, sargs, quant = _quant_args(down_proj)
    cfg = fit_shared_memory(cfg, block_m, inter.element_size(), 1, _shared_memory_limit(inter.device))
    desc = _weight_descriptor(w, cfg) if cfg.get("TMA") and not quant else None
    grid = (num_pid_m * triton.cdiv(H, cfg["BLOCK_N"]),)
    _down_kernel[grid](
        inter, w, desc, c, tw, sorted_ids, block_expert, block_shift, ntpp,
        inter.shape[0], inter.shape[1], H, num_pid_m,
        inter.stride(0), inter.stride(1), w.stride(0), w.stride(1), w.stride(2),
        c.stride(0), c.stride(1), *sargs,
        SCALE_OUTPUT=scale_output, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        TMA=desc is not None, QUANT=quant, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def quant_name(gate_up_proj, down_proj) -> str | None:
    """Config family of the expert weights: None (float), "w8a16" (FP8) or "w4a16" (int4); mixed
    kinds use the int4 tiles (BLOCK_K >= 32 suits both)."""
    kinds = {getattr(w, "kind", None) for w in (gate_up_proj, down_proj)} - {None}
    if not kinds:
        return None
    return "w4a16" if "int4" in kinds else "w8a16"


def moe_experts_triton(x, topk_ids, topk_weights, gate_up_proj, down_proj, *, scale: str = "input",
                       out: torch.Tensor | None = None, config: dict | None = None,
                       upcast_bf16: bool | None = None, input_scale: str | None = None) -> torch.Tensor:
    """Triton implementation of :func:`workbench.kernels.moe_experts` (inputs already validated).

    ``config``: a tile config dict (see :func:`get_config`); default: looked up from ``configs/``
    (quantized weights: the ``w8a16`` / ``w4a16`` files and ``default_quant.json``).
    ``upcast_bf16``: convert tiles to fp32 before ``tl.dot`` (default: on under TRITON_INTERPRET,
    where bf16 ``tl.dot`` is wrong; the interpreter upcasts fp16 too, harmlessly).
    ``input_scale`` (scale="input" only): ``"operand"`` scales each x tile by the router weight
    inside the K loop, rounding w*x to x's dtype exactly as transformers does; ``"epilogue"``
    scales the fp32 gate/up accumulators instead (the same function, since (w*x) @ W = w*(x @ W),
    without that rounding step). Default: :data:`DEFAULT_INPUT_SCALE`.

    Quantized expert weights (workbench.quant ``Fp8Weight`` / ``Int4Weight``, "kn" layout) are
    dequantized inside the grouped GEMMs: W8A16 (fp8 tiles converted exactly to x's dtype, the
    per-channel scale applied to the fp32 accumulator) and W4A16 (nibbles unpacked and scaled per
    group in fp32, rounded to x's dtype), fp32 accumulation, no host synchronization.
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    E, _, I2 = gate_up_proj.shape
    I = I2 // 2
    N = T * k
    dtype = x.dtype
    if out is None:
        out = x.new_empty(T, H)
    if T == 0:
        return out
    quant = quant_name(gate_up_proj, down_proj)
    if config is None:
        config = get_config(T, k, E, H, I, dtype, device_name(x.device), quant=quant)
    else:
        _check_config(config, "config", quant)
    if upcast_bf16 is None:
        upcast_bf16 = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16
    precision = _precision(dtype, upcast_bf16)
    if input_scale is None:
        input_scale = DEFAULT_INPUT_SCALE
    if input_scale not in ("operand", "epilogue"):
        raise ValueError(f"input_scale must be 'operand' or 'epilogue', got {input_scale!r}")
    scale_mode = 0 if scale != "input" else (1 if input_scale == "operand" else 2)
    bm = config["BLOCK_M"]
    gu, dn = config["gate_up"], config["down"]

    alignment = align_block_size(topk_ids, E, bm)
    tw = topk_weights.reshape(-1)
    if not tw.is_contiguous():
        tw = tw.contiguous()

    inter = torch.empty(N, I, dtype=dtype, device=x.device)
    launch_gate_up(x, gate_up_proj, inter, tw, alignment, k, bm, gu, scale_mode, upcast_bf16, precision)
    c = out if k == 1 else torch.empty(T, k, H, dtype=torch.float32, device=x.device)
    c2 = c.view(N, H) if k > 1 else c
    launch_down(inter, down_proj, c2, tw, alignment, bm, dn, scale == "output", upcast_bf16, precision)
    if k > 1:
        out.copy_(c.sum(dim=1))  # fp32 sum over the k slots, one rounding to x's dtype
    return out
