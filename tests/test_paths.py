"""Routing paths (hand-computed, and out of core == in memory on random traces), steering and
causal-vs-observational importance (against expert_ablation), the path explorer and the export."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench as wb
from tests.hf_reference import hf_text_model
from workbench.analysis import _common as AC
from workbench.analysis import (expert_ablation, expert_importance, path_entropy, path_tokens, risk_difference,
                                routing_paths, spearman, steering_effect, token_paths, top_experts)
from workbench.trace import TraceWriter
from workbench.trace.schema import routing_layout

LAYERS, E = [1, 3, 5], 4


def _write(path, experts, weights=None, *, modality=None, sequence=None, n_experts=E, layers=LAYERS):
    n, L, k = experts.shape
    weights = np.ones((n, L, k), np.float32) if weights is None else weights
    with TraceWriter.create(path, **routing_layout(layers, n_experts, k)) as w:
        w.append(token_id=np.arange(n) % 50, sequence=np.zeros(n, np.int64) if sequence is None else sequence,
                 position=np.arange(n), modality=np.zeros(n, np.int8) if modality is None else modality,
                 topk_expert=experts.astype(np.int16), topk_weight=weights.astype(np.float32))
    return wb.open_trace(path)


@pytest.fixture
def small(tmp_path):
    """6 tokens, top-2; the top-1 slot is the one with the larger weight (slot 1 for token 5)."""
    top1 = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 1, 2], [0, 1, 2], [3, 0, 0]])
    second = (top1 + 1) % E
    experts = np.stack([top1, second], -1)
    weights = np.tile([0.9, 0.1], (6, 3, 1))
    experts[5] = np.stack([second[5], top1[5]], -1)  # token 5: top-1 in slot 1
    weights[5] = [0.2, 0.7]
    modality = np.array([0, 0, 1, 0, 1, 2], np.int8)
    return _write(tmp_path / "s.zarr", experts, weights, modality=modality, sequence=np.array([0, 0, 0, 1, 1, 2]))


def test_paths_hand_computed(small):
    p = routing_paths(small)
    assert p["expert"].values.tolist() == [[0, 1, 2], [0, 1, 3], [1, 1, 2], [3, 0, 0]]
    assert p["count"].values.tolist() == [3, 1, 1, 1]
    np.testing.assert_allclose(p["share"].values, [0.5, 1 / 6, 1 / 6, 1 / 6])
    assert p["layer"].values.tolist() == [1, 3, 5] and p.attrs["n_distinct"] == 4 and p.attrs["other_count"] == 0
    p2 = routing_paths(small, top=2, layers=[5, 1], by_modality=True, labels={0: "a", 1: "b"})
    assert p2["layer"].values.tolist() == [5, 1]
    # (2, 0) x3, then three paths of count 1: (0, 3) < (2, 1) < (3, 0) lexicographically
    assert p2["expert"].values.tolist() == [[2, 0], [0, 3]] and p2["count"].values.tolist() == [3, 1]
    assert p2["count_by_modality"].values.tolist() == [[2, 1, 0], [0, 0, 1]]
    assert p2["count_by_label"].values.tolist() == [[2, 1], [0, 0]]  # token 5 (sequence 2) has no label
    assert p2.attrs["other_count"] == 2
    assert routing_paths(small, modality="image")["count"].values.tolist() == [1, 1]
    ent = path_entropy(small)
    q1 = np.array([4, 1, 1]) / 6  # layer 1: experts 0, 1, 3
    q3 = np.array([4, 1, 1]) / 6  # (0,1) x4, (1,1), (3,0)
    q5 = np.array([3, 1, 1, 1]) / 6
    want = [-(q * np.log(q)).sum() for q in (q1, q3, q5)]
    np.testing.assert_allclose(ent["entropy"].values, want)
    assert ent["n_distinct"].values.tolist() == [3, 3, 4] and ent["depth"].values.tolist() == [1, 2, 3]
    np.testing.assert_allclose(ent["normalized"].values, np.array(want) / np.log([4, 6, 6]))
    t = path_tokens(small, [0, 1, 2])
    assert t["token"].values.tolist() == [0, 1, 4] and t.attrs["n_matches"] == 3
    assert path_tokens(small, token=3)["token"].values.tolist() == [3]
    assert path_tokens(small, token=0, limit=2)["token"].values.tolist() == [0, 1]
    assert path_tokens(small, [1, 2], layers=[3, 5])["token"].values.tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match=r"decoder layer 2 is not a MoE layer.*\[1, 3, 5\]"):
        routing_paths(small, layers=[2])
    with pytest.raises(ValueError, match="3 selected MoE layers"):
        path_tokens(small, [0, 1])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1025, 4000), k=st.integers(1, 2), n_exp=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_out_of_core_equals_in_memory_on_random_traces(n, k, n_exp, seed):
    """Random traces (hypothesis draws sizes, k and the expert count; the seed the skewed routing)
    read in blocks of 1024 tokens vs the paths computed from the whole arrays at once."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as monkeypatch:
        _check_out_of_core(Path(d), monkeypatch, n, k, n_exp, np.random.default_rng(seed))


