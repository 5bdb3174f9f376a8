"""Instrumentation (``workbench.hooks``): tap points in the model and the recorder that reads them."""
from workbench.hooks.recorder import (CAPTURE_CHOICES, Recorder, RecorderError, RoutingAdapter,
                                      TransformersLlama4Adapter, WorkbenchAdapter, record)
from workbench.hooks.taps import Tap, iter_taps

__all__ = ["Tap", "iter_taps", "Recorder", "RecorderError", "record", "RoutingAdapter", "WorkbenchAdapter",
           "TransformersLlama4Adapter", "CAPTURE_CHOICES"]
