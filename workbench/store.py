"""Zarr v3 trace store: schema ``workbench.trace/1`` (writer, reader, lock).

Layout
------
One zarr v3 group per trace (a directory on a local file system)::

    run.zarr/
      zarr.json              root group; attributes below (rewritten at every commit)
      token_id/              (token)                   int32   fill -1
      sequence/              (token)                   int32   fill -1
      position/              (token)                   int32   fill -1
      modality/              (token)                   int8    fill -1   0 text, 1 image patch, 2 special
      topk_expert/           (token, moe_layer, k)     int16   fill -1
      topk_weight/           (token, moe_layer, k)     float32 fill NaN
      router_logits/         (token, moe_layer, expert) float16|float32 fill NaN   (optional)
      layer/                 (moe_layer)               int32   coordinate: decoder layer of each MoE layer
      expert_load/           (batch, moe_layer, expert) int32  fill -1   ADDITION, see below
      batch_end/             (batch)                   int64   fill -1   ADDITION, see below
      vocab/                 child group (only when a vocabulary was given): utf8 (vocab_byte) uint8,
                             offsets (vocab_entry) int64; token i is utf8[offsets[i]:offsets[i+1]]
      <other child groups>   e.g. cross-modal attention maps, created with ``TraceWriter.group``
      .workbench.lock        present while a writer holds the store (not part of the zarr hierarchy)

Every array carries ``dimension_names``, and the arrays on the ``moe_layer`` dimension carry the
CF attribute ``coordinates: "layer"``, so ``xr.open_zarr(path)`` reads the raw store (consolidated
metadata after a clean close, ``consolidated=False`` before) with ``layer`` as a coordinate and
integer dtypes unchanged (zarr v3 fill values are not used as masks by xarray).

Root attributes: ``schema`` ("workbench.trace/1"), ``complete`` (false until a clean close),
``n_tokens`` (committed length), ``n_batches`` (committed rows of the per-batch arrays),
``moe_layers``, ``n_experts``, ``top_k``, ``capture_logits``, ``logits_dtype``, ``has_vocab`` and
``provenance`` (the caller's dict plus ``versions`` {python, workbench, torch, zarr, numpy,
xarray, numcodecs}, ``created`` and ``updated`` ISO-8601 UTC timestamps).

Schema additions (beyond the table in design.md): ``expert_load[b, l, e]`` counts the top-k slots
of the tokens of appended batch ``b`` routed to expert ``e`` at MoE layer ``l``
(sum over ``batch`` = per-layer expert load of the whole trace, one small read instead of a pass
over ``topk_expert``); ``batch_end[b]`` is the token index one past the last token of batch ``b``.
One row per ``append`` call.

Commit protocol and crash safety
--------------------------------
zarr appends are "resize (rewrites the array's zarr.json) then write chunks"; a crash between
leaves fill values in the new rows. So the committed length lives in the root attribute
``n_tokens``, written only after all data it covers is written, and every reader trims to it.
One commit is:

1. for every array: resize to the new length, then write the rows from the start of its current
   (partial) tail chunk to the new end. The writer keeps the tail chunk's committed rows in
   memory, so each write covers whole chunks (the last one up to the array end, which zarr
   treats as a complete chunk): no read-modify-write, and the committed rows of a rewritten chunk
   are rewritten with the same values;
2. (``fsync=True`` only) fsync the chunk files and metadata just written;
3. rewrite the root ``zarr.json`` with the new ``n_tokens``/``n_batches``.

zarr >= 3.1.3 LocalStore writes every object as temp file + rename, so a chunk file is either the
old or the new version, never torn. SIGKILL at any moment therefore leaves a store whose rows
``[0, n_tokens)`` are exactly the committed batches; rows past ``n_tokens`` (and arrays of
different lengths, if the kill fell between two resizes) are ignored by ``open_trace`` and
truncated by ``TraceWriter.resume``, which also removes leftover ``*.partial`` temp files.
Without ``fsync`` a commit survives the death of the process (data is in the page cache), not a
power cut; ``fsync=True`` makes each commit durable on disk at a throughput cost.

When is a batch committed? By default (``min_commit_tokens=0``) every ``append`` commits before
it returns. With ``min_commit_tokens=N`` appends are staged in memory until at least N tokens are
staged (then committed in one write, fewer chunk rewrites for small batches such as decoding
steps); ``commit()`` forces a commit, ``close()`` commits what is staged. ``n_tokens`` always
counts committed tokens only.

Chunking, compression, sharding
-------------------------------
* Chunks span the full row (all MoE layers, all k / experts) and are sized along the token (or
  batch) dimension to at least ``chunk_bytes`` = 1 MiB uncompressed: the next power of two of
  rows >= 1 MiB / row bytes. Scout (48 MoE layers, top-1, 16 experts): topk_expert 96 B/token ->
  16384 tokens (1.5 MiB), topk_weight 192 B -> 8192, router_logits float16 1536 B -> 1024,
  token_id 4 B -> 262144, modality 1 B -> 1048576, expert_load 3 KiB/batch -> 512 batches.
* Compression: blosc with lz4 (level 5), typesize from the dtype. Integer arrays (token ids,
  sequence, modality, expert ids, loads, batch ends) use bit-shuffle: their value ranges are small,
  so most bit planes are constant (topk_expert with 16 experts compresses ~4x, modality ~8x);
  ``position`` (runs of consecutive integers) uses byte shuffle (~200x); the float arrays
  (weights, logits) use byte shuffle only, a light setting (float mantissas barely compress:
  ~1.2x for weights). lz4 rather than zstd because every commit re-encodes the tail chunk of each
  array: measured on this data, zstd gave the same ratios within a few percent (random token ids:
  1.77x both) at 2-6x lower encode speed. Real token ids (Zipfian) would compress better with
  zstd, but they are 4 B/token next to 96-1536 B/token of routing data.
* No sharding. A shard is rewritten in full on any partial write, and appends (batches of a few
  thousand tokens) are never shard-aligned, so each commit would rewrite the growing shard
  (quadratic in shard size; measured 0.5-0.6x the unsharded append rate with 16 chunks per shard,
  benchmarks/store_throughput.py), and concurrent partial writes to one shard lose data. Unsharded
  chunks keep each commit's cost bounded by one tail chunk per array plus the new rows, and each
  chunk file is replaced atomically. The price is the file count: about one file per MiB of raw
  data (1M Scout tokens with float16 logits: 1189 files, 1.6 GiB), acceptable on local disks.

Reading
-------
``open_trace`` validates the root (clear errors for a missing path, a file, a non-zarr directory,
a zarr v2 store, a foreign zarr v3 group, an unknown ``workbench.trace/N``), trims every variable
to the committed length and ignores child groups. Plain ``xr.open_zarr`` works on a cleanly
closed store and on a store being written (``consolidated=False``); it also shows uncommitted
rows, fails with "conflicting sizes" on a store killed between two resizes (``open_trace``
handles that), and zarr warns that the lock file is "not recognized as a component of a Zarr
hierarchy" while a writer holds the store.

Lock
----
``<store>/.workbench.lock`` is created with O_CREAT|O_EXCL and holds JSON {pid, host, boot_id,
start_ticks, created, token, argv}. A second writer gets ``TraceLockedError`` naming the holder's
pid and host. A lock whose holder is provably dead (same host and: pid gone, pid a zombie, pid
reused - process start time differs - or the machine rebooted since) is taken over with a
``UserWarning``; the take-over is serialised by a second O_EXCL file so that two writers cannot
both take it. Locks held from another host are never broken automatically. The lock is released
by ``close()`` (also on garbage collection / interpreter exit of an unclosed writer).

Memory
------
The writer holds, per array, at most one chunk of tail rows plus the staged batches, and a
(moe_layer, expert) int64 load table: memory does not grow with the run length.

Threading: one writer object may be used from several threads; calls are serialised internally.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as _zsync
from zarr.storage import LocalStore

from .schema import (
    BATCH,
    BATCH_VARIABLES,
    EXPERT,
    K,
    LAYER_COORD,
    LOGITS_DTYPES,
    MOE_LAYER,
    SCHEMA,
    SCHEMA_PREFIX,
    TOKEN,
    TOKEN_VARIABLES,
    VOCAB_GROUP,
)

try:  # dask is optional: open_trace is dask-backed when it is installed
    import dask.array as _da  # noqa: F401

    _HAVE_DASK = True
except Exception:  # pragma: no cover - depends on the environment
    _HAVE_DASK = False

__all__ = [
    "TraceWriter",
    "open_trace",
    "expert_loads",
    "trace_vocab",
    "TraceError",
    "NotATraceError",
    "UnknownSchemaError",
    "TraceExistsError",
    "TraceLockedError",
    "TraceWriteError",
    "LOCK_NAME",
    "SCHEMA",
]

LOCK_NAME = ".workbench.lock"
_BREAK_NAME = ".workbench.lock.break"
_DEFAULT_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_ROWS = 1 << 22
_RESERVED_GROUP_NAMES = set(TOKEN_VARIABLES) | set(BATCH_VARIABLES) | {LAYER_COORD, VOCAB_GROUP}
_ARRAY_CONFIG = {"write_empty_chunks": True}  # skip zarr's all-fill check: our rows are never fill
_NOISE = re.compile(r"Object at .*(\.workbench\.lock|\.partial).* is not recognized")


# --------------------------------------------------------------------------------------- errors


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
    """Writing a batch failed (e.g. disk full); the store holds everything committed before."""


# ----------------------------------------------------------------------------------- codecs etc


def _codec(name: str) -> BloscCodec:
    if name in ("topk_weight", "router_logits", "position"):
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _fill(dtype: np.dtype) -> Any:
    return float("nan") if np.dtype(dtype).kind == "f" else -1


def _chunk_rows(row_bytes: int, chunk_bytes: int) -> int:
    need = max(1, -(-int(chunk_bytes) // max(1, int(row_bytes))))
    return min(_MAX_CHUNK_ROWS, 1 << (need - 1).bit_length())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in (
        ("workbench", "moe-workbench"),
        ("torch", "torch"),
        ("zarr", "zarr"),
        ("numpy", "numpy"),
        ("xarray", "xarray"),
        ("numcodecs", "numcodecs"),
    ):
        mod = sys.modules.get(key)
        ver = getattr(mod, "__version__", None) if mod is not None else None
        if ver is None:
            try:
                ver = metadata.version(dist)
            except Exception:
                ver = None
        out[key] = None if ver is None else str(ver)
    return out


def _jsonable(obj: Any, where: str) -> Any:
    """Convert provenance values to JSON types; raise TypeError naming the offending key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"attrs: key {k!r} at {where} is not a string")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if type(obj).__module__.split(".")[0] == "torch":  # torch.dtype, torch.device, torch.Size
        return list(obj) if isinstance(obj, tuple) else str(obj)
    raise TypeError(
        f"attrs: value at {where} of type {type(obj).__name__} is not JSON-serialisable "
        "(use str, int, float, bool, None, lists and dicts)"
    )


