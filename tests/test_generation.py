"""Generation and long context: KV cache, blocked prefill, wb.generate, traces of generations.

References: transformers' ``generate`` and forward on the same checkpoint (the embedded model),
one whole-sequence forward pass of our own model (for the blocked prefill), hand-counted cache
sizes.
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
from workbench.hooks.interventions import moe_layers
from workbench.runtime.kv_cache import CacheFullError, KVCache
from workbench.runtime.memory import InsufficientMemoryError

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "data" / "images" / "digits_00.png")
PROMPTS = ["left 3 right", "the quick brown fox jumps over", "a"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False).eval()


@pytest.fixture(scope="module")
def proc():
    return wb.load_processor(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.Llama4ForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()


def by_sequence(ds):
    """A trace's rows ordered by (sequence, position): blocked passes interleave rows of a batch."""
    order = np.lexsort((ds["position"].values, ds["sequence"].values))
    return ds.isel(token=order).load()


# ---------------------------------------------------------------------------------------------
# Blocked prefill == one whole forward pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,block", [(300, 50), (260, 97), (129, 128)])
def test_blocked_prefill_equals_one_pass(model, T, block):
    """Blocks not aligned to the 64-token chunks, sequences crossing several chunk boundaries and
    the NoPE temperature's floor_scale (32) steps, a left-padded row: logits rel. <= 1e-5, same routing."""
    torch.manual_seed(T)
    ids = torch.randint(0, 1000, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :17] = 0
    routes = {}

    def grab(tag):
        return [m.hook_router.add(lambda p, topk_ids, **_: routes.setdefault(tag, []).append(topk_ids.clone()))
                for m in moe_layers(model).values()]

    handles = grab("full")
    full = model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    handles = grab("blocks")
    blocked = model(input_ids=ids, attention_mask=mask, prefill_chunk=block)
    for h in handles:
        h.remove()
    real = mask.bool()
    err = (full.logits - blocked.logits)[real].abs().max() / full.logits[real].abs().max()
    assert err <= 1e-5
    L = len(moe_layers(model))
    n_blocks = -(-T // block)
    assert len(routes["blocks"]) == L * n_blocks  # one router decision per layer and block
    for i in range(L):  # the blocks' decisions, in stream order, equal the whole pass's
        got = torch.cat([routes["blocks"][b * L + i].view(2, -1, 1) for b in range(n_blocks)], dim=1)
        want = routes["full"][i].view(2, T, 1)
        assert torch.equal(got[real], want[real])


def test_long_input_takes_the_blocked_path_by_itself(model):
    """model(**batch) on an input longer than prefill_chunk runs in blocks (hook_inputs per block,
    stream offsets 0, 40, 80) and returns every token's logits."""
    ids = torch.randint(0, 1000, (1, 100))
    starts = []
    h = model.language_model.model.hook_inputs.add(lambda p, input_ids, batch: starts.append(batch.start))
    old = model.prefill_chunk
    try:
        model.prefill_chunk = 40
        out = model(input_ids=ids)
    finally:
        model.prefill_chunk = old
        h.remove()
    assert starts == [0, 40, 80] and out.logits.shape == (1, 100, 1024)
    ref = model(input_ids=ids).logits
    assert (out.logits - ref).abs().max() / ref.abs().max() <= 1e-5


def test_blocked_image_prompt_equals_one_pass(model, proc):
    enc = proc(text=["<|image|>top left 3, top right 4"], images=[[IMAGE]], return_tensors="pt")
    full = model(**enc).logits
    blocked = model(**enc, prefill_chunk=7).logits
    assert (full - blocked).abs().max() / full.abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# The cache itself
# ---------------------------------------------------------------------------------------------
def test_cache_sizes_follow_the_attention_pattern(model):
    """Chunked (RoPE) layers hold chunk + block slots, the global (NoPE) layer every token; buffers
    are allocated once (the same storage after a prefill and 20 decode steps)."""
    cfg = model.text_config
    cache = KVCache(cfg, 2, 1000, block=50, dtype=torch.float32)
    assert [c.slots for c in cache.layers] == [64 + 50, 64 + 50, 64 + 50, 1000]
    assert [c.ring for c in cache.layers] == [True, True, True, False]
    ptrs = [c.key.data_ptr() for c in cache.layers]
    ids = torch.randint(0, 1000, (2, 150))
    model(input_ids=ids, cache=cache, prefill_chunk=50)
    for _ in range(20):
        model(input_ids=ids[:, :1], cache=cache)
    assert cache.length == 170 and cache.seen.tolist() == [170, 170]
    assert [c.key.data_ptr() for c in cache.layers] == ptrs
    # the ring holds the last 114 stream indices, the global layer all 170
    assert sorted(cache.layers[0].index.tolist()) == list(range(170 - 114, 170))
    assert cache.layers[3].index[:170].tolist() == list(range(170))
    assert model(input_ids=ids[:, :60], cache=cache, prefill_chunk=60).logits.shape[1] == 60  # 2 blocks of <= 50
    with pytest.raises(CacheFullError, match="block=50"):  # a single call past the block size
        model.language_model.model(input_ids=ids[:, :51], cache=cache)
    with pytest.raises(CacheFullError, match="holds 1000 tokens per row: 230 used"):
        model(input_ids=torch.randint(0, 1000, (2, 800)), cache=cache, prefill_chunk=50)


def test_static_cache_gives_the_same_logits(model):
    """static=True (fixed shapes: every call sees every slot, empty ones masked) == the default."""
    ids = torch.randint(0, 1000, (1, 90))
    outs = []
    for static in (False, True):
        cache = KVCache(model.text_config, 1, 100, block=90, dtype=torch.float32, static=static)
        first = model(input_ids=ids, cache=cache, logits_to_keep=1).logits
        steps = [model(input_ids=ids[:, i:i + 1], cache=cache).logits for i in range(5)]
        outs.append(torch.cat([first] + steps, dim=1))
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [True, False])
def test_static_cache_steps_read_device_state_only(model, static):
    """What a CUDA graph replay of a decode step does: the host-side values (``cache.length``,
    ``batch.start``) stay as they were at capture while the device tensors advance. A static
    cache must then give the eager steps' logits (its writes follow the device stream counter);
    a default cache writes by host offsets, so frozen host values break it (this is why capture
    needs ``static=True``, and why the default cache refuses to be captured)."""
    ids = torch.randint(0, 1000, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    outs = []
    for freeze in (False, True):
        cache = KVCache(model.text_config, 2, 60, block=30, dtype=torch.float32, static=static)
        model(input_ids=ids[:, :30], attention_mask=mask[:, :30], cache=cache, prefill_chunk=30)
        captured = cache.length
        steps = []
        for i in range(30, 40):
            steps.append(model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache).logits)
            if freeze:
                cache.length = captured  # the host side of a replayed graph does not move
        outs.append(torch.cat(steps, dim=1))
    assert torch.equal(outs[0], outs[1]) == static


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_of_a_decode_step_equals_eager_steps():
    """A decode step captured once as a CUDA graph (static cache, bf16, the Triton expert kernels)
    and replayed: each replay's logits equal an eager step's on a twin cache (the graph writes
    each step to its own slot and reads the device counters)."""
    from workbench.kernels import triton_available
    from workbench.runtime.graphs import capture_decode_step

    if not triton_available():
        pytest.skip("the captured step needs the Triton expert kernels (the torch path reads counts on the host)")
    m = wb.load_model(EMBEDDED_MODEL, dtype=torch.bfloat16, device="cuda", progress=False).eval()
    B, T0, n = 2, 32, 12
    ids = torch.randint(0, 1000, (B, T0 + n), device="cuda")
    eager, graph_cache = (KVCache(m.text_config, B, T0 + n + 4, block=T0, dtype=torch.bfloat16, device="cuda",
                                  static=True) for _ in range(2))
    for c in (eager, graph_cache):
        m(input_ids=ids[:, :T0], cache=c, prefill_chunk=T0)
    step_ids = ids[:, T0:T0 + 1].clone()
    graph, out = capture_decode_step(m, graph_cache, step_ids)
    assert graph_cache.length == T0  # the warm-up and the capture left the cache as it was
    for i in range(T0, T0 + n):
        step_ids.copy_(ids[:, i:i + 1])
        graph.replay()
        ref = m(input_ids=ids[:, i:i + 1], cache=eager, logits_to_keep=1).logits
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_capturing_a_decode_step_needs_a_static_cache_and_cuda_inputs(model):
    from workbench.runtime.graphs import capture_decode_step

    ids = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"needs KVCache\(static=True\)"):
        capture_decode_step(model, KVCache(model.text_config, 1, 8), ids)
    with pytest.raises(ValueError, match=r"must be a \(1, 1\) tensor on a CUDA device, got \(1, 1\) on cpu"):
        capture_decode_step(model, KVCache(model.text_config, 1, 8, static=True), ids)


