"""Shared plumbing of the views: opening traces, token reading order, cached load counts, display."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from workbench.analysis import _common as AC
from workbench.trace import expert_loads, open_trace
from workbench.analysis.load import expert_load as _analysis_expert_load
from workbench.analysis.load import imbalance_from_shares
from workbench.trace.schema import Modality

from ._plot import Plot

#: Names of the token filters in the views' "Tokens" dropdowns (the codes are :class:`Modality`'s)
MODALITY_LABELS = {Modality.TEXT: "text", Modality.IMAGE_PATCH: "image patches", Modality.SPECIAL: "special"}
#: Dropdown value of "all tokens" (ipywidgets treats a None value as "nothing selected")
ALL_TOKENS = -1
#: Dropdown options of the token filter: ``(label, value)``, value = a :class:`Modality` code or :data:`ALL_TOKENS`
MODALITY_OPTIONS = (("all tokens", ALL_TOKENS), *((label, int(m)) for m, label in MODALITY_LABELS.items()))


def modality_value(modality) -> int:
    """A view's ``modality=`` argument (None = all tokens, a :class:`Modality` code or name) -> dropdown value."""
    return ALL_TOKENS if modality is None else int(Modality.parse(modality))


def modality_code(value) -> int | None:
    """Dropdown value -> analysis modality filter (None = all tokens)."""
    return None if value is None or int(value) == ALL_TOKENS else int(Modality(int(value)))


def modality_name(code) -> str:
    """One token's kind in words, from :class:`Modality`: "text", "image patch", "special" (else the code)."""
    try:
        return Modality(int(code)).name.lower().replace("_", " ")
    except ValueError:
        return str(code)


def open_any(trace: Any, *, tokens: bool = False) -> tuple[xr.Dataset, Path | None]:
    """``(dataset, path)`` from a trace path or an already opened ``xarray.Dataset``.

    Paths are opened lazily with :func:`workbench.trace.open_trace` (with ``token_text`` when
    ``tokens`` and the trace stores a vocabulary)."""
    if isinstance(trace, xr.Dataset):
        src = trace.encoding.get("source")
        return trace, (Path(src) if src else None)
    if isinstance(trace, (str, os.PathLike)):
        p = Path(trace)
        ds = open_trace(p)
        if tokens and ds.attrs.get("has_vocab"):
            ds = open_trace(p, tokens=True)
        return ds, p
    raise TypeError(f"expected a trace path or an xarray.Dataset from open_trace, got {type(trace).__name__}")


def layer_labels(ds: xr.Dataset) -> list[str]:
    """Axis labels of the MoE layers: the decoder layer index of each (coordinate ``layer``)."""
    if "layer" in ds.coords:
        return [f"L{int(x)}" for x in np.asarray(ds["layer"].values)]
    return [f"moe{i}" for i in range(ds.sizes["moe_layer"])]


def layer_values(obj: xr.Dataset | xr.DataArray) -> list[int]:
    """The decoder layer indices of the ``layer`` coordinate, in dimension order."""
    if "layer" not in obj.coords:
        raise KeyError("the trace has no 'layer' coordinate (the decoder index of each MoE layer, "
                       "required by the workbench.trace schema)")
    return [int(x) for x in np.asarray(obj["layer"].values)]


def layer_position(obj: xr.Dataset | xr.DataArray, layer: int | None, who: str) -> int:
    """Position on the layer dimension of decoder layer ``layer`` (None: the first one), for a view's
    slider or dropdown. ``obj``: a trace (``moe_layer`` dim) or a DataArray with a ``layer`` coordinate
    (live loads, attention maps). A decoder index that is not there raises ValueError naming the
    ones that are (:func:`workbench.analysis._common.layer_position`)."""
    if layer is None:
        return 0
    return AC.layer_position(obj, layer, who)


