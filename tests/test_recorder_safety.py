"""The recorder never leaves a trace that looks complete but is wrong: resume refuses another model
setup, NaN router weights stop the recording, and commits are timed (cheap, a kill loses ~1 s)."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.embedded import EMBEDDED_MODEL
from workbench.hooks import RecorderError
from workbench.hooks.interventions import moe_layers


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def proc():
    return wb.load_processor(EMBEDDED_MODEL)


def _partial_store(path, model, proc=None):
    rec = wb.record(model, path, processor=proc)
    with rec:
        rec.run(model, proc, ["left 3 right"], progress=False) if proc is not None else model(
            input_ids=torch.tensor([[5, 6, 7, 8]]))
        rec.close(complete=False)


def test_resume_with_the_same_model_continues(tmp_path, proc):
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    _partial_store(tmp_path / "t.zarr", model, proc)
    with wb.record(model, tmp_path / "t.zarr", resume=True, processor=proc) as rec:
        rec.run(model, proc, ["left 3 right", "a b"], progress=False)
    ds = wb.open_trace(tmp_path / "t.zarr")
    assert ds.attrs["complete"] and sorted(set(ds["sequence"].values.tolist())) == [0, 1]


def test_resume_refuses_another_dtype_tokenizer_or_weights(tmp_path, proc):
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    _partial_store(tmp_path / "t.zarr", model, proc)
    bf16 = wb.load_model(EMBEDDED_MODEL, dtype=torch.bfloat16, progress=False)
    with pytest.raises(RecorderError, match=r"another model setup \(dtype: stored 'float32', now 'bfloat16'\)"):
        wb.record(bf16, tmp_path / "t.zarr", resume=True, processor=proc)
    with pytest.raises(RecorderError, match=r"tokenizer: stored '[0-9a-f]+', now None"):
        wb.record(model, tmp_path / "t.zarr", resume=True)
    # a copy of the checkpoint with one value changed: same shapes, other weights
    other = tmp_path / "other"
    shutil.copytree(EMBEDDED_MODEL, other)
    tensors = load_file(other / "model.safetensors")
    name = next(k for k in tensors if k.endswith("feed_forward.router.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 1e-3
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    changed = wb.load_model(other, progress=False)
    with pytest.raises(RecorderError, match=r"checkpoint files \(fingerprint of config.json and the weight "
                                            r"files\): stored '[0-9a-f]+', now"):
        wb.record(changed, tmp_path / "t.zarr", resume=True, processor=proc)
    # every refusal left the store as it was: still resumable by the right model
    with wb.record(model, tmp_path / "t.zarr", resume=True, processor=proc):
        pass


def test_nan_router_weights_stop_the_recording(tmp_path):
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    moe_layers(model)[2].router.weight[3] = float("nan")  # every token's logit of expert 3 at layer 2 is NaN
    rec = wb.record(model, tmp_path / "t.zarr").attach()
    model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    with pytest.raises(RecorderError, match=r"non-finite router weights \(4 token\(s\); first: sequence 0, "
                                            r"position 0, decoder layer 2"):
        rec.close()
    ds = wb.open_trace(tmp_path / "t.zarr")
    assert ds.attrs["complete"] is False and ds.sizes["token"] == 0


def test_commits_are_timed(tmp_path):
    """Passes are staged until commit_every_seconds have passed (also while no pass arrives), at
    flush, or at close; commit_every_seconds=0 with no token rule commits every pass."""
    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    with wb.record(model, tmp_path / "slow.zarr", commit_every_seconds=60) as rec:
        for _ in range(3):
            model(input_ids=ids)
        rec._queue.join()
        assert rec.n_tokens == 0 and rec._writer.n_staged == 60
        rec.flush()
        assert rec.n_tokens == 60 and rec._writer.n_commits == 1
    with wb.record(model, tmp_path / "due.zarr", commit_every_seconds=0.2) as rec:
        model(input_ids=ids)
        deadline = time.monotonic() + 10
        while rec.n_tokens == 0 and time.monotonic() < deadline:  # committed by the writer thread's timer
            time.sleep(0.05)
        assert rec.n_tokens == 20
    with wb.record(model, tmp_path / "each.zarr", commit_every_seconds=0) as rec:
        for _ in range(3):
            model(input_ids=ids)
        rec._queue.join()
        assert rec.n_tokens == 60 and rec._writer.n_commits == 3
    for name in ("slow", "due", "each"):
        ds = wb.open_trace(tmp_path / f"{name}.zarr")
        assert ds.attrs["complete"] and np.array_equal(ds["token_id"].values[:20], ids.reshape(-1).numpy())
    with pytest.raises(RecorderError, match="must be >= 0"):
        wb.record(model, tmp_path / "bad.zarr", commit_every_seconds=-1)


@pytest.mark.parametrize("model", [EMBEDDED_MODEL, str(EMBEDDED_MODEL), None, 3])
def test_a_model_that_is_not_a_module_is_a_clear_error(model, tmp_path):
    hint = "load it first, model = wb.load_model(" if isinstance(model, (str, type(EMBEDDED_MODEL))) else ""
    with pytest.raises(RecorderError, match=rf"record needs a loaded model \(a torch.nn.Module\), got "
                                            rf"{type(model).__name__}.*{__import__('re').escape(hint)}"):
        wb.record(model, tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()


def test_api_resume_of_a_transformers_model_refuses_other_weights_routing_or_config(tmp_path):
    """A transformers model from ``from_pretrained`` has no checkpoint fingerprint: resuming through
    the API compares a sample of its weights, the routing rule and the config instead."""
    import json

    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                      max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-6)

    def saved(name, seed, **changes):
        torch.manual_seed(seed)
        transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / name)
        if changes:  # the same weights under another config
            conf = json.loads((tmp_path / name / "config.json").read_text())
            (tmp_path / name / "config.json").write_text(json.dumps({**conf, **changes}))
        return transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / name).eval()

    store = tmp_path / "t.zarr"
    first = saved("a", 0)
    _partial_store(store, first)
    with pytest.raises(RecorderError, match=r"model weights \(fingerprint of a sample of every parameter\): "
                                            r"stored '[0-9a-f]{16}', now '[0-9a-f]{16}'"):
        wb.record(saved("other_weights", 1), store, resume=True)
    with pytest.raises(RecorderError, match=r"another routing rule \(MoE layer 0: renormalize: stored True, "
                                            r"now False\)"):
        wb.record(saved("no_renorm", 0, norm_topk_prob=False), store, resume=True)
    with pytest.raises(RecorderError, match=r"another model config \(rms_norm_eps: stored 1e-06, now 0\.001\)"):
        wb.record(saved("other_eps", 0, rms_norm_eps=1e-3), store, resume=True)
    # the same checkpoint loaded again continues the store, also with a flag that changes no routing
    again = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "a", output_router_logits=True).eval()
    with wb.record(again, store, resume=True) as rec:
        rec.model(input_ids=torch.tensor([[9, 8, 7]]))
    ds = wb.open_trace(store)
    assert ds.attrs["complete"] and ds.sizes["token"] == 4 + 3


def test_weights_sample_is_equal_for_equal_weights_and_changes_with_an_edit():
    from hooks.recorder import weights_sample

    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    same = wb.load_model(EMBEDDED_MODEL, progress=False)
    assert weights_sample(model) == weights_sample(same)
    p = dict(same.named_parameters())["language_model.model.layers.1.feed_forward.experts.down_proj"]
    p.data.reshape(-1)[0] += 1e-3  # element 0 of every tensor is in the sample
    assert weights_sample(model) != weights_sample(same)
