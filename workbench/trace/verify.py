"""The full check of a trace store (``workbench verify STORE``): :func:`verify_trace`.

On top of the open-time structural check (:mod:`workbench.trace.integrity`: metadata readable and
consistent, every chunk file over the committed rows present and non-empty), it decodes every
chunk of every array over the committed rows, of the root and of every child group (vocabulary,
attention maps, other captures' groups), and checks what the decoded rows promise:

* integer variables hold values inside their declared ``valid_range`` (a ``-1`` is a fill value
  where data should be), float variables of the token table hold no NaN;
* ``commit_end`` rises strictly and ends at ``n_tokens``;
* each row of a count variable (``expert_load``) sums to the slots of its commit's tokens
  (tokens x top-k).

Child groups whose ``complete`` attribute is false (a write interrupted by a kill) are not
damage: readers ignore them; they are listed in ``notes``. Memory: one chunk at a time plus the
per-commit arrays.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from workbench.trace._util import quiet
from workbench.trace.errors import TraceCorruptError
from workbench.trace.integrity import (ArrayInfo, Problem, child_nodes, rows_text, array_problems, committed_lengths,
                                       root_problems)
from workbench.trace.reader import open_trace, required_arrays, read_root, trace_attrs
from workbench.trace.schema import COMMIT_END, VOCAB_GROUP, Variable

__all__ = ["verify_trace", "VerifyResult"]


class VerifyResult(list):
    """``list[Problem]`` (empty: the store is healthy) plus what was checked: ``n_tokens``,
    ``n_commits``, ``arrays`` and ``groups`` checked, ``chunks`` decoded, and ``notes``."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.n_tokens = self.n_commits = self.arrays = self.groups = self.chunks = 0
        self.notes: list[str] = []

    @property
    def ok(self) -> bool:
        return not self

    def summary(self) -> str:
        """One line: what was checked and the verdict."""
        what = (f"{self.n_tokens:,} tokens in {self.n_commits:,} commits; {self.arrays} arrays, {self.groups} groups, "
                f"{self.chunks:,} chunks decoded")
        return f"{self.path}: {what}: " + ("OK" if self.ok else f"DAMAGED ({len(self)} problem(s))")


def verify_trace(path: str | os.PathLike) -> VerifyResult:
    """Check the whole trace at ``path`` (see the module doc); returns the problems found.

    Raises FileNotFoundError / NotATraceError / UnknownSchemaError when ``path`` is not a trace
    this workbench reads; everything wrong inside a trace is returned, not raised."""
    p = Path(path)
    res = VerifyResult(p)
    try:
        meta = read_root(p)
    except TraceCorruptError as e:  # bad root attributes: nothing else can be located
        res.extend(e.problems or [Problem("", str(e))])
        return res
    attrs = trace_attrs(meta["attributes"])
    res.n_tokens, res.n_commits = lengths = committed_lengths(attrs)
    infos, problems = root_problems(p, meta, required_arrays(attrs))
    res.extend(problems)
    declared = {name: Variable.from_json(v) for name, v in attrs["variables"].items()}
    group_infos = _walk_groups(p, "", lengths, res)
    if attrs.get("has_vocab") and not (p / VOCAB_GROUP / "zarr.json").is_file():
        res.append(Problem(VOCAB_GROUP, "the root says the trace has a vocabulary, but the group is missing"))
    res.arrays = len(infos) + len(group_infos)
    decoded = {}
    for info in infos + group_infos:
        keep = info.node in (COMMIT_END, "batch_end") or (declared.get(info.node) and declared[info.node].per_commit)
        decoded[info.node] = _decode(p, info, declared.get(info.node), res, keep)
    _check_commits(attrs, declared, decoded, res)
    _check_counts(p, declared, decoded, res)
    if res.ok:  # what open_trace checks beyond the nodes: the root attributes against the arrays
        try:
            open_trace(p)
        except TraceCorruptError as e:
            res.extend(e.problems or [Problem("", str(e))])
    return res


