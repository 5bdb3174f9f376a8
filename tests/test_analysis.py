"""Routing analyses (workbench.analysis): hand-computed answers on tiny traces, out-of-core
(zarr + dask) equivalence, and property tests against brute-force references."""

from __future__ import annotations

from math import log, sqrt

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench.analysis as A
from workbench.analysis import _common

try:  # dask is optional for workbench (open_trace is dask-backed only when it is installed)
    import dask  # noqa: F401

    HAVE_DASK = True
except ImportError:  # pragma: no cover
    HAVE_DASK = False
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask not installed")


def maybe_chunk(ds, n):
    """dask-backed with chunks of n tokens when dask is installed, else unchanged (the block
    loop still runs in many blocks when BLOCK_TOKENS is small)."""
    return ds.chunk(token=n) if HAVE_DASK else ds


# --------------------------------------------------------------------------- fixtures
def make_trace(experts, weights=None, *, sequence, position, modality=None, token_id=None,
               layers=None, n_experts=4, logits=None, attrs=True):
    """An in-memory trace (the workbench.trace/2 variables) from per-token lists. experts: (T, L, k)."""
    e = np.asarray(experts, dtype=np.int16)
    T, L, k = e.shape
    w = np.full((T, L, k), 1.0 / k, np.float32) if weights is None else np.asarray(weights, np.float32)
    data = {
        "token_id": ("token", np.asarray(token_id if token_id is not None else np.arange(T), np.int32)),
        "sequence": ("token", np.asarray(sequence, np.int32)),
        "position": ("token", np.asarray(position, np.int32)),
        "modality": ("token", np.asarray(modality if modality is not None else np.zeros(T), np.int8)),
        "topk_expert": (("token", "moe_layer", "k"), e),
        "topk_weight": (("token", "moe_layer", "k"), w),
    }
    if logits is not None:
        data["router_logits"] = (("token", "moe_layer", "expert"), np.asarray(logits))
    layers = list(range(L)) if layers is None else layers
    return xr.Dataset(data, coords={"layer": ("moe_layer", np.asarray(layers, np.int64))},
                      attrs={"schema": "workbench.trace/2", **({"n_experts": n_experts} if attrs else {})})


# Trace A: 6 tokens, E = 4, k = 2, MoE layers at decoder layers 1 and 3.
#   sequences: t0,t1,t2 = seq 0 (pos 0,1,2); t3,t4 = seq 1 (pos 0,1); t5 = seq 2 (single token)
#   modality:  t0 text, t1 image, t2 image, t3 text, t4 special, t5 text
#   token_id:  10, 11, 10, 12, 10, 11
# layer 1 sets (weights) -> top-1           layer 3 sets (weights) -> top-1
#   t0 [0,1] (.7,.3) -> 0                     t0 [3,2] (.9,.1) -> 3
#   t1 [1,0] (.6,.4) -> 1                     t1 [3,0] (.5,.5) -> 3 (tie: first slot)
#   t2 [0,2] (.5,.5) -> 0 (tie: first slot)   t2 [2,3] (.4,.6) -> 3
#   t3 [2,0] (.2,.8) -> 0                     t3 [0,1] (.7,.3) -> 0
#   t4 [1,2] (.9,.1) -> 1                     t4 [0,3] (.8,.2) -> 0
#   t5 [0,1] (.6,.4) -> 0                     t5 [1,2] (.3,.7) -> 2
# expert 3 is never used at layer 1 (zero load).
EXP_A = [
    [[0, 1], [3, 2]],
    [[1, 0], [3, 0]],
    [[0, 2], [2, 3]],
    [[2, 0], [0, 1]],
    [[1, 2], [0, 3]],
    [[0, 1], [1, 2]],
]
W_A = [
    [[.7, .3], [.9, .1]],
    [[.6, .4], [.5, .5]],
    [[.5, .5], [.4, .6]],
    [[.2, .8], [.7, .3]],
    [[.9, .1], [.8, .2]],
    [[.6, .4], [.3, .7]],
]


def trace_a(**kw):
    return make_trace(EXP_A, W_A, sequence=[0, 0, 0, 1, 1, 2], position=[0, 1, 2, 0, 1, 0],
                      modality=[0, 1, 1, 0, 2, 0], token_id=[10, 11, 10, 12, 10, 11], layers=[1, 3], **kw)


