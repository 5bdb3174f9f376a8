"""Writing a trace: :class:`TraceWriter` appends token rows of declared variables, commit by commit.

The writer knows no capture: it writes whatever :class:`~workbench.trace.schema.Variable` s it
was created with (the core columns always), the same way for all of them.

Commit protocol and crash safety
--------------------------------
The committed length lives in the root attributes ``n_tokens`` / ``n_commits``, written only after
all data they cover, and every reader trims to them. One commit is:

1. (rarely) grow the arrays' declared length (``zarr.json`` ``shape``) to a capacity: the new end
   rounded up to whole chunks of the widest-chunked array on that dimension (so the arrays of one
   dimension keep one length, and their metadata is rewritten once per that many rows, not per
   commit). Rows past ``n_tokens`` read as fill values and are never shown; ``close`` sets the
   exact lengths;
2. for every array, write the chunks that changed: the tail chunk (its committed rows, kept in
   memory, plus the new rows, fill-padded as zarr stores an edge chunk) and any new chunks. Only
   those are encoded; chunks are encoded and written directly (:mod:`workbench.trace.chunks`,
   byte-identical to zarr's own write), on two threads when they are large (>= 2 MiB);
3. (``fsync=True`` only) fsync the chunk files and metadata just written;
4. rewrite the root ``zarr.json`` with the new ``n_tokens`` / ``n_commits``.

Every file is written as temp file + rename (as zarr's LocalStore does; over an existing file, an
atomic exchange of the two names, :func:`workbench.trace.chunks.write_atomic`), so a chunk file is
either the old or the new version, never torn. SIGKILL at any moment therefore leaves a store whose rows
``[0, n_tokens)`` are exactly the committed rows; rows past ``n_tokens`` are ignored by
``open_trace`` and truncated by ``TraceWriter.resume``, which also removes leftover ``*.partial``
temp files. Without ``fsync`` a commit survives the death of the process (data is in the page
cache), not a power cut. Cost: about 1-2 ms per commit for a routing trace on a 2-core CPU.

When is an append committed? By default (``min_commit_tokens=0``) every ``append`` commits before
it returns. With ``min_commit_tokens=N`` appends are staged in memory until at least N tokens are
staged, then committed in one write (fewer chunk rewrites for small appends such as decoding
steps); ``commit()`` forces a commit, ``close()`` commits what is staged.

Chunking, compression, sharding
-------------------------------
* Chunks span the full row (all MoE layers, all k / experts) and are sized along the first
  dimension to at least ``chunk_bytes`` = 1 MiB uncompressed (the next power of two of rows), at
  most 16384 rows; per-commit arrays to 64 KiB. A commit re-encodes each array's tail chunk, fill
  padding included, so the cap keeps narrow columns from huge chunks. Scout (48 MoE layers, top-1,
  16 experts): topk_expert 96 B/token -> 16384 tokens, router_logits float16 1536 B -> 1024,
  token_id 4 B and modality 1 B -> 16384 (stores written before the cap have 262144 / 1048576, or
  65536 rows: read and resume the same).
* Compression: blosc lz4 level 5. ``codec="int"`` (token ids, sequence, modality, expert ids,
  loads) uses bit-shuffle: small value ranges leave most bit planes constant (topk_expert with 16
  experts ~4x, modality ~8x); ``"sequential"`` (position: runs of consecutive integers) byte
  shuffle (~200x); ``"float"`` byte shuffle (mantissas barely compress: ~1.2x). lz4 rather than
  zstd: every commit re-encodes each array's tail chunk; zstd gave the same ratios within a few
  percent at 2-6x lower encode speed.
* No sharding: a shard is rewritten in full on any partial write and appends are never
  shard-aligned (measured 0.5-0.6x the unsharded append rate, benchmarks/store_throughput.py), and
  concurrent partial writes to one shard lose data. The price is about one file per MiB of data.

Memory: per array at most one chunk of tail rows plus the staged rows, and the running totals of
the count variables: it does not grow with the run length. One writer may be used from several
threads; calls are serialised internally.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from workbench.trace import vocab as _vocab
from workbench.trace._util import jsonable, now, quiet, versions
from workbench.trace.chunks import ChunkFiles, Column, write_json
from workbench.trace.errors import (NotATraceError, TraceError, TraceExistsError, TraceWriteError,
                                    UnknownSchemaError)
from workbench.trace.lock import BREAK_NAME, LOCK_NAME, Lock
from workbench.trace.reader import loads_dataarray, read_root
from workbench.trace.schema import (ATTENTION_GROUP, COMMIT, COMMIT_END, CORE_VARIABLES, LAYER_COORD,
                                    MOE_LAYER, SCHEMA, TOKEN, VOCAB_GROUP, MoELayerRouting, Variable,
                                    routing_description)

__all__ = ["TraceWriter", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 1 << 20
# Rows per chunk: at most this many (every commit re-encodes each array's whole tail chunk, fill
# padding included: a 1 MiB chunk of a 1-byte column would hold 1M rows for a few new ones), and
# for the per-commit arrays (one row per commit) chunks of 64 KiB. 16384 rather than 65536: the
# commit at the end of a short recording (18 prompts of the embedded model) 3.2 -> ~2.5 ms, about
# one point of capture overhead (benchmarks/RESULTS.md, "Capture overhead, round 3"); real models'
# wide arrays (48 layers) have <= 16384-row chunks anyway.
_MAX_CHUNK_ROWS = 1 << 14
_COMMIT_CHUNK_BYTES = 1 << 16
_ARRAY_CONFIG = {"write_empty_chunks": True}  # skip zarr's all-fill check: our rows are never fill
_COMMIT_END = Variable(COMMIT_END, (COMMIT,), (), "int64", reduce={"end": TOKEN},
                       attrs={"long_name": "token count after each commit"})
_RESERVED = {COMMIT_END, LAYER_COORD, VOCAB_GROUP, ATTENTION_GROUP}


def codec(kind: str) -> BloscCodec:
    """Blosc settings by kind of data (``Variable.codec``)."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle" if kind == "int" else "shuffle")