def _walk_groups(path: Path, prefix: str, lengths: tuple[int, int], res: VerifyResult) -> list[ArrayInfo]:
    """Structural check of the arrays of every child group under ``prefix`` (complete groups only)."""
    infos = []
    for group in child_nodes(path, prefix)[1]:
        try:
            gattrs = json.loads((path / group / "zarr.json").read_bytes()).get("attributes") or {}
        except (OSError, ValueError, AttributeError) as e:
            res.append(Problem(group, f"its group zarr.json cannot be read ({type(e).__name__}: {e})"))
            continue
        if gattrs.get("complete") is False or ("token_end" in gattrs and int(gattrs["token_end"]) > lengths[0]):
            res.notes.append(f"group {group!r} is incomplete (a write was interrupted): readers ignore it")
            continue
        res.groups += 1
        for name in child_nodes(path, group)[0]:
            info, problems = array_problems(path, name, lengths)
            for pr in problems:
                res.append(Problem(pr.node, pr.what, pr.rows))
            if info is not None:
                infos.append(info)
        infos += _walk_groups(path, group, lengths, res)
    return infos


# (capture, variable) whose NaN is data, not damage: a token without an attribution target (the last
# token of its forward pass has no next token within it) holds NaN there (hooks/experts.py)
NAN_BY_DESIGN = frozenset({("attribution", "attribution"), ("attribution", "attribution_shared")})


def _decode(path: Path, info: ArrayInfo, var: Variable | None, res: VerifyResult, keep: bool) -> np.ndarray | None:
    """Decode every present chunk of one array over its committed rows; record the problems. Returns
    the committed rows when ``keep`` (small per-commit arrays) and every chunk decoded."""
    import zarr
    from zarr.storage import LocalStore

    with quiet():
        arr = zarr.open_array(store=LocalStore(path, read_only=True), path=info.node, mode="r")
    rows_per_chunk = int(info.meta.chunk_grid.chunk_shape[0]) if info.meta.shape else 1
    bad: dict[str, list[int]] = {}
    errors: list[str] = []
    parts: list[tuple[int, np.ndarray]] = []
    lo, hi = (var.valid_range if var is not None and var.valid_range is not None else (None, None))
    check_finite = var is not None and np.dtype(var.dtype).kind == "f" and not var.per_commit
    nan_ok = var is not None and (var.capture, var.name) in NAN_BY_DESIGN
    blosc = bool(info.meta.codecs) and type(info.meta.codecs[-1]).__name__ == "BloscCodec"
    for idx in info.chunks:
        key = info.meta.encode_chunk_key(idx)
        frame = _blosc_frame_problem(path / info.node / key) if blosc else None
        if frame is not None:
            bad.setdefault("decode", []).append(idx[0] if idx else 0)
            errors.append(f"{key} ({frame})")
            continue
        try:
            block = np.asarray(arr.get_block_selection(idx))
        except Exception as e:  # blosc / codec errors have no common base class
            bad.setdefault("decode", []).append(idx[0] if idx else 0)
            errors.append(f"{key} ({type(e).__name__}: {e})")
            continue
        res.chunks += 1
        if info.meta.shape:  # only the committed rows of the tail chunk count
            block = block[:max(0, info.rows - idx[0] * rows_per_chunk)]
        if lo is not None and block.size and (block.min() < lo or block.max() > hi):
            bad.setdefault("range", []).append(idx[0])
        if check_finite and block.size and not (np.isfinite(block) | (nan_ok & np.isnan(block))).all():
            bad.setdefault("nan", []).append(idx[0])
        if keep:
            parts.append((idx[0], block))
    say = {"decode": f"chunk(s) cannot be decoded: {'; '.join(errors[:3])}" + (" ..." if len(errors) > 3 else ""),
           "range": f"values outside the declared range [{lo}, {hi}] (e.g. -1: a fill value where data belongs)",
           "nan": "NaN or infinite values in the token table" if not nan_ok else "infinite values in the token table"}
    for kind, idx in bad.items():
        res.append(Problem(info.node, say[kind], rows_text(info.unit, idx, rows_per_chunk, info.rows)))
    if not keep or "decode" in bad or len(parts) * rows_per_chunk < info.rows:
        return None
    parts.sort(key=lambda t: t[0])
    return np.concatenate([b for _, b in parts]) if parts else np.zeros((0,) + tuple(info.meta.shape[1:]))


