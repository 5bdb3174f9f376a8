"""Quantized weights (#14): FP8 (Maverick's official fbgemm_fp8 checkpoint layout) and int4.

References written here, independently of workbench.quant: FP8 rounds to the nearest value of
the float8_e4m3fn grid (enumerated from its 256 bit patterns, ties to the even pattern) after a
clamp; int4 uses numpy's rint (half to even) and clip. Forward passes are compared with
transformers' Llama 4 in float64 holding the dequantized weights. The Triton path runs under
TRITON_INTERPRET=1 in one subprocess (tiny shapes: the interpreter is slow).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from tests.hf_reference import hf_text_model
from tests.test_kernels import TOL, _make, _ref64, _rel
from workbench.checkpoint import CheckpointError
from workbench.kernels import moe_experts
from workbench.quant import Fp8Weight, Int4Weight, quantize_fp8, quantize_int4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------- references

def _e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite float8_e4m3fn value (float64, sorted) and whether its bit pattern is even."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = bits.view(torch.float8_e4m3fn).double()
    keep = torch.isfinite(vals) & ~((vals == 0) & (torch.arange(256) >= 128))  # one zero, no NaN
    vals, even = vals[keep], (torch.arange(256)[keep] % 2 == 0)
    order = torch.argsort(vals)
    return vals[order], even[order]


def ref_fp8(w: torch.Tensor, reduce_dim: int):
    """(dequantized float64 weight, q, scale): s = amax/448 per output channel, q = nearest grid
    value of clamp(w / s) (division in float32, as a float32 quantizer does)."""
    wf = w.float()
    amax = wf.abs().amax(dim=reduce_dim, keepdim=True)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    v = (wf / s).clamp(-448.0, 448.0).double()
    grid, even = _e4m3_grid()
    idx = torch.searchsorted(grid, v.reshape(-1)).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    flat = v.reshape(-1)
    pick_hi = (hi - flat < flat - lo) | ((hi - flat == flat - lo) & even[idx])
    q = torch.where(pick_hi, hi, lo).reshape(v.shape)
    return q * s.double(), q, s


def ref_int4(w: torch.Tensor, group: int, reduce_dim: int):
    """(dequantized float64 weight, q int): symmetric, groups of ``group`` along reduce_dim,
    s = amax/7 rounded to bfloat16, q = clip(rint(w/s), -8, 7)."""
    a = np.moveaxis(w.float().numpy(), reduce_dim, -1)  # (..., K)
    K = a.shape[-1]
    deq, qs = np.empty(a.shape, np.float64), np.empty(a.shape, np.int64)
    for g0 in range(0, K, group):
        blk = a[..., g0:g0 + group]
        amax = np.abs(blk).max(axis=-1, keepdims=True)
        s = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
        s = torch.from_numpy(s).to(torch.bfloat16).float().numpy()
        q = np.clip(np.rint(blk / s), -8, 7)
        qs[..., g0:g0 + group] = q
        deq[..., g0:g0 + group] = q * s.astype(np.float64)
    return (torch.from_numpy(np.moveaxis(deq, -1, reduce_dim)), torch.from_numpy(np.moveaxis(qs, -1, reduce_dim)))


# --------------------------------------------------------------------------- weight types

@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_fp8_matches_reference_quantization(layout):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 24, generator=g) * torch.logspace(-3, 1, 24)  # channels of very different size
    w[1, :, 5 if layout == "kn" else 0] = 0.0 if layout == "kn" else w[1, :, 0]
    if layout == "nk":
        w[1, 7, :] = 0.0  # an all-zero output channel
    rd = -2 if layout == "kn" else -1
    q = quantize_fp8(w, layout)
    deq, qv, s = ref_fp8(w, rd)
    assert isinstance(q, Fp8Weight) and q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    assert torch.equal(q.data.double(), qv) and torch.equal(q.scale, s)
    assert torch.equal(q.dequantize(torch.float64), deq)
    assert torch.isfinite(q.dequantize()).all()
    assert q.nbytes == w.numel() + 4 * s.numel()


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("group", [16, 128, 24])
def test_int4_matches_reference_quantization_and_packing(layout, group):
    g = torch.Generator().manual_seed(1)
    K, N = 56, 20  # 56 = 3 full groups of 16 + a short one; one ragged group of 128
    w = torch.randn(2, K, N, generator=g).to(torch.bfloat16)
    w[0, :16, 3] = 0  # an all-zero group
    if layout == "nk":
        w = w.transpose(1, 2).contiguous()
    rd = -2 if layout == "kn" else -1
    q = quantize_int4(w, layout, group_size=group)
    deq, qv = ref_int4(w, group, rd)
    assert isinstance(q, Int4Weight) and q.data.dtype == torch.uint8 and q.scale.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float64), deq)
    # two values per byte along K: element 2j in the low nibble, 2j+1 in the high nibble, q + 8
    d = q.data if layout == "kn" else q.data.transpose(-1, -2)
    qk = qv if layout == "kn" else qv.transpose(-1, -2)
    assert torch.equal((d & 0xF).long() - 8, qk[:, 0::2]) and torch.equal((d >> 4).long() - 8, qk[:, 1::2])
    assert q.scale.shape[rd] == math.ceil(K / group)
    assert q.nbytes == w.numel() // 2 + 2 * q.scale.numel()


def test_weight_types_refuse_bad_layouts():
    q = quantize_int4(torch.randn(4, 32, 8), group_size=16)
    with pytest.raises(ValueError, match="needs data"):
        Int4Weight(q.data, q.scale[:, :1], "kn", q.shape, group_size=16)
    with pytest.raises(ValueError, match="even"):
        quantize_int4(torch.randn(4, 31, 8))
    f = quantize_fp8(torch.randn(4, 32, 8))
    with pytest.raises(ValueError, match="one scale per output channel"):
        Fp8Weight(f.data, f.scale.transpose(1, 2))


# --------------------------------------------------------------------------- FP8 checkpoint (official format)

# Maverick-style exclusions (transformers' matching rule): attention of layers 0-2 and every
# router stay bf16; layer 3's attention, the shared experts, the dense MLPs and the routed
# experts are FP8.
SKIP = ["model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.2.self_attn",
        "model.layers.*.feed_forward.router", "model.embed_tokens", "lm_head"]
OVERRIDES = dict(interleave_moe_layer_step=2)  # layers 1, 3 MoE; 0, 2 dense


def _converted(names):
    from transformers.quantizers.quantizers_utils import should_convert_module
    return [n for n in names if should_convert_module(n, SKIP)]


def _write_fp8_checkpoint(tmp_path, hf):
    """The official layout, written here: experts gate_up_proj (E, H, 2I) / down_proj (E, I, H)
    float8_e4m3fn + float32 gate_up_proj_scale (E, 1, 2I) / down_proj_scale (E, H, 1); Linear
    weight (out, in) float8_e4m3fn + weight_scale (out, 1) float32; quantization_config in config.json."""
    float_dir, fp8_dir = tmp_path / "float", tmp_path / "fp8"
    hf.save_pretrained(float_dir)
    tensors = load_file(str(float_dir / "model.safetensors"))
    mods = dict(hf.named_modules())
    linear_or_experts = [n for n, m in mods.items()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Llama4TextExperts"]
    conv = _converted(linear_or_experts)
    deq = {}
    out = {}
    for key, t in tensors.items():
        mod, _, attr = key.rpartition(".")
        if mod in conv and attr in ("gate_up_proj", "down_proj"):
            d, q, s = ref_fp8(t, -2)  # per output channel = last dim of x @ W
            out[key] = q.to(torch.float8_e4m3fn)
            out[key + "_scale"] = s if attr == "gate_up_proj" else s.transpose(1, 2).contiguous()  # (E, H, 1)
            deq[key] = d
        elif mod in conv and attr == "weight":
            d, q, s = ref_fp8(t, -1)
            out[key], out[mod + ".weight_scale"] = q.to(torch.float8_e4m3fn), s  # (out, 1)
            deq[key] = d
        else:
            out[key] = t
            deq[key] = t.double()
    fp8_dir.mkdir()
    save_file(out, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": SKIP}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, deq, conv


def _hf64(hf, deq):
    ref = hf.double()
    ref.load_state_dict({k: v for k, v in deq.items()}, strict=False)
    return ref


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    hf = hf_text_model(seed=3, **OVERRIDES)
    return _write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"), hf) + (hf,)


def test_fbgemm_rule_matches_transformers(fp8_ckpt):
    from workbench.quant.modules import fbgemm_converts
    _, _, conv, hf = fp8_ckpt
    names = [n for n, _ in hf.named_modules() if n]
    assert [n for n in names if fbgemm_converts(n, SKIP)] == _converted(names)


def test_fp8_checkpoint_loads_and_matches_float64_reference(fp8_ckpt):
    from workbench.quant.modules import QuantizedTextExperts, QuantLinear
    path, deq, conv, hf = fp8_ckpt
    m = wb.load_model(path, dtype=torch.float32, progress=False)
    mods = dict(m.named_modules())
    assert isinstance(mods["model.layers.1.feed_forward.experts"], QuantizedTextExperts)
    assert isinstance(mods["model.layers.3.self_attn.q_proj"], QuantLinear)
    assert isinstance(mods["model.layers.0.feed_forward.gate_proj"], QuantLinear)  # dense MLP
    assert isinstance(mods["model.layers.1.feed_forward.shared_expert.up_proj"], QuantLinear)
    for n in ("model.layers.1.feed_forward.router", "model.layers.0.self_attn.q_proj", "lm_head"):
        assert type(mods[n]) is torch.nn.Linear and mods[n].weight.dtype == torch.float32, n
    assert sorted(n for n, x in mods.items() if isinstance(x, (QuantizedTextExperts, QuantLinear))) == sorted(conv)
    assert m.source["quantize"] == "fp8" and "experts" in m.source["quantize_modules"]
    assert m.source["fingerprint"] == wb.checkpoint.checkpoint_fingerprint(path)  # the bytes, as stored
    # the typed weights dequantize to exactly the values written
    ex = mods["model.layers.3.feed_forward.experts"]
    assert torch.equal(ex.down_proj.dequantize(torch.float64), deq["model.layers.3.feed_forward.experts.down_proj"])
    assert torch.equal(ex.gate_up_proj.dequantize(torch.float64),
                       deq["model.layers.3.feed_forward.experts.gate_up_proj"])
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _hf64(hf, deq)(input_ids=ids).logits
    got = m(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= 1e-5


def _mutate_fp8(path, tmp_path, fn, cfg_fn=None):
    import shutil
    new = tmp_path / "bad"
    shutil.copytree(path, new)
    t = load_file(str(new / "model.safetensors"))
    fn(t)
    save_file(t, str(new / "model.safetensors"))
    if cfg_fn is not None:
        c = json.loads((new / "config.json").read_text())
        cfg_fn(c)
        (new / "config.json").write_text(json.dumps(c))
    return new


EXP = "model.layers.1.feed_forward.experts"
BAD_FP8 = [
    ("down-scale-shape", lambda t: t.__setitem__(f"{EXP}.down_proj_scale", t[f"{EXP}.down_proj_scale"].transpose(1, 2)
                                                 .contiguous()), None, f"{EXP}.down_proj_scale", "shape"),
    ("gate-up-scale-shape", lambda t: t.__setitem__(f"{EXP}.gate_up_proj_scale", t[f"{EXP}.gate_up_proj_scale"][:, 0]),
     None, f"{EXP}.gate_up_proj_scale", "shape"),
    ("linear-scale-shape", lambda t: t.__setitem__("model.layers.3.self_attn.o_proj.weight_scale",
                                                   t["model.layers.3.self_attn.o_proj.weight_scale"][:, 0]),
     None, "model.layers.3.self_attn.o_proj.weight_scale", "shape"),
    ("missing-scale", lambda t: t.pop(f"{EXP}.gate_up_proj_scale"), None, f"{EXP}.gate_up_proj_scale", "missing"),
    ("missing-linear-scale", lambda t: t.pop("model.layers.0.feed_forward.down_proj.weight_scale"), None,
     "model.layers.0.feed_forward.down_proj.weight_scale", "missing"),
    ("scale-for-router", lambda t: t.__setitem__("model.layers.1.feed_forward.router.weight_scale", torch.ones(8, 1)),
     None, "model.layers.1.feed_forward.router.weight_scale", "not quantized"),
    ("scale-for-skipped-attention", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_scale",
                                                            torch.ones(64, 1)),
     None, "model.layers.0.self_attn.q_proj.weight_scale", "modules_to_not_convert"),
    ("scale-dtype", lambda t: t.__setitem__(f"{EXP}.down_proj_scale", t[f"{EXP}.down_proj_scale"].half()), None,
     f"{EXP}.down_proj_scale", "F32"),
    ("fp8-module-stored-bf16", lambda t: t.__setitem__(f"{EXP}.down_proj", t[f"{EXP}.down_proj"].float()), None,
     f"{EXP}.down_proj", "modules_to_not_convert"),
    ("quantized-router-without-config-entry", lambda t: None,
     lambda c: c["quantization_config"].update(modules_to_not_convert=["model.layers.0.self_attn", "lm_head"]),
     "model.layers.1.self_attn.q_proj.weight_scale", "missing"),
    ("unknown-method", lambda t: None, lambda c: c["quantization_config"].update(quant_method="gptq"),
     "config.json", "quant_method"),
]


@pytest.mark.filterwarnings("ignore:.*does not exclude the router")  # the router case warns, then fails
@pytest.mark.parametrize("name,fn,cfg_fn,key,what", BAD_FP8, ids=[b[0] for b in BAD_FP8])
def test_fp8_checkpoint_errors_name_the_key(fp8_ckpt, tmp_path, name, fn, cfg_fn, key, what):
    bad = _mutate_fp8(fp8_ckpt[0], tmp_path, fn, cfg_fn)
    with pytest.raises(CheckpointError) as e:
        wb.load_model(bad, progress=False)
    assert key in str(e.value) and what in str(e.value), str(e.value)


def test_fp8_checkpoint_refuses_quantize_argument(fp8_ckpt):
    with pytest.raises(CheckpointError, match="already quantized"):
        wb.load_model(fp8_ckpt[0], quantize="int4", progress=False)


# --------------------------------------------------------------------------- quantizing while loading

@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    hf = hf_text_model(seed=5, **OVERRIDES)
    path = tmp_path_factory.mktemp("float")
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("kind,modules", [("fp8", None), ("int4", None), ("int4", "shared_expert,dense_mlp"),
                                          ("fp8", ["attention", "shared_expert", "dense_mlp"])])
def test_quantize_while_loading_matches_reference(float_ckpt, kind, modules):
    path, hf = float_ckpt
    group = 16  # hidden 64, intermediate 32 / 48: several groups per column
    m = wb.load_model(path, dtype=torch.float32, progress=False, quantize=kind, quantize_modules=modules,
                      group_size=group)
    stored = load_file(str(path / "model.safetensors"))
    parts = set(m.source["quantize_modules"].split(","))
    assert parts == {"experts"} | set((modules.split(",") if isinstance(modules, str) else modules) or [])
    deq = {}
    mods = dict(m.named_modules())
    n_quant = 0
    for key, t in stored.items():
        mod, _, attr = key.rpartition(".")
        q = mods.get(mod)
        if attr in ("gate_up_proj", "down_proj"):
            tw = getattr(q, attr)
            want = ref_fp8(t, -2)[0] if kind == "fp8" else ref_int4(t, group, -2)[0]
        elif hasattr(q, "qweight") and attr == "weight":
            tw = q.qweight
            want = ref_fp8(t, -1)[0] if kind == "fp8" else ref_int4(t, group, -1)[0]
        else:  # router, norms, embeddings, lm_head, unselected layers: exactly as stored
            assert torch.equal(dict(m.named_parameters())[key], t), key
            deq[key] = t.double()
            continue
        n_quant += 1
        assert torch.equal(tw.dequantize(torch.float64), want), key
        deq[key] = want
    assert n_quant >= 4
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _hf64(hf, deq)(input_ids=ids).logits
    assert _rel(m(input_ids=ids).logits, ref) <= 1e-5


def test_quantize_provenance_and_never_quantized_parts(float_ckpt):
    path, _ = float_ckpt
    plain = wb.load_model(path, progress=False)
    a = wb.load_model(path, progress=False, quantize="int4")
    b = wb.load_model(path, progress=False, quantize="int4", quantize_modules="shared_expert")
    c = wb.load_model(path, progress=False, quantize="fp8")
    fps = {plain.source["fingerprint"], a.source["fingerprint"], b.source["fingerprint"], c.source["fingerprint"]}
    assert len(fps) == 4 and a.source["fingerprint"].startswith(plain.source["fingerprint"] + "+int4-g128")
    assert "quantize" not in plain.source
    from hooks.recorder import _changed_model, _model_provenance
    why = _changed_model(_model_provenance(a), _model_provenance(c))
    assert "checkpoint files" in why and "+fp8:experts" in why
    moe = [layer.feed_forward for layer in plain.model.layers if layer.is_moe_layer]
    assert _model_provenance(plain)["quantized"] == "none"
    assert _model_provenance(a)["quantized"] == f"int4-g128: {len(moe)} expert blocks"
    assert _model_provenance(b)["quantized"] == f"int4-g128: {len(moe)} expert blocks, {3 * len(moe)} linear layers"
    # quantized with the quant API after loading: the checkpoint's provenance cannot see it, the model's does
    from workbench.quant.modules import QuantizedTextExperts
    for ff in moe:
        ff.experts = QuantizedTextExperts.from_float(ff.experts, "fp8")
    after = _model_provenance(plain)
    assert after["quantized"] == f"fp8: {len(moe)} expert blocks" and "checkpoint_quantize" not in after
    why = _changed_model(_model_provenance(wb.load_model(path, progress=False)), after)
    assert why == ("it was recorded with another model setup (quantized weights in memory: stored 'none', now "
                   f"'fp8: {len(moe)} expert blocks')")
    for bad in ("router", "lm_head", "embed_tokens", "vision_model", "norm"):
        with pytest.raises(ValueError, match="never quantized"):
            wb.load_model(path, progress=False, quantize="int4", quantize_modules=[bad])
    with pytest.raises(ValueError, match="unknown part"):
        wb.load_model(path, progress=False, quantize="int4", quantize_modules="mlp")
    with pytest.raises(ValueError, match="quantize must be"):
        wb.load_model(path, progress=False, quantize="int8")


def test_random_model_quantized_equals_quantized_random_weights():
    from tests.hf_reference import TEXT
    from workbench.models.llama4.config import ModelConfig
    cfg = ModelConfig.from_dict({"architectures": ["Llama4ForCausalLM"], **TEXT})
    f = wb.random_model(cfg, seed=2)
    q = wb.random_model(cfg, seed=2, quantize="fp8")
    ex_f, ex_q = f.model.layers[0].feed_forward.experts, q.model.layers[0].feed_forward.experts
    assert torch.equal(ex_q.gate_up_proj.dequantize(torch.float64), ref_fp8(ex_f.gate_up_proj.detach(), -2)[0])
    assert q.source["quantize"] == "fp8" and "fingerprint" not in q.source


def test_routing_agreement_bf16_vs_quantized_embedded_model(capsys):
    """Reported, and asserted only a little below what was measured. Measured (torch 2.13 CPU,
    1813 tokens of the demo prompts, top-1 agreement per MoE layer; layer 0's router input does
    not depend on any expert): fp8 1.000, 0.988, 0.987, 0.986; int4 1.000, 0.952, 0.947, 0.946."""
    from workbench.embedded import default_model_dir
    path = default_model_dir()
    proc = wb.load_processor(path)
    texts = [p["text"] for p in wb.embedded.demo_prompts()][:8]
    batch = proc(text=texts, padding=True, return_tensors="pt")
    valid = batch["attention_mask"].reshape(-1).bool()

    def top1(model):
        picks = []
        hs = [layer.feed_forward.router.register_forward_hook(lambda mod, i, o: picks.append(o.argmax(-1)))
              for layer in model.language_model.model.layers if layer.is_moe_layer]
        try:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for h in hs:
                h.remove()
        return torch.stack(picks)[:, valid]

    base = top1(wb.load_model(path, dtype=torch.bfloat16, progress=False))
    agree = {}
    for kind in ("fp8", "int4"):
        got = top1(wb.load_model(path, dtype=torch.bfloat16, progress=False, quantize=kind))
        agree[kind] = (got == base).float().mean(1).tolist()
    with capsys.disabled():
        print(f"\n[routing agreement, embedded model, bf16 vs quantized experts, {int(valid.sum())} tokens] "
              + "; ".join(f"{k}: " + ", ".join(f"{a:.3f}" for a in v) for k, v in agree.items()))
    assert min(agree["fp8"]) >= 0.97 and min(agree["int4"]) >= 0.92, agree


# --------------------------------------------------------------------------- moe_experts, torch path

# id, T, H, I, E, k, ids-kind -- the cases the bf16 tests cover (tests/test_kernels.py)
Q_CASES = [
    ("k1", 37, 64, 48, 8, 1, None),
    ("k2", 37, 64, 48, 8, 2, None),
    ("k3", 13, 64, 32, 5, 3, None),
    ("T1-k1", 1, 64, 48, 8, 1, None),
    ("T1-k2", 1, 64, 48, 8, 2, None),
    ("one-expert-ragged", 33, 32, 32, 4, 1, "one"),
    ("empty-experts-k2", 21, 32, 32, 8, 2, "two"),
    ("E128-k2", 19, 32, 16, 128, 2, None),
]


def _ids_for(kind, T, E, k):
    if kind == "one":
        return torch.full((T, k), E - 2, dtype=torch.int64)
    if kind == "two":
        base = torch.tensor([1, 5])
        return torch.stack([base[torch.randperm(2)][:k] for _ in range(T)])
    return None


def _quantized_case(T, H, I, E, k, dtype, kind, ids_kind, group=16):
    x, ids, w, gu, dp = _make(T, H, I, E, k, dtype, ids=_ids_for(ids_kind, T, E, k))
    qg = quantize_fp8(gu.float()) if kind == "fp8" else quantize_int4(gu.float(), group_size=group)
    qd = quantize_fp8(dp.float()) if kind == "fp8" else quantize_int4(dp.float(), group_size=group)
    unused = sorted(set(range(E)) - set(ids.reshape(-1).tolist()))
    for q in (qg, qd):  # an unused expert must never be read
        q.scale[unused] = float("nan")
    return x, ids, w, qg, qd


@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", Q_CASES, ids=[c[0] for c in Q_CASES])
def test_moe_experts_torch_quantized(case, dtype, kind):
    _, T, H, I, E, k, ids_kind = case
    x, ids, w, qg, qd = _quantized_case(T, H, I, E, k, dtype, kind, ids_kind)
    out = torch.full((T, H), float("nan"), dtype=dtype)
    y = moe_experts(x, ids, w, qg, qd, backend="torch", out=out)
    assert y is out and torch.isfinite(y).all()
    # reference: float64 loop over the dequantized weights (rounded to x's dtype, as the path uses them)
    ref = _ref64(x, ids, w, qg.dequantize(dtype), qd.dequantize(dtype), "input")
    assert _rel(y, ref) < TOL[dtype]


def test_moe_experts_quantized_validation():
    x, ids, w, gu, dp = _make(6, 32, 16, 4, 2, torch.float32, seed=1)
    qg, qd = quantize_fp8(gu), quantize_int4(dp, group_size=16)
    assert torch.isfinite(moe_experts(x, ids, w, qg, qd)).all()  # kinds may differ per weight
    with pytest.raises(ValueError, match="down_proj must be"):
        moe_experts(x, ids, w, qg, quantize_fp8(dp[:, :8]))
    with pytest.raises(ValueError, match="x @ W layout"):
        moe_experts(x, ids, w, qg, quantize_fp8(dp, "nk"))  # right logical shape, wrong layout
    with pytest.raises(ValueError, match="workbench.quant weight"):
        moe_experts(x, ids, w, (qg.data, qg.scale), qd)


def test_quant_linear_and_cli_flag():
    from workbench.quant.modules import QuantLinear
    lin = torch.nn.Linear(64, 24, bias=True)
    x = torch.randn(5, 64)
    for kind in ("fp8", "int4"):
        q = QuantLinear.from_float(lin, kind, group_size=32)
        w = q.qweight.dequantize(torch.float64)
        assert q.weight_scale.shape == ((24, 1) if kind == "fp8" else (24, 2))
        assert _rel(q(x), x.double() @ w.T + lin.bias.double()) < 1e-6
    from workbench.cli._common import add_quantize_arguments, quantize_options
    import argparse
    ap = argparse.ArgumentParser()
    add_quantize_arguments(ap)
    assert quantize_options(ap.parse_args([])) == {}
    assert quantize_options(ap.parse_args(["--quantize", "int4", "--quantize-modules", "shared_expert"])) == \
        {"quantize": "int4", "quantize_modules": ("experts", "shared_expert")}
    with pytest.raises(SystemExit):
        ap.parse_args(["--quantize", "int3"])


# --------------------------------------------------------------------------- moe_experts, Triton interpreter

_TRITON_Q_SCRIPT = r'''
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from workbench.kernels import moe_experts
from workbench.kernels import moe_triton as mt
from workbench.quant import quantize_fp8, quantize_int4
{ref_src}
{make_src}
{rel_src}
{ids_src}
{case_src}
res = {{}}
torch.manual_seed(7)
for cid, T, H, I, E, k, ids_kind, dt, kind in json.loads(sys.argv[1]):
    dtype = getattr(torch, dt)
    x, ids, w, qg, qd = _quantized_case(T, H, I, E, k, dtype, kind, ids_kind)
    out = torch.full((T, H), float("nan"), dtype=dtype)
    y = moe_experts(x, ids, w, qg, qd, backend="triton", out=out)
    ref = _ref64(x, ids, w, qg.dequantize(torch.float32), qd.dequantize(torch.float32), "input")
    res[cid] = dict(rel=_rel(y, ref), finite=bool(torch.isfinite(y).all()), same=y.data_ptr() == out.data_ptr())
res["_cfg"] = [mt.get_config(4, 1, 16, 5120, 8192, torch.bfloat16, "cpu", quant=q)["gate_up"]["BLOCK_K"]
               for q in ("w8a16", "w4a16")]
res["_gpu_cfg"] = mt.get_config(256, 1, 16, 5120, 8192, torch.bfloat16, "Some_GPU", quant="w4a16")["BLOCK_M"]
try:
    x, ids, w, qg, qd = _quantized_case(4, 32, 32, 4, 1, torch.float32, "int4", None)
    bad = mt.get_config(4, 1, 4, 32, 32, torch.float32, "cpu", quant="w4a16")
    bad["gate_up"]["BLOCK_K"] = 16
    moe_experts(x, ids, w, qg, qd, backend="triton", config=bad)
    res["_bad"] = "no error"
except ValueError as e:
    res["_bad"] = str(e)
print("RESULT " + json.dumps(res))
'''

# tiny shapes: every program instance costs ~20 ms in the interpreter
TRITON_Q_CASES = []
for _kind in ("fp8", "int4"):
    TRITON_Q_CASES += [
        (f"{_kind}-k1-fp32", 7, 64, 32, 4, 1, None, "float32", _kind),
        (f"{_kind}-k2-fp32", 7, 64, 32, 4, 2, None, "float32", _kind),
        (f"{_kind}-k3-fp32", 5, 32, 32, 4, 3, None, "float32", _kind),
        (f"{_kind}-T1-bf16", 1, 64, 32, 4, 1, None, "bfloat16", _kind),
        (f"{_kind}-ragged-one-expert", 33, 32, 32, 4, 1, "one", "float32", _kind),
        (f"{_kind}-empty-experts", 9, 32, 32, 8, 2, "two", "float32", _kind),
        (f"{_kind}-E128-bf16", 5, 32, 32, 128, 2, None, "bfloat16", _kind),
    ]


@pytest.fixture(scope="module")
def triton_q_results():
    pytest.importorskip("triton")
    script = _TRITON_Q_SCRIPT.format(ref_src=inspect.getsource(_ref64), make_src=inspect.getsource(_make),
                                     rel_src=inspect.getsource(_rel), ids_src=inspect.getsource(_ids_for),
                                     case_src=inspect.getsource(_quantized_case))
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", script, json.dumps(TRITON_Q_CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, f"interpreter run failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("case", TRITON_Q_CASES, ids=[c[0] for c in TRITON_Q_CASES])
def test_triton_interpreter_quantized(triton_q_results, case):
    r = triton_q_results[case[0]]
    assert r["finite"], "NaN left in the output, or an unused expert's (NaN) scale was read"
    assert r["same"]
    # fp32: the kernel scales the fp32 accumulator (fp8) or rounds q*s once (int4), as the reference
    # up to float32 rounding; bf16: the interpreter truncates to bf16 (see tests/test_kernels.py)
    assert r["rel"] < (1e-5 if case[7] == "float32" else 5e-2), r


def test_triton_quant_configs(triton_q_results):
    assert triton_q_results["_cfg"] == [32, 32]
    assert triton_q_results["_gpu_cfg"] == 16  # 256 tokens / 16 experts -> the small-T bucket
    assert "must be >= 32 for int4" in triton_q_results["_bad"]
