"""The bounded hand-over of forward passes from the caller's thread to the recorder's writer thread.

Like ``queue.Queue(maxsize)``, with two differences that make recording cheap:

* the writer takes the waiting passes in batches (:meth:`Inbox.take`: once ``min_items`` wait, or
  the oldest has waited ``max_age`` seconds, or someone joins or closes), so its per-pass Python
  work (validation, conversions, one append) is paid once per batch, and it wakes, and takes the
  GIL from the forward pass, once per batch instead of once per pass;
* ``capacity`` counts every pass not yet written, the ones the writer is writing included, so
  host memory stays bounded by ``capacity`` passes (what the memory planner assumes).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Inbox"]


class Inbox:
    """Bounded FIFO of passes; ``put`` blocks while ``capacity`` passes are not yet written."""

    def __init__(self, capacity: int):
        self._cap = max(1, int(capacity))
        self._items: deque = deque()
        self._arrived: deque = deque()  # monotonic arrival time of each queued item
        self._cv = threading.Condition()
        self._pending = 0  # put and not yet done: queued + being written
        self._urgent = 0  # joins waiting, or a close: take everything now

    def put(self, item: Any, *, urgent: bool = False) -> None:
        """Queue ``item`` (blocks while ``capacity`` items are pending: back-pressure). ``urgent``:
        the writer takes it at once (the close sentinel)."""
        with self._cv:
            while self._pending >= self._cap and not urgent:
                self._cv.wait()
            self._items.append(item)
            self._arrived.append(time.monotonic())
            self._pending += 1
            if urgent:
                self._urgent += 1
            self._cv.notify_all()

    def take(self, min_items: int, max_age: float | None, timeout: float | None) -> list:
        """Every queued item, once ``min_items`` are queued, the oldest is ``max_age`` s old (None:
        no limit), a join or close is waiting; ``[]`` when ``timeout`` s pass first (None: no limit).
        Call :meth:`done` with the number taken once they are written."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                n = len(self._items)
                old = max_age is not None and n and now - self._arrived[0] >= max_age
                if n and (n >= min_items or self._urgent or old):
                    out = list(self._items)
                    self._items.clear()
                    self._arrived.clear()
                    return out
                waits = [t - now for t in (end, self._arrived[0] + max_age if n and max_age is not None else None)
                         if t is not None]
                if end is not None and now >= end:
                    return []
                self._cv.wait(max(0.0, min(waits)) if waits else None)

    def done(self, n: int, *, urgent: int = 0) -> None:
        """``n`` taken items are written (``urgent``: of them, the close sentinels)."""
        with self._cv:
            self._pending -= n
            self._urgent -= urgent
            self._cv.notify_all()

    def join(self) -> None:
        """Wait until every item put so far is written (the writer takes them at once meanwhile)."""
        with self._cv:
            self._urgent += 1
            self._cv.notify_all()
            try:
                while self._pending:
                    self._cv.wait()
            finally:
                self._urgent -= 1
