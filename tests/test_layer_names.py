"""``layer`` means the decoder layer index in every public API.

One walk over the public names of the workbench packages finds every parameter and property that
names a layer; each must be in :data:`PROBES` (or :data:`NOT_A_LAYER`, with the reason). Each probe
calls the API with a decoder index whose position among the MoE layers differs (MoE layers
[1, 3, 5], or [1, 3] for the models), checks that the result is about that decoder layer, and that
a dense layer index is refused with an error listing the MoE layers. The data each view or
analysis shows for its layer is checked in detail against hand-computed values in the module
tests (test_analysis, test_export, test_widgets); this walk makes sure none is left out.
"""
from __future__ import annotations

import importlib
import inspect
import re

import numpy as np
import pytest
import torch

import workbench as wb
from tests.hf_reference import IMAGE_TOKEN, TOKENS_PER_TILE, hf_multimodal_model, hf_text_model

PUBLIC = ["workbench", "workbench.analysis", "workbench.export", "workbench.widgets", "workbench.hooks",
          "workbench.trace", "workbench.runtime", "workbench.kernels", "workbench.cli", "workbench.checkpoint",
          "workbench.geometry", "workbench.embedded"]
LAYERISH = re.compile(r"(^|_)layers?$|^transitions$|^(a|b)$")
LAYERS, E, K = [1, 3, 5], 4, 2

NOT_A_LAYER = {
    ("TextConfig.__init__", "num_hidden_layers"): "a count",
    ("TextConfig.__init__", "no_rope_layers"): "one 0/1 flag per layer (indexed by decoder index)",
    ("TraceComparison.__init__", "a"): "a trace",
    ("TraceComparison.__init__", "b"): "a trace",
    ("RoutingSpec.__init__", "layers"): "MoELayerRouting objects (probed as MoELayerRouting.layer)",
}


