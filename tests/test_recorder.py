"""Recording router decisions: what the model routed is what the store holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.hooks import RecorderError, hook_points
from tests.hf_reference import IMAGE_TOKEN, TOKENS_PER_TILE, hf_multimodal_model, hf_text_model



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test so other modules (kernel gradients) are unaffected."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf = hf_text_model(seed=21, num_experts_per_tok=2, interleave_moe_layer_step=2)
    hf.save_pretrained(d)
    return d, hf


def router_outputs(model, **inputs):
    """The model's own router outputs, read at its hook points (no recorder involved)."""
    got = []
    handles = [p.add(lambda p, router_logits, topk_ids, topk_weights: got.append(
        (router_logits.clone(), topk_ids.clone(), topk_weights.clone())))
        for _, p in hook_points(model, "hook_router")]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return got


def test_round_trip_equals_the_models_router_outputs(text_ckpt, tmp_path):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    ref = router_outputs(model, input_ids=ids)
    with wb.record(model, tmp_path / "t.zarr", capture={"router": {}, "logits": {"dtype": "float32"}}) as rec:
        model(input_ids=ids)
    ds = wb.open_trace(tmp_path / "t.zarr").load()
    assert ds.attrs["complete"] and ds.attrs["n_tokens"] == 33
    assert list(ds["layer"].values) == [1, 3]
    # how each MoE layer routes, as the config says (top-2 of 8, interleave step 2) and Llama 4 does
    assert ds.attrs["routing"]["layers"] == [
        {"layer": layer, "n_experts": 8, "top_k": 2, "score": "sigmoid", "renormalize": False,
         "weight_applied_to": "input", "shared_expert": True} for layer in (1, 3)]
    np.testing.assert_array_equal(ds["token_id"].values, ids.reshape(-1).numpy())
    np.testing.assert_array_equal(ds["sequence"].values, np.repeat([0, 1, 2], 11))
    np.testing.assert_array_equal(ds["position"].values, np.tile(np.arange(11), 3))
    for l, (logits, topk, weights) in enumerate(ref):
        np.testing.assert_array_equal(ds["topk_expert"].values[:, l], topk.numpy())
        np.testing.assert_array_equal(ds["topk_weight"].values[:, l], weights.numpy())
        np.testing.assert_array_equal(ds["router_logits"].values[:, l], logits.numpy())
        # Independent check of the semantics: weights are sigmoid of the chosen logits.
        chosen = np.take_along_axis(logits.double().numpy(), topk.numpy(), axis=1)
        np.testing.assert_allclose(ds["topk_weight"].values[:, l], 1 / (1 + np.exp(-chosen)), rtol=1e-6)
    counts = np.stack([np.bincount(t.reshape(-1).numpy(), minlength=8) for _, t, _ in ref])
    np.testing.assert_array_equal(rec.loads().values, counts)
    # The recorder's listeners are removed again: a later forward pass records nothing.
    assert all(not p.active for _, p in hook_points(model))


