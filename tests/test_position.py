"""Position-aware routing analyses (workbench.analysis.position): hand-computed answers on a tiny
trace written with the real TraceWriter, brute-force pure-Python references on random multi-sequence
traces (rows shuffled, sequences crossing several chunk boundaries, modality filters, tiny blocks),
and the dashboard's "by position" panel and the export figure built on them."""
from __future__ import annotations

import dataclasses
from itertools import pairwise
from math import log, sqrt

import numpy as np
import pytest

import workbench as wb
import workbench.analysis as A
from workbench.analysis import _common
from workbench.trace import TraceWriter
from workbench.trace.schema import routing_layout


def write_trace(path, experts, *, sequence, position, weights=None, modality=None, layers=(1, 3), n_experts=4,
                logits=None, chunk=None, text_only=False, chunk_bytes=None, score="sigmoid"):
    """A store written with the real writer; ``experts`` (T, L, k). ``chunk``: attention_chunk_size
    recorded in the provenance model_config (text part of a multimodal config, or flat). ``score``: the
    routing score recorded for every MoE layer (Llama 4's sigmoid by default)."""
    e = np.asarray(experts, np.int16)
    T, L, k = e.shape
    w = np.asarray(weights, np.float32) if weights is not None else np.full((T, L, k), 1.0 / k, np.float32)
    attrs = {}
    if chunk is not None:
        text = {"attention_chunk_size": chunk, "model_type": "llama4_text"}
        attrs["model_config"] = text if text_only else {"model_type": "llama4", "text_config": text}
    kw = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    layout = routing_layout(list(layers), n_experts, k, logits_dtype="float32" if logits is not None else None)
    layout["routing"] = [dataclasses.replace(r, score=score) for r in layout["routing"]]
    with TraceWriter.create(path, **layout, attrs=attrs, **kw) as wr:
        rows = {"token_id": np.arange(T, dtype=np.int32), "sequence": np.asarray(sequence, np.int32),
                "position": np.asarray(position, np.int32),
                "modality": np.asarray(modality if modality is not None else np.zeros(T), np.int8),
                "topk_expert": e, "topk_weight": w}
        if logits is not None:
            rows["router_logits"] = np.asarray(logits, np.float32)
        if "generated" in wr.variables:  # schema v3 adds a per-token prompt/generated flag
            rows["generated"] = np.zeros(T, np.int8)
        if T:
            wr.append(**rows)
    return wb.open_trace(path)


def close(a, b, tol=1e-12):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=tol, atol=tol, equal_nan=True)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(_common, "BLOCK_TOKENS", 16)


# ------------------------------------------------------------------------------ hand trace
# Two sequences, top-1 routing, E = 4, MoE layers at decoder layers 1 and 3, chunk size 4.
#   seq 0, positions 0..9, layer-1 experts: 0 0 1 1 | 2 2 2 3 | 3 0
#   seq 1, positions 0..5, layer-1 experts: 1 1 1 1 | 0 1
#   layer 3: every token on expert 3.
# The rows are stored interleaved (not in sequence order) to exercise the pair ordering.
SEQ0 = [0, 0, 1, 1, 2, 2, 2, 3, 3, 0]
SEQ1 = [1, 1, 1, 1, 0, 1]


def hand_rows():
    rows = [(0, p, x) for p, x in enumerate(SEQ0)] + [(1, p, x) for p, x in enumerate(SEQ1)]
    order = [0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15, 6, 7, 8, 9]
    return [rows[i] for i in order]


@pytest.fixture
def hand(tmp_path):
    rows = hand_rows()
    experts = [[[x], [3]] for _, _, x in rows]
    return write_trace(tmp_path / "h.zarr", experts, sequence=[s for s, _, _ in rows],
                       position=[p for _, p, _ in rows], chunk=4)


