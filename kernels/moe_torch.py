"""Routed-expert computation in plain PyTorch (the CPU path, and the fallback everywhere).

Sorted dispatch: the T*k (token, slot) assignments are flattened, stably sorted by expert,
counted per expert (bincount -> offsets), the token rows are gathered in that order, each
expert's contiguous segment goes through its SwiGLU, and the results are added back to
token order. Only the assigned (token, expert) pairs are computed.

Two ways to run the per-expert matmuls on the sorted rows:

* ``"loop"``    -- a Python loop over the non-empty experts (one gate_up matmul, SiLU*up and
  one down matmul per segment; the segment stays hot in cache between the two matmuls).
* ``"grouped"`` -- ``torch._grouped_mm`` with int32 cumulative offsets (two calls in total).
  It needs 16-byte aligned strides; when the shapes/strides do not allow it the loop is used.
* ``"gather"``  -- no sort: each assignment's expert weights are gathered (``index_select``) and
  each projection is one batched matmul over the assignments (a copy of every assigned expert's
  weights per assignment, so only for a few assignments: decode steps).

Quantized weights (``workbench.quant`` Fp8Weight / Int4Weight) always take the loop, each expert
dequantized to x's dtype right before its matmuls (one expert's float weights at a time).

The default on CPU (``method=None``) is chosen from ``benchmarks/moe_cpu.py`` measurements, see
``benchmarks/RESULTS.md`` and ``_default_method``; a few assignments (decode steps) take the
host rule of ``_host_method`` (``"gather"`` for up to ``GATHER_MAX`` on several experts).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["moe_experts_torch", "moe_expert_outputs_torch", "sort_assignments", "grouped_mm_supported"]

# Chosen from benchmarks/moe_cpu.py on the project's 2-core CPU machine, torch 2.13, 2026-11-26
# (benchmarks/RESULTS.md): loop/grouped time ratios 0.85-1.28 (single-thread CPU time, fp32 and
# bf16), grouped as fast or faster in 10 of 14 cases and 1.25x faster with E=128 and few tokens per
# expert; the loop was ahead only on one-token decode (fp32) and a skewed bf16 case (0.85x).
_CPU_DEFAULT_METHOD = "grouped"


def sort_assignments(topk_ids: torch.Tensor, num_experts: int):
    """Stable sort of the flattened (token, slot) assignments by expert.

    Returns ``(order, token_of_sorted, counts)``: ``order`` (T*k,) int64 indexes the flattened
    ``topk_ids`` so that ``topk_ids.view(-1)[order]`` is non-decreasing; ``token_of_sorted`` =
    ``order // k`` is the token row of each sorted assignment; ``counts`` (E,) int64 is the
    number of assignments per expert.
    """
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, torch.div(order, k, rounding_mode="floor"), counts


def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    if t.data_ptr() % 16:
        return False
    if t.dim() >= 2 and not (t.stride(-1) == 1 or t.stride(-2) == 1):
        return False
    return all((s * es) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


def grouped_mm_supported(x_sorted: torch.Tensor, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can take these operands (16-byte aligned strides, I*es too)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    I = down_proj.shape[1]
    if (I * x_sorted.element_size()) % 16:
        return False
    if x_sorted.device.type == "cuda" and x_sorted.dtype != torch.bfloat16:
        return False  # the CUDA implementation is bf16-only (sm90+)
    return all(_aligned(t) for t in (x_sorted, gate_up_proj, down_proj))


def _expert_weight(w, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's (K, N) weight; a quantized one (workbench.quant) is dequantized to ``dtype`` here,
    one expert at a time (the reference for the fused Triton dequantization)."""
    we = w[e]
    return we if isinstance(we, torch.Tensor) else we.dequantize(dtype)


def _experts_loop(xs, counts_list, gate_up_proj, down_proj):
    N, H = xs.shape
    I = down_proj.shape[1]

    def swiglu(z, e):
        h = z @ _expert_weight(gate_up_proj, e, xs.dtype)
        return (F.silu(h[:, :I]) * h[:, I:]) @ _expert_weight(down_proj, e, xs.dtype)

    if N and max(counts_list) == N:  # one expert takes every row (a batch-1 decode step)
        return swiglu(xs, counts_list.index(N))
    ys = xs.new_empty(N, H)
    s = 0
    for e, c in enumerate(counts_list):
        if c == 0:
            continue
        ys[s:s + c] = swiglu(xs[s:s + c], e)
        s += c
    return ys


def _plain(gate_up_proj, down_proj) -> bool:
    """Float weight tensors (not workbench.quant weights, which take the loop)."""
    return isinstance(gate_up_proj, torch.Tensor) and isinstance(down_proj, torch.Tensor)


def _experts_grouped(xs, offs, gate_up_proj, down_proj):
    """offs: (E,) int32 cumulative row counts of the experts' segments of xs."""
    I = down_proj.shape[1]
    h = torch._grouped_mm(xs, gate_up_proj, offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]  # contiguous (N, I)
    return torch._grouped_mm(a, down_proj, offs=offs)


