"""The bounded hand-over of forward passes from the caller's thread to the recorder's writer thread.

Like ``queue.Queue(maxsize)``, with two differences that make recording cheap:

* the writer takes the waiting passes in batches (:meth:`Inbox.take`: once ``min_items`` wait, or
  the oldest has waited ``max_age`` seconds, or someone joins or closes), so its per-pass Python
  work (validation, conversions, one append) is paid once per batch, and it wakes, and takes the
  GIL from the forward pass, once per batch instead of once per pass: :meth:`put` wakes the
  waiting writer only when its batch is due (``min_items`` queued, or urgent); for ``max_age`` the
  writer keeps its own clock (it waits at most ``max_age`` at a time, so a pass that reached an
  idle writer is still taken ``max_age`` after it arrived). On a 2-core machine every wake-up of
  the writer thread costs the forward pass a GIL hand-over and a context switch or two;
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
        self._want: float = float("inf")  # the waiting taker's min_items (inf: no taker waits)

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
            if urgent or len(self._items) >= self._want:  # else the taker's batch is not due: let it sleep
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
                # put() does not wake us for the first item: with max_age, wake at least every max_age
                due = None if max_age is None else (self._arrived[0] if n else now) + max_age
                waits = [t - now for t in (end, due) if t is not None]
                if end is not None and now >= end:
                    return []
                self._want = min_items
                try:
                    self._cv.wait(max(0.0, min(waits)) if waits else None)
                finally:
                    self._want = float("inf")

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
