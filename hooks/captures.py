"""Captures: what a recording stores, one class per kind of data.

A :class:`Capture` declares the hook points it listens to (through the model's adapter), the
trace variables it writes (:class:`~workbench.trace.schema.Variable`: name, dims, dtype, chunking,
codec) and how one forward pass becomes rows. The :class:`~workbench.hooks.recorder.Recorder` is
a sink that runs declared captures; the trace writer writes any declared variable the same way;
the CLI exposes every registered capture and its options (``--<capture>-<option>``). A new kind
of data is one new class.

Life of a capture in a recording:

* ``bind(model, adapter, spec)`` once: check the options against the model (RecorderError);
* ``variables(spec)``: the token (and per-commit) arrays it adds to the trace;
* ``attach(adapter)``: add listeners to the adapter's hook points, return their handles;
* per forward pass, in the caller's thread: ``start(pass_)`` (inputs known), listeners fire,
  ``finish()`` returns a payload: device work queued, copies to the host started non-blocking,
  never a host synchronization;
* in the writer thread, after the pass's CUDA event: ``rows(payload, keep)`` -> {variable:
  numpy rows of the real tokens}, appended with the core columns; then ``write(payload, writer,
  written)`` for data outside the token table (child groups, e.g. attention maps).

Options are dataclass fields; ``options()`` (stored in the trace's ``captures`` attribute, and
compared on resume) is their JSON form. A field's ``metadata`` may carry ``help`` and ``parse``
(str -> value) for the CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from workbench.runtime import ForwardBatch
from workbench.trace.schema import LOGITS_DTYPES, Variable, logits_variable, routing_variables

__all__ = ["Capture", "RouterCapture", "LogitsCapture", "Pass", "Written", "RecorderError", "CAPTURES",
           "register_capture", "make_captures", "to_host"]


class RecorderError(RuntimeError):
    """Recording failed (bad capture options, a model without ids, or a failed store write)."""


@dataclass(eq=False)
class Pass:
    """A forward pass as listeners see it when it starts: ``input_ids`` (B, T) long and ``batch``
    (the :class:`~workbench.runtime.ForwardBatch`: positions, validity), device tensors."""

    input_ids: torch.Tensor
    batch: ForwardBatch


@dataclass(eq=False)
class Written:
    """Where a pass's rows went (writer thread, after they were appended).

    keep: (B*T,) bool, the real tokens of the flattened pass. token_index: (B*T,) int64, each real
    token's index on the trace's token dimension (-1 for padding). sequence_ids: (B,) the trace
    sequence of each row. positions: (B, T) int64. shape: (B, T).
    """

    keep: np.ndarray
    token_index: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    shape: tuple[int, int]


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device->host copy without waiting (pinned memory on CUDA); CPU tensors pass through."""
    if t.device.type == "cpu":
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


class Capture:
    """Base class of the captures (see the module docstring). Subclasses are dataclasses whose
    fields are their options, with a class attribute ``name``."""

    name: ClassVar[str] = ""

    def options(self) -> dict:
        """The options as JSON types (stored in the trace; a resumed recording must match them)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def bind(self, model: nn.Module, adapter, spec) -> None:
        """Check the options against the model; raise RecorderError naming the problem."""

    def variables(self, spec) -> list[Variable]:
        """The trace variables this capture writes."""
        return []

    def attach(self, adapter) -> list:
        """Add listeners to the adapter's hook points; return their handles."""
        return []

    def start(self, pass_: Pass) -> None:
        """A forward pass starts (caller's thread)."""

    def finish(self) -> Any:
        """The pass ended (caller's thread): return the payload for the writer thread."""
        return None

    def rows(self, payload: Any, keep: np.ndarray) -> dict[str, np.ndarray]:
        """The payload's token rows of the real tokens (``keep``: (B*T,) bool), per variable."""
        return {}

    def write(self, payload: Any, writer, written: Written) -> None:
        """Write what does not go in the token table (writer thread, after the rows were appended)."""


