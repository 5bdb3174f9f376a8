"""Inside the experts (issue 19): expert_out / attribution / margin captures against independent
float64 computations from the weights, and wb.intervene (block / force / scale / where) against
block_experts and transformers with the same router override."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from tests.hf_reference import hf_text_model
from workbench.hooks import RecorderError, block_experts
from workbench.hooks.experts import AttributionCapture, ExpertOutCapture


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    """top-2 routing, MoE layers [1, 3] (decoder index != MoE position)."""
    d = tmp_path_factory.mktemp("k2")
    hf_text_model(seed=19, num_experts_per_tok=2, interleave_moe_layer_step=2).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf1(tmp_path_factory):
    """top-1 routing, every layer MoE; (transformers model, its checkpoint folder)."""
    d = tmp_path_factory.mktemp("k1")
    hf = hf_text_model(seed=23)
    hf.save_pretrained(d)
    return hf, d


def _ids(seed=0, b=2, t=10):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed))


def _padded():
    ids = _ids(1, 2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    return ids, mask


def _residuals(model):
    """Forward pre-hooks collecting the residual stream entering each MoE sublayer, and forward
    hooks collecting each decoder layer's output: {decoder layer: tensor}."""
    resid, outs, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe_layer:
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: resid.__setitem__(i, a[0].clone())))
            handles.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.clone())))
    return resid, outs, handles


def _swiglu64(x, gate_up, down):
    i = down.shape[0]
    h = x @ gate_up
    return (F.silu(h[..., :i]) * h[..., i:]) @ down


