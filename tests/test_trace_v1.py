"""Stores written by the v1 code (tests/data/v1, see its README) open with today's reader and give the
analyses the v1 code computed on them; today's recorder writes the same data from the same inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench import analysis as A
from workbench.trace import TraceError, TraceWriter, attention_sequences

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "v1"
EXPECTED = V1 / "v1_expected.nc"
LABELS = {0: "prose", 1: "code", 2: "math", 3: "image", 4: "image"}


def expected(name: str) -> xr.Dataset:
    return xr.open_dataset(EXPECTED, group=name, engine="h5netcdf").load()


def same(got, want: xr.Dataset, name: str) -> None:
    got = got.to_dataset(name="v") if isinstance(got, xr.DataArray) else got
    assert set(got.data_vars) == set(want.data_vars), name
    for v in want.data_vars:
        a, b = got[v], want[v]
        assert a.dims == b.dims, (name, v)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a.values, b.values, rtol=1e-12, atol=0, equal_nan=True, err_msg=f"{name}.{v}")
        else:
            np.testing.assert_array_equal(a.values, b.values, err_msg=f"{name}.{v}")
    for c in want.coords:
        np.testing.assert_array_equal(np.asarray(got[c].values), np.asarray(want[c].values), err_msg=f"{name}.{c}")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """Copies of the fixtures (opening a store must not need write access, but resume attempts do)."""
    d = tmp_path_factory.mktemp("v1")
    for s in ("v1_full.zarr", "v1_interrupted.zarr"):
        shutil.copytree(V1 / s, d / s)
    return d


def test_v1_store_opens_with_the_v2_names(v1):
    ds = wb.open_trace(v1 / "v1_full.zarr")
    a = ds.attrs
    assert a["schema"] == "workbench.trace/1" and a["complete"] is True
    assert a["n_commits"] == 3 and "n_batches" not in a and "capture_logits" not in a
    assert ds.sizes["commit"] == 3 and "batch" not in ds.dims
    np.testing.assert_array_equal(ds["commit_end"].values, np.cumsum(
        [np.isin(ds["sequence"].values, pair).sum() for pair in ([0, 1], [2, 3], [4])]))
    assert a["captures"] == {"router": {}, "logits": {"dtype": "float16"}, "attention": {}}
    assert [x["layer"] for x in a["routing"]["layers"]] == a["moe_layers"] == [0, 1, 2, 3]
    assert {x["score"] for x in a["routing"]["layers"]} == {"sigmoid"}
    assert ds["router_logits"].dtype == np.float16
    assert attention_sequences(v1 / "v1_full.zarr") == [3, 4]


def test_v1_store_gives_the_v1_analyses(v1):
    ds = wb.open_trace(v1 / "v1_full.zarr")
    same(A.expert_load(ds), expected("expert_load"), "expert_load")
    same(A.expert_load(ds, by_modality=True), expected("expert_load_by_modality"), "by_modality")
    same(A.expert_load(ds, normalize=False), expected("expert_load_counts"), "counts")
    same(A.load_imbalance(ds), expected("load_imbalance"), "load_imbalance")
    same(A.router_entropy(ds, source="logits"), expected("router_entropy_logits"), "entropy")
    same(A.router_entropy(ds, source="logits", by_modality=True), expected("router_entropy_by_modality"), "ent_mod")
    same(A.coactivation(ds, 3), expected("coactivation"), "coactivation")
    same(A.repetition_rate(ds), expected("repetition_rate"), "repetition_rate")
    same(A.layer_transitions(ds, 0, 3), expected("layer_transitions"), "transitions")
    same(A.vocab_specialization(ds, min_count=2), expected("vocab_specialization"), "vocab")
    same(A.domain_specialization(ds, LABELS), expected("domain_specialization"), "domain")
    same(A.saturation(ds, ds), expected("saturation"), "saturation")
    for s in (3, 4):
        att = wb.open_attention(v1 / "v1_full.zarr", s)
        same(att.load(), expected(f"attention_{s}"), f"attention_{s}")


def test_interrupted_v1_store_reads_its_committed_rows_and_is_not_resumed(v1):
    path = v1 / "v1_interrupted.zarr"
    ds = wb.open_trace(path)
    raw = xr.open_zarr(path, consolidated=False)
    assert raw.sizes["token"] == ds.sizes["token"] + 5  # the uncommitted rows are on disk, not in the trace
    assert ds.attrs["complete"] is False and (ds["token_id"].values != 1).any()
    same(A.expert_load(ds, normalize=False), expected("interrupted_load"), "interrupted_load")
    assert int(A.expert_load(ds, normalize=False).sum()) == ds.sizes["token"] * 4
    with pytest.raises(TraceError, match="workbench.trace/1 trace: it opens for reading, but only the workbench"):
        TraceWriter.resume(path)
    assert json.loads((path / "zarr.json").read_text())["attributes"]["schema"] == "workbench.trace/1"


def test_todays_recorder_writes_what_v1_wrote(v1, tmp_path):
    """The same model and prompts recorded now: the same token table and attention maps as the v1 store."""
    from workbench.embedded import EMBEDDED_MODEL
    from workbench.hooks import AttentionCapture

    prompts = [json.loads(line) for line in (V1 / "prompts.jsonl").read_text().splitlines()]
    for p in prompts:
        p["images"] = [str(ROOT / x) for x in p["images"]]
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    proc = wb.load_processor(EMBEDDED_MODEL)
    store = tmp_path / "now.zarr"
    rec = wb.record(model, store, capture=["logits", AttentionCapture(layers=[1, 3])], processor=proc,
                    commit_every_seconds=0)  # one commit per batch, as v1 wrote them
    with torch.no_grad():
        rec.run(model, proc, prompts, batch_size=2, progress=False)
    rec.close()
    new, old = wb.open_trace(store).load(), wb.open_trace(v1 / "v1_full.zarr").load()
    assert new.attrs["schema"] == wb.trace.SCHEMA
    assert not new["generated"].values.any() and not old["generated"].values.any()
    for name in ("token_id", "sequence", "position", "modality", "topk_expert", "commit_end", "expert_load"):
        np.testing.assert_array_equal(new[name].values, old[name].values, err_msg=name)
    np.testing.assert_allclose(new["topk_weight"].values, old["topk_weight"].values, rtol=1e-6)
    np.testing.assert_allclose(new["router_logits"].values.astype(np.float32),
                               old["router_logits"].values.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert wb.trace.trace_vocab(store) == wb.trace.trace_vocab(v1 / "v1_full.zarr")
    for s in (3, 4):
        a, b = wb.open_attention(store, s), wb.open_attention(v1 / "v1_full.zarr", s)
        np.testing.assert_allclose(a.values.astype(np.float32), b.values.astype(np.float32), atol=2e-3)
        for c in ("layer", "head", "query_token", "patch_token", "image", "tile", "row", "col"):
            np.testing.assert_array_equal(a[c].values, b[c].values, err_msg=c)
