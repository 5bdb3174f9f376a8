"""workbench vs transformers: one forward pass of the same tiny Scout-like model, side by side.

Config (issue #2): hidden 256, 16 experts top-1 + shared expert, 4 layers, 8 heads / 2 KV heads,
batch 4 x 512 tokens, float32, CPU. Both models load the same safetensors checkpoint and see
the same inputs; logits are compared before timing. Prints medians and the speed-up ratio.

    python benchmarks/model_forward.py [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=2048,
                    help="vocabulary size; the lm_head is the same work for both models, so a large "
                         "vocabulary dilutes the MoE difference (32000: lm_head ~2/3 of workbench's FLOPs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import transformers
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    import workbench as wb

    cfg = Llama4TextConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                           num_local_experts=16, num_experts_per_tok=1, attention_chunk_size=8192)
    torch.manual_seed(0)
    hf = Llama4ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = wb.load_model(d, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    ref = hf(input_ids=ids).logits
    got = ours(input_ids=ids).logits
    rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()

    def bench(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    t_hf = bench(lambda: hf(input_ids=ids))
    t_wb = bench(lambda: ours(input_ids=ids))
    T, H, I, V = args.batch * args.seq, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    attn = 2 * T * H * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    attn += 4 * args.batch * args.seq ** 2 * cfg.num_attention_heads * cfg.head_dim  # causal: half of QK^T and PV
    expert = 2 * T * 3 * H * I
    head = 2 * T * H * V
    flops_wb = cfg.num_hidden_layers * (attn / 2 + 2 * expert) + head
    flops_hf = cfg.num_hidden_layers * (attn + (cfg.num_local_experts + 1) * expert) + head
    print(f"# model forward, {args.batch} x {args.seq} tokens, vocab {V}, fp32, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, workbench {wb.__version__}")
    print(f"logits rel error workbench vs transformers: {rel:.2e}")
    print(f"matmul GFLOP: workbench {flops_wb / 1e9:.1f}, transformers {flops_hf / 1e9:.1f} "
          f"(FLOP ratio {flops_hf / flops_wb:.1f}x is the ceiling of the speed-up)")
    print(f"| variant | median ms | ratio |\n|---|---:|---:|")
    print(f"| transformers Llama4ForCausalLM (eager MoE: every expert on every token) | {t_hf:.0f} | 1.00 |")
    print(f"| workbench (sorted dispatch, selected experts only) | {t_wb:.0f} | {t_hf / t_wb:.2f}x faster |")


if __name__ == "__main__":
    main()
