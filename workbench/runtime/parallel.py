"""Tensor parallelism over torch.distributed: the layout as data, the process-group helpers, the
routing checksum and failure handling.

    torchrun --nproc-per-node 4 my_script.py          # or: workbench trace ... --tp 4
    # my_script.py
    from workbench.runtime import parallel
    tp = parallel.init()                               # process group (NCCL on GPU, gloo on CPU)
    with parallel.guard(tp):                           # a rank that raises stops all ranks, named
        model = wb.load_model(path, dtype=torch.bfloat16, device=tp.device, tp=tp)
        logits = model(**batch).logits                 # every rank: the full logits

The layout (Megatron / vLLM's Llama 4 layout, :data:`LAYOUT`): attention heads are split (q/k/v
projections by output rows, o_proj by input columns; KV heads are replicated when there are more
ranks than KV heads), every SwiGLU is split along its intermediate dimension (routed experts: each
rank holds I/N of every expert, gate and up columns together, down rows; the shared expert and the
dense MLPs the same way), the embedding and lm_head along the vocabulary. Everything else (router,
norms, vision tower, projector) is replicated. Each decoder layer all-reduces twice: after o_proj
and after the feed-forward (in the model dtype; ``reduce_dtype=torch.float32`` sums in float32).
The embedding all-reduces once (exact: one rank holds each token's row), lm_head all-gathers the
vocabulary shards, so every rank returns the full logits.

Every dimension that is split must divide by the number of ranks (a :class:`ParallelError` naming
the dimension otherwise; no uneven splits). Quantized weights split the same way as their float
originals, scales with their channels: per-output-channel FP8 scales follow a column split and are
replicated under a row split; int4 group scales follow either split, which needs the local
reduction dimension to hold whole groups.

The router is replicated, so every rank must choose the same experts. :class:`TensorParallel`
keeps a checksum of the applied top-k ids of every MoE layer and compares it across ranks every
``check_routing_every`` forward passes (one small all-gather; 0 turns it off), raising
:class:`RoutingMismatchError` naming the layer when ranks disagree (a perturbed router, an
intervention applied on one rank only).

Failure: every collective runs through :class:`TensorParallel`; when it fails (a peer died or
gave up), the error names the rank and its cause: a rank that raises inside :func:`guard` (or
lets an exception end the process: an ``excepthook`` is installed) publishes
``"<type>: <message>"`` in the process group's store and tears its process group down, so the
others' pending collectives fail at once (gloo: "connection closed") instead of waiting for the
timeout; a rank killed outright (SIGKILL, out of memory) is found by its process id (same host).
A rank that stops responding without dying is caught by the process group's ``timeout``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["TensorParallel", "ParallelError", "RoutingMismatchError", "Split", "LAYOUT", "init", "guard",
           "shard_model", "param_splits", "check_divisible", "read_shard", "shard_tensor", "tp_of",
           "VocabParallelEmbedding", "VocabParallelLMHead", "describe_layout"]

#: Default timeout of the process group made by :func:`init` (a rank that hangs without dying)
DEFAULT_TIMEOUT_S = 300.0


class ParallelError(RuntimeError):
    """A tensor-parallel run cannot go on: a layout that does not divide, or another rank failed."""


class RoutingMismatchError(ParallelError):
    """Ranks chose different experts (the router is replicated: they must not)."""


# ---------------------------------------------------------------------------------------------
# The layout as data
# ---------------------------------------------------------------------------------------------
#: What each part of the text decoder becomes on N ranks (recorded in the trace's provenance).
LAYOUT: dict[str, str] = {
    "self_attn.q_proj": "heads: output rows split (Hq/N heads per rank)",
    "self_attn.k_proj, self_attn.v_proj": "KV heads: output rows split (Hkv/N per rank; replicated when N > Hkv)",
    "self_attn.o_proj": "heads: input columns split; all-reduce after it",
    "feed_forward.experts.gate_up_proj": "every expert's intermediate dim split: gate and up columns together",
    "feed_forward.experts.down_proj": "every expert's intermediate dim split: rows",
    "feed_forward.shared_expert, dense feed_forward": "intermediate dim split (gate/up columns, down rows)",
    "feed_forward (output)": "all-reduce after the feed-forward (routed + shared, or dense)",
    "feed_forward.router": "replicated (identical routing on every rank, checksummed)",
    "embed_tokens": "vocabulary rows split; all-reduce (exact)",
    "lm_head": "vocabulary rows split; logits all-gathered",
    "norms, vision_model, multi_modal_projector": "replicated",
}

_TEXT_LAYER = r"^(?:language_model\.)?model\.layers\.\d+\."
# (pattern on the module name, role); the first match decides. Modules that match none are replicated.
_ROLES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (_TEXT_LAYER + r"self_attn\.q_proj$", "q_heads"),
    (_TEXT_LAYER + r"self_attn\.[kv]_proj$", "kv_heads"),
    (_TEXT_LAYER + r"self_attn\.o_proj$", "o_heads"),
    (_TEXT_LAYER + r"feed_forward\.(?:shared_expert\.)?(?:gate|up)_proj$", "column"),
    (_TEXT_LAYER + r"feed_forward\.(?:shared_expert\.)?down_proj$", "row"),
    (_TEXT_LAYER + r"feed_forward\.experts$", "experts"),
    (r"^(?:language_model\.)?model\.embed_tokens$", "vocab"),
    (r"^(?:language_model\.)?lm_head$", "vocab"),
))


@dataclass(frozen=True)
class Split:
    """How one parameter is divided over N ranks.

    dim: the split dimension (None: replicated). units: how many indivisible units the dimension
    holds per block (heads; None: every index is a unit); ``fused``: the dimension is ``fused``
    equal blocks (gate_up_proj: [gate | up]) each split the same way, rank r taking part r of every
    block. ``replicas``: when N > units and N % units == 0, rank r holds unit r // (N / units)
    (KV heads). ``first_rank``: the tensor is kept on rank 0 and zero elsewhere (the bias of a
    row-split layer, added once by the all-reduce).
    """

    dim: int | None
    units: int | None = None
    fused: int = 1
    replicas: bool = False
    first_rank: bool = False

    def ranges(self, size: int, rank: int, n: int, what: str = "tensor") -> list[tuple[int, int]]:
        """[(start, stop), ...] of the indices along ``dim`` that ``rank`` of ``n`` holds."""
        if size % self.fused:
            raise ParallelError(f"{what}: dimension {self.dim} of size {size} is not {self.fused} equal blocks")
        block = size // self.fused
        units = self.units or block
        if block % units:
            raise ParallelError(f"{what}: dimension {self.dim} of size {block} per block does not hold {units} "
                                f"equal units")
        per = block // units
        if units % n == 0:
            k = units // n
            return [(j * block + rank * k * per, j * block + (rank + 1) * k * per) for j in range(self.fused)]
        if self.replicas and n % units == 0:
            u = rank // (n // units)
            return [(j * block + u * per, j * block + (u + 1) * per) for j in range(self.fused)]
        raise ParallelError(f"{what}: tensor parallelism over {n} ranks cannot split its {units} "
                            f"{'heads' if self.units else 'indices'} along dimension {self.dim} evenly "
                            f"(use a number of ranks that divides {units})")

    def local_size(self, size: int, rank: int, n: int) -> int:
        return sum(b - a for a, b in self.ranges(size, rank, n))

    def describe(self) -> str:
        if self.first_rank:
            return "rank 0 only"
        if self.dim is None:
            return "replicated"
        return f"split dim {self.dim}" + (f" ({self.fused} fused blocks)" if self.fused > 1 else "")


REPLICATED = Split(None)


def _role(name: str) -> str | None:
    for pattern, role in _ROLES:
        if pattern.search(name):
            return role
    return None


def param_splits(model: nn.Module, n: int) -> dict[str, Split]:
    """{parameter name: Split} for every split (or rank-0-only) parameter of ``model`` (a workbench
    Llama 4, on any device, quantized modules included); parameters not listed are replicated.
    Raises ParallelError for a dimension that does not divide by ``n``."""
    from workbench.quant.modules import QuantizedTextExperts, QuantLinear

    config = _text_config(model)
    check_divisible(config, n)
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, Split] = {}
    for name, m in model.named_modules():
        role = _role(name)
        if role is None:
            continue
        pre = f"{name}."
        if role == "vocab":
            out[pre + "weight"] = Split(0)
            continue
        if role == "experts":
            kind = getattr(m, "kind", None) if isinstance(m, QuantizedTextExperts) else None
            out[pre + "gate_up_proj"] = Split(2, fused=2)
            out[pre + "down_proj"] = Split(1)
            if kind is not None:
                out[pre + "gate_up_proj_scale"] = Split(2, fused=2)
                # FP8: per output channel (E, H, 1): the output is not split. int4: groups along I.
                out[pre + "down_proj_scale"] = REPLICATED if kind == "fp8" else Split(1)
                if kind == "int4":
                    _check_groups(f"{name}.down_proj", m._logical["down_proj"][1], n, m.group_size)
            continue
        units = {"q_heads": Hq, "kv_heads": Hkv, "o_heads": Hq}.get(role)
        column = role in ("q_heads", "kv_heads", "column")
        replicas = role == "kv_heads"
        quant = m.kind if isinstance(m, QuantLinear) else None
        if column:
            out[pre + "weight"] = Split(0, units, replicas=replicas)
            if getattr(m, "bias", None) is not None:
                out[pre + "bias"] = Split(0, units, replicas=replicas)
            if quant is not None:
                out[pre + "weight_scale"] = Split(0, units, replicas=replicas)
        else:
            out[pre + "weight"] = Split(1, units)
            if getattr(m, "bias", None) is not None:
                out[pre + "bias"] = Split(None, first_rank=True)
            if quant == "int4":
                _check_groups(f"{name}.weight", m.in_features, n, m.group_size)
                out[pre + "weight_scale"] = Split(1)  # whole groups per rank (checked above)
    return out


def _check_groups(what: str, k: int, n: int, group: int) -> None:
    if k % n or (k // n) % group:
        raise ParallelError(f"{what}: int4 groups of {group} along a reduction dimension of {k} do not split over "
                            f"{n} ranks (each rank's {k / n:g} must be a multiple of {group})")


def check_divisible(config, n: int) -> None:
    """ParallelError unless every dimension the layout splits divides by ``n`` (KV heads may also
    be fewer than ``n`` when they divide it: they are then replicated)."""
    if not isinstance(n, int) or n < 1:
        raise ParallelError(f"the number of tensor-parallel ranks must be an int >= 1, got {n!r}")
    if n == 1:
        return
    dims = [("num_attention_heads", config.num_attention_heads), ("intermediate_size", config.intermediate_size),
            ("intermediate_size_mlp", config.intermediate_size_mlp), ("vocab_size", config.vocab_size)]
    for key, v in dims:
        if v % n:
            raise ParallelError(f"tensor parallelism over {n} ranks cannot split {key}={v} evenly (the layout "
                                f"splits heads, intermediate dimensions and the vocabulary; no uneven splits): "
                                f"use a number of ranks that divides it")
    kv = config.num_key_value_heads
    if kv % n and n % kv:
        raise ParallelError(f"tensor parallelism over {n} ranks cannot split num_key_value_heads={kv}: the KV heads "
                            f"must divide by the ranks, or the ranks by the KV heads (then they are replicated)")


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text", cfg)


def describe_layout(tp: "TensorParallel") -> dict[str, Any]:
    """What the trace's provenance records of a tensor-parallel model."""
    return {"world_size": tp.size, "backend": tp.backend, "reduce_dtype": str(tp.reduce_dtype or "model dtype"),
            "check_routing_every": tp.check_routing_every, "layout": dict(LAYOUT)}