def test_load_by_position_hand(hand):
    n = A.load_by_position(hand, bucket=4, normalize=False)
    assert n.dims == ("bucket", "moe_layer", "expert")
    assert n["position_start"].values.tolist() == [0, 4, 8] and n["position_stop"].values.tolist() == [4, 8, 12]
    # [0,4): seq0 0 0 1 1, seq1 1 1 1 1; [4,8): seq0 2 2 2 3, seq1 0 1; [8,12): seq0 3 0
    assert n.isel(moe_layer=0).values.tolist() == [[2, 6, 0, 0], [1, 1, 3, 1], [1, 0, 0, 1]]
    assert n.isel(moe_layer=1).values.tolist() == [[0, 0, 0, 8], [0, 0, 0, 6], [0, 0, 0, 2]]
    assert n["n_tokens"].values.tolist() == [8, 6, 2]
    f = A.load_by_position(hand, bucket=4, layer=1)
    assert f.dims == ("bucket", "expert") and int(f["layer"]) == 1
    close(f, [[2 / 8, 6 / 8, 0, 0], [1 / 6, 1 / 6, 3 / 6, 1 / 6], [.5, 0, 0, .5]])
    # default log2 buckets: [0,1) [1,2) [2,4) [4,8) [8,16)
    g = A.load_by_position(hand, layer=1, normalize=False)
    assert g["position_start"].values.tolist() == [0, 1, 2, 4, 8]
    assert g.values.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 4, 0, 0], [1, 1, 3, 1], [1, 0, 0, 1]]
    # explicit edges: tokens outside are left out and counted
    h = A.load_by_position(hand, bucket=[2, 5, 9], layer=1, normalize=False)
    # [2,5): seq0 1 1 2, seq1 1 1 0; [5,9): seq0 2 2 3 3, seq1 1
    assert h.values.tolist() == [[1, 4, 1, 0], [0, 1, 2, 2]]
    assert h.attrs["n_outside"] == 16 - 11
    # "chunk": one bucket per attention chunk (width 4 here)
    assert A.load_by_position(hand, bucket="chunk", layer=1, normalize=False).values.tolist() == n.isel(
        moe_layer=0).values.tolist()


def test_entropy_by_position_hand(hand):
    out = A.entropy_by_position(hand, bucket=4, layer=1)
    h0 = -(.25 * log(.25) + .75 * log(.75)) / log(4)
    h1 = -(3 * (1 / 6) * log(1 / 6) + .5 * log(.5)) / log(4)
    close(out["load_entropy"], [h0, h1, 0.5])
    assert "mean_entropy" not in out  # top-1 routing without logits: no per-token distribution
    assert "not computed" in out.attrs["mean_entropy"]
    close(A.entropy_by_position(hand, bucket=4, layer=3)["load_entropy"], [0, 0, 0])
    with pytest.raises(ValueError, match="undefined"):
        A.entropy_by_position(hand, source="scores")


def test_entropy_results_say_what_the_probabilities_are(tmp_path):
    """entropy_by_position and by_chunk_offset carry router_entropy's routing_score / probabilities_are."""
    rng = np.random.default_rng(3)
    T = 10
    kw = dict(sequence=np.zeros(T), position=np.arange(T), chunk=4,
              logits=rng.normal(size=(T, 2, 4)))
    experts = np.stack([rng.permutation(4)[:2] for _ in range(2 * T)]).reshape(T, 2, 2)
    for score, phrase in (("sigmoid", "a convention: the model scores experts with a sigmoid"),
                          ("softmax", "the router's own distribution")):
        ds = write_trace(tmp_path / f"{score}.zarr", experts, score=score, **kw)
        ref = A.router_entropy(ds, per_token=False).attrs
        assert ref["routing_score"] == score and ref["probabilities_are"].startswith(phrase)
        for out in (A.entropy_by_position(ds), A.entropy_by_position(ds, layer=3, bucket=2), A.by_chunk_offset(ds)):
            assert out.attrs["probabilities"] == "softmax(logits)"
            assert out.attrs["routing_score"] == score
            assert out.attrs["probabilities_are"] == ref["probabilities_are"]
        # the applied scores are what the model applies: no caveat, as router_entropy(source="scores")
        scores = A.entropy_by_position(ds, source="scores")
        assert scores.attrs["routing_score"] == score and "probabilities_are" not in scores.attrs
        assert "probabilities_are" not in A.router_entropy(ds, source="scores", per_token=False).attrs
        # no router entropy computed: nothing to qualify
        none = A.by_chunk_offset(ds, source=None)
        assert "routing_score" not in none.attrs and "probabilities_are" not in none.attrs


