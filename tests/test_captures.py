"""Captures are declarations: a capture written here, in the test, is recorded, committed, resumed and
read back by the unchanged recorder and trace writer; capture options on the API and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import torch

import workbench as wb
from tests.hf_reference import hf_text_model
from workbench.hooks import Capture, LogitsCapture, RecorderError
from workbench.hooks.captures import to_host
from workbench.trace.schema import COMMIT, MOE_LAYER, TOKEN, Variable


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@dataclass(eq=False)
class LogitNorm(Capture):
    """Toy capture: ``scale`` x the L2 norm of each token's router logits per MoE layer, and the
    argmax expert per token with its per-commit histogram (a count variable)."""

    name: ClassVar[str] = "logit_norm"
    scale: float = field(default=1.0, metadata={"help": "multiplies the norm"})

    def variables(self, spec):
        L, E = len(spec.layers), spec.n_experts
        return [Variable("logit_norm", (TOKEN, MOE_LAYER), (L,), "float32", codec="float", capture=self.name),
                Variable("argmax_expert", (TOKEN, MOE_LAYER, "one"), (L, 1), "int16", valid_range=(0, E - 1),
                         capture=self.name),
                Variable("argmax_hist", (COMMIT, MOE_LAYER, "expert"), (L, E), "int32",
                         reduce={"count": "argmax_expert"}, capture=self.name)]

    def attach(self, adapter):
        self._points = adapter.routers
        return [p.add(self._seen(i)) for i, p in enumerate(adapter.routers)]

    def _seen(self, i):
        def fn(point, router_logits, **_):
            self._cur[i] = router_logits
        return fn

    def start(self, pass_):
        self._cur = [None] * len(self._points)

    def finish(self):
        logits = torch.stack(self._cur, 1).float()  # (N, L, E), on the device: no host sync
        return to_host(logits.norm(dim=-1) * self.scale), to_host(logits.argmax(-1, keepdim=True))

    def rows(self, payload, keep):
        norm, arg = payload
        return {"logit_norm": norm.numpy()[keep], "argmax_expert": arg.numpy()[keep]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf_text_model(seed=8, num_experts_per_tok=2, interleave_moe_layer_step=2).save_pretrained(d)
    return d


def _ids(seed, b=2, t=9):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed))


def test_a_capture_declared_in_a_test_is_written_committed_resumed_and_read_back(ckpt, tmp_path):
    model = wb.load_model(ckpt, progress=False)
    store = tmp_path / "toy.zarr"
    capture = lambda: [LogitNorm(scale=2.0), LogitsCapture(dtype="float32")]  # noqa: E731
    # the token rule alone (no 1 s clock: a slow first pass on a loaded machine committed at 18)
    rec = wb.record(model, store, capture=capture(), commit_every_tokens=30, commit_every_seconds=0).attach()
    for s in range(3):  # 18 tokens per pass: commits after passes 2 (36 tokens) and at close
        model(input_ids=_ids(s))
    rec.close(complete=False)  # an interrupted run: committed, not complete
    part = wb.open_trace(store)
    assert part.attrs["complete"] is False and part.sizes["token"] == 54 and part.sizes["commit"] == 2

    with pytest.raises(RecorderError, match=r"recorded with captures .*'scale': 2\.0.* this recorder has .*'scale': 3\.0"):
        wb.record(model, store, capture=[LogitNorm(scale=3.0), LogitsCapture(dtype="float32")], resume=True)
    with pytest.raises(RecorderError, match="recorded with captures"):
        wb.record(model, store, capture=("router", "logits"), resume=True)
    with wb.record(model, store, capture=capture(), resume=True) as rec:
        model(input_ids=_ids(3, b=1, t=5))
    ds = wb.open_trace(store).load()
    assert ds.attrs["complete"] and ds.sizes["token"] == 59 and ds.sizes["commit"] == 3
    assert ds.attrs["captures"]["logit_norm"] == {"scale": 2.0}
    assert ds.attrs["variables"]["argmax_hist"]["reduce"] == {"count": "argmax_expert"}
    assert ds["logit_norm"].dims == ("token", "moe_layer") and ds["logit_norm"].dtype == np.float32

    # read back against the stored router logits, in float64
    logits = ds["router_logits"].values.astype(np.float64)
    np.testing.assert_allclose(ds["logit_norm"].values, 2.0 * np.linalg.norm(logits, axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(ds["argmax_expert"].values[..., 0], logits.argmax(-1))
    # one histogram row per commit, over exactly that commit's tokens
    ends = ds["commit_end"].values
    np.testing.assert_array_equal(ends, [36, 54, 59])
    for c, (a, b) in enumerate(zip([0, *ends[:-1]], ends)):
        arg = ds["argmax_expert"].values[a:b, :, 0]
        want = np.stack([np.bincount(arg[:, l], minlength=8) for l in range(2)])
        np.testing.assert_array_equal(ds["argmax_hist"].values[c], want)
    # the toy capture's argmax agrees with the router's own top-1 choice
    np.testing.assert_array_equal(ds["argmax_expert"].values[..., 0],
                                  np.take_along_axis(ds["topk_expert"].values,
                                                     ds["topk_weight"].values.argmax(-1)[..., None], -1)[..., 0])


def test_capture_arguments_are_checked_before_the_store_exists(ckpt, tmp_path):
    model = wb.load_model(ckpt, progress=False)
    for capture, match in [(("router", "gates"), "unknown capture option 'gates'"),
                           ({"logits": {"dtype": "int8"}}, "logits dtype must be one of"),
                           ({"logits": {"bits": 8}}, r"capture 'logits': .*bits.*its options: \['dtype'\]"),
                           (("logits", LogitsCapture()), "capture 'logits' given twice"),
                           ((3,), "capture entries must be names or Capture instances")]:
        with pytest.raises(RecorderError, match=match):
            wb.record(model, tmp_path / "x.zarr", capture=capture)
        assert not (tmp_path / "x.zarr").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_exposes_every_capture_option(tmp_path):
    from workbench.embedded import EMBEDDED_MODEL

    prompts = tmp_path / "p.jsonl"
    img = EMBEDDED_MODEL.parents[1] / "images" / "digits_00.png"
    prompts.write_text(json.dumps({"text": "<|image|>top left 3", "images": [str(img)]}) + "\n")
    store = tmp_path / "t.zarr"
    out = _cli("trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet",
               "--capture", "router,logits,attention", "--logits-dtype", "float32",
               "--attention-layers", "1,3", "--attention-heads", "mean")
    assert out.returncode == 0, out.stderr
    ds = wb.open_trace(store)
    assert ds.attrs["captures"] == {"router": {}, "logits": {"dtype": "float32"},
                                    "attention": {"layers": [1, 3], "heads": "mean", "dtype": "float16"}}
    assert ds["router_logits"].dtype == np.float32
    att = wb.open_attention(store, 0)
    assert att["layer"].values.tolist() == [1, 3] and att.attrs["head_mean"]
    info = _cli("info", store)
    assert info.returncode == 0 and "captures: router, logits(dtype=float32), attention(layers=[1, 3]" in info.stdout

    bad = _cli("trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", tmp_path / "b.zarr", "--attention-layers", "1")
    assert bad.returncode == 2 and "--attention-layers given, but --capture does not include attention" in bad.stderr
    bad = _cli("trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", tmp_path / "b.zarr", "--capture", "router,x")
    assert bad.returncode == 2 and "unknown capture(s) x" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", tmp_path / "b.zarr", "--capture",
               "router,attention", "--attention-layers", "1-x")
    assert bad.returncode == 2 and "expected indices like 1,3,5-7" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b.zarr").exists()