# ---------------------------------------------------------------------------------------------
# Slicing tensors and safetensors slices
# ---------------------------------------------------------------------------------------------
def shard_tensor(t: torch.Tensor, split: Split, rank: int, n: int, what: str = "tensor") -> torch.Tensor:
    """This rank's part of a full tensor ``t`` (a copy with its own storage; meta stays meta)."""
    if split.first_rank:
        return t.clone() if rank == 0 else torch.zeros_like(t)
    if split.dim is None:
        return t
    parts = [t.narrow(split.dim, a, b - a) for a, b in split.ranges(t.shape[split.dim], rank, n, what)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, split.dim)).contiguous().clone()


def read_shard(sl, split: Split, rank: int, n: int, what: str = "tensor") -> torch.Tensor:
    """This rank's part of a safetensors slice (``safe_open(...).get_slice(key)``), copied into a
    tensor of its own: only those bytes are read from the (memory-mapped) file, and the result holds
    no reference to the whole tensor (a split expert tensor is never materialized whole)."""
    shape = list(sl.get_shape())
    if split.first_rank and rank != 0:
        one = sl[tuple(slice(0, 1) for _ in shape)] if shape else sl[()]  # for the dtype: one element read
        return torch.zeros(shape, dtype=one.dtype)
    if split.dim is None or split.first_rank:
        return sl[tuple(slice(None) for _ in shape)] if shape else sl[()]
    parts = []
    for a, b in split.ranges(shape[split.dim], rank, n, what):
        index = [slice(None)] * len(shape)
        index[split.dim] = slice(a, b)
        parts.append(sl[tuple(index)])
    if len(parts) > 1:
        return torch.cat(parts, split.dim)
    return parts[0].clone(memory_format=torch.contiguous_format)  # a view of the mapped whole: copy the part


