"""Direct chunk and metadata writes: the trace writer's commit path, without zarr's async machinery.

A commit rewrites the tail chunk of every array (a few hundred microseconds of encoding each) and
the root ``zarr.json``. Through ``zarr.Array.setitem`` / ``Group.update_attributes`` each of those
is an event-loop round trip with thread hops for the codec and the file (~1-2 ms per array on a
2-core machine, ~11-16 ms per commit for the nine arrays of a routing trace). Here the same bytes
are produced by the same codec (numcodecs' Blosc, configured from the array's own ``zarr.json``)
and written with the same atomic protocol as zarr's ``LocalStore`` (a ``*.partial`` temp file
renamed over the target: a kill leaves the old or the new file, never a torn one), synchronously.

Only arrays whose codecs are exactly ``bytes`` (little endian) + ``blosc`` and whose chunk keys
use the default encoding are handled (:meth:`ChunkFiles.for_array` returns None otherwise, and the
writer falls back to zarr); that is every array :class:`~workbench.trace.writer.TraceWriter`
creates. What zarr reads back is checked by the tests (byte-identical chunks to zarr's own write).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numcodecs import Blosc

__all__ = ["ChunkFiles", "Column", "write_atomic", "write_json"]

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def write_atomic(path: Path, data: bytes | memoryview, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` as zarr's LocalStore does: a ``<path>.<hex>.partial`` temp file,
    then renamed to ``path`` (so a kill leaves either file, whole, and a reader never sees a torn
    one; ``TraceWriter.resume`` removes leftover ``*.partial`` files).

    Over an existing file the two names are exchanged (Linux ``renameat2(RENAME_EXCHANGE)``) and
    the temp name, now the old file, is unlinked: as atomic as a rename over it, without the flush
    ext4 forces on a rename over an existing file (``auto_da_alloc``: 66 -> 22 us idle, 100-200 us
    inside a busy recording, where a commit replaces ~10 files). Where the exchange is not
    supported, a plain rename. Neither survives a power cut without fsync: ``durable=True``
    fsyncs the temp file before a plain rename (the caller fsyncs the directory)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable or not _exchange(tmp, path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _renameat2():
    """The C library's ``renameat2``, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV}


def _exchange(tmp: Path, path: Path) -> bool:
    """Swap ``tmp`` and an existing ``path`` atomically, then unlink ``tmp`` (the old file). False
    when it did nothing: ``path`` does not exist, or the system or file system cannot exchange
    (then no later call tries)."""
    global _RENAMEAT2
    fn = _RENAMEAT2
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) != 0:
        if ctypes.get_errno() in _NO_EXCHANGE:
            _RENAMEAT2 = None
        return False  # ENOENT (a new file) and anything else: the plain rename decides
    with contextlib.suppress(OSError):  # a leftover is a *.partial file: resume removes it
        tmp.unlink()
    return True


def write_json(path: Path, doc: Mapping[str, Any], *, durable: bool = False) -> None:
    """Atomically write a zarr metadata document (``zarr.json``). Compact: json's C encoder runs
    only without ``indent``, 20x faster on the root's provenance, which every commit rewrites."""
    write_atomic(path, json.dumps(doc).encode(), durable=durable)


