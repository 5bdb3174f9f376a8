"""Issue 18, clear errors: every bad input ends in one line ``workbench <cmd>: error: ...`` (exit 2),
failures in exit 1, never a traceback; config values and checkpoint files are validated at load;
the checkpoint fingerprint covers the bytes. Real files on disk throughout."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from tests.hf_reference import hf_text_model
from tests.tokenizer_factory import make_llama4_tokenizer
from workbench.checkpoint import CheckpointError, checkpoint_fingerprint
from workbench.cli import main
from workbench.models.llama4.config import ConfigError, ModelConfig

WORKBENCH = str(Path(sys.executable).with_name("workbench"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    make_llama4_tokenizer(d, vocab_size=320)
    hf_text_model(seed=31, num_experts_per_tok=2, max_position_embeddings=64).save_pretrained(d)
    return d


@pytest.fixture
def ckpt_copy(ckpt, tmp_path):
    """A private copy of the checkpoint a test may damage."""
    return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "hello world"}\n"the quick brown fox"\n')
    return p


def cli(capsys, *args) -> tuple[int, str]:
    """Run ``workbench.cli.main`` in process: (exit code, stderr). argparse errors exit via SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _no_model_load(monkeypatch):
    """Cheap checks must fail before the model loads: loading now is a test failure."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before a cheap check failed")
    monkeypatch.setattr("workbench.checkpoint.load_model", boom)


# ---------------------------------------------------------------------------------------------
# config.json values: each names the key and the value
# ---------------------------------------------------------------------------------------------
BAD_TEXT_VALUES = [
    ("attention_chunk_size", 0, "attention_chunk_size=0 must be a positive integer or null"),
    ("attention_chunk_size", -8, "attention_chunk_size=-8 must be a positive integer or null"),
    ("rope_theta", 0, "rope_theta=0 must be a positive finite number"),
    ("rope_theta", -10000.0, "rope_theta=-10000.0 must be a positive finite number"),
    ("rope_theta", "1e4", "rope_theta='1e4' must be a positive finite number"),
    ("rms_norm_eps", "tiny", "rms_norm_eps='tiny' must be a positive finite number"),
    ("rms_norm_eps", 0, "rms_norm_eps=0 must be a positive finite number"),
    ("rope_scaling", {"rope_type": "llama3"}, "is llama3 scaling without factor, low_freq_factor, high_freq_factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
     "is llama3 scaling without high_freq_factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "big", "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "rope_scaling.factor='big' must be a positive finite number"),
    ("rope_scaling", "llama3", "rope_scaling='llama3' must be an object or null"),
    ("eos_token_id", {}, "eos_token_id={} must be an integer, a list of integers or null"),
    ("eos_token_id", [2, "x"], "eos_token_id=[2, 'x'] must be an integer, a list of integers or null"),
    ("moe_layers", [0, 1, 1, 2], "moe_layers=[0, 1, 1, 2] lists layer(s) [1] more than once"),
    ("floor_scale", 0, "floor_scale=0 must be a positive finite number"),
    ("floor_scale", -4, "floor_scale=-4 must be a positive finite number"),
    ("use_qk_norm", "false", "use_qk_norm='false' must be true or false"),
    ("tie_word_embeddings", "true", "tie_word_embeddings='true' must be true or false"),
    ("attn_temperature_tuning", "false", "attn_temperature_tuning='false' must be true, false or an integer"),
    ("num_hidden_layers", True, "num_hidden_layers=True must be a positive integer"),
    ("hidden_size", "64", "hidden_size='64' must be a positive integer"),
    ("no_rope_layers", [1, 2, 1, 0], "no_rope_layers=[1, 2, 1, 0] must be a list of 0/1 flags"),
]


@pytest.mark.parametrize("key,value,message", BAD_TEXT_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_TEXT_VALUES])
def test_bad_config_value_names_key_and_value(ckpt, tmp_path, capsys, key, value, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_pretrained(tmp_path)
    assert message in str(e.value) and str(tmp_path / "config.json") in str(e.value)
    code, err = cli(capsys, "info", tmp_path)
    assert code == 2 and last_line(err) == f"workbench info: error: {e.value}"


def test_released_integer_temperature_tuning_is_accepted(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["attn_temperature_tuning"] = 4  # what released Llama 4 configs write
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_pretrained(tmp_path).text.attn_temperature_tuning is True


def test_deeply_nested_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_pretrained(tmp_path)
    code, err = cli(capsys, "info", tmp_path)
    assert code == 2 and "config.json: not a usable config (JSON nested too deeply to parse)" in err


@pytest.mark.parametrize("doc,message", [
    ([1, 2], "expected a JSON object at the top level, got list"),
    ("llama", "expected a JSON object at the top level, got str"),
    ({"architectures": ["Llama4ForConditionalGeneration"], "text_config": [1]}, "text_config=[1] must be an object"),
    ({"architectures": "Llama4ForCausalLM"}, "architectures='Llama4ForCausalLM' must be a list of class names"),
])
def test_non_object_config_parts(tmp_path, capsys, doc, message):
    (tmp_path / "config.json").write_text(json.dumps(doc))
    code, err = cli(capsys, "info", tmp_path)
    assert code == 2 and message in last_line(err)


# ---------------------------------------------------------------------------------------------
# checkpoint files: the index, paths, file types, dtypes, shapes
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "sharded"
    hf_text_model().save_pretrained(d, max_shard_size="40KB")
    return d


def _edit_index(d: Path, fn) -> None:
    f = d / "model.safetensors.index.json"
    doc = json.loads(f.read_text())
    fn(doc)
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize("weight_map", [[], "model-00001.safetensors", None, 7])
def test_weight_map_not_an_object(sharded, weight_map):
    _edit_index(sharded, lambda doc: doc.__setitem__("weight_map", weight_map))
    with pytest.raises(CheckpointError, match=r"not a safetensors index \(needs a 'weight_map' object"):
        wb.load_model(sharded, progress=False)


def test_index_nested_too_deeply(sharded):
    (sharded / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        wb.load_model(sharded, progress=False)


def test_weight_map_entry_outside_the_directory_is_refused(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(sharded / shard, outside / shard)
    for name in (f"../elsewhere/{shard}", str(outside / shard), f"sub/../../elsewhere/{shard}"):
        _edit_index(sharded, lambda doc, name=name: doc["weight_map"].__setitem__("model.norm.weight", name))
        with pytest.raises(CheckpointError) as e:
            wb.load_model(sharded, progress=False)
        assert f"weight_map['model.norm.weight'] names {name!r}, which is outside the checkpoint directory" in str(e.value)


def test_symlinked_shards_load_like_the_hub_cache(tmp_path):
    """huggingface_hub snapshots are links to ../../blobs/<hash>: links are followed, by design."""
    repo = tmp_path / "models--x"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    hf_text_model(seed=3).save_pretrained(tmp_path / "plain")
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (tmp_path / "plain").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    m = wb.load_model(snap, progress=False)
    assert m.source["fingerprint"] == checkpoint_fingerprint(tmp_path / "plain")


def _run_with_timeout(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run python ``code`` in a subprocess: a regression that blocks (e.g. on a FIFO) fails the test
    after ``timeout`` instead of hanging the suite."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).parents[1], check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked for more than {timeout} s (opened a FIFO?)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifos_in_a_checkpoint_never_block(ckpt_copy):
    load = ("import workbench as wb\n"
            "try:\n    m = wb.load_model({path!r}, progress=False)\n    print('OK', m.source['fingerprint'])\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    os.mkfifo(ckpt_copy / "notes.json")  # the old fingerprint read every *.json: it blocked here forever
    os.mkfifo(ckpt_copy / "extra.safetensors")
    out = _run_with_timeout(load.format(path=str(ckpt_copy)))
    assert out.stdout.startswith("OK"), out.stderr

    weights = ckpt_copy / "model.safetensors"
    weights.rename(ckpt_copy / "weights.bak")
    os.mkfifo(weights)
    out = _run_with_timeout(load.format(path=str(ckpt_copy)))
    assert out.stdout.strip() == f"CheckpointError {weights} is not a regular file; a checkpoint holds only regular files"

    (ckpt_copy / "config.json").unlink()
    os.mkfifo(ckpt_copy / "config.json")
    out = _run_with_timeout(load.format(path=str(ckpt_copy)))
    assert out.stdout.strip() == f"ConfigError {ckpt_copy / 'config.json'} is not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_shard_and_index_never_block(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / index["weight_map"]["model.norm.weight"]
    shard.unlink()
    os.mkfifo(shard)
    code = ("import workbench as wb\n"
            f"try:\n    wb.load_model({str(sharded)!r}, progress=False)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = _run_with_timeout(code)
    assert out.stdout.strip() == f"CheckpointError {shard} is not a regular file; a checkpoint holds only regular files"
    out = _run_with_timeout(f"from workbench.checkpoint import checkpoint_fingerprint as f\n"
                            f"try:\n    f({str(sharded)!r})\nexcept Exception as e:\n    print(type(e).__name__)\n")
    assert out.stdout.strip() == "CheckpointError"


def _rewrite(d: Path, fn) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


KEY = "model.layers.1.feed_forward.router.weight"


@pytest.mark.parametrize("dtype,kind", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_mixed_float_dtypes_are_refused(ckpt_copy, capsys, dtype, kind):
    _rewrite(ckpt_copy, lambda t: t.__setitem__(KEY, t[KEY].to(dtype)))
    with pytest.raises(CheckpointError) as e:
        wb.load_model(ckpt_copy, progress=False)
    assert f"tensor {KEY!r} in model.safetensors has dtype {kind}, but 50 of the checkpoint's 51 tensors are F32" \
        in str(e.value) and "disagree in dtype" in str(e.value)
    with pytest.raises(CheckpointError, match="disagree in dtype"):  # a requested cast does not hide it
        wb.load_model(ckpt_copy, dtype="float32", progress=False)


@pytest.mark.parametrize("dtype,kind", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.int64, "I64")])
def test_non_float_tensor_where_floats_belong(ckpt_copy, dtype, kind):
    _rewrite(ckpt_copy, lambda t: t.__setitem__(KEY, t[KEY].to(dtype)))
    with pytest.raises(CheckpointError) as e:
        wb.load_model(ckpt_copy, progress=False)
    assert str(e.value) == (f"tensor {KEY!r} in model.safetensors has dtype {kind}; a floating-point tensor "
                            f"(F32, BF16, F16, F64) belongs there")


def test_uniform_bf16_checkpoint_loads_and_casts(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert next(wb.load_model(ckpt_copy, progress=False).parameters()).dtype == torch.bfloat16
    assert next(wb.load_model(ckpt_copy, dtype="float32", progress=False).parameters()).dtype == torch.float32


def test_shape_mismatch_names_the_tensor_through_the_cli(ckpt_copy, prompts, tmp_path, capsys):
    _rewrite(ckpt_copy, lambda t: t.__setitem__(KEY, torch.zeros(7, 64)))
    code, err = cli(capsys, "trace", ckpt_copy, "--prompts", prompts, "--out", tmp_path / "t.zarr")
    assert code == 2 and last_line(err) == (f"workbench trace: error: tensor {KEY!r} in model.safetensors has "
                                            f"shape (7, 64), the config needs (8, 64)")


# ---------------------------------------------------------------------------------------------
# fingerprint: the bytes, not the headers
# ---------------------------------------------------------------------------------------------
def _bump_one_value(file: Path, key: str) -> None:
    """Change the first float32 value of tensor ``key`` by one ulp, in place: same header, same size."""
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = 8 + n + json.loads(data[8:8 + n])[key]["data_offsets"][0]
    value = np.frombuffer(bytes(data[at:at + 4]), dtype="<f4")
    data[at:at + 4] = np.nextafter(value, value + 1).astype("<f4").tobytes()
    file.write_bytes(bytes(data))


def test_fingerprint_covers_values(ckpt, tmp_path):
    same = Path(shutil.copytree(ckpt, tmp_path / "same"))
    changed = Path(shutil.copytree(ckpt, tmp_path / "changed"))
    _bump_one_value(changed / "model.safetensors", KEY)
    assert (changed / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()
    base = checkpoint_fingerprint(ckpt)
    assert checkpoint_fingerprint(same) == base  # same bytes elsewhere: same id
    assert checkpoint_fingerprint(changed) != base
    assert wb.load_model(ckpt, progress=False).source["fingerprint"] == base  # load == standalone
    assert wb.load_model(changed, progress=False).source["fingerprint"] == checkpoint_fingerprint(changed)
    cfg = json.loads((same / "config.json").read_text())
    cfg["attn_scale"] = 0.25
    (same / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_fingerprint(same) != base  # config.json is part of the model


def test_fingerprint_of_large_files_does_not_depend_on_threads(tmp_path, monkeypatch):
    """Blocks are hashed in parallel: the id must not depend on the pool size or the block order."""
    import workbench.checkpoint as ck

    monkeypatch.setattr(ck, "_FINGERPRINT_BLOCK", 4096)  # many blocks from a small checkpoint
    hf_text_model().save_pretrained(tmp_path)
    files = ck._fingerprint_files(tmp_path)
    ids = set()
    for workers in (1, 3, 8):
        fp = ck._Fingerprint(tmp_path, files, workers=workers)
        try:
            ids.add(fp.result())
        finally:
            fp.close()
    assert len(ids) == 1


# ---------------------------------------------------------------------------------------------
# CLI: flags, prompts files and --out, all before the model loads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer (1 or more), got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be a positive integer (1 or more), got -1"),
    (["--batch-size", "two"], "argument --batch-size: expected a positive integer, got 'two'"),
    (["--max-tokens", "0"], "argument --max-tokens: must be a positive integer (1 or more), got 0"),
    (["--dtype", "int8"], "argument --dtype: invalid choice 'int8' (choose from float32, bfloat16, float16)"),
    (["--device", "tpu9"], "argument --device: unknown device 'tpu9' (use cpu, cuda or cuda:N)"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_flags(ckpt, prompts, tmp_path, capsys, monkeypatch, flags, message):
    _no_model_load(monkeypatch)
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", tmp_path / "t.zarr", *flags)
    assert code == 2 and err.strip() == f"workbench trace: error: {message} (see workbench trace --help)"  # no usage
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(ckpt, prompts, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", tmp_path / "t.zarr", "--device", "cuda")
    assert code == 2 and "argument --device: 'cuda': no CUDA GPU is available on this machine" in last_line(err)


def test_dtype_aliases_are_accepted(ckpt, prompts, tmp_path, capsys):
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", tmp_path / "t.zarr", "--dtype", "bf16",
                    "--quiet")
    assert code == 0, err
    assert wb.open_trace(tmp_path / "t.zarr").attrs["provenance"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("content,message", [
    (b'"ok"\n\x00\x01\x02binary\n', "p.jsonl:2: binary data (a NUL byte at column 1); a prompts file is UTF-8 JSON"),
    (b'"ok"\n"caf\xe9"\n', "p.jsonl:2: not UTF-8 text (byte 0xe9 at column 5)"),
    (b'"ok"\n{"text": "a\\ud800b"}\n',
     "p.jsonl:2: 'text' holds a lone surrogate '\\ud800' at character 1; that is not Unicode text"),
    (b'"ok"\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", "p.jsonl:2: JSON nested too deeply"),
    (b"\n  \n", "holds no prompt"),
    (b'{"text": "ok"}\n{"text": 3}\n', "p.jsonl:2: expected an object with a string 'text'"),
])
def test_bad_prompts_files_name_the_line(ckpt, tmp_path, capsys, monkeypatch, content, message):
    _no_model_load(monkeypatch)
    (tmp_path / "p.jsonl").write_bytes(content)
    code, err = cli(capsys, "trace", ckpt, "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "t.zarr")
    assert code == 2 and last_line(err).startswith("workbench trace: error: ") and message in err


def test_prompts_file_with_a_bom_is_read(ckpt, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    code, err = cli(capsys, "trace", ckpt, "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "t.zarr", "--quiet")
    assert code == 0, err


def test_out_under_a_file(ckpt, prompts, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", prompts / "sub" / "t.zarr")
    assert code == 2 and last_line(err) == (f"workbench trace: error: --out {prompts / 'sub' / 't.zarr'}: {prompts} "
                                            f"is a file, so no directory can be created under it")
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", prompts)
    assert code == 2 and f"--out {prompts} exists and is a file, not a directory" in err
    code, err = cli(capsys, "demo", "--out", prompts / "demo")
    assert code == 2 and "is a file, so no directory can be created under it" in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: a read-only tmpfs when root (root ignores mode bits),
    else a chmod 555 folder."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d, "no write permission"
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True,
                      check=False).returncode:
        pytest.skip("root, and cannot mount a read-only tmpfs here")
    try:
        yield d, "read-only file system"
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_out_on_a_read_only_dir(ckpt, prompts, read_only_dir, capsys, monkeypatch):
    d, why = read_only_dir
    _no_model_load(monkeypatch)
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", d / "t.zarr")
    assert code == 2 and last_line(err) == f"workbench trace: error: --out {d / 't.zarr'}: {d} is not writable ({why})"
    code, err = cli(capsys, "demo", "--out", d / "demo")
    assert code == 2 and f"{d} is not writable ({why})" in err


def test_existing_and_complete_stores_speak_of_cli_flags(ckpt, prompts, tmp_path, capsys):
    out = tmp_path / "t.zarr"
    assert cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", out, "--quiet")[0] == 0
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", out, "--quiet")
    assert code == 2 and "already holds a trace" in err and "pass --resume to continue it or --overwrite" in err
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", out, "--resume", "--quiet")
    assert code == 2 and last_line(err).startswith(f"workbench trace: error: --resume: {out} is already a complete "
                                                   f"trace (n_tokens=")
    assert "Use --overwrite to record it again" in err and "reopen" not in err
    code, err = cli(capsys, "trace", ckpt, "--prompts", prompts, "--out", tmp_path / "none.zarr", "--resume")
    assert code == 2 and f"--resume: there is no trace at {tmp_path / 'none.zarr'} to resume" in err


def test_tokenizer_larger_than_the_embedding(tmp_path, prompts, capsys):
    d = tmp_path / "small-vocab"
    make_llama4_tokenizer(d, vocab_size=320)
    hf_text_model(vocab_size=256).save_pretrained(d)
    code, err = cli(capsys, "trace", d, "--prompts", prompts, "--out", tmp_path / "t.zarr", "--quiet")
    assert code == 2 and "the tokenizer has 320 tokens but the model's vocab_size is 256" in last_line(err)


# ---------------------------------------------------------------------------------------------
# exit codes of failures, --debug, Ctrl-C
# ---------------------------------------------------------------------------------------------
def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_internal_error_is_one_line_exit_1_and_debug_shows_it(capsys, monkeypatch):
    monkeypatch.setattr("workbench.cli.info.describe_model", _raise(ZeroDivisionError("division by zero")))
    code, err = cli(capsys, "info", "scout")
    assert code == 1 and last_line(err) == ("workbench info: error: internal error: ZeroDivisionError: division by "
                                            "zero (run again with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info", "scout"])
    with pytest.raises(ZeroDivisionError):
        main(["info", "scout", "--debug"])


def test_io_failure_is_exit_1(capsys, monkeypatch):
    monkeypatch.setattr("workbench.cli.info.describe_model",
                        _raise(OSError(errno.ENOSPC, "No space left on device", "/runs/x")))
    code, err = cli(capsys, "info", "scout")
    assert code == 1 and last_line(err) == "workbench info: error: [Errno 28] No space left on device: '/runs/x'"


def test_a_store_error_caused_by_a_full_disk_is_exit_1(capsys, monkeypatch):
    from workbench.hooks import RecorderError

    from workbench.trace.errors import TraceWriteError

    def fail(*a, **k):
        try:
            raise TraceWriteError("commit failed: [Errno 28] No space left on device")
        except TraceWriteError as e:
            raise RecorderError("writing /runs/x failed: commit failed: [Errno 28] No space left on device") from e
    monkeypatch.setattr("workbench.cli.info.describe_model", fail)
    code, err = cli(capsys, "info", "scout")
    assert code == 1 and "writing /runs/x failed" in last_line(err)


def test_keyboard_interrupt_is_130(capsys, monkeypatch):
    monkeypatch.setattr("workbench.cli.info.describe_model", _raise(KeyboardInterrupt()))
    code, err = cli(capsys, "info", "scout")
    assert code == 130 and err.strip() == "workbench info: interrupted"


def test_multi_line_messages_are_joined(capsys, monkeypatch):
    from workbench.cli import CLIError

    monkeypatch.setattr("workbench.cli.info.describe_model", _raise(CLIError("first\n  second\n")))
    code, err = cli(capsys, "info", "scout")
    assert code == 2 and err == "workbench info: error: first second\n"


# ---------------------------------------------------------------------------------------------
# the installed command, as a user runs it
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path(WORKBENCH).exists(), reason="the workbench console script is not installed")
def test_console_script_never_prints_a_traceback(ckpt, prompts, tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"architectures": ["Llama4ForCausalLM"],
                                                              "attention_chunk_size": 0}))
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_bytes(b'{"text": "\\udc80"}\n')
    runs = [
        (["trace", ckpt, "--prompts", prompts, "--out", tmp_path / "a.zarr", "--batch-size", "-1"], 2,
         "workbench trace: error: argument --batch-size: must be a positive integer (1 or more), got -1"),
        (["trace", ckpt, "--prompts", bad_prompts, "--out", tmp_path / "b.zarr"], 2,
         (f"workbench trace: error: {bad_prompts}:1: 'text' holds a lone surrogate '\\udc80' at character 0; "
          f"that is not Unicode text")),
        (["info", tmp_path / "cfg"], 2, "attention_chunk_size=0 must be a positive integer or null"),
        (["trace", ckpt, "--prompts", prompts, "--out", prompts / "x.zarr"], 2, "is a file, so no directory"),
    ]
    for args, rc, message in runs:
        out = subprocess.run([WORKBENCH, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == rc and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "a.zarr").exists()  # -1 used to write a complete 0-token trace


@pytest.mark.parametrize("value,fragment", [("-1", "must be a finite number of seconds >= 0, got -1"),
                                            ("soon", "expected a number of seconds, got 'soon'"),
                                            ("inf", "must be a finite number of seconds >= 0, got inf")])
def test_commit_every_is_checked(value, fragment, capsys, tmp_path):
    from workbench.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')
    with pytest.raises(SystemExit) as e:
        main(["trace", "scout", "--prompts", str(prompts), "--out", str(tmp_path / "o.zarr"), "--commit-every", value])
    assert e.value.code == 2 and fragment in capsys.readouterr().err