def test_an_input_buffer_reused_in_place_is_recorded_as_each_pass_saw_it(text_ckpt, tmp_path):
    """A caller that refills one input buffer (ids and a bool mask) in place for every call: the
    writer thread takes passes later (in batches), so it must not read the caller's tensors then."""
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    g = torch.Generator().manual_seed(5)
    ids_buf, mask_buf = torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.bool)
    seen = []
    with wb.record(model, tmp_path / "t.zarr"):
        for i in range(6):
            ids_buf.copy_(torch.randint(3, 300, (2, 9), generator=g))
            mask_buf.fill_(True)
            mask_buf[1, :i] = False  # left padding of i tokens in the second row
            seen.append(ids_buf[mask_buf].clone())
            model(input_ids=ids_buf, attention_mask=mask_buf)
    ds = wb.open_trace(tmp_path / "t.zarr").load()
    np.testing.assert_array_equal(ds["token_id"].values, torch.cat(seen).numpy())
    assert ds.attrs["n_tokens"] == sum(len(x) for x in seen)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_never_recorded_and_rows_match_unpadded_runs(text_ckpt, tmp_path, side):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in (9, 4, 7)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with wb.record(model, tmp_path / "pad.zarr") as rec:
        model(input_ids=ids, attention_mask=mask)
    with wb.record(model, tmp_path / "alone.zarr"):
        for s in seqs:
            model(input_ids=s[None])
    pad, alone = wb.open_trace(tmp_path / "pad.zarr").load(), wb.open_trace(tmp_path / "alone.zarr").load()
    assert pad.sizes["token"] == 20 == alone.sizes["token"]
    for name in ("token_id", "sequence", "position", "topk_expert"):
        np.testing.assert_array_equal(pad[name].values, alone[name].values, err_msg=name)
    np.testing.assert_allclose(pad["topk_weight"].values, alone["topk_weight"].values, rtol=1e-5)
    assert rec.loads().values.sum() == 20 * 2 * 2  # tokens x top-2, per MoE layer summed over 2 layers


def test_transformers_model_records_the_same_trace(text_ckpt, tmp_path):
    """The adapter for transformers' module tree feeds the same store code: equal traces."""
    d, hf = text_ckpt
    model = wb.load_model(d, progress=False)
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    with wb.record(model, tmp_path / "ours.zarr"):
        model(input_ids=ids)
    with wb.record(hf, tmp_path / "hf.zarr"):
        hf(input_ids=ids)
    ours, ref = wb.open_trace(tmp_path / "ours.zarr").load(), wb.open_trace(tmp_path / "hf.zarr").load()
    np.testing.assert_array_equal(ours["topk_expert"].values, ref["topk_expert"].values)
    np.testing.assert_allclose(ours["topk_weight"].values, ref["topk_weight"].values, rtol=1e-5)
    np.testing.assert_array_equal(ours["layer"].values, ref["layer"].values)


def test_image_tokens_are_marked_as_image_patches(tmp_path):
    hf = hf_multimodal_model(seed=4)
    hf.save_pretrained(tmp_path / "mm")
    model = wb.load_model(tmp_path / "mm", progress=False)
    prompt = [1, 5, 6, 7] + [IMAGE_TOKEN] * (2 * TOKENS_PER_TILE) + [8, 9, 2]
    with wb.record(model, tmp_path / "img.zarr"):
        model(input_ids=torch.tensor([prompt]), pixel_values=torch.randn(2, 3, 56, 56))
    ds = wb.open_trace(tmp_path / "img.zarr").load()
    expected = np.array([2, 0, 0, 0] + [1] * 8 + [0, 0, 2], np.int8)  # bos/eos are special
    np.testing.assert_array_equal(ds["modality"].values, expected)


def test_several_forward_passes_number_sequences_consecutively(text_ckpt, tmp_path):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    with wb.record(model, tmp_path / "t.zarr") as rec:
        for n in (3, 1, 2):
            model(input_ids=torch.randint(3, 300, (n, 5)))
        rec.flush()
        assert rec.n_tokens == 30
    ds = wb.open_trace(tmp_path / "t.zarr")
    np.testing.assert_array_equal(np.unique(ds["sequence"].values), np.arange(6))


def test_bad_capture_option_and_missing_ids(text_ckpt, tmp_path):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    with pytest.raises(RecorderError, match="unknown capture option"):
        wb.record(model, tmp_path / "x.zarr", capture=("router", "gates"))
    with pytest.raises(RecorderError, match="needs input_ids"):
        with wb.record(model, tmp_path / "y.zarr"):
            model(inputs_embeds=torch.randn(1, 4, 64))
    # The failed block left a store that opens (incomplete, nothing committed).
    ds = wb.open_trace(tmp_path / "y.zarr")
    assert ds.attrs["complete"] is False and ds.sizes["token"] == 0


