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


def test_python_m_workbench_is_the_workbench_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workbench", "info", tmp_path / "nope"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "nope does not exist" in out.stderr and "Traceback" not in out.stderr


def test_info_on_missing_path_is_one_line_error(tmp_path):
    out = run_cli("info", tmp_path / "nope")
    assert out.returncode == 2 and f"error: {tmp_path / 'nope'} does not exist (a checkpoint directory, a trace " \
        "store, or a preset: maverick, scout)" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("info", tmp_path)  # a directory that is neither
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
    assert out.returncode == 2 and "long.jsonl:1: the prompt is" in out.stderr
    assert "more than --max-tokens 32" in out.stderr
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


# ---------------------------------------------------------------------------------------------
# Bad input in process: one line "workbench <command>: error: ..." on stderr, exit code 2
# ---------------------------------------------------------------------------------------------
def main_rc(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``workbench.cli.main`` (argparse exits via SystemExit)."""
    from workbench.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"workbench {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,command,fragment", [
    (["generate", "M", "--prompts", "p.jsonl", "--max-new-tokens", "0"], "generate",
     "argument --max-new-tokens: must be a positive integer (1 or more), got 0"),
    (["generate", "M", "--prompts", "p.jsonl", "--top-p", "1.5"], "generate", "argument --top-p: must be in (0, 1]"),
    (["trace", "M", "--prompts", "p.jsonl", "--out", "s", "--max-tokens", "0"], "trace", "argument --max-tokens"),
    (["trace", "M", "--out", "s"], "trace", "the following arguments are required: --prompts"),
    (["trace", "M", "--prompts", "p.jsonl", "--out", "s", "--max-tokns", "3"], "trace",
     "unrecognized arguments: --max-tokns 3"),
    (["trace", "M", "--prompts", "p", "--out", "s", "--resume", "--overwrite"], "trace", "not allowed with"),
    (["info"], "info", "the following arguments are required: path"),
    ([], "", "the following arguments are required: command"),
    (["tarce", "M"], "", "invalid choice: 'tarce'"),
], ids=["max-new-tokens", "top-p", "max-tokens", "missing", "unknown", "exclusive", "info", "no-command", "typo"])
def test_usage_errors_are_one_line_without_the_usage_block(capsys, argv, command, fragment):
    code, _, err = main_rc(capsys, *argv)
    prog = f"workbench {command}".strip()
    line = err.strip()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert line.startswith(f"{prog}: error: ") and fragment in line and line.endswith(f"(see {prog} --help)")


def test_help_still_prints_the_usage(capsys):
    code, out, _ = main_rc(capsys, "trace", "--help")
    assert code == 0 and out.startswith("usage: workbench trace") and "--max-tokens" in out


@pytest.mark.parametrize("line,got", [('{"txt": "no text key"}', "got an object without 'text'"),
                                      ('{"text": 5}', "got 'text' of type int"),
                                      ('["a list"]', "got a JSON array"), ("3", "got a JSON number")])
def test_prompt_without_a_string_text_is_refused(capsys, tmp_path, line, got):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f'"a bare string is a prompt"\n{{"text": ""}}\n{line}\n')
    code, _, err = main_rc(capsys, "trace", tmp_path / "no-model", "--prompts", prompts, "--out", tmp_path / "s.zarr")
    msg = one_error_line(err, "trace")
    assert code == 2 and "p.jsonl:3: expected an object with a string 'text'" in msg and got in msg
    from workbench.cli import read_prompts

    prompts.write_text('"a bare string is a prompt"\n{"text": "", "images": []}\n')
    assert [p["text"] for p in read_prompts(prompts, None)] == ["a bare string is a prompt", ""]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A complete trace of the embedded model holding 0 tokens (its only prompt is empty)."""
    from workbench.cli import main
    from workbench.embedded import EMBEDDED_MODEL

    d = tmp_path_factory.mktemp("empty")
    prompts = write_prompts(d / "p.jsonl", [{"text": ""}])
    assert main(["trace", str(EMBEDDED_MODEL), "--prompts", str(prompts), "--out", str(d / "e.zarr"), "--quiet"]) == 0
    return d / "e.zarr"


def test_check_store_out_offers_resume_only_where_the_command_has_it(empty_store):
    from workbench.cli._common import CLIError, check_store_out

    with pytest.raises(CLIError, match="pass --resume to continue it or --overwrite to replace it"):
        check_store_out(empty_store, resume=False, overwrite=False)
    with pytest.raises(CLIError) as e:
        check_store_out(empty_store, resume=False, overwrite=False, can_resume=False)
    assert "--resume" not in str(e.value) and "pass --overwrite to replace it, or choose another --out" in str(e.value)
    assert check_store_out(empty_store, resume=False, overwrite=True, can_resume=False) is None


def test_info_on_a_store_without_tokens(capsys, empty_store):
    code, out, _ = main_rc(capsys, "info", empty_store)
    assert code == 0 and "0 tokens in 0 sequences" in out and "no tokens recorded" in out
    assert "nan" not in out and "CV" not in out


def test_trace_prompt_errors_name_the_line_and_the_flags(capsys, tmp_path):
    from workbench.embedded import EMBEDDED_MODEL

    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps("short") + "\n\n" + json.dumps("word " * 100) + "\n")  # line 3: sample 1
    store = tmp_path / "s.zarr"
    args = ["trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet", "--max-tokens", 16]
    code, _, err = main_rc(capsys, *args)
    msg = one_error_line(err, "trace")
    assert code == 2 and "long.jsonl:3: the prompt is" in msg and "more than --max-tokens 16" in msg
    assert "--truncate" in msg and "max_length" not in msg and "sample" not in msg
    assert not store.exists()  # refused before the store was created: the rerun needs no --overwrite
    code, out, err = main_rc(capsys, *args, "--truncate")
    assert code == 0 and "traced 2 prompts" in out, err

    images = write_prompts(tmp_path / "img.jsonl", ["fine", {"text": "<|image|> which digit?"}])
    code, _, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", images, "--out", tmp_path / "i.zarr",
                           "--quiet")
    msg = one_error_line(err, "trace")
    assert code == 2 and "img.jsonl:2: the text has 1 <|image|> placeholder(s) but the prompt has no 'images'" in msg
    assert not (tmp_path / "i.zarr").exists()


