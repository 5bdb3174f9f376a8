"""Tensor parallelism (#15): real processes over gloo (world sizes 2 and 4, CPU), compared with one process.

Each distributed test starts two (or four) worker processes running this file (``python tests/test_parallel.py
SCENARIO RANK WORLD INIT_FILE OUT_DIR``), joined through a file:// store; rank 0 saves what the test
compares (tensors via ``torch.save``, read back with ``weights_only=True``). Scenarios are grouped so
that each costs one process start-up pair.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "data" / "images" / "digits_00.png"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
         "17 + 25 = 42 and 8 * 7 = 56, while 100 - 37 = 63 in the margin of the page"]
PROMPTS = [{"text": t, "images": []} for t in TEXTS] + [{"text": "<|image|>Which digit is this?",
                                                           "images": [str(IMAGE)]}]


def _tiny_config(**overrides):
    from workbench.models.llama4.config import ModelConfig

    d = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 256, "hidden_size": 64,
         "intermediate_size": 64, "intermediate_size_mlp": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 8, "attention_chunk_size": 8,
         "num_experts_per_tok": 1, "interleave_moe_layer_step": 1}
    d.update(overrides)
    return ModelConfig.from_dict(d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _routing_listener(model, sink: dict):
    """Record every MoE layer's applied top-k ids (hook_router) into ``sink`` {layer: [ids, ...]}."""
    from workbench.models.llama4.model import Llama4TextMoe

    handles = []
    for m in model.modules():
        if isinstance(m, Llama4TextMoe):
            handles.append(m.hook_router.add(
                (lambda i: lambda p, topk_ids, **kw: sink.setdefault(i, []).append(topk_ids.clone()))(m.layer_idx)))
    return handles


def _forward_suite(model, proc, out: dict, prefix: str) -> None:
    """Padded text batch (right and left padding) and an image batch: logits and routing."""
    sink: dict = {}
    handles = _routing_listener(model, sink)
    with torch.no_grad():
        for side in ("right", "left"):
            b = proc(text=TEXTS, padding=True, padding_side=side, return_tensors="pt")
            out[f"{prefix}text_{side}"] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        b = proc(text=[PROMPTS[3]["text"], TEXTS[0]], images=[[str(IMAGE)], []], padding=True, return_tensors="pt")
        out[f"{prefix}image"] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      pixel_values=b["pixel_values"]).logits
    for h in handles:
        h.remove()
    for layer, ids in sink.items():
        out[f"{prefix}route_{layer}"] = torch.cat([i.reshape(-1) for i in ids])


RANDOM_CASES = ("interleave1_top2", "interleave2_top2", "interleave2_top1", "top1_fp8", "interleave2_int4")


def _random_suite(tp, out: dict) -> None:
    """Tiny random configs (dims divide by 4; 2 KV heads: replicated on 4 ranks): MoE interleave 1 and
    2, top-1 and top-2, FP8 / int4 quantized experts; a left-padded batch; logits and routing."""
    from workbench.checkpoint import random_model

    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cases = {"interleave1_top2": (dict(num_experts_per_tok=2), {}),
             "interleave2_top2": (dict(interleave_moe_layer_step=2, num_experts_per_tok=2), {}),
             "interleave2_top1": (dict(interleave_moe_layer_step=2), {}),
             "top1_fp8": ({}, dict(quantize="fp8", quantize_modules="shared_expert,dense_mlp,attention")),
             "interleave2_int4": (dict(interleave_moe_layer_step=2), dict(quantize="int4", group_size=16))}
    assert tuple(cases) == RANDOM_CASES
    for name, (cfg, kw) in cases.items():
        config = _tiny_config(**cfg)
        m = random_model(config, dtype=torch.float32, seed=3, std=0.3, tp=tp, **kw)
        sink: dict = {}
        handles = _routing_listener(m, sink)
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits
        for h in handles:
            h.remove()
        if tp.rank == 0:
            ref = random_model(config, dtype=torch.float32, seed=3, std=0.3, **kw)
            ref_sink: dict = {}
            handles = _routing_listener(ref, ref_sink)
            with torch.no_grad():
                out[f"rel_{name}"] = torch.tensor(_rel(logits, ref(input_ids=ids, attention_mask=mask).logits))
            for h in handles:
                h.remove()
            out[f"moe_layers_{name}"] = torch.tensor(sorted(ref_sink))
            flat = lambda d, k: torch.cat([i.reshape(-1) for i in d[k]])  # noqa: E731
            out[f"same_routing_{name}"] = torch.tensor(sorted(sink) == sorted(ref_sink) and all(
                torch.equal(flat(sink, k), flat(ref_sink, k)) for k in ref_sink))


