"""Cross-modal attention capture: recorded text -> patch probabilities vs transformers' eager attention.

Real tiny multimodal checkpoints on disk, real zarr stores, the kernels against a dense float64
reference, and the Triton kernel under TRITON_INTERPRET=1 in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from tests.hf_reference import IMAGE_TOKEN, TOKENS_PER_TILE, hf_multimodal_model, hf_text_model
from workbench.hooks import RecorderError, hook_points
from workbench.hooks import AttentionCapture
from workbench.trace import AttentionNotFoundError, attention_sequences
from workbench.kernels.attention_map import (cross_attention_probs, cross_attention_probs_from_lse,
                                             cross_attention_probs_reference, sdpa_with_lse)
from workbench.runtime import ForwardBatch



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test so other modules (kernel gradients) are unaffected."""
    with torch.no_grad():
        yield
ROOT = Path(__file__).resolve().parents[1]


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm")
    hf = hf_multimodal_model(seed=5)
    hf.save_pretrained(d)
    model = wb.load_model(d, progress=False)
    # the default tiny config: layers 0-2 chunked RoPE (chunk 8), layer 3 global NoPE with temperature
    assert [l.self_attn.use_rope for l in model.language_model.model.layers] == [True, True, True, False]
    return hf, model


def _text(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt(tiles, text_lens, seed=0):
    """[bos] text (image text)* [eos]: images as runs of <|patch|> of `tiles` tiles each."""
    ids = [1] + _text(text_lens[0], seed)
    for k, (n, tl) in enumerate(zip(tiles, text_lens[1:])):
        ids += [IMAGE_TOKEN] * (n * TOKENS_PER_TILE) + _text(tl, seed + k + 1)
    return ids + [2]


def pixels(n_tiles, seed):
    return torch.randn(n_tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def hf_attentions(hf, ids, px):
    """transformers' eager attention probabilities (L, H, T, T) of one unpadded sequence."""
    ids = torch.tensor([ids])
    feats = hf.get_image_features(pixel_values=px, return_dict=True).last_hidden_state
    proj = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    emb = hf.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], proj)
    out = hf.language_model(inputs_embeds=emb, output_attentions=True, return_dict=True)
    return torch.stack(out.attentions)[:, 0].double()


def expected_queries(ids):
    ids = np.asarray(ids)
    first = np.flatnonzero(ids == IMAGE_TOKEN)[0]
    return np.flatnonzero((ids != IMAGE_TOKEN) & (np.arange(len(ids)) > first))


# 35 tokens (> 4 chunks of 8): a 1-tile and a 3-tile image
P0, TILES0 = prompt([1, 3], [4, 5, 8], seed=0), [1, 3]
# 20 tokens, a 2-tile image
P1, TILES1 = prompt([2], [3, 8], seed=10), [2]
P_TEXT = [1] + _text(9, 20) + [2]


