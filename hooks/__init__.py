"""Instrumentation (``workbench.hooks``): hook points in the model, interventions, and the recorder."""
from workbench.hooks.points import Handle, HookError, HookPoint, hook_points
from workbench.hooks.recorder import (CAPTURE_CHOICES, Recorder, RecorderError, RoutingAdapter,
                                      TransformersLlama4Adapter, WorkbenchAdapter, record)

__all__ = ["HookPoint", "Handle", "HookError", "hook_points", "Recorder", "RecorderError", "record",
           "RoutingAdapter", "WorkbenchAdapter", "TransformersLlama4Adapter", "CAPTURE_CHOICES"]
