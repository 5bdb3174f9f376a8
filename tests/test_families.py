"""Every MoE family transformers ships, recorded through its adapter: what the store holds is what the
model routed, by the family's own formula (written out here, independently of the adapters), at the
decoder indices of its MoE layers; padded batches and generation give the same rows as plain runs;
the CLI traces a saved checkpoint of each; the views and the export run on each trace.

Also the ``olmoe`` conventions of the co-activation and vocabulary-specialization analyses.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import workbench as wb  # noqa: E402
from workbench.hooks.adapters import AdapterError, adapter_for  # noqa: E402
from workbench.tiny_tokenizer import make_llama4_tokenizer  # noqa: E402
from workbench.trace import TraceWriter  # noqa: E402
from workbench.trace.schema import layer_routing, routing_layout  # noqa: E402

BOS, EOS, PAD = 301, 309, 313  # the tiny tokenizer's ids (vocab 320)
BASE = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            initializer_range=0.2, max_position_embeddings=128, tie_word_embeddings=False)

# family -> (config class, model class, config overrides)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=6, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3],
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True,
                       mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                         norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1, moe_intermediate_size=16,
                         kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2,
                                                          sliding_window=64)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=48,
                         interleave_moe_layer_step=2, attention_chunk_size=8)),
}
NAMES = list(FAMILIES)


def tiny_model(family: str, seed: int = 0):
    cfg_name, model_name, over = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # biases the init leaves at 0: random, so that they matter
        for m in gates(model).values():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.3)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.3)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ------------------------------------------------------------------ each family's rules, written out
def expected_moe_layers(cfg) -> list[int]:
    """Decoder indices of the MoE layers, from the config alone."""
    L = cfg.num_hidden_layers
    t = cfg.model_type
    if t in ("qwen2_moe", "qwen3_moe"):
        return [i for i in range(L) if i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0]
    if t == "deepseek_v3":
        return list(range(cfg.first_k_dense_replace, L))
    if t == "llama4_text":
        return list(range(cfg.interleave_moe_layer_step - 1, L, cfg.interleave_moe_layer_step))
    return list(range(L))


def gates(model) -> dict[int, torch.nn.Module]:
    """decoder index -> the router (gate) module of each MoE layer, found by the family's attribute path
    (dense layers' MLPs have none)."""
    attr = "router" if model.config.model_type in ("gpt_oss", "llama4_text") else "gate"
    out = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if getattr(block, attr, None) is not None:
            out[i] = getattr(block, attr)
    return out


def route(cfg, logits: torch.Tensor, gate) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) of each token, by the family's formula, from the router logits; slots best first."""
    t, k = cfg.model_type, cfg.num_experts_per_tok
    x = logits.float()
    if t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = torch.softmax(x, dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        if t == "mixtral" or cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    elif t == "gpt_oss":  # top-k of the logits, then softmax over the k
        v, ids = torch.topk(x, k, dim=-1)
        w = torch.softmax(v, dim=-1)
    elif t == "llama4_text":  # top-k of the logits, sigmoid of each
        v, ids = torch.topk(x, k, dim=-1)
        w = torch.sigmoid(v)
    elif t == "deepseek_v3":
        s = torch.sigmoid(x)
        c = s + gate.e_score_correction_bias.float()
        G, E = cfg.n_group, x.shape[-1]
        best_groups = c.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
        allowed = torch.zeros(x.shape[0], G, dtype=torch.bool).scatter_(1, best_groups, True)
        allowed = allowed[:, :, None].expand(-1, G, E // G).reshape(-1, E)
        ids = c.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # sorted: best first
        w = s.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
    else:  # pragma: no cover
        raise AssertionError(t)
    return ids.numpy(), w.numpy()


def captured_logits(model, **inputs):
    """Router logits per MoE layer, captured by forward hooks on the gate modules, and the output."""
    got: dict[int, torch.Tensor] = {}
    is_llama4 = model.config.model_type == "llama4_text"
    handles = [g.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, (out[1] if is_llama4 else out[0])
                                                                                .detach().clone()))
               for i, g in gates(model).items()]
    try:
        out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in sorted(got)], out


