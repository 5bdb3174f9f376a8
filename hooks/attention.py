"""Cross-modal attention capture: text-query -> image-patch softmax probabilities per layer and head.

Recording (``wb.record(model, path, capture=("attention",), attention_layers=..., attention_heads=...,
attention_dtype=...)``) attaches :class:`AttentionCapture` to each chosen decoder layer's
``hook_attn_lse`` tap of workbench's Llama 4. For every sequence of a forward pass that holds
image patch tokens it stores

    p[layer, head, i, j] = softmax over all keys of (q_i . k * scale), at key = patch token j

exactly as the layer computes it (the query after RoPE, QK norm and NoPE temperature; the
layer's mask: causal, padding, chunks of ``attention_chunk_size`` on RoPE layers; GQA), never
building the T x T matrix. ``p = exp(q_i . k_j * scale - lse_i)`` needs each query row's
log-sum-exp over all its allowed keys:

* on CPU the layer's own attention call returns it (the tap makes the layer run
  ``F.scaled_dot_product_attention`` through the aten kernel it dispatches to, fused CPU flash
  attention, which also returns the log-sum-exp; the layer output is the same bit for bit), so
  the capture computes only the patch columns
  (:func:`workbench.kernels.attention_map.cross_attention_probs_from_lse`);
* otherwise (CUDA, or a backend without it) the capture computes it blockwise itself
  (:func:`workbench.kernels.attention_map.cross_attention_probs`: Triton on CUDA).

Which tokens
------------
* keys ("patch" dim): every ``<|patch|>`` token (``image_token_index``) of the sequence, in order.
* queries ("query" dim): every non-padding token that is NOT a patch token and comes after the
  sequence's first patch token: text, and special tokens such as tile separators,
  ``<|image|>``, ``<|image_end|>``, ``<|eot|>``, and text between/after images. Tokens before the
  first patch are left out: under causal attention their rows are exactly zero.
* sequences without patch tokens get no attention group.

Patch coordinates: ``image`` (index of the image in the sequence), ``tile`` (tile of that image,
row-major over the tile grid, the global thumbnail being the LAST tile when present), ``row`` /
``col`` (position on the tile's pixel-shuffled token grid, e.g. 12 x 12 for 336 px tiles).
Images are delimited by ``<|image_start|>`` (``boi_token_index``) when the sequence has it
(processor output); otherwise (hand-built prompts) each maximal run of consecutive patch
tokens is one image. ``workbench.geometry.patch_boxes(info)`` gives, for the processor's
``ImageInfo`` of image ``i``, one pixel box per patch token of that image in the same order as
``att.sel(patch=att.image == i)``.

Store layout (child groups of the trace root, zarr v3, readable by ``xr.open_zarr(path, group=...)``)::

    attention/                   attrs: schema "workbench.attention/1", description of the choices
      seq_000012/                one group per sequence number (the trace's ``sequence`` value)
        probs          (layer, head, query, patch)  float16 (default) or float32
        layer          (layer,)   int32  decoder layer index
        head           (head,)    int32  query head index; [-1] with attribute head_mean=True
                                          when the heads were averaged (attention_heads="mean")
        query_token    (query,)   int64  index on the trace's ``token`` dim (join with open_trace)
        query_position (query,)   int32  position of the query token
        patch_token    (patch,)   int64  index on the trace's ``token`` dim of each patch key
        image, tile, row, col (patch,) int32
      group attrs: sequence, token_end, layers, head_mean, dtype, ... and ``complete`` (last)

Crash safety: a sequence's group is written after the token rows of its forward pass were
committed, arrays first, the ``complete`` attribute last; :func:`open_attention` ignores groups
without it (a run killed mid-write loses at most the maps of the pass being written).

Cost and memory (per forward pass): the capture holds, per sequence with images, one host buffer
of ``L_sel x H' x Q x P`` values of the storage dtype (H' = heads or 1 for the mean; Q text
queries, P patch keys): proportional to text x patch tokens per layer, never T x T. The kernel
adds bounded working blocks (torch backend: each ~128 MiB, see
``workbench.kernels.attention_map.torch_block_sizes``) or ``H x Q`` float32 log-sum-exps (Triton).
Up to ``queue_size`` passes can wait for the writer thread. Work per layer: O(Q x P) for the
columns, plus, when the layer gives no log-sum-exp, O(Q x chunk) dot products on chunked layers
and O(Q x T / 2) on global layers.

Host synchronization: the text/patch index selection is computed once per forward pass, in the
inputs tap, from the token ids on the host. On CUDA that is one ``ids.cpu()`` sync per forward
pass (it waits for the work queued before the text model, e.g. the vision tower); after it the
kernels (Triton backend) run asynchronously and each layer's result is copied non-blocking to
pinned host memory, with one CUDA event waited on by the writer thread. Avoiding that one sync
would need device-side index compaction with a worst-case output size (Q, P unknown on the
host): the trade-off chosen here is one sync per pass for exact-size buffers.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from workbench.store import TraceError

__all__ = ["AttentionCapture", "open_attention", "attention_sequences", "AttentionNotFoundError",
           "ATTENTION_GROUP", "ATTENTION_SCHEMA"]

ATTENTION_GROUP = "attention"
ATTENTION_SCHEMA = "workbench.attention/1"
_SEQ_RE = re.compile(r"^seq_(\d+)$")
_COORDS = ("layer", "head", "query_token", "query_position", "patch_token", "image", "tile", "row", "col")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_QUERY_RULE = ("non-padding, non-patch tokens (text and special) after the sequence's first patch token")


def _group_name(sequence: int) -> str:
    return f"{ATTENTION_GROUP}/seq_{int(sequence):06d}"


def _recorder_error(msg: str) -> Exception:
    from workbench.hooks.recorder import RecorderError

    return RecorderError(msg)


# ---------------------------------------------------------------------------------------------
# Patch layout from token ids
# ---------------------------------------------------------------------------------------------
def patch_layout(ids: np.ndarray, valid: np.ndarray, image_token: int, boi_token: int | None,
                 tokens_per_tile: int, side: int) -> dict[str, np.ndarray]:
    """For one sequence: patch token indices and their image / tile / row / col (see module doc)."""
    patch = valid & (ids == image_token)
    p_idx = np.flatnonzero(patch)
    image = None
    if boi_token is not None and p_idx.size:
        starts = valid & (ids == boi_token)
        img_of = np.cumsum(starts) - 1
        if starts.any() and img_of[p_idx[0]] >= 0:
            raw = img_of[p_idx]
            _, image = np.unique(raw, return_inverse=True)  # number images that hold patches 0, 1, ...
    if image is None:  # no <|image_start|>: each run of consecutive patch tokens is an image
        new = np.ones(p_idx.size, bool)
        new[1:] = np.diff(p_idx) != 1
        image = np.cumsum(new) - 1
    image = image.astype(np.int64)
    # rank of each patch inside its image
    first_of_image = np.zeros(image.max() + 1 if image.size else 0, np.int64)
    if image.size:
        change = np.ones(image.size, bool)
        change[1:] = image[1:] != image[:-1]
        first_pos = np.flatnonzero(change)
        first_of_image[image[first_pos]] = first_pos
    k = np.arange(p_idx.size) - (first_of_image[image] if image.size else 0)
    return {"patch_index": p_idx, "image": image.astype(np.int32),
            "tile": (k // tokens_per_tile).astype(np.int32),
            "row": ((k % tokens_per_tile) // side).astype(np.int32),
            "col": ((k % tokens_per_tile) % side).astype(np.int32)}


@dataclass
class _Seq:
    b: int
    q_idx: np.ndarray
    layout: dict[str, np.ndarray]
    q_dev: torch.Tensor
    p_dev: torch.Tensor
    valid_dev: torch.Tensor
    host: torch.Tensor  # (L_sel, H', Q, P) storage dtype (pinned on CUDA)
    dev: torch.Tensor | None = None  # (H', Q, P) device scratch (CUDA only)


@dataclass
class _PassState:
    seqs: list[_Seq]
    done: set = field(default_factory=set)
    event: Any = None


def _column_threads(setting) -> int | None:
    """Intra-op threads for the CPU column pass (None: torch's setting).

    ``"auto"``: one thread when the 1-minute load average exceeds the number of CPUs (other jobs
    compete for the cores), else torch's setting. The column pass is many short memory-bound ops
    (one GEMM and one ``exp`` per cache-sized block); on a shared CPU each multi-threaded op ends
    at a barrier that waits for a descheduled worker. Measured on the 2-core machine
    (benchmarks/RESULTS.md): at load 2-6 the column pass took 3-6x less time with one thread than
    with two; at load below 2 two threads took about 0.55x the time of one.
    """
    if setting != "auto":
        return setting
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy else None


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------
class AttentionCapture:
    """Attention-map capture of a :class:`~workbench.hooks.recorder.Recorder` (``capture=("attention",)``).

    layers: decoder layer indices to record (default all). heads: ``"all"``, ``"mean"`` (mean over
    query heads of the probabilities) or a list of query head indices. dtype: storage dtype,
    ``"float16"`` (default) or ``"float32"``. backend: kernel backend (None = Triton on CUDA when
    available, torch otherwise). ``use_layer_lse`` (attribute, default True): use the layer's own
    log-sum-exp when it comes with the tap (False: the kernel computes it, as on CUDA; for
    benchmarks and checks). ``column_threads`` (attribute): torch threads for the CPU column pass:
    ``"auto"`` (default: one thread while the CPU is oversubscribed, see :func:`_column_threads`),
    None (torch's setting) or an int.
    """

    def __init__(self, recorder, layers: Sequence[int] | None = None, heads="all", dtype: str = "float16",
                 backend: str | None = None) -> None:
        from workbench.kernels.attention_map import resolve_heads
        from workbench.models.llama4.model import Llama4TextAttention, Llama4TextModel

        self.recorder = recorder
        model = recorder.model
        attn = {m.layer_idx: m for m in model.modules() if isinstance(m, Llama4TextAttention)}
        text_models = [m for m in model.modules() if isinstance(m, Llama4TextModel)]
        if not attn or len(text_models) != 1:
            raise _recorder_error(f"capture 'attention' needs workbench's Llama 4 model (hook_attn taps); "
                                  f"{type(model).__name__} has none")
        spec = recorder.spec
        cfg = getattr(model, "config", None)
        vision = getattr(cfg, "vision", None)
        if spec.image_token_id is None or vision is None:
            raise _recorder_error("capture 'attention' records text -> image-patch attention: it needs a "
                                  f"multimodal model (Llama4ForConditionalGeneration), got {type(model).__name__}")
        n_layers = len(attn)
        if layers is None:
            layers = sorted(attn)
        else:
            try:
                layers = [int(x) for x in layers]
            except TypeError:
                raise _recorder_error(f"attention_layers must be a list of decoder layer indices, got {layers!r}") from None
            bad = [x for x in layers if x not in attn]
            if bad or not layers or len(set(layers)) != len(layers):
                raise _recorder_error(f"attention_layers {layers}: need distinct decoder layer indices in "
                                      f"[0, {n_layers}) (the model has {n_layers} layers)")
            layers = sorted(layers)
        if dtype not in _DTYPES:
            raise _recorder_error(f"attention_dtype must be 'float16' or 'float32', got {dtype!r}")
        any_attn = attn[layers[0]]
        try:
            self.head_index, self.head_mean = resolve_heads(heads, any_attn.num_heads)
        except ValueError as e:
            raise _recorder_error(f"attention_heads: {e}") from None
        self.heads = heads if isinstance(heads, str) else list(self.head_index)
        self.layers = layers
        self.dtype = dtype
        self.backend = backend
        self.use_layer_lse = True
        self.column_threads: int | str | None = "auto"
        self._modules = attn
        self._text_model = text_models[0]
        self.chunk_size = {i: (self._text_model.config.attention_chunk_size if attn[i].use_rope else None)
                           for i in layers}
        self.image_token = int(spec.image_token_id)
        self.boi_token = getattr(cfg, "boi_token_index", None)
        self.tokens_per_tile = int(vision.tokens_per_tile)
        self.side = int(vision.shuffled_side)
        self._handles: list = []
        self._state: _PassState | None = None
        self._wrote_root = False

    # -- attach / detach -----------------------------------------------------------------------
    def attach(self) -> None:
        self._handles = [self._text_model.hook_inputs.add(
            lambda p, input_ids, batch: self._on_inputs(input_ids, batch.valid, batch.positions))]
        for pos, layer in enumerate(self.layers):
            self._handles.append(self._modules[layer].hook_attn_lse.add(
                (lambda pos, layer: lambda p, **kw: self._on_attn(pos, layer, **kw))(pos, layer)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._state = None

    # -- forward-pass side ---------------------------------------------------------------------
    def _on_inputs(self, input_ids, attention_mask, position_ids) -> None:
        """Once per pass: choose query and patch tokens of each sequence (host, from the ids)."""
        self._state = None
        if input_ids is None:
            return
        ids = input_ids.detach().cpu().numpy()  # one host sync per pass on CUDA (see module doc)
        B, T = ids.shape
        mask = (attention_mask.detach().cpu().numpy().astype(bool) if attention_mask is not None
                else np.ones((B, T), bool))
        dev = input_ids.device
        cuda = dev.type == "cuda"
        tdtype = _DTYPES[self.dtype]
        H = 1 if self.head_mean else len(self.head_index)
        seqs = []
        for b in range(B):
            lay = patch_layout(ids[b], mask[b], self.image_token, self.boi_token, self.tokens_per_tile, self.side)
            p_idx = lay["patch_index"]
            if p_idx.size == 0:
                continue
            tok = np.arange(T)
            q_idx = np.flatnonzero(mask[b] & (ids[b] != self.image_token) & (tok > p_idx[0]))
            shape = (len(self.layers), H, q_idx.size, p_idx.size)
            host = torch.empty(shape, dtype=tdtype, pin_memory=cuda)
            seqs.append(_Seq(b=b, q_idx=q_idx, layout=lay,
                             q_dev=torch.from_numpy(q_idx).to(dev, non_blocking=True),
                             p_dev=torch.from_numpy(p_idx).to(dev, non_blocking=True),
                             valid_dev=torch.from_numpy(mask[b].copy()).to(dev, non_blocking=True),
                             host=host,
                             dev=torch.empty(shape[1:], dtype=tdtype, device=dev) if cuda else None))
        self._state = _PassState(seqs=seqs)

    def _on_attn(self, pos: int, layer: int, query, key, scale, lse, batch) -> None:
        from workbench.kernels.attention_map import cross_attention_probs, cross_attention_probs_from_lse

        st = self._state
        if st is None:
            raise _recorder_error("attention tap fired before the inputs tap (no token ids for this pass)")
        use_lse = lse is not None and self.use_layer_lse and self.backend in (None, "torch")
        threads = _column_threads(self.column_threads) if use_lse else None
        for s in st.seqs:
            out = s.dev if s.dev is not None else s.host[pos]
            with torch.no_grad():
                if use_lse:  # the layer's own softmax gave the rows' log-sum-exp: only the patch columns
                    cross_attention_probs_from_lse(query[s.b], key[s.b], scale, lse[s.b],
                                                   query_index=s.q_dev, key_index=s.p_dev,
                                                   positions=batch.positions[s.b], valid=s.valid_dev,
                                                   chunk_size=self.chunk_size[layer], heads=self.heads,
                                                   out=out, check_indices=False, num_threads=threads)
                else:
                    cross_attention_probs(query[s.b], key[s.b], scale, query_index=s.q_dev, key_index=s.p_dev,
                                          positions=batch.positions[s.b], valid=s.valid_dev,
                                          chunk_size=self.chunk_size[layer], heads=self.heads, out=out,
                                          backend=self.backend, check_indices=False)
            if s.dev is not None:
                s.host[pos].copy_(s.dev, non_blocking=True)
        st.done.add(layer)

    def finish_pass(self, pending) -> _PassState | None:
        """End of a forward pass (caller's thread): hand the host buffers to the writer thread."""
        st, self._state = self._state, None
        if st is None or not st.seqs:
            return None
        missing = [x for x in self.layers if x not in st.done]
        if missing:
            raise _recorder_error(f"attention layers {missing} did not run in this forward pass")
        if any(s.dev is not None for s in st.seqs):
            st.event = torch.cuda.Event()
            st.event.record()
        for s in st.seqs:
            s.dev = s.q_dev = s.p_dev = s.valid_dev = None  # device memory back to the allocator
        return st

    # -- writer-thread side --------------------------------------------------------------------
    def write(self, st: _PassState | None, pending, keep: np.ndarray) -> None:
        """Write the pass's maps (writer thread, after its token rows were appended)."""
        if st is None:
            return
        if st.event is not None:
            st.event.synchronize()
        import zarr
        from zarr.codecs import BloscCodec

        w = self.recorder._writer
        n_kept = int(keep.sum())
        offset = w.n_tokens + w.n_staged - n_kept  # global index of this pass's first kept token
        gidx = np.full(keep.shape[0], -1, np.int64)
        gidx[keep] = offset + np.arange(n_kept)
        B, T = pending.attention_mask.shape
        positions = pending.position_ids.numpy()
        if not self._wrote_root:
            root = w.group(ATTENTION_GROUP)
            root.update_attributes({"schema": ATTENTION_SCHEMA, "queries": _QUERY_RULE,
                                    "keys": "every <|patch|> token of the sequence, in token order",
                                    "tile_order": "row-major over the tile grid, global thumbnail last"})
            self._wrote_root = True
        seq_ids = getattr(pending, "sequence_ids", None)
        if seq_ids is None:
            seq_ids = int(pending.first_sequence) + np.arange(B)
        for s in st.seqs:
            seq_no = int(seq_ids[s.b])
            g = w.group(_group_name(seq_no))
            if g.attrs.get("complete"):  # rewriting a sequence: un-mark it before touching its arrays
                g.update_attributes({"complete": False})
            q_tok = gidx[s.b * T + s.q_idx]
            p_tok = gidx[s.b * T + s.layout["patch_index"]]
            probs = s.host.numpy()
            L, H, Q, P = probs.shape
            isz = probs.dtype.itemsize
            qc = int(min(max(Q, 1), max(1, -(-(1 << 20) // max(1, P * isz)))))
            coords = {
                "layer": (("layer",), np.asarray(self.layers, np.int32)),
                "head": (("head",), np.asarray([-1] if self.head_mean else self.head_index, np.int32)),
                "query_token": (("query",), q_tok),
                "query_position": (("query",), positions[s.b, s.q_idx].astype(np.int32)),
                "patch_token": (("patch",), p_tok),
                "image": (("patch",), s.layout["image"]),
                "tile": (("patch",), s.layout["tile"]),
                "row": (("patch",), s.layout["row"]),
                "col": (("patch",), s.layout["col"]),
            }
            for name, (dims, data) in coords.items():
                a = g.create_array(name, shape=data.shape, chunks=(max(1, data.shape[0]),), dtype=data.dtype,
                                   fill_value=-1, dimension_names=list(dims), overwrite=True,
                                   compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
                                   attributes={"head_mean": True} if (name == "head" and self.head_mean) else {})
                if data.size:
                    a[:] = data
            a = g.create_array("probs", shape=probs.shape, chunks=(1, 1, qc, max(P, 1)), dtype=probs.dtype,
                               fill_value=float("nan"), dimension_names=["layer", "head", "query", "patch"],
                               compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), overwrite=True,
                               attributes={"coordinates": " ".join(c for c in _COORDS if c not in ("layer", "head")),
                                           "long_name": "softmax probability, text query -> image patch key",
                                           "head_mean": bool(self.head_mean)},
                               config={"write_empty_chunks": True})
            if probs.size:
                a[:] = probs
            g.update_attributes({
                "sequence": seq_no, "token_end": int(max(q_tok.max(initial=-1), p_tok.max(initial=-1)) + 1),
                "layers": list(self.layers), "head_mean": bool(self.head_mean), "dtype": self.dtype,
                "n_images": int(s.layout["image"].max(initial=-1) + 1),
                "tokens_per_tile": self.tokens_per_tile, "tile_token_grid": [self.side, self.side],
                "queries": _QUERY_RULE,
                "complete": True,  # the marker: written last, after every array
            })


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class AttentionNotFoundError(TraceError, LookupError):
    """The trace has no (complete) attention maps for the requested sequence."""


def _scan(path: Path) -> tuple[list[int], list[int]]:
    """(complete, incomplete) sequence numbers of the attention groups of a trace."""
    base = path / ATTENTION_GROUP
    done, partial = [], []
    if not base.is_dir():
        return done, partial
    n_tokens = None
    for entry in base.iterdir():
        m = _SEQ_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            attrs = json.loads((entry / "zarr.json").read_bytes()).get("attributes") or {}
        except (OSError, ValueError):
            attrs = {}
        ok = attrs.get("complete") is True
        if ok:
            if n_tokens is None:
                from workbench.store import _read_root

                n_tokens = int(_read_root(path)["attributes"]["n_tokens"])
            ok = int(attrs.get("token_end", 0)) <= n_tokens
        (done if ok else partial).append(int(m.group(1)))
    return sorted(done), sorted(partial)


def attention_sequences(store: str | os.PathLike) -> list[int]:
    """Sequence numbers that have complete attention maps in the trace at ``store``."""
    from workbench.store import _read_root

    p = Path(store)
    _read_root(p)  # a clear error for a path that is not a trace
    return _scan(p)[0]


def open_attention(store: str | os.PathLike, sequence: int):
    """Attention maps of one sequence: ``xarray.DataArray`` (layer, head, query, patch), lazy.

    Coordinates: ``layer`` (decoder layer), ``head`` (query head; -1 when averaged, with
    ``attrs["head_mean"]``), ``query_token`` / ``patch_token`` (indices on the trace's token dim,
    e.g. ``open_trace(store).token_id[att.query_token]``), ``query_position``, and per patch
    ``image``, ``tile``, ``row``, ``col``. Raises FileNotFoundError / NotATraceError for a path
    that is not a trace, :class:`AttentionNotFoundError` when the trace has no attention maps or
    none for ``sequence`` (the message lists the sequences that have them).
    """
    from workbench.cli import _ranges  # "0-3, 7" formatting, shared with `workbench info`

    import xarray as xr

    from workbench.store import _HAVE_DASK, _quiet, _read_root

    p = Path(store)
    _read_root(p)
    if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)):
        raise TypeError(f"sequence must be an int, got {type(sequence).__name__}")
    done, partial = _scan(p)
    if not done:
        extra = f" ({len(partial)} incomplete group(s): a run was interrupted while writing)" if partial else ""
        raise AttentionNotFoundError(f"{p} holds no attention maps{extra}; record them with "
                                     "wb.record(model, path, capture=('router', 'attention'))")
    if int(sequence) not in done:
        why = (" (its group is incomplete: the run was interrupted while writing it)" if int(sequence) in partial
               else " (sequences without image patch tokens have none)")
        raise AttentionNotFoundError(f"{p}: no attention maps for sequence {int(sequence)}{why}; "
                                     f"available sequences: {_ranges(done)}")
    with _quiet():
        ds = xr.open_zarr(p, group=_group_name(int(sequence)), consolidated=False, zarr_format=3,
                          chunks={} if _HAVE_DASK else None)
    da = ds["probs"]
    # the 1-D coordinates are small: read them now (the probabilities stay lazy)
    da = da.assign_coords({c: xr.Variable(da[c].dims, np.asarray(da[c].values), attrs=dict(da[c].attrs))
                           for c in _COORDS if c in da.coords})
    missing = [c for c in _COORDS if c not in da.coords]
    if missing:
        raise TraceError(f"{p}: attention group of sequence {sequence} lacks coordinates {missing}")
    da.attrs.update({"sequence": int(sequence), "head_mean": bool(ds.attrs.get("head_mean", False)),
                     "queries": ds.attrs.get("queries", _QUERY_RULE)})
    return da
