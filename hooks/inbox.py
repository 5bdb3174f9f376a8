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
* ``capacity`` counts every pass not yet written, the ones the writer is writing included, in
  units of the largest pass put so far, and at least ``min_unit`` (``weight``: the recorder gives a
  pass's token count, and a floor of :data:`PLACE_TOKENS` tokens): host memory stays bounded by
  ``capacity`` units (what the memory planner assumes), while smaller passes queue, and are
  batched, in proportion (18 short prompts: 2-3 batches instead of 6; one-token decode steps:
  hundreds to a batch). With equal weights and no floor it is a count.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Inbox", "PLACE_TOKENS"]

# The recorder's floor for a queue place, in tokens (per-token captures only). Without it a place
# of one-token passes (decode steps) is one pass, and the writer woke every few passes: each
# wake-up takes the GIL from the forward pass many times over (its Python work interleaved with
# the forward's ops), which cost a one-token transformers pass ~1 ms, several times the writer's
# own CPU time (benchmarks/RESULTS.md, "Writer wake-ups"). Host memory in flight: capacity x 256
# tokens at least, e.g. ~32 MiB of float32 router logits for 48 MoE layers x 128 experts.
PLACE_TOKENS = 256


class Inbox:
    """Bounded FIFO of passes; ``put`` blocks while ``capacity`` largest passes are not yet written."""

    def __init__(self, capacity: int, min_unit: float = 0.0):
        self._cap = max(1, int(capacity))
        self._items: deque = deque()
        self._arrived: deque = deque()  # monotonic arrival time of each queued item
        self._weights: deque = deque()  # weight of each queued item, then of each one being written
        self._cv = threading.Condition()
        self._pending = 0  # put and not yet done: queued + being written
        self._pending_w = 0.0  # their weight
        self._queued_w = 0.0  # the queued items' weight
        self._unit = float(min_unit)  # the largest weight put so far, at least min_unit
        self._urgent = 0  # joins waiting, or a close: take everything now
        self._want: float = float("inf")  # the waiting taker's min_items (inf: no taker waits)

    def put(self, item: Any, *, weight: float = 1.0, urgent: bool = False) -> None:
        """Queue ``item`` of ``weight`` > 0 (blocks while it would bring the pending weight above
        ``capacity`` x the largest weight seen, unless nothing is pending: back-pressure).
        ``urgent``: the writer takes it at once (the close sentinel)."""
        weight = float(weight)
        with self._cv:
            self._unit = max(self._unit, weight)
            while self._pending and self._pending_w + weight > self._cap * self._unit and not urgent:
                self._cv.wait()
            self._items.append(item)
            self._arrived.append(time.monotonic())
            self._weights.append(weight)
            self._pending += 1
            self._pending_w += weight
            self._queued_w += weight
            if urgent:
                self._urgent += 1
            if urgent or self._queued_w >= self._want * self._unit:  # else the taker's batch is not due
                self._cv.notify_all()

    def take(self, min_items: float, max_age: float | None, timeout: float | None) -> list:
        """Every queued item, once ``min_items`` largest items' weight is queued, the oldest is
        ``max_age`` s old (None: no limit), a join or close is waiting; ``[]`` when ``timeout`` s
        pass first (None: no limit). Call :meth:`done` with the number taken once they are written."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                n = len(self._items)
                old = max_age is not None and n and now - self._arrived[0] >= max_age
                if n and (self._queued_w >= min_items * self._unit or self._urgent or old):
                    out = list(self._items)
                    self._items.clear()
                    self._arrived.clear()
                    self._queued_w = 0.0
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
        """``n`` taken items are written (the oldest taken first; ``urgent``: of them, the close
        sentinels)."""
        with self._cv:
            for _ in range(n):
                self._pending_w -= self._weights.popleft()
            self._pending -= n
            if not self._pending:
                self._pending_w = 0.0  # no float drift
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
