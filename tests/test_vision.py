"""workbench.models.llama4.vision against transformers' Llama 4 vision tower and projector (tiny random configs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from workbench.models.llama4.vision import MultiModalProjector, VisionConfig, VisionModel, image_features

llama4_cfg = pytest.importorskip("transformers.models.llama4.configuration_llama4")
llama4_mod = pytest.importorskip("transformers.models.llama4.modeling_llama4")

# Tiny vision configs. head_dim 16 and 8; grids 4x4 and 8x8 -> 4 and 16 tokens per tile.
TINY_56 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               vision_output_dim=32, image_size=56, patch_size=14, projector_input_dim=32,
               projector_output_dim=32, rope_theta=10000.0)
TINY_112 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=256,
                vision_output_dim=48, image_size=112, patch_size=14, projector_input_dim=48,
                projector_output_dim=48, rope_theta=500.0)
TINY_TEXT = dict(vocab_size=128, hidden_size=40, intermediate_size=32, intermediate_size_mlp=64,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                 num_local_experts=2, pad_token_id=0)
IMAGE_TOKEN = 100

# The vision_config of meta-llama/Llama-4-Scout-17B-16E-Instruct's config.json.
SCOUT_VISION_CONFIG = {
    "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
    "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
    "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
    "projector_dropout": 0.0, "projector_input_dim": 4096, "projector_output_dim": 4096,
    "rope_theta": 10000, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "vision_output_dim": 4096,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """O(1) activations and peaked attention, so that RoPE, norms and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * r)
        elif p.dim() == 2 and "positional_embedding" not in name:
            s = 1.0 / math.sqrt(p.shape[1])
            if "q_proj" in name or "k_proj" in name:
                s *= 3.0
            p.copy_(s * r)
        else:  # biases, class / positional embeddings
            p.copy_(0.3 * r)


def hf_vision(kw: dict, attn: str = "eager", seed: int = 0):
    cfg = llama4_cfg.Llama4VisionConfig(**kw)
    cfg._attn_implementation = attn
    model = llama4_mod.Llama4VisionModel(cfg).eval()
    randomize_(model, seed)
    return model


def hf_full(vkw: dict = TINY_56, seed: int = 0):
    cfg = llama4_cfg.Llama4Config(vision_config=dict(vkw), text_config=dict(TINY_TEXT),
                                  image_token_index=IMAGE_TOKEN, boi_token_index=101, eoi_token_index=102)
    cfg._attn_implementation = "eager"
    model = llama4_mod.Llama4ForConditionalGeneration(cfg).eval()
    randomize_(model.vision_model, seed)
    randomize_(model.multi_modal_projector, seed + 1)
    return model