def test_same_expert_rate_by_position_hand(hand):
    out = A.same_expert_rate_by_position(hand, bucket=4, layer=1)
    # pairs by the later token's position: [0,4) 5 of 6, [4,8) 2 of 6, [8,12) 1 of 2
    close(out["same_top1_rate"], [5 / 6, 2 / 6, 1 / 2])
    assert out["n_pairs"].values.tolist() == [6, 6, 2]
    close(out["overlap"], out["same_top1_rate"])  # k = 1
    close(out["same_top1_baseline"], [(2 / 8) ** 2 + (6 / 8) ** 2, 3 / 36 + 1 / 4, 0.5])
    close(A.same_expert_rate_by_position(hand, bucket=4, layer=3)["same_top1_rate"], [1, 1, 1])


def test_by_chunk_offset_hand(hand):
    out = A.by_chunk_offset(hand, bucket=1, layer=1)
    assert out.attrs["chunk_size"] == 4
    assert out["offset_start"].values.tolist() == [0, 1, 2, 3]
    # tokens at offset 0: seq0 pos 0,4,8 (0, 2, 3), seq1 pos 0,4 (1, 0)
    close(out["load_share"].isel(bucket=0), [2 / 5, 1 / 5, 1 / 5, 1 / 5])
    assert out["n_tokens"].values.tolist() == [5, 5, 3, 3]
    close(out["same_top1_rate"], [1 / 3, 3 / 5, 2 / 3, 2 / 3])
    assert out["n_pairs"].values.tolist() == [3, 5, 3, 3]
    # edge pairs (p_t-1 // 4 != p_t // 4): seq0 pos 4 (1->2), pos 8 (3->3), seq1 pos 4 (1->0)
    assert out["pair_kind"].values.tolist() == ["inside", "edge"]
    assert out["jump_n_pairs"].values.tolist() == [11, 3]
    assert out["jump_n_same_top1"].values.tolist() == [7, 1]
    close(out["jump_same_top1_rate"], [7 / 11, 1 / 3])
    close(out["jump_difference"], 1 / 3 - 7 / 11)
    r = 8 / 14
    close(out["jump_z"], (1 / 3 - 7 / 11) / sqrt(r * (1 - r) * (1 / 3 + 1 / 11)))
    # chunk_size= overrides the provenance; log2 offset buckets are capped at the chunk size
    six = A.by_chunk_offset(hand, chunk_size=6, layer=1)
    assert six["offset_start"].values.tolist() == [0, 1, 2, 4] and six["offset_stop"].values.tolist() == [1, 2, 4, 6]
    # chunk 6: edge pairs seq0 pos 6 (2->2): one, same
    assert six["jump_n_pairs"].values.tolist() == [13, 1] and six["jump_n_same_top1"].values.tolist() == [7, 1]
    assert np.isnan(six["jump_z"]).all() or np.isfinite(six["jump_z"]).all()
    # every pair inside one chunk: edge counts are 0, rate NaN
    big = A.by_chunk_offset(hand, chunk_size=64, layer=1)
    assert big["jump_n_pairs"].values.tolist() == [14, 0]
    assert np.isnan(float(big["jump_same_top1_rate"].sel(pair_kind="edge")))
    assert np.isnan(float(big["jump_z"]))


