"""The Recorder: streams every forward pass's router decisions into a trace store.

Data path (no host synchronization inside the forward pass):

    taps (device tensors) -> per-forward device buffers -> at the end of the forward pass,
    non-blocking copies into pinned host memory + a CUDA event -> bounded queue (back-pressure)
    -> writer thread: waits for the event, drops padding, appends to the TraceWriter.

Memory is bounded by ``queue_size`` batches in flight, whatever the run length. An error in
the writer thread is raised in the caller's thread at the next forward pass or at close.

Model trees are reached through an *adapter* (:class:`RoutingAdapter`): :class:`WorkbenchAdapter`
for workbench's own Llama 4 (its taps), :class:`TransformersLlama4Adapter` for transformers'
Llama4 modules (forward hooks). Other MoE module trees only need a new adapter.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from workbench.hooks.points import hook_points

__all__ = ["Recorder", "record", "RoutingAdapter", "WorkbenchAdapter", "TransformersLlama4Adapter",
           "RecorderError", "CAPTURE_CHOICES"]

CAPTURE_CHOICES = ("router", "logits", "attention")


class RecorderError(RuntimeError):
    """Recording failed (bad capture options, a model without ids, or a failed store write)."""


# ----------------------------------------------------------------------------------------------
# Adapters: how a model tree reports inputs and router decisions
# ----------------------------------------------------------------------------------------------
@dataclass
class RoutingSpec:
    """What the trace needs to know about a model's routing."""

    moe_layers: list[int]
    n_experts: int
    top_k: int
    image_token_id: int | None
    special_ids: set[int] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)


