"""Routing shift: how much does quantization (or any change of weights, dtype, layout) move routing?

For two traces recorded on the same inputs, typically the bf16 model (``ds_a``, the reference) and
its quantized twin (``ds_b``), per MoE layer: top-1 agreement and top-k overlap (from
:func:`~workbench.analysis.saturation`, which also checks that the traces are comparable), how many
tokens changed their top-1 expert or their top-k set, the load share of every expert in both and
its change, the top-1 flow matrix (which expert a token's top-1 moved to), and the list of the
(token, layer) pairs whose routing changed, with the token's text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from . import _common as C
from .saturation import saturation

__all__ = ["routing_shift"]


def _texts(ds: xr.Dataset, ids: np.ndarray, rows: np.ndarray, vocab: Sequence[str] | None) -> np.ndarray:
    """Token strings of ``rows`` (token ids ``ids``): ``vocab``, else the trace's ``token_text``, else the
    vocabulary stored with the trace it was opened from, else ``#<id>``."""
    if vocab is None and "token_text" in ds.variables and rows.size:
        return np.asarray([str(x) for x in np.asarray(ds["token_text"].isel(token=rows).values)], dtype=object)
    if vocab is None:
        src = ds.encoding.get("source")
        if src and ds.attrs.get("has_vocab") and os.path.isdir(src):
            from workbench.trace import trace_vocab

            vocab = trace_vocab(Path(src))
    out = np.empty(ids.size, dtype=object)
    for j, i in enumerate(ids.tolist()):
        out[j] = vocab[i] if vocab is not None and 0 <= i < len(vocab) else f"#{i}"
    return out


def routing_shift(ds_a: xr.Dataset, ds_b: xr.Dataset, *, modality=None, n_experts: int | None = None,
                  vocab: Sequence[str] | None = None, max_changes: int | None = 100_000) -> xr.Dataset:
    """Per-layer routing shift from trace ``ds_a`` (reference, e.g. bf16) to ``ds_b`` (e.g. int4).

    Both traces must cover the same inputs with the same MoE layers and k (ValueError naming the first
    mismatch, as :func:`saturation`). Over the selected tokens (``modality`` filter taken from
    ``ds_a``), T tokens, S_t the top-k set and top1_t the slot with the largest ``topk_weight``
    (first slot on ties):

    - ``top1_agreement`` = (1/T) sum_t 1[top1_t^a = top1_t^b] and ``overlap`` = (1/T) sum_t
      |S_t^a ∩ S_t^b| / k: :func:`saturation`'s values;
    - ``top1_changed`` = sum_t 1[top1_t^a != top1_t^b] (a count; = T (1 - top1_agreement));
      ``set_changed`` = sum_t 1[S_t^a != S_t^b];
    - ``load_a`` / ``load_b`` (moe_layer, expert): load share f_i = (1/kT) sum_t 1[i in S_t] of each
      trace (:func:`expert_load`'s definition); ``load_change`` = f_b - f_a; ``count_a`` /
      ``count_b``: the top-k slot counts;
    - ``top1_flow`` (moe_layer, expert, expert_b): number of tokens with top1^a = i and top1^b = j
      (its diagonal: the tokens that kept their top-1 expert).

    The changed (token, layer) pairs (top-1 or top-k set changed), ordered by token then layer, on dim
    ``change``: ``change_token`` (row on the trace's token dim), ``change_layer`` (decoder layer index),
    ``token_id``, ``sequence``, ``position``, ``modality``, ``text`` (the token string: ``vocab``, the
    trace's ``token_text``, its stored vocabulary, else ``#<id>``), ``top1_a``, ``top1_b``,
    ``top1_moved`` (bool: the top-1 changed, not only the set), ``experts_a`` / ``experts_b``
    (change, k) and ``weight_a`` / ``weight_b`` (the top-1 slot's weight). Only the first
    ``max_changes`` are listed (None: all); ``attrs['n_changes']`` counts them all and
    ``attrs['changes_truncated']`` says whether the list was cut. NaN rates when T = 0.
    """
    who = "routing_shift"
    if max_changes is not None and (isinstance(max_changes, bool) or not isinstance(max_changes, (int, np.integer))
                                    or max_changes < 0):
        raise ValueError(f"{who}: max_changes must be None or a non-negative integer, got {max_changes!r}")
    sat = saturation(ds_a, ds_b, modality=modality, n_experts=n_experts)  # checks the pair, gives the rates
    code = C.resolve_modality(modality, who)
    E, k = int(sat.attrs["n_experts"]), int(sat.attrs["k"])
    L = ds_a.sizes["moe_layer"]
    layers = np.asarray(ds_a["layer"].values) if "layer" in ds_a.coords else np.arange(L)
    ok = C.load_column(ds_a, "modality") == code if code is not None else None
    names = ["topk_expert", "topk_weight"] if "topk_weight" in ds_a.variables and "topk_weight" in ds_b.variables \
        else ["topk_expert"]
    slices = C.token_blocks(ds_a, names)
    acc = _Shift(L, E, k, layers, max_changes)
    for (sl, a), (_, b) in zip(C.iter_blocks(ds_a, names, slices), C.iter_blocks(ds_b, names, slices)):
        ea = C.check_experts(a["topk_expert"], E, sl.start, f"{who} (ds_a)")
        eb = C.check_experts(b["topk_expert"], E, sl.start, f"{who} (ds_b)")
        wa, wb = a.get("topk_weight"), b.get("topk_weight")
        rows = np.arange(sl.start, sl.stop)
        if ok is not None:
            m = ok[sl]
            ea, eb, rows = ea[m], eb[m], rows[m]
            wa = None if wa is None else wa[m]
            wb = None if wb is None else wb[m]
        if ea.shape[0]:
            acc.add(rows, ea, eb, wa, wb)
    return _shift_dataset(ds_a, sat, acc, code, vocab)