def sub_state_dict(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ours_from_hf(hf_model, kw: dict) -> VisionModel:
    ours = VisionModel(VisionConfig.from_dict(kw)).eval()
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return ours


def pixels(n: int, size: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)


# ---------------------------------------------------------------------------------------------
# layout


def test_state_dict_keys_and_shapes_equal_checkpoint_layout():
    hf = hf_full()
    sd = hf.state_dict()
    cfg = VisionConfig.from_dict(TINY_56)
    ours_v, ours_p = VisionModel(cfg), MultiModalProjector(cfg, TINY_TEXT["hidden_size"])
    for ours, prefix in ((ours_v, "vision_model."), (ours_p, "multi_modal_projector.")):
        ref = {k: tuple(v.shape) for k, v in sub_state_dict(sd, prefix).items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == ref, (prefix, set(got) ^ set(ref))
        ours.load_state_dict(sub_state_dict(sd, prefix), strict=True)
    assert list(ours_p.state_dict()) == ["linear_1.weight"]


def test_scout_size_layout_matches_transformers_on_meta():
    hf_cfg = llama4_cfg.Llama4VisionConfig(**{k: v for k, v in SCOUT_VISION_CONFIG.items() if k != "model_type"})
    cfg = VisionConfig.from_dict(SCOUT_VISION_CONFIG)
    with torch.device("meta"):
        hf = llama4_mod.Llama4VisionModel(hf_cfg)
        ours = VisionModel(cfg)
    ref = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == ref
    assert got["patch_embedding.linear.weight"] == (1408, 588)
    assert got["positional_embedding_vlm"] == (577, 1408)
    assert got["vision_adapter.mlp.fc1.weight"] == (4096, 5632)
    assert cfg.tokens_per_tile == 144
    assert not list(ours.buffers())


# ---------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("kw", [TINY_56, TINY_112], ids=["56px", "112px"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vision_features_match_transformers_float32(kw, attn):
    hf = hf_vision(kw, attn)
    ours = ours_from_hf(hf, kw)
    pv = pixels(3, kw["image_size"])
    with torch.no_grad():
        ref = hf(pv).last_hidden_state
        out = ours(pv)
    cfg = VisionConfig.from_dict(kw)
    assert out.shape == ref.shape == (3, cfg.tokens_per_tile, kw["vision_output_dim"])
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("kw", [TINY_56, TINY_112], ids=["56px", "112px"])
def test_vision_features_match_transformers_float64(kw):
    hf = hf_vision(kw, "eager").double()
    ours = ours_from_hf(hf, kw).double()
    pv = pixels(2, kw["image_size"], dtype=torch.float64)
    with torch.no_grad():
        ref = hf(pv).last_hidden_state
        out = ours(pv)
    assert out.dtype == ref.dtype == torch.float64
    # transformers rounds q/k through float32 inside its RoPE even for float64 inputs; we do not.
    assert rel_err(out, ref) <= 1e-6


def test_float64_run_agrees_with_float32_run():
    hf = hf_vision(TINY_56, "eager")
    ours32 = ours_from_hf(hf, TINY_56)
    ours64 = copy.deepcopy(ours32).to(torch.float64)  # safe: no complex RoPE buffer to mangle
    pv = pixels(2, 56)
    with torch.no_grad():
        assert rel_err(ours32(pv), ours64(pv.double())) <= 1e-5


def test_meta_init_then_assign_load_matches():
    """The big-checkpoint path: build on the meta device, load real tensors with assign=True."""
    hf = hf_vision(TINY_112, "eager")
    with torch.device("meta"):
        ours = VisionModel(VisionConfig.from_dict(TINY_112))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ours.eval()
    pv = pixels(2, 112)
    with torch.no_grad():
        assert rel_err(ours(pv), hf(pv).last_hidden_state) <= 1e-5


def test_bfloat16_close_to_float32_reference():
    hf = hf_vision(TINY_56, "eager")
    ours = ours_from_hf(hf, TINY_56).to(torch.bfloat16)
    pv = pixels(2, 56)  # float32 input is cast to the parameters' dtype
    with torch.no_grad():
        ref = hf(pv).last_hidden_state
        out = ours(pv)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 5e-2


def test_rope_theta_is_used():
    """The tolerance above has teeth: a different RoPE base gives a clearly different output."""
    hf = hf_vision(TINY_56, "eager")
    wrong = VisionModel(VisionConfig.from_dict({**TINY_56, "rope_theta": 7.0})).eval()
    wrong.load_state_dict(hf.state_dict(), strict=True)
    pv = pixels(2, 56)
    with torch.no_grad():
        assert rel_err(wrong(pv), hf(pv).last_hidden_state) > 1e-3


def test_get_image_features_and_projector_match_transformers():
    hf = hf_full()
    sd = hf.state_dict()
    cfg = VisionConfig.from_dict(hf.config.vision_config.to_dict())
    ours_v = VisionModel(cfg).eval()
    ours_p = MultiModalProjector(cfg, hf.config.text_config.hidden_size).eval()
    ours_v.load_state_dict(sub_state_dict(sd, "vision_model."), strict=True)
    ours_p.load_state_dict(sub_state_dict(sd, "multi_modal_projector."), strict=True)

    n_tiles = 3
    pv = pixels(n_tiles, 56, seed=5)
    with torch.no_grad():
        feats_ref = hf.get_image_features(pixel_values=pv).last_hidden_state
        # what Llama4ForConditionalGeneration.forward does with them (forward itself is not called)
        proj_ref = hf.multi_modal_projector(feats_ref.view(-1, feats_ref.size(-1)))
        feats = ours_v(pv)
        proj = image_features(ours_v, ours_p, pv)
    assert feats.shape == feats_ref.shape == (n_tiles, cfg.tokens_per_tile, cfg.vision_output_dim)
    assert rel_err(feats, feats_ref) <= 1e-5
    assert proj.shape == proj_ref.shape == (n_tiles * cfg.tokens_per_tile, TINY_TEXT["hidden_size"])
    assert rel_err(proj, proj_ref) <= 1e-5

    # Scatter into the <|patch|> positions: same as transformers' placeholder mask + masked_scatter.
    n_img = n_tiles * cfg.tokens_per_tile
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * (n_img // 2) + [7] + [IMAGE_TOKEN] * (n_img - n_img // 2) + [8]])
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        mask = hf.get_placeholder_mask(ids, inputs_embeds=emb, image_features=proj_ref)
        ref_emb = emb.masked_scatter(mask, proj_ref.to(emb.dtype))
        ours_emb = emb.clone()
        ours_emb[ids == IMAGE_TOKEN] = proj.to(emb.dtype)
    assert rel_err(ours_emb, ref_emb) <= 1e-5


def test_tiles_are_independent_and_kept_in_order():
    hf = hf_vision(TINY_56, "eager")
    cfg = VisionConfig.from_dict(TINY_56)
    ours = ours_from_hf(hf, TINY_56)
    proj = MultiModalProjector(cfg, 24).eval()
    pv = pixels(4, 56, seed=9)
    with torch.no_grad():
        together = image_features(ours, proj, pv)
        one_by_one = torch.cat([image_features(ours, proj, pv[i:i + 1]) for i in range(4)])
        reversed_ = image_features(ours, proj, pv.flip(0))
        empty = image_features(ours, proj, pv[:0])
    t = cfg.tokens_per_tile
    assert torch.allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    assert torch.allclose(together[:t], reversed_[-t:], rtol=1e-5, atol=1e-6)
    assert empty.shape == (0, 24)


# ---------------------------------------------------------------------------------------------
# errors and config


@pytest.mark.parametrize("shape", [(2, 3, 56, 57), (2, 1, 56, 56), (3, 56, 56), (2, 3, 112, 112)])
def test_wrong_pixel_shape_names_expected_and_got(shape):
    ours = VisionModel(VisionConfig.from_dict(TINY_56))
    with pytest.raises(ValueError) as e:
        ours(torch.zeros(shape))
    msg = str(e.value)
    assert "(n_tiles, 3, 56, 56)" in msg and str(tuple(shape)) in msg


def test_integer_pixels_rejected():
    ours = VisionModel(VisionConfig.from_dict(TINY_56))
    with pytest.raises(ValueError, match="floating-point"):
        ours(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_defaults_are_scout_and_from_dict_reads_released_config():
    assert VisionConfig() == VisionConfig.from_dict(SCOUT_VISION_CONFIG)
    cfg = VisionConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1408, 34, 16)
    assert cfg.intermediate_size == 5632
    assert (cfg.image_size, cfg.patch_size, cfg.vision_output_dim, cfg.rope_theta) == (336, 14, 4096, 10000.0)
    assert (cfg.num_patches, cfg.tokens_per_tile, cfg.head_dim) == (576, 144, 88)
    # transformers 5 serialisation: rope_parameters dict, plus an unknown key
    d = {**SCOUT_VISION_CONFIG, "some_future_key": 1}
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    assert VisionConfig.from_dict(d) == cfg
    assert VisionConfig.from_dict({**SCOUT_VISION_CONFIG, "image_size": [336, 336]}).image_size == 336
    # round trip through transformers' own config
    hf_cfg = llama4_cfg.Llama4VisionConfig(**TINY_112)
    assert VisionConfig.from_dict(hf_cfg.to_dict()) == VisionConfig(**TINY_112)


@pytest.mark.parametrize("patch, key", [
    ({"image_size": 100}, "image_size"),
    ({"num_attention_heads": 15}, "num_attention_heads"),
    ({"intermediate_size": 4096}, "intermediate_size"),
    ({"vision_output_dim": 5120}, "vision_output_dim"),
    ({"projector_output_dim": 2048, "vision_output_dim": 2048}, "projector_input_dim"),
    ({"hidden_size": "1408"}, "hidden_size"),
    ({"pixel_shuffle_ratio": 0.0}, "pixel_shuffle_ratio"),
    ({"image_size": 350}, "pixel_shuffle_ratio"),  # 25x25 grid cannot be halved
    ({"image_size": [336, 448]}, "image_size"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope_type"),
    ({"rope_theta": -1}, "rope_theta"),
])
def test_impossible_config_values_raise_naming_the_key(patch, key):
    with pytest.raises(ValueError, match=key):
        VisionConfig.from_dict({**SCOUT_VISION_CONFIG, **patch})