def _experts_gathered(xs, experts, gate_up_proj, down_proj):
    """xs (N, H) rows, experts (N,) int64: row n through SwiGLU of expert ``experts[n]``, (N, H).

    Each row's expert weights are gathered, so each projection is one ``bmm`` of N single-row
    products: no sort, no per-expert ops. It copies N x (H x 3I) weights: for a few rows only.
    """
    I = down_proj.shape[1]
    h = torch.bmm(xs[:, None], gate_up_proj.index_select(0, experts))
    a = F.silu(h[..., :I]) * h[..., I:]
    return torch.bmm(a, down_proj.index_select(0, experts))[:, 0]


def _default_method(device: torch.device, n_assignments: int | None = None, n_experts: int | None = None) -> str:
    if device.type == "cpu":
        # Fewer assignments than experts (decode steps): torch._grouped_mm on CPU runs one matmul
        # and one host read per expert and projection, empty experts included (32 per layer for 16
        # experts; benchmarks/RESULTS.md, "Decode"), while the loop skips empty experts.
        if n_assignments is not None and n_experts is not None and n_assignments < n_experts:
            return "loop"
        return _CPU_DEFAULT_METHOD
    return "grouped"  # on GPUs a single grouped call avoids E small launches + the host sync


# Up to this many assignments (decode steps) on CPU, they are sorted on the host: one read of the
# ids (the loop reads the counts anyway) instead of the device argsort, bincount and division, and a
# single assignment skips the gather and scatter. The default method is then chosen from the number
# of experts used: the loop up to HOST_LOOP_MAX_EXPERTS (a handful of ops per expert), else
# torch._grouped_mm (fixed cost, then cheap per expert). Measured on decode steps of the embedded
# model (benchmarks/RESULTS.md, "Decode step"); both give the same result bit for bit.
HOST_SORT_MAX = 64
HOST_LOOP_MAX_EXPERTS = 3
# Up to this many assignments on CPU, spread over more than one expert, the default is "gather":
# one bmm per projection over the assignments' gathered weights beats both the loop and
# torch._grouped_mm there (benchmarks/RESULTS.md, "Gathered experts"); a single expert keeps the
# loop (one matmul on a view of its weights, nothing copied).
GATHER_MAX = 16


def _on_host(x, topk_ids, gate_up_proj, method) -> bool:
    """Whether the assignments are sorted on the host (few of them, on CPU)."""
    return x.device.type == "cpu" and topk_ids.numel() <= HOST_SORT_MAX and method in (None, "loop", "grouped",
                                                                                         "gather")


def _host_method(n_assignments: int, used: int) -> str:
    """The CPU default for assignments sorted on the host, from how many there are and how many
    experts they use (HOST_LOOP_MAX_EXPERTS, GATHER_MAX)."""
    if 1 < used and n_assignments <= GATHER_MAX:
        return "gather"
    return "loop" if used <= HOST_LOOP_MAX_EXPERTS else "grouped"


def _gathers_unsorted(x, topk_ids, gate_up_proj, down_proj, method) -> bool:
    """Whether top-1 rows go through "gather" in token order, with no sort at all: asked for, or
    the CPU default (:func:`_host_method`); float weights only (quantized ones take the loop).
    With k > 1 the assignments are sorted first, so that each token's slots are summed in the
    same order as on the other paths."""
    if topk_ids.shape[1] != 1 or not _plain(gate_up_proj, down_proj) or method not in (None, "gather"):
        return False
    if method == "gather":
        return True
    n = topk_ids.numel()
    if x.device.type != "cpu" or not 1 < n <= GATHER_MAX:
        return False
    return _host_method(n, len(set(topk_ids.reshape(-1).tolist()))) == "gather"  # the host read a sort makes anyway


def _sort_on_host(topk_ids: torch.Tensor, num_experts: int):
    """:func:`sort_assignments` on the host: ``(order, token_of_sorted, counts)`` with the same
    stable order, ``counts`` a list; ``order`` and ``token_of_sorted`` are None for a single
    assignment (batch-1 decode with k = 1: nothing to gather or scatter)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).tolist()
    counts = [0] * num_experts
    for e in flat:
        counts[e] += 1
    if len(flat) == 1:
        return None, None, counts
    order = sorted(range(len(flat)), key=flat.__getitem__)  # stable, as the device sort
    dev = topk_ids.device
    order_t = torch.tensor(order, device=dev)
    return order_t, order_t if k == 1 else torch.tensor([f // k for f in order], device=dev), counts


def _host_offsets(counts: list[int], device) -> torch.Tensor:
    """torch._grouped_mm's offsets (E,) int32 (cumulative row counts) from host counts."""
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _unsorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale):
    """Top-1 rows through "gather" in token order: (w, ys), w (T,) the weights, ys (T, H) the
    expert outputs (input-scaled when ``scale == "input"``, not yet output-scaled)."""
    w = topk_weights.reshape(-1)
    xs = x * w.to(x.dtype)[:, None] if scale == "input" else x
    return w, _experts_gathered(xs, topk_ids.reshape(-1).long(), gate_up_proj, down_proj)


