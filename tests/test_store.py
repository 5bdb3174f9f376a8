"""Trace store (workbench.trace): real zarr v3 stores on disk, no mocks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from workbench.trace import (
    LOCK_NAME,
    SCHEMA,
    NotATraceError,
    TraceError,
    TraceExistsError,
    TraceLockedError,
    TraceWriteError,
    TraceWriter,
    UnknownSchemaError,
    expert_loads,
    open_trace,
    trace_vocab,
)
from workbench.trace.reader import open_group
from workbench.trace.schema import routing_layout

REPO = Path(__file__).resolve().parents[1]

# deterministic batches, shared verbatim with the child processes below
BATCH_SRC = '''
import numpy as np
def make_batch(seed, L, E, k, logits_dtype=None, n=None):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300)) if n is None else n
    b = dict(
        token_id=rng.integers(0, 50_000, n).astype(np.int64),
        sequence=np.full(n, seed % 7, np.int32),
        position=np.arange(n, dtype=np.int32) + seed,
        modality=rng.integers(0, 3, n).astype(np.int8),
        topk_expert=np.argsort(rng.random((n, L, E)), axis=-1)[..., :k].astype(np.int64),
        topk_weight=rng.random((n, L, k)).astype(np.float32),
    )
    if logits_dtype:
        b["router_logits"] = rng.standard_normal((n, L, E)).astype(logits_dtype)
    return b
'''
exec(BATCH_SRC)

LAYERS = [1, 3, 5, 7]
L, E, K = len(LAYERS), 8, 2
SMALL = 2048  # chunk_bytes for tests: many chunks, commits straddle chunk boundaries


def create(path, logits_dtype=None, layers=LAYERS, top_k=K, **kw):
    args = dict(routing_layout(layers, E, top_k, logits_dtype=logits_dtype), attrs={"model": {"name": "tiny"}},
                chunk_bytes=SMALL)
    args.update(kw)
    return TraceWriter.create(path, **args)


def concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def bincount_loads(topk_expert, n_layers, n_experts):
    out = np.zeros((n_layers, n_experts), np.int64)
    for layer in range(n_layers):
        out[layer] = np.bincount(topk_expert[:, layer, :].ravel(), minlength=n_experts)
    return out


def check_dataset(ds, expect, logits_dtype=None):
    n = len(expect["token_id"])
    assert ds.sizes["token"] == n
    assert ds.sizes["moe_layer"] == L
    want_dtypes = {"token_id": "int32", "sequence": "int32", "position": "int32", "modality": "int8",
                   "topk_expert": "int16", "topk_weight": "float32"}
    if logits_dtype:
        want_dtypes["router_logits"] = logits_dtype
    else:
        assert "router_logits" not in ds
    for name, dt in want_dtypes.items():
        v = ds[name]
        assert str(v.dtype) == dt, (name, v.dtype)
        np.testing.assert_array_equal(v.values, expect[name].astype(dt), err_msg=name)
    assert ds["token_id"].dims == ("token",)
    assert ds["topk_expert"].dims == ("token", "moe_layer", "k")
    assert ds["topk_weight"].dims == ("token", "moe_layer", "k")
    if logits_dtype:
        assert ds["router_logits"].dims == ("token", "moe_layer", "expert")
    assert "layer" in ds.coords and ds["layer"].dims == ("moe_layer",)
    assert ds["layer"].values.tolist() == LAYERS


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("logits_dtype", [None, "float16", "float32"])
def test_round_trip(tmp_path, logits_dtype):
    path = tmp_path / "t.zarr"
    batches = [make_batch(s, L, E, K, logits_dtype) for s in range(12)]
    with create(path, logits_dtype=logits_dtype) as w:
        for b in batches:
            w.append(**b)
        assert w.n_tokens == sum(len(b["token_id"]) for b in batches)
        mid = open_trace(path)  # readable while the writer is open
        assert mid.attrs["complete"] is False and mid.sizes["token"] == w.n_tokens
    expect = concat(batches)

    ds = open_trace(path)
    check_dataset(ds, expect, logits_dtype)
    assert ds.attrs["schema"] == SCHEMA and ds.attrs["complete"] is True
    assert ds.attrs["n_tokens"] == len(expect["token_id"]) and ds.attrs["n_commits"] == len(batches)
    prov = ds.attrs["provenance"]
    assert prov["model"] == {"name": "tiny"}
    assert prov["versions"]["zarr"] == zarr.__version__ and "numpy" in prov["versions"]
    assert prov["created"] <= prov["updated"]
    assert ds.attrs["moe_layers"] == LAYERS and ds.attrs["n_experts"] == E and ds.attrs["top_k"] == K
    ends = np.cumsum([len(b["token_id"]) for b in batches])
    np.testing.assert_array_equal(ds["commit_end"].values, ends)
    assert not (path / LOCK_NAME).exists()

    # the raw store, through plain xarray: consolidated (default) and not
    for kw in ({}, {"consolidated": False}):
        raw = xr.open_zarr(path, **kw)
        check_dataset(raw, expect, logits_dtype)
    assert json.loads((path / "zarr.json").read_text()).get("consolidated_metadata")


def test_torch_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    b = make_batch(3, L, E, K, "float32")
    with create(tmp_path / "t.zarr", logits_dtype="float32") as w:
        w.append(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
        w.append(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                    if v.dtype.kind == "f" else torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
    ds = open_trace(tmp_path / "t.zarr")
    n = len(b["token_id"])
    np.testing.assert_array_equal(ds["topk_expert"].values[:n], b["topk_expert"])
    np.testing.assert_array_equal(ds["topk_weight"].values[:n], b["topk_weight"])
    # bf16 -> float32 round trip keeps about 3 significant digits
    np.testing.assert_allclose(ds["topk_weight"].values[n:], b["topk_weight"], rtol=1e-2)


def test_loads_match_bincount(tmp_path):
    path = tmp_path / "t.zarr"
    batches = []
    with create(path) as w:
        assert w.loads().values.sum() == 0
        for s in range(9):
            b = make_batch(100 + s, L, E, K)
            batches.append(b)
            w.append(**b)
            te = concat(batches)["topk_expert"]
            loads = w.loads()
            assert loads.dims == ("moe_layer", "expert") and loads.dtype == np.int64
            np.testing.assert_array_equal(loads.values, bincount_loads(te, L, E))
            assert loads["layer"].values.tolist() == LAYERS
    want = bincount_loads(concat(batches)["topk_expert"], L, E)
    np.testing.assert_array_equal(expert_loads(path).values, want)
    np.testing.assert_array_equal(expert_loads(path, from_topk=True).values, want)
    np.testing.assert_array_equal(open_trace(path)["expert_load"].sum("commit").values, want)
    part = open_trace(path).isel(token=slice(0, 100))  # a token subset: counted from topk_expert
    np.testing.assert_array_equal(expert_loads(part).values,
                                  bincount_loads(concat(batches)["topk_expert"][:100], L, E))


def test_staged_commits(tmp_path):
    path = tmp_path / "t.zarr"
    b1, b2, b3 = (make_batch(s, L, E, K, n=100) for s in range(3))
    w = create(path, min_commit_tokens=250)
    assert w.append(**b1) == 0 and w.append(**b2) == 0 and w.n_staged == 200
    assert open_trace(path).sizes["token"] == 0
    assert w.append(**b3) == 300 and w.n_staged == 0
    w.append(**b1)
    assert w.commit() == 400
    w.append(**b2)
    w.close()  # commits the staged append
    ds = open_trace(path)
    check_dataset(ds, concat([b1, b2, b3, b1, b2]))
    # one commit_end / expert_load row per commit, not per append
    np.testing.assert_array_equal(ds["commit_end"].values, [300, 400, 500])
    te = concat([b1, b2, b3, b1, b2])["topk_expert"]
    for c, (a, b) in enumerate([(0, 300), (300, 400), (400, 500)]):
        np.testing.assert_array_equal(ds["expert_load"].values[c], bincount_loads(te[a:b], L, E))


def test_fsync_and_vocab_and_child_groups(tmp_path):
    path = tmp_path / "t.zarr"
    vocab = [f"tok{i}" for i in range(50_000)]
    vocab[7] = "<b>&é"
    b = make_batch(5, L, E, K)
    b["token_id"][:3] = [7, 0, 49_999]
    with create(path, fsync=True, vocab=vocab) as w:
        w.append(**b)
        w.write_group("attention/seq_0", {"probs": (("query", "patch"), np.ones((2, 3), np.float16), {})},
                      {"token_end": 3})
        w.write_group("attention/seq_1", {"probs": (("query", "patch"), np.ones((2, 3), np.float16), {})},
                      {"token_end": len(b["token_id"]) + 1})  # refers to tokens not committed: not readable
        for bad in ("token_id", "vocab", ".x", "", "commit_end"):
            with pytest.raises(ValueError):
                w.write_group(bad, {}, {})
    ds = open_trace(path, tokens=True)
    assert "probs" not in ds and ds.sizes["token"] == len(b["token_id"])
    assert ds["token_text"].values[:3].tolist() == ["<b>&é", "tok0", "tok49999"]
    assert trace_vocab(path) == vocab
    assert open_group(path, "attention/seq_0")["probs"].values.tolist() == [[1, 1, 1]] * 2
    with pytest.raises(TraceError, match="incomplete"):
        open_group(path, "attention/seq_1")
    with create(tmp_path / "nov.zarr") as w:
        w.append(**b)
    with pytest.warns(UserWarning, match="no vocabulary"):
        assert "token_text" not in open_trace(tmp_path / "nov.zarr", tokens=True)


def test_empty_trace(tmp_path):
    with create(tmp_path / "e.zarr"):
        pass
    ds = open_trace(tmp_path / "e.zarr")
    assert ds.sizes["token"] == 0 and ds.attrs["complete"] is True
    assert expert_loads(tmp_path / "e.zarr").values.sum() == 0


# ----------------------------------------------------------------- trimming and resume


def test_committed_length_trimming_and_resume(tmp_path):
    path = tmp_path / "t.zarr"
    batches = [make_batch(s, L, E, K, "float16") for s in range(4)]
    w = create(path, logits_dtype="float16")
    for b in batches:
        w.append(**b)
    n = w.n_tokens
    w.close(complete=False)

    # simulate a commit interrupted between the resizes / data writes (rows past n_tokens,
    # arrays of different lengths); n_tokens was not updated
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name, extra in (("token_id", 50), ("topk_expert", 50), ("router_logits", 7), ("expert_load", 1)):
        a = g[name]
        a.resize((a.shape[0] + extra,) + a.shape[1:])
        a[a.shape[0] - extra:] = 1
    ds = open_trace(path)
    check_dataset(ds, concat(batches), "float16")
    assert ds.sizes["commit"] == 4

    w = TraceWriter.resume(path)
    assert w.n_tokens == n and w.n_commits == 4
    np.testing.assert_array_equal(w.loads().values, bincount_loads(concat(batches)["topk_expert"], L, E))
    g = zarr.open_group(path, mode="r", use_consolidated=False)
    assert all(g[x].shape[0] == n for x in ("token_id", "topk_expert", "router_logits", "modality"))
    more = [make_batch(s, L, E, K, "float16") for s in range(10, 14)]
    for b in more:
        w.append(**b)
    w.close()
    allb = batches + more
    check_dataset(open_trace(path), concat(allb), "float16")
    check_dataset(xr.open_zarr(path), concat(allb), "float16")
    np.testing.assert_array_equal(expert_loads(path).values, bincount_loads(concat(allb)["topk_expert"], L, E))

    # a complete trace is not resumed by accident
    with pytest.raises(TraceError, match="reopen=True"):
        TraceWriter.resume(path)
    w = TraceWriter.resume(path, reopen=True)
    w.append(**batches[0])
    assert open_trace(path).attrs["complete"] is False
    w.close()
    check_dataset(open_trace(path), concat(allb + batches[:1]), "float16")


def test_exception_in_with_block_leaves_resumable_trace(tmp_path):
    path = tmp_path / "t.zarr"
    b = make_batch(1, L, E, K)
    with pytest.raises(RuntimeError):
        with create(path) as w:
            w.append(**b)
            raise RuntimeError("boom")
    ds = open_trace(path)
    assert ds.attrs["complete"] is False and ds.sizes["token"] == len(b["token_id"])
    assert not (path / LOCK_NAME).exists()
    with TraceWriter.resume(path) as w:
        w.append(**b)
    check_dataset(open_trace(path), concat([b, b]))


# ----------------------------------------------------------------------------- SIGKILL

CHILD = BATCH_SRC + '''
import sys
from workbench.trace import TraceWriter
from workbench.trace.schema import routing_layout
path, L, E, k = sys.argv[1], 4, 8, 2
w = TraceWriter.create(path, **routing_layout([1, 3, 5, 7], E, k, logits_dtype="float16"), chunk_bytes=4096)
print("READY", flush=True)
i = 0
while True:
    w.append(**make_batch(1000 + i, L, E, k, "float16"))
    print("COMMITTED", i, w.n_tokens, flush=True)
    i += 1
'''


def _verify_prefix(path, seeds):
    """The trace holds exactly the batches of `seeds` (in order), no fill values."""
    ds = open_trace(path)
    batches = [make_batch(s, L, E, K, "float16") for s in seeds]
    expect = concat(batches)
    check_dataset(ds, expect, "float16")
    for name in ("token_id", "sequence", "position", "modality", "topk_expert"):
        assert (ds[name].values >= 0).all(), name  # fill value is -1
    for name in ("topk_weight", "router_logits"):
        assert not np.isnan(ds[name].values).any(), name  # fill value is NaN
    np.testing.assert_array_equal(ds["commit_end"].values, np.cumsum([len(b["token_id"]) for b in batches]))
    np.testing.assert_array_equal(expert_loads(path).values, bincount_loads(expect["topk_expert"], L, E))


def test_sigkill_at_random_moments(tmp_path):
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for trial in range(3):
        path = tmp_path / f"k{trial}.zarr"
        with subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO)) as proc:
            try:
                assert proc.stdout.readline().startswith("READY"), proc.stderr.read()
                target = rnd.randint(1, 25)
                committed = []
                while len(committed) < target:
                    line = proc.stdout.readline()
                    assert line.startswith("COMMITTED"), line + proc.stderr.read()
                    _, i, n = line.split()
                    committed.append((int(i), int(n)))
                time.sleep(rnd.uniform(0, 0.05))  # land somewhere inside a later commit
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                rest = proc.stdout.read().split("\n")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        committed += [(int(x.split()[1]), int(x.split()[2])) for x in rest if x.startswith("COMMITTED")]
        n_store = open_trace(path).attrs["n_tokens"]
        printed = committed[-1][1]
        # every printed commit is in the store; at most one more (killed after commit, before print)
        sizes = [len(make_batch(1000 + i, L, E, K)["token_id"]) for i in range(len(committed) + 1)]
        ends = np.cumsum(sizes)
        assert n_store in (printed, int(ends[len(committed)])), (n_store, printed)
        m = int(np.searchsorted(ends, n_store)) + 1
        _verify_prefix(path, [1000 + i for i in range(m)])

        # the dead writer's lock is stale: resume takes it over and continues
        assert (path / LOCK_NAME).exists()
        with pytest.warns(UserWarning, match="stale lock"):
            w = TraceWriter.resume(path)
        assert w.n_tokens == n_store
        w.append(**make_batch(1000 + m, L, E, K, "float16"))
        w.close()
        _verify_prefix(path, [1000 + i for i in range(m + 1)])


# ------------------------------------------------------------------------------- locks


def _forge_lock(path, **info):
    base = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": None, "start_ticks": None,
            "created": "2026-11-26T00:00:00+00:00", "token": "forged"}
    base.update(info)
    (path / LOCK_NAME).write_text(json.dumps(base))


def test_second_writer_refused(tmp_path):
    path = tmp_path / "t.zarr"
    w = create(path)
    w.append(**make_batch(0, L, E, K))
    with pytest.raises(TraceLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        TraceWriter.resume(path)
    with pytest.raises(TraceLockedError):
        create(path, overwrite=True)
    w.close(complete=False)
    # a live process on this host (our parent) and a lock from another host: refused
    _forge_lock(path, pid=os.getppid())
    with pytest.raises(TraceLockedError, match=f"pid {os.getppid()}"):
        TraceWriter.resume(path)
    _forge_lock(path, host="some-other-host")
    with pytest.raises(TraceLockedError, match="some-other-host"):
        TraceWriter.resume(path)
    assert open_trace(path).sizes["token"] > 0  # readers are never blocked


def test_stale_lock_taken_over(tmp_path):
    path = tmp_path / "t.zarr"
    with create(path) as w:
        w.append(**make_batch(0, L, E, K))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stat = Path(f"/proc/{os.getpid()}/stat")
    cases = [dict(pid=dead.pid)]
    if stat.exists():  # pid reused by another process: start time differs
        cases.append(dict(pid=os.getpid(), start_ticks=1))
    for info in cases:
        _forge_lock(path, **info)
        with pytest.warns(UserWarning, match="stale lock"):
            w = TraceWriter.resume(path, reopen=True)
        assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid()
        w.close()
        assert not (path / LOCK_NAME).exists()
    # a create killed right after taking the lock leaves a directory holding only the lock
    fresh = tmp_path / "fresh.zarr"
    fresh.mkdir()
    _forge_lock(fresh, pid=dead.pid)
    with pytest.warns(UserWarning, match="stale lock"):
        create(fresh).close()
    assert open_trace(fresh).attrs["complete"] is True
    # an empty lock file (writer killed while creating it), older than a few seconds
    (path / LOCK_NAME).write_text("")
    old = time.time() - 60
    os.utime(path / LOCK_NAME, (old, old))
    with pytest.warns(UserWarning, match="stale lock"):
        TraceWriter.resume(path, reopen=True).close()


# -------------------------------------------------------------------------- bad input


def test_open_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_trace(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(NotATraceError, match="no zarr.json"):
        open_trace(tmp_path / "plain")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(NotATraceError, match="is a file"):
        open_trace(tmp_path / "file.zarr")
    v2 = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    v2.create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(NotATraceError, match="zarr v2"):
        open_trace(tmp_path / "v2.zarr")
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w", zarr_format=3, attributes={"title": "climate"})
    foreign.create_array("t2m", shape=(3,), dtype="float32")
    with pytest.raises(NotATraceError, match="no 'schema' attribute"):
        open_trace(tmp_path / "foreign.zarr")
    zarr.create_array(tmp_path / "arr.zarr", shape=(2,), dtype="int8")
    with pytest.raises(NotATraceError, match="array"):
        open_trace(tmp_path / "arr.zarr")
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(NotATraceError, match="not valid JSON"):
        open_trace(tmp_path / "bad.zarr")

    path = tmp_path / "t.zarr"
    with create(path) as w:
        w.append(**make_batch(0, L, E, K))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema"] = "workbench.trace/9"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnknownSchemaError, match=r"workbench\.trace/9"):
        open_trace(path)
    with pytest.raises(UnknownSchemaError, match=r"workbench\.trace/9"):
        TraceWriter.resume(path)
    meta["attributes"]["schema"] = "acme.dataset/7"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(NotATraceError, match="acme.dataset/7"):
        open_trace(path)


def test_create_refuses_existing(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "precious.txt").write_text("do not delete")
    for overwrite in (False, True):
        with pytest.raises(TraceExistsError, match="not a workbench trace"):
            create(tmp_path / "plain", overwrite=overwrite)
    assert (tmp_path / "plain" / "precious.txt").read_text() == "do not delete"
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w", zarr_format=3)
    foreign.create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(TraceExistsError, match="not a workbench trace"):
        create(tmp_path / "foreign.zarr", overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceExistsError, match="is a file"):
        create(tmp_path / "f")

    path = tmp_path / "t.zarr"
    b = make_batch(0, L, E, K)
    with create(path) as w:
        w.append(**b)
    with pytest.raises(TraceExistsError, match=r"resume.*overwrite=True"):
        create(path)
    (tmp_path / "empty").mkdir()
    create(tmp_path / "empty").close()  # an empty directory is fine
    with create(path, overwrite=True) as w:
        w.append(**make_batch(1, L, E, K))
    check_dataset(open_trace(path), make_batch(1, L, E, K))


def test_create_bad_arguments(tmp_path):
    p = tmp_path / "t.zarr"
    with pytest.raises(ValueError, match="at least one MoE layer"):
        create(p, layers=[])
    with pytest.raises(ValueError, match="distinct non-negative"):
        create(p, layers=[1, 1])
    with pytest.raises(ValueError, match="top_k"):
        create(p, top_k=9)
    with pytest.raises(ValueError, match="logits dtype"):
        create(p, logits_dtype="int8")
    with pytest.raises(ValueError, match="reserved or declared twice"):
        create(p, variables=routing_layout(LAYERS, E, K)["variables"] * 2)
    with pytest.raises(TypeError, match=r"attrs\.cfg\.f"):
        create(p, attrs={"cfg": {"f": object()}})
    assert not p.exists()


def test_append_bad_input(tmp_path):
    path = tmp_path / "t.zarr"
    w = create(path, logits_dtype="float16")
    good = make_batch(0, L, E, K, "float16")
    w.append(**good)
    n = w.n_tokens

    def bad(match, exc=ValueError, **change):
        b = dict(good)
        b.update(change)
        with pytest.raises(exc, match=match):
            w.append(**b)

    bad(r"length mismatch.*token_id \(%d,\).*sequence \(5,\)" % n, sequence=np.zeros(5, np.int32))
    bad(r"topk_expert must have shape \(token, moe_layer, k\) = \(%d, 4, 2\), got \(%d, 4, 3\)" % (n, n),
        topk_expert=np.zeros((n, L, 3), np.int16))
    bad(r"topk_weight must have shape", topk_weight=np.zeros((n, L), np.float32))
    bad(r"router_logits must have shape .*\(%d, 4, 8\)" % n, router_logits=np.zeros((n, L, 7), np.float16))
    bad(r"token_id must have shape \(token\) = \(%d,\), got \(%d, 1\)" % (n, n), token_id=np.zeros((n, 1), np.int32))
    bad(r"token_id: expected an integer array, got dtype float32", TypeError, token_id=np.zeros(n, np.float32))
    bad(r"topk_weight: expected a floating-point array, got dtype int64", TypeError, topk_weight=np.zeros((n, L, K), np.int64))
    bad(r"topk_expert: values must lie in \[0, 7\]", topk_expert=np.full((n, L, K), 8))
    bad(r"modality: values must lie in \[0, 2\]", modality=np.full(n, 3))
    bad(r"token_id: values must lie", token_id=np.full(n, -1))
    bad(r"position: values must lie", position=np.full(n, 2**31))
    bad(r"append: missing router_logits", router_logits=None)
    bad(r"append: extra_thing given, but .* declares no such token variable", extra_thing=np.zeros(n))
    assert w.n_tokens == n
    w.append(**good)  # the writer is still usable after rejected input
    w.close()
    check_dataset(open_trace(path), concat([good, good]), "float16")
    with create(tmp_path / "nolog.zarr") as w2:
        with pytest.raises(ValueError, match="router_logits given, but .* declares no such token variable"):
            w2.append(**good)
    with pytest.raises(TraceError, match="closed"):
        w.append(**good)


# --------------------------------------------------------------------------- disk full


def _fill_until_error(w, seed0):
    rng = np.random.default_rng(seed0)
    committed = []
    for i in range(10_000):
        b = make_batch(seed0 + i, L, E, K, "float32", n=64)
        b["router_logits"] = rng.standard_normal(b["router_logits"].shape).astype(np.float32)  # incompressible
        try:
            w.append(**b)
        except TraceWriteError as e:
            return committed, b, e
        committed.append(b)
    raise AssertionError("the disk never filled")


def test_disk_full_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (covered by test_write_error_file_size_limit)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); covered by test_write_error_file_size_limit")
    try:
        path = mnt / "t.zarr"
        w = create(path, logits_dtype="float32", chunk_bytes=8192)
        committed, _, err = _fill_until_error(w, 0)
        assert "No space left on device" in str(err) and "still holds" in str(err)
        assert len(committed) >= 2
        with pytest.raises(TraceError, match="failed earlier"):
            w.append(**committed[0])
        w.close()
        assert not (path / LOCK_NAME).exists()
        ds = open_trace(path)
        assert ds.attrs["n_tokens"] == sum(len(b["token_id"]) for b in committed)
        check_dataset(ds, concat(committed), "float32")
        # more room: resume and continue
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        with TraceWriter.resume(path) as w:
            w.append(**committed[0])
        check_dataset(open_trace(path), concat(committed + committed[:1]), "float32")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


FSIZE_CHILD = BATCH_SRC + '''
import resource, signal, sys, json
import numpy as np
from workbench.trace import TraceWriter, TraceWriteError
from workbench.trace.schema import routing_layout
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
w = TraceWriter.create(sys.argv[1], **routing_layout([1, 3, 5, 7], 8, 2, logits_dtype="float32"), chunk_bytes=8192)
n_ok = 0
for i in range(1000):
    b = make_batch(i, 4, 8, 2, "float32", n=16)
    try:
        w.append(**b)
    except TraceWriteError as e:
        print(json.dumps({"batches": n_ok, "n_tokens": w.n_tokens, "error": str(e)}))
        break
    n_ok += 1
w.close()
'''


def test_write_error_file_size_limit(tmp_path):
    """Any OSError while writing (here EFBIG from RLIMIT_FSIZE) -> TraceWriteError, store consistent."""
    script = tmp_path / "child.py"
    script.write_text(FSIZE_CHILD)
    path = tmp_path / "t.zarr"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                       cwd=str(REPO), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "File too large" in out["error"] and "still holds" in out["error"]
    assert out["batches"] >= 1
    batches = [make_batch(i, L, E, K, "float32", n=16) for i in range(out["batches"])]
    ds = open_trace(path)
    assert ds.attrs["n_tokens"] == out["n_tokens"] == 16 * out["batches"]
    check_dataset(ds, concat(batches), "float32")
    with TraceWriter.resume(path) as w:  # no limit here: continue
        w.append(**batches[0])
    check_dataset(open_trace(path), concat(batches + batches[:1]), "float32")