@pytest.mark.parametrize("static", [False, True])
def test_right_padded_prefill_continued_by_decode_steps(model, static):
    """A row right-padded in its prefill (70 pads after 30 tokens: more than a chunk) and then
    continued by decode steps computes what the unpadded row computes: its chunked layers must
    still see the keys before the padding (a window of the newest slots would not)."""
    ids = torch.randint(0, 1000, (1, 120))
    alone = KVCache(model.text_config, 1, 200, block=100)
    model(input_ids=ids[:, :30], cache=alone, prefill_chunk=100)
    ref = [model(input_ids=ids[:, 100 + i:101 + i], cache=alone).logits for i in range(20)]
    cache = KVCache(model.text_config, 1, 200, block=100, static=static)
    mask = torch.zeros(1, 100, dtype=torch.long)
    mask[:, :30] = 1
    model(input_ids=ids[:, :100], attention_mask=mask, cache=cache, prefill_chunk=100)
    for i, r in enumerate(ref):  # 20 steps: positions 30..49 (chunk 0), queries 100+ stream slots on
        got = model(input_ids=ids[:, 100 + i:101 + i], cache=cache).logits
        assert (got - r).abs().max() / r.abs().max() <= 1e-5, f"step {i}"


def test_padding_a_ring_cannot_hold_is_refused(model):
    """150 pads after a row's first valid tokens, in blocks of 50: the chunked layers' ring (64 + 50
    slots) would have dropped keys the next tokens attend (a silently wrong answer): refused with
    a clear error before anything is written. A cache that keeps every slot serves it exactly."""
    ids = torch.randint(0, 1000, (1, 210))
    mask = torch.zeros(1, 200, dtype=torch.long)
    mask[:, :10] = 1
    cache = KVCache(model.text_config, 1, 400, block=50)
    model(input_ids=ids[:, :200], attention_mask=mask, cache=cache, prefill_chunk=50)  # pads only: fine
    length = cache.length
    with pytest.raises(ValueError, match="row 0 has 190 padding tokens between valid tokens.*block=50"):
        model(input_ids=ids[:, 200:201], cache=cache)
    assert cache.length == length  # nothing written
    alone = KVCache(model.text_config, 1, 400, block=50)
    model(input_ids=ids[:, :10], cache=alone)
    full = KVCache(model.text_config, 1, 260, block=200)  # max_len <= chunk + block: no ring
    model(input_ids=ids[:, :200], attention_mask=mask, cache=full, prefill_chunk=200)
    for i in range(200, 210):
        ref = model(input_ids=ids[:, i:i + 1], cache=alone).logits
        got = model(input_ids=ids[:, i:i + 1], cache=full).logits
        assert (got - ref).abs().max() / ref.abs().max() <= 1e-5


