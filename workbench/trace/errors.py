"""Errors of the trace store."""
from __future__ import annotations

__all__ = ["TraceError", "NotATraceError", "UnknownSchemaError", "TraceExistsError", "TraceLockedError",
           "TraceWriteError", "TraceCorruptError"]


class TraceError(Exception):
    """Base class of the trace store errors."""


class NotATraceError(TraceError):
    """The path is not a workbench trace (no zarr v3 group with a workbench schema)."""


class UnknownSchemaError(TraceError):
    """The store is a workbench trace of a schema version this code does not read."""


class TraceExistsError(TraceError, FileExistsError):
    """``TraceWriter.create`` on a path that already holds something."""


class TraceLockedError(TraceError):
    """Another live writer holds the store's lock."""


class TraceWriteError(TraceError):
    """Writing a commit failed (e.g. disk full); the store holds everything committed before."""


class TraceCorruptError(TraceError):
    """The store is damaged inside its committed range: a missing or unreadable array, chunk or
    metadata file, or inconsistent root attributes. Reading on would show fill values as data.

    ``problems``: the :class:`workbench.trace.integrity.Problem` s found (one per damaged node)."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])