def ids_batch(seed=0, B=3, T=11):
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ exactness
def test_recorded_routing_is_the_family_formula(family, tmp_path):
    name, model = family
    cfg = model.config
    ids = ids_batch()
    logits, _ = captured_logits(model, input_ids=ids)
    with wb.record(model, tmp_path / "t.zarr", capture={"router": {}, "logits": {"dtype": "float32"}}):
        out = model(input_ids=ids, output_router_logits=True)
    ds = wb.open_trace(tmp_path / "t.zarr").load()
    moe = expected_moe_layers(cfg)
    assert list(ds["layer"].values) == moe == sorted(gates(model)) and len(logits) == len(moe)
    assert ds.attrs["provenance"]["model_type"] == f"transformers {cfg.model_type}"
    assert ds.attrs["provenance"]["model_class"] == type(model).__name__
    assert ds.attrs["routing"]["rule"]
    N = ids.numel()
    assert ds.sizes["token"] == N and ds.sizes["k"] == cfg.num_experts_per_tok
    for li, layer in enumerate(moe):
        want_ids, want_w = route(cfg, logits[li], gates(model)[layer])
        np.testing.assert_array_equal(ds["topk_expert"].values[:, li], want_ids, err_msg=f"{name} layer {layer}")
        np.testing.assert_allclose(ds["topk_weight"].values[:, li], want_w, rtol=1e-6, atol=0,
                                   err_msg=f"{name} layer {layer}")
        np.testing.assert_array_equal(ds["router_logits"].values[:, li], logits[li].float().numpy())
    router_logits = getattr(out, "router_logits", None)
    if router_logits is not None:  # the model's own output_router_logits, where the family provides it
        assert len(router_logits) == len(moe)
        for li, rl in enumerate(router_logits):
            np.testing.assert_array_equal(ds["router_logits"].values[:, li], rl.reshape(N, -1).float().numpy())
    # the routing description names the family's rule, per MoE layer
    desc = [layer_routing(d) for d in ds.attrs["routing"]["layers"]]
    assert [d.layer for d in desc] == moe and all(d.top_k == cfg.num_experts_per_tok for d in desc)
    first = desc[0]
    if name == "deepseek_v3":
        assert (first.score, first.selection_bias, first.n_group, first.topk_group, first.scale, first.renormalize,
                first.shared_expert) == ("sigmoid", True, 4, 2, 2.5, True, True)
    elif name == "llama4_text":
        assert (first.score, first.weight_applied_to, first.shared_expert) == ("sigmoid", "input", True)
    else:
        assert first.score == "softmax" and first.weight_applied_to == "output" and not first.selection_bias
        assert first.renormalize == (name in ("mixtral", "gpt_oss") or bool(getattr(cfg, "norm_topk_prob", False)))
        assert first.shared_expert == first.shared_expert_gate == (name == "qwen2_moe")


def test_recorded_weights_are_the_ones_the_experts_receive(family, tmp_path):
    """The weights as APPLIED: what the MoE block hands its experts module (after normalization and
    scaling), read at the experts' call, equal the recorded ones (every family but Llama 4, whose
    experts take pre-scaled inputs)."""
    name, model = family
    if name == "llama4_text":
        pytest.skip("Llama 4 scales the expert inputs; its weights are checked by the formula test")
    seen = []
    handles = []
    for layer in sorted(gates(model)):
        block = model.model.layers[layer].mlp
        handles.append(block.experts.register_forward_pre_hook(
            lambda m, args: seen.append((args[1].clone(), args[2].float().clone()))))
    ids = ids_batch(seed=5)
    try:
        with wb.record(model, tmp_path / "a.zarr"):
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    ds = wb.open_trace(tmp_path / "a.zarr").load()
    for li, (idx, w) in enumerate(seen):
        order = np.argsort(idx.numpy(), axis=1)  # slot order may differ (DeepSeek's top-k is unsorted)
        rec_order = np.argsort(ds["topk_expert"].values[:, li], axis=1)
        rec = ds["topk_expert"].values[:, li].astype(np.int64)
        np.testing.assert_array_equal(np.take_along_axis(idx.numpy(), order, 1), np.take_along_axis(rec, rec_order, 1))
        np.testing.assert_array_equal(np.take_along_axis(w.numpy(), order, 1),
                                      np.take_along_axis(ds["topk_weight"].values[:, li], rec_order, 1))