def test_decode_steps_equal_one_pass(model):
    """Prefill + one-token steps with a left-padded row: each step's logits equal the whole pass's row."""
    ids = torch.randint(0, 1000, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    cache = KVCache(model.text_config, 2, 40, block=30, dtype=torch.float32)
    got = [model(input_ids=ids[:, :30], attention_mask=mask[:, :30], cache=cache).logits]
    for t in range(30, 40):
        got.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache).logits)
    got = torch.cat(got, dim=1)
    real = mask.bool()
    assert (got - ref)[real].abs().max() / ref[real].abs().max() <= 1e-5


def test_unpadded_decode_steps_attend_exactly_their_keys_without_a_mask(model):
    """Rows without padding: a decode step sees exactly the keys the rule allows (a chunked layer:
    its chunk so far, through chunk boundaries and the ring's wrap) and attends them with no mask;
    its logits and routing equal one whole pass. A padded row turns that off (masked window)."""
    torch.manual_seed(3)
    T0, T = 30, 160  # chunk 64, ring of 64 + 30 slots: boundaries at 64 and 128, the ring wraps at 94
    ids = torch.randint(0, 1000, (2, T))
    seen = []  # per decode step and layer: (layer, all_allowed, keys seen per row)
    handles = [layer.self_attn.hook_attn.add(
        lambda p, key, keys, layer=i, **_: seen.append((layer, keys.all_allowed, key.shape[2])))
        for i, layer in enumerate(model.language_model.model.layers)]
    routes = {}
    route_handles = [m.hook_router.add(lambda p, topk_ids, **_: routes.setdefault("got", []).append(topk_ids.clone()))
                     for m in moe_layers(model).values()]
    try:
        cache = KVCache(model.text_config, 2, T, block=T0, dtype=torch.float32)
        got = [model(input_ids=ids[:, :T0], cache=cache).logits]
        seen.clear()
        routes.clear()
        for t in range(T0, T):
            got.append(model(input_ids=ids[:, t:t + 1], cache=cache).logits)
    finally:
        for h in handles + route_handles:
            h.remove()
    chunk, L = model.text_config.attention_chunk_size, len(model.language_model.model.layers)
    uses_rope = model.text_config.uses_rope
    assert len(seen) == L * (T - T0)
    wrapped = 0
    for n, (layer, exact, n_keys) in enumerate(seen):
        t = T0 + n // L
        if exact:
            assert n_keys == (t % chunk + 1 if uses_rope[layer] else t + 1)
        else:  # the ring wrapped with its runs longer than half of it: all of it, masked
            assert uses_rope[layer] and n_keys == chunk + T0
            wrapped += 1
    assert 0 < wrapped < len(seen)
    ref_routes = []
    h = [m.hook_router.add(lambda p, topk_ids, **_: ref_routes.append(topk_ids.clone()))
         for m in moe_layers(model).values()]
    ref = model(input_ids=ids).logits
    for x in h:
        x.remove()
    got = torch.cat(got, dim=1)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-5
    n_moe = len(moe_layers(model))
    for i in range(n_moe):  # each layer's decode-step decisions equal the whole pass's
        steps = torch.cat([routes["got"][s * n_moe + i].view(2, 1) for s in range(T - T0)], dim=1)
        assert torch.equal(steps, ref_routes[i].view(2, T)[:, T0:])

    # a left-padded row: the cache keeps its masked window
    mask = torch.ones(2, T0 + 1, dtype=torch.long)
    mask[0, :3] = 0
    cache = KVCache(model.text_config, 2, T0 + 1, block=T0, dtype=torch.float32)
    flags = []
    handles = [layer.self_attn.hook_attn.add(lambda p, keys, **_: flags.append(keys.all_allowed))
               for layer in model.language_model.model.layers]
    try:
        model(input_ids=ids[:, :T0], attention_mask=mask[:, :T0], cache=cache)
        flags.clear()
        model(input_ids=ids[:, T0:T0 + 1], attention_mask=mask[:, T0:], cache=cache)
    finally:
        for h in handles:
            h.remove()
    assert flags == [False] * L


