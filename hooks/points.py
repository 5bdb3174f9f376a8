"""Hook points: named places in the forward pass where listeners observe or edit tensors.

A :class:`HookPoint` is a submodule, so it has a stable, guessable name from ``named_modules()``
(``language_model.model.layers.3.feed_forward.hook_router``). The model calls it with keyword
tensors only when a listener is attached (``if point.active: ...``), so an unused point costs one
attribute check.

Listeners, any number per point, each added with ``handle = point.add(fn, edit=...)`` and removed
with ``handle.remove()`` (handles are also context managers):

* observe (default): ``fn(point, **tensors) -> None``. Must not synchronize with the device
  (copy non-blocking, queue, return).
* edit: ``fn(point, **tensors) -> dict | None``: replacements for some of the point's editable
  tensors (same shape, dtype and device); later listeners and the model continue with them.

Every edit runs before any observer (edits in the order they were added), so an observer such as
a recorder sees the values the model goes on with, whichever was attached first. Two recorders,
an attention capture and an ablation can therefore be active on one model at once.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["HookPoint", "Handle", "Handles", "HookError", "hook_points"]


class HookError(RuntimeError):
    """A listener broke the hook point's contract (e.g. an edit of the wrong shape)."""


class Handle:
    """Removes one listener (``remove()``, or leaving a ``with`` block); idempotent."""

    def __init__(self, point: "HookPoint", entry: list) -> None:
        self._point, self._entry = point, entry

    @property
    def active(self) -> bool:
        return self._point is not None

    def remove(self) -> None:
        if self._point is not None:
            self._point._remove(self._entry)
            self._point = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Handles(list):
    """Several handles undone together: ``remove()``, or leaving the ``with`` block."""

    def remove(self) -> None:
        for h in self:
            h.remove()
        self.clear()

    def __enter__(self) -> "Handles":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class HookPoint(nn.Module):
    """A named point in the forward pass. ``editable``: the tensor names edit listeners may replace."""

    def __init__(self, editable: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.editable = tuple(editable)
        self.name = ""  # filled in by hook_points(), for messages
        # tuples, replaced (never mutated) on add/remove: a call iterates them without a copy, and a
        # listener that removes itself (or adds one) mid-call does not change the running call
        self._edits: tuple[list, ...] = ()
        self._observers: tuple[list, ...] = ()

    @property
    def active(self) -> bool:
        """True when any listener is attached."""
        return bool(self._edits or self._observers)

    @property
    def editing(self) -> bool:
        """True when an edit listener is attached (the point's tensors may be replaced)."""
        return bool(self._edits)

    def add(self, fn: Callable, *, edit: bool = False) -> Handle:
        """Attach ``fn(point, **tensors)``; ``edit=True`` lets it return replacements. Returns its handle."""
        if edit and not self.editable:
            raise HookError(f"hook point {self.name or type(self).__name__} has no editable tensors")
        entry = [fn]  # a fresh list: identity, so the same fn can be added twice
        if edit:
            self._edits = (*self._edits, entry)
        else:
            self._observers = (*self._observers, entry)
        return Handle(self, entry)

    def _remove(self, entry: list) -> None:
        self._edits = tuple(e for e in self._edits if e is not entry)
        self._observers = tuple(e for e in self._observers if e is not entry)

    def forward(self, **tensors):
        """Run the edits, then the observers; returns the (possibly edited) tensors as a dict."""
        for (fn,) in self._edits:
            out = fn(self, **tensors)
            if out:
                tensors = {**tensors, **self._checked(out, tensors)}
        for (fn,) in self._observers:
            fn(self, **tensors)
        return tensors

    def _checked(self, out: dict, tensors: dict) -> dict:
        where = self.name or type(self).__name__
        for key, new in out.items():
            if key not in self.editable:
                raise HookError(f"{where}: an edit listener returned {key!r}; editable here: {list(self.editable)}")
            old = tensors[key]
            if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype \
                    or new.device != old.device:
                got = f"{tuple(new.shape)} {new.dtype} on {new.device}" if isinstance(new, torch.Tensor) \
                    else type(new).__name__
                raise HookError(f"{where}: the edit of {key!r} must keep {tuple(old.shape)} {old.dtype} on "
                                f"{old.device}, got {got}")
        return out

    def extra_repr(self) -> str:
        n, m = len(self._edits), len(self._observers)
        return f"{n} edit, {m} observe" if n or m else ""


def hook_points(model: nn.Module, suffix: str | None = None) -> Iterator[tuple[str, HookPoint]]:
    """All hook points of ``model`` as (name, point), optionally only those whose name ends in ``suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint) and (suffix is None or name.endswith(suffix)):
            module.name = name
            yield name, module