def _fp8_checkpoint_suite(tp, out_dir: Path, out: dict) -> None:
    """An fbgemm_fp8 checkpoint (Maverick's official format) read under TP: FP8 data and scales sliced."""
    from safetensors.torch import save_file

    from workbench.checkpoint import load_model, random_model

    config = _tiny_config(interleave_moe_layer_step=2)
    path = out_dir / "fp8-ckpt"
    if tp.rank == 0:
        q = random_model(config, dtype=torch.bfloat16, seed=5, std=0.3, quantize="fp8",
                         quantize_modules="shared_expert,dense_mlp,attention")
        path.mkdir()
        save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path / "model.safetensors"))
        hf = config.to_hf_dict()
        hf["quantization_config"] = {"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head", "router"]}
        (path / "config.json").write_text(json.dumps(hf))
    tp.barrier()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    m = load_model(path, dtype=torch.float32, tp=tp, progress=False)
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    if tp.rank == 0:
        _spy_off()  # the reference reads whole tensors (one process)
        ref = load_model(path, dtype=torch.float32, progress=False)
        with torch.no_grad():
            out["rel_fp8_checkpoint"] = torch.tensor(_rel(logits, ref(input_ids=ids).logits))


class _SliceSpy:
    """A safetensors slice that records how many elements each read returns."""

    def __init__(self, sl, key: str, reads: dict):
        self._sl, self._key, self._reads = sl, key, reads

    def get_shape(self):
        return self._sl.get_shape()

    def get_dtype(self):
        return self._sl.get_dtype()

    def __getitem__(self, index):
        t = self._sl[index]
        self._reads.setdefault(self._key, []).append(t.numel())
        return t


class _HandleSpy:
    """A safe_open handle whose get_slice reads and get_tensor calls are recorded per tensor."""

    def __init__(self, f, tag: str, reads: dict):
        self._f, self._tag, self._reads = f, tag, reads

    def get_slice(self, key):
        return _SliceSpy(self._f.get_slice(key), f"{self._tag}/{key}", self._reads)

    def get_tensor(self, key):
        t = self._f.get_tensor(key)
        self._reads.setdefault(f"{self._tag}/{key}", []).append(t.numel())
        return t

    def __getattr__(self, name):
        return getattr(self._f, name)


def _spy_on_loading(reads: dict, full: dict) -> None:
    """Record every tensor read from safetensors by ``load_model`` on this rank: ``reads`` {tag/key: [numel
    of each read]}, ``full`` {tag/key: numel of the whole tensor} (tag: the checkpoint folder's name)."""
    import math

    import workbench.checkpoint as ckpt

    class _open(ckpt._open):
        def __enter__(self):
            f = super().__enter__()
            tag = self.file.parent.name
            for k in f.keys():
                full[f"{tag}/{k}"] = math.prod(f.get_slice(k).get_shape())
            return _HandleSpy(f, tag, reads)

    _SPIED.append(ckpt._open)
    ckpt._open = _open


_SPIED: list = []


def _spy_off() -> None:
    import workbench.checkpoint as ckpt

    if _SPIED:
        ckpt._open = _SPIED.pop()