def test_recorded_maps_equal_transformers(mm, tmp_path):
    hf, model = mm
    px = pixels(sum(TILES0), 1)
    ids = torch.tensor([P0])
    plain = model(input_ids=ids, pixel_values=px).logits
    with wb.record(model, tmp_path / "t.zarr", capture=[AttentionCapture(dtype="float32")]):
        recorded = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(plain, recorded)  # the layer output is untouched by the capture
    att = wb.open_attention(tmp_path / "t.zarr", sequence=0)
    q, p = expected_queries(P0), np.flatnonzero(np.asarray(P0) == IMAGE_TOKEN)
    assert att.dims == ("layer", "head", "query", "patch") and att.dtype == np.float32
    assert att.shape == (4, 4, len(q), 16)
    np.testing.assert_array_equal(att["layer"].values, [0, 1, 2, 3])
    np.testing.assert_array_equal(att["head"].values, [0, 1, 2, 3])
    np.testing.assert_array_equal(att["query_token"].values, q)  # one sequence: token index == buffer index
    np.testing.assert_array_equal(att["query_position"].values, q)
    np.testing.assert_array_equal(att["patch_token"].values, p)
    np.testing.assert_array_equal(att["image"].values, [0] * 4 + [1] * 12)
    np.testing.assert_array_equal(att["tile"].values, [0] * 4 + [0] * 4 + [1] * 4 + [2] * 4)
    np.testing.assert_array_equal(att["row"].values, np.tile([0, 0, 1, 1], 4))
    np.testing.assert_array_equal(att["col"].values, np.tile([0, 1, 0, 1], 4))

    ref = hf_attentions(hf, P0, px)[:, :, q][:, :, :, p]
    got = torch.from_numpy(att.values).double()
    for layer in range(4):  # chunked RoPE layers 0-2 and the NoPE layer 3, each within 1e-5
        assert rel_err(got[layer], ref[layer]) <= 1e-5, f"layer {layer}"
    # chunking is visible: on RoPE layers, text after the image chunk sees none of its patches
    far = att["query_position"].values // 8 > (p.max() // 8)
    assert far.any() and (att.values[:3][:, :, far] == 0).all() and (att.values[3][:, far] > 0).all()

    # the coordinates join with the token table
    ds = wb.open_trace(tmp_path / "t.zarr")
    np.testing.assert_array_equal(ds["token_id"].values[att["query_token"].values], np.asarray(P0)[q])
    assert (ds["modality"].values[att["patch_token"].values] == 1).all()
    assert (ds["modality"].values[att["query_token"].values] != 1).all()


def test_padded_batch_equals_each_sequence_alone(mm, tmp_path):
    hf, model = mm
    seqs = [P1, P_TEXT, P0]
    T = max(map(len, seqs))
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding
        ids[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s), 1
    px1, px0 = pixels(sum(TILES1), 2), pixels(sum(TILES0), 1)
    with wb.record(model, tmp_path / "pad.zarr", capture={"router": {}, "attention": {"dtype": "float32"}}):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([px1, px0]))
    path = tmp_path / "pad.zarr"
    assert attention_sequences(path) == [0, 2]  # the text-only sequence has no group
    ds = wb.open_trace(path)
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    for n, (s, px) in {0: (P1, px1), 2: (P0, px0)}.items():
        att = wb.open_attention(path, sequence=n)
        q, p = expected_queries(s), np.flatnonzero(np.asarray(s) == IMAGE_TOKEN)
        np.testing.assert_array_equal(att["query_token"].values, starts[n] + q)  # padding is not on the token dim
        np.testing.assert_array_equal(att["patch_token"].values, starts[n] + p)
        np.testing.assert_array_equal(att["query_position"].values, q)
        assert (ds["sequence"].values[att["query_token"].values] == n).all()
        # transformers derives the NoPE temperature from the buffer index: compare with it run alone
        ref = hf_attentions(hf, s, px)[:, :, q][:, :, :, p]
        assert rel_err(att.values, ref) <= 1e-5, f"sequence {n}"
    with pytest.raises(AttentionNotFoundError, match=r"sequence 1 .*without image patch.*available sequences: 0, 2"):
        wb.open_attention(path, sequence=1)


