"""``manifest.json`` of an export, kept equal to the files of the export that exist.

``export_all`` writes it first (replacing a previous export's manifest before any file is
replaced), then again after every file it writes, and once more at the end with the status. So
when a write fails half-way (a full disk), the manifest lists exactly the files written before;
if the manifest itself cannot be rewritten, the file it would have listed is removed (freeing
space) and the manifest on disk, one file older, is again exact.

Keys: ``status`` (``"running"``, ``"complete"`` or ``"failed"``), ``provenance`` (its ``routing`` and
``routing_rule`` say how the model routes), ``trace_provenance``, ``trace_routing`` (the trace's
``routing`` attribute as stored: per MoE layer score, renormalize, weight_applied_to, selection_bias,
n_group, topk_group, scale, shared_expert_gate..., and the rule text; ``{}`` when it has none),
``files`` (paths relative to the export folder), ``skipped`` ({artifact: why}), ``notes`` (e.g. text
that had to be escaped), ``failed`` ({artifact: error}, on failure).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping

from ._common import jsonable, write_text_atomic

__all__ = ["Manifest", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"


class Manifest:
    """The manifest of one export into ``out``."""

    def __init__(self, out: Path, provenance: Mapping[str, str], trace_provenance: Mapping[str, Any],
                 trace_routing: Mapping[str, Any] | None = None):
        self.out = Path(out)
        self.path = self.out / MANIFEST_NAME
        self.provenance = dict(provenance)
        self.trace_provenance = jsonable(dict(trace_provenance))
        self.trace_routing = jsonable(dict(trace_routing or {}))
        self.status = "running"
        self.files: list[str] = []
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.failed: dict[str, str] = {}

    def to_json(self) -> dict:
        out = {"status": self.status, "provenance": self.provenance, "trace_provenance": self.trace_provenance,
               "trace_routing": self.trace_routing, "files": list(self.files), "skipped": dict(self.skipped),
               "notes": list(self.notes)}
        if self.failed:
            out["failed"] = dict(self.failed)
        return out

    def save(self) -> Path:
        """Rewrite manifest.json (atomically: an OSError leaves the previous version)."""
        return write_text_atomic(self.path, json.dumps(self.to_json(), indent=1) + "\n")

    def add(self, path: Path) -> None:
        """Record a file just written; when the manifest cannot say so, remove the file (so that the
        manifest on disk stays exact) and re-raise."""
        path = Path(path)
        if path == self.path:
            return
        rel = str(path.relative_to(self.out))
        self.files.append(rel)
        try:
            self.save()
        except OSError:
            self.files.pop()
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def finish(self, status: str, failed: Mapping[str, str] | None = None) -> Path | None:
        """The final manifest; None when even that cannot be written (the previous one is exact)."""
        self.status = status
        self.failed.update(failed or {})
        try:
            return self.save()
        except OSError:
            return None