# ------------------------------------------------------------------------------- expert_out
def test_expert_out_norms_match_a_float64_loop_from_the_weights(ckpt2, tmp_path):
    model = wb.load_model(ckpt2, progress=False)
    ids, mask = _padded()
    resid, _, handles = _residuals(model)
    try:
        with wb.record(model, tmp_path / "t.zarr", capture=("router", "expert_out")):
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    ds = wb.open_trace(tmp_path / "t.zarr")
    assert ds["layer"].values.tolist() == [1, 3]
    keep = mask.reshape(-1).bool().numpy()
    n = int(keep.sum())
    assert ds["expert_out_norm"].shape == (n, 2, 2) and ds["shared_out_norm"].shape == (n, 2)
    for li, layer in enumerate([1, 3]):
        dec = model.model.layers[layer]
        moe = dec.feed_forward
        eps = dec.post_attention_layernorm.eps
        r = resid[layer].reshape(-1, 64).double().numpy()[keep]
        g = dec.post_attention_layernorm.weight.double().numpy()
        gu = moe.experts.gate_up_proj.double()
        dp = moe.experts.down_proj.double()
        wr = moe.router.weight.double().numpy()
        ids_l = ds["topk_expert"].values[:, li]
        want_e = np.zeros((n, 2))
        want_s = np.zeros(n)
        for t in range(n):  # one token at a time, float64 throughout
            x = r[t] / np.sqrt((r[t] ** 2).mean() + eps) * g
            logits = wr @ x
            for j in range(2):
                e = int(ids_l[t, j])
                w = 1.0 / (1.0 + np.exp(-logits[e]))
                y = _swiglu64(torch.from_numpy(w * x), gu[e], dp[e]).numpy()  # the weight scales the INPUT
                want_e[t, j] = np.linalg.norm(y)
            se = moe.shared_expert
            xt = torch.from_numpy(x)
            y = (F.silu(se.gate_proj.weight.double() @ xt) * (se.up_proj.weight.double() @ xt))
            want_s[t] = np.linalg.norm((se.down_proj.weight.double() @ y).numpy())
        np.testing.assert_allclose(ds["expert_out_norm"].values[:, li], want_e, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(ds["shared_out_norm"].values[:, li], want_s, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(ds["resid_norm"].values[:, li], np.linalg.norm(r, axis=-1), rtol=1e-6)


def test_routed_plus_shared_plus_residual_is_the_layer_output(ckpt2, tmp_path):
    model = wb.load_model(ckpt2, progress=False)
    ids, mask = _padded()
    _, outs, handles = _residuals(model)
    cap = ExpertOutCapture(vector_layers=[3, 1], vector_dtype="float32")
    try:
        with wb.record(model, tmp_path / "v.zarr", capture=[cap]):
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    ds = wb.open_trace(tmp_path / "v.zarr")
    vec = ds["expert_out_vec"]
    assert vec.dims == ("token", "vector_layer", "part", "hidden") and vec.shape[1:] == (2, 4, 64)
    assert vec.attrs["layers"] == [1, 3]
    keep = mask.reshape(-1).bool().numpy()
    for vi, layer in enumerate([1, 3]):
        parts = vec.values[:, vi]  # (n, k + 2, H): routed slots, shared, residual
        out = outs[layer].reshape(-1, 64).numpy()[keep]
        np.testing.assert_allclose(parts.sum(1), out, rtol=0, atol=1e-5)
        li = [1, 3].index(layer)
        np.testing.assert_allclose(np.linalg.norm(parts[:, :2], axis=-1), ds["expert_out_norm"].values[:, li],
                                   rtol=1e-6)


def test_vectors_of_chosen_positions_only_and_float16(ckpt2, tmp_path):
    model = wb.load_model(ckpt2, progress=False)
    ids = _ids(2, 1, 8)
    with wb.record(model, tmp_path / "p.zarr", capture={"expert_out": {"vector_layers": [3],
                                                                       "vector_positions": [0, 5]}}):
        model(input_ids=ids)
    vec = wb.open_trace(tmp_path / "p.zarr")["expert_out_vec"]
    assert vec.dtype == np.float16
    v = vec.values[:, 0]
    filled = ~np.isnan(v).all(axis=(1, 2))
    assert np.flatnonzero(filled).tolist() == [0, 5]


def test_the_captures_change_nothing_in_the_forward_pass(ckpt2, hf1, tmp_path):
    for d in (ckpt2, hf1[1]):
        model = wb.load_model(d, progress=False)
        ids = _ids(3)
        base = model(input_ids=ids).logits
        with wb.record(model, tmp_path / f"n{id(d)}.zarr", capture=("expert_out", "attribution", "margin")):
            got = model(input_ids=ids).logits
        assert torch.equal(base, got)  # bit for bit: the same products, slots summed as moe_experts does


def test_bad_options_and_models_are_refused(ckpt2, hf1, tmp_path):
    model = wb.load_model(ckpt2, progress=False)
    with pytest.raises(RecorderError, match=r"vector_layers \[2\] are not MoE layers; MoE layers: \[1, 3\]"):
        wb.record(model, tmp_path / "a.zarr", capture={"expert_out": {"vector_layers": [2]}})
    with pytest.raises(RecorderError, match="vector_dtype"):
        wb.record(model, tmp_path / "b.zarr", capture={"expert_out": {"vector_dtype": "int8"}})
    with pytest.raises(RecorderError, match="outside the vocabulary"):
        wb.record(model, tmp_path / "c.zarr", capture=[AttributionCapture(target=10**6)])
    with pytest.raises(RecorderError, match=r"need a workbench Llama 4 model \(wb.load_model\); on transformers"):
        wb.record(hf1[0], tmp_path / "d.zarr", capture=("expert_out",))
    assert not (tmp_path / "d.zarr").exists()
    with pytest.raises(ValueError, match="interventions, steering_effect and expert_importance need a workbench"):
        with wb.intervene(hf1[0], block={0: [1]}):
            pass


# ------------------------------------------------------------------------------------ margin
def test_margin_is_top1_minus_top2_logit_and_works_on_transformers(hf1, tmp_path):
    hf, d = hf1
    model = wb.load_model(d, progress=False)
    ids = _ids(4)
    for m, name in ((model, "w"), (hf, "h")):
        with wb.record(m, tmp_path / f"{name}.zarr", capture={"margin": {}, "logits": {"dtype": "float32"}}):
            m(input_ids=ids)
        ds = wb.open_trace(tmp_path / f"{name}.zarr")
        top2 = np.sort(ds["router_logits"].values.astype(np.float64), -1)[..., -2:]
        np.testing.assert_allclose(ds["router_margin"].values, top2[..., 1] - top2[..., 0], rtol=1e-6, atol=1e-6)
        assert (ds["router_margin"].values >= 0).all()


def test_margin_is_refused_where_top_k_does_not_rank_by_logits(tmp_path):
    """DeepSeek-V3 chooses by sigmoid(logit) + bias inside the best groups: the raw logit gap is refused."""
    import transformers

    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                        moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with pytest.raises(RecorderError, match=r"margin: MoE layers \[1\] choose experts by score \+ selection bias"):
        wb.record(model, tmp_path / "d.zarr", capture=("margin",))
    assert not (tmp_path / "d.zarr").exists()  # refused before the store was created


# ------------------------------------------------------------------------------- attribution
def _final_h(model):
    got = []
    h = model.model.norm.register_forward_pre_hook(lambda m, a: got.append(a[0].clone()))
    return got, h


def test_attribution_at_the_last_layer_is_the_exact_logit_change(hf1, tmp_path):
    """At the last decoder layer nothing downstream sees the contribution c but the final norm:
    removing c changes the target logit by exactly s(h) <u, c> + (s(h) - s(h - c)) <u, h - c>
    (u = W_U[y] * g). The first term is the attribution (checked tightly, with c taken from the
    model's own output difference); the second, the change of the norm's scale, is what the
    linearization leaves out (checked to be the only difference)."""
    hf, d = hf1
    model = wb.load_model(d, progress=False)
    ids = _ids(5)
    last = 3
    got, h1 = _final_h(model)
    try:
        with wb.record(model, tmp_path / "a.zarr", capture=("attribution",)):
            base = model(input_ids=ids).logits
        ds = wb.open_trace(tmp_path / "a.zarr")
        target = ds["attribution_target"].values
        assert target.tolist() == [int(x) for row in ids for x in [*row[1:].tolist(), -1]]
        g = model.model.norm.weight.double()
        eps = model.model.norm.eps
        W = model.lm_head.weight.double()
        for part in ("routed", "shared"):
            def remove(point, expert_out, shared_out, **_):
                return {"expert_out": torch.zeros_like(expert_out)} if part == "routed" else \
                    {"shared_out": torch.zeros_like(shared_out)}
            with model.model.layers[last].feed_forward.hook_experts.add(remove, edit=True):
                ablated = model(input_ids=ids).logits
            h, h_ab = got[0].reshape(-1, 64).double(), got[-1].reshape(-1, 64).double()
            c = h - h_ab
            s = torch.rsqrt(h.pow(2).mean(-1) + eps)
            s_ab = torch.rsqrt(h_ab.pow(2).mean(-1) + eps)
            ok = target >= 0
            u = W[torch.from_numpy(np.where(ok, target, 0))] * g
            dla = (ds["attribution"].values[:, last, 0] if part == "routed"
                   else ds["attribution_shared"].values[:, last])
            np.testing.assert_allclose(dla[ok], (s * (u * c).sum(-1)).numpy()[ok], rtol=1e-4, atol=1e-5)
            exact = (base.reshape(-1, base.shape[-1]).double() - ablated.reshape(-1, base.shape[-1]).double())
            exact = exact.gather(1, torch.from_numpy(np.where(ok, target, 0))[:, None])[:, 0].numpy()
            scale_term = ((s - s_ab) * (u * h_ab).sum(-1)).numpy()
            np.testing.assert_allclose(exact[ok], dla[ok] + scale_term[ok], rtol=1e-4, atol=1e-4)
            assert np.isnan(dla[~ok]).all()
            got.clear()
            model(input_ids=ids)  # the reference h again for the next part
    finally:
        h1.remove()


def test_attribution_at_earlier_layers_tracks_the_exact_change_loosely(hf1, tmp_path):
    """Before the last layer, removing c also changes what the later layers compute (attention to
    this token, routing, experts): the indirect paths that direct attribution leaves out by
    definition. So the tolerance is statistical and grows with the number of layers after the
    contribution: removing one token's routed contribution at a time, the attribution and the exact
    target-logit change must correlate over the tokens with r > 0.95 at the last layer (only the
    norm's scale differs), r > 0.6 one layer earlier (with the sign right on >= 75% of the tokens
    with the larger half of the exact changes), and the agreement must not grow with the distance
    (layer 0 <= layer 2 <= layer 3). (Measured on this random model: r = 0.22, 0.73, 0.98.)"""
    hf, d = hf1
    model = wb.load_model(d, progress=False)
    ids = _ids(6, 4, 16)
    with wb.record(model, tmp_path / "b.zarr", capture=("attribution",)):
        base = model(input_ids=ids).logits
    ds = wb.open_trace(tmp_path / "b.zarr")
    target = ds["attribution_target"].values
    ok = target >= 0
    tgt = np.where(ok, target, 0)
    n = ids.numel()
    r = {}
    for layer in (0, 2, 3):
        exact = []
        for t in np.flatnonzero(ok):  # one token's routed contribution at a time (the others stay)
            def remove(point, expert_out, shared_out, t=t, **_):
                e = expert_out.clone()
                e[t] = 0
                return {"expert_out": e}
            with model.model.layers[layer].feed_forward.hook_experts.add(remove, edit=True):
                ab = model(input_ids=ids).logits.reshape(n, -1)
            exact.append(float(base.reshape(n, -1)[t, tgt[t]] - ab[t, tgt[t]]))
        exact = np.array(exact)
        dla = ds["attribution"].values[ok, layer, 0]
        r[layer] = np.corrcoef(exact, dla)[0, 1]
        if layer == 2:
            big = np.abs(exact) > np.quantile(np.abs(exact), 0.5)
            assert (np.sign(exact[big]) == np.sign(dla[big])).mean() >= 0.75
    assert r[3] > 0.95 and r[2] > 0.6 and r[0] <= r[2] <= r[3], r


# ------------------------------------------------------------------------------ interventions
def test_blocking_equals_block_experts(ckpt2):
    model = wb.load_model(ckpt2, progress=False)
    ids = _ids(7)
    with block_experts(model, {3: [0, 5], 1: [2]}):
        want = model(input_ids=ids).logits
    with wb.intervene(model, block={3: [0, 5], 1: 2}):
        got = model(input_ids=ids).logits
    assert torch.equal(want, got)
    assert not torch.equal(model(input_ids=ids).logits, got)  # removed on exit


def _hf_forced_logits(hf, ids, layer, expert, weight=None, where=None):
    """transformers with the router output rewritten: only ``expert`` is chosen (top-1), with the
    given weight or sigmoid of its own logit; tokens outside ``where`` (flattened bool) keep theirs."""
    router = hf.model.layers[layer].feed_forward.router

    def hook(module, args, out):
        scores, logits = out
        w = torch.sigmoid(logits[:, expert].float()) if weight is None else torch.full_like(logits[:, 0], weight)
        forced = torch.zeros_like(scores)
        forced[:, expert] = w.to(scores.dtype)
        if where is not None:
            forced = torch.where(where[:, None], forced, scores)
        return forced, logits

    h = router.register_forward_hook(hook)
    try:
        return hf(input_ids=ids).logits
    finally:
        h.remove()


@pytest.mark.parametrize("weight", [None, 0.7])
def test_forcing_matches_transformers_with_the_same_router_override(hf1, weight):
    hf, d = hf1
    model = wb.load_model(d, progress=False)
    ids = _ids(8)
    force = {2: 5 if weight is None else (5, weight)}
    with wb.intervene(model, force=force):
        got = model(input_ids=ids).logits
    ref = _hf_forced_logits(hf, ids, 2, 5, weight)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, model(input_ids=ids).logits, atol=1e-3)  # it did something
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 6:] = True
    with wb.intervene(model, force=force, where=where):
        got_w = model(input_ids=ids).logits
    torch.testing.assert_close(got_w, _hf_forced_logits(hf, ids, 2, 5, weight, where.reshape(-1)),
                               rtol=1e-4, atol=1e-4)