def test_float16_mean_heads_and_layer_subset(mm, tmp_path):
    hf, model = mm
    px = pixels(sum(TILES0), 1)
    ids = torch.tensor([P0])
    # the query/key/log-sum-exp the layers use, read at the hook points (float32 kernel output for the round trip)
    qk = {}
    handles = [p.add(lambda p, query, key, scale, lse, batch, keys: qk.setdefault(
        p.name, (query.clone(), key.clone(), scale, lse.clone(), batch.positions[0].clone())))
        for _, p in hook_points(model, "hook_attn_lse")]
    try:
        model(input_ids=ids, pixel_values=px)
    finally:
        for h in handles:
            h.remove()
    with wb.record(model, tmp_path / "m.zarr", capture=[AttentionCapture(heads="mean", layers=[3, 1])]):
        model(input_ids=ids, pixel_values=px)
    with wb.record(model, tmp_path / "h.zarr", capture=[AttentionCapture(heads=[3, 1], dtype="float32")]):
        model(input_ids=ids, pixel_values=px)
    att = wb.open_attention(tmp_path / "m.zarr", sequence=0)
    assert att.dtype == np.float16 and att.shape[:2] == (2, 1) and att.attrs["head_mean"] is True
    assert att["head"].attrs["head_mean"] is True
    np.testing.assert_array_equal(att["layer"].values, [1, 3])
    np.testing.assert_array_equal(att["head"].values, [-1])
    q, p = torch.from_numpy(expected_queries(P0)), torch.from_numpy(np.flatnonzero(np.asarray(P0) == IMAGE_TOKEN))
    for i, layer in enumerate([1, 3]):
        query, key, scale, lse, pos = qk[f"language_model.model.layers.{layer}.self_attn.hook_attn_lse"]
        kw = dict(query_index=q, key_index=p, positions=pos, chunk_size=8 if layer < 3 else None, heads="mean")
        k32 = cross_attention_probs_from_lse(query[0], key[0], scale, lse[0], **kw)
        np.testing.assert_array_equal(att.values[i], k32.half().numpy())  # float16 round trip, exact
        # the layer's log-sum-exp and the kernel's own (blockwise) one give the same probabilities
        assert rel_err(cross_attention_probs(query[0], key[0], scale, **kw), k32) <= 1e-6
    ref = hf_attentions(hf, P0, px)[:, :, q][:, :, :, p]
    np.testing.assert_allclose(att.values.astype(np.float64), ref[[1, 3]].mean(1, keepdim=True).numpy(),
                               rtol=1e-3, atol=1e-6)
    sub = wb.open_attention(tmp_path / "h.zarr", sequence=0)
    np.testing.assert_array_equal(sub["head"].values, [3, 1])
    assert rel_err(sub.values, ref[:, [3, 1]]) <= 1e-5


def test_interrupted_write_is_ignored_and_errors_are_clear(mm, tmp_path):
    hf, model = mm
    path = tmp_path / "two.zarr"
    with wb.record(model, path, capture=("attention",)):
        model(input_ids=torch.tensor([P0]), pixel_values=pixels(sum(TILES0), 1))
        model(input_ids=torch.tensor([P1]), pixel_values=pixels(sum(TILES1), 2))
    assert attention_sequences(path) == [0, 1]
    # a writer killed between the arrays and the marker leaves a group without "complete"
    zj = path / "attention" / "seq_000001" / "zarr.json"
    meta = json.loads(zj.read_text())
    del meta["attributes"]["complete"]
    zj.write_text(json.dumps(meta))
    assert attention_sequences(path) == [0]
    with pytest.raises(AttentionNotFoundError, match="sequence 1 .*incomplete.*available sequences: 0"):
        wb.open_attention(path, sequence=1)
    assert wb.open_attention(path, sequence=0).shape[-1] == 16

    router_only = tmp_path / "r.zarr"
    with wb.record(model, router_only):
        model(input_ids=torch.tensor([P0]), pixel_values=pixels(sum(TILES0), 1))
    with pytest.raises(AttentionNotFoundError, match="holds no attention maps"):
        wb.open_attention(router_only, sequence=0)
    with pytest.raises(FileNotFoundError):
        wb.open_attention(tmp_path / "nowhere.zarr", sequence=0)

    for kw, match in [(dict(layers=[7]), r"attention layers \[7\]"),
                      (dict(heads="max"), "attention heads"),
                      (dict(heads=[4]), "out of range"),
                      (dict(dtype="bfloat16"), "attention dtype"),
                      (dict(size=3), r"capture 'attention': .*size.* \(its options: \['layers', 'heads', 'dtype'\]\)")]:
        with pytest.raises(RecorderError, match=match):
            wb.record(model, tmp_path / "bad.zarr", capture={"attention": kw})
        assert not (tmp_path / "bad.zarr").exists()  # rejected before the store is created
    with pytest.raises(RecorderError, match="needs workbench's Llama 4 model"):
        wb.record(hf, tmp_path / "bad.zarr", capture=("attention",))
    text_only = hf_text_model(seed=0)
    text_only.save_pretrained(tmp_path / "txt")
    with pytest.raises(RecorderError, match="multimodal model"):
        wb.record(wb.load_model(tmp_path / "txt", progress=False), tmp_path / "bad.zarr", capture=("attention",))