def test_chunk_size_from_provenance(tmp_path):
    e = [[[0]], [[1]], [[1]]]
    kw = {"sequence": [0, 0, 0], "position": [0, 1, 2], "layers": (0,)}
    flat = write_trace(tmp_path / "flat.zarr", e, chunk=2, text_only=True, **kw)
    assert A.by_chunk_offset(flat, bucket=1).attrs["chunk_size"] == 2
    none = write_trace(tmp_path / "none.zarr", e, **kw)
    with pytest.raises(ValueError, match="chunk_size="):
        A.by_chunk_offset(none)
    with pytest.raises(ValueError, match="chunk_size="):
        A.load_by_position(none, bucket="chunk")
    out = A.by_chunk_offset(none, chunk_size=2, bucket=1)
    assert out["jump_n_pairs"].values.tolist() == [1, 1]  # pos 1 inside, pos 2 straddles
    for bad, exc in ((0, ValueError), (2.0, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="chunk_size"):
            A.by_chunk_offset(none, chunk_size=bad)


def test_layer_is_a_decoder_index_and_bad_buckets(hand, monkeypatch):
    for fn in (A.load_by_position, A.entropy_by_position, A.same_expert_rate_by_position, A.by_chunk_offset):
        with pytest.raises(ValueError, match=r"decoder layer 2 is not a MoE layer.*\[1, 3\]"):
            fn(hand, layer=2)
        with pytest.raises(TypeError, match="layer must be a decoder layer index"):
            fn(hand, layer=1.0)
    for bad, exc, msg in ((0, ValueError, "width"), ([3, 3], ValueError, "increasing"), ([4], ValueError, "two"),
                          ("lin", ValueError, "log2"), (2.5, TypeError, "bucket"), ([0, 1.5], TypeError, "ints")):
        with pytest.raises(exc, match=msg):
            A.load_by_position(hand, bucket=bad)
    from workbench.analysis import position

    monkeypatch.setattr(position, "MAX_CELLS", 64)  # 2 layers x 4 experts: at most 8 buckets
    assert A.load_by_position(hand, bucket=2).sizes["bucket"] == 5
    with pytest.raises(ValueError, match="counters"):
        A.load_by_position(hand, bucket=1)
    assert A.load_by_position(hand, bucket=1, layer=1).sizes["bucket"] == 10  # one layer: 10 x 4 cells


def test_empty_trace(tmp_path):
    ds = write_trace(tmp_path / "e.zarr", np.zeros((0, 2, 2)), sequence=[], position=[], chunk=4)
    f = A.load_by_position(ds)
    assert f.sizes["bucket"] == 1 and np.isnan(f.values).all()
    out = A.by_chunk_offset(ds)
    assert out["jump_n_pairs"].values.tolist() == [0, 0]


# ------------------------------------------------------------------------------ brute force
def reference(pos, seq, mod, experts, weights, logits, edges, E, k, chunk=None, offsets=False, code=None):
    """Plain-Python loops over tokens and pairs."""
    T, L = len(pos), experts.shape[1]
    B = len(edges) - 1
    value = [p % chunk if offsets else p for p in pos]

    def bucket(v):
        for b in range(B):
            if edges[b] <= v < edges[b + 1]:
                return b
        return -1

    sel = [code is None or mod[t] == code for t in range(T)]
    counts = np.zeros((B, L, E))
    top1c = np.zeros((B, L, E))
    ntok = np.zeros(B)
    hsum = np.zeros((B, L))
    for t in range(T):
        b = bucket(value[t])
        if not sel[t] or b < 0:
            continue
        ntok[b] += 1
        for li in range(L):
            for j in range(k):
                counts[b, li, experts[t, li, j]] += 1
            top = experts[t, li, max(range(k), key=lambda j: (weights[t, li, j], -j))]
            top1c[b, li, top] += 1
            if logits is not None:
                z = logits[t, li].astype(np.float64)
                p = np.exp(z - z.max())
                p /= p.sum()
                hsum[b, li] += -sum(x * log(x) for x in p if x > 0) / log(E)
    # consecutive pairs per sequence, in position order
    same = np.zeros((B, 2, L))
    inter = np.zeros((B, 2, L))
    npairs = np.zeros((B, 2))
    for s in set(seq):
        rows = sorted((t for t in range(T) if seq[t] == s), key=lambda t: pos[t])
        for a, b_ in pairwise(rows):
            if not (sel[a] and sel[b_]):
                continue
            b = bucket(value[b_])
            if b < 0:
                continue
            kind = int(chunk is not None and pos[a] // chunk != pos[b_] // chunk)
            npairs[b, kind] += 1
            for li in range(L):
                ta = experts[a, li, max(range(k), key=lambda j: (weights[a, li, j], -j))]
                tb = experts[b_, li, max(range(k), key=lambda j: (weights[b_, li, j], -j))]
                same[b, kind, li] += ta == tb
                inter[b, kind, li] += len(set(experts[a, li].tolist()) & set(experts[b_, li].tolist()))
    with np.errstate(invalid="ignore", divide="ignore"):
        f = counts / (k * ntok[:, None, None])
        g = top1c / ntok[:, None, None]
        ent = np.where(f > 0, -f * np.log(np.where(f > 0, f, 1)), 0).sum(-1) / log(E)
        ent = np.where(ntok[:, None] > 0, ent, np.nan)
        P = npairs.sum(1)
        return {"counts": counts, "share": f, "ntok": ntok, "load_entropy": ent,
                "mean_entropy": hsum / ntok[:, None],
                "same_top1_rate": same.sum(1) / P[:, None], "overlap": inter.sum(1) / (k * P[:, None]),
                "same_top1_baseline": np.where(ntok[:, None] > 0, (g ** 2).sum(-1), np.nan),
                "overlap_baseline": np.where(ntok[:, None] > 0, k * (f ** 2).sum(-1), np.nan),
                "n_pairs": P, "kind_pairs": npairs.sum(0), "kind_same": same.sum(0),
                "kind_rate": same.sum(0) / npairs.sum(0)[:, None],
                "kind_overlap": inter.sum(0) / (k * npairs.sum(0)[:, None])}


def random_trace(path, seed):
    """3-5 sequences of 1-40 tokens (some with position gaps), rows shuffled, k = 2, E = 5, 3 MoE layers,
    chunk size 3-8: sequences cross several chunk boundaries."""
    rng = np.random.default_rng(seed)
    E, k, L = 5, 2, 3
    seq, pos = [], []
    for s in range(int(rng.integers(3, 6))):
        n = int(rng.integers(1, 41))
        p = np.arange(n) if rng.random() < 0.7 else np.sort(rng.choice(60, n, replace=False))
        seq += [s] * n
        pos += p.tolist()
    T = len(seq)
    order = rng.permutation(T)
    seq, pos = np.asarray(seq)[order], np.asarray(pos)[order]
    mod = rng.integers(0, 3, T)
    experts = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    # a bias towards expert 0 deep in the context, so the buckets differ
    experts[pos > 20, 0, 0] = np.where(experts[pos > 20, 0, 1] == 0, experts[pos > 20, 0, 0], 0)
    weights = rng.random((T, L, k)).astype(np.float32)
    weights[rng.random((T, L)) < 0.2] = 0.5  # ties: first slot wins
    logits = rng.normal(size=(T, L, E)).astype(np.float32)
    chunk = int(rng.integers(3, 9))
    ds = write_trace(path, experts, weights=weights, sequence=seq, position=pos, modality=mod, layers=(1, 3, 5),
                     n_experts=E, logits=logits, chunk=chunk, chunk_bytes=256)
    return ds, {"pos": pos.tolist(), "seq": seq.tolist(), "mod": mod.tolist(), "experts": experts,
                "weights": weights, "logits": logits, "E": E, "k": k, "chunk": chunk}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("code", [None, 0])
def test_against_brute_force(tmp_path, small_blocks, seed, code):
    ds, d = random_trace(tmp_path / "r.zarr", seed)
    E, k, chunk = d["E"], d["k"], d["chunk"]
    ref_kw = {"pos": d["pos"], "seq": d["seq"], "mod": d["mod"], "experts": d["experts"], "weights": d["weights"],
              "logits": d["logits"], "E": E, "k": k, "code": code}
    for bucket, edges in (("log2", [0, 1, 2, 4, 8, 16, 32, 64]), (5, list(range(0, 65, 5))),
                          ([3, 7, 30], [3, 7, 30]), ("chunk", list(range(0, 60 + 2 * chunk, chunk)))):
        got_f = A.load_by_position(ds, bucket=bucket, modality=code, normalize=False)
        B = got_f.sizes["bucket"]
        edges = edges[:B + 1]
        assert got_f["position_start"].values.tolist() == edges[:-1]
        ref = reference(edges=edges, chunk=chunk, **ref_kw)
        np.testing.assert_array_equal(got_f.values, ref["counts"])
        np.testing.assert_array_equal(got_f["n_tokens"].values, ref["ntok"])
        close(A.load_by_position(ds, bucket=bucket, modality=code), ref["share"])
        ent = A.entropy_by_position(ds, bucket=bucket, modality=code)
        close(ent["load_entropy"], ref["load_entropy"])
        close(ent["mean_entropy"], ref["mean_entropy"], tol=1e-5)  # float32 per-token entropies
        rate = A.same_expert_rate_by_position(ds, bucket=bucket, modality=code)
        for key in ("same_top1_rate", "overlap", "same_top1_baseline", "overlap_baseline", "n_pairs"):
            close(rate[key], ref[key])
    log2 = [0] + [x for x in (1, 2, 4, 8) if x < chunk] + [chunk]  # doubling edges, the last capped at c
    for bucket, edges in (("log2", log2), (1, list(range(chunk + 1))), (2, list(range(0, chunk, 2)) + [chunk])):
        got = A.by_chunk_offset(ds, bucket=bucket, modality=code)
        assert got["offset_stop"].values.tolist() == edges[1:]
        ref = reference(edges=edges, chunk=chunk, offsets=True, **ref_kw)
        close(got["load_share"], ref["share"])
        close(got["load_entropy"], ref["load_entropy"])
        close(got["mean_entropy"], ref["mean_entropy"], tol=1e-5)
        for key in ("same_top1_rate", "overlap", "same_top1_baseline", "overlap_baseline", "n_pairs"):
            close(got[key], ref[key])
        np.testing.assert_array_equal(got["jump_n_pairs"].values, ref["kind_pairs"])
        np.testing.assert_array_equal(got["jump_n_same_top1"].values, ref["kind_same"])
        close(got["jump_same_top1_rate"], ref["kind_rate"])
        close(got["jump_overlap"], ref["kind_overlap"])
    # one layer = that layer's slice of the all-layers result
    full = A.by_chunk_offset(ds, modality=code)
    one = A.by_chunk_offset(ds, modality=code, layer=5)
    for key in ("load_share", "same_top1_rate", "mean_entropy", "jump_same_top1_rate", "jump_z"):
        close(one[key], full[key].isel(moe_layer=2))
    assert int(one["layer"]) == 5 and "moe_layer" not in one.dims


def test_pairs_agree_with_repetition_rate(tmp_path):
    """Summed over buckets, the pair counts are repetition_rate's (same pairs, same top-1 rule)."""
    ds, _ = random_trace(tmp_path / "r.zarr", 11)
    rate = A.same_expert_rate_by_position(ds, bucket=4)
    rep = A.repetition_rate(ds)
    assert int(rate["n_pairs"].sum()) == int(rep["n_pairs"])
    pooled = (rate["same_top1_rate"] * rate["n_pairs"]).sum("bucket") / rate["n_pairs"].sum()
    close(pooled, rep["same_top1_rate"])


def test_a_recorded_long_sequence_crosses_chunks(tmp_path):
    """A real recording (embedded-style tiny model, chunked attention): the chunk size comes from the
    recorder's provenance and every position bucket / chunk offset is accounted for."""
    import torch

    from tests.hf_reference import hf_text_model

    d = tmp_path / "m"
    hf_text_model(seed=3, interleave_moe_layer_step=2).save_pretrained(d)
    model = wb.load_model(d, progress=False)
    c = int(model.config.attention_chunk_size)
    n = 2 * c + 5
    ids = torch.randint(3, 200, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), wb.record(model, tmp_path / "t.zarr"):
        model(input_ids=ids)
    ds = wb.open_trace(tmp_path / "t.zarr")
    out = A.by_chunk_offset(ds, bucket=1)
    assert out.attrs["chunk_size"] == c
    assert int(out["n_tokens"].sum()) == 2 * n
    assert out["jump_n_pairs"].values.tolist() == [2 * (n - 1) - 4, 4]  # two boundaries per sequence
    f = A.load_by_position(ds, bucket=c, normalize=False)
    assert f["n_tokens"].values.tolist() == [2 * c, 2 * c, 10]


# ------------------------------------------------------------------------------ dashboard, export
def test_dashboard_position_panel(tmp_path):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    pytest.importorskip("anywidget")
    from workbench.widgets import ExpertLoadDashboard

    ds, d = random_trace(tmp_path / "r.zarr", 3)
    path = tmp_path / "r.zarr"
    dash = ExpertLoadDashboard(path, layer=3)
    assert dash.position_data is None and dash.position_box.children == ()  # nothing computed until shown
    dash.w_position.value = True
    assert dash.position_box.children == (dash.position.widget,)
    want = A.load_by_position(ds, layer=3)
    close(dash.position.data[0].z, want.values)
    assert list(dash.position.data[0].y)[:4] == ["0", "1", "2\u20133", "4\u20137"]
    rate = A.same_expert_rate_by_position(ds, layer=3)
    close(dash.position.data[1].x, rate["same_top1_rate"])
    close(dash.position.data[2].x, rate["same_top1_baseline"])
    assert dash.position.layout.title.text.startswith("By position, layer 3 (")
    dash.layer = 5  # follows the layer slider
    close(dash.position.data[0].z, A.load_by_position(ds, layer=5).values)
    dash.w_modality.value = 1  # and the token filter
    close(dash.position.data[1].x, A.same_expert_rate_by_position(ds, layer=5, modality=1)["same_top1_rate"])
    dash.w_seq.value = (1, 2)  # and the sequence range
    keep = ds.isel(token=np.flatnonzero((np.asarray(d["seq"]) >= 1) & (np.asarray(d["seq"]) <= 2)))
    close(dash.position.data[0].z, A.load_by_position(keep, layer=5, modality=1).values)
    dash.w_position.value = False
    assert dash.position_box.children == ()
    width = ExpertLoadDashboard(path, by_position=True, position_bucket=8)
    assert width.position_values()["labels"][:2] == ["0\u20137", "8\u201315"]
    b = width._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in b


def test_export_position_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from workbench.export import figures as F

    ds, _ = random_trace(tmp_path / "r.zarr", 4)
    fig = F.plot_position(ds)
    titles = " ".join(ax.get_title(loc="left") for ax in fig.axes)
    assert "position" in titles and "chunk" in titles
    paths = F.save_figure(fig, tmp_path / "out" / "position", {"trace": "r"}, title="t", description="d")
    assert [p.suffix for p in paths] == [".pdf", ".svg", ".png"] and all(p.stat().st_size > 0 for p in paths)
    one = F.plot_position(ds, layer=3)
    assert "layer 3" in " ".join(ax.get_title(loc="left") for ax in one.axes)
    from workbench.export import ExportError

    with pytest.raises(ExportError, match=r"\[1, 3, 5\]"):
        F.plot_position(ds, layer=2)
    # without a chunk size the chunk-edge panel is left out, not an error
    plain = write_trace(tmp_path / "p.zarr", [[[0]], [[1]]], sequence=[0, 0], position=[0, 1], layers=(0,))
    fig = F.plot_position(plain)
    assert "chunk" not in " ".join(ax.get_title(loc="left") for ax in fig.axes)
