"""Load an HF-format Llama 4 checkpoint directory into the plain-PyTorch model.

The model is built on the meta device (no memory), then each parameter is read lazily from its
safetensors file and materialized in place in the requested dtype/device: peak host memory is
about one copy of the weights. Safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from workbench.models.llama4.config import ConfigError, ModelConfig, preset
from workbench.models.llama4.model import build_model

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


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds only pickle-based weights (.bin/.pt); workbench reads safetensors only "
                              f"(never unpickles). Convert them with transformers' save_pretrained(safe_serialization=True).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


class _open:
    """safe_open with errors that name the file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
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
               random_init: bool = False, seed: int = 0) -> nn.Module:
    """Load a Llama 4 checkpoint (HF format) as a workbench model in eval mode.

    path: a directory with config.json and model.safetensors (or shards + model.safetensors
      .index.json); or a preset name ``"scout"`` / ``"maverick"`` together with ``random_init=True``
      (released shapes, random weights: for shape and speed work only).
    dtype: torch dtype or name; None keeps each tensor's stored dtype.
    device: where the weights go (default CPU).
    Raises CheckpointError / ConfigError naming the offending file, key or shape.
    """
    dtype = _as_dtype(dtype)
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
    if random_init:
        return random_model(config, dtype=dtype or _as_dtype(config.dtype) or torch.float32, device=device, seed=seed)
    files = _weight_files(p)
    with torch.device("meta"):
        model = build_model(config)
    expected = _expected_tensors(model)
    tied_head = config.text.tie_word_embeddings
    missing = [k for k in expected if k not in files]
    if missing:
        hint = "model.safetensors.index.json" if (p / "model.safetensors.index.json").is_file() else "model.safetensors"
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint ({hint} in {p}), "
                              f"first: {missing[0]!r}" + (f"; also {missing[1:4]}" if len(missing) > 1 else ""))
    ignorable = {"lm_head.weight", "language_model.lm_head.weight"} if tied_head else set()
    unexpected = sorted(k for k in files if k not in expected and k not in ignorable)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {p} (in {files[unexpected[0]].name}), "
                              f"first: {unexpected[0]!r}; is config.json the one for these weights?")
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(files[k], []).append(k)
    bar = tqdm(total=len(expected), desc=f"loading {p.name}", unit="tensor", disable=not progress)
    for file, keys in sorted(by_file.items()):
        with _open(file) as f:
            available = set(f.keys())
            for k in keys:
                if k not in available:
                    raise CheckpointError(f"tensor {k!r} is listed for {file.name} but that shard does not hold it")
                want = tuple(expected[k].shape)
                got = tuple(f.get_slice(k).get_shape())
                if got != want:
                    raise CheckpointError(f"tensor {k!r} in {file.name} has shape {got}, the config needs {want}")
                t = f.get_tensor(k)
                t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                _set_param(model, k, t)
                bar.update(1)
    bar.close()
    _retie(model, config)
    model.source = {"path": str(p.resolve()), "fingerprint": checkpoint_fingerprint(p)}
    model.eval()
    return model


def fresh_tensor(name: str, shape, gen: torch.Generator, std: float) -> torch.Tensor:
    """Initial float32 value of checkpoint tensor ``name``: ones for norm weights, zeros for
    biases, else N(0, std) drawn from ``gen``."""
    if name.endswith(("norm.weight", "layernorm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * std


def random_model(config: ModelConfig, dtype=torch.float32, device=None, seed: int = 0,
                 std: float = 0.02) -> nn.Module:
    """A model with random N(0, std) weights and unit norms: for shapes, speed and tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_model(config)
    for name, p in _expected_tensors(model).items():
        t = fresh_tensor(name, p.shape, gen, std)
        _set_param(model, name, t.to(device=device, dtype=_as_dtype(dtype)))
    _retie(model, config)
    return model.eval()


def save_model(model: nn.Module, path: str | os.PathLike, config: ModelConfig, *,
               max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an HF-format checkpoint (config.json + safetensors, sharded if asked)."""
    from safetensors.torch import save_file

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


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A cheap, stable id of a checkpoint: sha256 over config.json and each weight file's name, size
    and safetensors header (not the whole multi-GB payload)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 100_000_000)))
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


__all__ += ["ConfigError"]