# ---------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------
_KEY = "workbench/tp"


class TensorParallel:
    """One tensor-parallel process group and what the model needs of it.

    group: a torch.distributed process group (default: the world, which must be initialized).
    reduce_dtype: None (all-reduce in the model dtype) or torch.float32 (sum partials in float32).
    check_routing_every: compare the routing checksum across ranks every N forward passes (0: never).
    error_wait: seconds a rank whose collective failed waits for the failed rank's message.
    """

    def __init__(self, group=None, *, reduce_dtype: torch.dtype | None = None, check_routing_every: int = 1,
                 error_wait: float = 5.0, device: torch.device | str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ParallelError("tensor parallelism needs an initialized torch.distributed process group: run under "
                                "torchrun (or call workbench.runtime.parallel.init() / "
                                "torch.distributed.init_process_group first)")
        if reduce_dtype not in (None, torch.float32):
            raise ValueError(f"reduce_dtype must be None (the model dtype) or torch.float32, got {reduce_dtype!r}")
        if int(check_routing_every) < 0:
            raise ValueError(f"check_routing_every must be >= 0, got {check_routing_every}")
        # None means the default (world) group: collectives get group=None, so this object holds no
        # reference to the ProcessGroup. One kept alive past destroy_process_group (this object lives
        # until exit through the model's layers and the excepthook) is destroyed during interpreter
        # teardown, which can abort the process ("terminate called without an active exception").
        self.group = group
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        self.reduce_dtype = reduce_dtype
        self.check_routing_every = int(check_routing_every)
        self.error_wait = float(error_wait)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        self.gathered_layers: set[int] = set()  # layers whose attention hooks see every head (recording)
        self.passes = 0
        self._digest: torch.Tensor | None = None
        self._digest_layers: list[int] = []
        self._failed: str | None = None
        self._publish(f"pid/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")
        _install_excepthook(self)

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in the model dtype (float32 with ``reduce_dtype``; ``exact``:
        the partials do not overlap, as in the embedding, so the model dtype is exact)."""
        y = x if exact or self.reduce_dtype is None or x.dtype == self.reduce_dtype else x.to(self.reduce_dtype)
        y = y.contiguous()
        self._run("all_reduce", dist.all_reduce, y, group=self.group)
        return y.to(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim`` in rank order (every rank gets it)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._run("all_gather", dist.all_gather, parts, x, group=self.group)
        return torch.cat(parts, dim)

    def gather_heads(self, t: torch.Tensor | None, heads: int, dim: int = 1) -> torch.Tensor | None:
        """The full ``heads`` of per-rank head shards ``t`` (replicated KV shards counted once)."""
        if t is None:
            return None
        full = self.all_gather(t, dim)
        if full.shape[dim] == heads:
            return full
        per = t.shape[dim]  # replicated heads (N > heads): keep one copy of each
        copies = self.size // heads
        return torch.cat([full.narrow(dim, r * per, per) for r in range(0, self.size, copies)], dim)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        box = [obj]
        self._run("broadcast", dist.broadcast_object_list, box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self._run("barrier", dist.barrier, group=self.group)

    def gathers(self, layer_idx: int) -> bool:
        """Whether attention layer ``layer_idx`` gathers its heads for hook listeners (recording)."""
        return layer_idx in self.gathered_layers

    # -- routing checksum ----------------------------------------------------------------------
    def note_routing(self, layer_idx: int, topk_ids: torch.Tensor) -> None:
        """Fold one MoE layer's applied top-k ids (N, k) into this pass's checksum."""
        if not self.check_routing_every:
            return
        ids = topk_ids.reshape(-1).to(torch.int64)
        w = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.int64) % 1000003 + 1
        d = ((ids + 1) * w).sum().reshape(1)
        if layer_idx not in self._digest_layers:
            self._digest_layers.append(layer_idx)
            self._digest = d if self._digest is None else torch.cat([self._digest, d])
        else:
            i = self._digest_layers.index(layer_idx)
            self._digest[i] = self._digest[i] * 31 + d[0]

    def end_pass(self) -> None:
        """Called once per forward pass (every rank runs the same passes): every
        ``check_routing_every`` passes the checksums are compared across the ranks."""
        self.passes += 1
        if not self.check_routing_every or self.passes % self.check_routing_every or self._digest is None:
            return
        digest, layers = self._digest, self._digest_layers
        self._digest, self._digest_layers = None, []
        all_ = self.all_gather(digest[None], 0)  # (N, L)
        bad = (all_ != all_[:1]).any(0)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            ranks = [r for r in range(self.size) if all_[r, j] != all_[0, j]]
            raise RoutingMismatchError(
                f"tensor-parallel ranks routed differently: decoder layer {layers[j]}, within forward passes "
                f"{self.passes - self.check_routing_every + 1}..{self.passes}: rank(s) {ranks} chose other experts "
                f"than rank 0 (checksums {all_[:, j].tolist()}). The router is replicated, so the ranks' router "
                f"weights or hook edits differ (an intervention applied on one rank only?)")

    # -- failure handling ----------------------------------------------------------------------
    def _run(self, what: str, fn: Callable, *args, **kwargs):
        if self._failed is not None:
            raise ParallelError(self._failed)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # gloo: "Connection closed by peer"; NCCL: watchdog / timeout
            self._failed = self.diagnose(e, what)
            self.abort()  # so ranks waiting on this one fail now too
            raise ParallelError(self._failed) from e

    def diagnose(self, err: BaseException, what: str = "collective") -> str:
        """A message naming the rank that failed and why (its published error, or that it died)."""
        start = time.monotonic()
        while True:
            for r in range(self.size):
                if r == self.rank:
                    continue
                msg = self._read(f"error/{r}")
                if msg is not None:
                    return f"rank {r} failed: {msg} (seen by rank {self.rank} in {what})"
            dead = [d for d in (self._dead(r) for r in range(self.size) if r != self.rank) if d]
            if dead and time.monotonic() - start > 0.5:  # a short grace for a message it may still publish
                return "; ".join(dead) + f" (seen by rank {self.rank} in {what}: {_short(err)})"
            if time.monotonic() - start > self.error_wait:
                return (f"rank {self.rank}: {what} failed and no other rank reported an error within "
                        f"{self.error_wait:g} s (a rank hung past the process group's timeout, or died on "
                        f"another host): {_short(err)}")
            time.sleep(0.05)

    def report(self, exc: BaseException) -> None:
        """Publish this rank's failure for the others (called by :func:`guard` and the excepthook)."""
        if isinstance(exc, ParallelError) and self._failed is not None:
            return  # another rank's failure: already named there
        self._publish(f"error/{self.rank}", f"{type(exc).__name__}: {exc}"[:2000])

    def abort(self) -> None:
        """Tear this rank's process group down (peers blocked in a collective with it fail at once)."""
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()

    # The process group's store is looked up at each use, never kept: a reference held past
    # destroy_process_group (this object lives until exit through the excepthook) leaves the store's
    # client to be destroyed at interpreter exit, after c10d's teardown. Suspected cause of a rare
    # abort at exit of gloo ranks ("terminate called without an active exception"), not confirmed.
    def _publish(self, key: str, value: str) -> None:
        store = _default_store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(f"{_KEY}/{key}", value)

    def _read(self, key: str) -> str | None:
        store = _default_store()
        if store is None:
            return None
        try:
            if store.check([f"{_KEY}/{key}"]):
                return store.get(f"{_KEY}/{key}").decode(errors="replace")
        except Exception:
            return None
        return None

    def _dead(self, r: int) -> str | None:
        where = self._read(f"pid/{r}")
        if where is None:
            return None
        host, _, pid = where.rpartition(":")
        if host != socket.gethostname() or not _pid_gone(int(pid)):
            return None
        return f"rank {r} died (process {pid} is gone without reporting an error: killed by a signal, e.g. SIGKILL " \
               f"or the out-of-memory killer)"


def _short(err: BaseException) -> str:
    s = str(err).strip().splitlines()
    return f"{type(err).__name__}: {s[0][:300] if s else ''}"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not waited for yet is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


_hooked: list[TensorParallel] = []
_hook_lock = threading.Lock()


def _install_excepthook(tp: TensorParallel) -> None:
    """An uncaught exception on this rank is published before the process ends (then its sockets
    close and the other ranks name it)."""
    with _hook_lock:
        _hooked[:] = [tp]
        if getattr(sys.excepthook, "_workbench_tp", False):
            return
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            for t in _hooked:
                t.report(exc)
                t.abort()
            previous(exc_type, exc, tb)

        hook._workbench_tp = True
        sys.excepthook = hook


@contextlib.contextmanager
def guard(tp: TensorParallel | None):
    """Run a block so that an exception on this rank stops every rank: it is published (the others
    raise ParallelError naming this rank and the cause) and the process group is torn down, then
    re-raised here. A ParallelError from another rank's failure passes through unchanged."""
    try:
        yield tp
    except BaseException as e:
        if tp is not None:
            tp.report(e)
            tp.abort()
        raise


def init(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S, **options) -> TensorParallel:
    """Initialize torch.distributed (under torchrun: from its environment) unless it is already,
    and return the :class:`TensorParallel` of the world. backend: default NCCL when CUDA is there,
    else gloo; each rank uses cuda:LOCAL_RANK. timeout: seconds a collective may wait (a hung rank).
    ``options`` go to :class:`TensorParallel` (reduce_dtype, check_routing_every, ...)."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return TensorParallel(**options)


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel embedding and output head
# ---------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` whose rows (the vocabulary) are split: rank r holds ids [r V/N, (r+1) V/N);
    the others' rows are zero here and the all-reduce fills them in (exact)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim = vocab_size, weight.shape[1]
        self.start = tp.rank * (vocab_size // tp.size)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return self.tp.all_reduce(out, exact=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.start}, {self.start + self.weight.shape[0]})"


class VocabParallelLMHead(nn.Module):
    """``nn.Linear(H, V, bias=False)`` with the vocabulary split; returns the full logits on every rank."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], vocab_size
        self.tp = tp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(F.linear(h, self.weight), -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (rows split over {self.tp.size})"


# ---------------------------------------------------------------------------------------------
# Sharding a model
# ---------------------------------------------------------------------------------------------
def tp_of(model: nn.Module) -> TensorParallel | None:
    """The TensorParallel of a sharded model (None for a single-process model)."""
    return getattr(model, "tp", None)


def shard_model(model: nn.Module, tp: TensorParallel) -> dict[str, Split]:
    """Split ``model`` (a workbench Llama 4; on the meta device: shapes only, as ``load_model`` does
    before reading each rank's slices; or materialized: its tensors are sliced) in place for
    ``tp``, and return the {parameter name: Split} it applied (what the loader reads by)."""
    from workbench.quant.modules import QuantizedTextExperts, QuantLinear

    config = _text_config(model)
    splits = param_splits(model, tp.size)
    params = dict(model.named_parameters(remove_duplicate=False))
    ties = {}
    for name, p in params.items():
        ties.setdefault(id(p), []).append(name)
    done: dict[int, nn.Parameter] = {}
    for name, split in splits.items():
        p = params[name]
        if id(p) in done:
            new = done[id(p)]
        else:
            new = nn.Parameter(shard_tensor(p.data, split, tp.rank, tp.size, name), requires_grad=False)
            done[id(p)] = new
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = new
    # module attributes that describe the (now local) shapes
    for name, m in model.named_modules():
        role = _role(name)
        if role is None:
            continue
        if role == "vocab":
            cls = VocabParallelEmbedding if isinstance(m, nn.Embedding) else VocabParallelLMHead
            model.set_submodule(name, cls(m.weight, config.vocab_size, tp))
        elif isinstance(m, QuantizedTextExperts):
            E, H, I2 = m._logical["gate_up_proj"]
            m._logical = {"gate_up_proj": (E, H, I2 // tp.size), "down_proj": (E, I2 // 2 // tp.size, H)}
        elif isinstance(m, (nn.Linear, QuantLinear)):
            w = splits.get(f"{name}.weight")
            if w is not None and w.dim == 0:
                m.out_features = w.local_size(m.out_features, tp.rank, tp.size)
            elif w is not None and w.dim == 1:
                m.in_features = w.local_size(m.in_features, tp.rank, tp.size)
    # tied embeddings: lm_head shares the embedding's (split) weight
    for names in ties.values():
        if len(names) > 1:
            shared = model.get_parameter(names[0])
            for other in names[1:]:
                module_name, _, attr = other.rpartition(".")
                setattr(model.get_submodule(module_name), attr, shared)
    _install(model, tp)
    return splits


def reduction_split(split: Split) -> bool:
    """Whether ``split`` divides a weight along its reduction dimension (experts' down_proj (E, I, H),
    a Linear's input columns (out, in): dimension 1 of both)."""
    return split.dim == 1 and not split.first_rank


def load_fp8_reduction_split(module: nn.Module, attr: str, t: torch.Tensor, tp: TensorParallel) -> None:
    """Quantize this rank's slice ``t`` of a float weight split along its reduction dimension to FP8
    (per output channel) with the scale of the WHOLE weight: the channels' absolute maximum is
    all-reduced (MAX) over the ranks first, so data and scale equal this rank's part of what one
    process computes (``quantize_fp8``). ``attr``: ``down_proj`` of QuantizedTextExperts or
    ``weight`` of QuantLinear."""
    from workbench.quant.weights import FP8_DTYPE, FP8_MAX

    wf = t.float()
    amax = wf.abs().amax(dim=1, keepdim=True)
    tp._run("all_reduce", dist.all_reduce, amax, op=dist.ReduceOp.MAX, group=tp.group)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (wf / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    del wf
    scale = s.transpose(-1, -2).contiguous() if attr == "down_proj" else s  # experts store (E, H, 1)
    module._parameters[attr] = nn.Parameter(data, requires_grad=False)
    module._parameters[attr + "_scale"] = nn.Parameter(scale, requires_grad=False)


def local_text_config(config, tp: TensorParallel):
    """The text config as one rank runs it (what its KV cache holds): its query and KV heads."""
    kv = config.num_key_value_heads
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp.size,
                               num_key_value_heads=kv // tp.size if kv % tp.size == 0 else 1)


def _install(model: nn.Module, tp: TensorParallel) -> None:
    """Give the model's parts their ``tp`` (decoder layers reduce, attention gathers for hooks,
    MoE layers checksum routing, the text model ends passes) and the local cache config."""
    from workbench.models.llama4.model import (Llama4TextAttention, Llama4TextDecoderLayer, Llama4TextMoe,
                                               Llama4TextModel)

    for m in model.modules():
        if isinstance(m, (Llama4TextDecoderLayer, Llama4TextAttention, Llama4TextMoe)):
            m.tp = tp
        if isinstance(m, Llama4TextModel):
            m.tp = tp
            m.cache_config = local_text_config(m.config, tp)
    model.tp = tp
