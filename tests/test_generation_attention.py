"""Cross-modal attention during generation: every generated token's attention to the image patches.

References: transformers' eager attention (``output_attentions=True``) over prompt + answer on the
same checkpoint (the embedded model), and our own capture of one whole-sequence forward pass (for
prompts prefilled in blocks against a cache, and for left-padded batches of generations).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.embedded import EMBEDDED_MODEL
from workbench.hooks import AttentionCapture
from workbench.trace import attention_sequences

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [str(ROOT / "data" / "images" / f"digits_0{i}.png") for i in range(3)]
CHUNK = 64  # the embedded model's attention_chunk_size (layers 0-2 chunked, layer 3 global)
# about 55 prompt tokens: the answer's tokens cross the first attention chunk boundary (position 64)
LONG_PROMPT = {"text": "<|image|>top left " + " ".join(["the digit in the corner"] * 3), "images": [IMAGES[0]]}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    m = wb.load_model(EMBEDDED_MODEL, dtype="float32", progress=False).eval()
    assert m.text_config.attention_chunk_size == CHUNK
    return m


@pytest.fixture(scope="module")
def proc():
    return wb.load_processor(EMBEDDED_MODEL)


def capture():
    return AttentionCapture(dtype="float32")  # all layers, all heads


@pytest.fixture(scope="module")
def generation(model, proc, tmp_path_factory):
    """One unpadded image prompt, prefilled in blocks of 16 tokens, 24 generated tokens, recorded."""
    store = tmp_path_factory.mktemp("gen") / "g.zarr"
    with wb.record(model, store, capture=[capture()], processor=proc) as rec:
        (g,) = wb.generate(model, proc, [LONG_PROMPT], max_new_tokens=24, recorder=rec, prefill_chunk=16)
    return store, g


def _rel_close(got, ref, what):
    """Elementwise relative error <= 1e-5 (zeros must be exact zeros)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    err = np.abs(got - ref)
    bad = err > 1e-5 * np.abs(ref) + 1e-30
    assert not bad.any(), f"{what}: {bad.sum()} entries off, max rel {np.max(err / np.maximum(np.abs(ref), 1e-30)):.2e}"


def test_generated_tokens_attention_equals_transformers_eager(generation, proc):
    transformers = pytest.importorskip("transformers")
    store, g = generation
    ds = wb.open_trace(store).load()
    att = wb.open_attention(store, 0).load()
    assert attention_sequences(store) == [0]
    assert len(g.token_ids) == 24 and int(ds["generated"].sum()) == 24
    # every generated token is a query row, flagged, in order, at the trace's positions
    gen_tok = np.flatnonzero(ds["generated"].values == 1)
    np.testing.assert_array_equal(att["query_token"].values[att["generated"].values], gen_tok)
    np.testing.assert_array_equal(att["generated"].values, ds["generated"].values[att["query_token"].values] == 1)
    np.testing.assert_array_equal(att["query_position"].values, ds["position"].values[att["query_token"].values])
    assert att.attrs["parts"] >= 24  # later prefill blocks and one part per decode step
    # the reference: transformers' eager attention over prompt + answer (one unpadded row)
    enc = proc(text=[LONG_PROMPT["text"]], images=[LONG_PROMPT["images"]], return_tensors="pt")
    ids = torch.tensor(ds["token_id"].values[None].astype(np.int64))
    np.testing.assert_array_equal(ids[0, :enc["input_ids"].shape[1]], enc["input_ids"][0])
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    out = hf(input_ids=ids, pixel_values=enc["pixel_values"], output_attentions=True)
    q = ds["position"].values[att["query_token"].values]
    p = ds["position"].values[att["patch_token"].values]
    gen = att["generated"].values
    qpos = att["query_position"].values
    assert (qpos[gen] < CHUNK).any() and (qpos[gen] >= CHUNK).any()  # the answer crosses a chunk boundary
    for layer in att["layer"].values.tolist():
        ref = out.attentions[layer][0].double().numpy()[:, q][:, :, p]  # (head, query, patch)
        got = att.sel(layer=layer).values
        _rel_close(got[:, gen], ref[:, gen], f"layer {layer}, generated queries")
        _rel_close(got, ref, f"layer {layer}, all queries")
        if layer < 3:  # chunked: a query past the patches' chunk sees none of them (exact zeros)
            assert (got[:, qpos >= CHUNK] == 0).all() and (got[:, gen & (qpos < CHUNK)] > 0).all()
        else:  # global (NoPE): every query sees every patch
            assert (got[:, gen] > 0).all()