def _param_bytes(model, names) -> tuple[int, int]:
    """(bytes of the named parameters, bytes of their storages)."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names if n in params]
    return (sum(p.numel() * p.element_size() for p in ps), sum(p.untyped_storage().nbytes() for p in ps))


# ---------------------------------------------------------------------------------------------
# worker scenarios (run in the spawned processes)
# ---------------------------------------------------------------------------------------------
def scenario_forward(tp, out_dir: Path, arg: str) -> None:
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL
    from workbench.runtime.parallel import RoutingMismatchError, param_splits

    reads: dict = {}
    full: dict = {}
    _spy_on_loading(reads, full)
    proc = wb.load_processor(EMBEDDED_MODEL)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, tp=tp, progress=False)
    out: dict = {}
    _forward_suite(model, proc, out, "")
    gens = wb.generate(model, proc, PROMPTS[:2] + PROMPTS[3:], max_new_tokens=6)
    out["generated"] = torch.tensor([g.token_ids + [-1] * (6 - len(g.token_ids)) for g in gens])
    # sampling without a seed: every rank must pick the same tokens (each rank writes its own)
    sampled = wb.generate(model, proc, PROMPTS[:2], max_new_tokens=8, do_sample=True, temperature=1.5)
    (out_dir / f"sampled-{tp.rank}.json").write_text(json.dumps([g.token_ids for g in sampled]))
    names = list(param_splits(model, tp.size))
    out["split_bytes"], out["split_storage"] = map(torch.tensor, _param_bytes(model, names))
    out["expert_bytes"] = torch.tensor(_param_bytes(model, [n for n in names if ".experts." in n])[0])
    out["cache_kv_heads"] = torch.tensor(model.text_config.num_key_value_heads)
    _random_suite(tp, out)
    _fp8_checkpoint_suite(tp, out_dir, out)
    # every rank: what it read while loading (the embedded model and the FP8 checkpoint)
    (out_dir / f"reads-{tp.rank}.json").write_text(json.dumps({"reads": reads, "full": full}))
    # the routing checksum: perturb the router of one rank
    with torch.no_grad():
        if tp.rank == 1:
            r = model.language_model.model.layers[2].feed_forward.router.weight
            r.copy_(torch.randn(r.shape, generator=torch.Generator().manual_seed(9)))
        try:
            model(input_ids=torch.tensor([list(range(3, 40))]))
        except RoutingMismatchError as e:
            out["mismatch"] = str(e)
    if tp.rank == 0:
        torch.save(out, out_dir / "forward.pt")
        (out_dir / "mismatch.txt").write_text(out.get("mismatch", ""))


def scenario_record(tp, out_dir: Path, arg: str) -> None:
    """Record the prompt set (router, logits, attention) under TP; ``arg``: 'kill' makes rank 1 SIGKILL
    itself at its third forward pass (rank 0 must then fail, naming it)."""
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    proc = wb.load_processor(EMBEDDED_MODEL)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, tp=tp, progress=False)
    if arg == "kill" and tp.rank == 1:
        calls = []

        def die(point, **kw):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        model.language_model.model.hook_inputs.add(die)
    store = out_dir / "tp.zarr"
    from workbench.hooks import RecorderError

    try:  # refused on every rank before any collective or store
        wb.record(model, out_dir / f"experts-{tp.rank}.zarr", capture=("expert_out",), processor=proc)
    except RecorderError as e:
        (out_dir / f"experts-refused-{tp.rank}.txt").write_text(str(e))
    rec = wb.Recorder(model, store, capture=("router", "logits", "attention"), processor=proc,
                      commit_every_seconds=0)
    ok = False
    try:
        rec.run(model, proc, PROMPTS, batch_size=1, progress=False)
        ok = True
    finally:
        rec.close(complete=ok)
    if arg == "generate":  # answers recorded under TP (KV cache per rank, attention heads gathered)
        with wb.record(model, out_dir / "tp-gen.zarr", capture=("router", "attention"), processor=proc) as rec:
            wb.generate(model, proc, PROMPTS[2:], max_new_tokens=5, recorder=rec)


def scenario_raise(tp, out_dir: Path, arg: str) -> None:
    """Rank 1 raises in its second forward pass; rank 0 is then waiting in a collective."""
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, tp=tp, progress=False)
    calls = []

    def boom(point, **kw):
        calls.append(1)
        if tp.rank == 1 and len(calls) == 2:
            raise ValueError("deliberate failure on rank 1")
    model.language_model.model.layers[1].feed_forward.hook_router.add(boom)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.tensor([list(range(3, 30))]))


def scenario_nccl(tp, out_dir: Path, arg: str) -> None:
    """The NCCL path: the embedded model on cuda:RANK vs one process on cuda:0 (float32, no TF32)."""
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    torch.backends.cuda.matmul.allow_tf32 = False
    proc = wb.load_processor(EMBEDDED_MODEL)
    b = proc(text=TEXTS, padding=True, return_tensors="pt")
    ids, mask = b["input_ids"].to(tp.device), b["attention_mask"].to(tp.device)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, device=tp.device, tp=tp, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gens = wb.generate(model, proc, TEXTS, max_new_tokens=4)
    if tp.rank == 0:
        ref = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, device=tp.device, progress=False)
        with torch.no_grad():
            rel = _rel(logits, ref(input_ids=ids, attention_mask=mask).logits)
        same = [g.token_ids for g in gens] == [g.token_ids for g in wb.generate(ref, proc, TEXTS, max_new_tokens=4)]
        (out_dir / "nccl.json").write_text(json.dumps({"rel": rel, "same_generation": same}))


SCENARIOS = {"forward": scenario_forward, "record": scenario_record, "raise": scenario_raise, "nccl": scenario_nccl}


def _worker(scenario: str, rank: int, world: int, init: str, out_dir: str, arg: str) -> None:
    import torch.distributed as dist

    from workbench.runtime import parallel

    torch.set_num_threads(1)
    backend = "nccl" if scenario == "nccl" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    tp = parallel.TensorParallel()
    with parallel.guard(tp):
        SCENARIOS[scenario](tp, Path(out_dir), arg)
    dist.destroy_process_group()
    # The scenario's results are on disk; end without the interpreter's teardown, where gloo's C++
    # objects were seen to abort a finished rank now and then (exit -6 after a clean run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# the tests (parent process)
# ---------------------------------------------------------------------------------------------
def _launch(scenario: str, tmp_path: Path, arg: str = "", world: int = 2, timeout: float = 240):
    """Run a scenario on ``world`` ranks; [(returncode, output, seconds)] per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    init = tmp_path / f"pg-{scenario}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(r), str(world), str(init), str(tmp_path), arg],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            output, _ = p.communicate()
            pytest.fail(f"scenario {scenario!r} did not finish in {timeout} s:\n{output[-3000:]}")
        results.append((p.returncode, output, time.monotonic() - t0))
    return results