class _PerLayer(Capture):
    """Collects one tensor set per MoE layer from the adapter's router points during a pass."""

    keys: ClassVar[tuple[str, ...]] = ()

    def attach(self, adapter) -> list:
        self._n = len(adapter.routers)
        self._cur: list | None = None
        return [p.add(self._listener(i)) for i, p in enumerate(adapter.routers)]

    def _listener(self, i: int) -> Callable:
        def on_router(point, **tensors):
            if self._cur is None:
                raise RecorderError("a router hook point fired before the inputs of its forward pass")
            self._cur[i] = tuple(tensors[k] for k in self.keys)
        return on_router

    def start(self, pass_: Pass) -> None:
        self._cur = [None] * self._n

    def _stacked(self) -> list[torch.Tensor]:
        cur, self._cur = self._cur, None
        seen = sum(x is not None for x in cur or [])
        if seen != self._n:
            raise RecorderError(f"saw {seen} router decisions for {self._n} MoE layers")
        return [torch.stack([x[j] for x in cur], dim=1) for j in range(len(self.keys))]  # (N, L, ...)


@dataclass(eq=False)
class RouterCapture(_PerLayer):
    """The router's decision per token and MoE layer: ``topk_expert`` (int16) and ``topk_weight``
    (float32, the weight as the model applies it), plus the per-commit ``expert_load``. Always on."""

    name: ClassVar[str] = "router"
    keys: ClassVar[tuple[str, ...]] = ("topk_ids", "topk_weights")

    def variables(self, spec) -> list[Variable]:
        return routing_variables(len(spec.layers), spec.n_experts, spec.top_k)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self._stacked()
        return to_host(ids), to_host(weights.float())

    def rows(self, payload, keep: np.ndarray) -> dict[str, np.ndarray]:
        ids, weights = payload
        return {"topk_expert": ids.numpy()[keep], "topk_weight": weights.numpy()[keep]}


def _dtype_option(value: str) -> str:
    if value not in LOGITS_DTYPES:
        raise RecorderError(f"logits dtype must be one of {LOGITS_DTYPES}, got {value!r}")
    return value


@dataclass(eq=False)
class LogitsCapture(_PerLayer):
    """The full router logits per token and MoE layer (as top-k saw them), ``router_logits``
    (token, moe_layer, expert) stored as ``dtype``."""

    name: ClassVar[str] = "logits"
    keys: ClassVar[tuple[str, ...]] = ("router_logits",)
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 or float32"})

    def bind(self, model, adapter, spec) -> None:
        _dtype_option(self.dtype)

    def variables(self, spec) -> list[Variable]:
        return [logits_variable(len(spec.layers), spec.n_experts, self.dtype)]

    def finish(self) -> torch.Tensor:
        (logits,) = self._stacked()
        return to_host(logits)

    def rows(self, payload, keep: np.ndarray) -> dict[str, np.ndarray]:
        return {"router_logits": payload.float().numpy()[keep]}


CAPTURES: dict[str, type[Capture]] = {}


def register_capture(cls: type[Capture]) -> type[Capture]:
    """Make ``cls`` available by name (``capture=("name",)``, CLI ``--capture name``)."""
    CAPTURES[cls.name] = cls
    return cls


for _cls in (RouterCapture, LogitsCapture):
    register_capture(_cls)


def _by_name(name: str, options: Mapping | None = None) -> Capture:
    cls = CAPTURES.get(name)
    if cls is None:
        raise RecorderError(f"unknown capture option {name!r}; choose from {sorted(CAPTURES)}")
    try:
        return cls(**dict(options or {}))
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        raise RecorderError(f"capture {name!r}: {e} (its options: {fields or 'none'})") from None


def make_captures(capture: Sequence | Mapping | str) -> list[Capture]:
    """Captures from names, Capture instances, or a mapping {name: options}; "router" always first.

    Raises RecorderError for an unknown name, bad options or a capture given twice."""
    if isinstance(capture, str):
        capture = (capture,)
    if isinstance(capture, Mapping):
        made = [_by_name(name, options) for name, options in capture.items()]
    else:
        made = []
        for c in capture:
            if not isinstance(c, (str, Capture)):
                raise RecorderError(f"capture entries must be names or Capture instances, got {type(c).__name__}")
            made.append(_by_name(c) if isinstance(c, str) else c)
    out: dict[str, Capture] = {}
    for c in made:
        if c.name in out:
            raise RecorderError(f"capture {c.name!r} given twice")
        out[c.name] = c
    router = out.pop("router", None) or RouterCapture()
    return [router, *out.values()]
