"""The Recorder: a sink that runs declared captures on every forward pass and streams them into a trace.

Data path (no host synchronization inside the forward pass):

    adapter's hook points (device tensors) -> captures collect per pass -> at the end of the
    forward pass, non-blocking copies into pinned host memory + a CUDA event -> bounded queue
    (back-pressure) -> writer thread: waits for the event, drops padding, appends the core
    columns and every capture's rows to the TraceWriter, then lets captures write child groups.

Memory is bounded by ``queue_size`` passes in flight, whatever the run length. An error in the
writer thread is raised in the caller's thread at the next forward pass or at close.

What is recorded is declared by captures (:mod:`workbench.hooks.captures`); how a model reports
inputs and router decisions by its adapter (:mod:`workbench.hooks.adapters`). Listeners are
added, never swapped in, so several recorders, captures and interventions work on one model at
once. Sequence numbers belong to the runner: :meth:`Recorder.sequences` (``run`` uses it) says
which sequences the next passes continue; a bare forward pass gets fresh numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from workbench.hooks.adapters import Adapter, AdapterError, adapter_for
from workbench.hooks.captures import Capture, Pass, RecorderError, Written, make_captures, to_host
from workbench.hooks.points import Handles
from workbench.trace.schema import Modality

__all__ = ["Recorder", "record", "RecorderError"]


@dataclass(eq=False)
class _Item:
    """One forward pass on its way from the device to the writer thread."""

    input_ids: torch.Tensor  # (B, T) host
    valid: torch.Tensor  # (B, T) bool host
    positions: torch.Tensor  # (B, T) host
    sequence_ids: np.ndarray  # (B,)
    payloads: list
    event: Any = None


class Recorder:
    """Records every forward pass of ``model`` into the trace store at ``store``.

    capture: what to record, beside the core columns (token id, sequence, position, modality):
    capture names (``"router"`` - always on -, ``"logits"``, ``"attention"``), Capture instances
    (``LogitsCapture(dtype="float32")``, ``AttentionCapture(layers=[1, 3])``) or a mapping
    {name: options}. ``resume=True`` continues an incomplete store (same captures and model
    layout, else RecorderError). ``commit_every_tokens=N`` stages passes until N tokens, then
    commits them in one write (about 3x cheaper per token; a kill loses at most N tokens); 0
    commits every pass. Use as a context manager (``wb.record``) or ``attach()`` / ``close()``.
    """

    def __init__(self, model: nn.Module, store: str | os.PathLike,
                 capture: Sequence | Mapping | str = ("router",), *, overwrite: bool = False,
                 resume: bool = False, processor=None, provenance: dict | None = None, queue_size: int = 4,
                 adapter: Adapter | None = None, commit_every_tokens: int = 0) -> None:
        self.model = model
        self.captures: list[Capture] = make_captures(capture)
        try:
            self.adapter = adapter or adapter_for(model)
        except AdapterError as e:
            raise RecorderError(str(e)) from None
        self.spec = self.adapter.spec()
        for c in self.captures:  # validated before the store is created and locked
            c.bind(model, self.adapter, self.spec)
        self.store_path = Path(store)
        self.processor = processor
        if processor is not None:
            self.spec.special_ids |= _special_ids(processor) - {self.spec.image_token_id}
        self._commit_every = int(commit_every_tokens)
        self._writer = self._open_store(overwrite, resume, provenance or {})
        self._next_sequence = self._sequences_in_store()
        self._runner_ids: np.ndarray | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="workbench-recorder", daemon=True)
        self._thread.start()
        self._pass: Pass | None = None
        self._handles = Handles()
        self._closed = False

    @property
    def capture(self) -> tuple[str, ...]:
        """Names of the active captures, "router" first."""
        return tuple(c.name for c in self.captures)

    # -- store ---------------------------------------------------------------------------------
    def _open_store(self, overwrite: bool, resume: bool, provenance: dict):
        from workbench.trace.writer import TraceWriter

        variables = [v for c in self.captures for v in c.variables(self.spec)]
        captures = {c.name: c.options() for c in self.captures}
        if resume:
            w = TraceWriter.resume(self.store_path, min_commit_tokens=self._commit_every)
            problem = _mismatch(w, self.spec, variables, captures)
            if problem:
                w.close(complete=False)
                raise RecorderError(f"cannot resume {self.store_path}: {problem}")
            return w
        prov = {"model_config": self.spec.config, "model_type": self.spec.model_type,
                "capture": list(captures), "command": " ".join(sys.argv), **_model_provenance(self.model)}
        if self.processor is not None:
            prov["tokenizer_hash"] = getattr(self.processor, "tokenizer_hash", None) or _tokenizer_hash(self.processor)
        prov.update(provenance)
        return TraceWriter.create(self.store_path, routing=self.spec.layers, routing_rule=self.spec.rule,
                                  variables=variables, captures=captures, attrs=prov,
                                  vocab=_vocab(self.processor) if self.processor is not None else None,
                                  overwrite=overwrite, min_commit_tokens=self._commit_every)

    def _sequences_in_store(self) -> int:
        if self._writer.n_tokens == 0:
            return 0
        from workbench.trace.reader import open_trace

        return int(open_trace(self.store_path)["sequence"].max().values) + 1

    # -- attach / detach -----------------------------------------------------------------------
    def attach(self) -> "Recorder":
        """Start recording every forward pass of the model (idempotent)."""
        if self._closed:
            raise RecorderError("this recorder is closed")
        if not self._handles:
            try:
                self._handles.append(self.adapter.inputs.add(self._on_inputs))
                for c in self.captures:
                    self._handles.extend(c.attach(self.adapter))
                self._handles.append(self.model.register_forward_hook(self._on_forward_end))
            except BaseException:
                self._handles.remove()
                raise
        return self

    def detach(self) -> None:
        """Stop recording (the store stays open; ``attach`` again to continue)."""
        self._handles.remove()
        self._pass = None

    def __enter__(self) -> "Recorder":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    @contextlib.contextmanager
    def sequences(self, ids: Sequence[int]):
        """Forward passes inside the block belong to trace sequences ``ids`` (row b -> ids[b]): the
        runner's numbering (a prompt set's indices; a prompt and its decode steps). Outside, each
        row of a pass is a new sequence."""
        prev, self._runner_ids = self._runner_ids, np.asarray(list(ids), dtype=np.int64)
        try:
            yield self
        finally:
            self._runner_ids = prev

    # -- forward-pass side ---------------------------------------------------------------------
    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RecorderError(f"writing {self.store_path} failed: {err}") from err

    def _on_inputs(self, point, input_ids, batch) -> None:
        self._raise_pending_error()
        if input_ids is None:
            raise RecorderError("recording needs input_ids (the token table is keyed by them)")
        self._pass = Pass(input_ids=input_ids, batch=batch)
        for c in self.captures:
            c.start(self._pass)

    def _on_forward_end(self, module, args, output) -> None:
        p, self._pass = self._pass, None
        if p is None:
            return
        payloads = [c.finish() for c in self.captures]
        item = _Item(input_ids=to_host(p.input_ids), valid=to_host(p.batch.valid), positions=to_host(p.batch.positions),
                     sequence_ids=self._take_sequence_ids(p.input_ids.shape[0]), payloads=payloads)
        if p.input_ids.device.type == "cuda":
            item.event = torch.cuda.Event()
            item.event.record()
        self._queue.put(item)  # blocks when the writer is behind: back-pressure

    def _take_sequence_ids(self, rows: int) -> np.ndarray:
        """The runner's sequence numbers for this pass, else the next free ones."""
        ids = self._runner_ids
        if ids is None:
            ids = np.arange(self._next_sequence, self._next_sequence + rows, dtype=np.int64)
        elif len(ids) != rows:
            raise RecorderError(f"Recorder.sequences gave {len(ids)} sequence numbers for a pass of {rows} rows")
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
                    self._write(item)
            except BaseException as e:  # surfaced in the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, item: _Item) -> None:
        if item.event is not None:
            item.event.synchronize()
        B, T = item.valid.shape
        keep = item.valid.numpy().reshape(-1)
        ids = item.input_ids.numpy().reshape(-1)[keep]
        rows = {"token_id": ids, "sequence": np.repeat(item.sequence_ids, T)[keep],
                "position": item.positions.numpy().reshape(-1)[keep], "modality": self._modality(ids)}
        for c, payload in zip(self.captures, item.payloads):
            rows.update(c.rows(payload, keep))
        self._writer.append(rows)
        n_kept = len(ids)
        first = self._writer.n_tokens + self._writer.n_staged - n_kept  # token index of this pass's first row
        index = np.full(keep.shape[0], -1, np.int64)
        index[keep] = first + np.arange(n_kept)
        written = Written(keep=keep, token_index=index, sequence_ids=item.sequence_ids,
                          positions=item.positions.numpy(), shape=(B, T))
        for c, payload in zip(self.captures, item.payloads):
            c.write(payload, self._writer, written)

    def _modality(self, ids: np.ndarray) -> np.ndarray:
        modality = np.full(ids.shape, int(Modality.TEXT), np.int8)
        if self.spec.special_ids:
            modality[np.isin(ids, list(self.spec.special_ids))] = Modality.SPECIAL
        if self.spec.image_token_id is not None:
            modality[ids == self.spec.image_token_id] = Modality.IMAGE_PATCH
        return modality

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
        self.adapter.close()
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
        done = self._next_sequence  # prompts [0, done) are committed already (resume)
        skipped = [it["index"] for it in items if it["index"] >= done and not it["text"].strip() and not it["images"]]
        items = [it for it in items if (it["text"].strip() or it["images"]) and it["index"] >= done]
        self.attach()
        t0, n0, seen = time.perf_counter(), self.n_tokens, 0
        bar = tqdm(total=len(items), desc=f"trace -> {self.store_path.name}", unit="prompt", disable=not progress)
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, len(items), batch_size):
                    chunk = items[start:start + batch_size]
                    batch = self._processed(processor, chunk, max_tokens, truncation)
                    tensors = {k: v.to(device) for k, v in batch.items()
                               if k in ("input_ids", "attention_mask", "pixel_values") and v is not None}
                    with self.sequences([it["index"] for it in chunk]):
                        model(**tensors)
                    seen += int(batch["attention_mask"].sum())  # host tensor from the processor: no sync
                    bar.update(len(chunk))
                    bar.set_postfix(tok_s=f"{seen / max(time.perf_counter() - t0, 1e-9):,.0f}")
            self.flush()
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        return {"prompts": len(items), "resumed_after": done, "skipped_empty": skipped,
                "tokens": self.n_tokens - n0, "seconds": dt, "tokens_per_s": (self.n_tokens - n0) / max(dt, 1e-9)}

    def _processed(self, processor, chunk: list[dict], max_tokens, truncation):
        kw = dict(text=[it["text"] for it in chunk], padding=True, return_tensors="pt")
        if max_tokens is not None:
            kw.update(max_length=max_tokens, truncation=truncation)
        if any(it["images"] for it in chunk):
            kw["images"] = [it["images"] for it in chunk]
        batch = processor(**kw)
        self._note_images(chunk, getattr(batch, "images", None))
        return batch

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
            paths.setdefault(key, []).append(str(Path(src).resolve()) if isinstance(src, (str, os.PathLike)) else None)
            d = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
            geo.setdefault(key, []).append({k: v for k, v in d.items() if k not in ("sample",)})
        self._writer.update_provenance({"images": paths, "image_info": geo})


