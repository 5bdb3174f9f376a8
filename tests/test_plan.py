"""The memory planner (workbench.runtime.plan, ``wb.plan``, ``workbench plan``): weights against a
meta-device model of the same config, the KV cache against KVCache's allocation, the activation
estimate against the measured peak on CPU, verdicts against hand arithmetic, the CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import workbench as wb
from workbench.models.llama4.model import build_model
from workbench.runtime.attend import MASK_BUDGET
from workbench.runtime.kv_cache import KVCache
from workbench.runtime.plan import CARDS, PARTS, PlanError, kv_cache_bytes, parse_gpus, plan

GiB = 1 << 30
H100 = 81559 << 20  # nvidia-smi's total for an H100 80GB
H200 = 143771 << 20


# ------------------------------------------------------------------------- independent reference
def _part(name: str) -> str:
    if name.startswith(("vision_model.", "multi_modal_projector.")):
        return "vision"
    if ".self_attn." in name:
        return "attention"
    if "feed_forward.experts." in name:
        return "routed_experts"
    if "feed_forward.router." in name:
        return "router"
    if "feed_forward.shared_expert." in name:
        return "shared_expert"
    if ".feed_forward." in name:
        return "dense_mlp"
    if name.endswith("norm.weight"):
        return "norms"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings"
    raise AssertionError(f"unclassified parameter {name}")


def _reference_bytes(model, quantize: str, modules=()) -> dict[str, int]:
    """Bytes by part from the meta model's parameter shapes, with the layouts the issue states:
    bf16 2 bytes; FP8 1 byte + float32 scale per output channel; int4 2 values per byte along the
    reduction dim + one bf16 scale per group of 128 along it. Experts (E, red, out) in x @ W layout,
    Linear weights (out, red)."""
    out = dict.fromkeys(PARTS, 0)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = _part(name)
        q = quantize != "none" and (part == "routed_experts" or (part in modules and name.endswith("weight")))
        if not q:
            out[part] += p.numel() * 2
            continue
        if part == "routed_experts":
            E, red, n_out = p.shape
            rows = E * n_out
        else:
            n_out, red = p.shape
            rows = n_out
        if quantize == "fp8":
            out[part] += rows * red + rows * 4
        else:
            out[part] += rows * math.ceil(red / 2) + rows * math.ceil(red / 128) * 2
    return out


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: build_model(wb.preset(name)).to(torch.bfloat16) for name in ("scout", "maverick")}


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("quantize,modules", [("none", ()), ("fp8", ()), ("int4", ()),
                                              ("fp8", ("shared_expert", "dense_mlp")),
                                              ("int4", ("shared_expert",)), ("int4", ("shared_expert", "dense_mlp")),
                                              ("int4", ("attention", "shared_expert", "dense_mlp"))])
def test_weights_equal_the_meta_model(meta_models, name, quantize, modules):
    model = meta_models[name]
    p = plan(name, "1xH200-141GB", quantize, quantize_modules=modules, context=1024)
    if quantize == "none":  # the plain sum of parameter bytes of the meta-device model
        assert p.weights_total == sum(t.numel() * t.element_size() for t in model.parameters())
        assert sum(p.params.values()) == sum(t.numel() for t in model.parameters())
    assert p.weights == _reference_bytes(model, quantize, modules)


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("quantize,modules", [("fp8", ()), ("int4", ()), ("int4", ("shared_expert", "dense_mlp")),
                                              ("fp8", ("attention", "shared_expert", "dense_mlp"))])
def test_weights_equal_the_loaders_quantized_meta_model(name, quantize, modules):
    """The same totals as the quantized structure workbench.quant builds for loading (on the meta device)."""
    Q = pytest.importorskip("workbench.quant.modules")
    with torch.device("meta"):
        model = build_model(wb.preset(name)).to(torch.bfloat16)
        Q.apply_structure(model, Q.select_modules(model, Q.parse_modules(modules)), quantize)
    got = dict.fromkeys(PARTS, 0)
    for pname, t in model.named_parameters():
        got[_part(pname)] += t.numel() * t.element_size()
    assert wb.plan(name, "1xH200-141GB", quantize, quantize_modules=modules, context=1024).weights == got


def test_weights_of_a_text_only_checkpoint_with_tied_embeddings(tmp_path):
    cfg = wb.ModelConfig(text=wb.TextConfig(vocab_size=500, hidden_size=256, intermediate_size=384,
                                            intermediate_size_mlp=640, num_hidden_layers=4, num_attention_heads=4,
                                            num_key_value_heads=2, interleave_moe_layer_step=2,
                                            tie_word_embeddings=True, attention_bias=True),
                         vision=None, architecture="Llama4ForCausalLM")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with torch.device("meta"):
        model = build_model(cfg).to(torch.bfloat16)
    for q in ("none", "fp8", "int4"):
        p = plan(tmp_path, quantize=q, quantize_modules="shared_expert,dense_mlp", context=64)
        ref = _reference_bytes(model, q, ("shared_expert", "dense_mlp"))
        # attention biases stay bf16 (only weights are quantized; attention never is)
        assert p.weights == ref, q
        assert p.weights["vision"] == 0 and p.params["embeddings"] == 500 * 256  # tied: counted once


# ------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("B,T,block", [(1, 50, 8), (3, 200, 16), (2, 20, 64), (1, 72, 8)])
def test_kv_cache_equals_the_allocation(B, T, block):
    text = wb.TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         attention_chunk_size=64)
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        cache = KVCache(text, B, T, block=block, dtype=dtype)
        assert kv_cache_bytes(text, B, T, block, name) == cache.nbytes()


# ----------------------------------------------------------------------------- activations on CPU
_RSS_SCRIPT = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
import workbench as wb
from workbench.embedded import EMBEDDED_MODEL
B, T, block = (int(x) for x in sys.argv[1:4])
m = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
m.prefill_chunk = block
ids = torch.randint(3, m.config.text.vocab_size - 20, (B, T), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(input_ids=ids[:, :2 * block])  # warm-up on the blocked path (allocator, thread pools)
page = os.sysconf("SC_PAGE_SIZE")
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
try:  # reset the high-water mark (Linux >= 4.0), so the peak is this pass's, whatever came before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = int(open("/proc/self/statm").read().split()[1]) * page
peak0 = hwm()
with torch.no_grad():
    out = m(input_ids=ids)
peak = hwm()
print(json.dumps({"increase": peak - base, "moved": peak > peak0 or reset}))
"""