class RoutingAdapter:
    """Connects a model tree to a recorder.

    ``attach(on_inputs, on_router)`` must arrange that, for every forward pass,
    ``on_inputs(input_ids (B,T), attention_mask (B,T), position_ids (B,T))`` is called once
    before any ``on_router(moe_index, router_logits (B*T,E), topk_ids (B*T,k), topk_weights
    (B*T,k))``. The recorder itself registers a forward hook on the top module to learn when a
    pass ends. ``detach()`` undoes ``attach``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def spec(self) -> RoutingSpec:  # pragma: no cover - interface
        raise NotImplementedError

    def attach(self, on_inputs: Callable, on_router: Callable) -> None:  # pragma: no cover
        raise NotImplementedError

    def detach(self) -> None:  # pragma: no cover
        raise NotImplementedError


class WorkbenchAdapter(RoutingAdapter):
    """workbench's own Llama 4: ``hook_inputs`` and each MoE layer's ``hook_router`` tap."""

    def spec(self) -> RoutingSpec:
        from workbench.models.llama4.config import ModelConfig

        cfg = self.model.config
        if not isinstance(cfg, ModelConfig):  # text-only model: its config is the TextConfig
            cfg = ModelConfig(text=cfg, vision=None, architecture="Llama4ForCausalLM")
        text = cfg.text
        eos = text.eos_token_id
        special = {i for i in (text.bos_token_id, text.pad_token_id) if i is not None}
        special |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if cfg.is_multimodal:
            special |= {cfg.boi_token_index, cfg.eoi_token_index}
        return RoutingSpec(moe_layers=list(text.moe_layers), n_experts=text.num_local_experts,
                           top_k=text.num_experts_per_tok,
                           image_token_id=cfg.image_token_index if cfg.is_multimodal else None,
                           special_ids=special, config=cfg.to_hf_dict())

    def attach(self, on_inputs, on_router) -> None:
        self._handles = []
        inputs = list(hook_points(self.model, "hook_inputs"))
        if len(inputs) != 1:
            raise RecorderError(f"expected one hook_inputs point in the model, found {len(inputs)}")
        self._handles.append(inputs[0][1].add(lambda p, input_ids, batch: on_inputs(
            input_ids, batch.valid, batch.positions)))
        for i, (_, point) in enumerate(hook_points(self.model, "hook_router")):
            self._handles.append(point.add((lambda i: lambda p, router_logits, topk_ids, topk_weights: on_router(
                i, router_logits, topk_ids, topk_weights))(i)))

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []


class TransformersLlama4Adapter(RoutingAdapter):
    """transformers' ``Llama4ForCausalLM`` / ``Llama4ForConditionalGeneration`` (forward hooks).

    Reads ``input_ids``/``attention_mask`` from the call's keyword arguments, and each
    ``Llama4Router``'s (scores, logits) output; top-k ids are recomputed from the logits exactly as
    the router does (``torch.topk``), the applied weights as sigmoid of the chosen logits.
    """

    def _text_config(self):
        c = self.model.config
        return getattr(c, "text_config", c)

    def spec(self) -> RoutingSpec:
        t = self._text_config()
        c = self.model.config
        eos = t.eos_token_id
        special = {i for i in (t.bos_token_id, t.pad_token_id) if i is not None}
        special |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        image_id = getattr(c, "image_token_index", None) if hasattr(c, "text_config") else None
        return RoutingSpec(moe_layers=list(t.moe_layers), n_experts=t.num_local_experts,
                           top_k=t.num_experts_per_tok, image_token_id=image_id, special_ids=special,
                           config=json.loads(c.to_json_string(use_diff=False)))

    def attach(self, on_inputs, on_router) -> None:
        k = self._text_config().num_experts_per_tok
        self._handles = []

        def pre(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise RecorderError("recording needs input_ids (the token table is keyed by them)")
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()
            on_inputs(ids, mask, pos)

        self._handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        routers = [m for m in self.model.modules() if type(m).__name__ == "Llama4Router"]
        for i, r in enumerate(routers):
            def hook(module, args, out, i=i):
                logits = out[1]
                vals, ids = torch.topk(logits, k, dim=-1)
                on_router(i, logits, ids, torch.sigmoid(vals.float()).to(logits.dtype))
            self._handles.append(r.register_forward_hook(hook))

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []


def adapter_for(model: nn.Module) -> RoutingAdapter:
    """Pick the adapter for a model tree."""
    if any(True for _ in hook_points(model, "hook_router")):
        return WorkbenchAdapter(model)
    if any(type(m).__name__ == "Llama4Router" for m in model.modules()):
        return TransformersLlama4Adapter(model)
    raise RecorderError(f"no routing adapter knows {type(model).__name__}: it has neither workbench taps "
                        f"nor transformers Llama4Router modules")


# ----------------------------------------------------------------------------------------------
# The recorder
# ----------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """One forward pass's capture, on its way from the device to the writer thread."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    topk_ids: torch.Tensor  # (B*T, L, k)
    topk_weights: torch.Tensor  # (B*T, L, k)
    router_logits: torch.Tensor | None  # (B*T, L, E)
    loads: torch.Tensor  # (L, E) int64, padding excluded, computed on the device
    sequence_ids: np.ndarray  # (B,) trace sequence number of each row
    event: Any = None

    @property
    def first_sequence(self) -> int:
        return int(self.sequence_ids[0])


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device->host copy without waiting (pinned memory on CUDA); CPU tensors pass through."""
    if t.device.type == "cpu":
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


class Recorder:
    """Records every forward pass of ``model`` into the trace store at ``store``.

    capture: any of "router" (top-k ids + applied weights; always on), "logits" (full router
    logits, stored as ``logits_dtype``), "attention" (cross-modal attention maps, see
    :mod:`workbench.hooks.attention`). Use as a context manager (``wb.record``) or call
    ``attach()`` / ``close()``. ``resume=True`` continues an incomplete store.
    """

    def __init__(self, model: nn.Module, store: str | Path, capture: Sequence[str] = ("router",), *,
                 logits_dtype: str = "float16", overwrite: bool = False, resume: bool = False,
                 processor=None, provenance: dict | None = None, queue_size: int = 4,
                 adapter: RoutingAdapter | None = None, attention_layers: Sequence[int] | None = None,
                 attention_heads: str | Sequence[int] = "all", attention_dtype: str = "float16",
                 commit_every_tokens: int = 0) -> None:
        capture = tuple(capture)
        unknown = [c for c in capture if c not in CAPTURE_CHOICES]
        if unknown:
            raise RecorderError(f"unknown capture option(s) {unknown}; choose from {CAPTURE_CHOICES}")
        self.capture = tuple(dict.fromkeys(("router",) + capture))
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.spec = self.adapter.spec()
        self.attention = None
        if "attention" in self.capture:  # validated before the store is created and locked
            from workbench.hooks.attention import AttentionCapture

            self.attention = AttentionCapture(self, layers=attention_layers, heads=attention_heads,
                                              dtype=attention_dtype)
        self.store_path = Path(store)
        # 0: every forward pass is committed before the next is written (a kill loses nothing
        # recorded). N: batches are staged until N tokens, then committed in one write: fewer
        # chunk rewrites (about 3x cheaper per token), and a kill loses at most N tokens.
        self._commit_every = int(commit_every_tokens)
        self.processor = processor
        if processor is not None:
            self.spec.special_ids |= _special_ids(processor) - {self.spec.image_token_id}
        self._logits = "logits" in self.capture
        self._writer = self._open_store(logits_dtype, overwrite, resume, provenance or {})
        self._next_sequence = self._sequences_in_store()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="workbench-recorder", daemon=True)
        self._thread.start()
        self._cur: dict[str, Any] | None = None
        self._sequence_ids: np.ndarray | None = None
        self._hook = None
        self._attached = False
        self._closed = False
        self._loads_lock = threading.Lock()

    # -- store ---------------------------------------------------------------------------------
    def _open_store(self, logits_dtype, overwrite, resume, provenance):
        from workbench.store import TraceWriter

        if resume:
            w = TraceWriter.resume(self.store_path, min_commit_tokens=self._commit_every)
            if list(w.moe_layers) != self.spec.moe_layers or w.n_experts != self.spec.n_experts:
                w.close(complete=False)
                raise RecorderError(f"{self.store_path} was recorded from another model layout "
                                    f"(moe_layers {w.moe_layers}, {w.n_experts} experts)")
            return w
        prov = {"model_config": self.spec.config, "capture": list(self.capture),
                "command": " ".join(sys.argv), **_model_provenance(self.model)}
        if self.processor is not None:
            prov["tokenizer_hash"] = getattr(self.processor, "tokenizer_hash", None) or _tokenizer_hash(self.processor)
        prov.update(provenance)
        vocab = _vocab(self.processor) if self.processor is not None else None
        return TraceWriter.create(self.store_path, moe_layers=self.spec.moe_layers, n_experts=self.spec.n_experts,
                                  top_k=self.spec.top_k, capture_logits=self._logits, logits_dtype=logits_dtype,
                                  attrs=prov, vocab=vocab, overwrite=overwrite,
                                  min_commit_tokens=self._commit_every)

    def _sequences_in_store(self) -> int:
        n = self._writer.n_tokens
        if n == 0:
            return 0
        from workbench.store import open_trace

        return int(open_trace(self.store_path)["sequence"].max().values) + 1

    # -- attach / detach -----------------------------------------------------------------------
    def attach(self) -> "Recorder":
        if self._closed:
            raise RecorderError("this recorder is closed")
        if not self._attached:
            self.adapter.attach(self._on_inputs, self._on_router)
            self._hook = self.model.register_forward_hook(self._on_forward_end)
            if self.attention is not None:
                self.attention.attach()
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            self.adapter.detach()
            self._hook.remove()
            if self.attention is not None:
                self.attention.detach()
            self._attached = False

    def __enter__(self) -> "Recorder":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    # -- taps ----------------------------------------------------------------------------------
    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RecorderError(f"writing {self.store_path} failed: {err}") from err

    def _on_inputs(self, input_ids, attention_mask, position_ids) -> None:
        self._raise_pending_error()
        if input_ids is None:
            raise RecorderError("recording needs input_ids (the token table is keyed by them)")
        self._cur = {"ids": input_ids, "mask": attention_mask, "pos": position_ids,
                     "topk": {}, "weights": {}, "logits": {}}

    def _on_router(self, i, router_logits, topk_ids, topk_weights) -> None:
        cur = self._cur
        if cur is None:
            raise RecorderError("router tap fired before the inputs tap")
        cur["topk"][i] = topk_ids
        cur["weights"][i] = topk_weights
        if self._logits:
            cur["logits"][i] = router_logits

    def _on_forward_end(self, module, args, output) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        L = len(self.spec.moe_layers)
        if len(cur["topk"]) != L:
            raise RecorderError(f"saw {len(cur['topk'])} router decisions for {L} MoE layers")
        ids, mask = cur["ids"], cur["mask"]
        topk = torch.stack([cur["topk"][i] for i in range(L)], dim=1)  # (N, L, k)
        weights = torch.stack([cur["weights"][i] for i in range(L)], dim=1).float()
        logits = torch.stack([cur["logits"][i] for i in range(L)], dim=1) if self._logits else None
        # Expert loads of this batch on the device, padding excluded, without a host sync.
        E = self.spec.n_experts
        flat = (topk + torch.arange(L, device=topk.device)[None, :, None] * E).reshape(-1)
        valid = mask.reshape(-1, 1, 1).expand_as(topk).reshape(-1).to(torch.int64)
        loads = torch.zeros(L * E, dtype=torch.int64, device=topk.device).scatter_add_(0, flat, valid).view(L, E)
        pending = _Pending(
            input_ids=_to_host(ids), attention_mask=_to_host(mask), position_ids=_to_host(cur["pos"]),
            topk_ids=_to_host(topk), topk_weights=_to_host(weights),
            router_logits=_to_host(logits) if logits is not None else None, loads=_to_host(loads),
            sequence_ids=self._take_sequence_ids(ids.shape[0]))
        if topk.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        attention = self.attention.finish_pass(pending) if self.attention is not None else None
        self._queue.put((pending, attention))  # blocks when the writer is behind: back-pressure

    def _take_sequence_ids(self, batch: int) -> np.ndarray:
        """Sequence numbers for this pass: those ``run`` set (prompt indices), else the next free ones."""
        ids, self._sequence_ids = self._sequence_ids, None
        if ids is None or len(ids) != batch:
            ids = np.arange(self._next_sequence, self._next_sequence + batch, dtype=np.int64)
        self._next_sequence = max(self._next_sequence, int(ids.max()) + 1)
        return ids

    # -- writer thread -------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
            except BaseException as e:  # surfaced in the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, p: _Pending, attention) -> None:
        if p.event is not None:
            p.event.synchronize()
        mask = p.attention_mask.numpy().astype(bool)
        B, T = mask.shape
        keep = mask.reshape(-1)
        ids = p.input_ids.numpy().reshape(-1)[keep]
        seq = p.sequence_ids[:, None].repeat(T, 1).reshape(-1)[keep]
        pos = p.position_ids.numpy().reshape(-1)[keep]
        modality = np.zeros(ids.shape, np.int8)
        if self.spec.special_ids:
            modality[np.isin(ids, list(self.spec.special_ids))] = 2
        if self.spec.image_token_id is not None:
            modality[ids == self.spec.image_token_id] = 1
        logits = p.router_logits
        if logits is not None:
            logits = logits.float().numpy()[keep]
        self._writer.append(ids, seq, pos, modality, p.topk_ids.numpy()[keep], p.topk_weights.numpy()[keep],
                            router_logits=logits)
        if attention is not None:
            self.attention.write(attention, p, keep)

    # -- views ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every recorded forward pass is committed to the store."""
        self._queue.join()
        self._raise_pending_error()
        if self._commit_every and not self._closed:
            self._writer.commit()

    def loads(self):
        """Running expert-load totals of what is committed: xarray (moe_layer, expert) int64.

        Safe to call from a dashboard thread while a run streams.
        """
        return self._writer.loads()

    @property
    def n_tokens(self) -> int:
        """Tokens committed to the store so far."""
        return self._writer.n_tokens

    def close(self, complete: bool = True) -> None:
        """Detach, drain the queue, and close the store (complete unless an error happened)."""
        if self._closed:
            return
        self.detach()
        self._queue.put(None)
        self._thread.join()
        self._closed = True
        err, self._error = self._error, None
        self._writer.close(complete=complete and err is None)
        if err is not None:
            raise RecorderError(f"writing {self.store_path} failed: {err}") from err

    # -- whole prompt sets ---------------------------------------------------------------------
    def run(self, model: nn.Module, processor, inputs: Iterable, *, batch_size: int = 8,
            max_tokens: int | None = None, truncation: bool = False, progress: bool = True) -> dict[str, Any]:
        """Record ``model`` over a prompt set; returns a summary dict.

        inputs: strings, or dicts {"text": str, "images": [PIL.Image | path, ...]}. Each prompt's
        trace ``sequence`` is its index in ``inputs``; prompts already in the store (a resumed
        run) are skipped, so are empty prompts (counted in the summary). A tqdm bar (terminal or
        JupyterLab) shows tokens/s.
        """
        from tqdm.auto import tqdm

        if model is not self.model:
            raise RecorderError("Recorder.run: pass the model this recorder was created for")
        items = [_as_item(x, i) for i, x in enumerate(inputs)]
        skipped = [it["index"] for it in items if not it["text"].strip() and not it["images"]]
        done = self._next_sequence  # prompts [0, done) are committed already (resume)
        items = [it for it in items if (it["text"].strip() or it["images"]) and it["index"] >= done]
        skipped = [i for i in skipped if i >= done]
        self.attach()
        t0, n0, seen = time.perf_counter(), self.n_tokens, 0
        bar = tqdm(total=len(items), desc=f"trace -> {self.store_path.name}", unit="prompt", disable=not progress)
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, len(items), batch_size):
                    chunk = items[start:start + batch_size]
                    kw = dict(text=[it["text"] for it in chunk], padding=True, return_tensors="pt")
                    if max_tokens is not None:
                        kw.update(max_length=max_tokens, truncation=truncation)
                    if any(it["images"] for it in chunk):
                        kw["images"] = [it["images"] for it in chunk]
                    batch = processor(**kw)
                    self._note_images(chunk, getattr(batch, "images", None))
                    tensors = {k: v.to(device) for k, v in batch.items()
                               if k in ("input_ids", "attention_mask", "pixel_values") and v is not None}
                    self._sequence_ids = np.array([it["index"] for it in chunk], dtype=np.int64)
                    model(**tensors)
                    seen += int(batch["attention_mask"].sum())  # host tensor from the processor: no sync
                    bar.update(len(chunk))
                    bar.set_postfix(tok_s=f"{seen / max(time.perf_counter() - t0, 1e-9):,.0f}")
            self.flush()
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        return {"prompts": len(items), "resumed_after": done, "skipped_empty": skipped,
                "tokens": self.n_tokens - n0,
                "seconds": dt, "tokens_per_s": (self.n_tokens - n0) / max(dt, 1e-9)}

    def _note_images(self, chunk: list[dict], infos) -> None:
        """Provenance for the views (``CrossModalAttentionView(trace, sequence)`` needs no image arguments):
        ``images[str(sequence)]``: each image's file path (absolute; None for in-memory images) and
        ``image_info[str(sequence)]``: its processing geometry (the processor's ``ImageInfo`` fields)."""
        import dataclasses

        if not infos:
            return
        paths: dict[str, list] = {}
        geo: dict[str, list] = {}
        for info in infos:
            item = chunk[int(info.sample)]
            key = str(item["index"])
            src = item["images"][int(info.index_in_sample)] if int(info.index_in_sample) < len(item["images"]) else None
            paths.setdefault(key, []).append(
                str(Path(src).resolve()) if isinstance(src, (str, os.PathLike)) else None)
            d = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
            geo.setdefault(key, []).append({k: v for k, v in d.items() if k not in ("sample",)})
        self._writer.update_provenance({"images": paths, "image_info": geo})


