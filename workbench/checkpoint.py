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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

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
               random_init: bool = False, seed: int = 0) -> nn.Module:
    """Load a Llama 4 checkpoint (HF format) as a workbench model in eval mode.

    path: a directory with config.json and model.safetensors (or shards + model.safetensors
      .index.json); or a preset name ``"scout"`` / ``"maverick"`` together with ``random_init=True``
      (released shapes, random weights: for shape and speed work only).
    dtype: torch dtype or name; None keeps each tensor's stored dtype.
    device: where the weights go (default CPU).

    Dtypes: every parameter of the model is floating point, so a checkpoint tensor must be F32,
    BF16, F16 or F64 (an integer, bool or float8 tensor is refused: float8 weights need scales
    this loader does not read), and all tensors of one checkpoint must share one dtype. A
    float16 tensor inside a float32 checkpoint is almost always a conversion mistake, and with
    ``dtype=None`` it would make the forward pass fail or silently run that layer in lower
    precision; re-save such a checkpoint in one dtype. Casting a uniform checkpoint (e.g. bf16
    -> fp32) is what ``dtype`` is for.

    ``model.source`` is {"path": resolved directory, "fingerprint": :func:`checkpoint_fingerprint`},
    computed from the file bytes by a thread pool while the tensors load.
    Raises CheckpointError / ConfigError naming the offending file, key, shape or dtype.
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
        hint = INDEX_NAME if (p / INDEX_NAME).is_file() else "model.safetensors"
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
    fingerprint = _Fingerprint(p, _fingerprint_files(p, files))  # hashes in the background from here on
    try:
        _check_headers(by_file, expected)
        bar = tqdm(total=len(expected), desc=f"loading {p.name}", unit="tensor", disable=not progress)
        for file, keys in sorted(by_file.items()):
            with _open(file) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    _set_param(model, k, t)
                    bar.update(1)
        bar.close()
        source = {"path": str(p.resolve()), "fingerprint": fingerprint.result()}
    finally:
        fingerprint.close()
    _retie(model, config)
    model.source = source
    model.eval()
    return model


_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors names


def _check_headers(by_file: dict[Path, list[str]], expected: dict[str, torch.Tensor]) -> None:
    """Shapes and dtypes of every tensor, from the safetensors headers (no tensor data is read)."""
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