CASES = [  # (dtype, chunk, left padding, heads)
    ("float32", 8, 5, "all"),
    ("float32", None, 0, "mean"),
    ("bfloat16", 8, 0, [3, 0]),
    ("float16", None, 5, "all"),
]


@pytest.mark.parametrize("dtype,chunk,pad,heads", CASES)
def test_torch_kernel_matches_dense_float64_reference(dtype, chunk, pad, heads):
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, D = 45, 4, 2, 16
    # large scores (x6): the online softmax must stay exact without overflow
    q = (torch.randn(Hq, T, D, generator=g) * 6).to(getattr(torch, dtype))
    k = (torch.randn(Hkv, T, D, generator=g) * 6).to(getattr(torch, dtype))
    mask = torch.ones(T, dtype=torch.long)
    mask[:pad] = 0
    pos = (mask.cumsum(0) - 1).clamp(min=0) * mask
    # key layouts: interleaved with the queries; contiguous runs (image-like: the columns of each
    # row form one range, blocks carry it); unsorted and with padding keys (the general masked path)
    layouts = [([i for i in range(pad, T) if i % 3], [i for i in range(pad, T) if i % 3 == 0]),
               ([i for i in range(pad, T) if not 10 <= i < 20 and not 30 <= i < 36],
                [i for i in range(pad, T) if 10 <= i < 20 or 30 <= i < 36]),
               ([i for i in range(pad, T) if i % 3], [0, 44, 3, 9, 1, 27, 30, 6][: 8 if pad else 6])]
    for qi, ki in layouts:
        _check_torch_kernel(q, k, torch.tensor(qi), torch.tensor(ki), pos, mask, chunk, heads)