@pytest.mark.parametrize("B,T,block", [(2, 16384, 1024), (4, 6144, 1024)])
def test_activation_estimate_bounds_the_measured_peak_on_cpu(B, T, block):
    """Embedded model, float32, one process per measurement: the peak RSS increase of a blocked
    prefill stays under the plan's activations + KV cache (everything but the weights)."""
    from workbench.embedded import EMBEDDED_MODEL

    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(B), str(T), str(block)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["moved"], "the measured pass did not raise the process's peak RSS above the warm-up's"
    p = wb.plan(EMBEDDED_MODEL, context=T, batch=B, block=block, dtype="float32")
    estimate = p.activations + p.kv_cache
    print(f"B={B} T={T} block={block}: measured peak increase {got['increase'] / 2**20:.1f} MiB, "
          f"estimate {estimate / 2**20:.1f} MiB (x{estimate / got['increase']:.2f})")
    assert got["increase"] <= estimate


# ------------------------------------------------------------------------- verdicts by hand
def _scout_hand(quantize_bytes_experts: int, context: int, logits_to_keep: int = 0) -> int:
    """Scout on one GPU, batch 1, block 4096, router capture: total bytes by hand from the released config."""
    H, D, V, E, N, L = 5120, 128, 202048, 16, 8192, 48
    attention = L * (H * 40 * D + 2 * H * 8 * D + 40 * D * H) * 2
    shared = L * 3 * H * N * 2
    router = L * E * H * 2
    norms = (2 * L + 1) * H * 2
    embeddings = 2 * V * H * 2
    vision = wb.preset("scout").parameter_counts()["vision"] * 2
    weights = attention + quantize_bytes_experts + shared + router + norms + embeddings + vision
    # KV: 12 NoPE layers keep every token, 36 RoPE layers a ring of 8192 + 4096 slots; per slot and
    # layer 2 x 8 x 128 bf16 values; per slot, once for each kind of layer (the layers of a kind
    # share it): position (8) + valid (1) per row + index (8)
    slot, meta = 2 * 8 * D * 2, 8 + 1 + 8
    ring = min(context, 8192 + 4096)
    kv = 12 * context * slot + 36 * ring * slot + (context + ring) * meta
    hidden = 2 * context * H * 2
    logits = (context if logits_to_keep == 0 else logits_to_keep) * V * 2
    working = 12 * 4096 * (2 * 16384) * 2 + 5 * MASK_BUDGET  # widest: 2 x intermediate_size_mlp
    dequant = 3 * H * N * 2 if quantize_bytes_experts != L * E * 3 * H * N * 2 else 0
    recorder = 4096 * L * 1 * (2 * 8 + 2 * 2 + 4)
    return weights + kv + hidden + logits + working + dequant + recorder + GiB


