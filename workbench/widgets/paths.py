"""PathExplorer: the most frequent routing paths of a trace; pick one and read its tokens in context."""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from workbench.analysis import _common as AC
from workbench.analysis import path_entropy, path_tokens, routing_paths

from . import _common as W
from ._palette import expert_color, text_color_on

__all__ = ["PathExplorer", "path_context_html"]


def path_context_html(rows: np.ndarray, tokens: np.ndarray, texts: list[str], sequences: np.ndarray,
                      context: int) -> str:
    """HTML lines, one per matched trace row in ``rows``: the ``context`` tokens before and after it
    in its own sequence, the matched token bold. ``tokens``/``texts``/``sequences``: the window's trace
    rows in reading order (by sequence, by position within one: neighbours in the array are neighbours
    in the text), their strings and sequences (every string HTML-escaped)."""
    at = {int(r): i for i, r in enumerate(tokens)}
    lines = []
    for r in rows:
        i = at[int(r)]
        seq = sequences[i]
        lo, hi = i, i
        while lo > 0 and i - lo < context and sequences[lo - 1] == seq:
            lo -= 1
        while hi + 1 < len(tokens) and hi - i < context and sequences[hi + 1] == seq:
            hi += 1
        parts = [(f"<b style='background:#ffe08a'>{html.escape(texts[j])}</b>" if j == i
                  else html.escape(texts[j])) for j in range(lo, hi + 1)]
        lines.append(f"<div class='wb-path-row'><span style='color:#888'>seq {int(seq)} \u00b7 row {int(r)}"
                     f"</span> {''.join(parts)}</div>")
    return "".join(lines) or "<i>no tokens</i>"


class PathExplorer(W.ViewBase):
    """The ``top`` most frequent routing paths (:func:`workbench.analysis.routing_paths`) over the MoE
    layers ``layers`` (decoder indices, default all; any other index raises ValueError naming the MoE
    layers), with the path entropy per depth (:func:`workbench.analysis.path_entropy`). Picking a path
    lists up to ``max_rows`` of its tokens (:func:`workbench.analysis.path_tokens`) in context
    (``context`` tokens each side, within the sequence, in position order). Each path's experts are shown
    as colored chips (:func:`expert_color`); token text comes from the trace's vocabulary (else the ids),
    escaped.
    """

    def __init__(self, trace: Any, *, layers=None, top: int = 20, modality: int | str | None = None,
                 context: int = 6, max_rows: int = 30):
        import ipywidgets as ipw

        self.ds, self.path = W.open_any(trace, tokens=True)
        self.n_experts = W.n_experts_of(self.ds)
        self.modality = W.modality_code(W.modality_value(modality))
        self.paths = routing_paths(self.ds, layers=layers, top=top, modality=self.modality)
        self.entropy = path_entropy(self.ds, layers=layers, modality=self.modality)
        self.layers = [int(x) for x in self.paths["layer"].values]
        self.context, self.max_rows = int(context), int(max_rows)
        self._seq: np.ndarray | None = None  # the 1-D sequence column, read on the first path shown
        n = max(int(self.paths.attrs["n_tokens"]), 1)
        opts = [(" \u2192 ".join(map(str, row)) + f"   ({int(c)}, {100 * c / n:.1f}%)", i)
                for i, (row, c) in enumerate(zip(self.paths["expert"].values.tolist(), self.paths["count"].values))]
        self.w_path = ipw.Select(options=opts, rows=min(12, max(len(opts), 1)), description="Path",
                                 layout=ipw.Layout(width="420px"))
        self.w_summary = ipw.HTML(self._summary_html())
        self.w_tokens = ipw.HTML()
        self.w_path.observe(lambda ch: self._draw(), "value")
        self._draw()
        self.widget = ipw.VBox([self.w_summary, ipw.HBox([self.w_path, self.w_tokens])])

    @property
    def selected(self) -> list[int]:
        """The experts of the selected path, one per layer of :attr:`layers`."""
        if self.w_path.value is None:
            return []
        return [int(x) for x in self.paths["expert"].values[self.w_path.value]]

    def _summary_html(self) -> str:
        ent = " ".join(f"L{lay}: {h:.2f}" for lay, h in zip(self.layers, self.entropy["entropy"].values))
        return (f"<b>Routing paths</b> over layers {', '.join(f'L{x}' for x in self.layers)}: "
                f"{self.paths.attrs['n_distinct']} distinct for {self.paths.attrs['n_tokens']} tokens; "
                f"path entropy by depth (nats) {html.escape(ent)}")

    def _chips(self, experts: list[int]) -> str:
        out = []
        for lay, e in zip(self.layers, experts):
            bg = expert_color(e, self.n_experts)
            out.append(f"<span style='background:{bg};color:{text_color_on(bg)};padding:0 4px;margin:1px'>"
                       f"L{lay}:{e}</span>")
        return "".join(out)

    def tokens_html(self) -> str:
        """The selected path's tokens in context (what the view shows)."""
        if not self.selected:
            return "<i>no path</i>"
        hits = path_tokens(self.ds, self.selected, layers=self.layers, modality=self.modality, limit=self.max_rows)
        rows = hits["token"].values
        if rows.size == 0:
            return "<i>no tokens</i>"
        window, seqs = self._window(rows)
        read = np.unique(window)  # sorted rows: one orthogonal read
        sub = self.ds.isel(token=read)
        if "token_text" in sub:
            texts = [str(x) for x in sub["token_text"].values]
        else:
            texts = [f"[{int(x)}]" for x in sub["token_id"].values]
        texts = [texts[i] for i in np.searchsorted(read, window)]
        body = path_context_html(rows, window, texts, seqs, self.context)
        more = hits.attrs["n_matches"] - rows.size
        tail = f"<div style='color:#888'>... and {more} more</div>" if more > 0 else ""
        return f"<div>{self._chips(self.selected)}</div>{body}{tail}"

    def _window(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The trace rows within ``context`` tokens of any of ``rows`` in their sequence, in reading order
        (:func:`~workbench.widgets._common.sequence_rows`; storage order interleaves the sequences of a
        batched generation), and their sequence ids."""
        if self._seq is None:
            self._seq = AC.load_column(self.ds, "sequence")
        hit_seq = self._seq[rows]
        order = W.sequence_rows(self.ds, hit_seq, seq_column=self._seq)
        window, seqs = [], []
        for s, o in order.items():
            at = W.index_in(o, rows[hit_seq == s])
            near = np.unique(np.concatenate([np.arange(max(i - self.context, 0), min(i + self.context + 1, o.size))
                                             for i in at.tolist()]))
            window.append(o[near])
            seqs.append(np.full(near.size, s, np.int64))
        return np.concatenate(window), np.concatenate(seqs)

    def _draw(self) -> None:
        self.w_tokens.value = self.tokens_html()