@pytest.fixture(scope="module")
def reference():
    """One process: the embedded model's logits, routing and greedy answers (float32)."""
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    torch.manual_seed(0)
    proc = wb.load_processor(EMBEDDED_MODEL)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    out: dict = {}
    _forward_suite(model, proc, out, "")
    gens = wb.generate(model, proc, PROMPTS[:2] + PROMPTS[3:], max_new_tokens=6)
    out["generated"] = torch.tensor([g.token_ids + [-1] * (6 - len(g.token_ids)) for g in gens])
    from workbench.runtime.parallel import param_splits

    params = dict(model.named_parameters())
    for n in (2, 4):  # what one rank of n holds of the split tensors (replicated KV heads: 1/2 on 4 ranks)
        out[f"split_bytes_{n}"] = sum(
            p.numel() // p.shape[s.dim] * s.local_size(p.shape[s.dim], 0, n) * p.element_size()
            for name, s in param_splits(model, n).items() for p in [params[name]])
    out["expert_bytes"] = _param_bytes(model, [n for n in param_splits(model, 2) if ".experts." in n])[0]
    return out


def test_layout_refuses_uneven_splits():
    from workbench.runtime.parallel import ParallelError, Split, check_divisible

    check_divisible(_tiny_config().text, 2)
    check_divisible(_tiny_config().text, 4)  # 2 KV heads on 4 ranks: replicated
    with pytest.raises(ParallelError, match="num_attention_heads=4"):
        check_divisible(_tiny_config().text, 3)
    with pytest.raises(ParallelError, match="intermediate_size=64"):
        check_divisible(_tiny_config(num_attention_heads=6, num_key_value_heads=6, head_dim=8).text, 3)
    with pytest.raises(ParallelError, match="vocab_size=250"):
        check_divisible(_tiny_config(vocab_size=250).text, 4)
    # gate and up columns split together; replicated KV heads
    s = Split(2, fused=2)
    assert s.ranges(8, 1, 2) == [(2, 4), (6, 8)]
    assert Split(0, units=2, replicas=True).ranges(32, 3, 4) == [(16, 32)]


