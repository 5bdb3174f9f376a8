"""Load an HF-format Llama 4 checkpoint directory into the plain-PyTorch model.

The model is built on the meta device (no memory), then each parameter is read lazily from its
safetensors file and materialized in place in the requested dtype/device: peak host memory is
about one copy of the weights. Safetensors only: nothing is ever unpickled.

What is checked before any weight is read (each a CheckpointError naming the file and tensor):
only regular files are opened (a FIFO named ``*.json`` or ``*.safetensors`` would block
forever); the index's ``weight_map`` is an object of tensor name -> shard file, and no shard
name leaves the checkpoint directory (absolute paths, ``..``); every tensor the model needs is
there, none is unexpected, and each has the configured shape and a floating-point dtype shared
by the whole checkpoint (see :func:`load_model` for the dtype rule).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from workbench.models.llama4.config import ConfigError, ModelConfig, preset
from workbench.models.llama4.model import build_model
from workbench.quant.weights import INT4_GROUP_SIZE

__all__ = ["CheckpointError", "load_model", "random_model", "save_model", "checkpoint_fingerprint"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe the configured model."""


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")


INDEX_NAME = "model.safetensors.index.json"


def _check_regular(file: Path) -> None:
    """CheckpointError unless ``file`` (after symlinks) is a regular file. Opening a FIFO blocks
    until a writer appears, a device may never end: neither is a checkpoint file."""
    try:
        st = file.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{file} is not a regular file; a checkpoint holds only regular files")


def _open_regular(file: Path) -> int:
    """A read-only descriptor of a regular file. O_NONBLOCK makes opening a FIFO return at once
    (instead of waiting for a writer); the type is then checked on the open descriptor, so a file
    swapped between a stat and the open cannot slip through."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot open it ({e.strerror or e})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{file} is not a regular file; a checkpoint holds only regular files")
    return fd


def _read_regular(file: Path) -> bytes:
    fd = _open_regular(file)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index: {tensor name: shard file name}."""
    try:
        doc = json.loads(_read_regular(index).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{index}: not a safetensors index (JSON nested too deeply to parse)") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        got = type(weight_map).__name__ if isinstance(doc, dict) and "weight_map" in doc else "none"
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object of tensor name -> "
                              f"shard file; got {got})")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: weight_map[{key!r}]={name!r} must be a shard file name")
    return weight_map


