"""The cheap structural check of a trace store, run by every reader at open time.

zarr reads a chunk that does not exist as the array's fill value, so a deleted chunk file, a
deleted array (still described by the consolidated metadata) or a chunk lost to a bad copy would
read back as ``-1`` token ids and NaN weights, silently. The writer writes every chunk of every
row it commits (``write_empty_chunks``, :mod:`workbench.trace.writer`), and trace data never equals
the fill value (-1 for integers, whose valid values are >= 0; NaN for floats), so inside the
committed range an absent chunk is always damage. This module checks, without decoding anything:

* the committed lengths: ``n_tokens`` / ``n_commits`` are non-negative integers, and no more
  commits than tokens (every commit holds at least one token);
* every array: its ``zarr.json`` exists and is valid zarr v3 array metadata, it agrees with the
  consolidated metadata in the root ``zarr.json`` (when present: that is what ``xr.open_zarr``
  reads instead), it holds the committed rows, and every chunk file over the committed rows
  exists and is not empty.

Which rows are committed depends on an array's first dimension: ``token`` -> ``n_tokens``,
``commit`` (v1: ``batch``) -> ``n_commits``, anything else (coordinates, child groups) -> the
whole array. The cost is one ``stat`` per chunk (about 10,000 for 10M tokens of Scout with router
logits) and one small JSON read per array. Decoding every chunk is :func:`workbench.trace.verify.verify_trace`.

Limitation: a v1 trace, or one written by a workbench without ``write_empty_chunks``, may lack a
chunk whose rows were all fill values (zarr skipped it). Only an all-NaN chunk of a float
variable (NaN router weights) could be such a chunk; it is reported as missing.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Mapping

from workbench.trace.errors import TraceCorruptError
from workbench.trace.schema import COMMIT, TOKEN

__all__ = ["Problem", "ArrayInfo", "committed_lengths", "array_problems", "root_problems", "group_problems",
           "check_root", "check_group", "raise_problems", "child_nodes", "rows_text", "read_array_json"]

# the first dimension of an array -> which committed length covers it (v1 called a commit a batch)
_ROW_DIMS = {TOKEN: "tokens", COMMIT: "commits", "batch": "commits"}
_COMPARED = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs", "fill_value", "dimension_names")
_SHOWN = 5  # problems / chunk keys named in one message


@dataclass(frozen=True)
class Problem:
    """One damaged node of a store. node: array or group path inside the store (``""``: the root);
    what: what is wrong; rows: the affected rows (``"tokens 0-16383"``), when known."""

    node: str
    what: str
    rows: str | None = None

    def __str__(self) -> str:
        where = f"array {self.node!r}" if self.node else "root"
        text = f"{where}: {self.what}" + (f" ({self.rows})" if self.rows else "")
        return " ".join(text.split())  # one line, whatever the error messages inside hold


@dataclass
class ArrayInfo:
    """What :func:`array_problems` learnt about an array whose metadata is readable."""

    node: str
    meta: Any  # zarr ArrayV3Metadata
    rows: int  # rows of the first dimension that must be present
    unit: str  # "tokens", "commits" or "rows"
    chunks: list[tuple[int, ...]]  # chunk coordinates over those rows whose files exist


def committed_lengths(attrs: Mapping[str, Any]) -> tuple[int, int]:
    """``(n_tokens, n_commits)`` of root attributes (v1: ``n_batches``), checked: non-negative
    integers (not bools), and no more commits than tokens. Raises TraceCorruptError."""
    out = []
    for key in ("n_tokens", "n_commits" if "n_commits" in attrs else "n_batches"):
        v = attrs.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TraceCorruptError(f"root attribute {key} = {v!r} is not a non-negative integer (damaged trace)",
                                    [Problem("", f"attribute {key} = {v!r} is not a non-negative integer")])
        out.append(v)
    n, nc = out
    if nc > n:
        what = f"attributes say {nc} commits but only {n} tokens (every commit holds at least one token)"
        raise TraceCorruptError(f"root {what} (damaged trace)", [Problem("", what)])
    return n, nc


def rows_text(unit: str, idx: Iterable[int], rows_per_chunk: int, n: int) -> str:
    """``"tokens 0-16383, 32768-40000 of 50000 committed"``: the rows of the given chunk indices
    (along the first dimension), clipped to the ``n`` committed rows."""
    spans: list[list[int]] = []
    for i in sorted(set(idx)):
        a, b = i * rows_per_chunk, min((i + 1) * rows_per_chunk, n) - 1
        if spans and spans[-1][1] == a - 1:
            spans[-1][1] = b
        else:
            spans.append([a, b])
    body = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"{unit} {body} of {n}" + (" committed" if unit != "rows" else "")


def _keys_text(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def read_array_json(path: Path, node: str) -> tuple[dict | None, Problem | None]:
    """The parsed ``zarr.json`` of array ``node``, or a Problem saying why it cannot be read."""
    zj = path / node / "zarr.json"
    try:
        raw = json.loads(zj.read_bytes())
    except FileNotFoundError:
        return None, Problem(node, "its zarr.json is missing (the array was deleted or never written)")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, Problem(node, f"its zarr.json cannot be read ({type(e).__name__}: {e})")
    if not isinstance(raw, dict) or raw.get("zarr_format") != 3 or raw.get("node_type") != "array":
        return None, Problem(node, "its zarr.json is not zarr v3 array metadata")
    return raw, None


def array_problems(path: Path, node: str, lengths: tuple[int, int], consolidated: Mapping | None = None
                   ) -> tuple[ArrayInfo | None, list[Problem]]:
    """Check one array of the store at ``path`` without decoding: metadata readable (and equal to
    its ``consolidated`` entry when given), the committed rows present, each chunk file over them
    existing and non-empty. ``lengths``: ``(n_tokens, n_commits)``."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    raw, problem = read_array_json(path, node)
    if problem is not None:
        return None, [problem]
    try:
        meta = ArrayV3Metadata.from_dict(dict(raw))
    except Exception as e:  # zarr raises TypeError, ValueError, KeyError... for bad metadata
        return None, [Problem(node, f"its zarr.json is not valid array metadata ({type(e).__name__}: {e})")]
    problems = []
    if consolidated is not None:
        differ = [k for k in _COMPARED if consolidated.get(k) != raw.get(k)]
        if differ:
            problems.append(Problem(node, "its zarr.json disagrees with the consolidated metadata in the root "
                                          f"zarr.json on {', '.join(differ)} (readers would use the wrong one)"))
    dims = tuple(meta.dimension_names or ())
    unit = _ROW_DIMS.get(dims[0], "rows") if dims else "rows"
    shape = tuple(int(s) for s in meta.shape)
    rows = lengths[0] if unit == "tokens" else lengths[1] if unit == "commits" else (shape[0] if shape else 1)
    if shape and shape[0] < rows:
        problems.append(Problem(node, f"it has {shape[0]} rows but {rows} {unit} are committed",
                                f"{unit} {shape[0]}-{rows - 1} of {rows} committed"))
        return None, problems
    grid = getattr(meta.chunk_grid, "chunk_shape", None)
    if grid is None:  # not a regular grid: nothing this workbench writes; nothing to check
        return ArrayInfo(node, meta, rows, unit, []), problems
    counts = [-(-rows // grid[0])] + [-(-s // c) for s, c in zip(shape[1:], grid[1:])] if shape else []
    present, missing, empty = [], {}, {}
    for idx in product(*(range(c) for c in counts)):
        key = meta.encode_chunk_key(idx)
        try:
            st = os.stat(path / node / key)
        except FileNotFoundError:
            missing.setdefault(idx[0] if idx else 0, []).append(key)
            continue
        except OSError as e:
            missing.setdefault(idx[0] if idx else 0, []).append(f"{key} ({e.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            empty.setdefault(idx[0] if idx else 0, []).append(key)
        else:
            present.append(idx)
    per_chunk = grid[0] if shape else 1
    for found, say in ((missing, "missing"), (empty, "empty or not a file")):
        if found:
            keys = [k for ks in found.values() for k in ks]
            problems.append(Problem(node, f"chunk{'s' if len(keys) > 1 else ''} {_keys_text(keys)} "
                                          f"{'are' if len(keys) > 1 else 'is'} {say}",
                                    rows_text(unit, found, per_chunk, rows)))
    return ArrayInfo(node, meta, rows, unit, present), problems


def child_nodes(path: Path, prefix: str = "") -> tuple[list[str], list[str]]:
    """(arrays, groups) directly under the group at ``path/prefix``: directories with a zarr.json,
    sorted (the lock, temp files and anything else are not zarr nodes and are ignored)."""
    arrays, groups = [], []
    base = path / prefix if prefix else path
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return arrays, groups
    for e in entries:
        if not e.is_dir() or e.name.startswith("."):
            continue
        node = f"{prefix}/{e.name}" if prefix else e.name
        try:
            kind = json.loads((Path(e.path) / "zarr.json").read_bytes()).get("node_type")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            kind = "array"  # unreadable metadata: array_problems names it
        (groups if kind == "group" else arrays).append(node)
    return arrays, groups


def root_problems(path: Path, meta: Mapping[str, Any],
                  declared: Iterable[str]) -> tuple[list[ArrayInfo], list[Problem]]:
    """Check every array of the trace root: the ``declared`` ones (which must exist) and any other
    array found on disk or in the consolidated metadata. ``meta``: the root zarr.json."""
    attrs = meta.get("attributes") or {}
    lengths = committed_lengths(attrs)
    cons = ((meta.get("consolidated_metadata") or {}).get("metadata")) if isinstance(meta, Mapping) else None
    cons = cons if isinstance(cons, Mapping) else None
    names = list(dict.fromkeys(list(declared) + child_nodes(path)[0]
                               + [k for k, v in (cons or {}).items()
                                  if "/" not in k and isinstance(v, Mapping) and v.get("node_type") == "array"]))
    infos, problems = [], []
    for name in names:
        entry = cons.get(name) if cons is not None else None
        info, found = array_problems(path, name, lengths, entry if isinstance(entry, Mapping) else None)
        if info is None and found and "zarr.json is missing" in found[0].what:
            n = _row_count(entry, lengths)
            found = [Problem(name, "the array is missing (no zarr.json: deleted or never written)", n)]
        problems += found
        if info is not None:
            infos.append(info)
    return infos, problems


def _row_count(entry: Mapping | None, lengths: tuple[int, int]) -> str | None:
    """The committed rows of a missing array, from its consolidated entry (when there is one)."""
    dims = (entry or {}).get("dimension_names") or []
    unit = _ROW_DIMS.get(dims[0]) if dims else None
    if unit is None:
        return None
    n = lengths[0] if unit == "tokens" else lengths[1]
    return f"all {n} committed {unit}" if n else None


def group_problems(path: Path, group: str, lengths: tuple[int, int]) -> tuple[list[ArrayInfo], list[Problem]]:
    """Check every array of the child group ``group`` (whole arrays: a group is written in one go)
    and of its subgroups."""
    infos, problems = [], []
    arrays, groups = child_nodes(path, group)
    for name in arrays:
        info, found = array_problems(path, name, lengths)
        problems += found
        if info is not None:
            infos.append(info)
    for sub in groups:
        i, p = group_problems(path, sub, lengths)
        infos += i
        problems += p
    return infos, problems


def raise_problems(path: Path, problems: list[Problem]) -> None:
    """Raise one TraceCorruptError naming the damaged arrays and rows (nothing when there are none)."""
    if not problems:
        return
    shown = "; ".join(str(p) for p in problems[:_SHOWN])
    more = f"; and {len(problems) - _SHOWN} more problem(s)" if len(problems) > _SHOWN else ""
    raise TraceCorruptError(f"{path} is damaged: {shown}{more}. Reading on would show fill values (-1, NaN) as "
                            f"data; `workbench verify {path}` checks the whole store", problems)


def check_root(path: Path, meta: Mapping[str, Any], declared: Iterable[str]) -> None:
    """:func:`root_problems`, raised as a TraceCorruptError (what ``open_trace`` runs)."""
    try:
        _, problems = root_problems(path, meta, declared)
    except TraceCorruptError as e:
        raise TraceCorruptError(f"{path}: {e}", e.problems) from None
    raise_problems(path, problems)


def check_group(path: Path, group: str, n_tokens: int = 0) -> None:
    """:func:`group_problems`, raised as a TraceCorruptError (what ``open_group`` runs)."""
    raise_problems(path, group_problems(path, group, (int(n_tokens), 0))[1])
