"""The command line: `workbench info` and `workbench trace`, run as real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import workbench as wb
from tests.hf_reference import hf_text_model
from tests.tokenizer_factory import make_llama4_tokenizer

WORKBENCH = [sys.executable, "-m", "workbench.cli"]


def run_cli(*args, check=False, timeout=300):
    out = subprocess.run([*WORKBENCH, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    make_llama4_tokenizer(d, vocab_size=320)
    hf_text_model(seed=31, num_experts_per_tok=2, max_position_embeddings=64).save_pretrained(d)
    return d


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def test_info_on_checkpoint_and_preset(ckpt):
    out = run_cli("info", ckpt, check=True).stdout
    assert "Llama4ForCausalLM" in out and "MoE layers (4): 0-3" in out
    assert "NoPE layers (1): 3" in out and "8-token chunks" in out
    out = run_cli("info", "maverick", check=True).stdout
    assert "128 experts" in out and "MoE layers (24): 1, 3, 5" in out


def test_info_on_missing_path_is_one_line_error(tmp_path):
    out = run_cli("info", tmp_path / "nope")
    assert out.returncode == 2 and "error: no config.json" in out.stderr and "Traceback" not in out.stderr


def test_trace_end_to_end_with_empty_prompt(ckpt, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"text": "def add(a, b): return a + b"}, {"text": ""},
                                                   "The quick brown fox.", {"text": "1 + 2 = 3"}])
    out = run_cli("trace", ckpt, "--prompts", prompts, "--out", tmp_path / "t.zarr", "--batch-size", 2, check=True)
    assert "skipped 1 empty prompt(s): 1" in out.stdout and "load imbalance" in out.stdout
    ds = wb.open_trace(tmp_path / "t.zarr")
    assert ds.attrs["complete"]
    np.testing.assert_array_equal(np.unique(ds["sequence"].values), [0, 2, 3])  # sequence = prompt index
    assert ds.attrs["provenance"]["inputs_hash"] and ds.attrs["provenance"]["tokenizer_hash"]
    info = run_cli("info", tmp_path / "t.zarr", check=True).stdout
    assert "3 sequences" in info and "4 MoE layers" in info


def test_trace_bad_inputs_are_clear_errors(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    out = run_cli("trace", ckpt, "--prompts", bad, "--out", tmp_path / "a.zarr")
    assert out.returncode == 2 and "bad.jsonl:2: not valid JSON" in out.stderr

    img = write_prompts(tmp_path / "img.jsonl", [{"text": "<|image|> what?", "images": ["missing.png"]}])
    out = run_cli("trace", ckpt, "--prompts", img, "--out", tmp_path / "b.zarr")
    assert out.returncode == 2 and "img.jsonl:1: image file" in out.stderr and "missing.png" in out.stderr

    long = write_prompts(tmp_path / "long.jsonl", ["word " * 200])
    out = run_cli("trace", ckpt, "--prompts", long, "--out", tmp_path / "c.zarr", "--max-tokens", 32)
    assert out.returncode == 2 and "above max_length=32" in out.stderr
    out = run_cli("trace", ckpt, "--prompts", long, "--out", tmp_path / "d.zarr", "--max-tokens", 32, "--truncate")
    assert out.returncode == 0, out.stderr
    assert wb.open_trace(tmp_path / "d.zarr").sizes["token"] == 32

    (tmp_path / "notatrace").mkdir()
    (tmp_path / "notatrace" / "thesis.tex").write_text("precious")
    out = run_cli("trace", ckpt, "--prompts", long, "--out", tmp_path / "notatrace", "--max-tokens", 32, "--truncate")
    assert out.returncode == 2 and "not a workbench trace" in out.stderr
    assert (tmp_path / "notatrace" / "thesis.tex").read_text() == "precious"


def _committed(store) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["n_tokens"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_then_resume_gives_the_clean_trace(ckpt, tmp_path):
    g = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", "1", "+", "="]
    prompts = [" ".join(g.choice(words, size=g.integers(3, 12))) for _ in range(60)]
    pfile = write_prompts(tmp_path / "p.jsonl", prompts)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*WORKBENCH, "trace", str(ckpt), "--prompts", str(pfile), "--out", str(store),
                             "--batch-size", "1", "--commit-every", "0", "--quiet"],  # each prompt durable
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _committed(store) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = wb.open_trace(store)
    n_partial = partial.sizes["token"]
    assert not partial.attrs["complete"] and 0 < n_partial
    assert (partial["topk_expert"].values >= 0).all()  # no fill values inside the committed range

    out = run_cli("trace", ckpt, "--prompts", pfile, "--out", store, "--resume", "--batch-size", 4)
    assert out.returncode == 0, out.stderr
    clean = tmp_path / "clean.zarr"
    run_cli("trace", ckpt, "--prompts", pfile, "--out", clean, "--batch-size", 4, check=True)
    a, b = wb.open_trace(store).load(), wb.open_trace(clean).load()
    assert a.attrs["complete"]
    order_a = np.lexsort((a["position"].values, a["sequence"].values))
    order_b = np.lexsort((b["position"].values, b["sequence"].values))
    for name in ("token_id", "sequence", "position", "topk_expert"):
        np.testing.assert_array_equal(a[name].values[order_a], b[name].values[order_b], err_msg=name)
    np.testing.assert_allclose(a["topk_weight"].values[order_a], b["topk_weight"].values[order_b], rtol=1e-5)

    other = write_prompts(tmp_path / "other.jsonl", ["something else"])
    out = run_cli("trace", ckpt, "--prompts", other, "--out", store, "--resume")
    assert out.returncode == 2 and "other prompts" in out.stderr


def test_second_writer_is_refused(ckpt, tmp_path):
    pfile = write_prompts(tmp_path / "p.jsonl", ["hello world"] * 3)
    store = tmp_path / "t.zarr"
    model = wb.load_model(ckpt, progress=False)
    with wb.record(model, store):
        out = run_cli("trace", ckpt, "--prompts", pfile, "--out", store, "--resume")
        assert out.returncode == 2 and "lock" in out.stderr.lower() and str(os.getpid()) in out.stderr


def test_demo_runs_and_writes_a_trace(tmp_path):
    out = run_cli("demo", "--out", tmp_path, "--quiet", check=True, timeout=600).stdout
    assert "load imbalance per MoE layer" in out and "top experts by domain" in out
    assert (tmp_path / "paper" / "report.html").is_file() and list((tmp_path / "paper" / "figures").glob("*.pdf"))
    ds = wb.open_trace(tmp_path / "demo.zarr")
    assert ds.attrs["complete"] and ds.sizes["token"] > 0
    assert set(np.unique(ds["modality"].values)) <= {0, 1, 2}