def _shard_path(path: Path, index: Path, key: str, name: str) -> Path:
    """``path / name`` for a shard named in the index; a name that leaves the checkpoint directory
    (absolute, or with ``..``) is refused: an index must not make the loader read other files.

    Symbolic links inside the directory are followed wherever they point: the Hugging Face hub
    cache stores every snapshot file as a link to ``../../blobs/<hash>``, so refusing links that
    leave the directory would refuse every downloaded checkpoint. Their targets must be regular
    files (checked before opening)."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or Path(name).is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(f"{index}: weight_map[{key!r}] names {name!r}, which is outside the checkpoint "
                              f"directory {path}; refused")
    return path / rel


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file holding it."""
    index = path / INDEX_NAME
    single = path / "model.safetensors"
    if index.exists():
        _check_regular(index)
        weight_map = _read_index(index)
        files = {k: _shard_path(path, index, k, f) for k, f in weight_map.items()}
        missing = sorted({str(f.relative_to(path)) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        for f in sorted(set(files.values())):
            _check_regular(f)
        return files
    if single.exists():
        _check_regular(single)
        with _open(single) as f:
            return {k: single for k in f.keys()}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds only pickle-based weights (.bin/.pt); workbench reads safetensors only "
                              f"(never unpickles). Convert them with transformers' save_pretrained(safe_serialization=True).")
    raise CheckpointError(f"no model.safetensors or {INDEX_NAME} in {path}")


class _open:
    """safe_open with errors that name the file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        _check_regular(self.file)  # safe_open would block on a FIFO
        try:
            self._cm = safe_open(str(self.file), framework="pt", device="cpu")
            return self._cm.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.file}: cannot read safetensors ({e}); the file is corrupt or truncated") from e

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint key -> meta parameter; tied weights are expected once (under the first name)."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p
    return out


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _retie(model: nn.Module, config: ModelConfig) -> None:
    if config.text.tie_word_embeddings:
        lm = model.language_model if config.is_multimodal else model
        lm.lm_head.weight = lm.model.embed_tokens.weight


def load_model(path: str | os.PathLike, dtype=None, device=None, *, progress: bool = True,
               random_init: bool = False, seed: int = 0, quantize: str | None = None,
               quantize_modules=None, group_size: int = INT4_GROUP_SIZE, tp=None) -> nn.Module:
    """Load a Llama 4 checkpoint (HF format) as a workbench model in eval mode.

    path: a directory with config.json and model.safetensors (or shards + model.safetensors
      .index.json); or a preset name ``"scout"`` / ``"maverick"`` together with ``random_init=True``
      (released shapes, random weights: for shape and speed work only).
    dtype: torch dtype or name; None keeps each tensor's stored dtype.
    device: where the weights go (default CPU).

    quantize: None (weights as stored / cast to ``dtype``), ``"fp8"`` or ``"int4"``: quantize while
      loading, tensor by tensor as it is read (on ``device``), so peak memory stays about the
      quantized model plus one float tensor. Layouts: :mod:`workbench.quant.weights` (FP8 per
      output channel; int4 symmetric, groups of ``group_size`` along the reduction dim, two values
      per byte). ``quantize_modules``: parts quantized besides the routed experts (always):
      ``"shared_expert"``, ``"dense_mlp"``, ``"attention"`` (a list or a comma-separated string).
      The router, norms, embeddings, lm_head and the vision tower are never quantized; naming
      them is an error.

    FP8 checkpoints (Maverick's official format, transformers' fbgemm_fp8): when config.json has a
    ``quantization_config`` with ``quant_method: "fbgemm_fp8"``, every Linear layer and routed
    experts module that its ``modules_to_not_convert`` does not exclude (transformers' matching
    rule; ``lm_head`` excluded when the list is absent) is read as stored: experts ``gate_up_proj``
    (E, H, 2I) / ``down_proj`` (E, I, H) float8_e4m3fn with float32 ``gate_up_proj_scale`` (E, 1, 2I)
    / ``down_proj_scale`` (E, H, 1); Linear ``weight`` float8_e4m3fn + ``weight_scale`` (out, 1)
    float32. A wrong scale shape or dtype, a missing scale, or a scale for a module the config
    keeps unquantized is a CheckpointError naming the tensor. A checkpoint that stores the router
    in FP8 is loaded as stored, with a warning (routing then uses the dequantized weights).

    Dtypes: every parameter of the model is floating point, so a checkpoint tensor must be F32,
    BF16, F16 or F64 (an integer, bool or float8 tensor is refused, except the quantized tensors
    of an FP8 checkpoint described above), and all tensors of one checkpoint must share one dtype. A
    float16 tensor inside a float32 checkpoint is almost always a conversion mistake, and with
    ``dtype=None`` it would make the forward pass fail or silently run that layer in lower
    precision; re-save such a checkpoint in one dtype. Casting a uniform checkpoint (e.g. bf16
    -> fp32) is what ``dtype`` is for.

    ``model.source`` is {"path": resolved directory, "fingerprint": :func:`checkpoint_fingerprint`},
    computed from the file bytes by a thread pool while the tensors load. A quantized model adds
    ``quantize`` ("fp8" / "int4"), ``quantize_modules`` (the quantized parts, comma-separated) and
    ``quantize_format``; quantizing on the fly also appends the mode to the fingerprint
    (``<hex>+int4-g128:experts``), so a trace recorded with another quantization (which can
    change routing) refuses to resume.
    tp: tensor parallelism (:mod:`workbench.runtime.parallel`): an int N (the world of an initialized
      process group, which must have N ranks) or a :class:`~workbench.runtime.parallel.TensorParallel`;
      None or 1: one process. Every rank calls ``load_model`` and reads only its slices of the split
      tensors (safetensors ``get_slice``: heads, the experts' / MLPs' intermediate dimension, the
      vocabulary; quantized data and scales alike), so each holds about 1/N of them; the rest is
      replicated. ``model.source["tensor_parallel"]`` describes the layout; ``model.tp`` is the group.
    Raises CheckpointError / ConfigError naming the offending file, key, shape or dtype.
    """
    dtype = _as_dtype(dtype)
    tp = _tensor_parallel(tp)
    device = torch.device(device) if device is not None else torch.device("cpu")
    p = Path(path)
    if not p.exists() and str(path) in ("scout", "maverick"):
        if not random_init:
            raise CheckpointError(f"{path!r} is a preset (configuration only, no weights); pass random_init=True "
                                  f"for random weights, or the path of a checkpoint directory")
        return random_model(preset(str(path)), dtype=dtype or torch.bfloat16, device=device, seed=seed)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} does not exist")
    config = ModelConfig.from_pretrained(p)
    qconfig = _read_quantization_config(p)
    if quantize is not None and qconfig is not None:
        raise CheckpointError(f"{p / 'config.json'} describes an already quantized checkpoint (quantization_config, "
                              f"quant_method {qconfig['quant_method']!r}); quantize={quantize!r} applies to float "
                              f"checkpoints only: leave it out to load the stored FP8 weights")
    if random_init:
        return random_model(config, dtype=dtype or _as_dtype(config.dtype) or torch.float32, device=device, seed=seed,
                            quantize=quantize, quantize_modules=quantize_modules, group_size=group_size, tp=tp)
    files = _weight_files(p)
    with torch.device("meta"):
        model = build_model(config)
    plan = _QuantPlan.make(model, quantize, quantize_modules, group_size, qconfig, p)
    expected = _expected_tensors(model)  # the checkpoint's keys: float for quantize=, quantized for FP8 files
    _check_keys(p, expected, files, plan, tied_head=config.text.tie_word_embeddings)
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(files[k], []).append(k)
    fingerprint = _Fingerprint(p, _fingerprint_files(p, files))  # hashes in the background from here on
    try:
        _check_headers(by_file, expected, plan.stored_dtypes)
        plan.apply(model)  # quantized modules replace the float ones (meta); after the checks above
        splits = {}
        if tp is not None:  # local shapes (meta); each rank then reads only its slices
            from workbench.runtime.parallel import shard_model

            splits = shard_model(model, tp)
        bar = tqdm(total=len(expected), desc=f"loading {p.name}" + (f" (rank {tp.rank})" if tp else ""),
                   unit="tensor", disable=not progress or (tp is not None and tp.rank != 0))
        _read_tensors(model, by_file, plan, splits, tp, device, dtype, bar)
        bar.close()
        source = {"path": str(p.resolve()), "fingerprint": fingerprint.result()}
    finally:
        fingerprint.close()
    _retie(model, config)
    source.update(plan.provenance(source["fingerprint"]))
    if tp is not None:
        from workbench.runtime.parallel import describe_layout

        source["tensor_parallel"] = describe_layout(tp)
    model.source = source
    model.eval()
    return model


def _check_keys(p: Path, expected: dict, files: dict, plan, *, tied_head: bool) -> None:
    """CheckpointError naming the first missing or unexpected tensor (a tied lm_head may be stored or
    not); an unexpected ``*_scale`` gets the quantization plan's own error first."""
    missing = [k for k in expected if k not in files]
    if missing:
        hint = INDEX_NAME if (p / INDEX_NAME).is_file() else "model.safetensors"
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint ({hint} in {p}), "
                              f"first: {missing[0]!r}" + (f"; also {missing[1:4]}" if len(missing) > 1 else ""))
    ignorable = {"lm_head.weight", "language_model.lm_head.weight"} if tied_head else set()
    unexpected = sorted(k for k in files if k not in expected and k not in ignorable)
    for k in unexpected:
        if k.endswith("_scale"):
            plan.unexpected_scale(k, files[k])
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {p} (in {files[unexpected[0]].name}), "
                              f"first: {unexpected[0]!r}; is config.json the one for these weights?")