class _Shift:
    """What :func:`routing_shift` accumulates over the token blocks of the two traces."""

    def __init__(self, L: int, E: int, k: int, layers: np.ndarray, max_changes: int | None):
        self.E, self.k, self.layers, self.max_changes = E, k, layers, max_changes
        self.count_a = np.zeros((L, E), np.int64)
        self.count_b = np.zeros((L, E), np.int64)
        self.flow = np.zeros((L, E, E), np.int64)
        self.top1_changed = np.zeros(L, np.int64)
        self.set_changed = np.zeros(L, np.int64)
        self.listed: list[dict[str, np.ndarray]] = []
        self.n_listed = self.n_changes = self.T = 0

    def add(self, rows: np.ndarray, ea: np.ndarray, eb: np.ndarray, wa, wb) -> None:
        """One block: ``rows`` (n,) token rows, ``ea`` / ``eb`` (n, L, k) expert ids, ``wa`` / ``wb``
        (n, L, k) weights or None."""
        lay_idx = np.arange(ea.shape[1])
        self.T += ea.shape[0]
        t1a, t1b = C.top1(ea, wa), C.top1(eb, wb)
        for x in range(self.k):
            np.add.at(self.count_a, (lay_idx[None, :], ea[..., x]), 1)
            np.add.at(self.count_b, (lay_idx[None, :], eb[..., x]), 1)
        np.add.at(self.flow, (lay_idx[None, :], t1a, t1b), 1)
        d1 = t1a != t1b
        dset = (np.sort(ea, axis=-1) != np.sort(eb, axis=-1)).any(axis=-1)
        self.top1_changed += d1.sum(axis=0)
        self.set_changed += dset.sum(axis=0)
        t_i, l_i = np.nonzero(d1 | dset)  # C order: by token, then layer
        self.n_changes += t_i.size
        room = t_i.size if self.max_changes is None else max(0, min(t_i.size, int(self.max_changes) - self.n_listed))
        if not room:
            return
        t_i, l_i = t_i[:room], l_i[:room]

        def slot_weight(w, e, t1):
            if w is None:
                return np.full(t_i.size, np.nan, np.float32)
            slot = np.argmax(e[t_i, l_i] == t1[t_i, l_i][:, None], axis=-1)
            return np.asarray(w[t_i, l_i, slot], np.float32)

        self.listed.append({"change_token": rows[t_i].astype(np.int64),
                            "change_layer": self.layers[l_i].astype(np.int64),
                            "top1_a": t1a[t_i, l_i].astype(np.int16), "top1_b": t1b[t_i, l_i].astype(np.int16),
                            "top1_moved": d1[t_i, l_i], "experts_a": ea[t_i, l_i].astype(np.int16),
                            "experts_b": eb[t_i, l_i].astype(np.int16), "weight_a": slot_weight(wa, ea, t1a),
                            "weight_b": slot_weight(wb, eb, t1b)})
        self.n_listed += room

    def changes(self) -> dict[str, np.ndarray]:
        """The listed changes, joined (empty arrays of the right dtypes and shapes when none)."""
        empty = {"change_token": np.zeros(0, np.int64), "change_layer": np.zeros(0, np.int64),
                 "top1_a": np.zeros(0, np.int16), "top1_b": np.zeros(0, np.int16), "top1_moved": np.zeros(0, bool),
                 "experts_a": np.zeros((0, self.k), np.int16), "experts_b": np.zeros((0, self.k), np.int16),
                 "weight_a": np.zeros(0, np.float32), "weight_b": np.zeros(0, np.float32)}
        if not self.listed:
            return empty
        return {key: np.concatenate([x[key] for x in self.listed]) for key in empty}


