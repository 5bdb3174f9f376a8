"""Quantized weights for the workbench (``workbench.quant``): FP8 and int4 weight types, the
quantized experts / Linear modules, and which modules a quantization mode covers.

    import workbench as wb
    model = wb.load_model(path, dtype=torch.bfloat16, device="cuda", quantize="int4")   # on the fly
    model = wb.load_model(maverick_fp8_dir, device="cuda")   # official FP8 checkpoint, read as stored

Layouts are stated in :mod:`workbench.quant.weights`; ``workbench.kernels.moe_experts`` takes
:class:`Fp8Weight` / :class:`Int4Weight` for ``gate_up_proj`` / ``down_proj``.
"""
from workbench.quant.weights import (FP8_DTYPE, FP8_MAX, INT4_GROUP_SIZE, INT4_SCALE_DTYPE, KINDS, Fp8Weight,
                                     Int4Weight, QuantizedWeight, quantize, quantize_fp8, quantize_int4,
                                     quantized_nbytes)

__all__ = ["QuantizedWeight", "Fp8Weight", "Int4Weight", "quantize", "quantize_fp8", "quantize_int4",
           "quantized_nbytes", "FP8_DTYPE", "FP8_MAX", "INT4_GROUP_SIZE", "INT4_SCALE_DTYPE", "KINDS",
           "QuantizedTextExperts", "QuantLinear", "QUANTIZABLE", "NEVER_QUANTIZED", "parse_modules",
           "select_modules"]


def __getattr__(name):  # the modules import the model; load them on first use (no import cycle with kernels)
    if name in ("QuantizedTextExperts", "QuantLinear", "QUANTIZABLE", "NEVER_QUANTIZED", "parse_modules",
                "select_modules", "apply_structure", "fbgemm_converts"):
        from workbench.quant import modules
        return getattr(modules, name)
    raise AttributeError(f"module 'workbench.quant' has no attribute {name!r}")
