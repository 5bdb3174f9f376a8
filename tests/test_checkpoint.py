"""Loading real safetensors checkpoints: configs, presets, and every bad input the loader names."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.checkpoint import CheckpointError, save_model
from workbench.models.llama4.config import ConfigError, ModelConfig, preset
from tests.hf_reference import hf_multimodal_model, hf_text_model



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test so other modules (kernel gradients) are unaffected."""
    with torch.no_grad():
        yield


@pytest.fixture
def text_ckpt(tmp_path):
    hf_text_model(seed=0).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_key_names_key_and_file(text_ckpt):
    _rewrite(text_ckpt, lambda t: t.pop("model.layers.2.feed_forward.router.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.feed_forward\.router\.weight.*|missing.*model\.safetensors"):
        wb.load_model(text_ckpt, progress=False)
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        wb.load_model(text_ckpt, progress=False)
    assert "model.layers.2.feed_forward.router.weight" in str(e.value)


def test_missing_key_in_sharded_checkpoint_names_the_index(tmp_path):
    hf_text_model().save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*'model\.norm\.weight'"):
        wb.load_model(tmp_path, progress=False)


def test_index_lists_key_that_its_shard_lacks(tmp_path):
    hf_text_model().save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    shard_a = wm["model.norm.weight"]
    other = next(f for f in wm.values() if f != shard_a)
    wm["model.norm.weight"] = other
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'model\.norm\.weight' is listed for {other}"):
        wb.load_model(tmp_path, progress=False)


def test_unexpected_key(text_ckpt):
    _rewrite(text_ckpt, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
        wb.load_model(text_ckpt, progress=False)


def test_shape_mismatch_names_key_and_both_shapes(text_ckpt):
    _rewrite(text_ckpt, lambda t: t.__setitem__("model.layers.1.feed_forward.experts.down_proj", torch.zeros(8, 32, 63)))
    with pytest.raises(CheckpointError, match=r"experts\.down_proj.*\(8, 32, 63\).*\(8, 32, 64\)"):
        wb.load_model(text_ckpt, progress=False)


def test_corrupt_safetensors_header(text_ckpt):
    f = text_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        wb.load_model(text_ckpt, progress=False)


def test_truncated_safetensors(text_ckpt):
    f = text_ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        wb.load_model(text_ckpt, progress=False)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        wb.load_model(tmp_path, progress=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        wb.load_model(tmp_path / "nope", progress=False)


def test_unsupported_architecture(text_ckpt):
    cfg = json.loads((text_ckpt / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (text_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="MixtralForCausalLM.*not supported"):
        wb.load_model(text_ckpt, progress=False)


def test_invalid_config_json(text_ckpt):
    (text_ckpt / "config.json").write_text("{ broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        wb.load_model(text_ckpt, progress=False)


def test_impossible_config_value(text_ckpt):
    cfg = json.loads((text_ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (text_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        wb.load_model(text_ckpt, progress=False)


def test_pickle_weights_are_refused(tmp_path):
    hf_text_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    with pytest.raises(CheckpointError, match="never unpickles"):
        wb.load_model(tmp_path, progress=False)


def test_missing_shard_file(tmp_path):
    hf_text_model().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        wb.load_model(tmp_path, progress=False)


def test_legacy_rope_scaling_layout_equals_rope_parameters(tmp_path):
    """Released checkpoints write rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf_text_model(seed=2, rope_parameters=dict(rope)).save_pretrained(tmp_path)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    new = wb.load_model(tmp_path, progress=False)(input_ids=ids).logits
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = wb.load_model(tmp_path, progress=False)(input_ids=ids).logits
    assert torch.equal(new, old)
    assert wb.load_model(tmp_path, progress=False).config.rope_scaling["factor"] == 8.0


def test_save_model_round_trip_sharded(tmp_path):
    hf = hf_multimodal_model(seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model = wb.load_model(tmp_path / "hf", progress=False)
    save_model(model, tmp_path / "ours", model.config, max_shard_bytes=50_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    again = wb.load_model(tmp_path / "ours", progress=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_presets_carry_released_shapes():
    scout, maverick = preset("scout"), preset("maverick")
    s, m = scout.parameter_counts(), maverick.parameter_counts()
    # Meta's model cards: Scout 109B total / 17B active; Maverick 400B total / 17B active.
    assert 105e9 < s["total"] < 112e9 and 16e9 < s["text_active"] < 18e9
    assert 395e9 < m["total"] < 405e9 and 16e9 < m["text_active"] < 18e9
    assert scout.text.moe_layers == list(range(48)) and maverick.text.moe_layers == list(range(1, 48, 2))
    assert scout.text.uses_rope[:4] == [True, True, True, False]
    assert scout.text.rope_scaling["rope_type"] == "llama3" and maverick.text.rope_scaling is None
    assert scout.text.use_qk_norm and not maverick.text.use_qk_norm


def test_preset_without_random_init_is_refused():
    with pytest.raises(CheckpointError, match="random_init=True"):
        wb.load_model("scout")


def test_random_init_on_tiny_overrides_runs():
    cfg = preset("scout", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, intermediate_size=16, intermediate_size_mlp=32, vocab_size=64)
    cfg.vision = None
    cfg.architecture = "Llama4ForCausalLM"
    model = wb.random_model(cfg, dtype=torch.float32)
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64) and torch.isfinite(out.logits).all()


def test_peak_host_memory_is_about_one_copy(tmp_path):
    """Meta-device build + in-place materialization: peak RSS growth ~ one copy of the weights."""
    hf_text_model(vocab_size=40000, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512, initializer_range=0.02).save_pretrained(tmp_path)
    nbytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert nbytes > 100e6
    # VmHWM (this process's own high-water mark); ru_maxrss would include the forking parent's.
    code = f"""
import torch, psutil, workbench as wb
import workbench.models.llama4.model, workbench.checkpoint  # import cost outside the measurement
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
base = psutil.Process().memory_info().rss
m = wb.load_model({str(tmp_path)!r}, progress=False)
print(hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.5 * nbytes, f"peak RSS grew by {growth / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB of weights"