@contextlib.contextmanager
def _quiet():
    """Silence zarr's notices about our lock/temp files and about consolidated metadata."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOISE.pattern)
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


# ------------------------------------------------------------------------------ store inspection


def _read_root(path: str | os.PathLike) -> dict:
    """Validate that `path` is a workbench trace; return its root zarr.json as a dict."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no trace at {p}: the path does not exist")
    if not p.is_dir():
        raise NotATraceError(f"{p} is a file, not a trace (a trace is a zarr v3 directory store)")
    zj = p / "zarr.json"
    if not zj.is_file():
        if (p / ".zgroup").exists() or (p / ".zarray").exists():
            raise NotATraceError(
                f"{p} is a zarr v2 store, not a {SCHEMA} trace (traces are zarr v3 groups)"
            )
        raise NotATraceError(f"{p} is not a trace: it has no zarr.json (not a zarr v3 store)")
    try:
        meta = json.loads(zj.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise NotATraceError(f"{zj} is not valid JSON ({e}); {p} is not a readable trace") from e
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise NotATraceError(f"{p} is not a trace: {zj} is not zarr v3 metadata")
    if meta.get("node_type") != "group":
        raise NotATraceError(
            f"{p} is a zarr {meta.get('node_type')!r}, not a trace (a trace is a zarr group)"
        )
    attrs = meta.get("attributes") or {}
    schema = attrs.get("schema")
    if schema is None:
        shown = ", ".join(sorted(map(str, attrs))[:8]) or "none"
        raise NotATraceError(
            f"{p} is a zarr v3 group but not a workbench trace: no 'schema' attribute "
            f"(attributes: {shown})"
        )
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise UnknownSchemaError(
                f"{p} has schema {schema!r}, which this workbench cannot read "
                f"(it reads {SCHEMA!r}); use the workbench version that wrote it"
            )
        raise NotATraceError(f"{p} has schema attribute {schema!r}: not a workbench trace")
    for key in ("n_tokens", "moe_layers", "n_experts", "top_k"):
        if key not in attrs:
            raise TraceError(f"{p}: root attribute {key!r} is missing (damaged trace)")
    return meta


def _is_consolidated(meta: dict) -> bool:
    return meta.get("consolidated_metadata") is not None


def _expected_arrays(attrs: dict) -> list[str]:
    names = [n for n in TOKEN_VARIABLES if n != "router_logits"]
    if attrs.get("capture_logits"):
        names.append("router_logits")
    return names + list(BATCH_VARIABLES) + [LAYER_COORD]


# ------------------------------------------------------------------------------------------ lock


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, from /proc (Linux); None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = raw[raw.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def _lock_is_stale(info: dict) -> tuple[bool, str]:
    host = info.get("host")
    if host != socket.gethostname():
        return False, f"held from another host ({host}); cannot check whether it is alive"
    boot = info.get("boot_id")
    if boot and _boot_id() and boot != _boot_id():
        return True, "the machine has rebooted since the lock was taken"
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return True, "the lock file names no valid pid"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, f"process {pid} is not running"
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return True, f"invalid pid {pid}"
    st = _proc_stat(pid)
    if st is not None:
        state, ticks = st
        if state in ("Z", "X"):
            return True, f"process {pid} has exited (zombie)"
        if info.get("start_ticks") is not None and ticks != info["start_ticks"]:
            return True, f"pid {pid} now belongs to another process"
    return False, f"process {pid} is alive"


def _read_lock_bytes(lock: Path) -> bytes | None:
    try:
        return lock.read_bytes()
    except FileNotFoundError:
        return None


class _Lock:
    """O_CREAT|O_EXCL lock file inside the store directory."""

    def __init__(self, path: Path, token: str):
        self.path = path
        self.token = token
        self.released = False

    @classmethod
    def acquire(cls, store_dir: Path) -> "_Lock":
        lock = store_dir / LOCK_NAME
        token = uuid.uuid4().hex
        st = _proc_stat(os.getpid())
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "start_ticks": None if st is None else st[1],
            "created": _now(),
            "token": token,
            "argv": sys.argv[:4],
        }
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw = _read_lock_bytes(lock)
                if raw is None:  # released meanwhile
                    continue
                try:
                    holder = json.loads(raw)
                    if not isinstance(holder, dict):
                        raise ValueError
                except ValueError:
                    # being written right now, or left empty by a writer killed at creation
                    try:
                        age = time.time() - lock.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 5.0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    holder = {}
                    stale, why = True, "the lock file is empty or unreadable"
                else:
                    stale, why = _lock_is_stale(holder)
                if not stale:
                    raise TraceLockedError(
                        f"{store_dir} is locked by another writer: pid {holder.get('pid')} on host "
                        f"{holder.get('host')} since {holder.get('created')} ({why}). Close that "
                        f"writer first; if it is gone, delete {lock}"
                    )
                if cls._break(store_dir, lock, raw):
                    warnings.warn(
                        f"taking over the stale lock of {store_dir}: pid {holder.get('pid')} on "
                        f"host {holder.get('host')} ({why})",
                        UserWarning,
                        stacklevel=4,
                    )
                elif time.monotonic() > deadline:
                    raise TraceLockedError(f"could not take over the stale lock {lock}")
                else:
                    time.sleep(0.02)
                continue
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(lock, token)

    @staticmethod
    def _break(store_dir: Path, lock: Path, judged: bytes) -> bool:
        """Remove the stale lock whose content was `judged`, serialised by another O_EXCL file."""
        breaker = store_dir / _BREAK_NAME
        try:
            bfd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > 30.0:  # breaker of a dead process
                    breaker.unlink()
            return False
        try:
            if _read_lock_bytes(lock) == judged:  # still the stale lock, not a fresh one
                lock.unlink()
                return True
            return False
        finally:
            os.close(bfd)
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    @staticmethod
    def _release(path: Path, token: str) -> None:
        raw = _read_lock_bytes(path)
        if raw is None:
            return
        try:
            mine = json.loads(raw).get("token") == token
        except (ValueError, AttributeError):
            mine = False
        if mine:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self.path, self.token)