@pytest.mark.parametrize("heads", [[1, 3], "mean"])
def test_cached_passes_without_the_layer_lse_and_head_subsets(generation, model, proc, tmp_path, heads):
    """The log-sum-exp computed by the capture over the cache slots (as on GPU, where the layer gives
    none) and head subsets / the head mean give the maps of the reference generation."""
    store, g = generation
    cap = AttentionCapture(dtype="float32", heads=heads, layers=[0, 3])
    cap.use_layer_lse = False
    other = tmp_path / "o.zarr"
    with wb.record(model, other, capture=[cap]) as rec:
        (h,) = wb.generate(model, proc, [LONG_PROMPT], max_new_tokens=24, recorder=rec, prefill_chunk=16)
    assert h.token_ids == g.token_ids
    ref = wb.open_attention(store, 0).sel(layer=[0, 3]).load()
    got = wb.open_attention(other, 0).load()
    ref = ref.mean("head", keepdims=True) if heads == "mean" else ref.isel(head=heads)
    assert got["head"].values.tolist() == ([-1] if heads == "mean" else heads)
    np.testing.assert_array_equal(got["query_token"].values, ref["query_token"].values)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-5, atol=1e-7)
    assert (got.values[..., got["query_position"].values >= CHUNK, :][0] == 0).all()  # chunked layer 0


def test_blocked_prefill_attention_equals_one_pass(model, proc, tmp_path):
    """Prompts longer than prefill_chunk (8 tokens: patches and images span blocks; text before and between
    images; a left-padded batch of two): the maps equal those of one whole-sequence pass."""
    prompts = [{"text": "a b c <|image|>top left digit <|image|>and this one", "images": IMAGES[:2]},
               {"text": "<|image|>one", "images": IMAGES[2:3]}]
    stores = {}
    for name, chunk in (("whole", 4096), ("blocked", 8)):
        stores[name] = tmp_path / f"{name}.zarr"
        old = model.prefill_chunk
        model.prefill_chunk = chunk
        try:
            with wb.record(model, stores[name], capture=[capture()], processor=proc) as rec:
                rec.run(model, proc, prompts, batch_size=2, progress=False)
        finally:
            model.prefill_chunk = old
    assert attention_sequences(stores["whole"]) == attention_sequences(stores["blocked"]) == [0, 1]
    for s in (0, 1):
        a, b = wb.open_attention(stores["blocked"], s).load(), wb.open_attention(stores["whole"], s).load()
        assert a.attrs["parts"] > 0 and b.attrs["parts"] == 0
        ta, tb = wb.open_trace(stores["blocked"]).load(), wb.open_trace(stores["whole"]).load()
        for c in ("layer", "head", "query_position", "image", "tile", "row", "col", "generated"):
            np.testing.assert_array_equal(a[c].values, b[c].values, err_msg=c)
        for c in ("query_token", "patch_token"):  # the same tokens (the blocked trace interleaves the rows)
            np.testing.assert_array_equal(ta["position"].values[a[c].values], tb["position"].values[b[c].values])
            np.testing.assert_array_equal(ta["token_id"].values[a[c].values], tb["token_id"].values[b[c].values])
        assert a.sizes["patch"] == 16 * (2 if s == 0 else 1)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-7)


def test_left_padded_generation_equals_one_pass_over_prompt_and_answer(model, proc, tmp_path):
    """Two image prompts and a text prompt generated in one left-padded batch (prefill blocks of 8):
    each image sequence's maps equal those of one whole-sequence pass over its prompt + answer."""
    prompts = [{"text": "<|image|>top left", "images": IMAGES[:1]},
               {"text": "a few words first <|image|>the digit", "images": IMAGES[1:2]},
               {"text": "no image in this one", "images": []}]
    store = tmp_path / "g.zarr"
    with wb.record(model, store, capture=[capture()], processor=proc) as rec:
        out = wb.generate(model, proc, prompts, max_new_tokens=10, recorder=rec, batch_size=3, prefill_chunk=8)
    ds = wb.open_trace(store).load()
    assert attention_sequences(store) == [out[0].sequence, out[1].sequence]  # the text-only row has none
    for g, prompt in zip(out[:2], prompts[:2]):
        sel = ds["sequence"].values == g.sequence
        ids = torch.tensor(ds["token_id"].values[sel][None].astype(np.int64))
        enc = proc(text=[prompt["text"]], images=[prompt["images"]], return_tensors="pt")
        one = tmp_path / f"one{g.sequence}.zarr"
        with wb.record(model, one, capture=[capture()]):
            model(input_ids=ids, pixel_values=enc["pixel_values"])
        a, b = wb.open_attention(store, g.sequence).load(), wb.open_attention(one, 0).load()
        assert int(a["generated"].sum()) == len(g.token_ids) and not b["generated"].values.any()
        np.testing.assert_array_equal(a["query_position"].values, b["query_position"].values)
        for c in ("image", "tile", "row", "col"):
            np.testing.assert_array_equal(a[c].values, b[c].values, err_msg=c)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-7)


