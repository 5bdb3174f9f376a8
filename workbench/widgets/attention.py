"""CrossModalAttentionView: a text token's attention over the image patches, on the image's pixels."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from workbench.geometry import as_rgb_array
from workbench.trace.schema import Modality

from . import _common as W
from ._palette import SEQUENTIAL
from ._text import plotly_text

__all__ = ["CrossModalAttentionView", "overlay_grid"]

_MAX_IMAGE_SIDE = 1024  # the picture is sent downscaled to at most this many pixels per side


_as_rgb_array = as_rgb_array  # shared with the paper export


def _data_uri(rgb: np.ndarray) -> tuple[str, int, int]:
    """PNG data URI of the image downscaled to <= _MAX_IMAGE_SIDE per side; its (width, height)."""
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = 1.0
    if max(im.size) > _MAX_IMAGE_SIDE:
        scale = max(im.size) / _MAX_IMAGE_SIDE
        im = im.resize((max(1, round(im.size[0] / scale)), max(1, round(im.size[1] / scale))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.size[0], im.size[1]


def overlay_grid(boxes: np.ndarray):
    """Cells of the boxes on the grid of their edges: ``(xs, ys, cells)``.

    boxes: (n, 4) ``x0, y0, x1, y1`` (NaN rows skipped). xs / ys: sorted edge coordinates (heatmap
    brick edges); cells[i] = (iy0, iy1, ix0, ix1) so that box i covers ``z[iy0:iy1, ix0:ix1]``, or
    None for a NaN box."""
    ok = np.isfinite(boxes).all(axis=1)
    b = boxes[ok]
    xs = np.unique(np.concatenate([b[:, 0], b[:, 2]])) if b.size else np.array([0.0, 1.0])
    ys = np.unique(np.concatenate([b[:, 1], b[:, 3]])) if b.size else np.array([0.0, 1.0])
    cells: list = []
    for i in range(boxes.shape[0]):
        if not ok[i]:
            cells.append(None)
            continue
        x0, y0, x1, y1 = boxes[i]
        cells.append((int(np.searchsorted(ys, y0)), int(np.searchsorted(ys, y1)),
                      int(np.searchsorted(xs, x0)), int(np.searchsorted(xs, x1))))
    return xs, ys, cells


class CrossModalAttentionView(W.ViewBase):
    """Attention of a selected text token over one image of a sequence, drawn on the image.

    ``trace``: the trace path (or a Dataset opened from it) recorded with
    ``capture=("router", "attention")``; ``sequence``: the trace sequence number.

    The picture: ``image=`` (PIL image, array or file path); else the trace's provenance entry
    ``provenance["images"][str(sequence)][image_index]`` (a file path; relative paths are taken next
    to the trace) when present. ``Recorder.run`` (and so ``workbench trace``) stores the paths of
    image files and their ``image_info``, so that for such traces ``CrossModalAttentionView(trace,
    sequence)`` needs nothing else. Pixel placement uses :func:`workbench.geometry.patch_boxes`: pass
    ``image_info=`` (the processor's ``ImageInfo`` for this image, ``batch.images[i]``, or a mapping
    with its fields; else ``provenance["image_info"][str(sequence)][image_index]``) when the image
    was not processed with the default Llama 4 settings; without it the tiling is recomputed from the
    image size and the token grid of the stored maps (``config=`` an ``ImageProcessorConfig``).

    Controls: query token, layer, head (or the mean over heads), opacity, and for tiled images local
    tiles vs the global thumbnail (both cover the whole image, so one is shown at a time). For a
    generation (a trace written by ``wb.generate(..., recorder=...)``), the answer's tokens are marked
    "[answer k]" in the query list, an "Answer" slider (and a play button) steps through them, and the
    view opens on the first generated token unless ``query`` (a position on the maps' query dim) says
    otherwise. :attr:`answer_queries` lists their query positions; :meth:`step` moves along them.
    ``layer``: a decoder layer index among the recorded attention layers (coordinate ``layer`` of
    :func:`workbench.trace.open_attention`); another index raises ValueError naming the recorded ones.
    The :attr:`layer` property reads and sets it.

    The view opens on the informative choice: for a prompt (no generation) the query is the token
    just before the first digit of the text (in the demo's captions, "top left 3, ...", the token
    that predicts a digit, which should look at that digit), else the first text token; the layer
    is the most peaked one for that query (:meth:`peakedness`: 1 - normalized entropy of the
    head-mean attention over the image's patches), unless ``layer=`` is given. Query labels give
    each token its context, ``"pos 25: left ␣ -> 3"`` (the word before, the token with spaces shown
    as ␣, the next token), since sub-word tokens alone (``' '``) say nothing. Beside the overlay, a
    bar chart gives the share of the query's attention per image region (:meth:`region_shares`:
    quadrants of a single-tile image, tiles of a tiled one).
    """

    def __init__(self, trace: Any, sequence: int, *, image: Any = None, image_info: Any = None,
                 image_index: int = 0, config: Any = None, query: int | None = None, layer: int | None = None,
                 head: int | str = "mean", opacity: float = 0.55):
        import ipywidgets as ipw

        self._open(trace, sequence, image_index)
        layer_pos = self._layer_position(layer)
        image_info = self._resolve_picture(image, image_info)
        self._patch_geometry(image_info, config)
        query = self._read_queries(query)
        if layer is None:  # the most peaked layer for the opening query
            layer_pos = int(np.argmax(self.peakedness(query)))
        self._build_controls(query, layer_pos, head, opacity)
        self._build_figure(opacity)
        self._build_shares()
        self._draw()
        self._wire_events()
        rows = [ipw.HBox([self.w_query, self.w_part])]
        if self.answer_queries.size:
            rows.append(ipw.HBox([self.w_play, self.w_answer, self.w_answer_text]))
        self.widget = ipw.VBox([*rows, ipw.HBox([self.w_layer, self.w_head, self.w_mean]),
                                self.w_opacity, ipw.HBox([self.fig.widget, self.shares.widget])])
        self.widget.add_class("wb-attention-view")

    # ---------------------------------------------------------------- construction
    def _open(self, trace: Any, sequence: int, image_index: int) -> None:
        """The trace, the sequence's attention maps and the patch tokens of image ``image_index``."""
        from workbench.trace import open_attention

        ds, path = W.open_any(trace, tokens=True)
        if path is None:
            raise ValueError("CrossModalAttentionView needs the trace's path (attention maps are child groups "
                             "of the store): pass the path, or a Dataset from workbench.open_trace(path)")
        self.ds, self.path, self.sequence = ds, path, int(sequence)
        self.att = open_attention(path, self.sequence)
        images = np.asarray(self.att["image"].values)
        n_img = int(images.max(initial=-1) + 1)
        if not 0 <= int(image_index) < n_img:
            raise ValueError(f"image_index {image_index}: sequence {self.sequence} has {n_img} image(s)")
        self.image_index = int(image_index)
        self.patch_idx = np.flatnonzero(images == self.image_index)
        self.layer_values = W.layer_values(self.att)

    def _resolve_picture(self, image: Any, image_info: Any) -> Any:
        """The picture (``self.rgb``, or None) and its (height, width) ``self.size``, from the arguments or
        the trace provenance; returns the image_info to use (None: recompute the tiling)."""
        prov = self.ds.attrs.get("provenance") or {}
        prov = prov if isinstance(prov, dict) else {}
        if image is None:
            paths = (prov.get("images") or {}).get(str(self.sequence))
            if paths and len(paths) > self.image_index and paths[self.image_index]:  # None: an in-memory image
                p = Path(paths[self.image_index])
                image = p if p.is_absolute() else self.path.parent / p  # relative: next to the trace
        if image_info is None:
            infos = (prov.get("image_info") or {}).get(str(self.sequence))
            if infos and len(infos) > self.image_index:
                image_info = infos[self.image_index]
        self.rgb = _as_rgb_array(image) if image is not None else None
        info_size = None
        if image_info is not None:
            info_size = (image_info.get("original_size") if isinstance(image_info, dict)
                         else getattr(image_info, "original_size", None))
        if self.rgb is not None:
            size = self.rgb.shape[:2]
            if info_size is not None and tuple(int(x) for x in info_size) != tuple(size):
                raise ValueError(f"image is {size[0]}x{size[1]} (height x width) but image_info.original_size "
                                 f"is {tuple(info_size)}: pass the image the processor was given")
        elif info_size is not None:
            size = tuple(int(x) for x in info_size)
        else:
            raise ValueError(
                f"CrossModalAttentionView: no image for sequence {self.sequence}: pass image= (PIL image, array or "
                f"path) or image_info= (the processor's ImageInfo), or store file paths in the trace provenance "
                f"under 'images' {{'{self.sequence}': [path, ...]}}")
        self.size = (int(size[0]), int(size[1]))
        return image_info

    def _patch_geometry(self, image_info: Any, config: Any) -> None:
        """One pixel box per patch token of the image (``self.boxes``), the local tiles / global thumbnail
        split (``self.parts``) and each part's overlay grid."""
        from workbench.geometry import patch_boxes

        att = self.att
        rows = np.asarray(att["row"].values)[self.patch_idx]
        cols = np.asarray(att["col"].values)[self.patch_idx]
        tiles = np.asarray(att["tile"].values)[self.patch_idx]
        token_grid = (int(rows.max(initial=0)) + 1, int(cols.max(initial=0)) + 1)
        kw = {} if image_info is not None else {"original_size": self.size, "token_grid": token_grid}
        boxes = patch_boxes(image_info, config=config, **kw)
        if boxes.shape[0] != self.patch_idx.size:
            raise ValueError(
                f"sequence {self.sequence} image {self.image_index} has {self.patch_idx.size} patch tokens "
                f"({int(tiles.max(initial=-1)) + 1} tiles of {token_grid[0]}x{token_grid[1]}) but the processor "
                f"geometry for a {self.size[0]}x{self.size[1]} image gives {boxes.shape[0]}: pass image_info= "
                "(the processor's ImageInfo for this image) or config= (its ImageProcessorConfig)")
        self.boxes = boxes
        per_tile = token_grid[0] * token_grid[1]
        n_tiles = int(tiles.max(initial=-1)) + 1
        n_local = n_tiles - 1 if (n_tiles > 1 and boxes.shape[0] > 0 and
                                  _has_global(image_info, n_tiles)) else n_tiles
        self.parts = {"local tiles": np.arange(0, n_local * per_tile)}
        if n_local < n_tiles:
            self.parts["global thumbnail"] = np.arange(n_local * per_tile, n_tiles * per_tile)
        self._grids = {name: overlay_grid(boxes[idx]) for name, idx in self.parts.items()}

    def _read_queries(self, query: int | None) -> int:
        """Labels of the query tokens (text and special tokens after the first patch); returns the query to
        show first: ``query``, else the first text token."""
        att, ds = self.att, self.ds
        q_tok = np.asarray(att["query_token"].values)
        q_pos = np.asarray(att["query_position"].values)
        texts = self._texts(q_tok)
        mods = np.asarray(ds["modality"].isel(token=q_tok).values)
        gen = (np.asarray(att["generated"].values).astype(bool) if "generated" in att.coords
               else np.zeros(q_tok.size, bool))
        self.answer_queries = np.flatnonzero(gen)  # query positions of the generated tokens, in order
        step = np.full(q_tok.size, -1)
        step[self.answer_queries] = np.arange(self.answer_queries.size)
        before, after = self._context(q_tok)
        self.query_labels = [f"pos {int(p)}: {b}{_shown(t)} -> {a}" + (" (special)" if m == Modality.SPECIAL else "")
                             + (f" [answer {int(k) + 1}]" if k >= 0 else "")
                             for p, t, m, k, b, a in zip(q_pos, texts, mods, step, before, after)]
        self.next_texts = after
        if query is None:
            if self.answer_queries.size:  # a generation: the first token of the answer
                query = int(self.answer_queries[0])
            else:  # the token before the first digit (it predicts the digit), else the first text token
                digit = [i for i, a in enumerate(after) if a.isdigit() and mods[i] != Modality.SPECIAL]
                text_q = np.flatnonzero(mods == Modality.TEXT)
                query = digit[0] if digit else (int(text_q[0]) if text_q.size else 0)
        if not 0 <= int(query) < q_tok.size:
            raise ValueError(f"query {query}: sequence {self.sequence} has {q_tok.size} query tokens")
        return int(query)

    def _texts(self, rows: np.ndarray) -> list[str]:
        """Token strings of trace ``rows`` (the vocabulary's, else ``⟨id⟩``)."""
        ds = self.ds
        if "token_text" in ds:
            return [str(x) for x in np.asarray(ds["token_text"].isel(token=rows).values)]
        return [f"\u27e8{int(x)}\u27e9" for x in np.asarray(ds["token_id"].isel(token=rows).values)]

    def _context(self, q_tok: np.ndarray) -> tuple[list[str], list[str]]:
        """Per query token: the word before it (from up to 4 preceding tokens of its sequence, "" at the
        start) followed by a space, and the next token (stripped; "␣" for white space, "" at the end).
        Neighbours are taken in position order (:func:`~workbench.widgets._common.sequence_rows`), not
        storage order: a batched generation interleaves the rows of its sequences."""
        order = W.sequence_rows(self.ds, [self.sequence])[self.sequence]
        at = W.index_in(order, q_tok)
        if not at.size:
            return [], []
        need = np.unique(np.concatenate([order[max(i - 4, 0):i + 2] for i in at.tolist()]))
        text = dict(zip(need.tolist(), self._texts(need)))
        before, after = [], []
        for i in at.tolist():
            words = "".join(text[int(r)] for r in order[max(i - 4, 0):i]).split()
            before.append(f"{words[-1]} " if words else "")
            after.append((text[int(order[i + 1])].strip() or "\u2423") if i + 1 < order.size else "")
        return before, after

    def peakedness(self, query: int | None = None) -> np.ndarray:
        """Per recorded layer (maps' layer order): 1 - H(p) / log n of the head-mean attention of ``query``
        (default: the shown one) over this image's n patch tokens, normalized to sum 1. 0 = uniform over
        the patches, 1 = all on one patch; the view opens on the layer where it is largest."""
        q = int(self.w_query.value) if query is None else int(query)
        a = np.asarray(self.att.isel(query=q).values, np.float64).mean(axis=1)[:, self.patch_idx]  # (layer, patch)
        n = a.shape[1]
        if n < 2:
            return np.zeros(a.shape[0])
        tot = a.sum(axis=1, keepdims=True)
        p = np.divide(a, tot, out=np.full_like(a, 1.0 / n), where=tot > 0)
        h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
        return 1.0 - h / np.log(n)

    def region_shares(self) -> tuple[list[str], np.ndarray]:
        """Share of the shown attention (query, layer, head or mean) on each image region: ``(labels,
        shares)``, shares summing to 1 over the image's patch tokens. One tile: the quadrants of the image
        (by patch centre: top left, top right, bottom left, bottom right). Several tiles: each local tile
        (by its row and column in the tiling) and the global thumbnail."""
        v = self.attention()
        tot = float(v.sum())
        centre = (self.boxes[:, 0:2] + self.boxes[:, 2:4]) / 2.0  # (x, y)
        H0, W0 = self.size
        local = self.parts["local tiles"]
        tiles = np.asarray(self.att["tile"].values)[self.patch_idx]
        n_local = int(np.unique(tiles[local]).size)
        if n_local <= 1:
            right = centre[:, 0] >= W0 / 2.0
            bottom = centre[:, 1] >= H0 / 2.0
            region = bottom.astype(int) * 2 + right.astype(int)
            labels = ["top left", "top right", "bottom left", "bottom right"]
            mass = np.array([v[local][region[local] == r].sum() for r in range(4)])
        else:
            ids = sorted(np.unique(tiles[local]).tolist())
            labels, mass = [], []
            for tid in ids:
                sel = local[tiles[local] == tid]
                cx, cy = centre[sel, 0].mean(), centre[sel, 1].mean()
                labels.append(f"tile {tid} ({'top' if cy < H0 / 2 else 'bottom'} "
                              f"{'left' if cx < W0 / 2 else 'right'})" if n_local == 4 else f"tile {tid}")
                mass.append(v[sel].sum())
            if "global thumbnail" in self.parts:
                labels.append("global thumbnail")
                mass.append(v[self.parts["global thumbnail"]].sum())
            mass = np.asarray(mass, np.float64)
        return labels, (mass / tot if tot > 0 else np.zeros(len(labels)))

    def _layer_position(self, layer: int | None) -> int:
        """Position on the maps' layer dimension of decoder layer ``layer`` (None: the first recorded)."""
        try:
            return W.layer_position(self.att, layer, "CrossModalAttentionView")
        except ValueError:
            raise ValueError(f"CrossModalAttentionView: decoder layer {layer!r} has no attention maps in this "
                             f"trace; recorded attention layers (decoder indices): {self.layer_values}") from None

    def _build_controls(self, query: int, layer_pos: int, head: int | str, opacity: float) -> None:
        import ipywidgets as ipw

        heads = [int(h) for h in np.asarray(self.att["head"].values)]
        self.heads = heads
        self.head_mean_stored = bool(self.att.attrs.get("head_mean", False))
        self.w_query = ipw.Dropdown(options=[(lab, i) for i, lab in enumerate(self.query_labels)], value=query,
                                    description="Query", layout=ipw.Layout(width="420px"))
        # the answer's tokens, one step each (kept in sync with the query dropdown)
        n_ans = int(self.answer_queries.size)
        at = np.flatnonzero(self.answer_queries == query)
        self.w_answer = ipw.IntSlider(value=int(at[0]) + 1 if at.size else 1, min=1, max=max(n_ans, 1),
                                      description="Answer", continuous_update=True, disabled=n_ans == 0)
        self.w_play = ipw.Play(value=self.w_answer.value, min=1, max=max(n_ans, 1), interval=700,
                               description="step through the answer", disabled=n_ans == 0)
        ipw.jslink((self.w_play, "value"), (self.w_answer, "value"))
        self.w_answer_text = ipw.HTML(value=self._answer_text())
        # positions on the maps' layer dimension, labelled with the decoder indices
        self.w_layer = ipw.SelectionSlider(options=[(f"L{x}", i) for i, x in enumerate(self.layer_values)],
                                           value=layer_pos, description="Layer", continuous_update=False)
        self.w_head = ipw.SelectionSlider(options=[(str(h), i) for i, h in enumerate(heads)], value=0,
                                          description="Head", continuous_update=False,
                                          disabled=self.head_mean_stored or head == "mean")
        self.w_mean = ipw.Checkbox(value=(head == "mean") or self.head_mean_stored, description="mean over heads",
                                   disabled=self.head_mean_stored)
        if head != "mean" and not self.head_mean_stored:
            if int(head) not in heads:
                raise ValueError(f"head {head} was not recorded; recorded heads: {heads}")
            self.w_head.value = heads.index(int(head))
        self.w_opacity = ipw.FloatSlider(value=float(opacity), min=0.0, max=1.0, step=0.05, description="Opacity",
                                         continuous_update=True)
        self.w_part = ipw.ToggleButtons(options=list(self.parts), value="local tiles", description="Patches",
                                        disabled=len(self.parts) == 1)

    def _build_figure(self, opacity: float) -> None:
        """The picture (sent once, as an asset) under the attention heatmap, in original pixel coordinates."""
        import plotly.graph_objects as go

        H0, W0 = self.size
        self.fig = W.figure_widget(title=dict(text="", x=0.01), width=min(760, max(360, int(520 * W0 / max(H0, 1)))),
                                   height=560,
                                   xaxis=dict(title="x (pixels)", range=[0, W0], constrain="domain", showgrid=False),
                                   yaxis=dict(title="y (pixels)", range=[H0, 0], scaleanchor="x", showgrid=False))
        if self.rgb is not None:
            uri, w_px, h_px = _data_uri(self.rgb)
            dx, dy = W0 / w_px, H0 / h_px  # original pixels per sent pixel; x0/y0 = first pixel's centre
            self.image_uri = uri
            self.fig.add_trace(go.Image(source=self.fig.asset("image", uri), x0=dx / 2, y0=dy / 2, dx=dx, dy=dy,
                                        hoverinfo="skip", name="image"))
        xs, ys, _ = self._grids["local tiles"]
        self.fig.add_heatmap(z=np.zeros((len(ys) - 1, len(xs) - 1)), x=xs, y=ys, colorscale=SEQUENTIAL,
                             opacity=float(opacity), zmin=0, colorbar=dict(title=dict(text="attention")),
                             hoverongaps=False, name="attention",
                             hovertemplate="x %{x:.0f}, y %{y:.0f}: p = %{z:.4f}<extra></extra>")
        self.fig.layout.meta = {"view": "CrossModalAttentionView"}

    def _build_shares(self) -> None:
        """The bar chart beside the overlay: share of the attention per region (:meth:`region_shares`)."""
        labels, _ = self.region_shares()
        self.shares = W.figure_widget(title=dict(text="Share per region", x=0.01), width=300, height=560,
                                      margin=dict(l=130, r=20, t=70, b=50),
                                      xaxis=dict(title="share of attention", range=[0, 1], tickformat=".0%"),
                                      yaxis=dict(autorange="reversed"), showlegend=False)
        self.shares.add_bar(x=np.zeros(len(labels)), y=labels, orientation="h", marker=dict(color="#0072B2"),
                            texttemplate="%{x:.0%}", textposition="outside", cliponaxis=False,
                            hovertemplate="%{y}: %{x:.1%} of the attention on this image<extra></extra>")
        self.shares.layout.meta = {"view": "CrossModalAttentionView.shares"}

    def _wire_events(self) -> None:
        for w in (self.w_query, self.w_layer, self.w_head, self.w_mean, self.w_part):
            w.observe(lambda ch: self._draw(), "value")
        self.w_answer.observe(self._on_answer, "value")
        self.w_query.observe(self._on_query, "value")
        self.w_mean.observe(lambda ch: setattr(self.w_head, "disabled", bool(ch["new"])), "value")
        self.w_opacity.observe(lambda ch: self._set_opacity(float(ch["new"])), "value")

    # ---------------------------------------------------------------- state
    @property
    def layer(self) -> int:
        """Decoder layer index of the attention maps shown (set it to show another recorded layer)."""
        return self.layer_values[int(self.w_layer.value)]

    @layer.setter
    def layer(self, v: int) -> None:
        self.w_layer.value = self._layer_position(v)

    @property
    def answer_step(self) -> int | None:
        """1-based index of the shown query among the generated tokens (None: a prompt token)."""
        at = np.flatnonzero(self.answer_queries == int(self.w_query.value))
        return int(at[0]) + 1 if at.size else None

    def step(self, n: int = 1) -> None:
        """Show the generated token ``n`` steps after (before, n < 0) the one shown (from the first
        generated token when a prompt token is shown); clamped to the answer."""
        if not self.answer_queries.size:
            raise ValueError(f"sequence {self.sequence} has no generated tokens")
        cur = self.answer_step
        k = 1 if cur is None else cur + int(n)
        self.w_answer.value = min(max(k, 1), int(self.answer_queries.size))
        self.w_query.value = int(self.answer_queries[self.w_answer.value - 1])

    def _on_answer(self, ch) -> None:
        q = int(self.answer_queries[int(ch["new"]) - 1]) if self.answer_queries.size else None
        if q is not None and q != int(self.w_query.value):
            self.w_query.value = q

    def _on_query(self, ch) -> None:
        k = self.answer_step
        if k is not None and k != self.w_answer.value:
            self.w_answer.value = k
        self.w_answer_text.value = self._answer_text()

    def _answer_text(self) -> str:
        n = int(self.answer_queries.size)
        if not n:
            return ""
        k = self.answer_step
        what = f"generated token {k} of {n}" if k is not None else f"a prompt token ({n} generated)"
        return f"<span class='wb-answer-step'>{html.escape(what)}</span>"

    # ---------------------------------------------------------------- data
    def attention(self) -> np.ndarray:
        """Attention of the selected query over this image's patch tokens (patch order), at the selected
        layer and head (or the mean over the recorded heads)."""
        v = np.asarray(self.att.isel(layer=int(self.w_layer.value), query=int(self.w_query.value)).values,
                       np.float64)  # (head, patch)
        v = v.mean(axis=0) if self.w_mean.value else v[int(self.w_head.value)]
        return v[self.patch_idx]

    def overlay(self) -> np.ndarray:
        """The heatmap z drawn over the image (rows = y cells, cols = x cells; NaN = no patch)."""
        part = self.w_part.value
        xs, ys, cells = self._grids[part]
        vals = self.attention()[self.parts[part]]
        z = np.full((len(ys) - 1, len(xs) - 1), np.nan)
        for v, c in zip(vals, cells):
            if c is not None:
                z[c[0]:c[1], c[2]:c[3]] = v
        return z

    def _set_opacity(self, v: float) -> None:
        with self.fig.batch_update():
            self.fig.data[-1].opacity = v

    def _draw(self) -> None:
        part = self.w_part.value
        xs, ys, _ = self._grids[part]
        z = self.overlay()
        q = int(self.w_query.value)
        head = "mean over heads" if self.w_mean.value else f"head {self.heads[int(self.w_head.value)]}"
        with self.fig.batch_update():
            hm = self.fig.data[-1]
            hm.x, hm.y, hm.z = xs, ys, z
            hm.zmax = float(np.nanmax(z)) if np.isfinite(z).any() and np.nanmax(z) > 0 else 1.0
            self.fig.layout.title.text = (f"Sequence {self.sequence}, image {self.image_index}: attention of "
                                          f"{plotly_text(self.query_labels[q])} — "
                                          f"L{self.layer}, {head}")
        labels, shares = self.region_shares()
        with self.shares.batch_update():
            bar = self.shares.data[0]
            bar.x, bar.y = shares, labels
            top = int(np.argmax(shares)) if len(shares) else 0
            bar.marker.color = ["#D55E00" if i == top else "#0072B2" for i in range(len(labels))]
            self.shares.layout.title.text = f"Share per region<br><sup>L{self.layer}, {head}</sup>"


def _shown(text: str) -> str:
    """A query token as its label shows it: spaces as ␣, newlines and tabs as ↵ / ⇥."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def _has_global(image_info: Any, n_tiles: int) -> bool:
    if image_info is not None:
        v = (image_info.get("has_global_tile") if isinstance(image_info, dict)
             else getattr(image_info, "has_global_tile", None))
        if v is not None:
            return bool(v)
    return n_tiles > 1
