"""Store integrity (open-time chunk check, ``workbench verify``) and export hardening (NUL and
formula text in every format, a disk that fills during an export). Real zarr stores on disk,
written by the recorder from the embedded tiny model or by TraceWriter; no mocks.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from workbench.trace import TraceCorruptError, TraceWriter, expert_loads, open_trace, verify_trace
from workbench.trace.schema import routing_layout

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "v1"
# a NUL, formula starts (= + - @ tab CR) and plain text: the tiny tokenizer gives "=", "+", "\t", "\r",
# "\x00" tokens of their own
PROMPTS = ["a\x00b =SUM(A1) +x -y @z", "\t=1+2\rhello -3"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A trace recorded by the Recorder from the embedded default (tiny random) model, with vocabulary."""
    import torch

    from workbench.checkpoint import load_model
    from workbench.embedded import default_model_dir
    from workbench.hooks import Recorder
    from workbench.models.llama4.processor import load_processor

    d = tmp_path_factory.mktemp("rec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the trained embedded model is not shipped yet"
        model_dir = default_model_dir(d / "model")
    model, proc = load_model(model_dir, progress=False), load_processor(model_dir)
    store = d / "rec.zarr"
    rec = Recorder(model, store, ("router",), processor=proc, commit_every_seconds=0)  # a commit per pass
    with torch.no_grad():
        rec.run(model, proc, [{"text": t, "images": []} for t in PROMPTS], batch_size=1, progress=False)
    rec.close()
    return store


CHUNK_ROWS = 16  # token_id rows per chunk in the `multi` trace (int32, chunk_bytes=64)


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    """A TraceWriter trace of 60 tokens in 3 commits, with small chunks (several per array)."""
    path = tmp_path_factory.mktemp("multi") / "multi.zarr"
    rng = np.random.default_rng(0)
    w = TraceWriter.create(path, **routing_layout([1, 3], 4, 2), chunk_bytes=64)
    for s in range(3):
        rows = dict(token_id=rng.integers(0, 100, 20), sequence=np.full(20, s), position=np.arange(20),
                    modality=np.zeros(20, np.int8), topk_expert=np.argsort(rng.random((20, 2, 4)), -1)[..., :2],
                    topk_weight=rng.random((20, 2, 2)).astype(np.float32))
        if "generated" in w.variables:  # a core column of newer schemas
            rows["generated"] = np.zeros(20, np.int8)
        w.append(rows)
    w.close()
    return path


def damaged(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def root_attrs(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------- open-time check
def test_deleted_token_id_chunk_names_array_and_range(multi, tmp_path):
    assert int(open_trace(multi)["token_id"].min()) >= 0
    store = damaged(multi, tmp_path)
    (store / "token_id" / "c" / "1").unlink()
    want = f"{store} is damaged: array 'token_id': chunk c/1 is missing (tokens 16-31 of 60 committed)"
    with pytest.raises(TraceCorruptError, match="^" + want.replace("(", r"\(").replace(")", r"\)")) as e:
        open_trace(store)
    assert f"`workbench verify {store}` checks the whole store" in str(e.value)
    assert [str(p) for p in e.value.problems] == [
        "array 'token_id': chunk c/1 is missing (tokens 16-31 of 60 committed)"]
    # the export refuses it in one line (exit 2), instead of exporting -1 token ids
    r = cli("export", store, "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"workbench export: error: {want}") and "Traceback" not in r.stderr


def test_deleted_last_partial_chunk(multi, tmp_path):
    store = damaged(multi, tmp_path)
    (store / "token_id" / "c" / "3").unlink()  # rows 48-63: 48-59 committed
    with pytest.raises(TraceCorruptError, match=r"chunk c/3 is missing \(tokens 48-59 of 60 committed\)"):
        open_trace(store)


def test_deleted_expert_load_chunk(recorded, tmp_path):
    store = damaged(recorded, tmp_path)
    n_commits = open_trace(recorded).sizes["commit"]
    (store / "expert_load" / "c" / "0" / "0" / "0").unlink()
    msg = f"array 'expert_load': chunk c/0/0/0 is missing (commits 0-{n_commits - 1} of {n_commits} committed)"
    with pytest.raises(TraceCorruptError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        expert_loads(store)  # not loads summing to -1 x layers x experts
    with pytest.raises(TraceCorruptError, match="array 'expert_load'"):
        open_trace(store)


def test_deleted_topk_weight_array(recorded, tmp_path):
    store = damaged(recorded, tmp_path)
    n = open_trace(recorded).sizes["token"]
    shutil.rmtree(store / "topk_weight")  # the consolidated metadata still describes it
    assert "topk_weight" in json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    with pytest.raises(TraceCorruptError) as e:
        open_trace(store)
    assert str(e.value.problems[0]) == (f"array 'topk_weight': the array is missing (no zarr.json: deleted or never "
                                        f"written) (all {n} committed tokens)")


def test_corrupt_array_zarr_json(recorded, tmp_path):
    store = damaged(recorded, tmp_path)
    (store / "position" / "zarr.json").write_text('{"shape": [')
    with pytest.raises(TraceCorruptError, match=r"array 'position': its zarr.json cannot be read \(JSONDecodeError"):
        open_trace(store)
    r = cli("verify", store)
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    assert first.startswith("problem: array 'position': its zarr.json cannot be read (JSONDecodeError")


def test_disagreeing_consolidated_metadata(recorded, tmp_path):
    store = damaged(recorded, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"]["sequence"]["shape"] = [10**6]
    (store / "zarr.json").write_text(json.dumps(meta))
    want = ("array 'sequence': its zarr.json disagrees with the consolidated metadata in the root zarr.json on shape "
            r"\(readers would use the wrong one\)")
    with pytest.raises(TraceCorruptError, match=want):
        open_trace(store)


@pytest.mark.parametrize("attrs, message", [
    ({"n_tokens": -5}, "root attribute n_tokens = -5 is not a non-negative integer (damaged trace)"),
    ({"n_tokens": "12"}, "root attribute n_tokens = '12' is not a non-negative integer (damaged trace)"),
    ({"n_commits": True}, "root attribute n_commits = True is not a non-negative integer (damaged trace)"),
    ({"n_tokens": 2, "n_commits": 3}, "root attributes say 3 commits but only 2 tokens (every commit holds at least "
                                      "one token) (damaged trace)"),
])
def test_bad_committed_lengths(recorded, tmp_path, attrs, message):
    store = damaged(recorded, tmp_path)
    root_attrs(store, **attrs)
    with pytest.raises(TraceCorruptError) as e:
        open_trace(store)
    assert str(e.value) == f"{store}: {message}"
    r = cli("verify", store)
    assert r.returncode == 1 and r.stdout.splitlines()[0] == f"problem: {e.value.problems[0]}"


def test_v1_traces_still_open_and_verify():
    for name in ("v1_full.zarr", "v1_interrupted.zarr"):
        assert open_trace(V1 / name).sizes["token"] > 0
        res = verify_trace(V1 / name)
        assert res.ok, [str(p) for p in res]


# ---------------------------------------------------------------------------------- verify
def test_verify_healthy_store(recorded, multi):
    for store in (recorded, multi):
        r = cli("verify", store)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[-1].startswith(f"{store}: ") and r.stdout.rstrip().endswith(": OK")
        assert "problem:" not in r.stdout and r.stderr == ""
    res = verify_trace(multi)
    assert res.ok and res.n_tokens == 60 and res.n_commits == 3 and res.chunks > 10


def test_verify_truncated_chunk(multi, tmp_path):
    store = damaged(multi, tmp_path)
    f = store / "topk_weight" / "c" / "2" / "0" / "0"
    grid = json.loads((store / "topk_weight" / "zarr.json").read_text())["chunk_grid"]
    rows = grid["configuration"]["chunk_shape"][0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    open_trace(store)  # the open-time check does not decode: the file is there
    res = verify_trace(store)
    assert len(res) == 1 and res[0].node == "topk_weight" and "cannot be decoded: c/2/0/0" in res[0].what
    assert res[0].rows == f"tokens {2 * rows}-{min(3 * rows, 60) - 1} of 60 committed"
    r = cli("verify", store)
    lines = r.stdout.splitlines()
    assert r.returncode == 1
    assert lines[0].startswith("problem: array 'topk_weight': chunk(s) cannot be decoded: c/2/0/0 (truncated or padded")
    assert lines[-1].endswith("DAMAGED (1 problem(s))") and len(lines) == 2


def test_verify_reports_every_problem_one_line_each(multi, tmp_path):
    store = damaged(multi, tmp_path)
    (store / "token_id" / "c" / "0").unlink()
    (store / "sequence" / "c" / "2").write_bytes(b"")
    shutil.rmtree(store / "topk_expert")
    r = cli("verify", store)
    problems = [x for x in r.stdout.splitlines() if x.startswith("problem: ")]
    assert r.returncode == 1 and problems == [
        "problem: array 'token_id': chunk c/0 is missing (tokens 0-15 of 60 committed)",
        "problem: array 'sequence': chunk c/2 is empty or not a file (tokens 32-47 of 60 committed)",
        "problem: array 'topk_expert': the array is missing (no zarr.json: deleted or never written) "
        "(all 60 committed tokens)"]


def test_verify_value_checks(multi, tmp_path):
    """A chunk rewritten with fill values (-1) or a commit_end that does not reach n_tokens is damage too."""
    import zarr

    store = damaged(multi, tmp_path)
    a = zarr.open_array(store / "token_id", mode="r+")
    a[0:3] = -1
    root_attrs(store, n_tokens=59)
    res = verify_trace(store)
    assert [str(p) for p in res] == [
        "array 'token_id': values outside the declared range [0, 2147483647] (e.g. -1: a fill value where data "
        "belongs) (tokens 0-15 of 59 committed)",
        "array 'commit_end': the token counts after each commit do not rise strictly to n_tokens = 59 (last: 60)"]


def test_verify_cli_errors(tmp_path):
    r = cli("verify", tmp_path / "missing.zarr")
    assert r.returncode == 2 and r.stderr == f"workbench verify: error: no trace at {tmp_path / 'missing.zarr'}: the " \
                                             "path does not exist\n"
    r = cli("verify", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("workbench verify: error:") and r.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------- exports
def test_export_empty_trace(tmp_path):
    path = tmp_path / "empty.zarr"
    TraceWriter.create(path, **routing_layout([1], 4, 1)).close()
    r = cli("export", path, "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2
    assert r.stderr == f"workbench export: error: {path} holds no committed tokens (n_tokens = 0): nothing to export\n"
    assert not (tmp_path / "o").exists()


def test_csv_formula_guard_text_cells_only():
    from workbench.export.tables import _fmt_csv, csv_text

    for bad in ("=SUM(A1)", "+x", "-y", "@z", "\t=1", "\rhello"):
        assert csv_text(bad) == "'" + bad
    assert csv_text(" =x") == " =x" and csv_text("a=b") == "a=b"
    assert _fmt_csv(-1.5, "float") == "-1.5" and _fmt_csv(-3, "int") == "-3"  # numbers untouched
    assert _fmt_csv("-3", "str") == "'-3"  # a text label that looks like a number is still text


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:  # a quoted cell may hold a bare CR
        body = "".join(x + "\n" for x in f.read().split("\n") if x and not x.startswith("# "))
    return list(csv.DictReader(io.StringIO(body, newline="")))


def test_nul_and_formula_text_through_every_format(recorded, tmp_path):
    from workbench.export import export_all

    out = tmp_path / "paper"
    labels = {0: "=cmd|' /C calc'!A0", 1: "-1"}
    with pytest.warns(UserWarning, match="NetCDF trace_subset.nc: 1 token string"):
        res = export_all(recorded, out, labels=labels, vocab_top=100, vocab_min_count=1, progress=False)
    names = {str(p.relative_to(out)) for p in res}
    assert {"data/trace_subset.nc", "data/trace_subset.parquet", "report.html", "tables/vocab_top_tokens.csv",
            "tables/vocab_top_tokens.tex", "tables/domain_shares.csv", "manifest.json"} <= names
    # CSV: formula-like text cells get a leading '; the NUL token is kept (CSV holds it)
    tokens = {r["token"] for r in read_csv_rows(out / "tables" / "vocab_top_tokens.csv")}
    assert {"'=", "'+", "'\t", "'\r", "\x00"} <= tokens and not any(t[:1] in "=+-@" for t in tokens)
    assert {r["label"] for r in read_csv_rows(out / "tables" / "domain_shares.csv")} == {"'=cmd|' /C calc'!A0", "'-1"}
    # LaTeX: control characters visible
    assert r"\texttt{\textbackslash{}x00}" in (out / "tables" / "vocab_top_tokens.tex").read_text()
    # NetCDF: the NUL escaped, flagged and said so
    with xr.open_dataset(out / "data" / "trace_subset.nc") as nc:
        nc = nc.load()
    text = nc["token_text"].values.tolist()
    i = text.index("\\x00")
    assert nc["token_text_escaped"].values.tolist() == [int(j == i) for j in range(len(text))]
    assert "NUL as \\x00" in nc["token_text"].attrs["escaped"]
    assert text[:3] == ["<|begin_of_text|>", "a", "\\x00"]
    # Parquet keeps the NUL
    import pyarrow.parquet as pq

    assert "\x00" in set(pq.read_table(out / "data" / "trace_subset.parquet").column("token").to_pylist())
    # HTML: no raw NUL, the token shown escaped
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "\x00" not in html and "\\x00" in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and res.notes == manifest["notes"]
    assert manifest["notes"] == ["NetCDF trace_subset.nc: 1 token string(s) held characters NetCDF cannot store "
                                 "(NUL or lone surrogates): written with Python escapes such as \\x00"]
    assert sorted(manifest["files"]) == sorted(n for n in names if n != "manifest.json")
    r = cli("export", recorded, "--out", tmp_path / "cli", "--what", "netcdf", "--quiet")
    assert r.returncode == 0 and "note: NetCDF trace_subset.nc: 1 token string(s)" in r.stderr


@pytest.fixture
def tiny_fs(tmp_path):
    """A small tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root (and mount): the full-disk export test cannot run")
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(size: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def check_manifest_is_exact(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk  # no stray temp files, nothing unlisted
    magic = {"pdf": b"%PDF", "png": b"\x89PNG", "svg": b"<?xml", "nc": b"\x89HDF", "parquet": b"PAR1"}
    for rel in on_disk:  # every listed file is whole
        data = (out / rel).read_bytes()
        assert data.startswith(magic.get(rel.rsplit(".", 1)[-1], b"")) and data, rel
    return manifest


def test_export_disk_full(recorded, tiny_fs):
    mnt = tiny_fs("400k")
    out = mnt / "paper"
    r = cli("export", recorded, "--out", out, "--formats", "pdf,svg,png", "--quiet")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("workbench export: error: writing ") and "No space left on device [errno 28]" in r.stderr
    manifest = check_manifest_is_exact(out)
    assert manifest["status"] == "failed" and len(manifest["failed"]) == 1 and manifest["files"]
    assert f"the {len(manifest['files'])} file(s) written before are intact" in r.stderr


def test_netcdf_export_disk_full_is_not_a_crash(recorded, tiny_fs, tmp_path):
    """HDF5 segfaults when the disk fills at close: the NetCDF is built in memory, then written."""
    mnt = tiny_fs("64k")
    out = mnt / "o"
    out.mkdir()
    (mnt / "filler").write_bytes(b"x" * (48 << 10))  # 16 KiB left: room for the manifest, not the NetCDF
    r = cli("export", recorded, "--out", out, "--what", "netcdf,parquet", "--quiet")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("workbench export: error: writing netcdf into ") and r.stderr.count("\n") == 1
    manifest = check_manifest_is_exact(out)
    assert manifest["files"] == [] and manifest["failed"]["netcdf"].startswith("No space left on device [errno 28]")


def test_verify_attribution_nan_is_data_but_infinite_values_are_damage(tmp_path):
    """The attribution capture's NaN (a token with no next token in its pass) is not damage: a fresh
    trace with it verifies OK. An infinite router weight or attribution is damage."""
    import torch
    import zarr

    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    proc = wb.load_processor(EMBEDDED_MODEL)
    store = tmp_path / "a.zarr"
    with wb.record(model, store, capture=("router", "attribution"), processor=proc) as rec:
        rec.run(model, proc, ["The cat sat on the mat.", "1 + 2 = 3"], progress=False)
    assert np.isnan(open_trace(store)["attribution"].values).any()
    res = verify_trace(store)
    assert res.ok, [str(p) for p in res]
    a = zarr.open_array(store / "topk_weight", mode="r+")
    a[2, 0, 0] = np.inf
    b = zarr.open_array(store / "attribution", mode="r+")
    b[1, 0, 0] = -np.inf
    assert sorted(str(p).split(" (tokens")[0] for p in verify_trace(store)) == [
        "array 'attribution': infinite values in the token table",
        "array 'topk_weight': NaN or infinite values in the token table"]


def test_verify_recounts_expert_loads_from_the_ids(multi, tmp_path):
    """Per-commit expert_load must equal a count of its commit's topk_expert rows: an altered id (row sums
    unchanged) or a count moved between experts is reported, naming the commit."""
    import zarr

    store = damaged(multi, tmp_path)
    assert verify_trace(store).ok
    ids = zarr.open_array(store / "topk_expert", mode="r+")
    row = np.asarray(ids[25])
    row[0, 0] = (row[0, 0] + 1) % 4
    if row[0, 0] == row[0, 1]:
        row[0, 0] = (row[0, 0] + 1) % 4
    ids[25] = row  # token 25 is in the second commit (tokens 20-39)
    assert [str(p) for p in verify_trace(store)] == [
        "array 'expert_load': per-commit counts differ from a count of the topk_expert rows of 1 commit(s): one of "
        "the two was altered (commits 1 of 3 committed)"]


@pytest.mark.parametrize("attrs,message", [
    ({"n_tokens": 40}, "n_tokens = 40 but the last committed commit ends at token 60"),
    ({"n_experts": 8}, "n_experts = 8 but the arrays hold 4 along 'expert'"),
    ({"top_k": 1}, "top_k = 1 but the arrays hold 2 along 'k'"),
    ({"moe_layers": [0, 3]}, "moe_layers = [0, 3] but the layer array holds [1, 3]"),
])
def test_root_attributes_that_disagree_with_the_arrays(multi, tmp_path, attrs, message):
    """An edited zarr.json whose counts disagree with the arrays: open_trace and verify say so (the
    analyses would count over 8 experts, or read 40 of 60 tokens as the complete trace)."""
    store = damaged(multi, tmp_path)
    root_attrs(store, **attrs)
    with pytest.raises(TraceCorruptError, match=re.escape(message)):
        open_trace(store)
    found = " ".join(str(p) for p in verify_trace(store))
    assert message in found or (attrs.get("n_tokens") and "do not rise strictly to n_tokens = 40" in found), found


@pytest.mark.parametrize("variables", [5, {"token_id": 1}, {"token_id": {"name": "token_id"}}])
def test_unreadable_variable_declarations_are_damage(multi, tmp_path, variables):
    store = damaged(multi, tmp_path)
    root_attrs(store, variables=variables)
    with pytest.raises(TraceCorruptError, match="root attribute 'variables'"):
        open_trace(store)
    res = verify_trace(store)
    assert not res.ok and "root attribute 'variables'" in str(list(res)[0])
