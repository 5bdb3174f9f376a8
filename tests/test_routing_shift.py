"""Routing shift (bf16 vs quantized traces of the same inputs): hand-computed values on two small
traces written with the real trace writer, the widget, the export tables."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import workbench as wb
import workbench.analysis as A
from workbench.trace import TraceWriter
from workbench.trace.schema import routing_layout

VOCAB = ["<|bos|>", "hello", " world", "<script>alert(1)</script>", "=1+2", "&amp;", "x"]
LAYERS, E, K = [1, 3], 4, 2
IDS = [1, 3, 2, 4, 0]
SEQ, POS = [0, 0, 0, 1, 1], [0, 1, 2, 0, 1]
MOD = [0, 1, 0, 0, 2]  # t1 image patch, t4 special

# Trace A (bf16)                                Trace B (int4)
# layer 1: sets (weights) -> top-1             layer 1
#   t0 [0,1] (.7,.3) -> 0                        [0,1] (.6,.4) -> 0   same
#   t1 [1,2] (.8,.2) -> 1                        [1,3] (.8,.2) -> 1   set changed, top-1 kept
#   t2 [2,3] (.5,.5) -> 2 (tie: first slot)      [3,2] (.6,.4) -> 3   same set, top-1 moved 2 -> 3
#   t3 [3,0] (.6,.4) -> 3                        [3,0] (.6,.4) -> 3   same
#   t4 [0,2] (.9,.1) -> 0                        [0,2] (.9,.1) -> 0   same
# layer 3:                                      layer 3
#   t0 [2,3] (.6,.4) -> 2                        [3,2] (.7,.3) -> 3   same set, top-1 moved 2 -> 3
#   t1 [3,0] (.9,.1) -> 3                        [3,0] (.9,.1) -> 3   same
#   t2 [0,1] (.3,.7) -> 1                        [0,1] (.2,.8) -> 1   same
#   t3 [1,2] (.5,.5) -> 1                        [2,3] (.6,.4) -> 2   set changed, top-1 moved 1 -> 2
#   t4 [2,0] (.8,.2) -> 2                        [2,0] (.8,.2) -> 2   same
EXP_A = [[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[2, 3], [0, 1]], [[3, 0], [1, 2]], [[0, 2], [2, 0]]]
W_A = [[[.7, .3], [.6, .4]], [[.8, .2], [.9, .1]], [[.5, .5], [.3, .7]], [[.6, .4], [.5, .5]], [[.9, .1], [.8, .2]]]
EXP_B = [[[0, 1], [3, 2]], [[1, 3], [3, 0]], [[3, 2], [0, 1]], [[3, 0], [2, 3]], [[0, 2], [2, 0]]]
W_B = [[[.6, .4], [.7, .3]], [[.8, .2], [.9, .1]], [[.6, .4], [.2, .8]], [[.6, .4], [.6, .4]], [[.9, .1], [.8, .2]]]


def write(path, experts, weights, commits=((0, 3), (3, 5)), vocab=VOCAB):
    with TraceWriter.create(path, **routing_layout(LAYERS, E, K), vocab=vocab) as w:
        for a, b in commits:
            w.append(token_id=np.asarray(IDS[a:b], np.int32), sequence=np.asarray(SEQ[a:b], np.int32),
                     position=np.asarray(POS[a:b], np.int32), modality=np.asarray(MOD[a:b], np.int8),
                     topk_expert=np.asarray(experts[a:b], np.int16), topk_weight=np.asarray(weights[a:b], np.float32))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("shift")
    return write(d / "bf16.zarr", EXP_A, W_A), write(d / "int4.zarr", EXP_B, W_B, commits=((0, 2), (2, 5)))


def test_routing_shift_by_hand(pair):
    pa, pb = pair
    r = A.routing_shift(wb.open_trace(pa), wb.open_trace(pb))
    assert r["layer"].values.tolist() == LAYERS
    np.testing.assert_allclose(r["top1_agreement"], [4 / 5, 3 / 5])
    np.testing.assert_allclose(r["overlap"], [9 / 10, 9 / 10])  # t1 at L1 and t3 at L3 share one of two
    assert r["top1_changed"].values.tolist() == [1, 2]
    assert r["set_changed"].values.tolist() == [1, 1]
    # top-k slot counts: L1 a [3,2,3,2] b [3,2,2,3]; L3 a [3,2,3,2] b [3,1,3,3]
    assert r["count_a"].values.tolist() == [[3, 2, 3, 2], [3, 2, 3, 2]]
    assert r["count_b"].values.tolist() == [[3, 2, 2, 3], [3, 1, 3, 3]]
    np.testing.assert_allclose(r["load_change"], [[0, 0, -.1, .1], [0, -.1, 0, .1]], atol=1e-12)
    np.testing.assert_allclose(r["load_a"].values.sum(-1), [1, 1])
    flow1 = np.zeros((E, E), int)
    for i, j in [(0, 0), (1, 1), (2, 3), (3, 3), (0, 0)]:
        flow1[i, j] += 1
    assert r["top1_flow"].values[0].tolist() == flow1.tolist()
    # changes, by token then layer: (t0, L3) top-1 2->3; (t1, L1) set only; (t2, L1) 2->3; (t3, L3) 1->2
    assert r["change_token"].values.tolist() == [0, 1, 2, 3]
    assert r["change_layer"].values.tolist() == [3, 1, 1, 3]
    assert r["top1_a"].values.tolist() == [2, 1, 2, 1] and r["top1_b"].values.tolist() == [3, 1, 3, 2]
    assert r["top1_moved"].values.tolist() == [True, False, True, True]
    assert r["text"].values.tolist() == ["hello", "<script>alert(1)</script>", " world", "=1+2"]
    assert r["sequence"].values.tolist() == [0, 0, 0, 1] and r["position"].values.tolist() == [0, 1, 2, 0]
    assert r["experts_a"].values[1].tolist() == [1, 2] and r["experts_b"].values[1].tolist() == [1, 3]
    np.testing.assert_allclose(r["weight_a"].values[0], .6, rtol=1e-6)
    np.testing.assert_allclose(r["weight_b"].values[0], .7, rtol=1e-6)
    assert r.attrs["n_changes"] == 4 and not r.attrs["changes_truncated"] and r.attrs["n_tokens"] == 5
    # the same numbers as saturation and expert_load give
    sat = A.saturation(wb.open_trace(pa), wb.open_trace(pb))
    np.testing.assert_array_equal(r["overlap"], sat["overlap"])
    np.testing.assert_allclose(r["load_b"], A.expert_load(wb.open_trace(pb)))


def test_routing_shift_filters_and_truncation(pair):
    pa, pb = pair
    a, b = wb.open_trace(pa), wb.open_trace(pb)
    t = A.routing_shift(a, b, modality="text")  # t0, t2, t3
    np.testing.assert_allclose(t["top1_agreement"], [2 / 3, 1 / 3])
    assert t["change_token"].values.tolist() == [0, 2, 3] and t.attrs["n_tokens"] == 3
    cut = A.routing_shift(a, b, max_changes=2)
    assert cut.sizes["change"] == 2 and cut.attrs["n_changes"] == 4 and cut.attrs["changes_truncated"]
    assert A.routing_shift(a, a)["top1_agreement"].values.tolist() == [1.0, 1.0]
    assert A.routing_shift(a, a).sizes["change"] == 0
    same = A.routing_shift(a, b, vocab=["v"] * 7)
    assert set(same["text"].values.tolist()) == {"v"}
    with pytest.raises(ValueError, match="not on the same inputs"):
        A.routing_shift(a, a.assign(token_id=("token", np.array([1, 3, 2, 4, 6], np.int32))))
    with pytest.raises(ValueError, match="max_changes"):
        A.routing_shift(a, b, max_changes=-1)


def test_routing_shift_without_a_vocabulary(tmp_path):
    pa = write(tmp_path / "a.zarr", EXP_A, W_A, vocab=None)
    pb = write(tmp_path / "b.zarr", EXP_B, W_B, vocab=None)
    r = A.routing_shift(wb.open_trace(pa), wb.open_trace(pb))
    assert r["text"].values.tolist() == ["#1", "#3", "#2", "#4"]


def test_widget_renders_the_shift(pair):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    pytest.importorskip("anywidget")
    from workbench.widgets import RoutingShiftView

    pa, pb = pair
    v = RoutingShiftView(pa, pb, labels=("bf16", "int4"), layer=3)
    assert v.layer == 3
    np.testing.assert_allclose(v.agreement.data[0].y, [4 / 5, 3 / 5])
    np.testing.assert_allclose(v.agreement.data[1].y, [.9, .9])
    np.testing.assert_allclose(v.load.data[0].z, [[0, 0, -.1, .1], [0, -.1, 0, .1]], atol=1e-12)
    flow3 = np.zeros((E, E), int)
    for i, j in [(2, 3), (3, 3), (1, 1), (1, 2), (2, 2)]:
        flow3[i, j] += 1
    np.testing.assert_array_equal(v.flow.data[0].z, flow3)
    assert [x["change_token"] for x in v.changed_rows()] == [0, 3]
    assert "2 of 5 tokens changed their top-1" in v.w_status.value
    v.layer = 1
    assert [x["change_token"] for x in v.changed_rows()] == [1, 2]
    table = v.w_table.value
    assert "&lt;script&gt;" in table and "<script>" not in table  # token text escaped
    v.w_modality.value = 0  # text tokens only: t2 at layer 1
    assert [x["change_token"] for x in v.changed_rows()] == [2]
    np.testing.assert_allclose(v.agreement.data[0].y, [2 / 3, 1 / 3])
    assert v._repr_mimebundle_() is not None
    with pytest.raises(ValueError, match=r"decoder layer 2 is not a MoE layer.*\[1, 3\]"):
        RoutingShiftView(pa, pb, layer=2)
    v.layer = 3
    v.w_modality.value = 2  # special: t4 only, unchanged
    assert "No token changed" in v.w_table.value


def _read_csv(path):
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def test_export_tables(pair, tmp_path):
    from workbench.export import ExportError, export_all, export_routing_shift

    pa, pb = pair
    paths = export_routing_shift(pa, tmp_path / "one", compare=pb, compare_labels=("bf16", "int4"))
    assert sorted(p.name for p in paths) == ["routing_shift.csv", "routing_shift.tex", "routing_shift_tokens.csv"]
    rows = _read_csv(tmp_path / "one" / "tables" / "routing_shift.csv")
    assert [int(r["layer"]) for r in rows] == LAYERS
    assert float(rows[0]["top1_agreement"]) == pytest.approx(.8) and int(rows[1]["top1_changed"]) == 2
    assert float(rows[0]["load_shift"]) == pytest.approx(.2)
    assert (int(rows[0]["max_gain_expert"]), int(rows[0]["max_loss_expert"])) == (3, 2)
    toks = _read_csv(tmp_path / "one" / "tables" / "routing_shift_tokens.csv")
    assert [r["text"] for r in toks] == ["hello", "<script>alert(1)</script>", " world", "'=1+2"]  # CSV-injection safe
    assert [r["top1_bf16"] + ">" + r["top1_int4"] for r in toks] == ["2>3", "1>1", "2>3", "1>2"]
    assert toks[1]["top1_changed"] == "no" and toks[1]["experts_int4"] == "1 3"
    tex = (tmp_path / "one" / "tables" / "routing_shift.tex").read_text()
    assert r"\toprule" in tex and "0.800" in tex
    # export_all: part of "tables" only with a second trace; layer selection applies to both traces
    res = export_all(pa, tmp_path / "all", what="tables", progress=False)
    assert "routing_shift" not in res.skipped and not (tmp_path / "all" / "tables" / "routing_shift.csv").exists()
    res = export_all(pa, tmp_path / "all2", what="tables", compare=pb, layers=[3], progress=False)
    rows = _read_csv(tmp_path / "all2" / "tables" / "routing_shift.csv")
    assert [int(r["layer"]) for r in rows] == [3]
    res = export_all(pa, tmp_path / "skip", what="routing_shift", progress=False)
    assert "compare=" in res.skipped["routing_shift"]
    with pytest.raises(FileNotFoundError, match="missing.zarr"):  # before anything is written
        export_all(pa, tmp_path / "bad", what="routing_shift", compare=tmp_path / "missing.zarr", progress=False)
    assert not (tmp_path / "bad" / "tables").exists() and not (tmp_path / "bad" / "manifest.json").exists()
    with pytest.raises(ExportError, match="routing shift: .*different MoE layers"):
        export_routing_shift(pa, tmp_path / "other",
                             compare=wb.open_trace(pb).assign_coords(layer=("moe_layer", [5, 7])))