# ---------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------
def test_inputs_past_max_position_embeddings_are_refused():
    text = wb.TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_local_experts=4, max_position_embeddings=128, attention_chunk_size=16)
    m = wb.random_model(wb.ModelConfig(text=text, architecture="Llama4ForCausalLM"))
    with pytest.raises(ValueError, match="has 129 tokens per row .* max_position_embeddings is 128"):
        m(input_ids=torch.zeros(1, 129, dtype=torch.long))
    assert m(input_ids=torch.zeros(1, 128, dtype=torch.long), prefill_chunk=50).logits.shape == (1, 128, 64)
    cache = KVCache(text, 1, 200, block=128)
    m(input_ids=torch.zeros(1, 128, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="has 129 tokens per row"):  # cached tokens count
        m(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_a_prompt_larger_than_free_memory_is_refused_before_allocating(model):
    """A 9M-token prompt would need ~37 GB of logits: a clear error naming the need, nothing allocated."""
    ids = torch.zeros(1, 9_000_000, dtype=torch.long)
    with pytest.raises(InsufficientMemoryError, match=r"9000000-token prefill of 1 row\(s\) needs about .* GiB"):
        model(input_ids=ids)


def test_generation_past_max_position_embeddings_or_free_memory_is_refused_before_any_step(model, proc):
    """Prompt (left-padded to its batch's longest) + max_new_tokens is checked against the model's
    positions and the KV cache + prefill estimate against free memory, for every batch, before the
    first batch runs: a later batch's problem costs no work and names its prompt."""
    from workbench.generation import check_generation
    from workbench.runtime.memory import ContextLengthError, available_bytes, generation_bytes

    prompts = ["hi", "a longer prompt, the longest of the second batch", "short"]
    T0 = int(proc(text=prompts[1:], padding=True, return_tensors="pt")["input_ids"].shape[1])
    limit = model.text_config.max_position_embeddings
    ran = []
    handle = model.language_model.model.hook_inputs.add(lambda point, **kw: ran.append(1))
    try:
        with pytest.raises(ContextLengthError, match=rf"^p.jsonl:2 \({T0} tokens, the longest of its batch\) with "
                                                     rf"{limit - T0 + 1:,} new tokens needs {limit + 1:,} positions"):
            check_generation(model, proc, prompts, limit - T0 + 1, batch_size=2,
                             names=[f"p.jsonl:{i + 1}" for i in range(3)])
        with pytest.raises(ContextLengthError, match=r"^prompt 1 "):
            wb.generate(model, proc, prompts, limit - T0 + 1, batch_size=2)
        assert not ran  # the first batch (which fits) was not run either
        # 64 rows of ~10M slots of float32 keys and values: hundreds of GiB on any machine we run on
        need = generation_bytes(model.text_config, 64, 3, 10_000_000, 3, torch.float32)
        assert need > available_bytes("cpu")
        with pytest.raises(InsufficientMemoryError, match=r"generating for prompt \d+ .* in a batch of 64 needs about"):
            wb.generate(model, proc, ["ab"] * 64, 10_000_000, batch_size=64)
        assert not ran
    finally:
        handle.remove()


def test_generation_bytes_count_the_cache_generate_allocates(model):
    from workbench.runtime.memory import generation_bytes, prefill_bytes, prefill_kv_bytes

    cfg = model.text_config
    for B, T0, N, block in ((1, 5, 3, 5), (3, 40, 200, 16), (2, 100, 1000, 64)):
        cache = KVCache(cfg, B, T0 + N, block=block, dtype=torch.float32)
        kv = prefill_kv_bytes(cfg, B, T0 + N, block, 4)
        assert kv == cache.nbytes()
        assert generation_bytes(cfg, B, T0, N, block, torch.float32) == (
            prefill_bytes(cfg, B, T0, block, torch.float32, logits_to_keep=1) - prefill_kv_bytes(cfg, B, T0, block, 4)
            + cache.nbytes())


def test_a_prompt_without_text_is_refused(model, proc):
    with pytest.raises(ValueError, match=r"prompt 1: expected a string or a dict with a string 'text'"):
        wb.generate(model, proc, ["fine", {"txt": "typo"}], 2)


# ---------------------------------------------------------------------------------------------
# wb.generate == transformers' generate
# ---------------------------------------------------------------------------------------------
def test_greedy_generation_equals_transformers(model, proc, hf):
    """Three text prompts in one left-padded batch, 64 new tokens: the same ids as transformers."""
    out = wb.generate(model, proc, PROMPTS, max_new_tokens=64, batch_size=3)
    enc = proc(text=PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ref = hf.generate(**enc, max_new_tokens=64, do_sample=False)[:, enc["input_ids"].shape[1]:]
    for g, r in zip(out, ref.tolist()):
        assert g.token_ids == r[:len(g.token_ids)]
        assert g.finish_reason == ("length" if len(g.token_ids) == 64 else "eos")
        assert g.text == proc.decode(g.token_ids, skip_special_tokens=True)


def test_greedy_generation_with_an_image_equals_transformers(model, proc, hf):
    prompt = {"text": "<|image|>top left", "images": [IMAGE]}
    (g,) = wb.generate(model, proc, [prompt], max_new_tokens=64)
    enc = proc(text=[prompt["text"]], images=[[IMAGE]], return_tensors="pt")
    ref = hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      pixel_values=enc["pixel_values"], max_new_tokens=64, do_sample=False)
    ref = ref[0, enc["input_ids"].shape[1]:].tolist()
    assert g.token_ids == ref[:len(g.token_ids)] and len(g.token_ids) >= 1


def test_tensors_kept_by_a_listener_during_generate_are_inference_tensors(model, proc):
    """generate runs under inference mode (documented): what a listener keeps is an inference
    tensor, and its clone, the documented way out, is a normal tensor autograd can use."""
    kept = []
    h = model.language_model.model.layers[0].feed_forward.hook_router.add(
        lambda p, router_logits, **_: kept.append(router_logits))
    try:
        wb.generate(model, proc, "Hello there", 3)
    finally:
        h.remove()
    assert len(kept) == 3 and all(t.is_inference() for t in kept)
    with pytest.raises(RuntimeError, match="[Ii]nplace update to inference tensor"):
        kept[0].mul_(2)
    probe = torch.zeros(kept[0].shape[-1], requires_grad=True)
    with torch.enable_grad():
        (kept[0].clone() * probe).sum().backward()
    assert torch.equal(probe.grad, kept[0].sum(0))


def test_sampling_is_reproducible_and_stops(model, proc):
    a = wb.generate(model, proc, PROMPTS, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = wb.generate(model, proc, PROMPTS, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    greedy = wb.generate(model, proc, PROMPTS[:1], max_new_tokens=12)[0]
    cut = greedy.text[3:5]
    (s,) = wb.generate(model, proc, PROMPTS[:1], max_new_tokens=12, stop=[cut])
    assert s.finish_reason == "stop" and s.text == greedy.text[:greedy.text.find(cut)]
    (t,) = wb.generate(model, proc, PROMPTS[:1], max_new_tokens=12, stop=greedy.token_ids[2])
    assert t.finish_reason == "stop" and t.token_ids == greedy.token_ids[:3]
    with pytest.raises(ValueError, match="top_p"):
        wb.generate(model, proc, PROMPTS, max_new_tokens=2, do_sample=True, top_p=0)


def test_decode_steps_of_a_small_model_run_on_one_thread(model, proc, monkeypatch):
    """A small model's decode steps run single-threaded on CPU (the prefill keeps every thread) and
    the caller's thread count comes back; above the threshold nothing changes. active_macs is the
    hand count of the embedded config."""
    from workbench import generation

    c = model.text_config
    H, D, I, E = 128, 32, 128, 16
    per_layer = H * D * (2 * 4 + 2 * 2) + 3 * H * I * (1 + 1) + H * E  # q,o (4 heads) k,v (2); expert + shared; router
    assert (c.hidden_size, c.head_dim, c.intermediate_size, c.num_local_experts) == (H, D, I, E)
    assert generation.active_macs(c) == 4 * per_layer + 1024 * H
    seen = []
    h = model.language_model.model.hook_inputs.add(
        lambda p, input_ids, batch: seen.append((batch.shape[1], torch.get_num_threads())))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ref = wb.generate(model, proc, PROMPTS[:2], max_new_tokens=4)
        assert torch.get_num_threads() == 2
        assert seen[0][1] == 2 and seen[0][0] > 1 and [n for T, n in seen[1:]] == [1, 1, 1], seen
        seen.clear()
        monkeypatch.setattr(generation, "SINGLE_THREAD_DECODE_MACS", 0)  # every model is "large"
        got = wb.generate(model, proc, PROMPTS[:2], max_new_tokens=4)
        assert [n for _, n in seen] == [2, 2, 2, 2] and torch.get_num_threads() == 2
        assert [g.token_ids for g in got] == [g.token_ids for g in ref]
    finally:
        h.remove()
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Traces of generations
# ---------------------------------------------------------------------------------------------
def test_trace_of_a_generation_equals_one_pass_over_prompt_and_answer(model, proc, tmp_path):
    """Recorded generation (a left-padded batch with an image prompt) == one forward pass per
    sequence over prompt + answer: ids, positions, routing, logits; the flags mark the answer."""
    prompts = PROMPTS[:2] + [{"text": "<|image|>top left", "images": [IMAGE]}]
    with wb.record(model, tmp_path / "gen.zarr", capture={"router": {}, "logits": {"dtype": "float32"}},
                   processor=proc) as rec:
        out = wb.generate(model, proc, prompts, max_new_tokens=10, recorder=rec)
    gen = by_sequence(wb.open_trace(tmp_path / "gen.zarr"))
    with wb.record(model, tmp_path / "ref.zarr", capture={"router": {}, "logits": {"dtype": "float32"}},
                   processor=proc) as rec:
        for i, (p, g) in enumerate(zip(prompts, out)):
            text = p if isinstance(p, str) else p["text"]
            enc = proc(text=[text], images=[p["images"]] if isinstance(p, dict) else None, return_tensors="pt")
            ids = torch.cat([enc["input_ids"], torch.tensor([g.token_ids])], dim=1)
            with rec.sequences([i]):
                model(input_ids=ids, pixel_values=enc.get("pixel_values"))
    ref = by_sequence(wb.open_trace(tmp_path / "ref.zarr"))
    for name in ("token_id", "sequence", "position", "modality", "topk_expert"):
        np.testing.assert_array_equal(gen[name].values, ref[name].values, err_msg=name)
    np.testing.assert_allclose(gen["topk_weight"].values, ref["topk_weight"].values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gen["router_logits"].values, ref["router_logits"].values, rtol=1e-4, atol=1e-4)
    for s, g in enumerate(out):
        flags = gen["generated"].values[gen["sequence"].values == s]
        assert flags.sum() == len(g.token_ids) and not flags[:g.prompt_tokens].any() and flags[g.prompt_tokens:].all()


def test_transformers_generate_recorded_through_the_adapter(model, proc, hf, tmp_path):
    """transformers' generate, recorded: decode steps land in their sequences at the right
    positions, flagged generated: the same trace as wb.generate's, less each answer's last token
    (transformers never runs it through the model)."""
    with wb.record(model, tmp_path / "wb.zarr", capture={"router": {}, "logits": {"dtype": "float32"}}) as rec:
        wb.generate(model, proc, PROMPTS[:2], max_new_tokens=12, recorder=rec)
    enc = proc(text=PROMPTS[:2], padding=True, padding_side="left", return_tensors="pt")
    with wb.record(hf, tmp_path / "hf.zarr", capture={"router": {}, "logits": {"dtype": "float32"}}):
        hf.generate(**enc, max_new_tokens=12, do_sample=False)
    a, b = by_sequence(wb.open_trace(tmp_path / "wb.zarr")), by_sequence(wb.open_trace(tmp_path / "hf.zarr"))
    seq = a["sequence"].values
    last = np.r_[seq[1:] != seq[:-1], True]
    a = a.isel(token=~last)
    assert b.sizes["token"] == a.sizes["token"] and b["generated"].values.sum() == 2 * 11
    for name in ("token_id", "sequence", "position", "generated", "topk_expert"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_allclose(a["router_logits"].values, b["router_logits"].values, rtol=1e-4, atol=1e-4)


def test_a_bare_blocked_pass_is_one_sequence(model, tmp_path):
    """Without a runner, the blocks of one long pass continue their rows' sequences."""
    ids = torch.randint(0, 1000, (2, 100))
    with wb.record(model, tmp_path / "b.zarr") as rec:
        model(input_ids=ids, prefill_chunk=30)
        model(input_ids=ids[:, :10])
    ds = wb.open_trace(tmp_path / "b.zarr")
    assert np.bincount(ds["sequence"].values).tolist() == [100, 100, 10, 10]
    assert not ds["generated"].values.any()
    assert rec.n_tokens == 220


def test_v2_traces_still_open(model, proc, tmp_path):
    """A store written by the schema v2 code reads with generated = 0 and the same rows as today's."""
    old = wb.open_trace(ROOT / "tests" / "data" / "v2" / "v2.zarr").load()
    assert old.attrs["schema"] == "workbench.trace/2" and not old["generated"].values.any()
    with wb.record(model, tmp_path / "now.zarr", capture={"router": {}, "logits": {"dtype": "float32"}},
                   processor=proc) as rec:
        rec.run(model, proc, ["left 3 right", "the quick brown fox jumps over the lazy dog"], progress=False)
    new = wb.open_trace(tmp_path / "now.zarr").load()
    for name in ("token_id", "sequence", "position", "modality", "generated", "topk_expert"):
        np.testing.assert_array_equal(new[name].values, old[name].values, err_msg=name)
    np.testing.assert_allclose(new["router_logits"].values, old["router_logits"].values, rtol=1e-5, atol=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch, workbench as wb
    from workbench.embedded import EMBEDDED_MODEL
    m = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    p = wb.load_processor(EMBEDDED_MODEL)
    rec = wb.record(m, sys.argv[1], capture=("router",), commit_every_seconds=0)  # each step durable
    class Tell:
        n = 0
        def __call__(self, *a, **k):
            Tell.n += 1
            if Tell.n == 25:
                print("steps", flush=True)
    m.language_model.model.hook_inputs.add(Tell())
    wb.generate(m, p, ["the quick brown fox"], max_new_tokens=100, recorder=rec)
    import time; time.sleep(60)
""")


def test_kill_during_generation_keeps_every_committed_step(tmp_path):
    """SIGKILL after 25 passes (prefill + 24 decode steps), each committed before the next: the store
    opens with at least those, in order, incomplete."""
    store = tmp_path / "k.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "steps"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ds = wb.open_trace(store)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert attrs["complete"] is False and ds.sizes["token"] == attrs["n_tokens"] >= 24
    seq, pos, gen = (ds[v].values for v in ("sequence", "position", "generated"))
    assert (seq == 0).all() and (pos == np.arange(len(pos))).all()  # every committed step, in order
    prompt = int(wb.load_processor(EMBEDDED_MODEL)(text=["the quick brown fox"])["attention_mask"].sum())
    assert not gen[:prompt].any() and gen[prompt:].all() and pos.size - prompt >= 10  # prompt 0, answer 1


def test_out_of_vocabulary_ids_are_a_clear_error(model):
    with pytest.raises(ValueError, match=r"token id 1024, outside the model's vocabulary \[0, 1024\)"):
        model(input_ids=torch.tensor([[5, 1024]]))
    with pytest.raises(ValueError, match=r"token id -1, outside"):
        model(input_ids=torch.tensor([[-1, 5]]))


def test_generate_command_writes_answers_and_the_trace(tmp_path, capsys, model, proc):
    from workbench.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "left 3 right"}) + "\n"
                       + json.dumps({"text": "<|image|>top left", "images": [IMAGE]}) + "\n")
    store, answers = tmp_path / "g.zarr", tmp_path / "answers.jsonl"
    rc = main(["generate", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--max-new-tokens", "6", "--out", str(store),
               "--capture", "router,logits", "--answers", str(answers), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "generated 12 tokens for 2 prompts" in out and f"store {store}" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    expected = wb.generate(model, proc, ["left 3 right", {"text": "<|image|>top left", "images": [IMAGE]}],
                           max_new_tokens=6)
    assert [r["token_ids"] for r in rows] == [g.token_ids for g in expected]
    assert [r["line"] for r in rows] == [1, 2] and [r["sequence"] for r in rows] == [0, 1]
    ds = wb.open_trace(store)
    assert ds.attrs["complete"] and int(ds["generated"].sum()) == 12 and "router_logits" in ds
    assert ds.attrs["provenance"]["generation"]["max_new_tokens"] == 6
    # bad input: one line, exit 2, nothing loaded
    assert main(["generate", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--capture", "logits"]) == 2
    assert "--capture needs --out" in capsys.readouterr().err
    assert main(["generate", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--out", str(store)]) == 2
    err = capsys.readouterr().err
    assert "already holds a trace" in err and "--overwrite" in err and "--resume" not in err  # generate has none
    # too long for the model's positions: refused after loading, before the store exists
    fresh = tmp_path / "fresh.zarr"
    assert main(["generate", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--max-new-tokens", "20000000",
                 "--out", str(fresh), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_position_embeddings is 10,485,760" in err
    assert err.startswith(f"workbench generate: error: {prompts}:2 (") and not fresh.exists()
    assert err.endswith("(shorten the prompt or lower --max-new-tokens)")
    # a prompt the processor refuses is named by its line, not its slot in the batch, before the store exists
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "no slot", "images": [IMAGE]}) + "\n")
    assert main(["generate", str(EMBEDDED_MODEL), "--prompts", str(bad), "--out", str(fresh), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench generate: error: ") and "bad.jsonl:2: the text has 0 <|image|>" in err
    assert "sample" not in err and not fresh.exists()
    # --answers in a folder that does not exist yet: created
    nested = tmp_path / "new" / "dir" / "a.jsonl"
    assert main(["generate", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--max-new-tokens", "2",
                 "--answers", str(nested), "--quiet"]) == 0
    assert len(nested.read_text().splitlines()) == 2