def _sorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, method):
    """Sorted dispatch: (order, tok, w, ys) with ys (T*k, H) the expert outputs of the sorted
    assignments (input-scaled when ``scale == "input"``, not yet output-scaled). order and tok
    are None when there is a single assignment (ys is then in token order)."""
    E = gate_up_proj.shape[0]
    if _on_host(x, topk_ids, gate_up_proj, method):
        order, tok, counts = _sort_on_host(topk_ids, E)
        w = topk_weights.reshape(-1)
        if order is not None:
            w, xs = w.index_select(0, order), x.index_select(0, tok)
        else:
            xs = x
        if scale == "input":
            xs = xs * w.to(x.dtype)[:, None]
        m = method or _host_method(len(w), sum(1 for c in counts if c))
        if m == "gather" and _plain(gate_up_proj, down_proj):
            experts = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)], device=x.device)
            return order, tok, w, _experts_gathered(xs, experts, gate_up_proj, down_proj)
        if m == "grouped" and _plain(gate_up_proj, down_proj) and grouped_mm_supported(xs, gate_up_proj, down_proj):
            return order, tok, w, _experts_grouped(xs, _host_offsets(counts, x.device), gate_up_proj, down_proj)
        return order, tok, w, _experts_loop(xs, counts, gate_up_proj, down_proj)
    order, tok, counts = sort_assignments(topk_ids, E)
    w = topk_weights.reshape(-1)[order]
    xs = x.index_select(0, tok)
    if scale == "input":
        # As transformers' Llama4TextMoe: routed_in * router_scores in the model dtype.
        xs = xs * w.to(x.dtype)[:, None]

    m = method or _default_method(x.device, topk_ids.numel(), E)
    if m == "gather" and _plain(gate_up_proj, down_proj):
        ys = _experts_gathered(xs, topk_ids.reshape(-1)[order].long(), gate_up_proj, down_proj)
    elif m == "grouped" and _plain(gate_up_proj, down_proj) and grouped_mm_supported(xs, gate_up_proj, down_proj):
        ys = _experts_grouped(xs, torch.cumsum(counts, 0).to(torch.int32), gate_up_proj, down_proj)
    elif m in ("grouped", "loop", "gather"):  # quantized weights take the loop whatever was asked
        ys = _experts_loop(xs, counts.tolist(), gate_up_proj, down_proj)
    else:
        raise ValueError(f"method must be None, 'loop', 'grouped' or 'gather', got {method!r}")
    return order, tok, w, ys


def moe_experts_torch(x, topk_ids, topk_weights, gate_up_proj, down_proj, *,
                      scale: str = "input", method: str | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch implementation of :func:`workbench.kernels.moe_experts` (inputs already validated).

    ``method``: ``None`` (measured default for the device), ``"loop"``, ``"grouped"`` (falls
    back to the loop when ``torch._grouped_mm`` cannot take the operands) or ``"gather"`` (see the
    module docstring; quantized weights take the loop).
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    dtype = x.dtype
    if T == 0:
        return x.new_empty(T, H) if out is None else out

    if _gathers_unsorted(x, topk_ids, gate_up_proj, down_proj, method):
        tok, (w, ys) = None, _unsorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale)
    else:
        _, tok, w, ys = _sorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, method)

    if k == 1:
        if scale == "output":
            ys = ys * w.to(dtype)[:, None]
        if tok is None:  # a single assignment: ys is already in token order
            return ys if out is None else out.copy_(ys)
        if out is None:
            out = x.new_empty(T, H)
        out.index_copy_(0, tok, ys)
        return out
    if out is None:
        out = x.new_empty(T, H)
    acc = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    ysf = ys.float()
    if scale == "output":
        ysf = ysf * w.float()[:, None]
    acc.index_add_(0, tok, ysf)
    out.copy_(acc)
    return out


def moe_expert_outputs_torch(x, topk_ids, topk_weights, gate_up_proj, down_proj, *,
                             scale: str = "input", method: str | None = None) -> torch.Tensor:
    """Each (token, slot) assignment's routed-expert output, (T, k, H) in x's dtype (inputs validated).

    Slot j of token t holds SwiGLU_e(w_tj * x_t) (``scale="input"``) or w_tj * SwiGLU_e(x_t)
    (``"output"``), e = topk_ids[t, j]: the same products as :func:`moe_experts_torch` computes
    before it adds the slots up, so for k == 1 ``outputs[:, 0]`` equals its result bit for bit
    (and for k == 2 the float32 sum of the two slots, cast to x's dtype, does too).
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    slots = x.new_empty(T * k, H)
    if T == 0:
        return slots.view(T, k, H)
    if _gathers_unsorted(x, topk_ids, gate_up_proj, down_proj, method):
        order, (w, ys) = None, _unsorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale)
    else:
        order, _, w, ys = _sorted_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, method)
    if scale == "output":
        ys = ys * w.to(x.dtype)[:, None] if k == 1 else (ys.float() * w.float()[:, None]).to(x.dtype)
    if order is None:
        slots.copy_(ys)
    else:
        slots.index_copy_(0, order, ys)
    return slots.view(T, k, H)
