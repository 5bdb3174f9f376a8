"""Instrumentation (``workbench.hooks``): tap points in the model and the recorder that reads them."""
from workbench.hooks.taps import Tap, iter_taps

__all__ = ["Tap", "iter_taps"]
