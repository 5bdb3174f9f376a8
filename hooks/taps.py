"""Tap points: named places in the forward pass where a recorder may look at tensors.

A :class:`Tap` is a submodule (so it gets a stable, guessable name from ``named_modules()``, e.g.
``language_model.model.layers.3.feed_forward.hook_router``) that does nothing unless a function
is attached. The model calls ``tap(...)`` with device tensors; the attached function must not
synchronize with the device (copy non-blocking, queue, return).
"""
from __future__ import annotations

from typing import Callable, Iterator

from torch import nn

__all__ = ["Tap", "iter_taps"]


class Tap(nn.Module):
    """A no-op hook point. ``fn(tap, **tensors)`` runs only when attached."""

    def __init__(self) -> None:
        super().__init__()
        self.fn: Callable[..., None] | None = None
        self.tap_name: str = ""  # filled in by iter_taps, for messages and recorders

    @property
    def active(self) -> bool:
        return self.fn is not None

    def forward(self, **tensors) -> None:  # noqa: D401 - a hook, returns nothing
        if self.fn is not None:
            self.fn(self, **tensors)

    def extra_repr(self) -> str:
        return "attached" if self.fn is not None else ""


def iter_taps(model: nn.Module, suffix: str | None = None) -> Iterator[tuple[str, Tap]]:
    """All taps of ``model`` as (name, tap), optionally only those whose name ends in ``suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, Tap) and (suffix is None or name.endswith(suffix)):
            module.tap_name = name
            yield name, module