def test_scout_int4_on_one_h100_at_32k_by_hand():
    H, E, N, L = 5120, 16, 8192, 48  # N: intermediate_size
    int4_experts = L * E * (2 * N * H // 2 + 2 * N * (H // 128) * 2 + H * N // 2 + H * (N // 128) * 2)
    p = wb.plan("scout", "1xH100-80GB", "int4", context=32768, batch=1)
    want = _scout_hand(int4_experts, 32768)
    assert p.total_bytes == want
    assert p.capacity_bytes == H100
    # ~89 GiB with the logits of every token (12.3 GiB of them): does not fit one H100
    assert not p.fits and want > H100
    assert p.verdict.startswith("DOES NOT FIT") and "short by" in p.verdict
    # keeping the last token's logits only (generation), it fits with ~10 GiB to spare
    q = wb.plan("scout", "1xH100-80GB", "int4", context=32768, batch=1, logits_to_keep=1)
    assert q.total_bytes == _scout_hand(int4_experts, 32768, logits_to_keep=1) < H100
    assert q.fits and q.verdict.startswith("FITS") and "cheapest configuration that fits" in q.verdict
    # bf16 Scout (~203 GiB of weights) fits no single card
    bf = wb.plan("scout", "1xH200-141GB", "none", context=32768, logits_to_keep=1)
    assert not bf.fits and bf.weights_total > 200 * GiB


def test_cheapest_configuration_is_the_first_that_fits():
    p = wb.plan("scout", "1xH100-80GB", "int4", context=32768)
    assert p.cheapest["gpus"] == "1xH200-141GB" and p.cheapest["quantize"] == "fp8"
    for gpus, q in [("1xH100-80GB", "none"), ("1xH100-80GB", "fp8"), ("1xH100-80GB", "int4"),
                    ("1xH200-141GB", "none")]:
        assert not wb.plan("scout", gpus, q, context=32768).fits, (gpus, q)
    assert wb.plan("scout", "1xH200-141GB", "fp8", context=32768).fits
    assert "Cheapest configuration that fits: --gpus 1xH200-141GB --quantize fp8" in p.verdict
    huge = wb.plan("scout", "8xH200-141GB", "int4", context=10_000_000, batch=8)
    assert huge.cheapest is None and "No configuration tried" in huge.verdict


def test_maverick_fp8_on_eight_h100_by_hand(meta_models):
    model = meta_models["maverick"]
    ref = _reference_bytes(model, "fp8")
    replicated = ref["router"] + ref["norms"] + ref["vision"]
    per_gpu = (sum(ref.values()) - replicated) // 8 + replicated  # every split dim divides by 8
    # ... except down_proj's per-output-channel scales: its reduction dim I is split, its H output
    # channels are not, so every rank holds all of them (E x H float32 per MoE layer)
    down_scales = 24 * 128 * 5120 * 4
    per_gpu += down_scales - down_scales // 8
    p = wb.plan("maverick", "8xH100-80GB", "fp8", context=32768, batch=1, logits_to_keep=1)
    assert p.weights_total == per_gpu
    H, V, N = 5120, 202048, 8192
    slot, meta = 2 * 1 * 128 * 2, 8 + 1 + 8  # one KV head per rank; slot metadata once per kind of layer
    kv = 12 * 32768 * slot + 36 * (8192 + 4096) * slot + (32768 + 8192 + 4096) * meta
    assert p.kv_cache == kv
    acts = 2 * 32768 * H * 2 + V * 2 + 12 * 4096 * 2 * 16384 * 2 + 5 * MASK_BUDGET + 3 * H * (N // 8) * 2
    assert p.activations == acts
    rec = 4096 * 24 * (2 * 8 + 2 * 2 + 4)  # 24 MoE layers
    assert p.total_bytes == per_gpu + kv + acts + rec + GiB
    assert p.fits and p.total_bytes < H100  # ~51 GiB per GPU
    assert "per GPU" in p.verdict
    # Maverick in bf16 (~750 GiB) does not fit 8 H100s
    assert not wb.plan("maverick", "8xH100-80GB", "none", context=32768).fits


def test_recorder_buffers_follow_the_captures():
    base = wb.plan("scout", context=8192)
    full = wb.plan("scout", context=8192, capture="router,logits,attention", image_tiles=1)
    N, L, E, k = 4096, 48, 16, 1
    assert base.recorder == N * L * k * (2 * 8 + 2 * 2 + 4)
    P = 144  # one 336 px tile: (336/14)^2 * 0.5^2
    assert full.recorder_parts["logits capture"] == 2 * N * L * E * 2
    assert full.recorder_parts["attention capture"] == 40 * (N - P) * P * 2 + (128 << 20)
    assert full.recorder_host == 5 * N * L * k * 12 + 5 * N * L * E * 2 + N * L * E * 4 + 5 * L * 40 * (N - P) * P * 2


def test_recorder_host_counts_queue_places_of_at_least_256_tokens():
    """With per-token captures a queue place holds at least PLACE_TOKENS tokens (short passes are
    batched for the writer), so a small block's host figure counts 4 places of 256 tokens."""
    from workbench.hooks.inbox import PLACE_TOKENS

    assert PLACE_TOKENS == 256
    N, L, E, k = 16, 48, 16, 1
    p = wb.plan("scout", context=8192, block=N, capture="router,logits")
    assert p.recorder_host == (4 * 256 + N) * L * k * 12 + (4 * 256 + N) * L * E * 2 + N * L * E * 4
    big = wb.plan("scout", context=8192, block=512, capture="router")
    assert big.recorder_host == 5 * 512 * L * k * 12  # places of the pass's own size above the floor


def test_gpu_specs_and_bad_requests():
    assert parse_gpus("8xH100-80GB").count == 8 and parse_gpus("1xh200-141GB").memory == CARDS["H200-141GB"] == H200
    assert parse_gpus("2xA100-40GB").memory == 40 * GiB
    for bad in ("2xH100", "H100-80GB", "0xH100-80GB", "8x-80GB", ""):
        with pytest.raises(PlanError, match="GPU spec"):
            plan("scout", bad)
    with pytest.raises(PlanError, match="quantize mode 'int8'"):
        plan("scout", quantize="int8")
    with pytest.raises(PlanError, match="unknown module 'router'"):
        plan("scout", quantize="int4", quantize_modules=["router"])
    with pytest.raises(PlanError, match="capture 'hidden'"):
        plan("scout", capture="router,hidden")
    with pytest.raises(PlanError, match="context must be a positive integer"):
        plan("scout", context=0)
    with pytest.raises(PlanError, match="cannot split num_attention_heads=40"):
        plan("scout", "3xH100-80GB")
    with pytest.raises(wb.ConfigError, match="unknown preset|no config.json"):
        plan("llama5")


def test_wb_plan_is_the_api_and_to_dict_matches():
    from workbench.runtime import plan as module

    assert wb.plan is module.plan
    p = wb.plan("maverick", "8xH100-80GB", "fp8", context=4096)
    d = p.to_dict()
    assert d["total_bytes"] == p.total_bytes and d["weights"] == p.weights and d["fits"] == p.fits
    text = str(p)
    for label in ("attention", "routed experts", "shared expert", "dense MLP", "embeddings", "vision", "KV cache",
                  "activations per prefill block", "recorder buffers", "total per GPU", "capacity per GPU"):
        assert label in text, label


# ------------------------------------------------------------------------------------------ CLI
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_the_plan_and_the_verdict():
    res = run_cli("scout", "--gpus", "1xH100-80GB", "--quantize", "int4", "--context", "32k", "--batch", "1")
    assert res.returncode == 0, res.stderr
    assert "DOES NOT FIT" in res.stdout and "Cheapest configuration that fits: --gpus 1xH200-141GB" in res.stdout
    assert re.search(r"routed experts\s+96\.64B params", res.stdout)
    res = run_cli("maverick", "--gpus", "8xH100-80GB", "--quantize", "fp8", "--context", "32768",
                  "--capture", "router,logits,attention", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    p = wb.plan("maverick", "8xH100-80GB", "fp8", context=32768, capture=("router", "logits", "attention"))
    assert d["total_bytes"] == p.total_bytes and d["weights"] == p.weights and d["fits"] is True


@pytest.mark.parametrize("args,match", [
    (("scout", "--gpus", "2xH100"), "bad GPU spec '2xH100'"),
    (("scout", "--quantize", "int3"), "unknown quantize mode 'int3'"),
    (("scout", "--context", "lots"), "--context: expected a positive integer"),
    (("scout", "--batch", "0"), "--batch: must be at least 1"),
    (("/nonexistent/ckpt",), "no config.json"),
])
def test_cli_bad_input_is_one_line_exit_2(args, match):
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workbench plan: error: ") and match in lines[0], res.stderr
