"""Token context in the views follows each sequence's positions, not the trace's storage order.

A batched generation appends one token per sequence at each decode step (and a blocked prefill of a
batch one block per sequence in turn), so neighbouring trace rows belong to different sequences. The
views' context (attention query labels, the token strip, the path explorer's lines) is checked against
hand-written text of synthetic interleaved traces and against the same prompt generated alone."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from workbench.trace import TraceWriter  # noqa: E402
from workbench.trace.schema import routing_layout  # noqa: E402
from workbench.widgets import _common as W  # noqa: E402

LAYERS = [1, 3, 5]
E = 4
VOCAB = ["The", " cat", " sat", " on", " the", " mat", "A", " dog", " ran", " far", " away"]
# (sequence, position, token id) per trace row: a prefill of 3 tokens each, then decode steps that
# append one token per sequence (sequence 1 stops one step earlier)
ROWS = [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 6), (1, 1, 7), (1, 2, 8),
        (0, 3, 3), (1, 3, 9), (0, 4, 4), (1, 4, 10), (0, 5, 5)]
READING = [0, 1, 2, 6, 8, 10, 3, 4, 5, 7, 9]  # the rows by sequence, then position (by hand)
PATH_ROWS = (6, 7)  # " on" (sequence 0) and " far" (sequence 1): routed to expert 1 everywhere


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    p = tmp_path_factory.mktemp("lab") / "inter.zarr"
    n = len(ROWS)
    experts = np.zeros((n, len(LAYERS), 1), np.int16)
    experts[list(PATH_ROWS)] = 1
    seq, pos, ids = (np.asarray(c) for c in zip(*ROWS))
    with TraceWriter.create(p, **routing_layout(LAYERS, E, 1), vocab=VOCAB) as w:
        for a, b in ((0, 6), (6, 8), (8, 10), (10, 11)):  # the prefill, then one commit per decode step
            w.append(token_id=ids[a:b].astype(np.int32), sequence=seq[a:b].astype(np.int32),
                     position=pos[a:b].astype(np.int32), modality=np.zeros(b - a, np.int8),
                     topk_expert=experts[a:b], topk_weight=np.ones((b - a, len(LAYERS), 1), np.float32))
    return p


# --------------------------------------------------------------------------------- the helpers
def test_reading_order_sorts_by_sequence_then_position():
    seq, pos, _ = (np.asarray(c) for c in zip(*ROWS))
    assert W.reading_order(seq, pos).tolist() == READING
    assert W.reading_order([0, 0, 1, 1], [0, 1, 0, 1]).tolist() == [0, 1, 2, 3]
    # equal (sequence, position) keep storage order
    assert W.reading_order([1, 0, 1, 0], [0, 0, 0, 0]).tolist() == [1, 3, 0, 2]


def test_sequence_rows_and_index_in(interleaved):
    import workbench as wb

    ds = wb.open_trace(interleaved)
    got = W.sequence_rows(ds, [1, 0, 7])
    assert {k: v.tolist() for k, v in got.items()} == {0: [0, 1, 2, 6, 8, 10], 1: [3, 4, 5, 7, 9], 7: []}
    assert W.index_in(got[0], [8, 0]).tolist() == [4, 0]
    with pytest.raises(ValueError, match="trace row 3 is not among"):
        W.index_in(got[0], [6, 3])


# --------------------------------------------------------------------------------- token strip
def _strip(html_):
    """(trace row, shown text) of each token span of the strip, in page order."""
    return [(int(r), t) for r, t in re.findall(r'data-i="(\d+)"[^>]*>([^<]*)</span>', html_)]


def test_token_view_shows_each_sequence_in_position_order(interleaved):
    from workbench.widgets import TokenRoutingView

    v = TokenRoutingView(interleaved, page_size=11)
    assert _strip(v.html) == [(0, "The"), (1, " cat"), (2, " sat"), (6, " on"), (8, " the"), (10, " mat"),
                              (3, "A"), (4, " dog"), (5, " ran"), (7, " far"), (9, " away")]
    assert v.html.count('class="wb-seq"') == 2  # one header per sequence, not one per decode step
    v = TokenRoutingView(interleaved, page_size=4)
    v.page = 1  # rows 4-7: the page keeps its rows, in reading order
    assert v.page_rows() == slice(4, 8)
    assert _strip(v.html) == [(6, " on"), (4, " dog"), (5, " ran"), (7, " far")]
    v.pin(7)  # the pinned token's text is looked up by row, not by its place on the page
    assert "Pinned token 7 <code>&#x27; far&#x27;</code>" in v.w_path.value
    assert "Token 7 ' far':" in v.path_fig.layout.title.text


# --------------------------------------------------------------------------------- path explorer
def test_path_explorer_context_is_the_tokens_own_sequence(interleaved):
    from workbench.widgets import PathExplorer

    v = PathExplorer(interleaved, context=2)
    v.w_path.value = 1  # [1, 1, 1]: the two tokens routed to expert 1 (the other 9 take [0, 0, 0])
    assert v.selected == [1, 1, 1]
    lines = re.findall(r"<div class='wb-path-row'>(.*?)</div>", v.tokens_html())
    bold = "<b style='background:#ffe08a'>{}</b>"
    assert lines == [
        "<span style='color:#888'>seq 0 \u00b7 row 6</span>  cat sat" + bold.format(" on") + " the mat",
        "<span style='color:#888'>seq 1 \u00b7 row 7</span>  dog ran" + bold.format(" far") + " away",
    ]


# --------------------------------------------------------------------------------- attention view
PROMPT = {"text": "<|image|>top left", "images": ["data/images/digits_02.png"]}
OTHER = "The \"&\" operator yields the bitwise AND of its arguments"


@pytest.fixture(scope="module")
def generations(tmp_path_factory):
    """The image prompt generated alone, batched after a text prompt, and batched with a blocked prefill."""
    torch = pytest.importorskip("torch")
    import workbench as wb
    from workbench.embedded import EMBEDDED_MODEL

    root = Path(__file__).resolve().parents[1]
    prompt = dict(PROMPT, images=[str(root / PROMPT["images"][0])])
    model = wb.load_model(EMBEDDED_MODEL, dtype="float32", progress=False).eval()
    proc = wb.load_processor(EMBEDDED_MODEL)
    d = tmp_path_factory.mktemp("labgen")
    out = {}
    for name, prompts, chunk in (("alone", [prompt], None), ("batched", [OTHER, prompt], None),
                                 ("blocked", [OTHER, prompt], 8)):
        with torch.no_grad(), wb.record(model, d / f"{name}.zarr", capture=("router", "attention"),
                                        processor=proc) as rec:
            gens = wb.generate(model, proc, prompts, max_new_tokens=6, recorder=rec, prefill_chunk=chunk)
        out[name] = (d / f"{name}.zarr", gens[-1])
    return out


def _hand_labels(store, sequence):
    """Query label context by hand from a single-sequence trace (storage order = position order):
    "<last word of the 4 tokens before> <token, spaces as ␣> -> <next token stripped, or ␣>"."""
    import workbench as wb

    ds = wb.open_trace(store, tokens=True)
    assert set(ds["sequence"].values.tolist()) == {sequence}
    assert ds["position"].values.tolist() == list(range(ds.sizes["token"]))
    texts = [str(t) for t in ds["token_text"].values]
    out = {}
    for p, t in enumerate(texts):
        words = "".join(texts[max(p - 4, 0):p]).split()
        nxt = (texts[p + 1].strip() or "\u2423") if p + 1 < len(texts) else ""
        out[p] = f"pos {p}: " + (f"{words[-1]} " if words else "") + t.replace(" ", "\u2423") + f" -> {nxt}"
    return out


@pytest.mark.parametrize("name", ["batched", "blocked"])
def test_attention_labels_after_a_batched_generation_equal_the_prompt_alone(generations, name):
    import workbench as wb
    from workbench.widgets import CrossModalAttentionView

    store, g = generations[name]
    ds = wb.open_trace(store)
    seq, pos = ds["sequence"].values, ds["position"].values
    rows = np.flatnonzero(seq == g.sequence)
    assert np.any(np.diff(rows) > 1), "the batch interleaves the sequences' rows (what the fix is about)"
    if name == "blocked":  # the prompt's rows too, block by block
        assert np.any(np.diff(rows[pos[rows] < g.prompt_tokens]) > 1)
    v = CrossModalAttentionView(store, g.sequence)
    alone_store, g_alone = generations["alone"]
    alone = CrossModalAttentionView(alone_store, g_alone.sequence)
    assert g.token_ids == g_alone.token_ids and len(v.answer_queries) == len(g.token_ids)
    assert v.query_labels == alone.query_labels
    hand = _hand_labels(alone_store, g_alone.sequence)
    for k, q in enumerate(v.answer_queries.tolist()):
        p = int(v.att["query_position"].values[q])
        assert v.query_labels[q] == hand[p] + f" [answer {k + 1}]"
    # the prompt ends "... top left": the word before the first answer token
    assert v.query_labels[int(v.answer_queries[0])].startswith(f"pos {g.prompt_tokens}: left ")
