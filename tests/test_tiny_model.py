"""The embedded default model data/models/tiny-llama4: loads, matches transformers, has learned the digits.

Nothing here trains the shipped model (that is ``python -m workbench.train_tiny``, ~25 min); the
training script itself is exercised for a few steps on a tiny slice.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import train_tiny as tt

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "tiny-llama4"
PROMPTS = ROOT / "data" / "prompts" / "demo.jsonl"

TEXT_PROMPT = (
    "The import statement finds a module, loads and initializes it if necessary, and defines a name in "
    "the local namespace. def mean(values):\n    return sum(values) / len(values)\n\n17 + 25 = 42\n8 * 7 = 56\n"
)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    return wb.load_model(MODEL, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def proc():
    return wb.load_processor(MODEL)


@pytest.fixture(scope="module")
def grids():
    return tt.heldout_grids(50)


# ---------------------------------------------------------------------------------------------
# Files, size, config
# ---------------------------------------------------------------------------------------------
def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "preprocessor_config.json", "processor_config.json", "README.md"):
        assert (MODEL / name).is_file(), name
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 30 * 1024 * 1024, f"{total / 1e6:.1f} MB"


def test_config_is_a_small_llama4(proc):
    cfg = wb.ModelConfig.from_pretrained(MODEL)
    t = cfg.text
    assert cfg.architecture == "Llama4ForConditionalGeneration" and cfg.vision is not None
    assert t.num_hidden_layers >= 4
    assert not all(t.uses_rope), "needs at least one NoPE (global attention) layer"
    assert any(t.uses_rope) and t.attention_chunk_size is not None and t.attention_chunk_size <= 128
    assert t.num_local_experts == 16 and t.num_experts_per_tok == 1
    assert len(t.moe_layers) >= 1
    # token ids come from the tokenizer
    tok = proc.tokenizer
    assert t.vocab_size == proc.vocab_size
    assert cfg.image_token_index == tok.token_to_id("<|patch|>")
    assert cfg.boi_token_index == tok.token_to_id("<|image_start|>")
    assert cfg.eoi_token_index == tok.token_to_id("<|image_end|>")
    assert t.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.token_to_id("<|eot|>") in t.eos_token_id
    assert t.pad_token_id == tok.token_to_id("<|finetune_right_pad|>")
    # one tile of the vision tower's size per image, no thumbnail
    ic = proc.image_config
    assert ic.tile_size == cfg.vision.image_size and ic.max_patches == 1
    assert ic.patches_per_tile == cfg.vision.tokens_per_tile == tt.TOKENS_PER_TILE


def test_model_card_reports_the_metrics():
    card = (MODEL / "README.md").read_text()
    for needle in ("Validation loss", "per-digit accuracy", "per-caption accuracy", "localized digits",
                   "coefficient of variation", "machine:", "date:"):
        assert needle in card, needle


# ---------------------------------------------------------------------------------------------
# Loading: workbench and transformers agree
# ---------------------------------------------------------------------------------------------
def test_loads_and_runs_in_float32(model, proc):
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = proc(text=[TEXT_PROMPT])
    assert batch["input_ids"].shape[1] > model.config.text.attention_chunk_size  # chunking matters
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    hf.set_attn_implementation("eager")
    return hf.eval()


def test_transformers_text_logits_match(model, proc, hf_model):
    ids = proc(text=[TEXT_PROMPT])["input_ids"]
    with torch.no_grad():
        ref = hf_model.language_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert rel_err(got, ref) <= 1e-4


def test_transformers_image_logits_match(model, proc, hf_model, grids):
    g = grids[:3]
    batch = proc(text=[tt.grid_prompt(x.labels) for x in g], images=[[x.image] for x in g])
    ids, px = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        feats = hf_model.get_image_features(pixel_values=px, return_dict=True).last_hidden_state
        proj = hf_model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        emb = hf_model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == hf_model.config.image_token_index)[..., None], proj)
        ref = hf_model.language_model(inputs_embeds=emb).logits
        got = model(**batch.model_inputs()).logits
    assert rel_err(got, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------
# What it learned: digits, and where it looks for them
# ---------------------------------------------------------------------------------------------
def _probs(query, key, scale, allowed):
    """softmax(q k^T * scale) over the allowed keys; GQA: query head h reads key head h // (Hq / Hkv)."""
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    s = (query.float() @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.fixture(scope="module")
def caption_run(model, proc, grids):
    """One teacher-forced pass over the held-out grids with every layer's attention probabilities."""
    batch = proc(text=[tt.grid_prompt(g.labels) for g in grids], images=[[g.image] for g in grids])
    layers = model.language_model.model.layers
    probs = {}

    def tap(i):
        def fn(_tap, *, query, key, scale, allowed, **_):
            probs[i] = _probs(query, key, scale, allowed)
        return fn

    handles = [layer.self_attn.hook_attn.add(tap(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits
    finally:
        for h in handles:
            h.remove()
    ids = batch["input_ids"]
    digit_ids = [proc.tokenizer.token_to_id(str(d)) for d in range(10)]
    end = (ids == proc.token_ids["<|image_end|>"]).nonzero()[:, 1]
    pos = []
    for b in range(len(grids)):
        p = [t for t in range(int(end[b]) + 1, ids.shape[1]) if int(ids[b, t]) in digit_ids]
        assert len(p) == 4
        pos.append(p)
    return batch, logits, torch.tensor(pos), probs


def test_caption_accuracy_on_heldout_grids(caption_run, grids, proc):
    batch, logits, pos, _ = caption_run
    rows = torch.arange(len(grids))[:, None]
    pred = logits[rows, pos - 1].argmax(-1)  # greedy next token at the position before each digit
    truth = batch["input_ids"][rows, pos]
    assert [[int(proc.decode([t])) for t in row] for row in truth.tolist()] == [list(g.labels) for g in grids]
    digit_acc = (pred == truth).float().mean().item()
    caption_acc = (pred == truth).all(-1).float().mean().item()
    assert digit_acc >= 0.95, digit_acc
    assert caption_acc >= 0.90, caption_acc


def test_attention_localizes_each_digit_in_its_quadrant(model, caption_run, grids):
    batch, _, pos, probs = caption_run
    n_layers = len(probs)
    last = list(range(n_layers // 2, n_layers))  # the last half of the layers
    ids = batch["input_ids"]
    patches = (ids == model.config.image_token_index).nonzero()[:, 1].view(len(grids), -1)  # (B, 16)
    side = int(round(patches.shape[1] ** 0.5))
    r, c = np.divmod(np.arange(patches.shape[1]), side)
    quadrant = torch.from_numpy((r // (side // 2)) * 2 + c // (side // 2))
    att = torch.stack([probs[i] for i in last]).mean(0).mean(1)  # layer mean, head mean: (B, T, T)
    localized = torch.zeros(len(grids), 4, dtype=torch.bool)
    for b in range(len(grids)):
        for j in range(4):
            a = att[b, pos[b, j] - 1, patches[b]]  # the query that predicts digit j
            per_quadrant = torch.zeros(4).index_add_(0, quadrant, a)
            localized[b, j] = int(per_quadrant.argmax()) == j
    rate_captions = localized.all(-1).float().mean().item()
    rate_digits = localized.float().mean().item()
    assert rate_digits >= 0.8, rate_digits
    assert rate_captions >= 0.8, rate_captions


def test_routing_is_not_collapsed(model, proc):
    batch = proc(text=[TEXT_PROMPT])
    with tt.capture_router(model) as rec, torch.no_grad():
        model(**batch.model_inputs())
    counts = tt.router_loads(rec, len(rec), model.config.text.num_local_experts)
    assert ((counts > 0).sum(-1) >= 6).all(), counts  # each layer uses many experts on one prompt
    assert (tt.load_cv(counts) < 2.0).all()


# ---------------------------------------------------------------------------------------------
# Demo prompts and images
# ---------------------------------------------------------------------------------------------
def test_demo_prompts(model, proc):
    from workbench.cli import read_prompts

    lines = [json.loads(l) for l in PROMPTS.read_text().splitlines() if l.strip()]
    assert {l["domain"] for l in lines} == {"prose", "code", "math", "image"}
    for l in lines:
        assert set(l) == {"text", "images", "domain"}
        assert l["text"].count("<|image|>") == len(l["images"]) == (1 if l["domain"] == "image" else 0)
    prompts = read_prompts(PROMPTS, None)  # image names resolve against the prompts file's folder
    assert len(prompts) == len(lines)
    nll = {}
    for line, p in zip(lines, prompts):
        batch = proc(text=[p["text"]], images=[p["images"]] if p["images"] else None)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits[0]
        assert torch.isfinite(logits).all()
        ids = batch["input_ids"][0]
        if not p["images"]:
            nll.setdefault(line["domain"], []).append(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())
    # the text prompts come from held-out documents; a uniform guess would give ln(1024) = 6.9 nats
    assert np.mean(nll["prose"]) < 3.0 and np.mean(nll["code"]) < 3.0 and np.mean(nll["math"]) < 2.0, nll


# ---------------------------------------------------------------------------------------------
# The training script works (a few steps on a tiny slice)
# ---------------------------------------------------------------------------------------------
def test_training_steps_reduce_loss_and_reach_the_router(proc):
    torch.manual_seed(0)
    ids = {t: proc.tokenizer.token_to_id(t) for t in tt.SPECIAL_IDS_NEEDED}
    cfg = tt.tiny_config(ids, hidden_size=32, intermediate_size=32)
    model = tt.new_model(cfg, seed=0)
    s = tt.TrainSettings(lr=1e-2, warmup=1, balance_coef=0.01)
    opt = tt.make_optimizer(model, s)
    rng = np.random.default_rng(0)
    img, mask = tt.image_batch(proc, rng, 4, augment=True, device="cpu")
    text = torch.randint(0, 900, (2, 80), generator=torch.Generator().manual_seed(0))
    batches = [({"input_ids": text}, None), (img, mask)]
    first = tt.train_step(model, opt, batches, s, s.lr)
    router = model.language_model.model.layers[0].feed_forward.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # through the sigmoid input scale
    experts = model.language_model.model.layers[0].feed_forward.experts.gate_up_proj
    assert experts.grad is not None and experts.grad.abs().sum() > 0  # through moe_experts' torch path
    for _ in range(6):
        last = tt.train_step(model, opt, batches, s, s.lr)
    assert last["loss0"] < first["loss0"] and last["loss1"] < first["loss1"]


def test_training_script_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    assert tt.main(["--out", str(out), "--steps", "2", "--smoke", "--quiet"]) == 0
    model = wb.load_model(out, progress=False)
    proc = wb.load_processor(out)
    assert model.config.image_token_index == proc.tokenizer.token_to_id("<|patch|>")
    assert (out / "README.md").is_file() and "per-caption accuracy" in (out / "README.md").read_text()
