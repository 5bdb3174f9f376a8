"""Cheap commits (issue 18): a commit writes only the chunks that changed, byte-identical to zarr's
own chunks; arrays grow by capacity and end exact; a kill after a commit keeps the committed rows;
the recorder hands passes to its writer in batches with pass-by-pass error semantics. Real zarr
stores on disk, no mocks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import workbench as wb
from workbench.embedded import EMBEDDED_MODEL
from workbench.hooks import RecorderError
from workbench.hooks.inbox import Inbox
from workbench.hooks.interventions import moe_layers
from workbench.trace import TraceWriter, open_trace
from workbench.trace.chunks import ChunkFiles
from workbench.trace.schema import routing_layout
from workbench.trace.verify import verify_trace

REPO = Path(__file__).resolve().parents[1]
L, E = [1, 3], 8


def _rows(n: int, start: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + start)
    return {"token_id": rng.integers(0, 1000, n), "sequence": np.zeros(n, np.int32),
            "position": np.arange(start, start + n), "modality": np.zeros(n, np.int8),
            "topk_expert": rng.integers(0, E, (n, len(L), 1)),
            "topk_weight": rng.random((n, len(L), 1), dtype=np.float32)}


def _chunk_state(path: Path) -> dict[str, tuple[int, int]]:
    """{relative file: (inode, mtime_ns)} of every chunk file and array zarr.json (a rewrite by
    temp file + rename gives a new inode)."""
    out = {}
    for p in path.rglob("*"):
        if p.is_file() and (p.name == "zarr.json" and p.parent != path or "/c/" in p.as_posix()):
            st = p.stat()
            out[p.relative_to(path).as_posix()] = (st.st_ino, st.st_mtime_ns)
    return out


def test_commit_rewrites_only_the_changed_chunks(tmp_path):
    # 4 KiB chunks: token_id (4 B) 1024 rows a chunk; topk_weight (2 layers x 4 B) 512
    w = TraceWriter.create(tmp_path / "t.zarr", **routing_layout(L, E, 1), chunk_bytes=4096, min_commit_tokens=10**9)
    w.append(_rows(1100))
    w.commit()
    before = _chunk_state(tmp_path / "t.zarr")
    w.append(_rows(10, 1100))
    w.commit()
    after = _chunk_state(tmp_path / "t.zarr")
    changed = sorted(k for k in after if after[k] != before.get(k))
    # token arrays: only their tail chunk (token_id, topk_expert: 1024 rows a chunk -> chunk 1; topk_weight
    # 512 -> chunk 2); per-commit arrays: their one chunk; no array metadata (capacity not reached)
    assert changed == sorted(["token_id/c/1", "sequence/c/1", "position/c/1", "modality/c/0", "generated/c/0",
                              "topk_expert/c/1/0/0", "topk_weight/c/2/0/0", "expert_load/c/0/0/0",
                              "commit_end/c/0"])
    w.close()
    ds = open_trace(tmp_path / "t.zarr")
    want = np.concatenate([_rows(1100)["token_id"], _rows(10, 1100)["token_id"]])
    assert np.array_equal(ds["token_id"].values, want)
    assert verify_trace(tmp_path / "t.zarr").ok


def test_chunks_are_byte_identical_to_zarr_writes(tmp_path):
    w = TraceWriter.create(tmp_path / "t.zarr", **routing_layout(L, E, 1, logits_dtype="float16"),
                           chunk_bytes=4096)
    rows = {**_rows(700), "router_logits": np.random.default_rng(1).standard_normal((700, len(L), E))}
    w.append(rows)
    w.close()
    src = zarr.open_group(tmp_path / "t.zarr", mode="r")
    for name in ("token_id", "modality", "topk_expert", "topk_weight", "router_logits", "expert_load"):
        a = src[name]
        ref = zarr.create_array(tmp_path / "ref" / name, shape=a.shape, chunks=a.chunks, dtype=a.dtype,
                                fill_value=a.fill_value, compressors=a.compressors, config={"write_empty_chunks": True})
        ref[...] = a[...]
        files = ChunkFiles.for_array(tmp_path / "t.zarr" / name)
        for i in range(-(-a.shape[0] // a.chunks[0])):
            assert files.path(i).read_bytes() == (tmp_path / "ref" / name / files.path(i).relative_to(
                tmp_path / "t.zarr" / name)).read_bytes(), (name, i)


def _partials(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".partial"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_write_atomic_exchanges_an_existing_file(tmp_path):
    """Over an existing file: the two names are swapped (one syscall, atomic) and the old file is
    unlinked; a new file is renamed into place; no temp file is left either way."""
    from workbench.trace import chunks

    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    fn = chunks._renameat2()
    if fn is None or fn(chunks._AT_FDCWD, bytes(a), chunks._AT_FDCWD, bytes(b), chunks._RENAME_EXCHANGE) != 0:
        pytest.skip("this file system (or C library) cannot exchange two names; write_atomic renames instead")
    assert a.read_bytes() == b"b" and b.read_bytes() == b"a"
    assert chunks._RENAMEAT2 is not None  # nothing disabled the exchange in this process
    target = tmp_path / "c0"
    target.write_bytes(b"old" * 100)
    held = os.open(target, os.O_RDONLY)  # the old file, as a reader that opened it earlier holds it
    try:
        chunks.write_atomic(target, b"new" * 7)
        assert target.read_bytes() == b"new" * 7 and _partials(tmp_path) == []
        assert os.fstat(held).st_nlink == 0  # the old file is gone from the directory
        assert os.pread(held, 300, 0) == b"old" * 100  # and whole for whoever holds it
    finally:
        os.close(held)
    # the exchange itself (what write_atomic tries first): it works on this file system
    other = tmp_path / "c1"
    other.write_bytes(b"x")
    assert chunks._exchange(other, target) is True
    assert target.read_bytes() == b"x" and not other.exists()
    # a new name: nothing to exchange with, renamed; the exchange stays enabled
    assert chunks._exchange(tmp_path / "absent", tmp_path / "c2") is False and chunks._RENAMEAT2 is not None
    chunks.write_atomic(tmp_path / "sub" / "c2", b"fresh")
    assert (tmp_path / "sub" / "c2").read_bytes() == b"fresh" and _partials(tmp_path / "sub") == []


@pytest.mark.parametrize("mode", ["exchange", "rename", "durable"])
def test_write_atomic_readers_see_whole_files(tmp_path, mode, monkeypatch):
    """A reader polling a file while it is rewritten 300 times (lengths alternating) only ever
    sees one of the written versions, whole: with the exchange, with a plain rename (no
    renameat2), and with fsync before the rename."""
    from workbench.trace import chunks

    if mode == "rename":
        monkeypatch.setattr(chunks, "_RENAMEAT2", None)
    versions = [bytes([i % 251]) * (1000 + 7 * (i % 5)) for i in range(300)]
    target = tmp_path / "c"
    chunks.write_atomic(target, versions[0])
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(target.read_bytes())

    t = threading.Thread(target=read)
    t.start()
    try:
        for v in versions[1:]:
            chunks.write_atomic(target, v, durable=mode == "durable")
    finally:
        stop.set()
        t.join()
    valid = set(versions)
    assert seen and all(x in valid for x in seen)
    assert target.read_bytes() == versions[-1] and _partials(tmp_path) == []


def test_arrays_grow_by_capacity_and_close_exact(tmp_path):
    w = TraceWriter.create(tmp_path / "t.zarr", **routing_layout(L, E, 1), chunk_bytes=4096)
    w.append(_rows(30))
    w.append(_rows(5, 30))
    g = zarr.open_group(tmp_path / "t.zarr", mode="r")
    token_len = {g[n].shape[0] for n in ("token_id", "modality", "topk_expert", "topk_weight")}
    assert len(token_len) == 1 and token_len.pop() >= 35  # one length on the token dimension
    ds = open_trace(tmp_path / "t.zarr")  # a live store reads as its committed rows
    assert ds.sizes["token"] == 35 and ds.sizes["commit"] == 2
    w.close()
    g = zarr.open_group(tmp_path / "t.zarr", mode="r")
    assert g["token_id"].shape == (35,) and g["topk_weight"].shape == (35, 2, 1) and g["commit_end"].shape == (2,)
    assert verify_trace(tmp_path / "t.zarr").ok


def test_kill_after_a_commit_keeps_the_committed_tokens(tmp_path):
    path = tmp_path / "t.zarr"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_store_commits import _rows, L, E
        from workbench.trace import TraceWriter
        from workbench.trace.schema import routing_layout
        w = TraceWriter.create({str(path)!r}, **routing_layout(L, E, 1), chunk_bytes=4096, min_commit_tokens=10**9)
        w.append(_rows(600)); w.commit()
        w.append(_rows(700, 600)); w.commit()
        w.append(_rows(50, 1300))  # staged, never committed
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    ds = open_trace(path)
    assert ds.attrs["complete"] is False and ds.sizes["token"] == 1300
    assert np.array_equal(ds["position"].values, np.arange(1300))
    assert verify_trace(path).ok
    with pytest.warns(UserWarning, match="stale lock"):
        w = TraceWriter.resume(path)
    with w:
        w.append(_rows(10, 1300))
    g = zarr.open_group(path, mode="r")
    assert g["token_id"].shape == (1310,)
    assert np.array_equal(open_trace(path)["position"].values, np.arange(1310))


def test_inbox_batches_and_bounds():
    box = Inbox(3)
    for i in range(2):
        box.put(i)
    assert box.take(2, None, 1.0) == [0, 1]  # min_items reached
    box.put(2)
    t0 = time.monotonic()
    assert box.take(5, 0.1, 5.0) == [2] and time.monotonic() - t0 < 4  # the oldest waited max_age
    assert box.take(5, None, 0.05) == []  # nothing: timeout
    box.done(3)
    for i in range(3):
        box.put(i)
    blocked = threading.Event()

    def producer():
        box.put(99)  # capacity 3 pending: blocks until the writer is done with a batch
        blocked.set()

    threading.Thread(target=producer, daemon=True).start()
    assert not blocked.wait(0.2)
    assert box.take(3, None, 1.0) == [0, 1, 2]
    assert not blocked.wait(0.2)  # taken is not done: still pending
    box.done(3)
    assert blocked.wait(5)
    joined = threading.Event()
    threading.Thread(target=lambda: (box.join(), joined.set()), daemon=True).start()
    assert box.take(10, None, 5.0) == [99]  # a join makes the writer take what waits at once
    box.done(1)
    assert joined.wait(5)


def test_inbox_counts_capacity_in_largest_items():
    """Weights: capacity is in units of the largest weight put so far. Small items queue (and are
    taken) in proportion; the pending weight never exceeds capacity x the largest; an item larger
    than everything pending before is still accepted when nothing is pending."""
    box = Inbox(2)
    box.put("big", weight=10)  # unit 10: up to 20 pending
    assert box.take(1, None, 1.0) == ["big"]  # 10 >= 1 x 10
    for i in range(5):
        box.put(i, weight=2)  # 10 + 10 = 20 pending: fits
    assert box.take(1, None, 0.05) == [0, 1, 2, 3, 4]  # 10 queued >= 1 x 10
    blocked = threading.Event()

    def producer():
        box.put("x", weight=2)  # 22 > 20: waits for a done
        blocked.set()

    threading.Thread(target=producer, daemon=True).start()
    assert not blocked.wait(0.2)
    box.done(1)  # "big" written: 10 pending
    assert blocked.wait(5)
    box.put("y", weight=4)  # 16
    assert box.take(1, None, 0.05) == []  # 6 queued < 10: not due (timeout)
    assert box.take(0.5, None, 1.0) == ["x", "y"]
    box.done(7)
    assert box._pending == 0 and box._pending_w == 0
    box.put("huge", weight=100)  # nothing pending: accepted, the unit grows
    assert box.take(1, None, 1.0) == ["huge"]
    box.done(1)


def test_inbox_floor_unit_batches_small_items_until_the_floor_is_reached():
    """min_unit: capacity and batches count in units of at least min_unit, so 1-weight items
    (one-token passes) gather into one batch of hundreds; a larger item raises the unit."""
    box = Inbox(4, min_unit=256)
    for i in range(300):
        box.put(i)  # 300 pending <= 4 x 256: never blocks
    assert box.take(3, None, 0.05) == []  # 300 queued < 3 x 256: not due
    assert box.take(1, None, 0.05) == list(range(300))  # >= 1 x 256
    box.done(300)
    box.put("big", weight=1000)
    assert box.take(1, None, 0.05) == ["big"] and box._unit == 1000
    box.done(1)


def test_queue_places_count_tokens_only_for_per_token_captures(tmp_path):
    """Every registered capture but the attention maps has a fixed size per token, so a recorder
    without attention counts its queue by tokens; with attention maps (bytes per pass not
    proportional to tokens) by passes, as the memory planner assumes."""
    from workbench.hooks.captures import CAPTURES

    import workbench.hooks.attention  # noqa: F401  (registers "attention")
    import workbench.hooks.experts  # noqa: F401  (registers the expert captures)

    assert {n for n, c in CAPTURES.items() if not c.payload_per_token} == {"attention"}
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    with wb.record(model, tmp_path / "a.zarr", capture=("router", "logits", "margin")) as rec:
        assert rec._token_places and rec._queue._unit == 256  # places of at least 256 tokens
    with wb.record(model, tmp_path / "c.zarr", commit_every_seconds=0) as rec:
        assert rec._queue._unit == 0  # each pass committed alone: taken as it comes
    with wb.record(model, tmp_path / "b.zarr", capture=("router", "attention")) as rec:
        assert not rec._token_places and rec._queue._unit == 0  # places are passes


def test_inbox_wakes_the_writer_only_when_its_batch_is_due():
    """put() below min_items does not wake the waiting taker; a pass that reached an idle taker
    (empty queue, no wake-up) is still taken max_age after it arrived, by the taker's own clock."""
    box = Inbox(4)
    got: list = []
    wakes = []
    cv_wait = box._cv.wait

    def counting_wait(timeout=None):
        wakes.append(timeout)
        return cv_wait(timeout)

    box._cv.wait = counting_wait
    t = threading.Thread(target=lambda: got.append((box.take(3, None, 5.0), time.monotonic())), daemon=True)
    t.start()
    time.sleep(0.1)
    box.put(1)
    box.put(2)
    time.sleep(0.1)
    assert not got and len(wakes) == 1  # two puts, no wake-up: the batch of 3 is not due
    box.put(3)
    t.join(5)
    assert got[0][0] == [1, 2, 3] and len(wakes) == 1
    box.done(3)

    t0 = time.monotonic()
    t = threading.Thread(target=lambda: got.append((box.take(3, 0.3, None), time.monotonic())), daemon=True)
    t.start()
    time.sleep(0.1)  # the taker waits on an empty queue
    arrived = time.monotonic()
    box.put(4)
    t.join(5)
    items, at = got[1]
    assert items == [4]
    assert 0.28 <= at - arrived < 2.0 and at - t0 >= 0.35  # max_age after it arrived, not after the wait began


