"""Instrumentation (``workbench.hooks``): hook points in the model, adapters per model family,
captures, the recorder that runs them, and interventions.

    points.py         HookPoint: named places in the forward pass, any number of listeners (observe / edit)
    adapters.py       one adapter per model family: uniform inputs / router hook points + routing spec
    captures.py       Capture: what a recording stores (router decisions, logits), declared as variables
    attention.py      AttentionCapture: cross-modal attention maps
    experts.py        inside the experts: ExpertOutCapture, AttributionCapture, MarginCapture
    recorder.py       Recorder: the sink that runs captures and streams them into a trace
    interventions.py  edits on the router (block_experts, intervene)
"""
from workbench.hooks.adapters import (Adapter, AdapterError, RoutingSpec, TransformersLlama4Adapter,
                                      WorkbenchLlama4Adapter, adapter_for, register_adapter)
from workbench.hooks.attention import AttentionCapture
from workbench.hooks.captures import (CAPTURES, Capture, LogitsCapture, RecorderError, RouterCapture,
                                      register_capture)
from workbench.hooks.experts import AttributionCapture, ExpertOutCapture, MarginCapture
from workbench.hooks.interventions import Intervention, block_experts, intervene
from workbench.hooks.points import Handle, Handles, HookError, HookPoint, hook_points
from workbench.hooks.recorder import Recorder, record

__all__ = ["HookPoint", "Handle", "Handles", "HookError", "hook_points", "Adapter", "AdapterError", "RoutingSpec",
           "WorkbenchLlama4Adapter", "TransformersLlama4Adapter", "adapter_for", "register_adapter", "Capture",
           "RouterCapture", "LogitsCapture", "AttentionCapture", "CAPTURES", "register_capture", "Recorder",
           "RecorderError", "record", "block_experts", "intervene", "Intervention", "ExpertOutCapture",
           "AttributionCapture", "MarginCapture"]