def _blosc_frame_problem(file: Path) -> str | None:
    """What is wrong with a blosc chunk file's frame, or None. Blosc does not check that the frame is
    whole when the data was stored uncompressed (small or incompressible chunks): a truncated file
    then "decodes" into whatever memory follows. The 16-byte header says the frame's size."""
    raw = file.read_bytes()
    if len(raw) < 16:
        return f"{len(raw)} bytes: shorter than a blosc header"
    cbytes = int.from_bytes(raw[12:16], "little")
    if cbytes != len(raw):
        return f"truncated or padded: its blosc header says {cbytes} bytes, the file has {len(raw)}"
    return None


def _check_commits(attrs: dict, declared: dict[str, Variable], decoded: dict, res: VerifyResult) -> None:
    """``commit_end`` rises to ``n_tokens``; each count row sums to its commit's top-k slots."""
    name = COMMIT_END if COMMIT_END in decoded else "batch_end"
    ends = decoded.get(name)
    if ends is None:
        return  # missing or undecodable: already reported
    ends = np.asarray(ends, np.int64)
    n = res.n_tokens
    starts = np.concatenate([[0], ends[:-1]])
    if ends.size and (np.any(ends <= starts) or ends[-1] != n):
        res.append(Problem(name, f"the token counts after each commit do not rise strictly to n_tokens = {n} "
                                 f"(last: {int(ends[-1])})"))
        return
    for vname, var in declared.items():
        counts = decoded.get(vname)
        if not var.per_commit or counts is None or "count" not in (var.reduce or {}):
            continue
        src = declared.get(var.reduce["count"])
        per_token = int(src.row_shape[1]) if src is not None and len(src.row_shape) > 1 else 1
        want = (ends - starts)[:, None] * per_token
        wrong = np.flatnonzero(np.any(np.asarray(counts, np.int64).sum(-1) != want, axis=1))
        if wrong.size:
            res.append(Problem(vname, f"per-commit counts do not sum to the commit's tokens x {per_token} slots "
                                      f"in {wrong.size} commit(s)", rows_text("commits", wrong.tolist(), 1, ends.size)))


# Token rows read at a time when recounting a count variable's source (int16 ids: a few MiB per layer).
_RECOUNT_ROWS = 1 << 18


def _check_counts(path: Path, declared: dict[str, Variable], decoded: dict, res: VerifyResult) -> None:
    """Each per-commit count row (``expert_load``) equals the count of its commit's rows of the array it
    counts (``topk_expert``): the analyses read the counts instead of the ids, so a flipped id or count
    would change a load figure silently. Skipped when either is already reported damaged."""
    import zarr
    from zarr.storage import LocalStore

    ends = decoded.get(COMMIT_END)
    damaged = {p.node for p in res}
    if ends is None or COMMIT_END in damaged:
        return
    ends = np.asarray(ends, np.int64)
    n = int(ends[-1]) if ends.size else 0
    for vname, var in declared.items():
        counts = decoded.get(vname)
        src = (var.reduce or {}).get("count")
        if not var.per_commit or counts is None or src is None or {vname, src} & damaged:
            continue
        A, N = var.row_shape
        with quiet():
            arr = zarr.open_array(store=LocalStore(path, read_only=True), path=src, mode="r")
        got = np.zeros((ends.size, A, N), np.int64)
        for r0 in range(0, n, _RECOUNT_ROWS):
            block = np.asarray(arr[r0:min(n, r0 + _RECOUNT_ROWS)], np.int64).reshape(-1, A, arr.shape[-1])
            commit = np.searchsorted(ends, np.arange(r0, r0 + block.shape[0]), side="right")
            flat = (commit[:, None, None] * A + np.arange(A)[None, :, None]) * N + block
            got += np.bincount(flat.ravel(), minlength=ends.size * A * N).reshape(ends.size, A, N)
        wrong = np.flatnonzero(np.any(got != np.asarray(counts, np.int64).reshape(ends.size, A, N), axis=(1, 2)))
        if wrong.size:
            res.append(Problem(vname, f"per-commit counts differ from a count of the {src} rows of {wrong.size} "
                                      "commit(s): one of the two was altered", rows_text("commits", wrong.tolist(), 1,
                                                                                         ends.size)))
