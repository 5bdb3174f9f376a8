"""Expert ablation against transformers with the same intervention applied to its router."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.analysis import expert_ablation
from tests.hf_reference import hf_text_model



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test so other modules (kernel gradients) are unaffected."""
    with torch.no_grad():
        yield


def hf_masked_logits(hf, ids, layer, expert):
    """transformers' logits when `expert` may not be chosen at `layer` (router output rewritten)."""
    router = hf.model.layers[layer].feed_forward.router

    def hook(module, args, out):
        logits = out[1].masked_fill(torch.arange(out[1].shape[-1]) == expert, float("-inf"))
        vals, idx = torch.topk(logits, module.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals)
        return torch.sigmoid(scores.float()).to(scores.dtype), logits

    h = router.register_forward_hook(hook)
    try:
        return hf(input_ids=ids).logits
    finally:
        h.remove()


def test_ablation_matches_transformers_with_the_same_intervention(tmp_path):
    hf = hf_text_model(seed=41)
    hf.save_pretrained(tmp_path)
    model = wb.load_model(tmp_path, progress=False)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    layer = 2
    used = set()
    point = model.model.layers[layer].feed_forward.hook_router
    with point.add(lambda p, router_logits, topk_ids, topk_weights: used.update(topk_ids.reshape(-1).tolist())):
        ours_before = model(input_ids=ids).logits
    unused = sorted(set(range(8)) - used)
    experts = sorted(used)[:2] + unused[:1]
    res = expert_ablation(model, {"input_ids": ids}, layer, experts)

    base = hf(input_ids=ids).logits.double()
    lp0 = F.log_softmax(base, -1)

    def loss(logits):
        lp = F.log_softmax(logits.double()[:, :-1], -1)
        return -lp.gather(-1, ids[:, 1:, None]).mean()

    assert res.attrs["baseline_loss"] == pytest.approx(float(loss(base)), rel=1e-6)
    for e in experts:
        ref = hf_masked_logits(hf, ids, layer, e).double()
        lp = F.log_softmax(ref, -1)
        r = res.sel(expert=e)
        assert float(r["delta_loss"]) == pytest.approx(float(loss(ref) - loss(base)), abs=1e-6)
        assert float(r["kl"]) == pytest.approx(float((lp0.exp() * (lp0 - lp)).sum(-1).mean()), abs=1e-6)
        if e in unused:  # an expert no token chose: nothing changes
            assert float(r["rerouted"]) == 0 and float(r["delta_loss"]) == 0 and float(r["top1_agreement"]) == 1
        else:
            assert float(r["rerouted"]) > 0 and float(r["kl"]) > 0
    # The intervention is removed afterwards.
    np.testing.assert_array_equal(model(input_ids=ids).logits.numpy(), ours_before.numpy())


def test_ablation_rejects_dense_layer_and_bad_expert(tmp_path):
    hf_text_model(interleave_moe_layer_step=2).save_pretrained(tmp_path)
    model = wb.load_model(tmp_path, progress=False)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"layer 0 is not a MoE layer; MoE layers: \[1, 3\]"):
        expert_ablation(model, {"input_ids": ids}, 0, [1])
    with pytest.raises(ValueError, match=r"layer 2 is not a MoE layer; MoE layers: \[1, 3\]"):
        expert_ablation(model, {"input_ids": ids}, 2, [1])
    for bad in (True, 1.0, "1"):  # True == 1 and 1.0 == 1: not silently decoder layer 1
        with pytest.raises(TypeError, match="decoder layer index"):
            expert_ablation(model, {"input_ids": ids}, bad, [1])
    res = expert_ablation(model, {"input_ids": ids}, np.int64(3), [1])  # a numpy int is a decoder index too
    assert res.attrs["layer"] == 3 and type(res.attrs["layer"]) is int
    with pytest.raises(ValueError, match="out of range"):
        expert_ablation(model, {"input_ids": ids}, 1, [8])