def _check_out_of_core(tmp_path, monkeypatch, n, k, n_exp, rng):
    probs = rng.dirichlet(np.full(n_exp, 0.5), size=len(LAYERS))
    experts = np.stack([np.stack([rng.choice(n_exp, size=k, replace=False, p=probs[li]) for li in range(3)])
                        for _ in range(n)])
    weights = rng.random((n, 3, k)).astype(np.float32)
    modality = rng.integers(0, 3, n).astype(np.int8)
    seq = np.sort(rng.integers(0, 7, n))
    ds = _write(tmp_path / "r.zarr", experts, weights, modality=modality, sequence=seq, n_experts=n_exp)
    monkeypatch.setattr(AC, "BLOCK_TOKENS", 1024)
    assert len(AC.token_blocks(ds, ["topk_expert"])) > 1
    mem = AC.top1(experts, weights)  # (n, 3) in memory
    np.testing.assert_array_equal(token_paths(ds).values, mem)
    uniq, counts = np.unique(mem, axis=0, return_counts=True)
    order = np.lexsort(tuple(uniq[:, ::-1].T) + (-counts,))
    got = routing_paths(ds, top=None, by_modality=True)
    np.testing.assert_array_equal(got["expert"].values, uniq[order])
    np.testing.assert_array_equal(got["count"].values, counts[order])
    for i, path in enumerate(uniq[order][:5]):
        hit = (mem == path).all(1)
        np.testing.assert_array_equal(got["count_by_modality"].values[i], np.bincount(modality[hit], minlength=3))
        np.testing.assert_array_equal(path_tokens(ds, path)["token"].values, np.flatnonzero(hit))
    ent = path_entropy(ds)
    for d in range(3):
        _, c = np.unique(mem[:, :d + 1], axis=0, return_counts=True)
        q = c / n
        assert float(ent["entropy"][d]) == pytest.approx(-(q * np.log(q)).sum(), rel=1e-12)
    labels = {s: ("x" if s % 2 else "y") for s in range(7)}
    lab = routing_paths(ds, top=3, labels=labels)
    for i, path in enumerate(lab["expert"].values):
        hit = (mem == path).all(1)
        assert lab["count_by_label"].values[i].tolist() == [int((hit & (seq % 2 == 1)).sum()),
                                                            int((hit & (seq % 2 == 0)).sum())]


def test_risk_difference_and_top_experts(tmp_path):
    a = _write(tmp_path / "a.zarr", np.array([[[0], [1], [2]], [[0], [2], [2]]]))
    b = _write(tmp_path / "b.zarr", np.array([[[1], [1], [2]], [[1], [1], [3]], [[0], [1], [3]]]))
    rd = risk_difference(a, b)
    np.testing.assert_allclose(rd["risk_difference"].values[0], [1 - 1 / 3, -2 / 3, 0, 0])
    np.testing.assert_allclose(rd["risk_difference"].values[1], [0, 0.5 - 1, 0.5, 0])
    np.testing.assert_allclose(rd["risk_difference"].values[2], [0, 0, 1 - 1 / 3, -2 / 3])
    assert top_experts(rd, 2, sign="positive") == [(1, 0), (5, 2)]
    assert top_experts(rd, 1, sign="negative") == [(1, 1)]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 4], [4, 3, 3, 1]) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_text_model(seed=31, interleave_moe_layer_step=2).save_pretrained(d)  # MoE layers [1, 3]
    return wb.load_model(d, progress=False)