def test_batched_passes_with_and_without_padding_match_per_pass_recording(tmp_path):
    """The writer's all-real-tokens fast path and the padded path, mixed in one batch, give the rows
    a per-pass recording gives (which appends and commits each pass alone): core columns, captures
    whose payloads are joined for the batch (router, logits) and one taken pass by pass (margin)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in the second row
    calls = [{"input_ids": ids[:1]}, {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[1:, :4]},
             {"input_ids": ids}]
    with torch.no_grad():
        model = wb.load_model(EMBEDDED_MODEL, progress=False)
        for name, kw in (("batched", {"queue_size": 8}), ("per_pass", {"commit_every_seconds": 0})):
            with wb.record(model, tmp_path / f"{name}.zarr", capture=("router", "logits", "margin"), **kw) as rec:
                sizes, write = [], rec._write
                rec._write = lambda items, write=write, sizes=sizes: (sizes.append(len(items)), write(items))
                for c in calls:
                    model(**c)
            assert (max(sizes) > 1) == (name == "batched"), sizes  # the batched run joined passes
    a, b = open_trace(tmp_path / "batched.zarr"), open_trace(tmp_path / "per_pass.zarr")
    assert a.sizes["token"] == b.sizes["token"] == 9 + 9 + 6 + 4 + 18
    for v in ("token_id", "sequence", "position", "modality", "generated", "topk_expert", "topk_weight",
              "router_logits", "router_margin"):
        assert np.array_equal(a[v].values, b[v].values), v
    assert a["sequence"].values.tolist() == [0] * 9 + [1] * 9 + [2] * 6 + [3] * 4 + [4] * 9 + [5] * 9
    assert a["position"].values[9 + 9:9 + 9 + 6].tolist() == list(range(6))


def test_sequence_numbers_after_runner_blocks(tmp_path):
    """Runner numbers raise the next free number past their largest; a bare pass takes the next
    free ones, and so does new_sequences."""
    with torch.no_grad():
        model = wb.load_model(EMBEDDED_MODEL, progress=False)
        with wb.record(model, tmp_path / "t.zarr") as rec:
            with rec.sequences([7, 3]):
                model(input_ids=torch.tensor([[5, 6], [7, 8]]))
            model(input_ids=torch.tensor([[9, 10]]))
            assert rec.new_sequences(2).tolist() == [9, 10]
            model(input_ids=torch.tensor([[11]]))
    seq = open_trace(tmp_path / "t.zarr")["sequence"].values.tolist()
    assert seq == [7, 7, 3, 3, 8, 8, 11]


def test_a_bad_pass_in_a_batch_keeps_the_passes_before_it(tmp_path):
    with torch.no_grad():
        model = wb.load_model(EMBEDDED_MODEL, progress=False)
        rec = wb.record(model, tmp_path / "t.zarr", queue_size=8).attach()  # batches of up to 7 passes
        for _ in range(2):
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
        moe_layers(model)[2].router.weight[3] = float("nan")
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
        with pytest.raises(RecorderError, match=r"non-finite router weights \(4 token\(s\); first: sequence 2"):
            rec.close()
    ds = open_trace(tmp_path / "t.zarr")
    assert ds.attrs["complete"] is False and ds.sizes["token"] == 8
    assert ds["sequence"].values.tolist() == [0] * 4 + [1] * 4


@pytest.mark.parametrize("cap,rows", [(1 << 22, 262144), (1 << 16, 65536)])
def test_old_layout_store_is_resumed(tmp_path, cap, rows):
    """A store whose 1-D columns have older, longer chunks (262144 rows before any cap, 65536
    under the first cap) still resumes and reads, across its first chunk boundary of the new cap."""
    from workbench.trace import writer as W

    assert W._MAX_CHUNK_ROWS == 16384
    old = W._MAX_CHUNK_ROWS
    W._MAX_CHUNK_ROWS = cap
    try:
        w = TraceWriter.create(tmp_path / "t.zarr", **routing_layout(L, E, 1))
        w.append(_rows(16380))
        w.close(complete=False)
    finally:
        W._MAX_CHUNK_ROWS = old
    assert zarr.open_group(tmp_path / "t.zarr", mode="r")["token_id"].chunks == (rows,)
    with TraceWriter.resume(tmp_path / "t.zarr") as w:
        w.append(_rows(20, 16380))
    assert zarr.open_group(tmp_path / "t.zarr", mode="r")["token_id"].chunks == (rows,)
    assert np.array_equal(open_trace(tmp_path / "t.zarr")["position"].values, np.arange(16400))
    assert verify_trace(tmp_path / "t.zarr").ok