_DEFINITIONS = {
    "top1_agreement": "(1/T) sum_t 1[top1_t^a == top1_t^b]",
    "overlap": "(1/T) sum_t |S_t^a ∩ S_t^b| / k",
    "top1_changed": "sum_t 1[top1_t^a != top1_t^b]",
    "set_changed": "sum_t 1[S_t^a != S_t^b]",
    "load_change": "f_b - f_a, f_i = (1/kT) sum_t 1[i in S_t]",
    "top1_flow": "number of tokens with top1^a = expert and top1^b = expert_b",
}


def _shift_dataset(ds_a: xr.Dataset, sat: xr.Dataset, acc: _Shift, code, vocab) -> xr.Dataset:
    """:func:`routing_shift`'s result from the accumulated counts and changes."""
    E, k, T = acc.E, acc.k, acc.T
    ch = acc.changes()
    tok = ch.pop("change_token")
    meta = {name: C.load_column(ds_a, name)[tok] for name in ("token_id", "sequence", "position", "modality")
            if name in ds_a.variables}
    text = _texts(ds_a, np.asarray(meta.get("token_id", np.zeros(0, np.int64))), tok, vocab)
    load_a, load_b = C.safe_div(acc.count_a, k * T), C.safe_div(acc.count_b, k * T)
    coords = {"layer": ("moe_layer", acc.layers), "expert": ("expert", np.arange(E)),
              "expert_b": ("expert_b", np.arange(E))}
    data = {
        "top1_agreement": sat["top1_agreement"].variable,
        "overlap": sat["overlap"].variable,
        "top1_changed": (("moe_layer",), acc.top1_changed),
        "set_changed": (("moe_layer",), acc.set_changed),
        "count_a": (("moe_layer", "expert"), acc.count_a),
        "count_b": (("moe_layer", "expert"), acc.count_b),
        "load_a": (("moe_layer", "expert"), load_a),
        "load_b": (("moe_layer", "expert"), load_b),
        "load_change": (("moe_layer", "expert"), load_b - load_a),
        "top1_flow": (("moe_layer", "expert", "expert_b"), acc.flow),
        "change_token": (("change",), tok),
        "change_layer": (("change",), ch.pop("change_layer")),
        **{name: (("change",), v) for name, v in meta.items()},
        "text": (("change",), text),
        **{name: (("change", "k") if v.ndim == 2 else ("change",), v) for name, v in ch.items()},
    }
    out = xr.Dataset(data, coords=coords)
    for name, definition in _DEFINITIONS.items():
        out[name].attrs["definition"] = definition
    out.attrs.update({"k": k, "n_experts": E, "n_tokens": int(T), "modality_filter": C.modality_attr(code),
                      "n_changes": int(acc.n_changes), "changes_listed": int(acc.n_listed),
                      "changes_truncated": bool(acc.n_listed < acc.n_changes)})
    return out