def reading_order(sequences: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Permutation that puts token rows in reading order: by ``sequence``, then ``position`` (ties keep
    storage order), as :func:`workbench.analysis.transitions.next_token_rows` orders tokens. Storage order
    is not reading order: a batched generation appends one token per sequence at each decode step, and a
    blocked prefill of a batch appends one block per sequence in turn."""
    s = np.asarray(sequences, np.int64)
    p = np.asarray(positions, np.int64)
    if s.size < 2 or np.all((s[1:] > s[:-1]) | ((s[1:] == s[:-1]) & (p[1:] >= p[:-1]))):
        return np.arange(s.size)  # the usual layout of unbatched traces: skip the sort
    return np.lexsort((p, s))  # stable: equal (sequence, position) keep storage order


def sequence_rows(ds: xr.Dataset, sequences, seq_column: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Trace rows of each sequence id in ``sequences``, in position order (:func:`reading_order`); a
    sequence with no token maps to an empty array. Reads the 1-D ``sequence`` column whole (or takes it
    as ``seq_column``) and ``position`` only at the rows of these sequences."""
    want = np.unique(np.asarray(sequences, np.int64))
    out = {int(x): np.zeros(0, np.int64) for x in want}
    seq = AC.load_column(ds, "sequence") if seq_column is None else np.asarray(seq_column)
    rows = np.flatnonzero(np.isin(seq, want))
    if not rows.size:
        return out
    pos = np.asarray(ds["position"].isel(token=rows).values)
    rows = rows[reading_order(seq[rows], pos)]
    s = seq[rows]
    for chunk in np.split(rows, np.flatnonzero(s[1:] != s[:-1]) + 1):
        out[int(seq[chunk[0]])] = chunk
    return out


def index_in(order: np.ndarray, rows) -> np.ndarray:
    """Index of each of ``rows`` in ``order`` (distinct trace rows, e.g. one sequence's rows in position
    order); ValueError when a row is not there."""
    order = np.asarray(order, np.int64)
    rows = np.asarray(rows, np.int64)
    if not rows.size:
        return np.zeros(0, np.int64)
    if not order.size:
        raise ValueError(f"trace row {int(rows[0])} is not among the rows given")
    by_row = np.argsort(order, kind="stable")
    at = np.minimum(np.searchsorted(order, rows, sorter=by_row), order.size - 1)
    idx = by_row[at]
    missing = order[idx] != rows
    if missing.any():
        raise ValueError(f"trace row {int(rows[np.flatnonzero(missing)[0]])} is not among the rows given")
    return idx


def n_experts_of(ds: xr.Dataset) -> int:
    return AC.get_n_experts(ds, None, "widgets")


def is_recorder(obj: Any) -> bool:
    """Duck-typed live source: has ``loads()`` and ``n_tokens`` (a :class:`~workbench.hooks.Recorder`)."""
    return callable(getattr(obj, "loads", None)) and hasattr(obj, "n_tokens") and not isinstance(
        obj, (xr.Dataset, str, os.PathLike))


def derive(counts: np.ndarray, n_tokens: int, k: int, mode: str) -> np.ndarray:
    """Heatmap values from load counts N (L, E) over T selected tokens, top-k = k.

    ``"count"``: N_i; ``"share"``: the load share f_i = N_i / (k T) of
    :func:`workbench.analysis.expert_load`; ``"deviation"``: E f_i - 1, the relative deviation from
    the uniform share 1/E (0 = uniform, +1 = twice the uniform share, -1 = unused). NaN when T = 0.

    The browser repeats this arithmetic for the dashboard's client-side mode switch (``deriveValues``
    in :mod:`workbench.widgets._plot`: float64, the same operations, identical values; checked by
    ``tests/test_browser.py::test_client_side_mode_switch_equals_the_python_values``).
    """
    counts = np.asarray(counts)
    if mode == "count":
        return counts.astype(np.int64)
    f = AC.safe_div(counts, k * int(n_tokens))
    if mode == "share":
        return f
    if mode == "deviation":
        return counts.shape[-1] * f - 1.0
    raise ValueError(f"mode must be 'count', 'share' or 'deviation', got {mode!r}")


def imbalance(counts: np.ndarray, n_tokens: int, k: int) -> dict[str, np.ndarray]:
    """Per-layer imbalance metrics (cv, max_over_mean, maxvio, load_entropy) of
    :func:`workbench.analysis.load_imbalance`, from counts."""
    f = derive(counts, n_tokens, k, "share")
    return imbalance_from_shares(f, counts.shape[-1])


class TraceLoads:
    """Expert-load counts of a stored trace under a sequence-range / modality filter, cached.

    Whole-trace and commit-aligned sequence ranges are summed from the per-commit ``expert_load``
    array (a small read). Token rows of commits that straddle the range edge, and any modality
    filter, are counted by :func:`workbench.analysis.expert_load` over just the selected token
    rows (streamed in blocks); with a modality filter all three modalities are counted in that one
    pass and cached, so switching between them is free.
    """

    def __init__(self, ds: xr.Dataset, cache_size: int = 16):
        AC.require(ds, "topk_expert", who="ExpertLoadDashboard")
        self.ds = ds
        self.n_experts = n_experts_of(ds)
        self.n_layers = int(ds.sizes["moe_layer"])
        self.k = int(ds.sizes["k"])
        self.n_tokens = int(ds.sizes["token"])
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._seq: np.ndarray | None = None
        self._sorted: bool | None = None
        self._bounds: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- sequences --------------------------------------------------------------------------
    def sequences(self) -> np.ndarray:
        """The 1-D ``sequence`` column (4 bytes per token), read once."""
        if self._seq is None:
            self._seq = AC.load_column(self.ds, "sequence").astype(np.int64)
            s = self._seq
            self._sorted = bool(s.size < 2 or np.all(s[1:] >= s[:-1]))
        return self._seq

    def sequence_range(self) -> tuple[int, int]:
        s = self.sequences()
        return (int(s.min()), int(s.max())) if s.size else (0, 0)

    def _commit_bounds(self) -> np.ndarray | None:
        if "commit_end" not in self.ds or "expert_load" not in self.ds:
            return None
        if self._bounds is None:
            ends = np.asarray(self.ds["commit_end"].values, np.int64)
            self._bounds = np.concatenate([[0], ends])
        b = self._bounds
        if b[-1] != self.n_tokens:
            return None  # the commits do not cover this token table (a subset Dataset)
        return b

    # -- counts -----------------------------------------------------------------------------
    def counts(self, seq_range: tuple[int, int] | None = None, modality: int | None = None
               ) -> tuple[np.ndarray, int]:
        """``(N (moe_layer, expert) int64, T selected tokens)``."""
        key = (None if seq_range is None else (int(seq_range[0]), int(seq_range[1])), modality)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if modality is None:
            out = self._counts_all_modalities_free(key[0])
        else:
            per_mod = self._by_modality(key[0])
            out = per_mod[modality]
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def _token_rows(self, seq_range):
        """The selected token rows: a slice (sorted traces) or an index array."""
        if seq_range is None:
            return slice(0, self.n_tokens)
        lo, hi = seq_range
        s = self.sequences()
        if self._sorted:
            a, b = np.searchsorted(s, [lo, hi + 1])
            return slice(int(a), int(b))
        return np.flatnonzero((s >= lo) & (s <= hi))

    def _counts_all_modalities_free(self, seq_range):
        L, E = self.n_layers, self.n_experts
        rows = self._token_rows(seq_range)
        bounds = self._commit_bounds()
        if isinstance(rows, slice) and bounds is not None:
            a, b = rows.start, rows.stop
            if (a, b) == (0, self.n_tokens):
                return np.asarray(expert_loads(self.ds).values, np.int64), self.n_tokens
            # whole commits inside [a, b) from expert_load, the edges from the token table
            b0 = int(np.searchsorted(bounds, a, side="left"))  # first commit starting at >= a
            b1 = int(np.searchsorted(bounds, b, side="right")) - 1  # last commit ending at <= b
            counts = np.zeros((L, E), np.int64)
            if b1 > b0:
                counts += np.asarray(self.ds["expert_load"].isel(commit=slice(b0, b1)).sum("commit").values, np.int64)
                edges = [(a, int(bounds[b0])), (int(bounds[b1]), b)]
            else:
                edges = [(a, b)]
            for x, y in edges:
                if y > x:
                    counts += self._count_rows(slice(x, y), None)[0]
            return counts, b - a
        return self._count_rows(rows, None)

    def _count_rows(self, rows, modality):
        sub = self.ds.isel(token=rows)
        n = int(sub.sizes["token"])
        if n == 0:
            return np.zeros((self.n_layers, self.n_experts), np.int64), 0
        da = _analysis_expert_load(sub, normalize=False, modality=modality, n_experts=self.n_experts)
        return np.asarray(da.values, np.int64), int(da.attrs["n_tokens"])

    def _by_modality(self, seq_range):
        rows = self._token_rows(seq_range)
        sub = self.ds.isel(token=rows)
        L, E = self.n_layers, self.n_experts
        if int(sub.sizes["token"]) == 0:
            z = (np.zeros((L, E), np.int64), 0)
            return {m: z for m in range(3)}
        da = _analysis_expert_load(sub, normalize=False, by_modality=True, n_experts=E)
        ntok = np.asarray(da["n_tokens"].values, np.int64)
        out = {m: (np.asarray(da.values[m], np.int64), int(ntok[m])) for m in range(da.sizes["modality"])}
        with self._lock:
            for m, v in out.items():
                self._cache[(seq_range, m)] = v
        return out


class ViewBase:
    """Display protocol: every view shows its ``widget`` (an ipywidgets container), followed by a static
    snapshot of it (:mod:`workbench.widgets._static`): a saved notebook shows its figures without the kernel.

    ``WB_STATIC=0`` in the environment leaves the snapshot out."""

    widget: Any
    _static_id: str | None = None

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def static_bundle(self) -> dict:
        """The static snapshot (``text/html``, ``image/png``, ``text/plain``) of the view as it is now."""
        from ._static import static_bundle

        return static_bundle(self.widget, type(self).__name__)

    def _widget_bundle(self) -> dict:
        b = dict(self.widget._repr_mimebundle_())
        b["text/plain"] = (f"<{type(self).__name__}: interactive view; it needs its kernel - run the cell again. "
                           "A static snapshot follows.>")
        return b

    def _ipython_display_(self):
        import uuid

        from IPython.display import display

        if os.environ.get("WB_STATIC", "1") == "0":
            display(self.widget)
            return
        display(self._widget_bundle(), raw=True)
        self._static_id = uuid.uuid4().hex
        display(self.static_bundle(), raw=True, display_id=self._static_id)

    def update_static(self) -> bool:
        """Redraw the static snapshot shown under the view (e.g. after a live run): True when there was one."""
        if self._static_id is None:
            return False
        from IPython.display import update_display

        update_display(self.static_bundle(), raw=True, display_id=self._static_id)
        return True


def figure_widget(**layout):
    """A :class:`~workbench.widgets._plot.Plot` (plotly figure + light widget) with the common style."""
    base = dict(margin=dict(l=60, r=20, t=50, b=50))
    base.update(layout)
    return Plot(**base)