def _check_torch_kernel(q, k, qi, ki, pos, mask, chunk, heads):
    ref = cross_attention_probs_reference(q, k, 0.25, query_index=qi, key_index=ki, positions=pos,
                                          valid=mask.bool(), chunk_size=chunk, heads=heads)
    # fused: aten's CPU flash attention gives the row log-sum-exp; else the plain-torch online softmax
    for fused in (True, False):
        # one block, many blocks, single rows, tiny working memory (mask sub-blocks of a few keys)
        for bq, bk, nbytes in [(None, None, None), (7, 5, None), (1, 3, None), (None, None, 2048)]:
            opts = dict(block_q=bq, block_k=bk, fused=fused, **({"block_bytes": nbytes} if nbytes else {}))
            got = cross_attention_probs(q, k, 0.25, query_index=qi, key_index=ki, positions=pos, valid=mask.bool(),
                                        chunk_size=chunk, heads=heads, **opts)
            assert got.dtype == torch.float32 and rel_err(got, ref) <= 1e-5, opts
    half = cross_attention_probs(q, k, 0.25, query_index=qi, key_index=ki, positions=pos, valid=mask.bool(),
                                 chunk_size=chunk, heads=heads, out_dtype=torch.float16)
    assert half.dtype == torch.float16 and rel_err(half, ref) <= 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_with_lse_is_the_layers_attention_bit_for_bit(dtype):
    """sdpa_with_lse = F.scaled_dot_product_attention exactly (GQA, padding, chunks), plus the rows' lse."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 2, 4, 2, 70, 16
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(B, h, T, D, generator=g).mul(4).to(dt) for h in (Hq, Hkv, Hkv))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :9] = 0
    batch = ForwardBatch.build((B, T), "cpu", mask)
    for allowed in (batch.mask(None), batch.mask(16)):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.25,
                                                               enable_gqa=True)
        out, lse = sdpa_with_lse(q, k, v, allowed, 0.25, enable_gqa=True)
        assert torch.equal(out, ref)
        assert lse is not None and lse.shape == (B, Hq, T)
        s = q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * 0.25
        want = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
        tol = 1e-5 if dtype == "float32" else 1e-2  # bf16 inputs: the kernel's own bf16 products
        assert (lse.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("chunk,pad,heads", [(8, 5, "all"), (None, 0, "mean"), (None, 5, [3, 0])])
def test_probs_from_the_layers_lse_match_dense_reference(chunk, pad, heads):
    g = torch.Generator().manual_seed(4)
    T, Hq, Hkv, D = 45, 4, 2, 16
    q, k, v = (torch.randn(1, h, T, D, generator=g) * 6 for h in (Hq, Hkv, Hkv))
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, :pad] = 0
    batch = ForwardBatch.build((1, T), "cpu", mask)
    pos = batch.positions
    _, lse = sdpa_with_lse(q, k, v, batch.mask(chunk), 0.25, enable_gqa=True)
    qi = torch.tensor([i for i in range(pad, T) if i % 3])
    ki = torch.tensor([i for i in range(pad, T) if i % 3 == 0])
    kw = dict(query_index=qi, key_index=ki, positions=pos[0], valid=mask[0].bool(), chunk_size=chunk, heads=heads)
    ref = cross_attention_probs_reference(q[0], k[0], 0.25, **kw)
    for nbytes in (None, 2048):  # one block, many small query blocks
        got = cross_attention_probs_from_lse(q[0], k[0], 0.25, lse[0], **kw,
                                             **({"block_bytes": nbytes} if nbytes else {}))
        assert got.dtype == torch.float32 and rel_err(got, ref) <= 1e-5
    n = torch.get_num_threads()
    one = cross_attention_probs_from_lse(q[0], k[0], 0.25, lse[0], **kw, num_threads=1)
    assert rel_err(one, got) <= 1e-6 and torch.get_num_threads() == n  # the thread setting is restored
    with pytest.raises(ValueError, match=r"lse must be a floating \(Hq, T\)"):
        cross_attention_probs_from_lse(q[0], k[0], 0.25, lse[0, :, 1:], **kw)


_TRITON_SCRIPT = r"""
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from workbench.kernels.attention_map import cross_attention_probs, cross_attention_probs_reference
res = []
for dtype, chunk, pad, heads, upcast in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(1)
    T, Hq, Hkv, D = 37, 4, 2, 16
    q = (torch.randn(Hq, T, D, generator=g) * 3).to(getattr(torch, dtype))
    k = (torch.randn(Hkv, T, D, generator=g) * 3).to(getattr(torch, dtype))
    mask = torch.ones(T, dtype=torch.long); mask[:pad] = 0
    pos = (mask.cumsum(0) - 1).clamp(min=0) * mask
    qi = torch.tensor([i for i in range(pad, T) if i % 3])
    ki = torch.tensor([i for i in range(pad, T) if i % 3 == 0])
    kw = dict(query_index=qi, key_index=ki, positions=pos, valid=mask.bool(), chunk_size=chunk, heads=heads)
    ref = cross_attention_probs_reference(q, k, 0.25, **kw)
    got = cross_attention_probs(q, k, 0.25, backend="triton", upcast=upcast, **kw)
    res.append({"shape_ok": list(got.shape) == list(ref.shape),
                "err": ((got.double() - ref).norm() / ref.norm()).item()})
print("RESULT " + json.dumps(res))
"""

TRITON_CASES = [  # (dtype, chunk, pad, heads, upcast)
    ("float32", 8, 4, "all", None),
    ("float32", None, 0, "mean", None),
    ("float16", 8, 0, [2, 1], False),  # native fp16 dot
    ("bfloat16", None, 4, "all", None),  # upcast to fp32 under the interpreter
]


def test_triton_kernel_under_interpreter_matches_dense_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, json.dumps(TRITON_CASES)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    for case, r in zip(TRITON_CASES, json.loads(line[0][7:]), strict=True):
        assert r["shape_ok"], case
        assert r["err"] <= 1e-5, (case, r)
