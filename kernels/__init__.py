"""Expert kernels for Llama 4 style Mixture-of-Experts layers (``workbench.kernels``).

Public entry point: :func:`moe_experts`. It dispatches to

* the Triton path (``moe_triton``: on-device token/expert alignment + two fused grouped GEMMs,
  no host synchronization, CUDA-graph capturable) for CUDA tensors when triton imports, and
* the torch path (``moe_torch``: sorted dispatch + per-expert loop or ``torch._grouped_mm``)
  otherwise (CPU, or CUDA without triton).

:func:`moe_expert_outputs` returns each (token, slot) assignment's output instead of their sum
(what ``Llama4TextMoe.hook_experts`` shows); it always runs the torch path.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from workbench.quant.weights import QuantizedWeight

from .moe_torch import moe_expert_outputs_torch, moe_experts_torch

__all__ = ["moe_experts", "moe_expert_outputs", "triton_available"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _module_imports(name: str) -> bool:
    """True when this package's module ``name`` (a Triton one) imports; checked once."""
    try:
        importlib.import_module(f"{__name__}.{name}")
        return True
    except Exception:  # ImportError, or triton failing to find a backend
        return False


def triton_available() -> bool:
    """True when ``triton`` (and this package's Triton MoE kernels) import."""
    return _module_imports("moe_triton")


def _shape(t) -> str:
    return f"{tuple(t.shape)} {t.kind if isinstance(t, QuantizedWeight) else t.dtype}"