def record(model: nn.Module, store: str | os.PathLike, capture: Sequence | Mapping | str = ("router",),
           **kwargs) -> Recorder:
    """``with wb.record(model, "runs/x.zarr", capture=("router", "logits")) as rec: model(**batch)``.

    Every forward pass inside the block is recorded. See :class:`Recorder` for options.
    """
    return Recorder(model, store, capture, **kwargs)


# ----------------------------------------------------------------------------------------------
def _mismatch(writer, spec, variables, captures) -> str | None:
    """Why a store cannot be resumed by this recorder (None when it can)."""
    a = writer.attrs
    if list(writer.moe_layers) != spec.moe_layers or writer.n_experts != spec.n_experts:
        return (f"it was recorded from another model layout (moe_layers {writer.moe_layers}, {writer.n_experts} "
                f"experts; this model: {spec.moe_layers}, {spec.n_experts})")
    stored = a.get("captures", {})
    if stored != captures:
        return f"it was recorded with captures {stored}, this recorder has {captures}"
    mine = {v.name: v.to_json() for v in variables}
    theirs = {k: v for k, v in a["variables"].items() if v.get("capture") is not None}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs.get(k))
        return f"its declared variables differ from this recorder's ({', '.join(diff)})"
    return None


def _as_item(x, i: int) -> dict[str, Any]:
    if isinstance(x, str):
        return {"index": i, "text": x, "images": []}
    if isinstance(x, dict):
        text = x.get("text", "")
        if not isinstance(text, str):
            raise RecorderError(f"input {i}: 'text' must be a string, got {type(text).__name__}")
        return {"index": i, "text": text, "images": list(x.get("images") or [])}
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
