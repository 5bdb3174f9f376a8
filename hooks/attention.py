"""Cross-modal attention capture: text-query -> image-patch softmax probabilities per layer and head.

Recording (``wb.record(model, path, capture=[AttentionCapture(layers=..., heads=..., dtype=...)])``,
or ``capture=("attention",)`` for the defaults; CLI ``--capture attention --attention-layers ...``)
listens at each chosen decoder layer's ``hook_attn_lse`` point of workbench's Llama 4. For every sequence of a forward pass that holds
image patch tokens it stores

    p[layer, head, i, j] = softmax over all keys of (q_i . k * scale), at key = patch token j

exactly as the layer computes it (the query after RoPE, QK norm and NoPE temperature; the
layer's mask: causal, padding, chunks of ``attention_chunk_size`` on RoPE layers; GQA), never
building the T x T matrix. ``p = exp(q_i . k_j * scale - lse_i)`` needs each query row's
log-sum-exp over all its allowed keys:

* on CPU the layer's own attention call returns it (a listener makes the layer run
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

The rule holds per sequence, across forward passes: when a row's tokens arrive in several passes
(a prompt longer than ``prefill_chunk`` goes through in blocks; ``wb.generate`` adds one decode
pass per token), the capture keeps, from the pass that starts the row (``batch.start == 0``) on,
the row's patch tokens (stream indices, layout) and records each later pass's queries against all
patches so far, ``generated`` flagging the answer's tokens. Such a pass attends keys in a KV cache:
the patch keys are found by stream index among the cache slots (``keys.index``; the slot order is
the cache's business), and a patch key a query may not see (another chunk on a chunked layer, or
evicted from the layer's ring) has probability exactly 0, as the rule says
(:func:`workbench.kernels.attention_map.cross_attention_probs_keys`).

Patch coordinates: ``image`` (index of the image in the sequence), ``tile`` (tile of that image,
row-major over the tile grid, the global thumbnail being the LAST tile when present), ``row`` /
``col`` (position on the tile's pixel-shuffled token grid, e.g. 12 x 12 for 336 px tiles).
Images are delimited by ``<|image_start|>`` (``boi_token_index``) when the sequence has it
(processor output); otherwise (hand-built prompts) each maximal run of consecutive patch
tokens is one image. ``workbench.geometry.patch_boxes(info)`` gives, for the processor's
``ImageInfo`` of image ``i``, one pixel box per patch token of that image in the same order as
``att.sel(patch=att.image == i)``.

Store layout: one child group ``attention/seq_NNNNNN`` per sequence with images (its first pass
with patches) and, for its later passes, subgroups ``attention/seq_NNNNNN/part_KKKK`` (one per pass
with queries: a decode step writes one query row per sequence), written with
:meth:`workbench.trace.writer.TraceWriter.write_group` and read, concatenated, with
:func:`workbench.trace.open_attention` (the layout is in :mod:`workbench.trace.schema`).

Crash safety: a group is written after the token rows of its forward pass were appended, arrays
first, the ``complete`` attribute last; readers use a group only when it is complete and its tokens
are committed (``token_end <= n_tokens``), and a sequence's parts only up to the first one that is
not: a run killed mid-write (mid-generation) loses at most the maps of the passes not committed.

Cost and memory (per forward pass): the capture holds, per sequence with images, one host buffer
of ``L_sel x H' x Q x P`` values of the storage dtype (H' = heads or 1 for the mean; Q text
queries of the pass -- one per decode step --, P patch keys): proportional to text x patch tokens
per layer, never T x T. Across the passes of a row it keeps the row's token ids and patch layout
(O(T) integers on the host), nothing of the maps already handed to the writer. The kernel
adds bounded working blocks (torch backend: each ~128 MiB, see
``workbench.kernels.attention_map.torch_block_sizes``) or ``H x Q`` float32 log-sum-exps (Triton).
Up to ``queue_size`` passes can wait for the writer thread. Work per layer: O(Q x P) for the
columns, plus, when the layer gives no log-sum-exp, O(Q x chunk) dot products on chunked layers
and O(Q x T / 2) on global layers.

Host synchronization: the text/patch index selection is computed once per forward pass, in the
inputs listener, from the token ids on the host. On CUDA that is one ``ids.cpu()`` sync per forward
pass (it waits for the work queued before the text model, e.g. the vision tower); after it the
kernels (Triton backend) run asynchronously and each layer's result is copied non-blocking to
pinned host memory, with one CUDA event waited on by the writer thread. Avoiding that one sync
would need device-side index compaction with a worst-case output size (Q, P unknown on the
host): the trade-off chosen here is one sync per pass for exact-size buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from workbench.hooks.captures import Capture, Pass, RecorderError, Written, register_capture
from workbench.trace.schema import (ATTENTION_COORDS, ATTENTION_QUERIES, ATTENTION_SCHEMA, attention_group,
                                    attention_part_group)

__all__ = ["AttentionCapture", "patch_layout"]

_DTYPES = {"float16": torch.float16, "float32": torch.float32}

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
class _Row:
    """What the capture keeps of one row across the passes of its stream (a prompt's prefill blocks and
    decode steps), from the pass that starts it (``batch.start == 0``) on: its token ids and validity
    (host, one small array per pass), the patch layout so far (stream indices), the groups written."""

    ids: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    length: int = 0  # stream indices seen
    layout: dict | None = None  # patch_layout of the row so far; None: no patch token yet
    p_dev: torch.Tensor | None = None  # patch stream indices on the model's device
    groups: int = 0  # groups written for this row (0: the next is attention/seq_NNNNNN itself)
    n_patches_written: int = 0  # patches described by the coordinates of the groups written


@dataclass
class _Seq:
    b: int
    q_idx: np.ndarray  # selected queries: rows of this pass
    layout: dict[str, np.ndarray]  # the row's patches so far (patch_index: stream indices)
    new_patches: np.ndarray  # this pass's patch tokens: rows of this pass
    part: int | None  # group number of this pass's maps (0: the sequence group), None: nothing to write
    patch_coords: bool  # the group stores the patch coordinates (the patch list grew since the last group)
    q_dev: torch.Tensor | None
    p_dev: torch.Tensor | None
    valid_dev: torch.Tensor | None
    host: torch.Tensor | None  # (L_sel, H', Q, P) storage dtype (pinned on CUDA)
    dev: torch.Tensor | None = None  # (H', Q, P) device scratch (CUDA only)
    start: int = 0  # stream index of the pass's first token


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


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def parse_indices(text: str) -> list[int]:
    """'1,3,5-7' -> [1, 3, 5, 6, 7] (CLI option values)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        a, _, b = part.partition("-")
        try:
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            raise RecorderError(f"expected indices like 1,3,5-7, got {text!r}") from None
    return out


