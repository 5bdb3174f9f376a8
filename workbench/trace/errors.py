"""Errors of the trace store."""
from __future__ import annotations

__all__ = ["TraceError", "NotATraceError", "UnknownSchemaError", "TraceExistsError", "TraceLockedError",
           "TraceWriteError"]


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