@torch.no_grad()
def test_steering_and_importance_agree_with_expert_ablation(model):
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    abl = expert_ablation(model, {"input_ids": ids}, 3, [0, 1, 2])
    eff = steering_effect(model, {"input_ids": ids}, {f"b{e}": {"block": {3: [e]}} for e in (0, 1, 2)})
    np.testing.assert_allclose(eff["delta_loss"].values, abl["delta_loss"].values, atol=1e-9)
    np.testing.assert_allclose(eff["kl"].values, abl["kl"].values, atol=1e-9)
    np.testing.assert_allclose(eff["top1_agreement"].values, abl["top1_agreement"].values)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 8:] = True
    part = steering_effect(model, {"input_ids": ids}, {"f": {"force": {1: 2}}}, target_mask=target)
    assert part.attrs["n_target_pairs"] == 2 * 4 and np.isfinite(part["loss"].values).all()
    imp = expert_importance(model, {"input_ids": ids}, layers=[3])
    assert imp["layer"].values.tolist() == [3]
    np.testing.assert_allclose(imp["delta_loss"].sel(expert=[0, 1, 2]).values[0], abl["delta_loss"].values, atol=1e-9)
    np.testing.assert_allclose(imp["load_share"].values[0], [np.mean(
        [abl["rerouted"].sel(expert=e).item() for e in [x]]) for x in range(3)] + list(imp["load_share"].values[0, 3:]))
    assert imp["load_share"].values.sum() == pytest.approx(1.0)
    unused = imp["load_share"].values[0] == 0
    assert np.isnan(imp["mean_norm"].values[0][unused]).all() and (imp["delta_loss"].values[0][unused] == 0).all()
    assert -1 <= imp.attrs["rho_load"] <= 1
    with pytest.raises(ValueError, match=r"layers \[2\] are not MoE layers; MoE layers: \[1, 3\]"):
        expert_importance(model, {"input_ids": ids}, layers=[2])


@torch.no_grad()
def test_importance_export_table_and_figure(model, tmp_path):
    from workbench.export import export_all, export_importance

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    imp = expert_importance(model, {"input_ids": ids})
    with wb.record(model, tmp_path / "t.zarr"):
        model(input_ids=ids)
    imp.to_netcdf(tmp_path / "imp.nc")
    paths = export_all(tmp_path / "t.zarr", tmp_path / "out", what="importance", importance=tmp_path / "imp.nc",
                       formats=["png"], progress=False)
    names = sorted(p.name for p in paths)
    assert names == ["causal_vs_observational.csv", "causal_vs_observational.png", "causal_vs_observational.tex",
                     "manifest.json"]
    import pandas as pd

    tab = pd.read_csv(tmp_path / "out" / "tables" / "causal_vs_observational.csv", comment="#")
    assert len(tab) == 2 * 8 and tab["layer"].unique().tolist() == [1, 3]
    np.testing.assert_allclose(tab["delta_loss"].values, imp["delta_loss"].values.ravel())
    assert "Spearman" in (tmp_path / "out" / "tables" / "causal_vs_observational.tex").read_text()
    only3 = export_importance(tmp_path / "t.zarr", tmp_path / "o3", layers=[3], importance=imp, formats=["png"])
    tab3 = pd.read_csv([p for p in only3 if p.suffix == ".csv"][0], comment="#")
    assert tab3["layer"].unique().tolist() == [3]
    skipped = export_all(tmp_path / "t.zarr", tmp_path / "o4", what="tables", progress=False)
    assert "importance" not in skipped.skipped and not any("causal" in p.name for p in skipped)


def test_path_explorer_shows_the_picked_paths_tokens_escaped(small, tmp_path):
    from workbench.widgets import PathExplorer

    v = PathExplorer(small, layers=[1, 3, 5])
    assert v.selected == [0, 1, 2] and v.layers == [1, 3, 5]
    html_ = v.tokens_html()
    assert html_.count("wb-path-row") == 3 and "L1:0" in html_
    v.w_path.value = 3
    assert v.selected == [3, 0, 0] and v.w_tokens.value.count("wb-path-row") == 1
    n = 4
    experts = np.zeros((n, 3, 1), np.int16)
    vocab = ["<b>x</b>", "&", "a", "b"]
    with TraceWriter.create(tmp_path / "v.zarr", **routing_layout(LAYERS, E, 1), vocab=vocab) as w:
        w.append(token_id=np.arange(n), sequence=np.zeros(n, np.int64), position=np.arange(n),
                 modality=np.zeros(n, np.int8), topk_expert=experts, topk_weight=np.ones((n, 3, 1), np.float32))
    text = PathExplorer(tmp_path / "v.zarr").tokens_html()
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text and "&amp;" in text
    with pytest.raises(ValueError, match=r"decoder layer 4 is not a MoE layer.*\[1, 3, 5\]"):
        PathExplorer(small, layers=[4])
