"""TokenRoutingView: the trace's text, each token colored by its top-1 expert at a chosen layer."""
from __future__ import annotations

import html
import re
import time
from typing import Any

import anywidget
import ipywidgets as ipw
import numpy as np
import traitlets as t

from workbench.analysis import _common as AC
from workbench.trace.schema import Modality

from . import _common as W
from ._palette import NEUTRAL, expert_color_map, is_categorical, text_color_on
from ._text import plotly_text

__all__ = ["TokenRoutingView", "TokenStrip", "token_page_html", "key_html"]

_VARS = ("token_id", "sequence", "position", "modality", "topk_expert", "topk_weight")

_ESM = r"""
function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "wb-tokens";
  el.appendChild(root);
  const mark = () => {
    const p = model.get("pinned");
    root.querySelectorAll(".wb-pinned").forEach((e) => e.classList.remove("wb-pinned"));
    if (p >= 0) {
      const t = root.querySelector('[data-i="' + p + '"]');
      if (t) t.classList.add("wb-pinned");
    }
  };
  const key = document.createElement("div");
  key.className = "wb-key";
  el.insertBefore(key, root);
  const draw = () => {
    // the HTML is built by workbench.widgets.tokens.token_page_html / key_html, every token text escaped
    key.innerHTML = model.get("key");
    root.innerHTML = model.get("html");
    mark();
    root.dataset.rendered = String(model.get("revision"));
  };
  key.addEventListener("click", (ev) => {
    // click an expert of the key: highlight it (again: remove it); several may be highlighted
    const k = ev.target.closest("[data-key]");
    if (!k) return;
    const e = parseInt(k.dataset.key, 10);
    const hl = [...model.get("highlight")];
    const at = hl.indexOf(e);
    if (at >= 0) hl.splice(at, 1); else hl.push(e);
    model.set("highlight", hl);
    model.save_changes();
  });
  root.addEventListener("click", (ev) => {
    const t = ev.target.closest("[data-i]");
    if (!t) return;
    const i = parseInt(t.dataset.i, 10);
    model.set("pinned", model.get("pinned") === i ? -1 : i);
    model.save_changes();
  });
  model.on("change:html change:key", draw);
  model.on("change:pinned", mark);
  draw();
}
export default { render };
"""

_CSS = r"""
.wb-tokens { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px;
             line-height: 1.9; max-height: 420px; overflow-y: auto; padding: 6px;
             border: 1px solid #ddd; border-radius: 4px; background: #fff; color: #000; }
.wb-tokens .wb-tok { white-space: pre-wrap; border-radius: 3px; padding: 1px 1px; margin: 0 1px;
                     cursor: pointer; }
.wb-tokens .wb-tok:hover { outline: 2px solid #333; }
.wb-tokens .wb-special { font-style: italic; box-shadow: inset 0 -2px 0 rgba(0,0,0,0.45); }
.wb-tokens .wb-patch { font-size: 11px; }
.wb-tokens .wb-pinned { outline: 3px solid #D55E00 !important; outline-offset: 1px; }
.wb-tokens .wb-dim { opacity: 0.55; }
.wb-tokens .wb-hl { box-shadow: 0 0 0 2px #333; font-weight: 600; }
.wb-key { font-size: 12px; line-height: 2; margin: 2px 0 4px; }
.wb-key .wb-key-item { cursor: pointer; margin-right: 8px; white-space: nowrap; }
.wb-key .wb-key-item.wb-key-on .wb-swatch { box-shadow: 0 0 0 2px #333; }
.wb-key .wb-key-item.wb-key-off { opacity: 0.55; }
.wb-tokens .wb-seq { display: block; margin: 6px 0 2px; color: #555; font-size: 11px;
                     border-top: 1px dashed #bbb; }
"""


