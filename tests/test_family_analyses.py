"""Family-aware definitions of the analyses: OLMoE's conventions rank each token's top-k list by applied
weight (``topk_weight``), like every other analysis's top-1, so a DeepSeek-V3 trace (slots stored by the
selection score s + b, weights without b) gets the same top-1 everywhere, while a softmax family (slots
stored by weight) keeps the stored-slot-order result."""
from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench.analysis import _common, coactivation, layer_transitions, vocab_specialization
from workbench.trace import TraceWriter
from workbench.trace.schema import MoELayerRouting, routing_variables

DEEPSEEK_RULE = "experts CHOSEN by s + b; weight = s without b / their sum, times scale (test rule)"


def write_trace(path, experts, weights, token_ids, *, layers=(1,), n_experts=4, score="sigmoid", bias=True):
    """A one-sequence store written with the real writer; ``experts``/``weights`` (T, L, k). ``bias``: the
    DeepSeek-V3 routing fields (selection bias, groups, scale) in the routing description."""
    e = np.asarray(experts, np.int16)
    T, L, k = e.shape
    extra = dict(selection_bias=True, n_group=2, topk_group=1, scale=2.5, renormalize=True) if bias else {}
    routing = [MoELayerRouting(int(x), n_experts, k, score=score, weight_applied_to="output", **extra)
               for x in layers]
    with TraceWriter.create(path, routing=routing, variables=routing_variables(L, n_experts, k),
                            routing_rule=DEEPSEEK_RULE if bias else "softmax top-k (test rule)") as w:
        rows = {"token_id": np.asarray(token_ids, np.int32), "sequence": np.zeros(T, np.int32),
                "position": np.arange(T, dtype=np.int32), "modality": np.zeros(T, np.int8),
                "topk_expert": e, "topk_weight": np.asarray(weights, np.float32)}
        if "generated" in w.variables:  # schema v3: a per-token prompt/generated flag
            rows["generated"] = np.zeros(T, np.int8)
        w.append(**rows)
    return wb.open_trace(path)


# DeepSeek-like: slot order (by s + b) differs from weight order (s). E = 4, k = 3, one MoE layer (decoder 1).
#   token  id  slots      weights            ranked by weight   top-1
#   t0      7  [0, 1, 2]  [.20, .50, .30]    [1, 2, 0]          1
#   t1      7  [3, 1, 0]  [.10, .60, .30]    [1, 0, 3]          1
#   t2      7  [2, 3, 0]  [.40, .40, .20]    [2, 3, 0] (tie)    2
#   t3      8  [1, 2, 3]  [.25, .25, .50]    [3, 1, 2]          3
DS_EXPERTS = [[[0, 1, 2]], [[3, 1, 0]], [[2, 3, 0]], [[1, 2, 3]]]
DS_WEIGHTS = [[[.20, .50, .30]], [[.10, .60, .30]], [[.40, .40, .20]], [[.25, .25, .50]]]
DS_IDS = [7, 7, 7, 8]


def test_rank_by_weight_is_a_stable_descending_sort_and_starts_with_top1():
    rng = np.random.default_rng(0)
    e = np.stack([rng.permutation(8)[:4] for _ in range(60)]).reshape(20, 3, 4)
    w = rng.choice([0.1, 0.2, 0.3], size=(20, 3, 4))  # few values: many ties
    got = _common.rank_by_weight(e, w)
    for t in range(20):
        for li in range(3):
            order = sorted(range(4), key=lambda j: -w[t, li, j])  # Python's sort is stable: ties keep slot order
            assert got[t, li].tolist() == [int(e[t, li, j]) for j in order]
    np.testing.assert_array_equal(got[..., 0], _common.top1(e, w))
    np.testing.assert_array_equal(_common.rank_by_weight(e[..., :1], w[..., :1]), e[..., :1])  # k = 1


