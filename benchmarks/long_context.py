"""Long single sequences traced on CPU (issue 13): peak RSS and time per length, one fresh process each.

Each case runs in its own child process (``--child``), so its peak RSS is its own: the child
prints its VmHWM (/proc/self/status) after loading the model, and after the traced forward pass;
the parent also reads the child's ru_maxrss from ``os.wait4`` (per child, not the running max of
RUSAGE_CHILDREN). A case is one sequence of T random ids of the vocabulary (seed 0),
``model(input_ids=ids, logits_to_keep=1)`` under ``torch.no_grad`` with a Recorder (capture
router, default commit policy) writing a temp store; the clock covers the forward pass and
``rec.close()`` (every byte on disk). ``logits_to_keep=1``: full logits would add T x 1024 x 4
bytes (1 GiB at 256k). After the clock the child opens the trace and asserts: T tokens, one
sequence (0), positions 0..T-1, token ids equal to the input.

Cases (``--set``):

* ``real``: the embedded config (layers 0-2 chunked, chunk 64; layer 3 global NoPE), the
  default blocked path (``prefill_chunk`` 4096) at T in ``--lengths`` (default 4k 16k 64k 256k).
* ``old``: the same at 4k and 16k, blocked vs the old whole-sequence path (``prefill_chunk`` >
  T: one pass, dense T x T masks), children interleaved blocked/whole/whole/blocked. Blocked is
  ``prefill_chunk`` 4096 at 16k (the default) and 1024 at 4k (4 blocks; the default 4096 runs a
  4k input as one pass).
* ``chunked``: a copy of the checkpoint dir whose config.json has ``no_rope_layers`` all 1 (every
  layer chunked; weights unchanged) at 16k 64k 256k 1M.

    .venv/bin/python benchmarks/long_context.py [--set real old chunked] [--lengths 4096 16384 ...]
        [--threads 2] [--json out.json]

Run time on 2 cores: the global layer is O(T^2): ~1.5 s at 4k, ~7 s at 16k, ~50 s at 64k,
~10 min at 256k (extrapolated); the all-chunked 1M case ~5 min.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vm(field: str) -> int:
    """/proc/self/status field in bytes (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


# ---------------------------------------------------------------------------------------------
def child(args) -> None:
    import numpy as np
    import torch

    import workbench as wb
    from workbench.trace import open_trace

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = wb.load_model(args.model_dir, dtype=torch.float32, progress=False)
    cfg = model.text_config
    T = args.T
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    rss_loaded = vm("VmHWM")
    store = Path(args.store)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    rec = wb.record(model, store, capture=("router",))
    with rec:
        out = model(input_ids=ids, logits_to_keep=1, prefill_chunk=args.prefill_chunk)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    hwm = vm("VmHWM")
    assert tuple(out.logits.shape) == (1, 1, cfg.vocab_size), out.logits.shape
    # -- the trace holds T tokens of one sequence, positions 0..T-1 ------------------------------
    ds = open_trace(store)
    n = int(ds.sizes["token"])
    seq = np.asarray(ds["sequence"].values)
    pos = np.asarray(ds["position"].values)
    tok = np.asarray(ds["token_id"].values)
    assert n == T, f"trace holds {n} tokens, expected {T}"
    assert np.unique(seq).tolist() == [0], f"sequences {np.unique(seq)[:10]}"
    assert np.array_equal(pos, np.arange(T)), "positions are not 0..T-1"
    assert np.array_equal(tok, ids[0].numpy()), "token ids differ from the input"
    experts = np.asarray(ds["topk_expert"].values)
    disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print("RESULT " + json.dumps({
        "T": T, "seconds": dt, "cpu_seconds": cpu, "us_per_token": dt / T * 1e6, "vmhwm": hwm,
        "vmhwm_after_load": rss_loaded, "threads": torch.get_num_threads(), "prefill_chunk": args.prefill_chunk,
        "no_rope_layers": [int(x) for x in cfg.uses_rope], "trace_tokens": n, "trace_topk_shape": list(experts.shape),
        "store_bytes": disk}), flush=True)


# ---------------------------------------------------------------------------------------------
def run_case_wait4(model_dir: Path, T: int, prefill_chunk: int, threads: int, tmp: Path, label: str) -> dict:
    """One case in a fresh child process; its own ru_maxrss comes from os.wait4."""
    store = tmp / f"{label}_{T}_{prefill_chunk}.zarr"
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--T", str(T),
           "--prefill-chunk", str(prefill_chunk), "--threads", str(threads), "--store", str(store)]
    load0 = os.getloadavg()
    outf, errf = tmp / "child.out", tmp / "child.err"
    t0 = time.perf_counter()
    with open(outf, "w") as fo, open(errf, "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    out, err = outf.read_text(), errf.read_text()
    if p.returncode != 0:
        raise RuntimeError(f"{label} T={T}: child failed ({p.returncode}):\n{err[-3000:]}")
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
    res.update(label=label, load_start=load0, load_end=os.getloadavg(), child_wall=wall,
               ru_maxrss=ru.ru_maxrss * 1024)
    return res


def chunked_copy(src: Path, dest: Path) -> Path:
    """The checkpoint dir with every layer chunked (config.json text_config.no_rope_layers all 1)."""
    shutil.copytree(src, dest)
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    n = cfg["text_config"]["num_hidden_layers"]
    cfg["text_config"]["no_rope_layers"] = [1] * n
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def line(r: dict) -> str:
    path = "blocked" if r["T"] > r["prefill_chunk"] else "one pass"
    return (f"{r['label']:>12} T={r['T']:>8,} prefill_chunk={r['prefill_chunk']:>7,} ({path:>8}): {r['seconds']:8.1f} s "
            f"({r['us_per_token']:7.1f} us/token, cpu {r['cpu_seconds']:.0f} s), peak RSS (VmHWM) "
            f"{r['vmhwm'] / 2**20:7.0f} MiB (after load {r['vmhwm_after_load'] / 2**20:.0f}), "
            f"ru_maxrss {r['ru_maxrss'] / 2**20:.0f} MiB; store {r['store_bytes'] / 2**20:.1f} MiB; "
            f"load {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--T", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--store", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="+", default=["real", "old", "chunked"], choices=["real", "old", "chunked"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--chunked-lengths", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    ap.add_argument("--old-lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from workbench.embedded import EMBEDDED_MODEL
    import torch
    import zarr

    src = Path(EMBEDDED_MODEL)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
           "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__},
           "cases": []}
    print(f"# {res['date']}; {res['machine']}; {res['versions']}; threads {args.threads}; "
          f"load {os.getloadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="wb-long-"))
    try:
        def go(model_dir, T, pc, label):
            r = run_case_wait4(model_dir, T, pc, args.threads, tmp, label)
            res["cases"].append(r)
            print(line(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps(res, indent=1))
            return r

        if "old" in args.set:
            for T in args.old_lengths:
                whole = T * 2  # > T: one whole-sequence pass (the old path)
                blocked = min(4096, T // 4)  # the default 4096 where T > 4096; at 4k: 4 blocks of 1024
                for lab, pc in (("blocked", blocked), ("whole", whole), ("whole", whole), ("blocked", blocked)):
                    go(src, T, pc, lab)
        if "real" in args.set:
            for T in args.lengths:
                go(src, T, 4096, "real")
        if "chunked" in args.set:
            cdir = chunked_copy(src, tmp / "all-chunked")
            for T in args.chunked_lengths:
                go(cdir, T, 4096, "all-chunked")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# done; load {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