def _parse_heads(text: str):
    return text if text in ("all", "mean") else parse_indices(text)


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------
@register_capture
@dataclass(eq=False)
class AttentionCapture(Capture):
    """Cross-modal attention maps (text queries -> image-patch keys) per chosen layer and head.

    layers: decoder layer indices to record (default all). heads: ``"all"``, ``"mean"`` (mean over
    query heads of the probabilities) or a list of query head indices. dtype: storage dtype,
    ``"float16"`` (default) or ``"float32"``.

    Attributes (not stored options): ``backend``: kernel backend (None = Triton on CUDA when
    available, torch otherwise). ``use_layer_lse`` (default True): use the layer's own
    log-sum-exp when it comes with the hook point (False: the kernel computes it, as on CUDA; for
    benchmarks and checks). ``column_threads``: torch threads for the CPU column pass: ``"auto"``
    (default: one thread while the CPU is oversubscribed, see :func:`_column_threads`), None
    (torch's setting) or an int.
    """

    name: ClassVar[str] = "attention"
    layers: list[int] | None = field(default=None, metadata={
        "help": "decoder layers to record, e.g. 1,3,5-7 (default: all)", "parse": parse_indices})
    heads: Any = field(default="all", metadata={
        "help": "'all', 'mean' (mean over query heads) or query head indices, e.g. 0,3", "parse": _parse_heads})
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 or float32"})

    def __post_init__(self) -> None:
        self.backend: str | None = None
        self.use_layer_lse = True
        self.column_threads: int | str | None = "auto"
        self._state: _PassState | None = None
        self._rows: list[_Row] | None = None  # forward side: the rows of the current stream
        self._patch_tokens: dict[int, np.ndarray] = {}  # writer side: each row's patch token indices

    # -- setup ---------------------------------------------------------------------------------
    def bind(self, model, adapter, spec) -> None:
        from workbench.kernels.attention_map import resolve_heads

        from workbench.models.llama4.model import Llama4TextAttention, Llama4TextModel

        attn = {m.layer_idx: m for m in model.modules() if isinstance(m, Llama4TextAttention)}
        text_models = [m for m in model.modules() if isinstance(m, Llama4TextModel)]
        if not attn or len(text_models) != 1:
            raise RecorderError(f"capture 'attention' needs workbench's Llama 4 model (hook_attn_lse points); "
                                f"{type(model).__name__} has none")
        cfg = getattr(model, "config", None)
        vision = getattr(cfg, "vision", None)
        if spec.image_token_id is None or vision is None:
            raise RecorderError("capture 'attention' records text -> image-patch attention: it needs a "
                                f"multimodal model (Llama4ForConditionalGeneration), got {type(model).__name__}")
        self.layers = self._resolved_layers(attn)
        if self.dtype not in _DTYPES:
            raise RecorderError(f"attention dtype must be 'float16' or 'float32', got {self.dtype!r}")
        try:
            self.head_index, self.head_mean = resolve_heads(self.heads, attn[self.layers[0]].num_heads)
        except ValueError as e:
            raise RecorderError(f"attention heads: {e}") from None
        self.heads = self.heads if isinstance(self.heads, str) else list(self.head_index)
        self._modules = attn
        chunk = text_models[0].config.attention_chunk_size
        self.chunk_size = {i: (chunk if attn[i].use_rope else None) for i in self.layers}
        self.image_token = int(spec.image_token_id)
        self.boi_token = getattr(cfg, "boi_token_index", None)
        self.tokens_per_tile = int(vision.tokens_per_tile)
        self.side = int(vision.shuffled_side)

    def _resolved_layers(self, attn: dict) -> list[int]:
        n = len(attn)
        if self.layers is None:
            return sorted(attn)
        try:
            layers = [int(x) for x in self.layers]
        except TypeError:
            raise RecorderError(f"attention layers must be a list of decoder layer indices, got {self.layers!r}") from None
        if any(x not in attn for x in layers) or not layers or len(set(layers)) != len(layers):
            raise RecorderError(f"attention layers {layers}: need distinct decoder layer indices in [0, {n}) "
                                f"(the model has {n} layers)")
        return sorted(layers)

    def attach(self, adapter) -> list:
        return [self._modules[layer].hook_attn_lse.add(
            (lambda pos, layer: lambda p, **kw: self._on_attn(pos, layer, **kw))(pos, layer))
            for pos, layer in enumerate(self.layers)]

    # -- forward-pass side ---------------------------------------------------------------------
    def start(self, pass_: Pass) -> None:
        self._on_inputs(pass_.input_ids, pass_.batch)

    def _on_inputs(self, input_ids, batch) -> None:
        """Once per pass: choose query and patch tokens of each row (host, from the ids), carrying the
        rows' patches over from the earlier passes of their stream (prefill blocks, decode steps)."""
        ids = input_ids.detach().cpu().numpy()  # one host sync per pass on CUDA (see module doc)
        B, T = ids.shape
        mask = batch.valid.detach().cpu().numpy().astype(bool)
        start = int(batch.start)
        if start == 0:  # new rows
            self._rows = [_Row() for _ in range(B)]
        elif self._rows is None or len(self._rows) != B or any(r.length != start for r in self._rows):
            seen = ("no pass" if self._rows is None
                    else f"{len(self._rows)} row(s) up to stream index {self._rows[0].length}")
            raise RecorderError(f"capture 'attention': this pass continues {B} row(s) at stream index {start} "
                                f"but the capture saw {seen}; attach the recorder before the rows' first pass "
                                "(prefill)")
        dev = input_ids.device
        cuda = dev.type == "cuda"
        tdtype = _DTYPES[self.dtype]
        H = 1 if self.head_mean else len(self.head_index)
        seqs = []
        for b, r in enumerate(self._rows):
            r.ids.append(ids[b])
            r.valid.append(mask[b])
            r.length += T
            patch = mask[b] & (ids[b] == self.image_token)
            new_p = np.flatnonzero(patch)
            if new_p.size:  # (re)number the row's patches: their images, tiles, rows and cols
                all_ids, all_valid = np.concatenate(r.ids), np.concatenate(r.valid)
                r.ids, r.valid = [all_ids], [all_valid]
                r.layout = patch_layout(all_ids, all_valid, self.image_token, self.boi_token,
                                        self.tokens_per_tile, self.side)
                r.p_dev = torch.from_numpy(r.layout["patch_index"]).to(dev, non_blocking=True)
            if r.layout is None:
                continue
            p_idx = r.layout["patch_index"]
            tok = np.arange(start, start + T)
            q_idx = np.flatnonzero(mask[b] & ~patch & (tok > p_idx[0]))
            part = None
            if q_idx.size or r.groups == 0:
                part, r.groups = r.groups, r.groups + 1
            coords = part is not None and p_idx.size != r.n_patches_written
            if coords:
                r.n_patches_written = p_idx.size
            shape = (len(self.layers), H, q_idx.size, p_idx.size)
            seqs.append(_Seq(b=b, q_idx=q_idx, layout=r.layout, new_patches=new_p, part=part, patch_coords=coords,
                             q_dev=torch.from_numpy(q_idx).to(dev, non_blocking=True),
                             p_dev=r.p_dev,
                             valid_dev=torch.from_numpy(mask[b].copy()).to(dev, non_blocking=True),
                             host=torch.empty(shape, dtype=tdtype, pin_memory=cuda) if part is not None else None,
                             dev=torch.empty(shape[1:], dtype=tdtype, device=dev) if cuda and part is not None
                             else None, start=start))
        self._state = _PassState(seqs=seqs)

    def _on_attn(self, pos: int, layer: int, query, key, scale, lse, batch, keys=None) -> None:
        from workbench.kernels.attention_map import (cross_attention_probs, cross_attention_probs_from_lse,
                                                     cross_attention_probs_keys)

        st = self._state
        if st is None:
            raise RecorderError("an attention hook point fired before the inputs of its pass (no token ids)")
        # whole-sequence pass: the keys are the call's own tokens in stream order; else (a KV cache:
        # later prefill blocks, decode steps) they are cache slots described by ``keys``
        own = keys is None or keys.index is batch.index
        use_lse = lse is not None and self.use_layer_lse and self.backend in (None, "torch")
        threads = _column_threads(self.column_threads) if use_lse else None
        for s in st.seqs:
            if s.part is None:
                continue
            out = s.dev if s.dev is not None else s.host[pos]
            with torch.no_grad():
                if not own:
                    k_index = keys.index if keys.index.dim() == 1 else keys.index[s.b]
                    cross_attention_probs_keys(
                        query[s.b], key[s.b], scale, query_rows=s.q_dev, query_index=s.q_dev + s.start,
                        query_positions=batch.positions[s.b].index_select(0, s.q_dev), key_index=k_index,
                        key_positions=keys.positions[s.b], key_valid=keys.valid[s.b], columns=s.p_dev,
                        chunk_size=self.chunk_size[layer], heads=self.heads, lse=lse[s.b] if use_lse else None,
                        out=out)
                elif use_lse:  # the layer's own softmax gave the rows' log-sum-exp: only the patch columns
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

    def finish(self) -> _PassState | None:
        """End of a forward pass (caller's thread): hand the host buffers to the writer thread."""
        st, self._state = self._state, None
        if st is None or not st.seqs:
            return None
        missing = [x for x in self.layers if x not in st.done]
        if missing and any(s.part is not None for s in st.seqs):
            raise RecorderError(f"attention layers {missing} did not run in this forward pass")
        if any(s.dev is not None for s in st.seqs):
            st.event = torch.cuda.Event()
            st.event.record()
        for s in st.seqs:
            s.dev = s.q_dev = s.p_dev = s.valid_dev = None  # device memory back to the allocator
        return st

    # -- writer-thread side --------------------------------------------------------------------
    def write(self, st: _PassState | None, writer, written: Written) -> None:
        """Write the pass's maps: per row, the sequence's group (its first pass with patches) or its
        next part (writer thread, after the pass's token rows)."""
        if st is None:
            return
        if st.event is not None:
            st.event.synchronize()
        T = written.shape[1]
        generated = bool(getattr(written, "generated", False))
        for s in st.seqs:
            new_tok = written.token_index[s.b * T + s.new_patches]
            if s.part == 0:  # the row's first pass with patches: its stream's patch tokens start here
                self._patch_tokens[s.b] = new_tok
            elif new_tok.size:
                self._patch_tokens[s.b] = np.concatenate([self._patch_tokens[s.b], new_tok])
            if s.part is None:
                continue
            p_tok = self._patch_tokens[s.b]
            seq_no = int(written.sequence_ids[s.b])
            q_tok = written.token_index[s.b * T + s.q_idx]
            coords = {} if s.part else {  # a part's layers and heads are those of its sequence group
                "layer": (("layer",), np.asarray(self.layers, np.int32), {}),
                "head": (("head",), np.asarray([-1] if self.head_mean else self.head_index, np.int32),
                         {"head_mean": True} if self.head_mean else {}),
            }
            coords |= {
                "query_token": (("query",), q_tok, {}),
                "query_position": (("query",), written.positions[s.b, s.q_idx].astype(np.int32), {}),
                "generated": (("query",), np.full(s.q_idx.size, int(generated), np.int8), {}),
            }
            if s.patch_coords:
                coords["patch_token"] = (("patch",), p_tok, {})
                coords.update({k: (("patch",), s.layout[k], {}) for k in ("image", "tile", "row", "col")})
            names = [c for c in (*ATTENTION_COORDS, "generated") if c in coords and c not in ("layer", "head")]
            probs = (("layer", "head", "query", "patch"), s.host.numpy(), {
                "coordinates": " ".join(names),
                "long_name": "softmax probability, text query -> image patch key", "head_mean": bool(self.head_mean)})
            token_end = int(max(q_tok.max(initial=-1), p_tok.max(initial=-1)) + 1)
            attrs = {"sequence": seq_no, "part": s.part, "n_patches": int(p_tok.size), "token_end": token_end,
                     "schema": ATTENTION_SCHEMA}
            if s.part == 0:
                attrs.update({"layers": list(self.layers), "head_mean": bool(self.head_mean), "dtype": self.dtype,
                              "n_images": int(s.layout["image"].max(initial=-1) + 1),
                              "tokens_per_tile": self.tokens_per_tile, "tile_token_grid": [self.side, self.side],
                              "queries": ATTENTION_QUERIES})
            name = attention_group(seq_no) if s.part == 0 else attention_part_group(seq_no, s.part)
            writer.write_group(name, {**coords, "probs": probs}, attrs)