def test_olmoe_coactivation_ranks_deepseek_slots_by_weight(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "BLOCK_TOKENS", 2)  # several blocks
    ds = write_trace(tmp_path / "ds.zarr", DS_EXPERTS, DS_WEIGHTS, DS_IDS)
    n = coactivation(ds, 1, counts=True, convention="olmoe").values
    # neighbours of the ranked lists: t0 {1,2} {2,0}; t1 {1,0} {0,3}; t2 {2,3} {3,0}; t3 {3,1} {1,2}
    hand = np.array([[0, 1, 1, 2],
                     [1, 0, 2, 1],
                     [1, 2, 0, 1],
                     [2, 1, 1, 0]])
    np.testing.assert_array_equal(n, hand)
    # the stored slot order would pair {0,1} twice and {0,3} once: the test tells the two apart
    assert n[0, 1] == 1 and n[0, 3] == 2
    c = coactivation(ds, 1, convention="olmoe")
    np.testing.assert_array_equal(c["n_i"].values, [3, 3, 3, 3])
    want = hand / 3.0
    np.fill_diagonal(want, np.nan)
    np.testing.assert_allclose(c.values, want, equal_nan=True)
    assert "ranked by applied weight (topk_weight), descending" in c.attrs["definition"]
    # pinned counts every pair of the set: slot order does not matter there
    pinned = coactivation(ds, 1, counts=True).values
    assert pinned.sum() == 4 * 3 * 2 and pinned[0, 1] == 2


def test_olmoe_vocab_specialization_uses_the_weight_top1(tmp_path):
    ds = write_trace(tmp_path / "ds.zarr", DS_EXPERTS, DS_WEIGHTS, DS_IDS)
    out = vocab_specialization(ds, convention="olmoe", min_count=1)
    assert out["token_id"].values.tolist() == [7, 8]
    # id 7: top-1 experts 1, 1, 2 -> expert 1, share 2/3 (slot 0 would say expert 0, 1/3); id 8: expert 3, 1
    np.testing.assert_array_equal(out["top_expert"].values[:, 0], [1, 3])
    np.testing.assert_allclose(out["top_share"].values[:, 0], [2 / 3, 1.0])
    np.testing.assert_allclose(out["score"].values, [(2 / 3 + 1.0) / 2])
    assert "ranked by applied weight (topk_weight), descending" in out["top_expert"].attrs["definition"]
    # the same top-1 as the other analyses: layer_transitions' row totals count it
    ds2 = write_trace(tmp_path / "ds2.zarr", [x * 2 for x in DS_EXPERTS], [x * 2 for x in DS_WEIGHTS], DS_IDS,
                      layers=(1, 2))
    tr = layer_transitions(ds2, 1, 2, counts=True)
    np.testing.assert_array_equal(tr["n_a"].values, [0, 2, 1, 1])


def _slot_order_reference(e, ids, E):
    """The stored-slot-order definitions (before ranking by weight): neighbour pairs of the slots and
    slot-0 counts per token id, as float64/int64 numpy loops."""
    T, k = e.shape
    n = np.zeros((E, E), np.int64)
    for t in range(T):
        for a in range(k - 1):
            n[e[t, a], e[t, a + 1]] += 1
            n[e[t, a + 1], e[t, a]] += 1
    shares = {}
    for v in sorted(set(ids.tolist())):
        c = np.bincount(e[ids == v, 0], minlength=E)
        shares[v] = (int(c.argmax()), c.max() / float((ids == v).sum()))
    return n, shares


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_family_keeps_the_stored_slot_order_result(tmp_path, seed):
    """Mixtral/OLMoE/Qwen store the top-k of softmax(logits) best first: ranking by weight changes nothing."""
    rng = np.random.default_rng(seed)
    T, E, k = 300, 8, 4
    logits = rng.normal(size=(T, E))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    e = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, e, -1)
    ids = rng.integers(0, 6, T)
    ds = write_trace(tmp_path / "sm.zarr", e[:, None, :], w[:, None, :], ids, layers=(0,), n_experts=E,
                     score="softmax", bias=False)
    ref_n, ref_shares = _slot_order_reference(e, ids, E)
    np.testing.assert_array_equal(coactivation(ds, 0, counts=True, convention="olmoe").values, ref_n)
    out = vocab_specialization(ds, convention="olmoe", min_count=1)
    assert out["token_id"].values.tolist() == sorted(ref_shares)
    np.testing.assert_array_equal(out["top_expert"].values[:, 0], [ref_shares[v][0] for v in sorted(ref_shares)])
    np.testing.assert_allclose(out["top_share"].values[:, 0], [ref_shares[v][1] for v in sorted(ref_shares)],
                               rtol=0, atol=1e-15)