class ChunkFiles:
    """Encodes and writes whole chunks of one zarr v3 array along its first dimension.

    Chunks span the full row (every other dimension in one chunk), as the trace writer creates
    them: chunk ``i`` holds rows ``[i * rows, (i + 1) * rows)``. Build with :meth:`for_array`.
    """

    __slots__ = ("dir", "meta", "rows", "row_shape", "dtype", "fill", "_codec", "_suffix")

    def __init__(self, directory: Path, meta: Mapping[str, Any]):
        self.dir = Path(directory)
        self.meta = dict(meta)  # the array's zarr.json, as on disk (shape kept current by set_length)
        chunk = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        self.rows = chunk[0]
        self.row_shape = tuple(int(x) for x in meta["shape"][1:])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = _fill(meta["fill_value"], self.dtype)
        blosc = meta["codecs"][1]["configuration"]
        self._codec = Blosc(cname=blosc["cname"], clevel=int(blosc["clevel"]), shuffle=_SHUFFLE[blosc["shuffle"]],
                            blocksize=int(blosc.get("blocksize", 0)), typesize=int(blosc["typesize"]))
        self._suffix = ("0",) * len(self.row_shape)  # chunk index 0 along every full-row dimension

    @classmethod
    def for_array(cls, directory: Path) -> "ChunkFiles | None":
        """The chunk writer of the array stored in ``directory`` (its ``zarr.json`` is read), or
        None when its layout is not one this module writes (then write through zarr)."""
        try:
            meta = json.loads((Path(directory) / "zarr.json").read_bytes())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs") or []
        shape = meta.get("shape") or []
        chunk = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape") or []
        key = meta.get("chunk_key_encoding") or {}
        ok = (len(codecs) == 2 and codecs[0].get("name") == "bytes"
              and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
              and codecs[1].get("name") == "blosc" and (codecs[1].get("configuration") or {}).get("shuffle") in _SHUFFLE
              and (meta.get("chunk_grid") or {}).get("name") == "regular"
              and key.get("name") == "default" and (key.get("configuration") or {}).get("separator", "/") == "/"
              and len(shape) == len(chunk) >= 1 and list(chunk[1:]) == list(shape[1:])
              and not meta.get("storage_transformers"))
        return cls(Path(directory), meta) if ok else None

    @property
    def length(self) -> int:
        """The array's length along the first dimension, as its ``zarr.json`` says."""
        return int(self.meta["shape"][0])

    def set_length(self, n: int) -> list[Path]:
        """Rewrite the ``zarr.json`` with length ``n`` (nothing when it has it already) and, when
        shrinking, remove the chunk files past the new last chunk. Returns the paths written."""
        n = int(n)
        if n == self.length:
            return []
        if n < self.length:  # a chunk past the end would come back if the array grew again
            last = -(-n // self.rows)
            with contextlib.suppress(OSError):
                for e in os.scandir(self.dir / "c"):
                    if e.name.isdigit() and int(e.name) >= last:
                        shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
        self.meta["shape"] = [n, *self.meta["shape"][1:]]
        path = self.dir / "zarr.json"
        write_json(path, self.meta)
        return [path]

    def empty(self) -> np.ndarray:
        """A chunk of fill values: (rows,) + row_shape, the array's dtype."""
        return np.full((self.rows,) + self.row_shape, self.fill, self.dtype)

    def encode(self, block: np.ndarray) -> bytes:
        """The stored bytes of one whole chunk ``block`` ((rows,) + row_shape, the array's dtype)."""
        if block.shape[0] != self.rows or block.dtype != self.dtype:
            raise ValueError(f"{self.dir.name}: a chunk is {(self.rows,) + self.row_shape} {self.dtype}, "
                             f"got {block.shape} {block.dtype}")
        return self._codec.encode(np.ascontiguousarray(block))

    def path(self, index: int) -> Path:
        """The file of chunk ``index`` (``c/<index>/0/...``)."""
        return self.dir.joinpath("c", str(int(index)), *self._suffix)

    def write(self, index: int, block: np.ndarray, durable: bool = False) -> Path:
        """Encode and atomically write chunk ``index`` (``durable``: see :func:`write_atomic`);
        returns its path."""
        p = self.path(index)
        write_atomic(p, self.encode(block), durable=durable)
        return p


def _fill(value: Any, dtype: np.dtype) -> Any:
    if isinstance(value, str):  # zarr v3 JSON spells non-finite floats as strings
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}.get(value, value)
    return value if value is not None else 0



class Column:
    """One appendable array: its :class:`ChunkFiles` and its committed rows past the last whole
    chunk, kept in memory as a fill-padded chunk (what the next commit rewrites with more rows).

    n: committed rows. ``stage(rows)`` returns the chunk writes that append ``rows``; ``settle()``
    makes them the committed state once they are on disk (a failed commit never settles).
    """

    __slots__ = ("files", "n", "tail_start", "tail", "_next")

    def __init__(self, files: ChunkFiles, n: int, tail_rows: np.ndarray):
        self.files = files
        self.n = int(n)
        self.tail_start = (self.n // files.rows) * files.rows
        self.tail = files.empty()
        self.tail[:self.n - self.tail_start] = tail_rows
        self._next: tuple | None = None

    def stage(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(chunk index, whole chunk) to write so that ``rows`` ((k,) + row_shape) follow the
        committed rows: the tail chunk with the first rows added, then any further chunks (the
        last one fill-padded). The tail buffer is filled in place: after a failed write the owner
        must not append again (the trace writer refuses to)."""
        per = self.files.rows
        writes: list[tuple[int, np.ndarray]] = []
        start, pos, buf, off, k = self.tail_start, self.n - self.tail_start, self.tail, 0, len(rows)
        while off < k:
            take = min(per - pos, k - off)
            if pos == 0 and take == per:  # a whole chunk of new rows: encode it where it lies
                writes.append((start // per, np.ascontiguousarray(rows[off:off + per], self.files.dtype)))
            else:
                buf[pos:pos + take] = rows[off:off + take]
                writes.append((start // per, buf))
            pos, off = pos + take, off + take
            if pos == per:
                start, pos = start + per, 0
                buf = self.files.empty()
        self._next = (self.n + k, start, buf)
        return writes

    def settle(self) -> None:
        """The staged rows are committed: they become the state the next ``stage`` starts from."""
        if self._next is not None:
            self.n, self.tail_start, self.tail = self._next
            self._next = None