def record(model: nn.Module, store: str | Path, capture: Sequence[str] = ("router",), **kwargs) -> Recorder:
    """``with wb.record(model, "runs/x.zarr", capture=("router",)) as rec: model(**batch)``.

    Every forward pass inside the block is recorded. See :class:`Recorder` for options.
    """
    return Recorder(model, store, capture, **kwargs)


# ----------------------------------------------------------------------------------------------
def _as_item(x, i: int) -> dict[str, Any]:
    if isinstance(x, str):
        return {"index": i, "text": x, "images": []}
    if isinstance(x, dict):
        text = x.get("text", "")
        if not isinstance(text, str):
            raise RecorderError(f"input {i}: 'text' must be a string, got {type(text).__name__}")
        images = x.get("images") or []
        return {"index": i, "text": text, "images": list(images)}
    raise RecorderError(f"input {i}: expected a string or a dict with 'text' (and 'images'), got {type(x).__name__}")


def _model_provenance(model: nn.Module) -> dict[str, Any]:
    p = next(model.parameters())
    out = {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."), "model_class": type(model).__name__}
    source = getattr(model, "source", None)
    if isinstance(source, dict):
        out.update({f"checkpoint_{k}": v for k, v in source.items()})
    return out


def _vocab(processor) -> list[str] | None:
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab_size"):
        return None
    n = tok.get_vocab_size(with_added_tokens=True)
    # Decoded text, not BPE symbols ("Ġthe"): what a reader of the trace wants to see.
    return [tok.decode([i], skip_special_tokens=False) for i in range(n)]


def _special_ids(processor) -> set[int]:
    """Ids of the tokenizer's special tokens (chat headers, image delimiters, tile separators...)."""
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_added_tokens_decoder"):
        return set()
    return {i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def _tokenizer_hash(processor) -> str | None:
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(tok, "to_str"):
        return None
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