@pytest.mark.parametrize("world", [2, 4])
def test_forward_generation_memory_and_checksum(tmp_path, reference, world):
    results = _launch("forward", tmp_path, world=world)
    for rc, output, _ in results:
        assert rc == 0, output[-4000:]
    got = torch.load(tmp_path / "forward.pt", weights_only=True)
    for key in ("text_right", "text_left", "image"):
        assert _rel(got[key], reference[key]) <= 1e-5, key
    routes = [k for k in reference if k.startswith("route_")]
    assert routes and all(torch.equal(got[k], reference[k]) for k in routes)
    assert torch.equal(got["generated"], reference["generated"])
    sampled = [json.loads((tmp_path / f"sampled-{r}.json").read_text()) for r in range(world)]
    assert all(s == sampled[0] for s in sampled) and len(sampled[0]) == 2, sampled
    # per-rank memory: 1/N of the split tensors (KV heads: 1/2 when replicated on 4 ranks), 1/N of every
    # expert, each in its own storage (no view of a full tensor)
    assert int(got["split_bytes"]) == reference[f"split_bytes_{world}"]
    assert int(got["expert_bytes"]) * world == reference["expert_bytes"]
    assert int(got["split_storage"]) == int(got["split_bytes"])
    assert int(got["cache_kv_heads"]) == 1  # 2 KV heads: one per rank on 2 ranks, replicated on 4
    for name in RANDOM_CASES + ("fp8_checkpoint",):
        assert float(got[f"rel_{name}"]) <= 1e-5, name
    for name in RANDOM_CASES:
        assert bool(got[f"same_routing_{name}"]), name
    assert got["moe_layers_interleave2_top2"].tolist() == [1, 3]  # interleave 2: every second layer is MoE
    assert got["moe_layers_interleave1_top2"].tolist() == [0, 1, 2, 3]
    msg = (tmp_path / "mismatch.txt").read_text()
    assert "routed differently" in msg and "decoder layer 2" in msg and "[1]" in msg
    # loading: no rank ever read a whole expert tensor (or any whole split tensor), only its 1/N slices
    for rank in range(world):
        spy = json.loads((tmp_path / f"reads-{rank}.json").read_text())
        reads, full = spy["reads"], spy["full"]
        experts = [k for k in reads if ".feed_forward.experts." in k and not k.endswith("_scale")]
        assert {k.split("/")[0] for k in experts} == {"tiny-llama4", "fp8-ckpt"}, sorted(reads)[:5]
        assert len([k for k in experts if k.startswith("tiny-llama4/")]) == 8  # gate_up + down, 4 MoE layers
        for k in experts:
            assert sum(reads[k]) * world == full[k], (rank, k, reads[k], full[k])
            assert max(reads[k]) < full[k], (rank, k)
        for k in [k for k in reads if not k.endswith("_scale") and "vision" not in k and any(s in k for s in (
                  "q_proj", "o_proj", "embed_tokens", "lm_head", "feed_forward.down_proj", "shared_expert"))]:
            assert max(reads[k]) * world <= full[k] and ".bias" not in k, (rank, k, reads[k], full[k])


def _single_trace(path: Path, prompts, resume: bool = False):
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    proc = wb.load_processor(EMBEDDED_MODEL)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    with wb.record(model, path, capture=("router", "logits", "attention"), processor=proc, resume=resume,
                   commit_every_seconds=0) as rec:
        rec.run(model, proc, prompts, batch_size=1, progress=False)


