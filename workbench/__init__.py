"""MoE Workbench: routing and cross-modal attention analysis for Llama 4 Mixture-of-Experts models.

    import workbench as wb
    model = wb.load_model("path/to/Llama-4-Scout-17B-16E-Instruct", dtype=torch.bfloat16, device="cuda")
    proc = wb.load_processor("path/to/...")
    with wb.record(model, "runs/x.zarr", capture=("router", "attention")):
        model(**proc(text=["<|image|>What is here?"], images=[img]))
    ds = wb.open_trace("runs/x.zarr")
    with wb.record(model, "runs/answers.zarr") as rec:      # routing of the answers, token by token
        answers = wb.generate(model, proc, ["Describe the image."], max_new_tokens=64, recorder=rec)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use so that
# `import workbench` stays light (no zarr/xarray/plotly until needed).
_LAZY = {
    "load_model": "workbench.checkpoint",
    "random_model": "workbench.checkpoint",
    "save_model": "workbench.checkpoint",
    "CheckpointError": "workbench.checkpoint",
    "ModelConfig": "workbench.models.llama4.config",
    "TextConfig": "workbench.models.llama4.config",
    "ConfigError": "workbench.models.llama4.config",
    "preset": "workbench.models.llama4.config",
    "load_processor": "workbench.models.llama4.processor",
    "ProcessorError": "workbench.models.llama4.processor",
    "open_trace": "workbench.trace",
    "open_attention": "workbench.trace",
    "record": "workbench.hooks",
    "Recorder": "workbench.hooks",
    "intervene": "workbench.hooks.interventions",
    "generate": "workbench.generation",
    "Generation": "workbench.generation",
    "KVCache": "workbench.runtime.kv_cache",
    "plan": "workbench.runtime.plan",
}
_SUBMODULES = {"quant", "kernels", "hooks", "analysis", "models", "runtime", "trace", "checkpoint", "geometry", "export", "widgets", "embedded"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"workbench.{name}")
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
