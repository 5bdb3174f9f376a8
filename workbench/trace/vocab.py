"""The vocabulary a trace may carry: the decoded text of every token id (``vocab`` child group).

``utf8`` (vocab_byte) uint8 and ``offsets`` (vocab_entry) int64: token i is
``utf8[offsets[i]:offsets[i+1]]`` decoded as UTF-8 (surrogates kept).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from workbench.trace._util import quiet
from workbench.trace.schema import VOCAB_GROUP

__all__ = ["trace_vocab", "write", "checked"]


def checked(vocab: Sequence[str] | None) -> list[str] | None:
    """``vocab`` as a list, or a TypeError naming the first entry that is not a string."""
    if vocab is None:
        return None
    vocab = list(vocab)
    bad = next((i for i, s in enumerate(vocab) if not isinstance(s, str)), None)
    if bad is not None:
        raise TypeError(f"vocab[{bad}] is {type(vocab[bad]).__name__}, expected str")
    return vocab


def write(root: zarr.Group, vocab: list[str]) -> None:
    """Write the ``vocab`` child group of a trace being created."""
    enc = [s.encode("utf-8", "surrogatepass") for s in vocab]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    data = np.frombuffer(b"".join(enc), np.uint8)
    g = root.create_group(VOCAB_GROUP, attributes={"n_entries": len(enc), "encoding": "utf-8"})
    u = g.create_array("utf8", shape=data.shape, chunks=(max(1, min(data.size, 1 << 22)),), dtype="uint8",
                       fill_value=0, compressors=BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),
                       dimension_names=["vocab_byte"])
    if data.size:
        u[:] = data
    o = g.create_array("offsets", shape=offsets.shape, chunks=(max(1, min(offsets.size, 1 << 20)),), dtype="int64",
                       fill_value=-1, compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                       dimension_names=["vocab_entry"])
    o[:] = offsets


def trace_vocab(path: str | os.PathLike) -> list[str] | None:
    """The vocabulary stored in the trace at ``path`` (index = token id), or None."""
    from workbench.trace.integrity import check_group
    from workbench.trace.reader import read_root

    p = Path(path)
    if not read_root(p)["attributes"].get("has_vocab"):
        return None
    if not (p / VOCAB_GROUP / "zarr.json").is_file():
        from workbench.trace.errors import TraceCorruptError

        raise TraceCorruptError(f"{p} is damaged: its root says it has a vocabulary, but the group {VOCAB_GROUP!r} "
                                "is missing")
    check_group(p, VOCAB_GROUP)  # a missing chunk would read as NUL bytes / -1 offsets
    with quiet():
        g = zarr.open_group(store=LocalStore(p, read_only=True), path=VOCAB_GROUP, mode="r", use_consolidated=False)
        raw = np.asarray(g["utf8"][:], np.uint8).tobytes()
        off = np.asarray(g["offsets"][:], np.int64)
    return [raw[off[i]:off[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(off) - 1)]