def test_no_effect_outside_where_and_recording_shows_the_forced_expert(hf1, tmp_path):
    _, d = hf1
    model = wb.load_model(d, progress=False)
    ids = _ids(9)
    base = model(input_ids=ids).logits
    seen = []
    point = model.model.layers[2].feed_forward.hook_router
    with point.add(lambda p, topk_ids, **_: seen.append(topk_ids.clone())):
        model(input_ids=ids)
        with wb.intervene(model, force={2: 5}, block={1: [0, 1]}, where=lambda ids_, b: b.positions >= 6), \
                wb.record(model, tmp_path / "f.zarr", capture={"logits": {"dtype": "float32"}}):
            got = model(input_ids=ids).logits
    # causal: tokens before the selection see no change (up to the rounding of the experts' batched
    # matmuls, whose row groups the rerouted tokens change)
    torch.testing.assert_close(got[:, :6], base[:, :6], rtol=1e-5, atol=1e-5)
    assert (got[:, 6:] - base[:, 6:]).abs().amax() > 1e-2
    pos = torch.arange(10).repeat(2)
    assert torch.equal(seen[1][pos < 6], seen[0][pos < 6])  # routing outside `where` is the model's own
    ds = wb.open_trace(tmp_path / "f.zarr")
    e = ds["topk_expert"].values[:, 2, 0]
    assert (e[pos.numpy() >= 6] == 5).all() and (e[pos.numpy() < 6] == seen[0][pos < 6, 0].numpy()).all()
    logits = ds["router_logits"].values[:, 2, 5].astype(np.float64)
    w = ds["topk_weight"].values[:, 2, 0]
    np.testing.assert_allclose(w[pos.numpy() >= 6], 1 / (1 + np.exp(-logits[pos.numpy() >= 6])), rtol=1e-6)
    blocked = ds["topk_expert"].values[:, 1, 0]
    assert not np.isin(blocked[pos.numpy() >= 6], [0, 1]).any()