def test_open_attention_stops_at_the_first_incomplete_part(generation, tmp_path):
    import shutil

    store, _ = generation
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    full = wb.open_attention(copy, 0)
    n_parts = full.attrs["parts"]
    part = copy / "attention" / "seq_000000" / f"part_{n_parts - 2:04d}"
    meta = json.loads((part / "zarr.json").read_text())
    del meta["attributes"]["complete"]  # a writer killed between the arrays and the marker
    (part / "zarr.json").write_text(json.dumps(meta))
    for chunk in (part / "probs").rglob("c/*"):  # ... and before all its chunks were written
        if chunk.is_file():
            chunk.unlink()
    cut = wb.open_attention(copy, 0)
    assert cut.attrs["parts"] == n_parts - 3
    assert cut.sizes["query"] == full.sizes["query"] - 3  # the last three decode steps (one query each)
    np.testing.assert_array_equal(cut.values, full.isel(query=slice(0, cut.sizes["query"])).values)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch, workbench as wb
    from workbench.embedded import EMBEDDED_MODEL
    from workbench.hooks import AttentionCapture
    m = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    p = wb.load_processor(EMBEDDED_MODEL)
    rec = wb.record(m, sys.argv[1], capture=[AttentionCapture(dtype="float32")])
    class Slow:
        n = 0
        def __call__(self, *a, **k):
            Slow.n += 1
            if Slow.n == 8:
                print("steps", flush=True)
            time.sleep(0.01)
    m.language_model.model.hook_inputs.add(Slow())
    wb.generate(m, p, [{"text": "<|image|>top left", "images": [sys.argv[2]]}], max_new_tokens=400, recorder=rec)
    print("done", flush=True)
    time.sleep(60)
""")


def test_kill_during_generation_leaves_every_committed_part_readable(tmp_path):
    store = tmp_path / "k.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store), IMAGES[0]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "steps"
        time.sleep(2.0)  # past a few commits (the recorder commits at least every second), mid-generation
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ds = wb.open_trace(store).load()
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    n_gen = int(ds["generated"].sum())
    assert attrs["complete"] is False and 0 < n_gen < 400  # killed mid-generation
    att = wb.open_attention(store, 0)
    vals = att.values  # every committed part reads (no missing chunk, no error)
    assert np.isfinite(vals).all()
    # every committed generated token has its row, except at most the step being written at the kill
    rows = int(att["generated"].sum())
    assert n_gen - 1 <= rows <= n_gen
    np.testing.assert_array_equal(att["query_token"].values[att["generated"].values],
                                  np.flatnonzero(ds["generated"].values == 1)[:rows])


def test_attention_view_steps_through_the_answer(generation):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    from workbench.widgets import CrossModalAttentionView

    store, g = generation
    att = wb.open_attention(store, 0)
    v = CrossModalAttentionView(store, 0)  # image and its geometry from the trace provenance
    gen_q = np.flatnonzero(att["generated"].values)
    assert v.answer_queries.tolist() == gen_q.tolist() and len(gen_q) == len(g.token_ids)
    assert v.w_query.value == gen_q[0] and v.answer_step == 1  # opens on the answer's first token
    assert sum("[answer" in lab for lab in v.query_labels) == len(gen_q)
    assert "[answer 1]" in v.query_labels[gen_q[0]] and "[answer" not in v.query_labels[0]
    assert v.w_answer.max == len(gen_q) and not v.w_answer.disabled and v.w_play.max == len(gen_q)

    def shown(q):  # the head mean of query q over the image's patches, as drawn
        return np.asarray(att.isel(layer=int(v.w_layer.value), query=q).values, np.float64).mean(0)

    np.testing.assert_allclose(v.attention(), shown(gen_q[0]))
    v.w_answer.value = 5  # the slider moves the query
    assert v.w_query.value == gen_q[4] and v.answer_step == 5
    np.testing.assert_allclose(v.attention(), shown(gen_q[4]))
    assert "[answer 5]" in v.fig.layout.title.text and "generated token 5 of" in v.w_answer_text.value
    v.step()
    assert v.answer_step == 6 and v.w_answer.value == 6
    v.step(-100)
    assert v.answer_step == 1
    v.w_query.value = int(gen_q[2])  # picking a generated token in the list moves the slider
    assert v.w_answer.value == 3
    v.w_query.value = 0  # a prompt token: the slider stays, the text says so
    assert v.answer_step is None and "prompt token" in v.w_answer_text.value
    assert CrossModalAttentionView(store, 0, query=0).w_query.value == 0