def fill_value(dtype) -> Any:
    return float("nan") if np.dtype(dtype).kind == "f" else -1


def _chunk_rows(row_bytes: int, chunk_bytes: int) -> int:
    need = max(1, -(-int(chunk_bytes) // max(1, int(row_bytes))))
    return min(_MAX_CHUNK_ROWS, 1 << (need - 1).bit_length())


class _TraceColumn(Column):
    """A :class:`~workbench.trace.chunks.Column` and its declaration."""

    __slots__ = ("var",)

    def __init__(self, var: Variable, files: ChunkFiles, n: int, tail_rows: np.ndarray):
        super().__init__(files, n, tail_rows)
        self.var = var

    @property
    def name(self) -> str:
        return self.var.name


def _column(root: zarr.Group, path: Path, var: Variable, n_committed: int) -> _TraceColumn:
    """The appendable column of variable ``var`` with ``n_committed`` committed rows."""
    files = ChunkFiles.for_array(path / var.name)
    if files is None:
        raise TraceError(f"{path}: array {var.name!r} has a layout this writer does not append to (codecs, chunk "
                         "grid or chunk keys differ from what TraceWriter.create makes)")
    start = (n_committed // files.rows) * files.rows
    tail = root[var.name][start:n_committed] if n_committed > start else np.empty((0,) + var.row_shape, var.dtype)
    return _TraceColumn(var, files, n_committed, np.asarray(tail))


def _as_numpy(name: str, x: Any) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e


def _check_values(var: Variable, a: np.ndarray) -> None:
    want_int = np.dtype(var.dtype).kind in "iu"
    if want_int and a.dtype.kind not in "iu":
        raise TypeError(f"{var.name}: expected an integer array, got dtype {a.dtype} (shape {a.shape})")
    if not want_int and a.dtype.kind != "f":
        raise TypeError(f"{var.name}: expected a floating-point array, got dtype {a.dtype} (shape {a.shape})")
    if var.valid_range is not None and a.size:
        lo, hi = var.valid_range
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            raise ValueError(f"{var.name}: values must lie in [{lo}, {hi}], got min {mn} and max {mx} "
                             f"(shape {a.shape})")


def _count_rows(var: Variable, source: np.ndarray) -> np.ndarray:
    """The ``{"count": X}`` reduce: (A, N) counts of the values of X (token, A, S) per a."""
    A, N = var.row_shape
    # int32 offsets (A * N is small): the int16 ids widen once, to half the bytes of int64 (16384
    # tokens x 48 layers: 3.0 -> 1.3 ms per commit)
    flat = (source + (np.arange(A, dtype=np.int32) * N)[None, :, None]).ravel()
    return np.bincount(flat, minlength=A * N).reshape(A, N)


class TraceWriter:
    """Append-only writer of a ``workbench.trace/2`` store. Build with ``create`` or ``resume``.

    * ``append(rows)`` validates one append of N tokens (every token variable); with the default
      ``min_commit_tokens=0`` it is committed (data written, then ``n_tokens``) before it returns.
    * ``commit()`` writes what is staged; ``close()`` commits, marks the trace complete,
      consolidates the metadata and releases the lock. Used as a context manager, an exception
      in the block closes with ``complete=False`` (committed data stays; ``resume`` continues).
    * After a failed write (``TraceWriteError``) the writer refuses further appends; ``close()``
      then only truncates back to the committed length (best effort) and releases the lock.
    """

    # -- construction --------------------------------------------------------------------------

    def __init__(self, path: Path, root: zarr.Group, lock: Lock, *, fsync: bool, min_commit_tokens: int):
        self._path = path
        self._root = root
        self._lock = lock
        self._finalizer = weakref.finalize(self, Lock._release, lock.path, lock.token)
        self._fsync = bool(fsync)
        self._min_commit = int(min_commit_tokens)
        self._mutex = threading.RLock()
        attrs = dict(root.attrs)
        self._root_attrs = attrs  # what the root zarr.json holds; rewritten by _write_root
        self._moe_layers = [int(x) for x in attrs["moe_layers"]]
        self._n_experts = int(attrs["n_experts"])
        self._top_k = int(attrs["top_k"])
        self._provenance = dict(attrs.get("provenance") or {})
        self._n_tokens = int(attrs["n_tokens"])
        self._n_commits = int(attrs["n_commits"])
        variables = [Variable.from_json(v) for v in attrs["variables"].values()]
        self._variables = {v.name: v for v in variables}
        self._tok_cols = [_column(root, path, v, self._n_tokens) for v in variables if not v.per_commit]
        self._commit_cols = [_column(root, path, v, self._n_commits) for v in variables if v.per_commit]
        self._commit_cols.append(_column(root, path, _COMMIT_END, self._n_commits))
        # running totals of the count variables (e.g. expert loads), from what is committed
        self._totals = {c.name: (np.asarray(root[c.name][:self._n_commits], np.int64).sum(0) if self._n_commits
                                 else np.zeros(c.var.row_shape, np.int64))
                        for c in self._commit_cols if c.var.reduce and "count" in c.var.reduce}
        self._staged: list[dict[str, np.ndarray]] = []
        self._staged_tokens = 0
        self._failed: BaseException | None = None
        self._closed = False

    @classmethod
    def create(cls, path: str | os.PathLike, *, routing: Sequence[MoELayerRouting], variables: Sequence[Variable],
               captures: Mapping[str, Mapping] | None = None, routing_rule: str = "",
               attrs: Mapping[str, Any] | None = None, vocab: Sequence[str] | None = None, overwrite: bool = False,
               min_commit_tokens: int = 0, fsync: bool = False,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "TraceWriter":
        """Create a new trace at ``path`` and return its writer (holding the lock).

        routing: one :class:`MoELayerRouting` per MoE layer, in decoder order (the ``layer``
        coordinate, the ``moe_layer`` / ``expert`` / ``k`` sizes and the ``routing`` attribute).
        variables: the captures' arrays (the core columns are added). captures: capture name ->
        its options (stored for ``resume`` checks and ``workbench info``). attrs: provenance dict
        (JSON types), stored with versions and timestamps added. vocab: token strings (index =
        token id) for ``open_trace(..., tokens=True)``. overwrite: replace an existing trace (never
        anything that is not a trace). chunk_bytes: minimum uncompressed chunk size.
        """
        path = Path(path)
        routing = list(routing)
        variables = _check_variables(routing, variables)
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if int(min_commit_tokens) < 0:
            raise ValueError(f"min_commit_tokens must be >= 0, got {min_commit_tokens}")
        provenance = jsonable(dict(attrs or {}), "attrs")
        captures = jsonable(dict(captures or {}), "captures")
        vocab = _vocab.checked(vocab)
        _claim(path, overwrite)
        lock = Lock.acquire(path)
        try:
            _clear(path)
            store = LocalStore(path)
            root = zarr.create_group(store=store, zarr_format=3, attributes=_root_attributes(
                routing, routing_rule, variables, captures, provenance, vocab is not None))
            for var in variables + [_COMMIT_END]:
                _create_array(root, var, chunk_bytes)
            layer = root.create_array(LAYER_COORD, shape=(len(routing),), chunks=(len(routing),), dtype="int32",
                                      fill_value=-1, dimension_names=[MOE_LAYER],
                                      attributes={"long_name": "decoder layer index of the MoE layer"})
            layer[:] = np.asarray([r.layer for r in routing], np.int32)
            if vocab is not None:
                _vocab.write(root, vocab)
            root = zarr.open_group(store=store, mode="r+", use_consolidated=False)
            return cls(path, root, lock, fsync=fsync, min_commit_tokens=min_commit_tokens)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike, *, reopen: bool = False, min_commit_tokens: int = 0,
               fsync: bool = False) -> "TraceWriter":
        """Reopen an incomplete trace and continue after its committed ``n_tokens``.

        Anything past the committed length (rows of an interrupted commit, leftover temp files) is
        removed. A stale lock of a dead writer is taken over with a warning. A complete trace is
        refused unless ``reopen=True`` (it is then marked incomplete again until the next close).
        """
        path = Path(path)
        read_root(path)
        lock = Lock.acquire(path)
        try:
            attrs = read_root(path)["attributes"]  # re-read under the lock
            if attrs["schema"] != SCHEMA:
                raise TraceError(f"{path} is a {attrs['schema']} trace: it opens for reading, but only the "
                                 f"workbench version that wrote it can continue it")
            if attrs.get("complete") and not reopen:
                raise TraceError(f"{path} is a complete trace (n_tokens={attrs['n_tokens']}): nothing to resume "
                                 "(TraceWriter.resume(path, reopen=True) appends to it anyway)")
            root = zarr.open_group(store=LocalStore(path), mode="r+", use_consolidated=False)
            _truncate_to_committed(path, root, attrs)
            for p in path.rglob("*.partial"):
                with contextlib.suppress(OSError):
                    p.unlink()
            root.update_attributes({"complete": False})  # also drops consolidated metadata
            return cls(path, root, lock, fsync=fsync, min_commit_tokens=min_commit_tokens)
        except BaseException:
            lock.release()
            raise

    # -- properties ----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def n_tokens(self) -> int:
        """Committed tokens (what a reader sees)."""
        return self._n_tokens

    @property
    def n_commits(self) -> int:
        return self._n_commits

    @property
    def n_staged(self) -> int:
        """Tokens appended but not yet committed (always 0 with min_commit_tokens=0)."""
        return self._staged_tokens

    @property
    def moe_layers(self) -> list[int]:
        return list(self._moe_layers)

    @property
    def n_experts(self) -> int:
        return self._n_experts

    @property
    def top_k(self) -> int:
        return self._top_k

    @property
    def variables(self) -> dict[str, Variable]:
        """The declared variables (core columns included), by name."""
        return dict(self._variables)

    @property
    def attrs(self) -> dict:
        """The root attributes as they were when the writer opened the store (captures, routing...)."""
        return dict(self._root.attrs)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._failed else "open")
        return f"<TraceWriter {self._path} n_tokens={self._n_tokens} {state}>"

    # -- writing -------------------------------------------------------------------------------

    def append(self, rows: Mapping[str, Any] | None = None, **kw: Any) -> int:
        """Append N token rows: one array per token variable (numpy, or CPU/GPU torch tensors).

        Shapes: (N,) + the variable's row shape. Integer inputs of any width are range-checked and
        stored as the declared dtype; float inputs are cast. Returns the committed ``n_tokens``
        after the call. Raises ValueError / TypeError naming the variable for a missing, extra or
        mis-shaped array. ``generated`` may be left out: the rows are then prompt tokens (0).
        """
        rows = {**(rows or {}), **kw}
        with self._mutex:
            self._check_writable()
            batch = self._validate(rows)
            n = batch[self._tok_cols[0].name].shape[0]
            if n == 0:
                return self._n_tokens
            self._staged.append(batch)
            self._staged_tokens += n
            if self._staged_tokens >= self._min_commit:
                self._commit_locked()
            return self._n_tokens

    def commit(self) -> int:
        """Write the staged rows, then ``n_tokens``. Returns the committed ``n_tokens``."""
        with self._mutex:
            self._check_writable()
            self._commit_locked()
            return self._n_tokens

    def update_provenance(self, entries: dict) -> None:
        """Merge ``entries`` (JSON types) into the ``provenance`` attribute, written with the next commit
        (and at close). A dict value is merged into an existing dict entry (``{"images": {"3": [...]}}``
        adds sequence 3); anything else replaces the entry."""
        entries = jsonable(dict(entries), "provenance")
        with self._mutex:
            self._check_open()
            for k, v in entries.items():
                old = self._provenance.get(k)
                self._provenance[k] = {**old, **v} if isinstance(v, dict) and isinstance(old, dict) else v

    def totals(self, name: str) -> np.ndarray:
        """Sum over the committed commits of the count variable ``name`` (int64, its row shape)."""
        with self._mutex:
            if name not in self._totals:
                raise KeyError(f"{name!r} is not a count variable of {self._path} (has: {sorted(self._totals)})")
            return self._totals[name].copy()

    def loads(self) -> xr.DataArray:
        """Expert load counts of the committed tokens: (moe_layer, expert) int64, coord ``layer``."""
        return loads_dataarray(self.totals("expert_load"), self._moe_layers)

    def write_group(self, name: str, arrays: Mapping[str, tuple], attrs: Mapping[str, Any],
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        """(Re)write the child group ``name`` ("a/b") of the trace root, e.g. one sequence's attention maps.

        arrays: name -> (dims, numpy array, attributes). The group's ``complete`` attribute is
        cleared first and written last, after every array and the other ``attrs``: readers
        (:func:`workbench.trace.reader.open_group`) ignore a group without it, so a kill mid-write
        loses only that group. Arrays are chunked to about ``chunk_bytes`` (whole last dimension,
        rows along the one before, 1 along the others), compressed like the token arrays. Not
        covered by ``n_tokens``: write a group after the token rows it refers to are committed
        (``attrs["token_end"]``: one past the last token index it refers to).
        """
        if not isinstance(name, str) or not name.strip("/"):
            raise ValueError(f"group name must be a non-empty string, got {name!r}")
        first = name.strip("/").split("/")[0]
        if first in self._variables or first in (COMMIT_END, LAYER_COORD, VOCAB_GROUP) or first.startswith((".", "__")):
            raise ValueError(f"group name {name!r} is reserved by the trace schema")
        attrs = jsonable(dict(attrs), "group attrs")
        with self._mutex:
            self._check_open()
            g = self._root.require_group(name.strip("/"))
            if g.attrs.get("complete"):  # rewriting: un-mark it before touching its arrays
                g.update_attributes({"complete": False})
            for key, (dims, data, a_attrs) in arrays.items():
                data = np.ascontiguousarray(data)
                arr = g.create_array(key, shape=data.shape, chunks=_group_chunks(data, chunk_bytes), dtype=data.dtype,
                                     fill_value=fill_value(data.dtype), dimension_names=list(dims), overwrite=True,
                                     compressors=codec("float" if data.dtype.kind == "f" else "int"),
                                     attributes=jsonable(dict(a_attrs or {}), f"{key} attrs"), config=_ARRAY_CONFIG)
                if data.size:
                    arr[...] = data
            g.update_attributes({**attrs, "complete": True})

    def close(self, complete: bool = True) -> None:
        """Commit what is staged, mark the trace complete (if ``complete``), consolidate the
        metadata and release the lock. Idempotent. After a failed write it only truncates to the
        committed length and releases the lock (the trace stays incomplete; ``resume`` it)."""
        with self._mutex:
            if self._closed:
                return
            try:
                if self._failed is None:
                    if self._staged:
                        self._commit_locked()
                    self._set_lengths()  # from the grown capacity to the exact committed lengths
                    if complete:
                        self._provenance["updated"] = now()
                        self._write_root({"complete": True, "provenance": self._provenance})
                        with quiet():
                            zarr.consolidate_metadata(self._root.store, zarr_format=3)
                else:
                    with contextlib.suppress(Exception):  # best effort: resume truncates anyway
                        self._set_lengths()
            finally:
                self._closed = True
                self._lock.release()
                self._finalizer.detach()
                self._staged = []
                self._staged_tokens = 0

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close(complete=False)
            except Exception:  # do not mask the original exception
                pass

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TraceError(f"the writer of {self._path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise TraceError(f"the writer of {self._path} failed earlier ({self._failed!r}); close it and "
                             "TraceWriter.resume the trace")

    def _validate(self, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        names = [c.name for c in self._tok_cols]
        if "generated" in names and rows.get("generated") is None and rows.get("token_id") is not None:
            # rows without the flag are prompt tokens (everything a plain forward pass records)
            rows = {**rows, "generated": np.zeros(np.shape(rows["token_id"])[:1], np.int8)}
        missing = [n for n in names if n not in rows or rows[n] is None]
        if missing:
            raise ValueError(f"append: missing {', '.join(missing)} ({self._path} holds {', '.join(names)})")
        extra = sorted(set(rows) - set(names))
        if extra:
            raise ValueError(f"append: {', '.join(extra)} given, but {self._path} declares no such token variable "
                             f"(it holds {', '.join(names)})")
        a = {n: _as_numpy(n, rows[n]) for n in names}
        n = a[names[0]].shape[0] if a[names[0]].ndim else None
        for col in self._tok_cols:
            v, x = col.var, a[col.name]
            if x.ndim == 0 or x.shape[0] != n:
                shown = ", ".join(f"{k} {a[k].shape}" for k in names)
                raise ValueError(f"length mismatch along the token dimension: {shown}")
            if x.shape[1:] != v.row_shape:
                raise ValueError(f"{v.name} must have shape ({', '.join(v.dims)}) = {(n,) + v.row_shape}, "
                                 f"got {x.shape}")
            _check_values(v, x)
        return {c.name: np.array(a[c.name], dtype=c.var.dtype, copy=True, order="C") for c in self._tok_cols}

    def _commit_rows(self, staged: list[dict], n0: int) -> dict[str, np.ndarray]:
        """The new rows of every array: the staged token rows, and one row per commit variable."""
        new = {c.name: np.concatenate([b[c.name] for b in staged]) if len(staged) > 1 else staged[0][c.name]
               for c in self._tok_cols}
        for c in self._commit_cols:
            if c.name == COMMIT_END:
                new[c.name] = np.array([n0 + new[self._tok_cols[0].name].shape[0]], np.int64)
            else:
                new[c.name] = _count_rows(c.var, new[c.var.reduce["count"]]).astype(c.var.dtype)[None]
        return new

    def _commit_locked(self) -> None:
        if not self._staged:
            return
        n0, nc0 = self._n_tokens, self._n_commits
        n_new = self._staged_tokens
        n1, nc1 = n0 + n_new, nc0 + 1
        new_rows = self._commit_rows(self._staged, n0)
        cols = self._tok_cols + self._commit_cols
        try:
            # 1. (rarely) grow the arrays' declared length, by whole chunks of the widest-chunked array
            touched = _run_all([partial(c.files.set_length, cap)
                                for cols_, end in ((self._tok_cols, n1), (self._commit_cols, nc1))
                                for c, cap in _capacities(cols_, end)])
            # 2. the changed chunks of every array: the tail chunk with the new rows, then new chunks
            writes = [(c, i, block) for c in cols for i, block in c.stage(new_rows[c.name])]
            touched += _run_all([partial(c.files.write, i, block, self._fsync) for c, i, block in writes],
                                parallel=sum(b.nbytes for _, _, b in writes) >= _PARALLEL_COMMIT_BYTES)
            if self._fsync:
                _fsync_files(touched)
            # 3. the committed length, after everything it covers
            self._provenance["updated"] = now()
            self._write_root({"n_tokens": n1, "n_commits": nc1, "provenance": self._provenance})
        except OSError as e:
            self._failed = e
            raise TraceWriteError(
                f"writing {n_new} tokens to {self._path} failed: {e.strerror or e} [errno {e.errno}]. The trace "
                f"still holds the {n0} tokens committed before; free space, close this writer and "
                "TraceWriter.resume the trace") from e
        except BaseException as e:
            self._failed = e
            raise
        for c in cols:
            c.settle()
        for name in self._totals:
            self._totals[name] += new_rows[name][0]
        self._n_tokens, self._n_commits = n1, nc1
        self._staged = []
        self._staged_tokens = 0

    def _write_root(self, updates: Mapping[str, Any]) -> None:
        """Merge ``updates`` into the root attributes and rewrite the root ``zarr.json`` (atomic;
        fsynced with ``fsync=True``). Without consolidated metadata: it is made at close only."""
        self._root_attrs.update(updates)
        path = self._path / "zarr.json"
        write_json(path, {"attributes": self._root_attrs, "zarr_format": 3, "node_type": "group"},
                   durable=self._fsync)
        if self._fsync:
            _fsync_files([path])

    def _set_lengths(self) -> None:
        """Declare every array's exact committed length (the capacity grown by commits is dropped)."""
        _run_all([partial(c.files.set_length, c.n) for c in self._tok_cols + self._commit_cols])


# ---------------------------------------------------------------------------------------------
# create() steps
# ---------------------------------------------------------------------------------------------
def _check_variables(routing: list[MoELayerRouting], variables: Sequence[Variable]) -> list[Variable]:
    """The core columns + ``variables``, validated against each other and the routing sizes."""
    if not routing:
        raise ValueError("routing: at least one MoE layer is required")
    layers = [int(r.layer) for r in routing]
    if len(set(layers)) != len(layers) or any(x < 0 for x in layers):
        raise ValueError(f"MoE layers must be distinct non-negative decoder indices, got {layers}")
    if max(r.n_experts for r in routing) > np.iinfo(np.int16).max:
        raise ValueError(f"n_experts must be at most {np.iinfo(np.int16).max}")
    out = list(CORE_VARIABLES)
    for v in variables:
        if not isinstance(v, Variable):
            raise TypeError(f"variables must be workbench.trace.schema.Variable, got {type(v).__name__}")
        if v.name in _RESERVED or any(v.name == o.name for o in out):
            raise ValueError(f"variable name {v.name!r} is reserved or declared twice")
        out.append(v)
    by_name = {v.name: v for v in out}
    for v in out:
        if v.per_commit:
            src = by_name.get((v.reduce or {}).get("count"))
            if set(v.reduce) != {"count"} or src is None or src.per_commit or len(src.dims) != 3 \
                    or src.valid_range is None or v.row_shape != (src.row_shape[0], src.valid_range[1] + 1):
                raise ValueError(f"variable {v.name!r}: reduce must be {{'count': <token variable (token, A, S) with "
                                 f"a valid_range>}} and the row shape (A, hi + 1), got {v.reduce} {v.row_shape}")
    return out


def _claim(path: Path, overwrite: bool) -> None:
    """Refuse a path that holds anything but an old trace (or, without ``overwrite``, a trace)."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        return
    if not path.is_dir():
        raise TraceExistsError(f"{path} exists and is a file; refusing to create a trace there")
    if not any(e.name not in (LOCK_NAME, BREAK_NAME) for e in path.iterdir()):
        return  # an empty directory
    try:
        meta = read_root(path)
    except UnknownSchemaError as e:
        raise TraceExistsError(f"{path} holds a trace of another schema version ({e}); refusing to overwrite it") from e
    except (NotATraceError, TraceError) as e:
        raise TraceExistsError(f"{path} exists and is not a workbench trace ({e}); refusing to create a trace there "
                               "(choose another path or remove it yourself)") from e
    if not overwrite:
        a = meta["attributes"]
        raise TraceExistsError(f"{path} already holds a trace (n_tokens={a.get('n_tokens')}, complete="
                               f"{a.get('complete')}): use TraceWriter.resume(path) to continue it, or "
                               "overwrite=True to replace it")


def _clear(path: Path) -> None:
    """Remove everything in ``path`` but our lock (overwrite)."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _root_attributes(routing, rule, variables, captures, provenance, has_vocab) -> dict:
    stamp = now()
    provenance.setdefault("versions", {})
    if isinstance(provenance["versions"], dict):
        for k, v in versions().items():
            provenance["versions"].setdefault(k, v)
    provenance.setdefault("created", stamp)
    provenance["updated"] = stamp
    return {
        "schema": SCHEMA,
        "complete": False,
        "n_tokens": 0,
        "n_commits": 0,
        "moe_layers": [int(r.layer) for r in routing],
        "n_experts": max(int(r.n_experts) for r in routing),
        "top_k": max(int(r.top_k) for r in routing),
        "routing": routing_description(routing, rule),
        "variables": {v.name: v.to_json() for v in variables},
        "captures": captures,
        "has_vocab": bool(has_vocab),
        "provenance": provenance,
    }


def _create_array(root: zarr.Group, var: Variable, chunk_bytes: int) -> None:
    row_bytes = int(np.prod(var.row_shape, dtype=np.int64)) * np.dtype(var.dtype).itemsize
    rows = var.chunk_rows or _chunk_rows(row_bytes, min(chunk_bytes, _COMMIT_CHUNK_BYTES) if var.per_commit
                                         else chunk_bytes)
    attrs = dict(var.attrs)
    if MOE_LAYER in var.dims:
        attrs["coordinates"] = LAYER_COORD
    root.create_array(var.name, shape=(0,) + var.row_shape, chunks=(rows,) + var.row_shape, dtype=var.dtype,
                      fill_value=fill_value(var.dtype), compressors=codec(var.codec),
                      dimension_names=list(var.dims), attributes=attrs, config=_ARRAY_CONFIG)


def _group_chunks(data: np.ndarray, chunk_bytes: int) -> tuple[int, ...]:
    if data.ndim == 1:
        return (max(1, data.shape[0]),)
    last = max(1, data.shape[-1])
    rows = int(min(max(data.shape[-2], 1), max(1, -(-chunk_bytes // (last * data.dtype.itemsize)))))
    return (1,) * (data.ndim - 2) + (rows, last)


def _truncate_to_committed(path: Path, root: zarr.Group, attrs: dict) -> None:
    """Check every declared array holds the committed rows; drop rows past them (and the grown
    capacity of an unclosed writer)."""
    n, nc = int(attrs["n_tokens"]), int(attrs["n_commits"])
    with quiet():
        present = set(root.array_keys())
    names = {name: (nc if Variable.from_json(v).per_commit else n) for name, v in attrs["variables"].items()}
    names[COMMIT_END] = nc
    for name, want in names.items():
        if name not in present:
            raise TraceError(f"{path}: array {name!r} is missing (creation interrupted?); recreate the trace "
                             "with overwrite=True")
        files = ChunkFiles.for_array(path / name)
        have = int(root[name].shape[0]) if files is None else files.length
        if have < want:
            raise TraceError(f"{path}: array {name!r} has {have} rows but {want} are committed (damaged trace)")
        if have > want and files is not None:
            files.set_length(want)
        elif have > want:
            root[name].resize((want,) + tuple(root[name].shape[1:]))


def _capacities(cols: list, end: int) -> list:
    """(column, new length) of the columns whose declared length is below ``end``: all of them
    grow to ``end`` rounded up to whole chunks of the widest-chunked column, so that arrays on
    one dimension keep one length (xarray opens them together) and their ``zarr.json`` is
    rewritten about once per that many rows, not at every commit."""
    if all(c.files.length >= end for c in cols):
        return []
    unit = max(c.files.rows for c in cols)
    cap = -(-end // unit) * unit
    return [(c, cap) for c in cols if c.files.length < cap]


# A commit encodes at least this many bytes (whole chunks, fill padding included) before its writes
# go to the pool: below it, handing ~10 small jobs to two threads costs more than it saves (a
# commit of 18 short prompts, ~0.75 MB: 1.26 ms in the caller vs 1.49 ms on the pool, measured
# inside a recording on the 2-core machine, 2026-12-07).
_PARALLEL_COMMIT_BYTES = 2 << 20


def _run_all(jobs: list, parallel: bool = True) -> list[Path]:
    """Run the write jobs (each returning the paths it wrote) on the commit pool (``parallel``)
    or in the caller; re-raise the first failure after all have finished. Encoding (blosc) and
    file writes release the GIL, so two threads halve a large commit whenever a core is idle (at
    ``flush``: the model is waiting)."""
    if parallel and len(jobs) > 1:
        pending = [_pool().submit(j).result for j in jobs]
    else:
        pending = jobs  # in the caller, one after another
    out, first = [], None
    for run in pending:
        try:
            out += _paths(run())
        except BaseException as e:
            first = first or e
    if first is not None:
        raise first
    return out


def _paths(x) -> list[Path]:
    return list(x) if isinstance(x, list) else [x]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="workbench-commit")
        return _POOL


def _fsync_files(files: Iterable[Path]) -> None:
    dirs = set()
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(f.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