def _read_tensors(model: nn.Module, by_file: dict, plan, splits: dict, tp, device: torch.device, dtype,
                  bar) -> None:
    """Read every tensor, file by file, into the (meta) model: this rank's slice of a split one;
    quantized on ``device`` when the plan says so, FP8 data and scales as stored, the rest cast to
    ``dtype`` (None: as stored). One tensor in host memory at a time."""
    if splits:
        from workbench.runtime.parallel import read_shard
    for file, keys in sorted(by_file.items()):
        with _open(file) as f:
            for k in keys:
                t = read_shard(f.get_slice(k), splits[k], tp.rank, tp.size, k) if k in splits else f.get_tensor(k)
                if k in plan.to_quantize:  # quantized on the target device, one tensor at a time
                    plan.load_float(model, k, t.to(device), tp, splits.get(k))
                elif k in plan.stored_dtypes:  # FP8 data and float32 scales, as stored
                    _set_param(model, k, t.to(device))
                else:
                    t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    _set_param(model, k, t)
                del t
                bar.update(1)


def _tensor_parallel(tp):
    """None (one process) or the TensorParallel that ``load_model(tp=...)`` / ``random_model`` shard for."""
    if tp is None or (isinstance(tp, int) and not isinstance(tp, bool) and tp == 1
                      and not (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return None
    from workbench.runtime.parallel import ParallelError, TensorParallel

    if isinstance(tp, TensorParallel):
        return tp
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an int >= 1 or a TensorParallel, got {tp!r}")
    group = TensorParallel()
    if group.size != tp:
        raise ParallelError(f"tp={tp} but the process group has {group.size} ranks: tensor parallelism uses the whole "
                            f"group (launch with torchrun --nproc-per-node {tp})")
    return None if tp == 1 else group


_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors names


def _read_quantization_config(path: Path) -> dict | None:
    """config.json's ``quantization_config`` (None without one); only ``fbgemm_fp8`` is read."""
    cfg_file = path / "config.json"
    try:
        doc = json.loads(_read_regular(cfg_file).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # ModelConfig.from_pretrained has already reported a bad config.json
    qc = doc.get("quantization_config") if isinstance(doc, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_file}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "fbgemm_fp8":
        raise CheckpointError(f"{cfg_file}: quantization_config.quant_method is {method!r}; workbench reads "
                              f"'fbgemm_fp8' checkpoints (Maverick's official FP8 format) and quantizes float "
                              f"checkpoints itself (load_model(..., quantize='fp8' | 'int4'))")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and (not isinstance(skip, list) or not all(isinstance(x, str) for x in skip)):
        raise CheckpointError(f"{cfg_file}: quantization_config.modules_to_not_convert must be a list of module "
                              f"names, got {skip!r:.200}")
    return qc


def _part_of(name: str) -> str:
    """Which part of the model a module name belongs to (for provenance and messages)."""
    for part, needle in (("experts", ".feed_forward.experts"), ("shared_expert", ".shared_expert."),
                         ("router", ".feed_forward.router"), ("attention", ".self_attn."),
                         ("vision_model", "vision_model."), ("multi_modal_projector", "multi_modal_projector."),
                         ("lm_head", "lm_head"), ("dense_mlp", ".feed_forward.")):
        if needle in name or name.startswith(needle.lstrip(".")):
            return part
    return "other"


class _QuantPlan:
    """What load_model quantizes: nothing, a float checkpoint on the fly, or an FP8 checkpoint's
    modules read as stored. ``to_quantize``: {float checkpoint key: (module name, attribute)};
    ``stored_dtypes``: {key: safetensors dtype} of an FP8 checkpoint's quantized tensors."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.group_size = INT4_GROUP_SIZE
        self.selected: dict[str, str] = {}
        self.prequantized = False
        self.parts: tuple[str, ...] = ()
        self.to_quantize: dict[str, tuple[str, str]] = {}
        self.stored_dtypes: dict[str, str] = {}
        self.skip: list[str] | None = None
        self.where = ""

    @classmethod
    def make(cls, model: nn.Module, quantize, quantize_modules, group_size, qconfig, path: Path) -> "_QuantPlan":
        from workbench.quant.modules import apply_structure, fbgemm_converts, parse_modules, select_modules

        plan = cls()
        if qconfig is not None:
            if quantize_modules is not None:
                raise CheckpointError(f"{path / 'config.json'}: an FP8 checkpoint decides which modules are quantized "
                                      f"(quantization_config.modules_to_not_convert); quantize_modules= applies to "
                                      f"quantize='fp8' | 'int4' on float checkpoints")
            plan.kind, plan.prequantized, plan.where = "fp8", True, str(path / "config.json")
            skip = qconfig.get("modules_to_not_convert")
            plan.skip = ["lm_head"] if skip is None else skip  # transformers' default skips the output head
            for name, m in model.named_modules():
                if type(m).__name__ == "Llama4TextExperts" or isinstance(m, nn.Linear):
                    if name and fbgemm_converts(name, plan.skip):
                        plan.selected[name] = "experts" if not isinstance(m, nn.Linear) else "linear"
            apply_structure(model, plan.selected, "fp8")
            for name, what in plan.selected.items():
                attrs = ("gate_up_proj", "down_proj") if what == "experts" else ("weight",)
                for a in attrs:
                    plan.stored_dtypes[f"{name}.{a}"] = "F8_E4M3"
                    plan.stored_dtypes[f"{name}.{a}_scale"] = "F32"
            routers = [n for n in plan.selected if _part_of(n) == "router"]
            if routers:
                warnings.warn(f"{path}: quantization_config does not exclude the router of {len(routers)} layer(s) "
                              f"(first {routers[0]}): it is read in FP8 and routing uses its dequantized weights",
                              stacklevel=3)
            plan.parts = tuple(sorted({_part_of(n) for n in plan.selected}))
            return plan
        if quantize is None:
            if quantize_modules is not None:
                raise ValueError("quantize_modules= needs quantize='fp8' or 'int4'")
            return plan
        if quantize not in ("fp8", "int4"):
            raise ValueError(f"quantize must be None, 'fp8' or 'int4', got {quantize!r}")
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
        plan.kind, plan.group_size = quantize, group_size
        plan.parts = parse_modules(quantize_modules)
        plan.selected = select_modules(model, plan.parts)
        for name, what in plan.selected.items():
            for a in (("gate_up_proj", "down_proj") if what == "experts" else ("weight",)):
                plan.to_quantize[f"{name}.{a}"] = (name, a)
        if quantize == "int4":  # K must be even for two values per byte: say which layer is not
            for name, what in plan.selected.items():
                m = model.get_submodule(name)
                ks = (m.gate_up_proj.shape[1], m.down_proj.shape[1]) if what == "experts" else (m.in_features,)
                if any(k % 2 for k in ks):
                    raise ValueError(f"int4 packs two values per byte along the input dimension; {name} has an "
                                     f"odd one ({ks})")
        return plan

    def apply(self, model: nn.Module) -> None:
        """Swap in the (empty) quantized modules for on-the-fly quantization (FP8 files: done in make)."""
        if self.kind is not None and not self.prequantized:
            from workbench.quant.modules import apply_structure

            apply_structure(model, self.selected, self.kind, self.group_size)

    def load_float(self, model: nn.Module, key: str, t: torch.Tensor, tp=None, split=None) -> None:
        name, attr = self.to_quantize[key]
        m = model.get_submodule(name)
        if tp is not None and self.kind == "fp8" and split is not None:
            from workbench.runtime.parallel import load_fp8_reduction_split, reduction_split

            if reduction_split(split):  # per-channel scales over every rank's rows, as one process has them
                load_fp8_reduction_split(m, attr, t, tp)
                return
        if attr == "weight":
            m.load_float(t)
        else:
            m.load_float(attr, t)

    def unexpected_scale(self, key: str, file: Path) -> None:
        """CheckpointError for a ``*_scale`` tensor whose module is not quantized."""
        base = key.removesuffix("_scale")
        module = base.rpartition(".")[0]
        why = (f"quantization_config.modules_to_not_convert ({self.where}) keeps {module!r} unquantized"
               if self.prequantized else "config.json has no quantization_config (a float checkpoint)")
        raise CheckpointError(f"tensor {key!r} in {file.name} is a quantization scale for a module that is not "
                              f"quantized: {why}")

    def provenance(self, fingerprint: str) -> dict:
        if self.kind is None:
            return {}
        parts = ",".join(self.parts)
        if self.prequantized:
            n = len(self.selected)
            return {"quantize": "fp8", "quantize_modules": parts,
                    "quantize_format": f"fbgemm_fp8 checkpoint ({n} modules FP8, per output channel)"}
        fmt = ("fp8 e4m3 per output channel" if self.kind == "fp8"
               else f"int4 symmetric, group {self.group_size} along the input dim, 2 per byte")
        tag = self.kind + (f"-g{self.group_size}" if self.kind == "int4" else "")
        return {"fingerprint": f"{fingerprint}+{tag}:{parts}", "quantize": self.kind, "quantize_modules": parts,
                "quantize_format": f"on the fly: {fmt}"}


def _check_headers(by_file: dict[Path, list[str]], expected: dict[str, torch.Tensor],
                   stored_dtypes: dict[str, str] | None = None) -> None:
    """Shapes and dtypes of every tensor, from the safetensors headers (no tensor data is read).

    ``stored_dtypes``: {key: safetensors dtype} of the quantized tensors of an FP8 checkpoint
    (data F8_E4M3, scales F32): those must have exactly that dtype and are left out of the rule
    that all other tensors share one floating dtype."""
    stored_dtypes = stored_dtypes or {}
    found: dict[str, tuple[str, Path]] = {}
    for file, keys in sorted(by_file.items()):
        with _open(file) as f:
            available = set(f.keys())
            for k in keys:
                if k not in available:
                    raise CheckpointError(f"tensor {k!r} is listed for {file.name} but that shard does not hold it")
                sl = f.get_slice(k)
                want, got = tuple(expected[k].shape), tuple(sl.get_shape())
                if got != want:
                    raise CheckpointError(f"tensor {k!r} in {file.name} has shape {got}, the config needs {want}")
                found[k] = (sl.get_dtype(), file)
    for k in [k for k in found if k in stored_dtypes]:
        dt, file = found.pop(k)
        if dt != stored_dtypes[k]:
            what = ("quantization scale" if k.endswith("_scale")
                    else "FP8 weight (quantization_config converts its module)")
            raise CheckpointError(f"tensor {k!r} in {file.name} has dtype {dt}; as a {what} it must be "
                                  f"{stored_dtypes[k]} (transformers' fbgemm_fp8 layout)"
                                  + ("; list the module in quantization_config.modules_to_not_convert if it is "
                                     "stored unquantized" if not k.endswith("_scale") else ""))
    for k, (dt, file) in found.items():
        if expected[k].is_floating_point() and dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {k!r} in {file.name} has dtype {dt}; a floating-point tensor "
                                  f"({', '.join(_FLOAT_DTYPES)}) belongs there")
    counts = Counter(dt for dt, _ in found.values())
    if len(counts) > 1:
        main, n_main = counts.most_common(1)[0]
        k, (dt, file) = next((k, v) for k, v in found.items() if v[0] != main)
        raise CheckpointError(f"tensor {k!r} in {file.name} has dtype {dt}, but {n_main} of the checkpoint's "
                              f"{len(found)} tensors are {main}: a checkpoint whose tensors disagree in dtype is "
                              f"refused (usually a conversion mistake); save it again in one dtype")


def fresh_tensor(name: str, shape, gen: torch.Generator, std: float) -> torch.Tensor:
    """Initial float32 value of checkpoint tensor ``name``: ones for norm weights, zeros for
    biases, else N(0, std) drawn from ``gen``."""
    if name.endswith(("norm.weight", "layernorm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * std


def random_model(config: ModelConfig, dtype=torch.float32, device=None, seed: int = 0,
                 std: float = 0.02, *, quantize: str | None = None, quantize_modules=None,
                 group_size: int = INT4_GROUP_SIZE, tp=None) -> nn.Module:
    """A model with random N(0, std) weights and unit norms: for shapes, speed and tests.

    ``quantize`` / ``quantize_modules`` / ``group_size`` as in :func:`load_model`: each tensor is
    drawn (the same values as without quantization), cast to ``dtype`` and quantized on ``device``
    one at a time. ``tp``: as in :func:`load_model`; every rank draws every tensor (the same values
    as one process) and keeps its slices."""
    tp = _tensor_parallel(tp)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_model(config)
    expected = _expected_tensors(model)
    plan = _QuantPlan.make(model, quantize, quantize_modules, group_size, None, Path("."))
    plan.apply(model)
    splits = {}
    if tp is not None:
        from workbench.runtime.parallel import shard_model, shard_tensor

        splits = shard_model(model, tp)
    for name, p in expected.items():
        t = fresh_tensor(name, p.shape, gen, std)
        if name in splits:
            t = shard_tensor(t, splits[name], tp.rank, tp.size, name)
        t = t.to(device=device, dtype=_as_dtype(dtype))
        if name in plan.to_quantize:
            plan.load_float(model, name, t, tp, splits.get(name))
        else:
            _set_param(model, name, t)
        del t
    _retie(model, config)
    if plan.kind is not None:  # random weights: no path or fingerprint, but the quantization is recorded
        model.source = {k: v for k, v in plan.provenance("random").items() if k != "fingerprint"}
    if tp is not None:
        from workbench.runtime.parallel import describe_layout

        model.source = {**getattr(model, "source", {}), "tensor_parallel": describe_layout(tp)}
    return model.eval()


def save_model(model: nn.Module, path: str | os.PathLike, config: ModelConfig, *,
               max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an HF-format checkpoint (config.json + safetensors, sharded if asked)."""
    from safetensors.torch import save_file

    from workbench.quant.modules import QuantizedTextExperts, QuantLinear

    if any(isinstance(m, (QuantizedTextExperts, QuantLinear)) for m in model.modules()):
        raise ValueError("save_model writes float checkpoints; this model holds quantized modules (load the float "
                         "checkpoint with quantize= instead of saving the quantized weights)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _expected_tensors(model).items()}
    hf = config.to_hf_dict()
    hf.setdefault("dtype", str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


_FINGERPRINT_BLOCK = 16 << 20  # bytes hashed as one unit; fixed, so the id does not depend on the thread count
_FINGERPRINT_TAG = b"workbench.checkpoint-fingerprint/2\0"


def _fingerprint_files(path: Path, files: dict[str, Path] | None = None) -> list[Path]:
    """What identifies the model: config.json, the index (if any) and every weight file it uses.
    Tokenizer and processor files are not part of it (the trace records a tokenizer hash)."""
    files = _weight_files(path) if files is None else files
    extra = [path / "config.json"] + ([path / INDEX_NAME] if (path / INDEX_NAME).exists() else [])
    return sorted(set(extra) | set(files.values()))


def _hash_block(fd: int, offset: int, length: int, file: Path) -> bytes:
    h = hashlib.sha256()
    buf = bytearray(min(length, 4 << 20))
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
        if n <= 0:
            raise CheckpointError(f"{file} became shorter while it was read (was it rewritten during loading?)")
        h.update(view[:n])  # hashlib releases the GIL for large updates: blocks hash in parallel
        offset += n
    return h.digest()


class _Fingerprint:
    """sha256 over every byte of the checkpoint's files, hashed in 16 MiB blocks by a thread pool.

    Started before the tensors are read, it runs alongside loading; ``result()`` joins it.
    """

    def __init__(self, root: Path, files: list[Path], workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="checkpoint-fingerprint")
        self._fds: list[int] = []
        self._jobs: list[tuple[str, int, list]] = []
        try:
            for file in files:
                fd = _open_regular(file)
                self._fds.append(fd)
                size = os.fstat(fd).st_size
                blocks = [self._pool.submit(_hash_block, fd, off, min(_FINGERPRINT_BLOCK, size - off), file)
                          for off in range(0, size, _FINGERPRINT_BLOCK)]
                self._jobs.append((file.relative_to(root).as_posix(), size, blocks))
        except BaseException:
            self.close()
            raise

    def result(self) -> str:
        h = hashlib.sha256(_FINGERPRINT_TAG)
        for name, size, blocks in self._jobs:
            h.update(f"{name}\0{size}\0".encode())
            for b in blocks:
                h.update(b.result())
        return h.hexdigest()[:16]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # no worker reads a descriptor closed below
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A stable id of a checkpoint's contents: 16 hex digits of a sha256 over the bytes of
    config.json, the safetensors index (if any) and every weight file, with their names and sizes.

    Why every byte: the previous id hashed only the safetensors headers, so two checkpoints with
    the same shapes and different values (two training steps, an edited expert) shared an id,
    and ``--resume`` could not tell them apart. Sampling a few blocks per file would leave that
    case open for any edit between the samples, so the whole payload is hashed instead: sha256
    runs at about 1.7 GB/s per core (SHA-NI), in 16 MiB blocks spread over up to 8 threads,
    started by :func:`load_model` before it reads the tensors. When loading reads the bytes anyway
    (to a GPU, with a dtype cast, from a cold disk) the hash costs little extra; a CPU load in the
    stored dtype maps the files lazily, and there the hash is the part of loading that reads
    them (it also warms the page cache the first forward pass would fault in).
    The id covers the files as stored: re-sharding or re-saving the same weights with other
    metadata gives another id; the same bytes under another directory give the same id.
    Only regular files are read.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} does not exist")
    fp = _Fingerprint(p, _fingerprint_files(p))
    try:
        return fp.result()
    finally:
        fp.close()


__all__ += ["ConfigError"]