def test_trace_checks_memory_before_the_store_and_keeps_only_the_last_logits(capsys, tmp_path, monkeypatch):
    """A prompt longer than the prefill block, on a machine whose free memory (here set: the one input
    that cannot be chosen on this machine) is too small: one error line naming its line and the batch
    size, no store. With just enough memory for a prefill that keeps the last token's logits (the trace
    never reads the others), but not for all logits, the trace runs."""
    import workbench.runtime.memory as memory
    from workbench.embedded import EMBEDDED_MODEL
    from workbench.runtime.memory import prefill_bytes

    model = wb.load_model(EMBEDDED_MODEL, progress=False)
    proc = wb.load_processor(EMBEDDED_MODEL)
    text = "the cat sat on the mat " * 800
    T = int(proc(text=[text], return_tensors="pt")["input_ids"].shape[1])
    dtype, block = next(model.parameters()).dtype, model.prefill_chunk
    assert T > block
    need_last = prefill_bytes(model.text_config, 1, T, block, dtype, logits_to_keep=1)
    need_all = prefill_bytes(model.text_config, 1, T, block, dtype)
    assert need_all > need_last + (16 << 20)
    prompts = write_prompts(tmp_path / "p.jsonl", ["short", text])
    store = tmp_path / "s.zarr"
    monkeypatch.setattr(memory, "available_bytes", lambda device: 20 << 20)
    code, _, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet",
                           "--batch-size", 1)
    msg = one_error_line(err, "trace")
    assert code == 2 and f"p.jsonl:2 ({T:,} tokens) needs about" in msg and msg.endswith("(a shorter prompt)"), msg
    assert "logits_to_keep" not in msg and not store.exists()
    code, _, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet")
    msg = one_error_line(err, "trace")  # both prompts in one batch of 8: the batch size is worth changing
    assert f"p.jsonl:2 ({T:,} tokens, the longest of a batch of 2)" in msg, msg
    assert msg.endswith("(shorter prompts or a smaller --batch-size (now 8))") and not store.exists(), msg
    monkeypatch.setattr(memory, "available_bytes", lambda device: need_last + (8 << 20))
    code, out, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet",
                             "--batch-size", 1)
    assert code == 0 and "traced 2 prompts" in out, err
    short = int(proc(text=["short"], return_tensors="pt")["input_ids"].shape[1])
    assert wb.open_trace(store).sizes["token"] == T + short