def _assert_same_trace(a: Path, b: Path) -> None:
    import workbench as wb

    ta, tb = wb.open_trace(a), wb.open_trace(b)
    assert ta.sizes == tb.sizes
    for name in ta.data_vars:
        x, y = ta[name].values, tb[name].values
        if np.issubdtype(x.dtype, np.floating):
            tol = max(1e-4, 2 * float(np.finfo(x.dtype).eps))  # float16 storage: one rounding step apart
            np.testing.assert_allclose(x, y, rtol=tol, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    att_a, att_b = wb.open_attention(a, sequence=3), wb.open_attention(b, sequence=3)
    assert att_a.shape == att_b.shape and att_a.sizes["head"] == 4
    np.testing.assert_allclose(att_a.values.astype(np.float32), att_b.values.astype(np.float32), atol=2e-3)


def test_trace_under_tp_equals_single_process(tmp_path):
    results = _launch("record", tmp_path, arg="generate")
    for rc, output, _ in results:
        assert rc == 0, output[-4000:]
    _single_trace(tmp_path / "one.zarr", PROMPTS)
    _assert_same_trace(tmp_path / "tp.zarr", tmp_path / "one.zarr")
    import zarr

    prov = zarr.open_group(str(tmp_path / "tp.zarr"), mode="r").attrs["provenance"]
    assert prov["tensor_parallel"]["world_size"] == 2 and "self_attn.q_proj" in prov["tensor_parallel"]["layout"]
    assert prov["tensor_parallel_parts"] == {"0": 2}
    for rank in range(2):  # the expert captures: a clear refusal on every rank, no store
        msg = (tmp_path / f"experts-refused-{rank}.txt").read_text()
        assert "do not run under tensor parallelism" in msg and not (tmp_path / f"experts-{rank}.zarr").exists()
    # generation recorded under TP: the same trace as one process
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    proc = wb.load_processor(EMBEDDED_MODEL)
    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    with wb.record(model, tmp_path / "one-gen.zarr", capture=("router", "attention"), processor=proc) as rec:
        wb.generate(model, proc, PROMPTS[2:], max_new_tokens=5, recorder=rec)
    a, b = wb.open_trace(tmp_path / "tp-gen.zarr"), wb.open_trace(tmp_path / "one-gen.zarr")
    for name in ("token_id", "sequence", "position", "generated", "topk_expert"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_allclose(a["topk_weight"].values, b["topk_weight"].values, rtol=1e-4)
    att_a, att_b = (wb.open_attention(tmp_path / f"{n}.zarr", sequence=1) for n in ("tp-gen", "one-gen"))
    np.testing.assert_allclose(att_a.values.astype(np.float32), att_b.values.astype(np.float32), atol=2e-3)


def test_rank_raising_stops_every_rank_with_its_name(tmp_path):
    results = _launch("raise", tmp_path, timeout=120)
    (rc0, out0, t0), (rc1, out1, t1) = results
    assert rc0 != 0 and rc1 != 0
    assert "rank 1 failed: ValueError: deliberate failure on rank 1" in out0, out0[-3000:]
    assert "deliberate failure on rank 1" in out1
    assert max(t0, t1) < 60


def test_rank_killed_then_resume_with_another_world_size(tmp_path):
    results = _launch("record", tmp_path, arg="kill", timeout=120)
    (rc0, out0, t0), (rc1, _, _) = results
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and "rank 1 died" in out0, out0[-3000:]
    assert t0 < 60
    import workbench as wb

    partial = wb.open_trace(tmp_path / "tp.zarr")  # opens, with every committed pass
    assert 0 < len(np.unique(partial["sequence"].values)) < len(PROMPTS)
    _single_trace(tmp_path / "tp.zarr", PROMPTS, resume=True)  # world size 1 continues it
    _single_trace(tmp_path / "one.zarr", PROMPTS)
    _assert_same_trace(tmp_path / "tp.zarr", tmp_path / "one.zarr")
    import zarr

    prov = zarr.open_group(str(tmp_path / "tp.zarr"), mode="r").attrs["provenance"]
    parts = prov["tensor_parallel_parts"]
    assert parts["0"] == 2 and list(parts.values())[-1] == 1 and len(parts) == 2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="the NCCL path needs at least 2 CUDA GPUs")
def test_nccl_matches_one_process(tmp_path):
    for rc, output, _ in _launch("nccl", tmp_path):
        assert rc == 0, output[-4000:]
    got = json.loads((tmp_path / "nccl.json").read_text())
    assert got["rel"] <= 1e-5 and got["same_generation"]


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
            sys.argv[6] if len(sys.argv) > 6 else "")