def test_shared_expert_gate_hook_points(tmp_path):
    """Qwen2-MoE's shared-expert gate: one point per MoE layer, the value the block multiplies by."""
    model = tiny_model("qwen2_moe")
    adapter = adapter_for(model)
    assert len(adapter.shared_gates) == len(adapter.routers) == 2
    got = []
    hs = [p.add(lambda p, shared_gate: got.append(shared_gate.clone())) for p in adapter.shared_gates]
    ref = []
    blocks = [model.model.layers[i].mlp for i in (1, 5)]
    hooks = [b.shared_expert_gate.register_forward_hook(lambda m, a, out: ref.append(torch.sigmoid(out)))
             for b in blocks]
    model(input_ids=ids_batch())
    for h in [*hs, *hooks]:
        h.remove()
    adapter.close()
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, ref)) and got[0].shape == (33, 1)
    assert adapter_for(tiny_model("mixtral")).shared_gates == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_unpadded_runs(family, tmp_path, side):
    name, model = family
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in (9, 4, 7)]
    T = 9
    ids = torch.full((3, T), PAD, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    kw = {}
    if side == "left":  # what generate passes: positions counted over the real tokens
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with wb.record(model, tmp_path / "pad.zarr"):
        model(input_ids=ids, attention_mask=mask, **kw)
    with wb.record(model, tmp_path / "alone.zarr"):
        for s in seqs:
            model(input_ids=s[None])
    pad, alone = wb.open_trace(tmp_path / "pad.zarr").load(), wb.open_trace(tmp_path / "alone.zarr").load()
    assert pad.sizes["token"] == 20 == alone.sizes["token"]
    for v in ("token_id", "sequence", "position", "topk_expert"):
        np.testing.assert_array_equal(pad[v].values, alone[v].values, err_msg=f"{name} {v}")
    np.testing.assert_allclose(pad["topk_weight"].values, alone["topk_weight"].values, rtol=1e-5)


def by_sequence(ds):
    order = np.lexsort((ds["position"].values, ds["sequence"].values))
    return ds.isel(token=order)


def left_padded_prompts(seed: int, lengths: tuple[int, ...]):
    """Random prompts of ``lengths`` and their left-padded batch (ids, mask), as generate takes them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, s in enumerate(prompts):
        ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
    return prompts, ids, mask


def test_generate_trace_equals_a_forward_over_the_full_text(family, tmp_path):
    """transformers' generate recorded through the adapter: prompt and decode steps in their
    sequences at the right positions, flagged generated, routed as one forward pass over prompt +
    answer (less the answer's last token: generate never runs it)."""
    name, model = family
    prompts, ids, mask = left_padded_prompts(seed=2, lengths=(7, 4))
    T, new = 7, 6
    with wb.record(model, tmp_path / "gen.zarr"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=PAD)
    answers = out[:, T:]
    with wb.record(model, tmp_path / "full.zarr"):
        for s, a in zip(prompts, answers):
            model(input_ids=torch.cat([s, a[:-1]])[None])
    gen, full = by_sequence(wb.open_trace(tmp_path / "gen.zarr").load()), wb.open_trace(tmp_path / "full.zarr").load()
    assert gen.sizes["token"] == full.sizes["token"] == 7 + 4 + 2 * (new - 1)
    for v in ("token_id", "sequence", "position", "topk_expert"):
        np.testing.assert_array_equal(gen[v].values, full[v].values, err_msg=f"{name} {v}")
    np.testing.assert_allclose(gen["topk_weight"].values, full["topk_weight"].values, rtol=1e-5)
    prompt_len = np.array([len(p) for p in prompts])[gen["sequence"].values]
    np.testing.assert_array_equal(gen["generated"].values, (gen["position"].values >= prompt_len).astype(np.int8))


def test_generate_trace_stops_a_finished_row_at_its_end_token(family, tmp_path):
    """A row that finishes before the others (its end token) is fed pads by generate while the
    others run: the trace holds its answer up to and including the end token, nothing after."""
    name, model = family
    prompts, ids, mask = left_padded_prompts(seed=5, lengths=(6, 5))
    T, new = 6, 6
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    answers = model.generate(**kw, min_new_tokens=new)[:, T:].tolist()
    # an end token that row 0 produces early and row 1 never produces before its last fed token
    stop = next((j, a) for j, a in enumerate(answers[0][:new - 2])
                if a not in answers[0][:j] and a not in answers[1][:new - 1] and a != PAD)
    j, eos = stop
    with wb.record(model, tmp_path / "gen.zarr"):
        out = model.generate(**kw, eos_token_id=eos)
    assert out[0, T + j].item() == eos and (out[0, T + j + 1:] == PAD).all()  # generate padded row 0
    with wb.record(model, tmp_path / "full.zarr"):
        model(input_ids=torch.cat([prompts[0], torch.tensor(answers[0][:j + 1])])[None])
        model(input_ids=torch.cat([prompts[1], torch.tensor(answers[1][:new - 1])])[None])
    gen, full = by_sequence(wb.open_trace(tmp_path / "gen.zarr").load()), wb.open_trace(tmp_path / "full.zarr").load()
    assert gen.sizes["token"] == full.sizes["token"] == 6 + (j + 1) + 5 + (new - 1)
    for v in ("token_id", "sequence", "position", "topk_expert"):
        np.testing.assert_array_equal(gen[v].values, full[v].values, err_msg=f"{name} {v}")
    np.testing.assert_allclose(gen["topk_weight"].values, full["topk_weight"].values, rtol=1e-5)
    assert not (gen["token_id"].values[gen["generated"].values == 1] == PAD).any()


# -------------------------------------------------------------------------------------- CLI and API
def save_checkpoint(family: str, d):
    make_llama4_tokenizer(d, vocab_size=320)
    model = tiny_model(family, seed=7)
    model.save_pretrained(d)
    return model


PROMPTS = ["the quick brown fox", "jumps over the lazy dog again and again", "hello"]


@pytest.mark.parametrize("name", NAMES)
def test_cli_traces_a_transformers_checkpoint(name, tmp_path, capsys):
    from workbench.cli import main

    d = tmp_path / name
    model = save_checkpoint(name, d)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    loader = ["--loader", "transformers"] if name == "llama4_text" else []
    assert main(["trace", str(d), "--prompts", str(prompts), "--out", str(tmp_path / "cli.zarr"), "--quiet",
                 "--batch-size", "2", "--capture", "router,logits", "--logits-dtype", "float32", *loader]) == 0
    summary = capsys.readouterr().out
    assert "traced 3 prompts" in summary and "load imbalance per MoE layer" in summary
    cli = wb.open_trace(tmp_path / "cli.zarr").load()
    assert cli.attrs["complete"] and cli.attrs["provenance"]["loader"] == "transformers"
    assert cli.attrs["provenance"]["checkpoint_fingerprint"] and cli.attrs["has_vocab"]
    # the API on the same model, one prompt at a time (no padding): the same rows
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    with wb.record(model, tmp_path / "api.zarr", capture={"router": {}, "logits": {"dtype": "float32"}}):
        for p in PROMPTS:
            model(input_ids=tok(p, return_tensors="pt")["input_ids"])
    api = wb.open_trace(tmp_path / "api.zarr").load()
    for v in ("token_id", "sequence", "position", "topk_expert", "layer"):
        np.testing.assert_array_equal(cli[v].values, api[v].values, err_msg=v)
    np.testing.assert_allclose(cli["topk_weight"].values, api["topk_weight"].values, rtol=1e-5)
    np.testing.assert_allclose(cli["router_logits"].values, api["router_logits"].values, rtol=1e-4, atol=1e-4)
    assert cli["modality"].values[0] == 2  # <|begin_of_text|> is special


def test_cli_refuses_an_unsupported_model_type(tmp_path, capsys):
    from workbench.cli import main

    d = tmp_path / "llama"
    make_llama4_tokenizer(d, vocab_size=320)
    cfg = transformers.LlamaConfig(**{k: v for k, v in BASE.items()})
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')
    assert main(["trace", str(d), "--prompts", str(prompts), "--out", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'llama' has no routing adapter" in err and "mixtral" in err and "deepseek_v3" in err
    assert not (tmp_path / "x.zarr").exists()


def test_unsupported_models_name_their_class():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE))
    with pytest.raises(AdapterError, match=r"LlamaForCausalLM \(transformers model type 'llama'\).*"
                                           r"transformers mixtral.*transformers qwen3_moe"):
        adapter_for(model)
    with pytest.raises(wb.hooks.RecorderError, match="LlamaForCausalLM"):
        wb.record(model, "/nonexistent/never-created.zarr")


# ------------------------------------------------------------------------- views and export per family
def test_views_and_export_run_on_each_family(family, tmp_path):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    from workbench.export import export_all
    from workbench.widgets import ExpertLoadDashboard, TokenRoutingView

    name, model = family
    store = tmp_path / "v.zarr"
    ids = ids_batch(seed=9, B=4, T=12)
    with wb.record(model, store, capture={"router": {}, "logits": {}}):
        model(input_ids=ids)
    ds = wb.open_trace(store).load()
    moe = expected_moe_layers(model.config)
    E, k = ds.sizes["expert"], model.config.num_experts_per_tok
    dash = ExpertLoadDashboard(str(store), mode="count")
    counts = np.stack([np.bincount(ds["topk_expert"].values[:, li].ravel(), minlength=E) for li in range(len(moe))])
    np.testing.assert_array_equal(dash.z, counts)
    assert dash.n_selected == ids.numel() and list(dash.heatmap.data[0].y) == [f"L{i}" for i in moe]
    view = TokenRoutingView(str(store), layer=moe[-1], page_size=12)
    assert view.layer == moe[-1]
    assert "span" in view.html
    res = export_all(store, tmp_path / "out", what=("tables", "data", "report"), progress=False)
    written = {p.name for p in map(__import__("pathlib").Path, res)}
    assert "report.html" in written and any(n.endswith(".csv") for n in written)
    assert k == ds.sizes["k"]


# ------------------------------------------------------------------------------ OLMoE's conventions
def small_trace(path, topk, token_ids, layers=(0,), n_experts=8):
    """A one-sequence trace with the given top-k lists (T, L, k) and token ids."""
    topk = np.asarray(topk, np.int16)
    T, L, k = topk.shape
    with TraceWriter.create(path, **routing_layout(list(layers), n_experts, k)) as w:
        w.append({"token_id": np.asarray(token_ids, np.int32), "sequence": np.zeros(T, np.int32),
                  "position": np.arange(T, dtype=np.int32), "modality": np.zeros(T, np.int8),
                  "generated": np.zeros(T, np.int8), "topk_expert": topk,
                  "topk_weight": np.full((T, L, k), 1.0 / k, np.float32)})
    return wb.open_trace(path)


def test_olmoe_coactivation_counts_neighbouring_pairs_top2_and_top8(tmp_path):
    from workbench.analysis import coactivation

    # top-2: neighbours are the one pair, so both conventions agree
    ds = small_trace(tmp_path / "k2.zarr", [[[0, 1]], [[1, 2]], [[0, 1]]], [5, 6, 7], n_experts=4)
    a, b = coactivation(ds, 0), coactivation(ds, 0, convention="olmoe")
    np.testing.assert_array_equal(np.nan_to_num(a.values, nan=-1), np.nan_to_num(b.values, nan=-1))
    assert a.attrs["convention"] == "pinned" and b.attrs["convention"] == "olmoe"
    # C[0,1] = 2/2, C[1,0] = 2/3, C[1,2] = 1/3, C[2,1] = 1/1
    assert b.values[0, 1] == 1.0 and b.values[1, 0] == pytest.approx(2 / 3) and b.values[2, 1] == 1.0
    # top-8 of 8 experts, ranked lists: only the 7 neighbouring pairs of each list count
    lists = [[3, 1, 4, 0, 5, 2, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]]
    ds = small_trace(tmp_path / "k8.zarr", [[x] for x in lists], [1, 2])
    n = coactivation(ds, 0, counts=True, convention="olmoe").values
    hand = np.zeros((8, 8), np.int64)
    for x in lists:
        for a_, b_ in zip(x[:-1], x[1:]):
            hand[a_, b_] += 1
            hand[b_, a_] += 1
    np.testing.assert_array_equal(n, hand)
    assert n.sum() == 2 * 2 * 7 and n[3, 1] == 1 and n[3, 0] == 0 and n[6, 7] == 2  # 3, 0: never neighbours
    c = coactivation(ds, 0, convention="olmoe")
    np.testing.assert_allclose(np.nan_to_num(c.values), hand / 2)  # every expert is in both lists: N_i = 2
    pinned = coactivation(ds, 0, counts=True).values
    assert pinned[3, 0] == 2 and pinned.sum() == 2 * 8 * 7  # all pairs
    with pytest.raises(ValueError, match="convention"):
        coactivation(ds, 0, convention="nope")


def test_olmoe_vocab_specialization_top1_share_tokens_seen_10_times(tmp_path):
    from workbench.analysis import vocab_specialization

    # token 5: 10 times, top-1 expert 2 seven times, 3 three times -> 0.7
    # token 6: 12 times, top-1 expert 0 six times, 1 six times -> 0.5 (tie)
    # token 7: 4 times (fewer than 10: left out), always expert 4
    rows, toks = [], []
    for tok, experts in ((5, [2] * 7 + [3] * 3), (6, [0, 1] * 6), (7, [4] * 4)):
        for e in experts:
            rows.append([[e, (e + 1) % 8], [(e + 2) % 8, e]])  # 2 layers; top-1 = the first slot
            toks.append(tok)
    ds = small_trace(tmp_path / "v.zarr", rows, toks, layers=(1, 3))
    out = vocab_specialization(ds, convention="olmoe")
    assert out.attrs["convention"] == "olmoe" and out.attrs["min_count"] == 10
    assert out["token_id"].values.tolist() == [5, 6]
    np.testing.assert_allclose(out["top_share"].values[:, 0], [0.7, 0.5])
    np.testing.assert_array_equal(out["top_expert"].values[:, 0], [2, 0])
    np.testing.assert_allclose(out["score"].values[0], 0.6)  # unweighted mean over the kept ids
    np.testing.assert_array_equal(out["top_expert"].values[:, 1], [4, 2])  # layer 3: first slot is e+2
    np.testing.assert_allclose(out["top_share"].values[:, 1], [0.7, 0.5])
    all_ids = vocab_specialization(ds, convention="olmoe", min_count=1)
    np.testing.assert_allclose(all_ids["score"].values[0], (0.7 + 0.5 + 1.0) / 3)
    assert vocab_specialization(ds).attrs["convention"] == "pinned"
    with pytest.raises(ValueError, match="convention"):
        vocab_specialization(ds, convention="nope")


def test_transformers_llama4_multimodal_records_text_and_image_tokens(tmp_path):
    """Llama4ForConditionalGeneration: routers of the language model only (the vision tower has none),
    by Llama 4's formula; image tokens marked as image patches."""
    from tests.hf_reference import IMAGE_TOKEN, TOKENS_PER_TILE, hf_multimodal_model

    hf = hf_multimodal_model(seed=4, num_experts_per_tok=2, interleave_moe_layer_step=2)
    prompt = [1, 5, 6, 7] + [IMAGE_TOKEN] * (2 * TOKENS_PER_TILE) + [8, 9, 2]
    inputs = dict(input_ids=torch.tensor([prompt]), pixel_values=torch.randn(2, 3, 56, 56))
    routers = {i: layer.feed_forward.router for i, layer in enumerate(hf.language_model.model.layers)
               if hasattr(layer.feed_forward, "router")}
    got = {}
    hs = [r.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out[1].clone()))
          for i, r in routers.items()]
    hf(**inputs)
    for h in hs:
        h.remove()
    with wb.record(hf, tmp_path / "mm.zarr"):
        hf(**inputs)
    ds = wb.open_trace(tmp_path / "mm.zarr").load()
    assert list(ds["layer"].values) == sorted(routers) == [1, 3]
    assert ds.attrs["provenance"]["model_type"] == "transformers llama4"
    np.testing.assert_array_equal(ds["modality"].values == 1, np.array(prompt) == IMAGE_TOKEN)
    for li, layer in enumerate(sorted(routers)):
        v, i = torch.topk(got[layer].float(), 2, dim=-1)
        np.testing.assert_array_equal(ds["topk_expert"].values[:, li], i.numpy())
        np.testing.assert_allclose(ds["topk_weight"].values[:, li], torch.sigmoid(v).numpy(), rtol=1e-6, atol=0)


def test_cli_max_tokens_on_a_transformers_checkpoint(tmp_path, capsys):
    from workbench.cli import main

    d = tmp_path / "mixtral"
    save_checkpoint("mixtral", d)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    args = ["trace", str(d), "--prompts", str(prompts), "--quiet", "--max-tokens", "4"]
    assert main([*args, "--out", str(tmp_path / "a.zarr")]) == 2
    assert "more than --max-tokens 4" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.zarr"), "--truncate"]) == 0
    ds = wb.open_trace(tmp_path / "b.zarr")
    assert np.bincount(ds["sequence"].values).tolist() == [4, 4, 4]  # each prompt cut to 4 tokens