class TokenStrip(anywidget.AnyWidget):
    """Browser side of :class:`TokenRoutingView`: shows ``html``, reports clicks as ``pinned``."""

    _esm = _ESM
    _css = _CSS
    html = t.Unicode("").tag(sync=True)
    #: the color key (HTML, from :func:`key_html`); clicking an expert in it toggles it in ``highlight``
    key = t.Unicode("").tag(sync=True)
    #: highlighted experts, in order (empty: every expert in its color; > 16 experts: the most used)
    highlight = t.List(t.Int()).tag(sync=True)
    pinned = t.Int(-1).tag(sync=True)
    revision = t.Int(0).tag(sync=True)

    def _wb_static_html(self) -> str:
        """The key and the page as the browser shows them (for the view's static snapshot)."""
        # own container classes: selectors of the live strip (".wb-tokens .wb-tok") never match the snapshot
        css = re.sub(r"\.wb-(tokens|key)\b(?!-)", r".wb-static-\1", _CSS)
        return (f"<style>{css}</style><div class='wb-static-key'>{self.key}</div>"
                f"<div class='wb-static-tokens'>{self.html}</div>")


def _display_text(text: str, modality: int) -> str:
    if modality == Modality.IMAGE_PATCH:
        return "\u25a6"  # one small square per image patch token
    if text == "":
        return "\u2205"
    return text.replace("\n", "\u21b5\n").replace("\t", "\u21e5\t")


def token_page_html(rows: np.ndarray, texts, sequences, positions, modality, experts, weights,
                    layer_pos: int, layer_label: str, n_experts: int, pinned: int = -1,
                    highlight=()) -> str:
    """HTML of one page of tokens (every token string and tooltip HTML-escaped).

    rows: trace row of each token; texts: token strings; modality: :class:`Modality` codes;
    experts/weights: (n, moe_layer, k) top-k ids and applied weights; each token's background is
    ``expert_color(top1, n_experts)`` at ``layer_pos``, the POSITION on the ``moe_layer`` axis of these
    arrays (not a decoder index; ``layer_label`` names that layer, e.g. "L3"); top-1 = the slot with
    the largest weight, :func:`workbench.analysis._common.top1`. ``highlight``: expert ids to emphasize
    (:func:`~workbench.widgets._palette.expert_color_map`: they keep / get a color and an outline, the other
    tokens turn neutral grey and fade).
    """
    top = AC.top1(experts[:, layer_pos, :], weights[:, layer_pos, :])
    hl = {int(e) for e in highlight}
    cmap = expert_color_map(n_experts, highlight)
    out = []
    prev_seq = None
    k = experts.shape[-1]
    for j in range(rows.shape[0]):
        seq = int(sequences[j])
        if seq != prev_seq:
            out.append(f'<span class="wb-seq">sequence {seq}</span>')
            prev_seq = seq
        e = int(top[j])
        bg = cmap[e]
        fg = text_color_on(bg)
        mod = int(modality[j])
        kind = W.modality_name(mod)
        order = np.argsort(-weights[j, layer_pos, :], kind="stable")
        topk = ", ".join(f"{int(experts[j, layer_pos, s])} ({float(weights[j, layer_pos, s]):.3f})" for s in order)
        tip = (f"token {int(rows[j])} \u00b7 sequence {seq}, position {int(positions[j])} \u00b7 {kind}\n"
               f"text: {texts[j]!r}\n"
               f"layer {layer_label}: top-{k} expert (weight): {topk}")
        cls = "wb-tok" + (" wb-special" if mod == Modality.SPECIAL else "") + (
            " wb-patch" if mod == Modality.IMAGE_PATCH else "") + (
            " wb-pinned" if int(rows[j]) == pinned else "") + (
            (" wb-hl" if e in hl else " wb-dim") if hl else "")
        out.append(
            f'<span class="{cls}" data-i="{int(rows[j])}" data-e="{e}" style="background:{bg};color:{fg}" '
            f'title="{html.escape(tip, quote=True)}">{html.escape(_display_text(texts[j], mod), quote=True)}</span>')
    return "".join(out)