def _validate(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, backend, out):
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(t, torch.Tensor) and not (name.endswith("proj") and isinstance(t, QuantizedWeight)):
            raise ValueError(f"{name} must be a torch.Tensor" + (" or a workbench.quant weight (Fp8Weight, "
                             "Int4Weight)" if name.endswith("proj") else "") + f", got {type(t).__name__}")
    if scale not in ("input", "output"):
        raise ValueError(f"scale must be 'input' or 'output', got {scale!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (T, H), got shape {_shape(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be 2-D (T, k) with T={T} (rows of x), got shape {_shape(topk_ids)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    k = topk_ids.shape[1]
    if k < 1:
        raise ValueError(f"topk_ids must have k >= 1 columns, got shape {_shape(topk_ids)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)} "
                         f"(T, k), got shape {_shape(topk_weights)}")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must have a floating dtype, got {topk_weights.dtype}")
    if gate_up_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be 3-D (E, H, 2I), got shape {_shape(gate_up_proj)}")
    E, H2, I2 = gate_up_proj.shape
    if H2 != H:
        raise ValueError(f"gate_up_proj must be (E, H, 2I) with H={H} (columns of x), got shape {_shape(gate_up_proj)}")
    if I2 % 2 or I2 == 0:
        raise ValueError(f"gate_up_proj last dim must be 2I (gate then up), even and > 0, got shape {_shape(gate_up_proj)}")
    if E < 1:
        raise ValueError(f"gate_up_proj must hold at least one expert, got shape {_shape(gate_up_proj)}")
    I = I2 // 2
    if down_proj.dim() != 3 or tuple(down_proj.shape) != (E, I, H):
        raise ValueError(f"down_proj must be (E, I, H) = {(E, I, H)} to match gate_up_proj {tuple(gate_up_proj.shape)} "
                         f"and x {tuple(x.shape)}, got shape {_shape(down_proj)}")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if isinstance(t, QuantizedWeight):
            if t.layout != "kn":
                raise ValueError(f"{name} must be quantized in the experts' x @ W layout ('kn'), got {t.layout!r}")
            continue  # dequantized to x's dtype
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal x dtype {x.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, H) or out.dtype != x.dtype \
                or out.device != x.device:
            desc = _shape(out) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a ({T}, {H}) {x.dtype} tensor on {x.device}, got {desc}")
    return T, H, k, E, I


def _check_ids_range(topk_ids, E):
    if topk_ids.numel() == 0:
        return
    lo, hi = torch.aminmax(topk_ids)
    lo, hi = int(lo), int(hi)  # host sync (skipped under CUDA graph capture / check_ids=False)
    if lo < 0 or hi >= E:
        raise ValueError(f"topk_ids values must lie in [0, E) = [0, {E}) (E from gate_up_proj), "
                         f"got min {lo}, max {hi}")


def moe_experts(x, topk_ids, topk_weights, gate_up_proj, down_proj, *, scale: str = "input",
                backend: str | None = None, out: torch.Tensor | None = None,
                check_ids: bool = True, validate: bool = True, **backend_options) -> torch.Tensor:
    """Routed experts of one MoE layer: y[t] = sum_j SwiGLU_{e_tj}(...) for the top-k experts.

    Args:
        x: (T, H) float32 / float16 / bfloat16 token activations.
        topk_ids: (T, k) any integer dtype, expert index of each (token, slot), in [0, E).
        topk_weights: (T, k) floating, router score of each (token, slot) as the model applies it.
        gate_up_proj: (E, H, 2I), dtype of x; columns [0, I) are the gate, [I, 2I) the up projection.
        down_proj: (E, I, H), dtype of x.
            Either weight may instead be a quantized weight of that logical shape in the "kn"
            layout (:class:`workbench.quant.Fp8Weight`, :class:`workbench.quant.Int4Weight`): the
            torch path dequantizes one expert at a time to x's dtype (the reference), the Triton
            path dequantizes inside the grouped GEMMs (W8A16 / W4A16, fp32 accumulation).
        scale: ``"input"`` (Llama 4): y = sum_j SwiGLU_e(w_j * x), the product w_j * x taken in
            x's dtype; ``"output"`` (Mixtral): y = sum_j w_j * SwiGLU_e(x).
            SwiGLU_e(z) = (silu(z @ Wg_e) * (z @ Wu_e)) @ Wd_e.
        backend: ``None`` (Triton for CUDA tensors when triton imports and no gradient is
            needed, torch otherwise), ``"torch"`` (differentiable w.r.t. x, topk_weights and both
            weight tensors) or ``"triton"`` (forward only; CPU tensors only under
            ``TRITON_INTERPRET=1``).
        out: optional (T, H) tensor of x's dtype/device to write the result into (every element
            is written).
        check_ids: verify ids lie in [0, E) (a host sync on CUDA; skipped automatically while a
            CUDA graph is being captured). Pass False on latency-critical GPU paths.
        validate: check shapes, dtypes and devices (ValueError naming the argument). A caller
            whose inputs are right by construction (the model's own router output) passes False:
            on a CPU decode step the checks cost as much as the experts' matmuls.
        **backend_options: forwarded to the backend (torch: ``method``; triton: ``config`` (tile
            config dict, see ``moe_triton.get_config``; a section may set ``"TMA": true`` for
            tensor-descriptor weight loads), ``upcast_bf16``, ``input_scale`` ("operand" or
            "epilogue")).

    Returns:
        (T, H) tensor in x.dtype (``out`` when given). For k > 1 the sum over slots is
        accumulated in float32 and cast at the end.

    Raises:
        ValueError: naming the offending argument, with its shape/dtype, for malformed input.
    """
    if validate:
        _validate(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, backend, out)
    E = gate_up_proj.shape[0]
    if check_ids and not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _check_ids_range(topk_ids, E)

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, topk_weights, gate_up_proj, down_proj))
    if backend is None:
        # the Triton kernels are forward-only: autograd goes through the torch path
        backend = "triton" if (x.device.type == "cuda" and not needs_grad and triton_available()) else "torch"
    if backend == "triton":
        if needs_grad:
            raise ValueError("backend='triton' is forward-only (no autograd); an input requires grad: "
                             "use torch.no_grad() or backend='torch'")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (x is on {x.device}) or "
                             "TRITON_INTERPRET=1 set before triton is imported")
        if not triton_available():
            raise ValueError("backend='triton' requested but triton is not importable")
        from .moe_triton import moe_experts_triton
        return moe_experts_triton(x, topk_ids, topk_weights, gate_up_proj, down_proj,
                                  scale=scale, out=out, **backend_options)
    return moe_experts_torch(x, topk_ids, topk_weights, gate_up_proj, down_proj,
                             scale=scale, out=out, **backend_options)


def moe_expert_outputs(x, topk_ids, topk_weights, gate_up_proj, down_proj, *, scale: str = "input",
                       check_ids: bool = True, method: str | None = None) -> torch.Tensor:
    """Each routed assignment's output: (T, k, H) in x's dtype, slot j of token t holding
    SwiGLU_{e}(w_tj * x_t) for e = topk_ids[t, j] (``scale="input"``, Llama 4) or
    w_tj * SwiGLU_e(x_t) (``"output"``). Arguments as :func:`moe_experts`; the sum over slots is
    :func:`moe_experts`'s result (bit for bit on the torch path for k <= 2 with ``scale="input"``:
    float32 sum of the slots, cast to x's dtype).

    Always the torch path (sorted dispatch): the Triton kernels add the slots up in their epilogue.
    On CUDA its per-expert loop (used when ``torch._grouped_mm`` cannot take the operands, e.g.
    float32) reads the expert counts on the host, a synchronization; bf16 on sm90+ does not.
    """
    _validate(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale, "torch", None)
    if check_ids and not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _check_ids_range(topk_ids, gate_up_proj.shape[0])
    return moe_expert_outputs_torch(x, topk_ids, topk_weights, gate_up_proj, down_proj, scale=scale, method=method)