# Trace B: 5 tokens, E = 4, k = 1, one MoE layer (decoder layer 0).
#   top-1: 2, 2, 0, 2, 2; sequences 0,0,0,1,1; positions 0,1,2,0,1
def trace_b():
    return make_trace([[[2]], [[2]], [[0]], [[2]], [[2]]], sequence=[0, 0, 0, 1, 1],
                      position=[0, 1, 2, 0, 1], token_id=[5, 6, 5, 7, 5])


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many blocks (2 tokens each) so block boundaries are exercised."""
    monkeypatch.setattr(_common, "BLOCK_TOKENS", 2)


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True,
                               rtol=kw.get("rtol", 1e-12), atol=kw.get("atol", 1e-12))


# --------------------------------------------------------------------------- loads
def test_expert_load_hand():
    ds = trace_a()
    counts = A.expert_load(ds, normalize=False)
    # layer 1: e0 in t0,t1,t2,t3,t5 = 5; e1 in t0,t1,t4,t5 = 4; e2 in t2,t3,t4 = 3; e3 never
    # layer 3: e0 in t1,t3,t4 = 3; e1 in t3,t5 = 2; e2 in t0,t2,t5 = 3; e3 in t0,t1,t2,t4 = 4
    assert counts.dims == ("moe_layer", "expert")
    assert counts.values.tolist() == [[5, 4, 3, 0], [3, 2, 3, 4]]
    assert counts["layer"].values.tolist() == [1, 3]
    f = A.expert_load(ds)
    close(f, [[5 / 12, 4 / 12, 3 / 12, 0], [3 / 12, 2 / 12, 3 / 12, 4 / 12]])  # / (k T) = / 12
    assert f.attrs["n_tokens"] == 6


def test_expert_load_modality():
    ds = trace_a()
    # text tokens t0, t3, t5 at layer 1: {0,1}, {2,0}, {0,1} -> e0 3, e1 2, e2 1 over k T = 6
    close(A.expert_load(ds, modality="text").sel(moe_layer=0), [3 / 6, 2 / 6, 1 / 6, 0])
    assert A.expert_load(ds, modality=0).equals(A.expert_load(ds, modality="text"))
    split = A.expert_load(ds, by_modality=True)
    assert split.dims == ("modality", "moe_layer", "expert")
    assert split["n_tokens"].values.tolist() == [3, 2, 1]
    # image t1 {1,0}, t2 {0,2}: e0 2, e1 1, e2 1 over 4; special t4 {1,2}: 1/2, 1/2
    close(split.isel(moe_layer=0), [[3 / 6, 2 / 6, 1 / 6, 0], [2 / 4, 1 / 4, 1 / 4, 0], [0, 1 / 2, 1 / 2, 0]])
    # an absent modality gives NaN shares and zero counts
    ds_text = trace_a().assign(modality=("token", np.zeros(6, np.int8)))
    assert np.isnan(A.expert_load(ds_text, modality="image")).all()
    assert int(A.expert_load(ds_text, modality="image", normalize=False).sum()) == 0
    with pytest.raises(ValueError, match="modality"):
        A.expert_load(ds, modality="audio")
    with pytest.raises(ValueError, match="not both"):
        A.expert_load(ds, modality="text", by_modality=True)


def test_load_imbalance_hand():
    m = A.load_imbalance(trace_a())
    # layer 1: f = [5,4,3,0]/12, mean 3/12, deviations [2,1,0,-3]/12, population var = 14/4/144
    #   cv = (sqrt(3.5)/12) / (3/12) = sqrt(3.5)/3; max/mean = 4*5/12 = 5/3; MaxVio = 5/3 - 1 = 2/3
    # layer 3: f = [3,2,3,4]/12, deviations [0,-1,0,1]/12, var = 2/4/144 -> cv = sqrt(.5)/3
    #   max/mean = 4*4/12 = 4/3; MaxVio = 1/3
    close(m["cv"], [sqrt(3.5) / 3, sqrt(0.5) / 3])
    close(m["max_over_mean"], [5 / 3, 4 / 3])
    close(m["maxvio"], [2 / 3, 1 / 3])
    h1 = -(5 / 12 * log(5 / 12) + 4 / 12 * log(4 / 12) + 3 / 12 * log(3 / 12)) / log(4)
    h3 = -(2 * 3 / 12 * log(3 / 12) + 2 / 12 * log(2 / 12) + 4 / 12 * log(4 / 12)) / log(4)
    close(m["load_entropy"], [h1, h3])
    assert m["layer"].values.tolist() == [1, 3]


def test_load_imbalance_k1_and_split():
    m = A.load_imbalance(trace_b())
    # f = [1/5, 0, 4/5, 0], mean .25, deviations [-.05, -.25, .55, -.25]
    #   population var = (.0025 + .0625 + .3025 + .0625)/4 = .1075 -> cv = sqrt(.1075)/.25
    close(m["cv"], [sqrt(0.1075) / 0.25], rtol=1e-12)
    close(m["max_over_mean"], [3.2])
    close(m["maxvio"], [2.2], rtol=1e-12)
    close(m["load_entropy"], [-(0.2 * log(0.2) + 0.8 * log(0.8)) / log(4)])
    split = A.load_imbalance(trace_a(), by_modality=True)
    assert split["cv"].dims == ("modality", "moe_layer")
    # special at layer 1: only t4 {1,2}: f = [0,.5,.5,0] -> max/mean = 2, cv = std([0,.5,.5,0])/.25 = 1
    close(split["max_over_mean"].sel(modality=2)[0], 2.0)
    close(split["cv"].sel(modality=2)[0], 1.0)


def test_balanced_load_is_zero_cv():
    # every expert once per layer: f uniform -> cv 0, max/mean 1, MaxVio 0, entropy 1
    ds = make_trace([[[0]], [[1]], [[2]], [[3]]], sequence=[0] * 4, position=[0, 1, 2, 3])
    m = A.load_imbalance(ds)
    close(m["cv"], [0.0])
    close(m["max_over_mean"], [1.0])
    close(m["maxvio"], [0.0])
    close(m["load_entropy"], [1.0])


def test_n_experts_inference_and_errors():
    ds = trace_a(attrs=False)
    with pytest.raises(ValueError, match="n_experts="):
        A.expert_load(ds)
    assert A.expert_load(ds, n_experts=4).sizes["expert"] == 4
    logits = np.zeros((6, 2, 5), np.float32)
    assert A.expert_load(trace_a(attrs=False, logits=logits)).sizes["expert"] == 5
    with pytest.raises(ValueError, match="outside"):
        A.expert_load(trace_a(), n_experts=3)  # expert id 3 is out of range for E=3
    bad = trace_a()
    bad["topk_expert"][0, 0, 1] = 0  # token 0 set {0, 0}
    with pytest.raises(ValueError, match="repeats an expert"):
        A.expert_load(bad)
    with pytest.raises(KeyError, match="topk_expert"):
        A.expert_load(trace_a().drop_vars("topk_expert"))


def test_modality_names_and_codes_come_from_the_schema():
    from workbench.trace.schema import Modality

    assert _common.MODALITY_CODES == {"text": 0, "image": 1, "special": 2}
    assert _common.MODALITY_NAMES == ("text", "image", "special")
    for m in Modality:
        assert _common.MODALITY_NAMES[int(m)] == m.label and _common.MODALITY_CODES[m.label] == int(m)
    r = _common.resolve_modality
    assert r(None) is None
    for value, code in [("text", 0), ("IMAGE", 1), ("image_patch", 1), ("patch", 1), ("special", 2),
                        (Modality.SPECIAL, 2), (np.int8(1), 1), (0, 0), (2, 2)]:
        got = r(value)
        assert got == code and type(got) is int, (value, got)
    with pytest.raises(ValueError, match=r"^expert_load: unknown modality 'audio'"):
        r("audio", "expert_load")
    with pytest.raises(ValueError, match=r"^expert_load: unknown modality code 5"):
        r(5, "expert_load")
    for bad in (True, np.bool_(False), 1.0, [0]):
        with pytest.raises(TypeError, match=r"^expert_load: modality must be None, a name or an int code"):
            r(bad, "expert_load")
    # the labels of by_modality results and of the modality filter
    ds = trace_a()
    split = A.expert_load(ds, by_modality=True)
    assert split["modality"].values.tolist() == [0, 1, 2]
    assert split["modality_name"].values.tolist() == ["text", "image", "special"]
    image = A.expert_load(ds, modality=Modality.IMAGE_PATCH)
    assert image.equals(A.expert_load(ds, modality="patch")) and image.attrs["modality_filter"] == "image (1)"
    close(image.sel(moe_layer=0), [2 / 4, 1 / 4, 1 / 4, 0])  # t1 {1,0}, t2 {0,2} over k T = 4


def test_layer_arguments_are_decoder_layer_indices():
    ds = trace_a()  # MoE layers at decoder layers 1 and 3 (positions 0 and 1)
    assert _common.layer_position(ds, 1) == 0 and _common.layer_position(ds, 3) == 1
    assert _common.layer_position(ds, np.int64(3)) == 1 and _common.layer_position(ds, ds["layer"][1]) == 1
    for bad in (0, 2, 4, -1):  # decoder layers that are not MoE layers (0 is a position, not a layer)
        with pytest.raises(ValueError, match=rf"coactivation: decoder layer {bad} is not a MoE layer.*\[1, 3\]"):
            A.coactivation(ds, bad)
        with pytest.raises(ValueError, match=rf"layer_transitions: decoder layer {bad} is not a MoE layer"):
            A.layer_transitions(ds, 1, bad)
    for bad in (True, 1.0, "1", None):  # True == 1 and 1.0 == 1 would silently pick layer 1
        with pytest.raises(TypeError, match="decoder layer index"):
            A.coactivation(ds, bad)
        with pytest.raises(TypeError, match="decoder layer index"):
            A.layer_transitions(ds, bad, 3)
    # numpy / 0-d DataArray layer values select the same layer as the int
    assert A.coactivation(ds, np.int16(3), counts=True).equals(A.coactivation(ds, 3, counts=True))
    assert A.layer_transitions(ds, ds["layer"][0], ds["layer"][1], counts=True).values.tolist() == [
        [1, 0, 1, 2], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


# --------------------------------------------------------------------------- entropy
def test_router_entropy_scores_hand():
    ent = A.router_entropy(trace_a())
    assert ent.attrs["probabilities"] == "applied top-k scores normalized to sum 1"

    def h(p):  # weights of trace A sum to 1 already
        return -sum(x * log(x) for x in p) / log(4)

    # layer 1: (.7,.3), (.6,.4), (.5,.5) = ln2/ln4 = 1/2, (.2,.8), (.9,.1), (.6,.4)
    l1 = [h([.7, .3]), h([.6, .4]), 0.5, h([.2, .8]), h([.9, .1]), h([.6, .4])]
    l3 = [h([.9, .1]), 0.5, h([.4, .6]), h([.7, .3]), h([.8, .2]), h([.3, .7])]
    close(ent["entropy"], np.array([l1, l3]).T, rtol=1e-6)
    close(ent["mean_entropy"], [np.mean(l1), np.mean(l3)], rtol=1e-6)
    text = A.router_entropy(trace_a(), modality="text")  # t0, t3, t5
    close(text["mean_entropy"][0], np.mean([l1[0], l1[3], l1[5]]), rtol=1e-6)
    assert text["token_index"].values.tolist() == [0, 3, 5]
    split = A.router_entropy(trace_a(), by_modality=True)
    close(split["mean_entropy"].sel(modality=1), [np.mean(l1[1:3]), np.mean(l3[1:3])], rtol=1e-6)


def test_router_entropy_logits_hand():
    ln = np.log
    # token 0: logits ln[1,1,2,4] -> p = [1,1,2,4]/8 -> H = (2*(1/8)*3 + (1/4)*2 + (1/2)*1) ln2 = 1.75 ln2
    #          normalized by ln4 = 2 ln2 -> 0.875
    # token 1: equal logits -> uniform -> 1;  token 2: one logit 100 above the rest -> ~0
    # token 3: logits [0, -inf, 0, 0] -> p = [1/3, 0, 1/3, 1/3] -> ln3 / ln4
    logits = np.array([[ln([1, 1, 2, 4])], [[5, 5, 5, 5]], [[100, 0, 0, 0]], [[0, -np.inf, 0, 0]]],
                      dtype=np.float32)
    ds = make_trace([[[3, 2]], [[0, 1]], [[0, 1]], [[0, 2]]], sequence=[0] * 4, position=[0, 1, 2, 3],
                    logits=logits)
    ent = A.router_entropy(ds)
    assert ent.attrs["probabilities"] == "softmax(logits)"
    expected = [0.875, 1.0, 0.0, log(3) / log(4)]
    close(ent["entropy"][:, 0], expected, rtol=1e-6, atol=1e-6)
    close(ent["mean_entropy"], [sum(expected) / 4], rtol=1e-6, atol=1e-6)
    half = A.router_entropy(ds.assign(router_logits=ds["router_logits"].astype(np.float16)))
    close(half["entropy"][:, 0], expected, rtol=1e-3, atol=1e-3)
    # source="scores" ignores the logits: equal weights of k=2 -> ln2/ln4 = 1/2
    close(A.router_entropy(ds, source="scores")["entropy"][:, 0], [0.5] * 4, rtol=1e-6)


def test_router_entropy_k1_without_logits_errors():
    with pytest.raises(ValueError, match="undefined") as err:
        A.router_entropy(trace_b())
    # the capture that records router logits is named "logits" (the "router" capture has only top-k)
    msg = str(err.value)
    assert "capture 'logits'" in msg and "capture=('router', 'logits')" in msg, msg
    assert "capture 'router'" not in msg, msg
    with pytest.raises(KeyError, match="router_logits"):
        A.router_entropy(trace_a(), source="logits")
    # top-1 WITH logits but source="scores": a point mass too; the message points to the logits
    with_logits = trace_b().assign(router_logits=(("token", "moe_layer", "expert"), np.zeros((5, 1, 4), np.float32)))
    with pytest.raises(ValueError, match="use source='logits'"):
        A.router_entropy(with_logits, source="scores")
    close(A.router_entropy(with_logits)["mean_entropy"], [1.0])  # equal logits: uniform softmax


# --------------------------------------------------------------------------- co-activation
def test_coactivation_hand():
    ds = trace_a()
    # layer 1 sets: {0,1} x3 (t0,t1,t5), {0,2} x2 (t2,t3), {1,2} (t4); N_i = [5,4,3,0]
    n = A.coactivation(ds, 1, counts=True)
    assert n.values.tolist() == [[0, 3, 2, 0], [3, 0, 1, 0], [2, 1, 0, 0], [0, 0, 0, 0]]
    assert n["n_i"].values.tolist() == [5, 4, 3, 0]
    c = A.coactivation(ds, 1)
    nan = np.nan
    close(c, [[nan, 3 / 5, 2 / 5, 0], [3 / 4, nan, 1 / 4, 0], [2 / 3, 1 / 3, nan, 0], [nan] * 4])
    assert c.dims == ("expert", "expert_j") and int(c["layer"]) == 1
    # text only (t0 {0,1}, t3 {2,0}, t5 {0,1}): N = [3,2,1,0]; N_01 = 2, N_02 = 1
    close(A.coactivation(ds, 1, modality="text"),
          [[nan, 2 / 3, 1 / 3, 0], [1, nan, 0, 0], [1, 0, nan, 0], [nan] * 4])
    with pytest.raises(ValueError, match=r"available MoE layers.*\[1, 3\]"):
        A.coactivation(ds, 2)


def test_coactivation_k1():
    c = A.coactivation(trace_b(), 0)
    # no pairs with k = 1: used rows (experts 0 and 2) are 0 off the diagonal, unused rows NaN
    nan = np.nan
    close(c, [[nan, 0, 0, 0], [nan] * 4, [0, 0, nan, 0], [nan] * 4])


# --------------------------------------------------------------------------- repetition
def repetition_expected_a():
    # pairs: (t0,t1), (t1,t2) in seq 0, (t3,t4) in seq 1; never (t2,t3) across sequences,
    # none for the single-token seq 2 -> P = 3
    # layer 1 top-1 0,1,0,0,1,0: (0,1) no, (1,0) no, (0,1) no -> 0
    #   overlaps |{0,1}∩{1,0}| = 2, |{1,0}∩{0,2}| = 1, |{2,0}∩{1,2}| = 1 -> 4 / (k P) = 4/6
    # layer 3 top-1 3,3,3,0,0,2: all three pairs equal -> 1
    #   overlaps |{3,2}∩{3,0}| = 1, |{3,0}∩{2,3}| = 1, |{0,1}∩{0,3}| = 1 -> 3/6
    # baselines: layer 1 top-1 shares g = [4/6, 2/6, 0, 0] -> 20/36; layer 3 g = [2,0,1,3]/6 -> 14/36
    #   overlap baseline k sum f^2: layer 1 2*(25+16+9)/144 = 100/144, layer 3 2*(9+4+9+16)/144 = 76/144
    return dict(same_top1_rate=[0, 1], overlap=[4 / 6, 3 / 6], same_top1_baseline=[20 / 36, 14 / 36],
                overlap_baseline=[100 / 144, 76 / 144])


def check_repetition(r, expected, n_pairs):
    for name, val in expected.items():
        close(r[name], val)
    assert int(r["n_pairs"]) == n_pairs


def test_repetition_hand():
    check_repetition(A.repetition_rate(trace_a()), repetition_expected_a(), 3)


def test_repetition_unsorted_rows_and_blocks(small_blocks):
    ds = trace_a()
    perm = [4, 2, 5, 0, 3, 1]  # rows no longer in (sequence, position) order
    shuffled = ds.isel(token=perm)
    check_repetition(A.repetition_rate(shuffled), repetition_expected_a(), 3)
    check_repetition(A.repetition_rate(maybe_chunk(shuffled, 1)), repetition_expected_a(), 3)
    check_repetition(A.repetition_rate(maybe_chunk(ds, 2)), repetition_expected_a(), 3)


def test_repetition_k1_and_modality():
    r = A.repetition_rate(trace_b())
    # pairs (t0,t1): 2=2, (t1,t2): 2!=0, (t3,t4): 2=2 -> 2/3; f = [1/5,0,4/5,0] -> 1/25+16/25 = 17/25
    close(r["same_top1_rate"], [2 / 3])
    close(r["overlap"], [2 / 3])
    close(r["same_top1_baseline"], [17 / 25])
    close(r["overlap_baseline"], [17 / 25])
    # text tokens t0,t3,t5: no adjacent text pair -> P = 0 -> NaN rates
    t = A.repetition_rate(trace_a(), modality="text")
    assert int(t["n_pairs"]) == 0 and np.isnan(t["same_top1_rate"]).all() and np.isnan(t["overlap"]).all()
    # image tokens t1,t2: one pair. layer 1: 1 vs 0 -> 0, |{1,0}∩{0,2}|/2 = 1/2;
    #   layer 3: 3 vs 3 -> 1, |{3,0}∩{2,3}|/2 = 1/2
    #   baselines: layer 1 g = [1/2,1/2,0,0] -> 1/2, f = [2,1,1,0]/4 -> 2*(4+1+1)/16 = 3/4
    #              layer 3 g = [0,0,0,1] -> 1, f = {3,0},{2,3} -> [1,0,1,2]/4 -> 2*(1+1+4)/16 = 3/4
    i = A.repetition_rate(trace_a(), modality="image")
    check_repetition(i, dict(same_top1_rate=[0, 1], overlap=[0.5, 0.5], same_top1_baseline=[0.5, 1.0],
                             overlap_baseline=[0.75, 0.75]), 1)


def test_repetition_single_token_sequences_and_duplicates():
    ds = make_trace([[[0]], [[0]], [[1]]], sequence=[0, 1, 2], position=[0, 0, 0])
    r = A.repetition_rate(ds)
    assert int(r["n_pairs"]) == 0 and np.isnan(r["same_top1_rate"]).all()
    dup = make_trace([[[0]], [[0]]], sequence=[0, 0], position=[3, 3])
    with pytest.raises(ValueError, match="two tokens at position 3"):
        A.repetition_rate(dup)


# --------------------------------------------------------------------------- transitions
def test_layer_transitions_hand():
    ds = trace_a()
    # top-1 layer 1 = [0,1,0,0,1,0], layer 3 = [3,3,3,0,0,2]
    # from expert 0 at layer 1 (t0,t2,t3,t5) -> 3,3,0,2 : [1/4, 0, 1/4, 1/2]
    # from expert 1 (t1,t4) -> 3,0 : [1/2, 0, 0, 1/2]; experts 2, 3 never top-1 -> NaN rows
    p = A.layer_transitions(ds, 1, 3)
    nan = np.nan
    close(p, [[1 / 4, 0, 1 / 4, 1 / 2], [1 / 2, 0, 0, 1 / 2], [nan] * 4, [nan] * 4])
    assert p.dims == ("expert_a", "expert_b") and p["n_a"].values.tolist() == [4, 2, 0, 0]
    # reverse: from 0 at layer 3 (t3,t4) -> 0,1; from 2 (t5) -> 0; from 3 (t0,t1,t2) -> 0,1,0
    close(A.layer_transitions(ds, 3, 1), [[1 / 2, 1 / 2, 0, 0], [nan] * 4, [1, 0, 0, 0], [2 / 3, 1 / 3, 0, 0]])
    # text (t0,t3,t5): from 0 -> 3, 0, 2
    close(A.layer_transitions(ds, 1, 3, modality="text"), [[1 / 3, 0, 1 / 3, 1 / 3]] + [[nan] * 4] * 3)
    assert A.layer_transitions(ds, 1, 3, counts=True).values.tolist() == [
        [1, 0, 1, 2], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"decoder layer 0 is not a MoE layer.*\[1, 3\]"):
        A.layer_transitions(ds, 0, 3)


# --------------------------------------------------------------------------- specialization
def test_vocab_specialization_hand():
    ds = trace_a()
    v = A.vocab_specialization(ds, min_count=1)
    # layer 1: id 10 = t0 {0,1}, t2 {0,2}, t4 {1,2} -> [1/3,1/3,1/3,0]; id 11 = t1, t5 -> [1/2,1/2,0,0];
    #          id 12 = t3 {2,0} -> [1/2,0,1/2,0]
    assert v["token_id"].values.tolist() == [10, 11, 12] and v["count"].values.tolist() == [3, 2, 1]
    close(v["share"].isel(moe_layer=0), [[1 / 3, 1 / 3, 1 / 3, 0], [1 / 2, 1 / 2, 0, 0], [1 / 2, 0, 1 / 2, 0]])
    # f = [5,4,3,0]/12; KL(p10||f) = (1/3)(ln(4/5) + ln 1 + ln(4/3)) = (1/3) ln(16/15)
    # KL(p11||f) = (1/2) ln(6/5) + (1/2) ln(3/2) = (1/2) ln(9/5); KL(p12||f) = (1/2) ln(6/5) + (1/2) ln 2
    # score = 3/6 * KL10 + 2/6 * KL11 + 1/6 * KL12
    s1 = (1 / 6) * log(16 / 15) + (1 / 6) * log(9 / 5) + (1 / 12) * log(12 / 5)
    close(v["score"][0], s1)
    hf = -(5 / 12 * log(5 / 12) + 4 / 12 * log(4 / 12) + 3 / 12 * log(3 / 12))
    close(v["score_normalized"][0], s1 / hf)
    # min_count=2 drops id 12: f over t with id 10, 11 = e0 4, e1 4, e2 2 over 10
    v2 = A.vocab_specialization(ds, min_count=2)
    assert v2["token_id"].values.tolist() == [10, 11]
    close(v2["load"].isel(moe_layer=0), [0.4, 0.4, 0.2, 0])
    # target next: t0 -> id 11 (t1), t1 -> 10 (t2), t3 -> 10 (t4); t2, t4, t5 have no next
    #   id 10: t1 {1,0}, t3 {2,0} -> [1/2,1/4,1/4,0]; id 11: t0 {0,1} -> [1/2,1/2,0,0]
    n = A.vocab_specialization(ds, target="next", min_count=1)
    assert n["count"].values.tolist() == [2, 1]
    close(n["share"].isel(moe_layer=0), [[1 / 2, 1 / 4, 1 / 4, 0], [1 / 2, 1 / 2, 0, 0]])
    # routing independent of token id -> score 0
    same = make_trace([[[0, 1]]] * 4, sequence=[0] * 4, position=range(4), token_id=[1, 2, 1, 2])
    close(A.vocab_specialization(same, min_count=1)["score"], [0.0])
    with pytest.raises(ValueError, match="target"):
        A.vocab_specialization(ds, target="prev")


def test_domain_specialization_hand():
    ds = trace_a()
    d = A.domain_specialization(ds, {0: "code", 1: "chat", 2: "code"})
    assert d["label"].values.tolist() == ["chat", "code"] and d["count"].values.tolist() == [2, 4]
    # layer 1: chat = t3 {2,0}, t4 {1,2} -> [1/4,1/4,1/2,0]
    #          code = t0 {0,1}, t1 {1,0}, t2 {0,2}, t5 {0,1} -> e0 4, e1 3, e2 1 over 8
    p_chat, p_code = [1 / 4, 1 / 4, 1 / 2, 0], [1 / 2, 3 / 8, 1 / 8, 0]
    close(d["share"].isel(moe_layer=0), [p_chat, p_code])

    def H(p):
        return -sum(x * log(x) for x in p if x > 0)

    m = [3 / 8, 5 / 16, 5 / 16, 0]  # equal-weight mixture
    jsd = H(m) - (H(p_chat) + H(p_code)) / 2
    close(d["jsd"][0], jsd)
    close(d["jsd_normalized"][0], jsd / log(2))
    arr = A.domain_specialization(ds, np.array(["code", "chat", "code"]))
    close(arr["jsd"], d["jsd"])
    part = A.domain_specialization(ds, {0: "code", 1: "chat"})  # seq 2 (t5) unlabelled
    assert part.attrs["n_unlabeled_tokens"] == 1 and part["count"].values.tolist() == [2, 3]
    one = A.domain_specialization(ds, {0: "a", 1: "a", 2: "a"})
    close(one["jsd"], [0.0, 0.0])
    assert np.isnan(one["jsd_normalized"]).all()
    with pytest.raises(ValueError, match="labels array has length 2"):
        A.domain_specialization(ds, ["x", "y"])


# --------------------------------------------------------------------------- saturation
def test_saturation_hand():
    a = trace_a()
    b = trace_a()
    # layer 1: t0 {1,0} with weights (.7,.3) -> same set, top-1 1 (was 0); t1 {3,2} -> no overlap, top-1 3
    b["topk_expert"][0, 0] = [1, 0]
    b["topk_expert"][1, 0] = [3, 2]
    s = A.saturation(a, b)
    # layer 1 overlaps 2,0,2,2,2,2 -> 10/12; top-1 agreement 4/6; layer 3 identical -> 1, 1
    close(s["overlap"], [10 / 12, 1])
    close(s["top1_agreement"], [4 / 6, 1])
    close(A.saturation(a, b, modality="image")["overlap"], [(0 + 2) / 4, 1])  # t1, t2
    with pytest.raises(ValueError, match="token_id differs at token 2"):
        A.saturation(a, a.assign(token_id=("token", np.array([10, 11, 99, 12, 10, 11], np.int32))))
    with pytest.raises(ValueError, match="6 tokens in ds_a vs 5"):
        A.saturation(a, a.isel(token=slice(0, 5)))
    with pytest.raises(ValueError, match="different top-k"):
        A.saturation(a, a.isel(k=[0]))


def test_risk_difference_refuses_different_expert_counts():
    """Expert i of a 4-expert model is not expert i of a 6-expert one: refused up front, both orders,
    as saturation does."""
    a = trace_a()  # E = 4
    b = trace_a()
    b.attrs["n_experts"] = 6
    for x, y, want in ((b, a, "6 vs 4"), (a, b, "4 vs 6")):
        with pytest.raises(ValueError, match=f"different expert counts: {want}"):
            A.risk_difference(x, y)
        with pytest.raises(ValueError, match=f"different expert counts: {want}"):
            A.saturation(x, y)
    # same counts: p_behaviour - p_baseline; layer 1 of trace A holds expert 0 in 5 of 6 sets, expert 3 in none
    rd = A.risk_difference(a, a.isel(token=[3, 4]))  # baseline t3 {2,0}, t4 {1,2}
    close(rd["p_behaviour"].values[0], [5 / 6, 4 / 6, 3 / 6, 0])
    close(rd["p_baseline"].values[0], [1 / 2, 1 / 2, 1, 0])
    close(rd["risk_difference"].values[0], [5 / 6 - 1 / 2, 4 / 6 - 1 / 2, 3 / 6 - 1, 0])


# --------------------------------------------------------------------------- out of core
def all_results(ds, other=None):
    layers = ds["layer"].values.tolist()
    out = {
        "load": A.expert_load(ds),
        "load_by_mod": A.expert_load(ds, by_modality=True, normalize=False),
        "imb": A.load_imbalance(ds),
        "imb_text": A.load_imbalance(ds, modality="text"),
        "rep": A.repetition_rate(ds),
        "rep_img": A.repetition_rate(ds, modality="image"),
        "coact": A.coactivation(ds, layers[0], counts=True),
        "trans": A.layer_transitions(ds, layers[0], layers[-1]),
        "vocab": A.vocab_specialization(ds, min_count=1),
        "vocab_next": A.vocab_specialization(ds, target="next", min_count=2),
        "domain": A.domain_specialization(ds, {s: s % 2 for s in range(100)}),
        "sat": A.saturation(ds, other if other is not None else ds),
    }
    if ds.sizes["k"] > 1 or "router_logits" in ds:
        ent = A.router_entropy(ds, by_modality=True)
        out["entropy_lazy"] = ent["entropy"].chunks is not None
        out["entropy"] = ent.compute()
        out["entropy_text"] = A.router_entropy(ds, modality="text").compute()
    return out


def assert_same(r1, r2, rtol=1e-6):
    assert r1.keys() == r2.keys()
    r1, r2 = dict(r1), dict(r2)
    r1.pop("entropy_lazy", None)
    r2.pop("entropy_lazy", None)
    for key in r1:
        a, b = r1[key], r2[key]
        if isinstance(a, xr.Dataset):
            assert set(a.data_vars) == set(b.data_vars), key
            for v in a.data_vars:
                np.testing.assert_allclose(a[v].values, b[v].values, rtol=rtol, atol=1e-9, equal_nan=True,
                                           err_msg=f"{key}.{v}")
        else:
            np.testing.assert_allclose(a.values, b.values, rtol=rtol, atol=1e-9, equal_nan=True, err_msg=key)
        assert dict(a.sizes) == dict(b.sizes), key


def random_trace(seed, T=200, L=3, E=6, k=2, n_seq=7, logits=True, shuffle=False):
    rng = np.random.default_rng(seed)
    e = np.argsort(rng.random((T, L, E)), axis=-1)[..., :k]
    w = rng.random((T, L, k)).astype(np.float32)
    seq = np.sort(rng.integers(0, n_seq, T))
    pos = np.concatenate([np.arange((seq == s).sum()) for s in np.unique(seq)])
    lg = rng.normal(size=(T, L, E)).astype(np.float32) if logits else None
    ds = make_trace(e, w, sequence=seq, position=pos, modality=rng.integers(0, 3, T),
                    token_id=rng.integers(0, 12, T), layers=list(range(1, 2 * L, 2)), n_experts=E, logits=lg)
    if shuffle:
        ds = ds.isel(token=rng.permutation(T))
    return ds


def write_zarr(ds, path, chunk):
    enc = {v: {"chunks": (chunk,) + ds[v].shape[1:]} for v in ds.data_vars}
    ds.to_zarr(path, zarr_format=3, encoding=enc, consolidated=False)


def test_zarr_lazy_backend_matches_memory(tmp_path, monkeypatch):
    """Lazily indexed zarr arrays (no dask), read in blocks, give the in-memory results."""
    ds = random_trace(0, T=300)
    other = random_trace(1, T=300).assign(token_id=ds["token_id"])
    expected = all_results(ds, other)
    write_zarr(ds, tmp_path / "t.zarr", 37)
    lazy = xr.open_zarr(tmp_path / "t.zarr", consolidated=False, chunks=None)
    assert not isinstance(lazy["topk_expert"].variable._data, np.ndarray)  # not loaded
    monkeypatch.setattr(_common, "BLOCK_TOKENS", 50)
    assert_same(expected, all_results(lazy, other))
    # a trace stored out of (sequence, position) order
    shuffled = ds.isel(token=np.random.default_rng(2).permutation(300))
    write_zarr(shuffled, tmp_path / "s.zarr", 37)
    lazy_s = xr.open_zarr(tmp_path / "s.zarr", consolidated=False, chunks=None)
    assert_same({k: expected[k] for k in ("rep", "rep_img")},
                {"rep": A.repetition_rate(lazy_s), "rep_img": A.repetition_rate(lazy_s, modality="image")})


@needs_dask
def test_zarr_dask_matches_memory(tmp_path, monkeypatch):
    """xr.open_zarr dask-backed (chunks of 37 tokens; blocks of 50 merge and split chunks)."""
    ds = random_trace(0, T=300)
    other = random_trace(1, T=300).assign(token_id=ds["token_id"])
    expected = all_results(ds, other)
    write_zarr(ds, tmp_path / "t.zarr", 37)
    lazy = xr.open_zarr(tmp_path / "t.zarr", consolidated=False)
    assert lazy["topk_expert"].chunks is not None
    monkeypatch.setattr(_common, "BLOCK_TOKENS", 50)
    got = all_results(lazy, other.chunk(token=64))
    assert_same(expected, got)
    assert got["entropy_lazy"]  # per-token entropy stays lazy on a dask-backed trace
    shuffled = ds.isel(token=np.random.default_rng(2).permutation(300))
    assert_same({"rep": expected["rep"]}, {"rep": A.repetition_rate(shuffled.chunk(token=40))})


# --------------------------------------------------------------------------- properties
def brute(ds):
    """Reference values by explicit loops over tokens."""
    e = ds["topk_expert"].values.astype(int)
    w = ds["topk_weight"].values
    seq, pos = ds["sequence"].values, ds["position"].values
    T, L, k = e.shape
    E = ds.attrs["n_experts"]
    top = np.array([[e[t, l, int(np.argmax(w[t, l]))] for l in range(L)] for t in range(T)]).reshape(T, L)
    cnt = np.zeros((L, E))
    for t in range(T):
        for l in range(L):
            for x in e[t, l]:
                cnt[l, x] += 1
    order = sorted(range(T), key=lambda t: (seq[t], pos[t]))
    pairs = [(a, b) for a, b in zip(order, order[1:]) if seq[a] == seq[b]]
    same = [sum(top[a, l] == top[b, l] for a, b in pairs) for l in range(L)]
    ov = [sum(len(set(e[a, l]) & set(e[b, l])) for a, b in pairs) for l in range(L)]
    nij = np.zeros((E, E), int)
    for t in range(T):
        s = e[t, 0]
        for x in s:
            for y in s:
                if x != y:
                    nij[x, y] += 1
    return dict(cnt=cnt, pairs=len(pairs), same=np.array(same), ov=np.array(ov), nij=nij, top=top)


@st.composite
def traces(draw):
    T = draw(st.integers(1, 40))
    L = draw(st.integers(1, 3))
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, E)))
    seed = draw(st.integers(0, 2**31 - 1))
    n_seq = draw(st.integers(1, 5))
    rng = np.random.default_rng(seed)
    e = np.argsort(rng.random((T, L, E)), axis=-1)[..., :k]
    # weights with ties sometimes
    w = rng.integers(0, 3, (T, L, k)).astype(np.float32) + 0.5
    seq = rng.integers(0, n_seq, T)
    pos = np.zeros(T, int)
    for s in np.unique(seq):
        idx = np.flatnonzero(seq == s)
        pos[idx] = rng.permutation(len(idx)) * draw(st.integers(1, 3))  # unsorted, with gaps
    lg = rng.normal(size=(T, L, E)).astype(np.float32) if draw(st.booleans()) else None
    ds = make_trace(e, w, sequence=seq, position=pos, modality=rng.integers(0, 3, T),
                    token_id=rng.integers(0, 5, T), layers=list(range(L)), n_experts=E, logits=lg)
    chunk = draw(st.integers(1, T))
    return ds, chunk


PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(traces())
def test_properties(case):
    ds, chunk = case
    T, L, k = ds["topk_expert"].shape
    E = ds.attrs["n_experts"]
    ref = brute(ds)
    f = A.expert_load(ds)
    close(f.sum("expert"), np.ones(L), atol=1e-12)
    close(A.expert_load(ds, normalize=False), ref["cnt"])
    imb = A.load_imbalance(ds)
    assert (imb["cv"] >= 0).all() and (imb["max_over_mean"] >= 1 - 1e-12).all()
    assert (imb["max_over_mean"] <= E + 1e-12).all()
    assert ((imb["load_entropy"] >= 0) & (imb["load_entropy"] <= 1 + 1e-12)).all()
    close(imb["maxvio"], imb["max_over_mean"] - 1, atol=1e-12)
    n = A.coactivation(ds, 0, counts=True).values
    assert (n == n.T).all() and (n == ref["nij"]).all()
    close(n.sum(axis=1), (k - 1) * ref["cnt"][0])
    p = A.layer_transitions(ds, 0, L - 1)
    rows = p.sum("expert_b", skipna=False).values
    used = p["n_a"].values > 0
    close(rows[used], np.ones(used.sum()), atol=1e-12)
    assert np.isnan(rows[~used]).all()
    r = A.repetition_rate(ds)
    assert int(r["n_pairs"]) == ref["pairs"]
    if ref["pairs"]:
        close(r["same_top1_rate"], ref["same"] / ref["pairs"])
        close(r["overlap"], ref["ov"] / (k * ref["pairs"]))
    if k > 1 or "router_logits" in ds:
        ent = A.router_entropy(ds)["entropy"].values
        assert ((ent >= 0) & (ent <= 1)).all()
        if "router_logits" in ds:
            x = ds["router_logits"].values.astype(np.float64)
            q = np.exp(x - x.max(-1, keepdims=True))
        else:
            q = ds["topk_weight"].values.astype(np.float64)
        q = q / q.sum(-1, keepdims=True)
        close(ent, -(q * np.log(np.where(q > 0, q, 1))).sum(-1) / np.log(E), rtol=1e-5, atol=1e-6)
    v = A.vocab_specialization(ds, min_count=1)
    close(v["share"].sum("expert"), np.ones((v.sizes["token_id"], L)), atol=1e-12)
    assert (v["score"] >= -1e-12).all()
    assert not (v["score_normalized"] > 1 + 1e-9).any()  # NaN where H(f) = 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces())
def test_chunked_equals_unchunked(case):
    """dask-backed (when installed), many blocks (block boundaries inside and across chunks)
    == in memory, one block."""
    ds, chunk = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "BLOCK_TOKENS", max(1, chunk // 2) if chunk > 1 else 1)
        got = all_results(maybe_chunk(ds, chunk))
    assert_same(all_results(ds), got)


# --------------------------------------------------------------------------- store integration
def test_commit_loads_fast_path():
    ds = trace_a()
    # per-commit counts as the trace writer writes them: commit 0 = t0..t2, commit 1 = t3..t5
    e = ds["topk_expert"].values.astype(int)
    per_commit = np.zeros((2, 2, 4), np.int32)
    for c, rows in enumerate([range(0, 3), range(3, 6)]):
        for t in rows:
            for l in range(2):
                for x in e[t, l]:
                    per_commit[c, l, x] += 1
    fast = ds.assign(expert_load=(("commit", "moe_layer", "expert"), per_commit),
                     commit_end=("commit", np.array([3, 6])))
    assert A.expert_load(fast, normalize=False).values.tolist() == [[5, 4, 3, 0], [3, 2, 3, 4]]
    # deliberately wrong commit counts are used as is (that is the fast path) ...
    wrong = fast.assign(expert_load=fast["expert_load"][:, :, [1, 0, 2, 3]])
    assert A.expert_load(wrong, normalize=False).values.tolist()[0] == [4, 5, 3, 0]
    # ... unless disabled, or when the rows do not match the commits (a token subset)
    assert A.expert_load(wrong, normalize=False, use_commit_loads=False).values.tolist()[0] == [5, 4, 3, 0]
    sub = wrong.isel(token=slice(0, 3))  # t0..t2 at layer 1: e0 3, e1 2, e2 1
    assert A.expert_load(sub, normalize=False).values.tolist()[0] == [3, 2, 1, 0]


def test_on_workbench_store(tmp_path):
    """The analyses on a trace written by the trace writer and read back with open_trace."""
    from workbench.trace import MoELayerRouting, TraceWriter, open_trace
    from workbench.trace.schema import routing_variables

    ds = trace_a()
    w = TraceWriter.create(tmp_path / "a.zarr", routing=[MoELayerRouting(1, 4, 2), MoELayerRouting(3, 4, 2)],
                           variables=routing_variables(2, 4, 2))
    for rows in (slice(0, 4), slice(4, 6)):
        part = ds.isel(token=rows)
        w.append({v: part[v].values for v in ("token_id", "sequence", "position", "modality",
                                              "topk_expert", "topk_weight")})
    w.close()
    got = open_trace(tmp_path / "a.zarr")
    close(A.expert_load(got), A.expert_load(ds))
    close(A.expert_load(got, use_commit_loads=False), A.expert_load(ds))
    close(A.load_imbalance(got, by_modality=True)["cv"], A.load_imbalance(ds, by_modality=True)["cv"])
    check_repetition(A.repetition_rate(got), repetition_expected_a(), 3)
    close(A.coactivation(got, 1), A.coactivation(ds, 1))
    close(A.layer_transitions(got, 1, 3), A.layer_transitions(ds, 1, 3))
    close(A.router_entropy(got)["mean_entropy"], A.router_entropy(ds)["mean_entropy"], rtol=1e-6)
    close(A.vocab_specialization(got, min_count=1)["score"], A.vocab_specialization(ds, min_count=1)["score"])
    close(A.domain_specialization(got, {0: "a", 1: "b", 2: "a"})["jsd"],
          A.domain_specialization(ds, {0: "a", 1: "b", 2: "a"})["jsd"])
    close(A.saturation(got, ds)["overlap"], [1.0, 1.0])


def test_router_entropy_says_what_its_probabilities_are(tmp_path):
    """The routing rule recorded in the trace decides how softmax(logits) is described."""
    from workbench.trace import open_trace
    from workbench.trace.schema import MoELayerRouting, logits_variable, routing_variables
    from workbench.trace.writer import TraceWriter

    for score, phrase in (("softmax", "the router's own distribution"), ("sigmoid", "a convention")):
        routing = [MoELayerRouting(0, 4, 1, score=score)]
        w = TraceWriter.create(tmp_path / f"{score}.zarr", routing=routing,
                               variables=routing_variables(1, 4, 1) + [logits_variable(1, 4, "float32")])
        w.append(token_id=np.arange(3), sequence=np.zeros(3, int), position=np.arange(3), modality=np.zeros(3, int),
                 topk_expert=np.zeros((3, 1, 1), int), topk_weight=np.ones((3, 1, 1)),
                 router_logits=np.array([[[0.0, 0.0, 0.0, 0.0]]] * 3, np.float32))
        w.close()
        out = A.router_entropy(open_trace(tmp_path / f"{score}.zarr"))
        assert out.attrs["routing_score"] == score and out.attrs["probabilities_are"].startswith(phrase)
        np.testing.assert_allclose(out["mean_entropy"].values, [1.0])  # uniform logits: H = log 4 / log 4
