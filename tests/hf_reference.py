"""Build tiny random Llama 4 checkpoints with transformers (the reference) for parity tests."""
from __future__ import annotations

import torch

TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=8, num_experts_per_tok=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.5, initializer_range=0.2,
            max_position_embeddings=512)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              vision_output_dim=48, image_size=56, patch_size=14, projector_input_dim=48,
              projector_output_dim=48, initializer_range=0.2)
IMAGE_TOKEN = 319  # 56 px tiles, 14 px patches -> 16 patches -> pixel shuffle 0.5 -> 4 tokens per tile
TOKENS_PER_TILE = 4


def hf_text_model(seed=0, **overrides):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    cfg = Llama4TextConfig(**{**TEXT, **overrides})
    m = Llama4ForCausalLM(cfg)
    m.set_attn_implementation("eager")
    return m.eval()


def hf_multimodal_model(seed=0, vision=None, **text_overrides):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Llama4Config(text_config={**TEXT, **text_overrides}, vision_config={**VISION, **(vision or {})},
                       image_token_index=IMAGE_TOKEN)
    m = Llama4ForConditionalGeneration(cfg)
    m.set_attn_implementation("eager")
    return m.eval()


def hf_router_topk(hf_text_model_or_lm, input_ids, k, inputs_embeds=None):
    """Per MoE layer (in order), the top-k expert ids (B*T, k) transformers chooses."""
    ids = []
    handles = []
    for layer in hf_text_model_or_lm.model.layers:
        if getattr(layer, "is_moe_layer", False):
            handles.append(layer.feed_forward.router.register_forward_hook(
                lambda mod, inp, out: ids.append(out[1].topk(k, dim=-1).indices)))
    try:
        with torch.no_grad():
            if inputs_embeds is not None:
                out = hf_text_model_or_lm(inputs_embeds=inputs_embeds)
            else:
                out = hf_text_model_or_lm(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return out.logits, ids