def test_store_error_surfaces_in_the_callers_thread(text_ckpt, tmp_path):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    rec = wb.record(model, tmp_path / "t.zarr").attach()
    rec._writer.append = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    model(input_ids=torch.randint(3, 300, (1, 5)))
    with pytest.raises(RecorderError, match="No space left"):
        rec.flush()
    rec.close(complete=False)


def test_commit_every_tokens_stages_then_commits(text_ckpt, tmp_path):
    d, _ = text_ckpt
    model = wb.load_model(d, progress=False)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    with wb.record(model, tmp_path / "t.zarr", commit_every_tokens=50, commit_every_seconds=0) as rec:
        model(input_ids=ids)
        rec._queue.join()
        assert rec.n_tokens == 0  # 20 tokens staged, below 50: nothing committed yet
        model(input_ids=ids)
        model(input_ids=ids)
        rec.flush()  # flush commits what is staged
        assert rec.n_tokens == 60
        model(input_ids=ids)
    ds = wb.open_trace(tmp_path / "t.zarr")
    assert ds.attrs["complete"] and ds.sizes["token"] == 80  # close committed the rest


def _hf_topk_with_blocked(hf, ids, k, layer, expert):
    """transformers' top-k ids per MoE layer when `expert` may not be chosen at decoder `layer`."""
    got, handles = [], []
    for i, dec in enumerate(hf.model.layers):
        if not getattr(dec, "is_moe_layer", False):
            continue

        def hook(module, args, out, i=i):
            logits = out[1]
            if i == layer:
                logits = logits.masked_fill(torch.arange(logits.shape[-1]) == expert, float("-inf"))
            got.append(logits.topk(k, dim=-1).indices)
        handles.append(dec.feed_forward.router.register_forward_hook(hook))
    try:
        hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(got, 1)  # (N, L, k)


def test_two_recorders_and_an_ablation_at_once(text_ckpt, tmp_path):
    """Both stores get every token of their passes, both see the ablated routing, and closing the
    inner recorder or removing the ablation detaches nothing else."""
    from workbench.hooks.interventions import block_experts

    d, hf = text_ckpt
    model = wb.load_model(d, progress=False)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    plain = _hf_topk_with_blocked(hf, ids, 2, layer=None, expert=None)
    expert = int(plain[:, 1].reshape(-1).mode().values)  # an expert layer 3 really uses
    blocked = _hf_topk_with_blocked(hf, ids, 2, layer=3, expert=expert)
    assert not torch.equal(blocked, plain)
    with wb.record(model, tmp_path / "outer.zarr"):
        with wb.record(model, tmp_path / "inner.zarr", capture=("router", "logits")):
            with block_experts(model, {3: [expert]}):
                model(input_ids=ids)
                model(input_ids=ids)
        model(input_ids=ids)  # inner closed, ablation removed: the outer recorder still records
    out, inner = wb.open_trace(tmp_path / "outer.zarr").load(), wb.open_trace(tmp_path / "inner.zarr").load()
    assert out.attrs["complete"] and inner.attrs["complete"]
    assert out.sizes["token"] == 54 and inner.sizes["token"] == 36
    for got in (out["topk_expert"].values[:36], inner["topk_expert"].values):
        for rows in (got[:18], got[18:]):
            np.testing.assert_array_equal(np.sort(rows, -1), np.sort(blocked.numpy(), -1))
    np.testing.assert_array_equal(np.sort(out["topk_expert"].values[36:], -1), np.sort(plain.numpy(), -1))
    assert (inner["router_logits"].values[:, 1, expert] == -np.inf).all()  # the logits top-k saw
    assert all(not p.active for _, p in hook_points(model))


def test_models_without_an_adapter_get_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))  # a dense model: no routing
    with pytest.raises(RecorderError, match=r"no routing adapter knows LlamaForCausalLM \(transformers model type "
                                            r"'llama'\); supported: .*transformers mixtral.*workbench llama4"):
        wb.record(m, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