# ---------------------------------------------------------------------------------------- writer


class _Column:
    """One appendable array and the committed rows of its current (partial) tail chunk."""

    __slots__ = ("name", "arr", "rows", "row_shape", "dtype", "tail", "tail_start")

    def __init__(self, name: str, arr: zarr.Array, n_committed: int):
        self.name = name
        self.arr = arr
        self.rows = int(arr.chunks[0])
        self.row_shape = tuple(arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.tail_start = (n_committed // self.rows) * self.rows
        if n_committed > self.tail_start:
            self.tail = np.ascontiguousarray(arr[self.tail_start : n_committed])
        else:
            self.tail = np.empty((0,) + self.row_shape, self.dtype)


def _as_numpy(name: str, x: Any) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e
    return a


def _check_int(name: str, a: np.ndarray, lo: int, hi: int) -> None:
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype} (shape {a.shape})")
    if a.size:
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            raise ValueError(
                f"{name}: values must lie in [{lo}, {hi}], got min {mn} and max {mx} (shape {a.shape})"
            )


def _check_float(name: str, a: np.ndarray) -> None:
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype} (shape {a.shape})")


_I32 = np.iinfo(np.int32).max


class TraceWriter:
    """Append-only writer of a ``workbench.trace/1`` store. Build with ``create`` or ``resume``.

    Semantics (see the module docstring for the on-disk protocol):

    * ``append(...)`` validates one batch of N tokens; with the default ``min_commit_tokens=0``
      it is committed (data written, then ``n_tokens``) before ``append`` returns.
    * ``commit()`` writes what is staged; ``close()`` commits, marks the trace complete,
      consolidates the metadata and releases the lock. Used as a context manager, an exception
      in the block closes with ``complete=False`` (committed data stays; ``resume`` continues).
    * After a failed write (``TraceWriteError``) the writer refuses further appends; ``close()``
      then only truncates back to the committed length (best effort) and releases the lock.
    """

    # -- construction --------------------------------------------------------------------------

    def __init__(self, path: Path, root: zarr.Group, lock: _Lock, *, fsync: bool, min_commit_tokens: int):
        self._path = path
        self._root = root
        self._lock = lock
        self._finalizer = weakref.finalize(self, _Lock._release, lock.path, lock.token)
        self._fsync = bool(fsync)
        self._min_commit = int(min_commit_tokens)
        self._mutex = threading.RLock()
        attrs = dict(root.attrs)
        self._attrs = attrs
        self._moe_layers = [int(x) for x in attrs["moe_layers"]]
        self._n_experts = int(attrs["n_experts"])
        self._top_k = int(attrs["top_k"])
        self._capture_logits = bool(attrs.get("capture_logits"))
        self._logits_dtype = np.dtype(attrs.get("logits_dtype") or "float16")
        self._provenance = dict(attrs.get("provenance") or {})
        self._n_tokens = int(attrs["n_tokens"])
        self._n_batches = int(attrs.get("n_batches", 0))
        names = [n for n in TOKEN_VARIABLES if n != "router_logits" or self._capture_logits]
        self._tok_cols = [_Column(n, _arr(root, n), self._n_tokens) for n in names]
        self._batch_cols = [_Column(n, _arr(root, n), self._n_batches) for n in BATCH_VARIABLES]
        self._layer_offsets = (np.arange(len(self._moe_layers), dtype=np.int64) * self._n_experts)[
            None, :, None
        ]
        self._loads = np.zeros((len(self._moe_layers), self._n_experts), np.int64)
        if self._n_batches:
            self._loads += np.asarray(root["expert_load"][: self._n_batches], np.int64).sum(0)
        self._staged: list[dict[str, np.ndarray]] = []
        self._staged_tokens = 0
        self._failed: BaseException | None = None
        self._closed = False

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        moe_layers: Sequence[int],
        n_experts: int,
        top_k: int,
        capture_logits: bool = False,
        logits_dtype: str = "float16",
        attrs: Mapping[str, Any] | None = None,
        vocab: Sequence[str] | None = None,
        overwrite: bool = False,
        min_commit_tokens: int = 0,
        fsync: bool = False,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    ) -> "TraceWriter":
        """Create a new trace at `path` and return its writer (holding the lock).

        moe_layers: decoder layer index of each MoE layer (the ``layer`` coordinate).
        n_experts, top_k: routing shape; capture_logits: store ``router_logits`` in
        `logits_dtype` ("float16" or "float32"). attrs: provenance dict (JSON types), stored under
        the root attribute ``provenance`` with versions and timestamps added. vocab: token strings
        (index = token id) for ``open_trace(..., tokens=True)``. overwrite: replace an existing
        trace (never anything that is not a trace). chunk_bytes: minimum uncompressed chunk size.
        """
        path = Path(path)
        layers = [int(x) for x in moe_layers]
        if not layers:
            raise ValueError("moe_layers: at least one MoE layer is required")
        if len(set(layers)) != len(layers) or any(x < 0 for x in layers):
            raise ValueError(f"moe_layers must be distinct non-negative layer indices, got {layers}")
        n_experts, top_k = int(n_experts), int(top_k)
        if not 1 <= n_experts <= np.iinfo(np.int16).max:
            raise ValueError(f"n_experts must be in [1, 32767], got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if str(np.dtype(logits_dtype)) not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
        logits_dtype = str(np.dtype(logits_dtype))
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if int(min_commit_tokens) < 0:
            raise ValueError(f"min_commit_tokens must be >= 0, got {min_commit_tokens}")
        provenance = _jsonable(dict(attrs or {}), "attrs")
        if vocab is not None:
            vocab = list(vocab)
            bad = next((i for i, s in enumerate(vocab) if not isinstance(s, str)), None)
            if bad is not None:
                raise TypeError(f"vocab[{bad}] is {type(vocab[bad]).__name__}, expected str")

        if path.exists():
            if not path.is_dir():
                raise TraceExistsError(f"{path} exists and is a file; refusing to create a trace there")
            if any(e.name not in (LOCK_NAME, _BREAK_NAME) for e in path.iterdir()):
                try:
                    meta = _read_root(path)
                except UnknownSchemaError as e:
                    raise TraceExistsError(f"{path} holds a trace of another schema version ({e}); refusing to overwrite it") from e
                except (NotATraceError, TraceError) as e:
                    raise TraceExistsError(
                        f"{path} exists and is not a workbench trace ({e}); refusing to create a "
                        "trace there (choose another path or remove it yourself)"
                    ) from e
                if not overwrite:
                    a = meta["attributes"]
                    raise TraceExistsError(
                        f"{path} already holds a trace (n_tokens={a.get('n_tokens')}, "
                        f"complete={a.get('complete')}): use TraceWriter.resume(path) to continue "
                        "it, or overwrite=True to replace it"
                    )
        path.mkdir(parents=True, exist_ok=True)
        lock = _Lock.acquire(path)
        try:
            for entry in path.iterdir():  # overwrite: clear everything but our lock
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            now = _now()
            provenance.setdefault("versions", {})
            if isinstance(provenance["versions"], dict):
                for k, v in _versions().items():
                    provenance["versions"].setdefault(k, v)
            provenance.setdefault("created", now)
            provenance["updated"] = now
            root_attrs = {
                "schema": SCHEMA,
                "complete": False,
                "n_tokens": 0,
                "n_batches": 0,
                "moe_layers": layers,
                "n_experts": n_experts,
                "top_k": top_k,
                "capture_logits": bool(capture_logits),
                "logits_dtype": logits_dtype,
                "has_vocab": vocab is not None,
                "provenance": provenance,
            }
            store = LocalStore(path)
            root = zarr.create_group(store=store, zarr_format=3, attributes=root_attrs)
            L, E = len(layers), n_experts
            shapes = {
                "token_id": (),
                "sequence": (),
                "position": (),
                "modality": (),
                "topk_expert": (L, top_k),
                "topk_weight": (L, top_k),
                "router_logits": (L, E),
                "expert_load": (L, E),
                "batch_end": (),
            }
            specs = {n: (dims, dt) for n, (dims, dt) in TOKEN_VARIABLES.items()}
            specs["router_logits"] = (TOKEN_VARIABLES["router_logits"][0], logits_dtype)
            specs.update(BATCH_VARIABLES)
            for name, (dims, dtype) in specs.items():
                if name == "router_logits" and not capture_logits:
                    continue
                row = shapes[name]
                row_bytes = int(np.prod(row, dtype=np.int64)) * np.dtype(dtype).itemsize
                rows = _chunk_rows(row_bytes, chunk_bytes)
                root.create_array(
                    name,
                    shape=(0,) + row,
                    chunks=(rows,) + row,
                    dtype=dtype,
                    fill_value=_fill(dtype),
                    compressors=_codec(name),
                    dimension_names=list(dims),
                    attributes={"coordinates": LAYER_COORD} if MOE_LAYER in dims else {},
                    config=_ARRAY_CONFIG,
                )
            lay = root.create_array(
                LAYER_COORD,
                shape=(L,),
                chunks=(L,),
                dtype="int32",
                fill_value=-1,
                dimension_names=[MOE_LAYER],
                attributes={"long_name": "decoder layer index of the MoE layer"},
            )
            lay[:] = np.asarray(layers, np.int32)
            if vocab is not None:
                _write_vocab(root, vocab)
            root = zarr.open_group(store=store, mode="r+", use_consolidated=False)
            return cls(path, root, lock, fsync=fsync, min_commit_tokens=min_commit_tokens)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        *,
        reopen: bool = False,
        min_commit_tokens: int = 0,
        fsync: bool = False,
    ) -> "TraceWriter":
        """Reopen an incomplete trace and continue after its committed ``n_tokens``.

        Anything past the committed length (rows of an interrupted commit, leftover temp files) is
        removed. A stale lock of a dead writer is taken over with a warning. A complete trace is
        refused unless ``reopen=True`` (it is then marked incomplete again until the next close).
        """
        path = Path(path)
        meta = _read_root(path)
        lock = _Lock.acquire(path)
        try:
            meta = _read_root(path)  # re-read under the lock
            attrs = meta["attributes"]
            if attrs.get("complete") and not reopen:
                raise TraceError(
                    f"{path} is a complete trace (n_tokens={attrs['n_tokens']}); pass reopen=True "
                    "to append to it anyway"
                )
            store = LocalStore(path)
            root = zarr.open_group(store=store, mode="r+", use_consolidated=False)
            n, nb = int(attrs["n_tokens"]), int(attrs.get("n_batches", 0))
            with _quiet():
                present = set(root.array_keys())
            for name in _expected_arrays(attrs):
                if name not in present:
                    raise TraceError(f"{path}: array {name!r} is missing (creation interrupted?); recreate the trace with overwrite=True")
            for name in _expected_arrays(attrs):
                if name == LAYER_COORD:
                    continue
                arr = root[name]
                want = nb if name in BATCH_VARIABLES else n
                if arr.shape[0] < want:
                    raise TraceError(
                        f"{path}: array {name!r} has {arr.shape[0]} rows but {want} are committed "
                        "(damaged trace)"
                    )
                if arr.shape[0] > want:
                    arr.resize((want,) + tuple(arr.shape[1:]))
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
    def n_batches(self) -> int:
        return self._n_batches

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
    def capture_logits(self) -> bool:
        return self._capture_logits

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._failed else "open")
        return f"<TraceWriter {self._path} n_tokens={self._n_tokens} {state}>"

    # -- writing -------------------------------------------------------------------------------

    def append(
        self,
        token_id: Any,
        sequence: Any,
        position: Any,
        modality: Any,
        topk_expert: Any,
        topk_weight: Any,
        router_logits: Any = None,
    ) -> int:
        """Append one batch of N tokens (numpy arrays, or CPU/GPU torch tensors).

        Shapes: token_id, sequence, position, modality (N,); topk_expert, topk_weight
        (N, moe_layer, k); router_logits (N, moe_layer, expert), required iff the trace captures
        logits. Integer inputs of any width are range-checked and stored as the schema dtype;
        float inputs are cast. Returns the committed ``n_tokens`` after the call.
        """
        with self._mutex:
            self._check_writable()
            batch = self._validate(token_id, sequence, position, modality, topk_expert, topk_weight, router_logits)
            n = batch["token_id"].shape[0]
            if n == 0:
                return self._n_tokens
            self._staged.append(batch)
            self._staged_tokens += n
            if self._staged_tokens >= self._min_commit:
                self._commit_locked()
            return self._n_tokens

    def commit(self) -> int:
        """Write the staged batches, then ``n_tokens``. Returns the committed ``n_tokens``."""
        with self._mutex:
            self._check_writable()
            self._commit_locked()
            return self._n_tokens

    def update_provenance(self, entries: dict) -> None:
        """Merge ``entries`` (JSON types) into the ``provenance`` attribute, written with the next commit
        (and at close). A dict value is merged into an existing dict entry (``{"images": {"3": [...]}}``
        adds sequence 3); anything else replaces the entry."""
        entries = _jsonable(dict(entries), "provenance")
        with self._mutex:
            self._check_open()
            for k, v in entries.items():
                old = self._provenance.get(k)
                self._provenance[k] = {**old, **v} if isinstance(v, dict) and isinstance(old, dict) else v

    def loads(self) -> xr.DataArray:
        """Expert load counts of the committed tokens: (moe_layer, expert) int64, coord ``layer``."""
        with self._mutex:
            return _loads_dataarray(self._loads.copy(), self._moe_layers)

    def group(self, name: str) -> zarr.Group:
        """Create (or open) the child group `name` ("a" or "a/b") of the trace root.

        For data that does not fit the token table, e.g. cross-modal attention maps (one group per
        sequence). ``open_trace`` ignores child groups; they are part of the consolidated metadata
        written at close. Not covered by ``n_tokens``: the caller makes its own writes safe.
        Reserved: the names of the trace arrays and ``vocab``.
        """
        if not isinstance(name, str) or not name.strip("/"):
            raise ValueError(f"group name must be a non-empty string, got {name!r}")
        first = name.strip("/").split("/")[0]
        if first in _RESERVED_GROUP_NAMES or first.startswith(".") or first.startswith("__"):
            raise ValueError(f"group name {name!r} is reserved by the trace schema")
        with self._mutex:
            self._check_open()
            return self._root.require_group(name.strip("/"))

    def close(self, complete: bool = True) -> None:
        """Commit what is staged, mark the trace complete (if `complete`), consolidate the
        metadata and release the lock. Idempotent. After a failed write it only truncates to the
        committed length and releases the lock (the trace stays incomplete; ``resume`` it)."""
        with self._mutex:
            if self._closed:
                return
            try:
                if self._failed is None:
                    if self._staged:
                        self._commit_locked()
                    if complete:
                        self._provenance["updated"] = _now()
                        self._root.update_attributes({"complete": True, "provenance": self._provenance})
                        with _quiet():
                            zarr.consolidate_metadata(self._root.store, zarr_format=3)
                else:
                    self._truncate_best_effort()
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
            raise TraceError(
                f"the writer of {self._path} failed earlier ({self._failed!r}); close it and "
                "TraceWriter.resume the trace"
            )

    def _validate(self, token_id, sequence, position, modality, topk_expert, topk_weight, router_logits):
        a = {
            "token_id": _as_numpy("token_id", token_id),
            "sequence": _as_numpy("sequence", sequence),
            "position": _as_numpy("position", position),
            "modality": _as_numpy("modality", modality),
            "topk_expert": _as_numpy("topk_expert", topk_expert),
            "topk_weight": _as_numpy("topk_weight", topk_weight),
        }
        if self._capture_logits:
            if router_logits is None:
                raise ValueError(f"router_logits is required: {self._path} was created with capture_logits=True")
            a["router_logits"] = _as_numpy("router_logits", router_logits)
        elif router_logits is not None:
            raise ValueError(f"router_logits given, but {self._path} was created with capture_logits=False")
        for name in ("token_id", "sequence", "position", "modality"):
            if a[name].ndim != 1:
                raise ValueError(f"{name} must be 1-D with dims (token,), got shape {a[name].shape}")
        lengths = {name: arr.shape[0] if arr.ndim else None for name, arr in a.items()}
        n = lengths["token_id"]
        if any(v != n for v in lengths.values()):
            shown = ", ".join(f"{k} {a[k].shape}" for k in a)
            raise ValueError(f"length mismatch along the token dimension: {shown}")
        L, k, E = len(self._moe_layers), self._top_k, self._n_experts
        want = {"topk_expert": (n, L, k), "topk_weight": (n, L, k), "router_logits": (n, L, E)}
        dims = {"topk_expert": "(token, moe_layer, k)", "topk_weight": "(token, moe_layer, k)", "router_logits": "(token, moe_layer, expert)"}
        for name in ("topk_expert", "topk_weight", "router_logits"):
            if name in a and a[name].shape != want[name]:
                raise ValueError(f"{name} must have shape {dims[name]} = {want[name]}, got {a[name].shape}")
        _check_int("token_id", a["token_id"], 0, _I32)
        _check_int("sequence", a["sequence"], 0, _I32)
        _check_int("position", a["position"], 0, _I32)
        _check_int("modality", a["modality"], 0, 2)
        _check_int("topk_expert", a["topk_expert"], 0, E - 1)
        _check_float("topk_weight", a["topk_weight"])
        if "router_logits" in a:
            _check_float("router_logits", a["router_logits"])
        out = {}
        for col in self._tok_cols:
            out[col.name] = np.array(a[col.name], dtype=col.dtype, copy=True, order="C")
        flat = (out["topk_expert"].astype(np.int64) + self._layer_offsets).ravel()
        counts = np.bincount(flat, minlength=L * E).reshape(L, E)
        out["expert_load"] = counts.astype(np.int32)[None]
        return out

    def _commit_locked(self) -> None:
        if not self._staged:
            return
        staged = self._staged
        n0, nb0 = self._n_tokens, self._n_batches
        n_new = self._staged_tokens
        n1, nb1 = n0 + n_new, nb0 + len(staged)
        ends = n0 + np.cumsum([b["token_id"].shape[0] for b in staged], dtype=np.int64)
        new_rows: dict[str, np.ndarray] = {}
        for col in self._tok_cols:
            parts = [b[col.name] for b in staged]
            new_rows[col.name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        new_rows["expert_load"] = np.concatenate([b["expert_load"] for b in staged])
        new_rows["batch_end"] = ends
        load_delta = new_rows["expert_load"].sum(0, dtype=np.int64)
        try:
            tails = {}
            jobs = []
            touched: list[Path] = []
            for col, end in [(c, n1) for c in self._tok_cols] + [(c, nb1) for c in self._batch_cols]:
                data = new_rows[col.name]
                if col.tail.shape[0]:
                    data = np.concatenate([col.tail, data])
                jobs.append((col.arr.async_array, (end,) + col.row_shape, slice(col.tail_start, end), data))
                ts = (end // col.rows) * col.rows
                tails[col.name] = (ts, data[ts - col.tail_start :].copy())
                if self._fsync:
                    touched += self._chunk_files(col, col.tail_start, end)
            _zsync(_resize_and_write(jobs))
            if self._fsync:
                _fsync_files(touched)
            self._provenance["updated"] = _now()
            self._root.update_attributes({"n_tokens": n1, "n_batches": nb1, "provenance": self._provenance})
            if self._fsync:
                _fsync_files([self._path / "zarr.json"])
        except OSError as e:
            self._failed = e
            raise TraceWriteError(
                f"writing {n_new} tokens to {self._path} failed: {e.strerror or e} "
                f"[errno {e.errno}]. The trace still holds the {n0} tokens committed before; "
                "free space, close this writer and TraceWriter.resume the trace"
            ) from e
        except BaseException as e:
            self._failed = e
            raise
        for col in self._tok_cols + self._batch_cols:
            col.tail_start, col.tail = tails[col.name]
        self._n_tokens, self._n_batches = n1, nb1
        self._loads += load_delta
        self._staged = []
        self._staged_tokens = 0

    def _chunk_files(self, col: _Column, start: int, end: int) -> list[Path]:
        base = self._path / col.name
        files = [base / "zarr.json"]
        extra = ["0"] * len(col.row_shape)
        for ci in range(start // col.rows, -(-end // col.rows)):
            files.append(base.joinpath("c", str(ci), *extra))
        return files

    def _truncate_best_effort(self) -> None:
        for col in self._tok_cols + self._batch_cols:
            want = self._n_batches if col.name in BATCH_VARIABLES else self._n_tokens
            with contextlib.suppress(Exception):
                if col.arr.shape[0] != want:
                    col.arr.resize((want,) + col.row_shape)


async def _resize_and_write(jobs: list) -> None:
    """Resize each array, then write its rows; arrays concurrently (one event-loop round trip)."""

    async def one(aarr, shape, sel, data) -> None:
        await aarr.resize(shape)
        await aarr.setitem(sel, data)

    results = await asyncio.gather(*(one(*j) for j in jobs), return_exceptions=True)
    for r in results:  # every job has finished here; re-raise the first failure
        if isinstance(r, BaseException):
            raise r


def _arr(root: zarr.Group, name: str) -> zarr.Array:
    return root[name].with_config(_ARRAY_CONFIG)


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


def _write_vocab(root: zarr.Group, vocab: list[str]) -> None:
    enc = [s.encode("utf-8", "surrogatepass") for s in vocab]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    data = np.frombuffer(b"".join(enc), np.uint8)
    g = root.create_group(VOCAB_GROUP, attributes={"n_entries": len(enc), "encoding": "utf-8"})
    u = g.create_array(
        "utf8", shape=data.shape, chunks=(max(1, min(data.size, 1 << 22)),), dtype="uint8",
        fill_value=0, compressors=BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),
        dimension_names=["vocab_byte"],
    )
    if data.size:
        u[:] = data
    o = g.create_array(
        "offsets", shape=offsets.shape, chunks=(max(1, min(offsets.size, 1 << 20)),), dtype="int64",
        fill_value=-1, compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        dimension_names=["vocab_entry"],
    )
    o[:] = offsets


def _loads_dataarray(counts: np.ndarray, layers: Sequence[int]) -> xr.DataArray:
    return xr.DataArray(
        counts,
        dims=(MOE_LAYER, EXPERT),
        coords={LAYER_COORD: (MOE_LAYER, np.asarray(layers, np.int32))},
        name="expert_load",
        attrs={"long_name": "top-k slots routed to each expert (committed tokens)"},
    )


# ---------------------------------------------------------------------------------------- reading


def _open_raw(path: Path, consolidated: bool, n: int, nb: int) -> xr.Dataset:
    kw = dict(consolidated=consolidated, zarr_format=3, chunks={} if _HAVE_DASK else None)
    with _quiet():
        try:
            return xr.open_zarr(path, **kw)
        except ValueError as e:
            if "conflicting sizes" not in str(e) and "conflicting" not in str(e):
                raise
        # an interrupted commit left arrays of different lengths: open them in groups of equal
        # length, trim each to the committed length and merge
        g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", use_consolidated=False)
        by_len: dict[tuple, list[str]] = {}
        names = []
        for name, arr in g.arrays():
            names.append(name)
            dims = arr.metadata.dimension_names or ()
            key = tuple((d, s) for d, s in zip(dims, arr.shape) if d in (TOKEN, BATCH))
            by_len.setdefault(key, []).append(name)
        parts = []
        for key, members in by_len.items():
            for dim, size in key:
                want = n if dim == TOKEN else nb
                if size < want:
                    raise TraceError(
                        f"{path}: array(s) {', '.join(sorted(members))} have {size} rows along "
                        f"{dim!r} but {want} are committed (damaged trace)"
                    )
            keep = set(members) | {LAYER_COORD}
            ds = xr.open_zarr(path, drop_variables=[x for x in names if x not in keep], **kw)
            if LAYER_COORD in ds.data_vars:
                ds = ds.set_coords(LAYER_COORD)
            parts.append(_trim(ds, n, nb))
        return xr.merge(parts, combine_attrs="override", compat="override", join="outer")


def _trim(ds: xr.Dataset, n: int, nb: int) -> xr.Dataset:
    sel = {}
    if TOKEN in ds.dims:
        sel[TOKEN] = slice(0, n)
    if BATCH in ds.dims:
        sel[BATCH] = slice(0, nb)
    return ds.isel(sel) if sel else ds


def open_trace(path: str | os.PathLike, *, tokens: bool = False) -> xr.Dataset:
    """Open a trace as a lazy ``xarray.Dataset`` (dask-backed when dask is installed).

    Trimmed to the committed ``n_tokens`` (and ``n_batches``), so a trace that is still being
    written, or whose writer was killed, reads as exactly its committed batches. Child groups
    (attention maps, vocabulary) are not included. ``tokens=True`` adds ``token_text`` (token):
    the string of each token id, when the trace stores a vocabulary (else a warning).
    Raises FileNotFoundError, NotATraceError (not a trace / foreign zarr store),
    UnknownSchemaError (other ``workbench.trace/N`` version), TraceError (damaged trace).
    """
    p = Path(path)
    meta = _read_root(p)
    attrs = meta["attributes"]
    n, nb = int(attrs["n_tokens"]), int(attrs.get("n_batches", 0))
    ds = _open_raw(p, _is_consolidated(meta), n, nb)
    for name in _expected_arrays(attrs):
        if name not in ds.variables:
            raise TraceError(f"{p}: array {name!r} is missing (creation interrupted or damaged trace)")
    for name, var in ds.variables.items():
        for dim, want in ((TOKEN, n), (BATCH, nb)):
            if dim in var.dims and var.sizes[dim] < want:
                raise TraceError(
                    f"{p}: array {name!r} has {var.sizes[dim]} rows along {dim!r} but {want} are "
                    "committed (damaged trace)"
                )
    ds = _trim(ds, n, nb)
    ds.attrs = dict(attrs)  # the attributes n_tokens was read from (a writer may have moved on)
    if tokens:
        vocab = trace_vocab(p)
        if vocab is None:
            warnings.warn(f"{p} stores no vocabulary: token_text not added", UserWarning, stacklevel=2)
        else:
            lut = np.empty(len(vocab) + 1, dtype=object)
            lut[: len(vocab)] = vocab
            lut[len(vocab)] = "\ufffd"
            V = len(vocab)

            def lookup(ids: np.ndarray) -> np.ndarray:
                ids = np.asarray(ids)
                idx = np.where((ids >= 0) & (ids < V), ids, V)
                return lut[idx]

            data = ds["token_id"].data
            if _HAVE_DASK and hasattr(data, "map_blocks"):
                text = data.map_blocks(lookup, dtype=object)
            else:
                text = lookup(np.asarray(data))
            ds["token_text"] = xr.Variable((TOKEN,), text, attrs={"long_name": "token string"})
    return ds


def trace_vocab(path: str | os.PathLike) -> list[str] | None:
    """The vocabulary stored in the trace (index = token id), or None."""
    p = Path(path)
    meta = _read_root(p)
    if not meta["attributes"].get("has_vocab"):
        return None
    with _quiet():
        g = zarr.open_group(store=LocalStore(p, read_only=True), path=VOCAB_GROUP, mode="r", use_consolidated=False)
        raw = np.asarray(g["utf8"][:], np.uint8).tobytes()
        off = np.asarray(g["offsets"][:], np.int64)
    return [raw[off[i] : off[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(off) - 1)]


def _loads_from_topk(ds: xr.Dataset) -> np.ndarray:
    te = ds["topk_expert"].data
    L, E = ds.sizes[MOE_LAYER], int(ds.attrs["n_experts"])
    offs = (np.arange(L, dtype=np.int64) * E)[None, :, None]

    def block(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b)
        return np.bincount((b.astype(np.int64) + offs).ravel(), minlength=L * E)[None]

    if _HAVE_DASK and hasattr(te, "map_blocks"):
        te = te.rechunk({1: -1, 2: -1})
        parts = te.map_blocks(block, dtype=np.int64, drop_axis=[1, 2], new_axis=[1], chunks=((1,) * te.numblocks[0], (L * E,)))
        return np.asarray(parts.sum(0).compute()).reshape(L, E)
    return block(np.asarray(te))[0].reshape(L, E)


def expert_loads(trace: str | os.PathLike | xr.Dataset, *, from_topk: bool = False) -> xr.DataArray:
    """Per-layer expert load of a whole trace: (moe_layer, expert) int64 with coordinate ``layer``.

    Sums the per-batch ``expert_load`` array (one small read). ``from_topk=True`` counts
    ``topk_expert`` instead (one pass over the token table); that is also what happens for a
    Dataset whose token or batch dimension was subset (so the batches no longer match the tokens)
    or that has no ``expert_load``.
    """
    ds = trace if isinstance(trace, xr.Dataset) else open_trace(trace)
    layers = ds[LAYER_COORD].values
    whole = ds.sizes.get(TOKEN) == ds.attrs.get("n_tokens") and ds.sizes.get(BATCH) == ds.attrs.get("n_batches")
    if not from_topk and "expert_load" in ds and whole:
        counts = np.asarray(ds["expert_load"].data.sum(axis=0, dtype=np.int64))
    else:
        counts = _loads_from_topk(ds)
    return _loads_dataarray(np.asarray(counts, np.int64), layers)