def test_scale_multiplies_the_expert_input(ckpt2):
    model = wb.load_model(ckpt2, progress=False)
    ids = _ids(10)
    moe = model.model.layers[3].feed_forward
    seen = []
    with moe.hook_experts.add(lambda p, **kw: seen.append({k: v.clone() for k, v in kw.items()})):
        model(input_ids=ids)
        e = int(seen[0]["topk_ids"][0, 0])
        with wb.intervene(model, scale={(3, e): 2.5}):
            model(input_ids=ids)
    base, scaled = seen
    hit = base["topk_ids"] == e
    torch.testing.assert_close(scaled["topk_weights"][hit], base["topk_weights"][hit] * 2.5)
    torch.testing.assert_close(scaled["topk_weights"][~hit], base["topk_weights"][~hit])
    t, j = [int(v) for v in torch.nonzero(hit)[0]]
    x = base["x"][t]
    i = moe.experts.down_proj.shape[1]
    h = (2.5 * base["topk_weights"][t, j] * x) @ moe.experts.gate_up_proj[e]
    want = (F.silu(h[:i]) * h[i:]) @ moe.experts.down_proj[e]  # SwiGLU_e(2.5 w x), not 2.5 SwiGLU_e(w x)
    torch.testing.assert_close(scaled["expert_out"][t, j], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scaled["expert_out"][t, j], 2.5 * base["expert_out"][t, j], atol=1e-3)