def key_html(counts: np.ndarray, n_experts: int, layer_label: str, highlight=(), auto: bool = False) -> str:
    """The token view's color key: one clickable chip per expert (its color, its number) with the number
    of tokens of the page whose top-1 expert it is at the layer, and their share.

    Up to 16 experts every expert is listed (highlighted ones outlined, the others faded while a
    highlight is set). More experts: the highlighted ones (``auto``: picked as the page's most used),
    then one line for all the others, drawn grey."""
    counts = np.asarray(counts, np.int64)
    total = max(int(counts.sum()), 1)
    hl = [int(e) for e in highlight]
    cmap = expert_color_map(n_experts, hl)

    def item(e: int) -> str:
        c = cmap[e]
        state = " wb-key-on" if e in hl else (" wb-key-off" if hl else "")
        tip = html.escape(f"expert {e}: top-1 of {int(counts[e])} of {int(counts.sum())} tokens on this page; "
                          "click to highlight (again to remove)", quote=True)
        return (f'<span class="wb-key-item{state}" data-key="{e}" title="{tip}">'
                f'<span class="wb-swatch" style="background:{c};color:{text_color_on(c)};padding:0 5px;'
                f'border-radius:3px;border:1px solid #888">{e}</span> {int(counts[e])} '
                f'<small>({100 * counts[e] / total:.0f}%)</small></span>')

    if is_categorical(n_experts):
        items = [item(e) for e in range(n_experts)]
        what = ("click experts to highlight them" if not hl
                else f"highlighted: {', '.join(map(str, hl))} (click to change)")
    else:
        items = [item(e) for e in hl]
        rest = int(counts.sum()) - int(counts[hl].sum()) if hl else int(counts.sum())
        others = n_experts - len(hl)
        items.append(f'<span class="wb-key-item" title="experts not highlighted are drawn grey">'
                     f'<span class="wb-swatch" style="background:{NEUTRAL};padding:0 5px;border-radius:3px;'
                     f'border:1px solid #888">other {others}</span> {rest} <small>({100 * rest / total:.0f}%)'
                     f'</small></span>')
        what = (f"{n_experts} experts: grey unless highlighted; "
                + (f"the page's {len(hl)} most used are highlighted" if auto else "highlighted as chosen")
                + " (type ids in 'Highlight')")
    return (f'<b>Key</b> · top-1 expert at {html.escape(layer_label)}: tokens on this page '
            f'· <small>{html.escape(what)}</small><br>' + "".join(items))