def public_layer_parameters() -> set[tuple[str, str]]:
    found = set()
    for modname in PUBLIC:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            targets = []
            if inspect.isclass(obj):
                targets.append((f"{name}.__init__", obj.__init__))
                for attr, value in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(value, property):
                        if LAYERISH.search(attr):
                            found.add((name, attr))
                    elif callable(value):
                        targets.append((f"{name}.{attr}", value))
            elif callable(obj):
                targets.append((name, obj))
            for qualname, fn in targets:
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                found |= {(qualname, p) for p in params if LAYERISH.search(p)}
    return found


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A trace with MoE layers [1, 3, 5] whose top-1 expert differs by layer: (token + 2 * position) % E."""
    from workbench.trace import TraceWriter
    from workbench.trace.schema import routing_layout

    path = tmp_path_factory.mktemp("syn") / "t.zarr"
    n = 40
    t = np.arange(n)
    top1 = np.stack([(t + 2 * p) % E for p in range(len(LAYERS))], 1)
    experts = np.stack([top1, (top1 + 1) % E], -1).astype(np.int16)
    with TraceWriter.create(path, **routing_layout(LAYERS, E, K, logits_dtype="float32"),
                            vocab=[f"t{i}" for i in range(50)]) as w:
        w.append(token_id=t % 50, sequence=t // 20, position=t % 20, modality=np.zeros(n, np.int8),
                 topk_expert=experts, topk_weight=np.tile([0.9, 0.1], (n, 3, 1)).astype(np.float32),
                 router_logits=np.random.default_rng(0).normal(size=(n, 3, E)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("txt")
    hf_text_model(seed=4, interleave_moe_layer_step=2).save_pretrained(d)  # MoE layers [1, 3]
    return wb.load_model(d, progress=False)


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """A multimodal trace with attention maps recorded at decoder layers 1 and 3 only."""
    d = tmp_path_factory.mktemp("mm")
    hf_multimodal_model(seed=5).save_pretrained(d / "ckpt")
    model = wb.load_model(d / "ckpt", progress=False)
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * TOKENS_PER_TILE + [7, 8, 9, 2]])
    with torch.no_grad(), wb.record(model, d / "t.zarr", capture={"attention": {"layers": [3, 1]}}):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
    return d / "t.zarr"


def _raises(fn, match=r"\[1, 3, 5\]", exc=Exception):
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------ probes
def probe_coactivation(syn, **_):
    ds = wb.open_trace(syn)
    got = wb.analysis.coactivation(ds, 3, counts=True)
    top = ds["topk_expert"].values[:, 1]  # decoder layer 3 = MoE position 1
    np.testing.assert_array_equal(got["n_i"].values, np.bincount(top.ravel(), minlength=E))
    _raises(lambda: wb.analysis.coactivation(ds, 2))


def probe_layer_transitions(syn, **_):
    ds = wb.open_trace(syn)
    got = wb.analysis.layer_transitions(ds, 5, 3, counts=True)
    want = np.zeros((E, E), np.int64)
    np.add.at(want, (ds["topk_expert"].values[:, 2, 0], ds["topk_expert"].values[:, 1, 0]), 1)
    np.testing.assert_array_equal(got.values, want)
    _raises(lambda: wb.analysis.layer_transitions(ds, 2, 3))
    _raises(lambda: wb.analysis.layer_transitions(ds, 3, 4))


def probe_expert_ablation(text_model, **_):
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    seen = []
    with text_model.model.layers[3].feed_forward.hook_router.add(lambda p, topk_ids, **kw: seen.append(topk_ids)):
        text_model(input_ids=ids)
    e = int(seen[0][0, 0])
    res = wb.analysis.expert_ablation(text_model, {"input_ids": ids}, 3, [e])
    assert res.attrs["layer"] == 3
    assert float(res["rerouted"].sel(expert=e)) == pytest.approx(float((seen[0] == e).any(-1).float().mean()))
    _raises(lambda: wb.analysis.expert_ablation(text_model, {"input_ids": ids}, 2, [0]), r"MoE layers: \[1, 3\]")


def probe_block_experts(text_model, **_):
    from workbench.hooks import block_experts

    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    chosen = {1: [], 3: []}
    handles = [text_model.model.layers[i].feed_forward.hook_router.add(
        lambda p, topk_ids, i=i, **kw: chosen[i].append(topk_ids)) for i in (1, 3)]
    try:
        text_model(input_ids=ids)
        e = int(chosen[3][0][0, 0])
        with block_experts(text_model, {3: [e]}):
            text_model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert not (chosen[3][1] == e).any() and torch.equal(chosen[1][0], chosen[1][1])  # layer 3 only
    _raises(lambda: block_experts(text_model, {2: [0]}), r"layer 2 is not a MoE layer; MoE layers: \[1, 3\]")


def probe_expert_out_vector_layers(text_model, tmp_path, **_):
    from workbench.hooks import ExpertOutCapture, RecorderError

    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    seen = {}
    h = text_model.model.layers[3].feed_forward.hook_experts.add(
        lambda p, expert_out, shared_out, **kw: seen.update(routed=expert_out.clone(), shared=shared_out.clone()))
    try:
        with wb.record(text_model, tmp_path / "vec.zarr", capture=[ExpertOutCapture(vector_layers=[3])]):
            text_model(input_ids=ids)
    finally:
        h.remove()
    vec = wb.open_trace(tmp_path / "vec.zarr")["expert_out_vec"].values  # (token, vector_layer, part, hidden)
    assert vec.shape[1] == 1
    k = seen["routed"].shape[1]
    np.testing.assert_allclose(vec[:, 0, :k], seen["routed"].numpy(), rtol=1e-3, atol=1e-3)  # layer 3's, float16
    np.testing.assert_allclose(vec[:, 0, k], seen["shared"].numpy(), rtol=1e-3, atol=1e-3)
    _raises(lambda: wb.record(text_model, tmp_path / "bad.zarr", capture=[ExpertOutCapture(vector_layers=[2])]),
            r"vector_layers \[2\] are not MoE layers; MoE layers: \[1, 3\]", RecorderError)


def probe_attention_capture(mm, **_):
    att = wb.open_attention(mm, 0)
    assert att["layer"].values.tolist() == [1, 3]  # decoder indices (all layers have attention)
    assert att.sel(layer=3).shape[0] == 4  # .sel by decoder index
    from workbench.hooks import AttentionCapture, RecorderError

    model = wb.load_model(mm.parent / "ckpt", progress=False)
    _raises(lambda: wb.record(model, mm.parent / "bad.zarr", capture=[AttentionCapture(layers=[7])]),
            r"attention layers \[7\].*\[0, 4\)", RecorderError)


def probe_moe_layer_routing(syn, tmp_path, **_):
    from workbench.trace import MoELayerRouting, TraceWriter
    from workbench.trace.schema import routing_variables

    with TraceWriter.create(tmp_path / "r.zarr", routing=[MoELayerRouting(3, E, K), MoELayerRouting(7, E, K)],
                            variables=routing_variables(2, E, K)):
        pass
    assert wb.open_trace(tmp_path / "r.zarr")["layer"].values.tolist() == [3, 7]
    _raises(lambda: TraceWriter.create(tmp_path / "s.zarr", routing=[MoELayerRouting(3, E, K)] * 2,
                                       variables=routing_variables(2, E, K)), "distinct")


def probe_moe_layers_properties(syn, text_model, **_):
    from workbench.hooks import adapter_for
    from workbench.trace import TraceWriter

    w = TraceWriter.resume(syn, reopen=True)
    try:
        assert w.moe_layers == LAYERS
    finally:
        w.close()
    assert adapter_for(text_model).spec().moe_layers == [1, 3] == text_model.config.moe_layers


def probe_text_config(**_):
    from workbench.models.llama4.config import ConfigError, TextConfig

    assert TextConfig(num_hidden_layers=4, interleave_moe_layer_step=2).moe_layers == [1, 3]
    _raises(lambda: TextConfig(num_hidden_layers=4, moe_layers=[4]), r"moe_layers.*\[0, 4\)", ConfigError)


def probe_export_layers(syn, tmp_path, fn_name, **_):
    from workbench import export as X

    fn = getattr(X, fn_name)
    kw = {"what": "data", "progress": False} if fn_name == "export_all" else {"formats": ["png"]}
    try:
        fn(syn, tmp_path / "ok", layers=[3, 5], **kw)
    except X.ArtifactSkipped:
        pass  # e.g. no attention maps in this trace: the layers were accepted first
    _raises(lambda: fn(syn, tmp_path / "bad", layers=[3, 2], **kw), r"layer 2 is not a MoE layer.*\[1, 3, 5\]",
            X.ExportError)
    sel = X.Selection.make(wb.open_trace(syn), layers=[5, 3])
    assert sel.apply(wb.open_trace(syn))["layer"].values.tolist() == [5, 3]


def probe_export_netcdf_content(syn, tmp_path, **_):
    import xarray as xr

    from workbench.export import export_netcdf

    probe_export_layers(syn=syn, tmp_path=tmp_path, fn_name="export_netcdf")
    (path,) = export_netcdf(syn, tmp_path / "nc", layers=[3])
    sub = xr.open_dataset(path)
    assert sub["layer"].values.tolist() == [3]
    np.testing.assert_array_equal(sub["topk_expert"].values[:, 0], wb.open_trace(syn)["topk_expert"].values[:, 1])


def probe_transitions(syn, tmp_path, **_):
    from workbench.export import ExportError, export_all, export_transitions, plot_transitions

    paths = export_transitions(syn, tmp_path / "t", transitions=(5, 3), formats=["png"])
    assert [p.name for p in paths] == ["transitions_L5_L3.png"]
    fig = plot_transitions(wb.open_trace(syn), 5, 3)
    assert "layer 5 -> 3" in " ".join(ax.get_title(loc="left") for ax in fig.axes)
    _raises(lambda: export_all(syn, tmp_path / "b", transitions=(5, 2), progress=False), r"\[1, 3, 5\]", ExportError)
    _raises(lambda: plot_transitions(wb.open_trace(syn), 2, 3), r"\[1, 3, 5\]", ExportError)


def probe_coactivation_export(syn, tmp_path, **_):
    from workbench.export import ExportError, export_all, export_coactivation, plot_coactivation

    paths = export_coactivation(syn, tmp_path / "c", coactivation_layer=3, formats=["png"])
    assert [p.name for p in paths] == ["coactivation_L3.png"]
    fig = plot_coactivation(wb.open_trace(syn), 3)
    assert "layer 3," in " ".join(ax.get_title(loc="left") for ax in fig.axes)
    _raises(lambda: export_all(syn, tmp_path / "b", coactivation_layer=2, progress=False), r"\[1, 3, 5\]", ExportError)
    _raises(lambda: plot_coactivation(wb.open_trace(syn), 2), r"\[1, 3, 5\]", ExportError)


def probe_attention_export(mm, tmp_path, **_):
    from workbench.export import ExportError, export_all, export_attention, plot_attention

    paths = export_attention(mm, tmp_path / "a", attention_layer=3, formats=["png"])
    assert [p.name for p in paths] == ["attention_seq0_L3_img0.png"]
    fig = plot_attention(mm, wb.open_trace(mm), layer=1)
    titles = [t.get_text() for t in fig.texts] + [ax.get_title(loc=w) for ax in fig.axes for w in ("left", "center")]
    assert any("layer 1\n" in t or t.endswith("layer 1") for t in titles), titles
    _raises(lambda: export_all(mm, tmp_path / "b", attention_layer=2, progress=False),
            r"recorded at decoder layers \[1, 3\], not 2", ExportError)


def probe_dashboard(syn, **_):
    from workbench.widgets import ExpertLoadDashboard

    dash = ExpertLoadDashboard(syn, mode="count", layer=3)
    assert dash.layer == 3
    np.testing.assert_array_equal(dash.bars.data[0].y, np.bincount(
        wb.open_trace(syn)["topk_expert"].values[:, 1].ravel(), minlength=E))
    _raises(lambda: ExpertLoadDashboard(syn, layer=2), r"decoder layer 2 is not a MoE layer.*\[1, 3, 5\]", ValueError)


def probe_token_view(syn, **_):
    from workbench.widgets import TokenRoutingView

    v = TokenRoutingView(syn, layer=5)
    assert v.layer == 5 and "L5" in v.w_layer.options[v.w_layer.value][0]
    _raises(lambda: TokenRoutingView(syn, layer=4), r"decoder layer 4 is not a MoE layer.*\[1, 3, 5\]", ValueError)


def probe_routing_flow(syn, **_):
    from workbench.widgets import RoutingFlow

    f = RoutingFlow(syn, a=5, b=3)
    assert (f.a, f.b) == (5, 3) and "L5 \u2192 L3" in f.sankey.layout.title.text
    _raises(lambda: RoutingFlow(syn, a=2), r"\(a\): decoder layer 2 is not a MoE layer", ValueError)
    _raises(lambda: RoutingFlow(syn, a=1, b=4), r"\(b\): decoder layer 4 is not a MoE layer", ValueError)


def probe_routing_shift_view(syn, tmp_path, **_):
    from workbench.trace import TraceWriter
    from workbench.trace.schema import routing_layout
    from workbench.widgets import RoutingShiftView

    ds = wb.open_trace(syn)
    moved = ds["topk_expert"].values.copy()
    moved[:5, 1] = (moved[:5, 1] + 1) % E  # the top-1 of tokens 0..4 moves at decoder layer 3 only
    with TraceWriter.create(tmp_path / "q.zarr", **routing_layout(LAYERS, E, K)) as w:
        w.append(**{v: ds[v].values for v in ("token_id", "sequence", "position", "modality", "topk_weight")},
                 topk_expert=moved)
    v = RoutingShiftView(syn, tmp_path / "q.zarr", layer=3)
    assert v.layer == 3 and [r["change_token"] for r in v.changed_rows()] == [0, 1, 2, 3, 4]
    v.layer = 5
    assert v.changed_rows() == []
    _raises(lambda: RoutingShiftView(syn, tmp_path / "q.zarr", layer=2),
            r"decoder layer 2 is not a MoE layer.*\[1, 3, 5\]", ValueError)


def probe_attention_view(mm, **_):
    from workbench.widgets import CrossModalAttentionView

    picture = np.zeros((56, 56, 3), np.uint8)  # the tiny vision tower's one 56 px tile
    v = CrossModalAttentionView(mm, 0, layer=3, image=picture)
    assert v.layer == 3
    _raises(lambda: CrossModalAttentionView(mm, 0, layer=2, image=picture),
            r"decoder layer 2 has no attention maps.*\[1, 3\]", ValueError)


def probe_position(syn, **_):
    A = wb.analysis
    ds = wb.open_trace(syn)
    top, pos = ds["topk_expert"].values[:, 1], ds["position"].values  # decoder layer 3 = MoE position 1
    got = A.load_by_position(ds, bucket=10, layer=3, normalize=False)
    assert int(got["layer"]) == 3
    for b in range(2):
        np.testing.assert_array_equal(got.values[b], np.bincount(top[pos // 10 == b].ravel(), minlength=E))
    t1 = top[:, 0]  # slot 0 holds the larger weight
    pairs = pos[1:] > 0
    rate = A.same_expert_rate_by_position(ds, bucket=20, layer=3)
    assert float(rate["same_top1_rate"][0]) == pytest.approx((t1[1:] == t1[:-1])[pairs].mean())
    ent = A.entropy_by_position(ds, bucket=20, layer=3)
    f = np.bincount(top.ravel(), minlength=E) / top.size
    assert float(ent["load_entropy"][0]) == pytest.approx(-(f[f > 0] * np.log(f[f > 0])).sum() / np.log(E))
    jump = A.by_chunk_offset(ds, chunk_size=5, bucket=1, layer=3)
    np.testing.assert_array_equal(jump["load_share"].values[0] * K * 8, np.bincount(top[pos % 5 == 0].ravel(),
                                                                                     minlength=E))
    for fn in (A.load_by_position, A.entropy_by_position, A.same_expert_rate_by_position):
        _raises(lambda fn=fn: fn(ds, layer=2))
    _raises(lambda: A.by_chunk_offset(ds, chunk_size=5, layer=4))


def probe_plot_position(syn, **_):
    from workbench.export import plot_position

    ds = wb.open_trace(syn)
    fig = plot_position(ds, layer=3, chunk_size=5)
    assert any(ax.get_title(loc="left").startswith("Routing by position, layer 3 (") for ax in fig.axes)
    _raises(lambda: plot_position(ds, layer=2))


def probe_paths(syn, **_):
    A = wb.analysis
    ds = wb.open_trace(syn)
    top1 = ds["topk_expert"].values[:, :, 0]  # slot 0 holds the larger weight
    p = A.routing_paths(ds, layers=[5, 3], top=None)
    assert p["layer"].values.tolist() == [5, 3]
    pairs, counts = np.unique(top1[:, [2, 1]], axis=0, return_counts=True)
    assert sorted(zip(map(tuple, pairs.tolist()), counts.tolist())) == sorted(
        zip(map(tuple, p["expert"].values.tolist()), p["count"].values.tolist()))
    np.testing.assert_array_equal(A.token_paths(ds, layers=[3]).values[:, 0], top1[:, 1])
    ent = A.path_entropy(ds, layers=[3])
    assert ent["layer"].values.tolist() == [3] and int(ent["n_distinct"][0]) == len(np.unique(top1[:, 1]))
    hits = A.path_tokens(ds, [int(top1[0, 1])], layers=[3])
    assert hits["token"].values.tolist() == np.flatnonzero(top1[:, 1] == top1[0, 1]).tolist()
    for fn in (A.routing_paths, A.path_entropy, A.token_paths):
        _raises(lambda fn=fn: fn(ds, layers=[2]))
    _raises(lambda: A.path_tokens(ds, [0], layers=[4]))


def probe_path_explorer(syn, **_):
    from workbench.widgets import PathExplorer

    v = PathExplorer(syn, layers=[5])
    assert v.layers == [5] and v.paths["layer"].values.tolist() == [5]
    top = wb.open_trace(syn)["topk_expert"].values[:, 2, 0]
    assert v.selected == [int(np.bincount(top, minlength=E).argmax())]
    _raises(lambda: PathExplorer(syn, layers=[2]), r"decoder layer 2 is not a MoE layer.*\[1, 3, 5\]", ValueError)


def probe_intervene(text_model, **_):
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    chosen = {1: [], 3: []}
    handles = [text_model.model.layers[i].feed_forward.hook_router.add(
        lambda p, topk_ids, i=i, **kw: chosen[i].append(topk_ids.clone())) for i in (1, 3)]
    try:
        text_model(input_ids=ids)
        e = int(chosen[3][0][0, 0])
        with wb.intervene(text_model, block={3: [e]}):
            text_model(input_ids=ids)
        with wb.intervene(text_model, force={3: (e + 1) % 8}, scale={(3, e): 0.5}):
            text_model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert not (chosen[3][1] == e).any() and torch.equal(chosen[1][0], chosen[1][1])  # layer 3 only
    assert (chosen[3][2] == (e + 1) % 8).all() and torch.equal(chosen[1][0], chosen[1][2])
    for kw in ({"block": {2: [0]}}, {"force": {2: 0}}, {"scale": {(2, 0): 2.0}}):
        _raises(lambda kw=kw: wb.intervene(text_model, **kw), r"layer 2 is not a MoE layer; MoE layers: \[1, 3\]")


def probe_importance(text_model, syn, **_):
    from workbench.export import ExportError, plot_importance

    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    imp = wb.analysis.expert_importance(text_model, {"input_ids": ids}, layers=[3], experts=[0, 1])
    assert imp["layer"].values.tolist() == [3]
    with wb.intervene(text_model, block={3: [1]}):
        blocked = text_model(input_ids=ids).logits
    base = text_model(input_ids=ids).logits
    lp, lb = (torch.log_softmax(x.double()[0, :-1], -1).gather(-1, ids[0, 1:, None]).mean() for x in (blocked, base))
    assert float(imp["delta_loss"].sel(expert=1)[0]) == pytest.approx(float(lb - lp), abs=1e-9)
    _raises(lambda: wb.analysis.expert_importance(text_model, {"input_ids": ids}, layers=[2]),
            r"MoE layers: \[1, 3\]")
    both = wb.analysis.expert_importance(text_model, {"input_ids": ids}, experts=[0])
    fig = plot_importance(both, layer=3)
    assert "layer 3" in fig.texts[0].get_text() or any("layer 3" in t.get_text() for t in fig.texts)
    _raises(lambda: plot_importance(both, layer=2), r"\[1, 3\]", ExportError)


_EXPORTS_WITH_LAYERS = ["export_all", "export_load_heatmap", "export_imbalance", "export_entropy",
                        "export_token_routing", "export_transitions", "export_coactivation", "export_attention",
                        "export_layer_metrics", "export_layer_metrics_by_modality", "export_vocab_tables",
                        "export_domain_tables", "export_netcdf", "export_parquet", "export_report", "export_position",
                        "export_routing_paths",
                        "export_routing_shift", "export_importance"]
PROBES = {
    ("coactivation", "layer"): probe_coactivation,
    ("load_by_position", "layer"): probe_position,
    ("entropy_by_position", "layer"): probe_position,
    ("same_expert_rate_by_position", "layer"): probe_position,
    ("by_chunk_offset", "layer"): probe_position,
    ("plot_position", "layer"): probe_plot_position,
    ("layer_transitions", "a"): probe_layer_transitions,
    ("layer_transitions", "b"): probe_layer_transitions,
    ("expert_ablation", "layer"): probe_expert_ablation,
    ("block_experts", "blocked"): probe_block_experts,  # {decoder layer: experts}; found by name below
    ("AttentionCapture.__init__", "layers"): probe_attention_capture,
    ("ExpertOutCapture.__init__", "vector_layers"): probe_expert_out_vector_layers,
    ("MoELayerRouting.__init__", "layer"): probe_moe_layer_routing,
    ("TraceWriter", "moe_layers"): probe_moe_layers_properties,
    ("RoutingSpec", "moe_layers"): probe_moe_layers_properties,
    ("TextConfig.__init__", "moe_layers"): probe_text_config,
    ("Selection.__init__", "layers"): lambda **kw: probe_export_layers(fn_name="export_all", **kw),
    **{(name, "layers"): (lambda name: lambda **kw: probe_export_layers(fn_name=name, **kw))(name)
       for name in _EXPORTS_WITH_LAYERS},
    ("export_netcdf", "layers"): probe_export_netcdf_content,
    ("plot_transitions", "a"): probe_transitions,
    ("plot_transitions", "b"): probe_transitions,
    ("export_all", "transitions"): probe_transitions,
    ("plot_coactivation", "layer"): probe_coactivation_export,
    ("export_all", "coactivation_layer"): probe_coactivation_export,
    ("plot_attention", "layer"): probe_attention_export,
    ("export_all", "attention_layer"): probe_attention_export,
    ("ExpertLoadDashboard.__init__", "layer"): probe_dashboard,
    ("ExpertLoadDashboard", "layer"): probe_dashboard,
    ("TokenRoutingView.__init__", "layer"): probe_token_view,
    ("TokenRoutingView", "layer"): probe_token_view,
    ("RoutingFlow.__init__", "a"): probe_routing_flow,
    ("RoutingFlow.__init__", "b"): probe_routing_flow,
    ("RoutingFlow", "a"): probe_routing_flow,
    ("RoutingFlow", "b"): probe_routing_flow,
    ("CrossModalAttentionView.__init__", "layer"): probe_attention_view,
    ("CrossModalAttentionView", "layer"): probe_attention_view,
    ("RoutingShiftView.__init__", "layer"): probe_routing_shift_view,
    ("RoutingShiftView", "layer"): probe_routing_shift_view,
    ("routing_paths", "layers"): probe_paths,
    ("path_entropy", "layers"): probe_paths,
    ("path_tokens", "layers"): probe_paths,
    ("token_paths", "layers"): probe_paths,
    ("PathExplorer.__init__", "layers"): probe_path_explorer,
    ("intervene", "block"): probe_intervene,
    ("intervene", "force"): probe_intervene,
    ("intervene", "scale"): probe_intervene,
    ("expert_importance", "layers"): probe_importance,
    ("plot_importance", "layer"): probe_importance,
}
# parameters that take layers without "layer" in their name, found by their API's name
_BY_NAME = {("block_experts", "blocked"), ("intervene", "block"), ("intervene", "force"), ("intervene", "scale")}


def test_the_table_covers_every_layer_parameter():
    found = public_layer_parameters() | _BY_NAME
    unlisted = sorted(found - set(PROBES) - set(NOT_A_LAYER))
    assert not unlisted, f"public layer parameters without a probe here: {unlisted}"
    gone = sorted((set(PROBES) | set(NOT_A_LAYER)) - found)
    assert not gone, f"probed parameters that no public API has any more: {gone}"


@pytest.mark.parametrize("probe", sorted({p for p in PROBES.values()}, key=lambda f: getattr(f, "__name__", "")),
                         ids=lambda f: getattr(f, "__name__", "probe"))
def test_layer_is_the_decoder_index(probe, syn, text_model, mm, tmp_path):
    probe(syn=syn, text_model=text_model, mm=mm, tmp_path=tmp_path)