def test_forcing_with_top2_keeps_the_routers_other_choice(ckpt2):
    model = wb.load_model(ckpt2, progress=False)
    ids = _ids(11)
    seen = []
    point = model.model.layers[1].feed_forward.hook_router
    with point.add(lambda p, **kw: seen.append({k: v.clone() for k, v in kw.items()})):
        with wb.intervene(model, force={1: (4, "top1")}):
            model(input_ids=ids)
    d = seen[0]
    assert (d["topk_ids"][:, 0] == 4).all() and (d["topk_ids"][:, 1] != 4).all()
    others = d["router_logits"].clone()
    others[:, 4] = float("-inf")
    assert torch.equal(d["topk_ids"][:, 1], others.argmax(-1))
    own = torch.topk(d["router_logits"], 2).values
    torch.testing.assert_close(d["topk_weights"][:, 0], torch.sigmoid(own[:, 0]))


def test_intervene_refuses_bad_requests(ckpt2):
    model = wb.load_model(ckpt2, progress=False)
    with pytest.raises(ValueError, match=r"layer 2 is not a MoE layer; MoE layers: \[1, 3\]"):
        wb.intervene(model, force={2: 0})
    with pytest.raises(ValueError, match=r"expert 8 out of range \[0, 8\) at layer 3"):
        wb.intervene(model, scale={(3, 8): 2.0})
    with pytest.raises(ValueError, match="both blocked and forced"):
        wb.intervene(model, block={1: [3]}, force={1: 3})
    with pytest.raises(ValueError, match="force weight"):
        wb.intervene(model, force={1: (3, "max")})
    with wb.intervene(model, block={1: [3]}, where=torch.ones(1, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"where must give a \(2, 10\) bool mask"):
            model(input_ids=_ids())