class TokenRoutingView(W.ViewBase):
    """Tokens of a trace colored by their top-1 expert at the chosen MoE layer.

    ``trace``: a path or a Dataset from :func:`workbench.open_trace` (token strings come from the
    trace's stored vocabulary; without one the token ids are shown). ``layer``: the decoder layer
    index of the MoE layer that colors the tokens (default: the first MoE layer; one that is not a
    MoE layer of the trace raises ValueError); the :attr:`layer` property reads and sets it. Hover a
    token for its top-k experts and weights at the layer; click it to pin it and plot its path
    through all MoE layers (click again to unpin). The trace is read one page (``page_size`` trace
    rows, :meth:`page_rows`) at a time; a page shows its tokens by sequence, in position order within
    each (a batched generation stores the tokens of its sequences interleaved).

    Color key and highlight: above the tokens a key lists each expert's chip with the number (and
    share) of the page's tokens whose top-1 expert it is at the layer. Click chips, type ids into
    "Highlight" (``"3, 5"``) or set :attr:`highlight` (``highlight=`` at construction) to emphasize
    experts: their tokens keep their color and get an outline, all others turn grey. With more than
    16 experts (:mod:`~workbench.widgets._palette`) tokens are grey unless highlighted, and without a
    chosen highlight the page's 8 most used experts are highlighted (the key says so).
    """

    def __init__(self, trace: Any, *, layer: int | None = None, page_size: int = 512, page: int = 0,
                 highlight=()):
        self.ds, self.path = W.open_any(trace, tokens=True)
        AC.require(self.ds, *_VARS, who="TokenRoutingView")
        self.n_tokens = int(self.ds.sizes["token"])
        self.n_experts = W.n_experts_of(self.ds)
        self.n_layers = int(self.ds.sizes["moe_layer"])
        self.k = int(self.ds.sizes["k"])
        self.layer_values = W.layer_values(self.ds)
        self.layers = [f"L{x}" for x in self.layer_values]
        self.page_size = int(page_size)
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        li = W.layer_position(self.ds, layer, "TokenRoutingView")
        self.n_pages = max(1, -(-self.n_tokens // self.page_size))
        self.has_text = "token_text" in self.ds

        # positions on moe_layer, labelled with the decoder indices
        self.w_layer = ipw.SelectionSlider(options=[(lab, i) for i, lab in enumerate(self.layers)],
                                           value=li, description="Layer", continuous_update=False)
        self.w_page = ipw.BoundedIntText(value=int(page), min=0, max=self.n_pages - 1, description="Page",
                                         layout=ipw.Layout(width="170px"))
        self.w_prev = ipw.Button(description="\u25c0 prev", layout=ipw.Layout(width="80px"))
        self.w_next = ipw.Button(description="next \u25b6", layout=ipw.Layout(width="80px"))
        self.w_info = ipw.HTML()
        self.w_highlight = ipw.Text(value="", description="Highlight", placeholder="expert ids, e.g. 3, 5",
                                    continuous_update=False, layout=ipw.Layout(width="260px"))
        self.strip = TokenStrip()
        self.strip.add_class("wb-token-strip")
        self.w_path = ipw.HTML()
        self._path_fig = None  # created on the first pin: the text shows without waiting for plotly.js
        self.w_path_box = ipw.Box()

        self._page_data: dict[str, np.ndarray] | None = None
        self._page_loaded = -1
        self.load_seconds = 0.0
        self.render_seconds = 0.0
        self.auto_highlight = False
        self._quiet = True
        self.strip.highlight = self._checked_highlight(highlight)
        self._quiet = False
        self._render()

        self.w_layer.observe(lambda ch: self._render(), "value")
        self.w_page.observe(lambda ch: self._render(), "value")
        self.w_prev.on_click(lambda b: self._step(-1))
        self.w_next.on_click(lambda b: self._step(+1))
        self.strip.observe(lambda ch: self._show_path(), "pinned")
        self.strip.observe(self._on_highlight, "highlight")
        self.w_highlight.observe(self._on_highlight_text, "value")

        legend = ipw.HTML("<small>Background = top-1 expert at the layer (one fixed colorblind-safe color "
                          "per expert, as in every workbench view; the key above the tokens counts them). "
                          "\u25a6 = image patch token; "
                          "<i>italic</i> = special token. Hover for the top-k experts and weights; click a "
                          "token to pin it and plot its path through all MoE layers.</small>")
        self.widget = ipw.VBox([ipw.HBox([self.w_layer, self.w_prev, self.w_page, self.w_next]),
                                ipw.HBox([self.w_highlight, self.w_info]),
                                legend, self.strip, self.w_path, self.w_path_box])
        self.widget.add_class("wb-token-view")

    # ---------------------------------------------------------------- state
    @property
    def path_fig(self):
        """The pinned token's path figure (a :class:`~workbench.widgets._plot.Plot`, made on first use)."""
        if self._path_fig is None:
            fig = W.figure_widget(title=dict(text="Click a token to see its path through the MoE layers", x=0.01),
                                  height=300, width=760, xaxis=dict(title="MoE layer (decoder index)"),
                                  yaxis=dict(title="expert", range=[-0.5, self.n_experts - 0.5]), showlegend=True)
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#777", width=1.5), name="top-1 path")
            for s in range(self.k):
                fig.add_scatter(x=[], y=[], mode="markers", name=f"slot {s}", cliponaxis=False,
                                marker=dict(size=10, line=dict(color="#333", width=1),
                                            symbol=["circle", "diamond", "square", "triangle-up"][s % 4]))
            fig.layout.meta = {"view": "TokenRoutingView.path"}
            fig.push()
            self._path_fig = fig
            self.w_path_box.children = (fig.widget,)
        return self._path_fig

    @property
    def layer(self) -> int:
        """Decoder layer index of the MoE layer that colors the tokens (set it to show another)."""
        return self.layer_values[int(self.w_layer.value)]

    @layer.setter
    def layer(self, v: int) -> None:
        self.w_layer.value = W.layer_position(self.ds, v, "TokenRoutingView")

    @property
    def page(self) -> int:
        return int(self.w_page.value)

    @page.setter
    def page(self, v: int) -> None:
        self.w_page.value = int(v)

    @property
    def highlight(self) -> list[int]:
        """The highlighted experts (as chosen; empty: none chosen). See :attr:`shown_highlight`."""
        return [int(e) for e in self.strip.highlight]

    @highlight.setter
    def highlight(self, experts) -> None:
        self.strip.highlight = self._checked_highlight(experts)

    @property
    def shown_highlight(self) -> list[int]:
        """The experts the page emphasizes: :attr:`highlight`, or with more than 16 experts and none chosen
        the page's 8 most used top-1 experts (:attr:`auto_highlight` is then True)."""
        return list(self._shown_hl)

    def key_counts(self) -> dict[int, int]:
        """Per expert, the number of tokens of the page whose top-1 expert it is at the layer (what the
        key shows; experts with no token are left out)."""
        return {e: int(c) for e, c in enumerate(self._page_counts) if c}

    def _checked_highlight(self, experts) -> list[int]:
        if isinstance(experts, (int, np.integer)):
            experts = [experts]
        out: list[int] = []
        for e in experts:
            e = int(e)
            if not 0 <= e < self.n_experts:
                raise ValueError(f"highlight: expert {e} is outside [0, {self.n_experts}) "
                                 f"(the trace has {self.n_experts} experts)")
            if e not in out:
                out.append(e)
        return out

    def _on_highlight(self, ch) -> None:
        if self._quiet:
            return
        self._quiet = True
        try:
            self.w_highlight.value = ", ".join(map(str, self.strip.highlight))
        finally:
            self._quiet = False
        self._render()

    def _on_highlight_text(self, ch) -> None:
        if self._quiet:
            return
        text = str(ch["new"]).replace(",", " ").split()
        try:
            ids = self._checked_highlight([int(x) for x in text])
        except ValueError as e:
            self.w_info.value = f"<span style='color:#D55E00'>{html.escape(str(e))}</span>"
            return
        self.strip.highlight = ids

    @property
    def pinned(self) -> int:
        return int(self.strip.pinned)

    def pin(self, token: int) -> None:
        """Pin trace row ``token`` (-1 to unpin), as a click does."""
        token = int(token)
        if token != -1 and not 0 <= token < self.n_tokens:
            raise ValueError(f"token {token} is outside the trace's rows [0, {self.n_tokens})")
        self.strip.pinned = token

    @property
    def html(self) -> str:
        return self.strip.html

    def page_rows(self, page: int | None = None) -> slice:
        """The trace rows of page ``page`` (default: the one shown)."""
        p = self.page if page is None else int(page)
        return slice(p * self.page_size, min((p + 1) * self.page_size, self.n_tokens))

    # ---------------------------------------------------------------- data
    def _read_page(self) -> dict[str, np.ndarray]:
        if self._page_loaded == self.page and self._page_data is not None:
            return self._page_data
        t0 = time.perf_counter()
        sl = self.page_rows()
        names = list(_VARS) + (["token_text"] if self.has_text else [])
        sub = self.ds[names].isel(token=sl).load()
        order = {"topk_expert": ("token", "moe_layer", "k"), "topk_weight": ("token", "moe_layer", "k")}
        d = {n: np.asarray(sub[n].transpose(*order.get(n, sub[n].dims)).values) for n in names}
        d["rows"] = np.arange(sl.start, sl.stop)
        if not self.has_text:
            d["token_text"] = np.array([f"\u27e8{int(i)}\u27e9" for i in d["token_id"]], dtype=object)
        # the page's rows in reading order: a batched generation interleaves its sequences' rows
        order = W.reading_order(d["sequence"], d["position"])
        d = {n: np.asarray(v)[order] for n, v in d.items()}
        self._page_data, self._page_loaded = d, self.page
        self.load_seconds = time.perf_counter() - t0
        return d

    def token_path(self, token: int) -> dict[str, Any]:
        """Routing of trace row ``token`` through every MoE layer: ``experts`` (moe_layer, k),
        ``weights`` (moe_layer, k), ``top1`` (moe_layer,), ``layers`` (decoder indices)."""
        token = int(token)
        if not 0 <= token < self.n_tokens:
            raise ValueError(f"token {token} is outside the trace's rows [0, {self.n_tokens})")
        sub = self.ds[["topk_expert", "topk_weight"]].isel(token=token).load()
        e = np.asarray(sub["topk_expert"].transpose("moe_layer", "k").values)
        w = np.asarray(sub["topk_weight"].transpose("moe_layer", "k").values)
        return {"experts": e, "weights": w, "top1": AC.top1(e, w),
                "layers": list(self.layer_values)}

    def _token_text(self, token: int) -> str:
        d = self._page_data
        at = np.flatnonzero(d["rows"] == token) if d is not None else ()
        if len(at):
            return str(d["token_text"][at[0]])
        if self.has_text:
            return str(self.ds["token_text"].isel(token=token).values)
        return f"\u27e8{int(self.ds['token_id'].isel(token=token).values)}\u27e9"

    # ---------------------------------------------------------------- drawing
    def _step(self, d: int) -> None:
        self.w_page.value = int(np.clip(self.page + d, 0, self.n_pages - 1))

    def _render(self) -> None:
        d = self._read_page()
        t0 = time.perf_counter()
        li = int(self.w_layer.value)  # position on moe_layer
        top = AC.top1(d["topk_expert"][:, li, :], d["topk_weight"][:, li, :]) if d["rows"].size else np.zeros(0, int)
        self._page_counts = np.bincount(np.asarray(top, np.int64), minlength=self.n_experts)[:self.n_experts]
        hl = self.highlight
        self.auto_highlight = not hl and not is_categorical(self.n_experts)
        if self.auto_highlight:  # > 16 experts, none chosen: the page's most used ones
            order = np.argsort(-self._page_counts, kind="stable")
            hl = [int(e) for e in order[:8] if self._page_counts[e] > 0]
        self._shown_hl = hl
        with self.strip.hold_sync():
            self.strip.html = token_page_html(d["rows"], d["token_text"], d["sequence"], d["position"],
                                              d["modality"], d["topk_expert"], d["topk_weight"], li, self.layers[li],
                                              self.n_experts, pinned=self.pinned, highlight=hl)
            self.strip.key = key_html(self._page_counts, self.n_experts, self.layers[li], hl, auto=self.auto_highlight)
            self.strip.revision += 1
        sl = self.page_rows()
        self.w_info.value = (f"tokens {sl.start:,}\u2013{max(sl.stop - 1, sl.start):,} of {self.n_tokens:,} "
                             f"(page {self.page + 1} of {self.n_pages}) \u00b7 layer {self.layers[li]} \u00b7 "
                             f"top-{self.k} of {self.n_experts} experts")
        self.render_seconds = time.perf_counter() - t0

    def _show_path(self) -> None:
        t = self.pinned
        if t < 0 and self._path_fig is None:
            self.w_path.value = ""
            return
        fig = self.path_fig
        if t < 0:
            with fig.batch_update():
                for tr in fig.data:
                    tr.x, tr.y = [], []
                fig.layout.title.text = "Click a token to see its path through the MoE layers"
            self.w_path.value = ""
            return
        p = self.token_path(t)
        cmap = expert_color_map(self.n_experts, self._shown_hl)
        labels = self.layers
        text = self._token_text(t)
        wmax = float(np.nanmax(p["weights"])) if np.isfinite(p["weights"]).any() else 1.0
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y = labels, p["top1"].tolist()
            for s in range(self.k):
                tr = fig.data[1 + s]
                es = p["experts"][:, s]
                ws = p["weights"][:, s]
                tr.x, tr.y = labels, es.tolist()
                tr.marker.color = [cmap[int(e)] for e in es]
                tr.marker.size = (8 + 14 * np.nan_to_num(ws) / max(wmax, 1e-9)).tolist()
                tr.customdata = ws.tolist()
                tr.hovertemplate = "layer %{x}: expert %{y}, weight %{customdata:.3f}<extra>slot " + str(s) + "</extra>"
            fig.layout.title.text = f"Token {t} {plotly_text(repr(text))}: path through the MoE layers"
        items = []
        for li, lab in enumerate(labels):
            order = np.argsort(-p["weights"][li], kind="stable")
            cells = ", ".join(
                f'<span style="background:{cmap[int(p["experts"][li, s])]};'
                f'color:{text_color_on(cmap[int(p["experts"][li, s])])};'
                f'padding:0 3px;border-radius:2px">{int(p["experts"][li, s])}</span> '
                f'({float(p["weights"][li, s]):.3f})' for s in order)
            items.append(f"<b>{html.escape(lab)}</b>: {cells}")
        self.w_path.value = (f"<div class='wb-path'>Pinned token {t} <code>{html.escape(repr(text))}</code> "
                             f"&mdash; " + " &middot; ".join(items) + "</div>")