def test_trace_quantize_flag(capsys, tmp_path, ckpt):
    """``workbench trace --quantize`` loads as ``load_model(quantize=...)`` does: the same routing as the
    API on the same model, the quantization in the store's provenance; refused for transformers loading."""
    from workbench.embedded import EMBEDDED_MODEL

    prompts = write_prompts(tmp_path / "p.jsonl", ["The quick brown fox.", "1 + 2 = 3"])
    store = tmp_path / "q.zarr"
    code, _, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", store, "--quiet",
                           "--quantize", "int4", "--quantize-modules", "shared_expert")
    assert code == 0, err
    ds = wb.open_trace(store)
    prov = ds.attrs["provenance"]
    assert prov["checkpoint_quantize"] == "int4" and prov["checkpoint_quantize_modules"] == "experts,shared_expert"
    assert prov["quantized"].startswith("int4-g128: ") and "linear layers" in prov["quantized"]
    model = wb.load_model(EMBEDDED_MODEL, quantize="int4", quantize_modules=("shared_expert",), progress=False)
    with wb.record(model, tmp_path / "api.zarr", processor=wb.load_processor(EMBEDDED_MODEL)) as rec:
        rec.run(model, wb.load_processor(EMBEDDED_MODEL), ["The quick brown fox.", "1 + 2 = 3"], progress=False)
    np.testing.assert_array_equal(ds["topk_expert"].values, wb.open_trace(tmp_path / "api.zarr")["topk_expert"].values)
    code, _, err = main_rc(capsys, "trace", ckpt, "--prompts", prompts, "--out", tmp_path / "t.zarr", "--quiet",
                           "--loader", "transformers", "--quantize", "fp8")
    msg = one_error_line(err, "trace")
    assert code == 2 and "--quantize applies to Llama 4 checkpoints loaded with workbench" in msg


def test_trace_refuses_max_tokens_beyond_the_model_positions(capsys, tmp_path, monkeypatch):
    from workbench.embedded import EMBEDDED_MODEL

    limit = json.loads((EMBEDDED_MODEL / "config.json").read_text())["text_config"]["max_position_embeddings"]
    monkeypatch.setattr("workbench.checkpoint.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    prompts = write_prompts(tmp_path / "p.jsonl", ["hello"])
    code, _, err = main_rc(capsys, "trace", EMBEDDED_MODEL, "--prompts", prompts, "--out", tmp_path / "s.zarr",
                           "--max-tokens", limit + 1)
    msg = one_error_line(err, "trace")
    assert code == 2 and f"--max-tokens {limit + 1}" in msg and f"max_position_embeddings {limit}" in msg


def test_trace_refuses_a_prompt_past_the_model_positions_before_the_store(capsys, tmp_path):
    """Without --max-tokens a prompt longer than max_position_embeddings (here a copy of the
    embedded checkpoint limited to 32 positions) is refused naming its line, before the store."""
    import shutil

    from workbench.embedded import EMBEDDED_MODEL

    short = tmp_path / "short"
    shutil.copytree(EMBEDDED_MODEL, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(cfg))
    prompts = write_prompts(tmp_path / "p.jsonl", ["fine", "word " * 40])
    store = tmp_path / "s.zarr"
    code, _, err = main_rc(capsys, "trace", short, "--prompts", prompts, "--out", store, "--quiet")
    msg = one_error_line(err, "trace")
    assert code == 2 and "p.jsonl:2: the prompt is" in msg and "max_position_embeddings 32" in msg, msg
    assert not store.exists()


def test_trace_of_a_transformers_checkpoint_without_a_tokenizer_says_so(capsys, tmp_path):
    pytest.importorskip("transformers")
    from tests.test_families import save_checkpoint

    d = tmp_path / "mixtral"
    save_checkpoint("mixtral", d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    capsys.readouterr()  # save_pretrained's progress bars
    prompts = write_prompts(tmp_path / "p.jsonl", ["hello"])
    code, _, err = main_rc(capsys, "trace", d, "--prompts", prompts, "--out", tmp_path / "s.zarr", "--quiet")
    msg = one_error_line(err, "trace")
    assert code == 2 and "no usable tokenizer" in msg and "tokenizer.json" in msg, msg
    assert not (tmp_path / "s.zarr").exists()


def test_info_on_a_transformers_checkpoint_of_a_traced_family(capsys, tmp_path):
    pytest.importorskip("transformers")
    from tests.test_families import save_checkpoint

    d = tmp_path / "mixtral"
    save_checkpoint("mixtral", d)  # 4 layers, hidden 32, 8 experts, top-2
    for f in d.glob("*.safetensors"):
        f.unlink()  # info reads config.json only
    code, out, err = main_rc(capsys, "info", d)
    assert code == 0, err
    assert out.startswith("MixtralForCausalLM") and "model type 'mixtral'" in out and "through transformers" in out
    assert "4 layers, hidden 32" in out and "MoE layers (4): 0-3; 8 experts, top-2" in out


def test_an_undecodable_chunk_met_late_is_a_clear_error(tmp_path):
    """A chunk damaged so that blosc fails surfaces lazily, deep in an analysis (numcodecs raises a bare
    RuntimeError): exit 2 and a pointer to verify, not an internal error."""
    from workbench.cli import _classify

    code, msg = _classify(RuntimeError("error during blosc decompression: -1"))
    assert code == 2 and "the store is damaged; `workbench verify STORE`" in msg
    assert _classify(RuntimeError("something else"))[0] == 1
