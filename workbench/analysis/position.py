"""Routing by position: load, entropy and same-expert rates per position bucket, and relative to
the attention chunks of Llama 4's RoPE layers (does routing drift deep into a long context, or
jump at a chunk edge?).

Positions are the trace's ``position`` column (place of a token in its sequence, 0-based, as the
model saw it). A *bucket* spec (argument ``bucket``) groups them into half-open ranges
``[start, stop)``:

- ``"log2"`` (default): ``[0, 1), [1, 2), [2, 4), [4, 8), ...`` up to the largest position;
- an int ``w`` >= 1: fixed width, ``[0, w), [w, 2w), ...``;
- ``"chunk"``: fixed width = the attention chunk size (one bucket per chunk; positions only);
- a sequence of increasing ints (edges): ``[e0, e1), [e1, e2), ...``; tokens outside
  ``[e0, e_last)`` are left out (counted in ``attrs['n_outside']``).

Llama 4's RoPE layers attend only inside chunks of ``attention_chunk_size`` positions (chunk
``position // c``; the NoPE layers attend globally). :func:`by_chunk_offset` groups tokens by the
offset ``position % c`` and compares consecutive-token pairs that straddle a chunk boundary
(``pos_{t-1} // c != pos_t // c``) with pairs inside one chunk. ``c`` is ``chunk_size=`` or the
text part of the trace's provenance ``model_config`` (``text_config.attention_chunk_size``, or
the top level for a text-only config).

Every function streams the trace in token blocks (only the 1-D ``sequence``/``position``/
``modality`` columns are loaded whole), takes ``layer=`` (a decoder layer index: the result is
about that MoE layer only and has no ``moe_layer`` dim; None = every MoE layer), ``modality=``
(a filter, as in :func:`workbench.analysis.expert_load`; pairs need both tokens selected, as in
:func:`workbench.analysis.repetition_rate`) and ``n_experts=``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from . import _common as C
from .entropy import _probability_source, routing_attrs
from .transitions import _read_pairs, _top1_names, next_token_rows

#: default bucket spec: log-spaced edges 0, 1, 2, 4, 8, ...
DEFAULT_BUCKET = "log2"
#: most (bucket x MoE layer x expert) counters one call may hold (int64 each); more is a ValueError
MAX_CELLS = 1 << 25

__all__ = ["attention_chunk_size", "bucket_edges", "by_chunk_offset", "entropy_by_position", "load_by_position",
           "same_expert_rate_by_position"]


# --------------------------------------------------------------------------- chunk size, buckets
def attention_chunk_size(ds: xr.Dataset, chunk_size=None, who: str = "attention_chunk_size") -> int:
    """The attention chunk size c: ``chunk_size`` when given (an int >= 1), else
    ``attention_chunk_size`` of the text part of the trace's provenance ``model_config``
    (``text_config`` of a multimodal config, the config itself for a text-only one).
    ValueError when neither says (e.g. a model without chunked attention)."""
    if chunk_size is not None:
        c = C.as_index(chunk_size)
        if c is None:
            raise TypeError(f"{who}: chunk_size must be an int, got {chunk_size!r}")
        if c < 1:
            raise ValueError(f"{who}: chunk_size must be >= 1, got {c}")
        return c
    prov = ds.attrs.get("provenance") or {}
    if isinstance(prov, str):
        try:
            prov = json.loads(prov)
        except ValueError:
            prov = {}
    cfg = prov.get("model_config") if isinstance(prov, Mapping) else None
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = None
    text = cfg.get("text_config") if isinstance(cfg, Mapping) else None
    if not isinstance(text, Mapping):
        text = cfg if isinstance(cfg, Mapping) else {}
    c = C.as_index(text.get("attention_chunk_size"))
    if c is None or c < 1:
        raise ValueError(
            f"{who}: the trace's provenance has no attention chunk size (model_config text part "
            f"'attention_chunk_size' is {text.get('attention_chunk_size')!r}); pass chunk_size=<int>"
        )
    return c


def bucket_edges(bucket, max_value: int, *, chunk_size: int | None = None, cap: int | None = None,
                 who: str = "bucket") -> np.ndarray:
    """Edges (int64, increasing, length B + 1) of a bucket spec (see the module docstring) covering
    the values ``0 .. max_value``. ``cap``: the values are known to lie below it (chunk offsets):
    generated edges stop there. ``chunk_size``: the width of ``"chunk"``."""
    top = max(int(max_value), 0) + 1 if cap is None else int(cap)  # generated edges cover [0, top)
    if isinstance(bucket, str):
        if bucket == "log2":
            edges = [0, 1]
            while edges[-1] < top:
                edges.append(edges[-1] * 2)
            if cap is not None:
                edges[-1] = min(edges[-1], cap)
            return np.asarray(edges, np.int64)
        if bucket == "chunk":
            if chunk_size is None:
                raise ValueError(f"{who}: bucket='chunk' needs the attention chunk size")
            return _width_edges(chunk_size, top, cap)
        raise ValueError(f"{who}: bucket must be 'log2', 'chunk', an int width or a sequence of edges, got {bucket!r}")
    w = C.as_index(bucket)
    if w is not None:
        if w < 1:
            raise ValueError(f"{who}: bucket width must be >= 1, got {w}")
        return _width_edges(w, top, cap)
    if isinstance(bucket, (bool, np.bool_, float)) or not isinstance(bucket, (Sequence, np.ndarray)):
        raise TypeError(f"{who}: bucket must be 'log2', 'chunk', an int width or a sequence of int edges, "
                        f"got {bucket!r}")
    vals = [C.as_index(x) for x in bucket]
    if any(v is None for v in vals):
        raise TypeError(f"{who}: bucket edges must be ints, got {list(bucket)!r}")
    edges = np.asarray(vals, np.int64)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"{who}: bucket edges must be at least two strictly increasing ints, got {edges.tolist()}")
    return edges


def _width_edges(w: int, top: int, cap: int | None) -> np.ndarray:
    n = max(1, -(-top // w))
    edges = np.arange(n + 1, dtype=np.int64) * w
    if cap is not None:
        edges[-1] = min(edges[-1], cap)
    return edges


def _bucket_ids(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket index of each value (-1 outside ``[edges[0], edges[-1])``)."""
    idx = np.searchsorted(edges, values, side="right") - 1
    inside = (values >= edges[0]) & (values < edges[-1])
    return np.where(inside, idx, -1).astype(np.int64)


def _bucket_label(bucket) -> str:
    if isinstance(bucket, str):
        return bucket
    w = C.as_index(bucket)
    return f"width {w}" if w is not None else "edges"


# --------------------------------------------------------------------------- setup
class _Setup:
    """What every function needs: the (layer-selected) trace, E, k, positions, filter and buckets."""

    def __init__(self, ds: xr.Dataset, who: str, *, layer, modality, n_experts, bucket, chunk_size,
                 offsets: bool = False, need_chunk: bool = False):
        C.require(ds, "topk_expert", "position", who=who)
        self.who = who
        self.code = C.resolve_modality(modality, who)
        self.E = C.get_n_experts(ds, n_experts, who)
        self.k = int(ds.sizes["k"])
        self.layer = None
        if layer is not None:
            li = C.layer_position(ds, layer, who)
            ds = ds.isel(moe_layer=[li])
            self.layer = int(np.asarray(ds["layer"].values)[0])
        self.ds = ds
        self.L = int(ds.sizes["moe_layer"])
        self.pos = C.load_column(ds, "position").astype(np.int64)
        self.mod_ok = None
        if self.code is not None:
            C.require(ds, "modality", who=who)
            self.mod_ok = C.load_column(ds, "modality") == self.code
        self.chunk = None
        if need_chunk or chunk_size is not None or (isinstance(bucket, str) and bucket == "chunk"):
            self.chunk = attention_chunk_size(ds, chunk_size, who)
        if offsets:
            values = np.mod(self.pos, self.chunk)
            self.edges = bucket_edges(bucket, self.chunk - 1, chunk_size=self.chunk, cap=self.chunk, who=who)
        else:
            values = self.pos
            self.edges = bucket_edges(bucket, int(self.pos.max()) if self.pos.size else 0, chunk_size=self.chunk,
                                      who=who)
        self.B = int(self.edges.size - 1)
        if self.B * self.L * self.E > MAX_CELLS:
            raise ValueError(
                f"{who}: {self.B} buckets x {self.L} MoE layers x {self.E} experts is more than {MAX_CELLS} "
                "counters; use wider buckets (bucket=<width> or 'log2') or one layer (layer=<decoder index>)"
            )
        self.gid_all = _bucket_ids(values, self.edges)  # bucket of every token (-1 outside)
        self.gid = self.gid_all if self.mod_ok is None else np.where(self.mod_ok, self.gid_all, -1)
        n_sel = int(self.pos.size if self.mod_ok is None else self.mod_ok.sum())
        self.n_outside = n_sel - int((self.gid >= 0).sum())
        self.bucket_label = _bucket_label(bucket)
        self.offsets = offsets

    def coords(self, n_tokens: np.ndarray) -> dict:
        kind = "offset" if self.offsets else "position"
        out = {"bucket": np.arange(self.B), f"{kind}_start": ("bucket", self.edges[:-1]),
               f"{kind}_stop": ("bucket", self.edges[1:]), "n_tokens": ("bucket", n_tokens)}
        out.update(C.layer_coords(self.ds))
        return out

    def attrs(self, **extra) -> dict:
        a = {"k": self.k, "n_experts": self.E, "modality_filter": C.modality_attr(self.code),
             "bucket": self.bucket_label, "n_outside": int(self.n_outside)}
        if self.chunk is not None:
            a["chunk_size"] = int(self.chunk)
        a.update(extra)
        return a

    def finish(self, obj):
        """Drop the moe_layer dim when one layer was asked for (its decoder index stays as the
        scalar coordinate ``layer``)."""
        return obj.isel(moe_layer=0) if self.layer is not None else obj

    # ---------------------------------------------------------------- pairs
    def pairs(self):
        """Rows ``(src, dst)`` of consecutive-token pairs (``dst`` the next token of ``src`` in its
        sequence, both selected by the modality filter), sorted by ``max(src, dst)``, with ``hi``."""
        nxt = next_token_rows(self.ds, self.who)
        src = np.flatnonzero(nxt >= 0)
        dst = nxt[src]
        if self.mod_ok is not None:
            keep = self.mod_ok[src] & self.mod_ok[dst]
            src, dst = src[keep], dst[keep]
        hi = np.maximum(src, dst)
        o = np.argsort(hi, kind="stable")
        return src[o], dst[o], hi[o]


def _entropy_source(st: _Setup, source):
    """``(variable, function, probabilities)`` of the per-token router entropy, or None (with the
    reason) when ``source`` is None, or "auto" and the trace has no distribution to take it of."""
    if source is None:
        return None, "source=None"
    try:
        return _probability_source(st.ds, source, st.E, st.who), None
    except ValueError as e:
        if source == "auto" and "undefined" in str(e):
            return None, "top-1 routing without router_logits: no per-token distribution to take an entropy of"
        raise


# --------------------------------------------------------------------------- the one pass
def _accumulate(st: _Setup, *, top1: bool = False, ent=None, pairs=None, pair_groups: int = 0) -> dict:
    """One pass over the token blocks. Per bucket b (tokens with ``st.gid == b``) and MoE layer l:

    - ``counts`` (B, L, E): top-k slots per expert; ``ntok`` (B,): tokens;
    - ``top1_counts`` (B, L, E) with ``top1``: top-1 per expert (= counts for k = 1);
    - ``ent_sum`` (B, L) with ``ent=(variable, function, ...)``: sum of the per-token entropy;
    - with ``pairs=(src, dst, hi, pgid)`` (pairs sorted by hi, ``pgid`` the pair group in
      [0, pair_groups), -1 to leave out): ``same`` (G, L) pairs with the same top-1, ``inter`` (G, L)
      summed |S_t ∩ S_t'|, ``npairs`` (G,).
    """
    ds, L, E, k, B = st.ds, st.L, st.E, st.k, st.B
    names = _top1_names(ds, k) if (top1 or pairs is not None) else ["topk_expert"]
    if ent is not None:
        names = list(dict.fromkeys(names + [ent[0]]))
    lay = np.arange(L, dtype=np.int64)
    counts = np.zeros(B * L * E, np.int64)
    top1_counts = np.zeros(B * L * E, np.int64) if top1 and k > 1 else None
    ntok = np.zeros(B, np.int64)
    ent_sum = np.zeros(B * L, np.float64) if ent is not None else None
    G = int(pair_groups)
    same = np.zeros(G * L, np.int64)
    inter = np.zeros(G * L, np.int64)
    npairs = np.zeros(G, np.int64)
    if pairs is not None:
        src, dst, hi, pgid = pairs
    prev = None
    for sl, blk in C.iter_blocks(ds, names):
        e64 = C.check_experts(blk["topk_expert"], E, sl.start, st.who)
        g = st.gid[sl]
        m = g >= 0
        gm = g[m]
        cell = gm[:, None] * L + lay[None, :]  # (n, L) bucket x layer cell
        counts += np.bincount((cell[:, :, None] * E + e64[m]).ravel(), minlength=B * L * E)
        ntok += np.bincount(gm, minlength=B)
        t1 = None
        if top1 or pairs is not None:
            t1 = C.top1(blk["topk_expert"], blk.get("topk_weight"))
            if top1_counts is not None:
                top1_counts += np.bincount((cell * E + t1[m].astype(np.int64)).ravel(), minlength=B * L * E)
        if ent_sum is not None and gm.size:
            h = ent[1](blk[ent[0]][m], E)  # (n, L) normalized entropy
            ent_sum += np.bincount(cell.ravel(), weights=h.astype(np.float64).ravel(), minlength=B * L)
        if pairs is not None:
            cur_data = {"e": blk["topk_expert"], "t1": t1}
            a, b = np.searchsorted(hi, [sl.start, sl.stop])
            if b > a:
                cur = (sl, cur_data)
                names_p = _top1_names(ds, k)
                ps = _read_pairs(ds, names_p, src[a:b], cur, prev)
                pd = _read_pairs(ds, names_p, dst[a:b], cur, prev)
                pg = pgid[a:b]
                ok = pg >= 0
                pcell = (pg[ok][:, None] * L + lay[None, :]).ravel()
                s = (ps["t1"][ok] == pd["t1"][ok])
                same += np.bincount(pcell, weights=s.ravel(), minlength=G * L).astype(np.int64)
                if k > 1:
                    pe, de = ps["e"][ok], pd["e"][ok]
                    x = np.zeros(s.shape, np.int64)
                    for i in range(k):
                        for j in range(k):
                            x += pe[..., i] == de[..., j]
                else:
                    x = s.astype(np.int64)
                inter += np.bincount(pcell, weights=x.ravel(), minlength=G * L).astype(np.int64)
                npairs += np.bincount(pg[ok], minlength=G)
            prev = (sl, cur_data)
    out = {"counts": counts.reshape(B, L, E), "ntok": ntok}
    if top1:
        out["top1_counts"] = out["counts"] if top1_counts is None else top1_counts.reshape(B, L, E)
    if ent_sum is not None:
        out["ent_sum"] = ent_sum.reshape(B, L)
    if pairs is not None:
        out.update(same=same.reshape(G, L), inter=inter.reshape(G, L), npairs=npairs)
    return out


def _shares(counts: np.ndarray, ntok: np.ndarray, k: int) -> np.ndarray:
    return C.safe_div(counts, (k * ntok)[:, None, None])


def _load_entropy(f: np.ndarray, E: int) -> np.ndarray:
    """-sum_i f_i log f_i / log E over the last axis (1 when E = 1; NaN rows stay NaN)."""
    if E == 1:
        return np.where(np.isnan(f[..., 0]), np.nan, 1.0)
    return C.entropy(f) / math.log(E)


# --------------------------------------------------------------------------- public functions
def load_by_position(ds: xr.Dataset, *, bucket=DEFAULT_BUCKET, layer: int | None = None, normalize: bool = True,
                     modality=None, chunk_size: int | None = None, n_experts: int | None = None) -> xr.DataArray:
    """Expert load per position bucket, dims ``(bucket, moe_layer, expert)`` (``(bucket, expert)``
    with ``layer=``).

    For bucket b (the selected tokens t with position p_t in ``[start_b, stop_b)``, T_b of them):

        f_{b,i} = (1 / (k T_b)) * sum_{t in b} 1[i in S_t]

    S_t = token t's top-k expert set at that layer; shares sum to 1 over experts, NaN when T_b = 0.
    ``normalize=False``: the counts N_{b,i} = sum_{t in b} 1[i in S_t] (sum to k T_b).

    ``bucket``: ``"log2"`` (default: [0,1), [1,2), [2,4), ...), an int width, ``"chunk"`` (width =
    the attention chunk size, from ``chunk_size=`` or the provenance) or increasing edges (see
    :mod:`workbench.analysis.position`). Coordinates: ``position_start``/``position_stop``
    (half-open) and ``n_tokens`` = T_b per bucket; ``attrs['n_outside']`` = selected tokens outside
    every bucket. ``layer``: a decoder layer index (a MoE layer of the trace; ValueError otherwise).
    ``modality``: a token filter as in :func:`workbench.analysis.expert_load`.
    """
    who = "load_by_position"
    st = _Setup(ds, who, layer=layer, modality=modality, n_experts=n_experts, bucket=bucket, chunk_size=chunk_size)
    n = _accumulate(st)
    if normalize:
        values = _shares(n["counts"], n["ntok"], st.k)
        definition = "f_bi = (1/(k T_b)) sum_{t in b} 1[i in S_t]"
    else:
        values = n["counts"]
        definition = "N_bi = sum_{t in b} 1[i in S_t]"
    coords = {"expert": np.arange(st.E), **st.coords(n["ntok"])}
    out = xr.DataArray(values, dims=("bucket", "moe_layer", "expert"), coords=coords,
                       name="load_share" if normalize else "load_count",
                       attrs=st.attrs(definition=definition, n_tokens=int(n["ntok"].sum())))
    return st.finish(out)


def entropy_by_position(ds: xr.Dataset, *, bucket=DEFAULT_BUCKET, layer: int | None = None, source: str | None = "auto",
                        modality=None, chunk_size: int | None = None, n_experts: int | None = None) -> xr.Dataset:
    """Routing entropy per position bucket, dims ``(bucket, moe_layer)`` (``(bucket,)`` with ``layer=``).

    - ``load_entropy`` = -sum_i f_{b,i} log f_{b,i} / log E, with f_b the bucket's load share
      (:func:`load_by_position`): how evenly the bucket's tokens spread over the experts (the
      ``load_entropy`` of :func:`workbench.analysis.load_imbalance`, per bucket). A bucket of T_b
      tokens reaches at most log(min(E, k T_b)) / log E: small buckets read low.
    - ``mean_entropy`` = mean over the bucket's tokens of H_t = -sum_i p_ti log p_ti / log E, the
      per-token router entropy of :func:`workbench.analysis.router_entropy` with its ``source``
      (``"auto"``: p = softmax(router_logits) when the trace records them, else the applied top-k
      scores normalized to sum 1; ``attrs['probabilities']`` says which, and ``attrs['routing_score']`` /
      ``attrs['probabilities_are']`` what they are for the recorded model, as there). Left out (with
      ``attrs['mean_entropy']`` saying why) when ``source=None``, or ``"auto"`` on a top-1 trace
      without router logits.

    NaN for empty buckets. Buckets, coordinates, ``layer`` and ``modality`` as in :func:`load_by_position`.
    """
    who = "entropy_by_position"
    st = _Setup(ds, who, layer=layer, modality=modality, n_experts=n_experts, bucket=bucket, chunk_size=chunk_size)
    ent, why = _entropy_source(st, source)
    n = _accumulate(st, ent=ent)
    out = _entropy_vars(st, n, ent, why, dim="bucket")
    out = out.assign_coords(st.coords(n["ntok"]))
    out.attrs.update(st.attrs(n_tokens=int(n["ntok"].sum())))
    return st.finish(out)


def _entropy_vars(st: _Setup, n: dict, ent, why, dim: str) -> xr.Dataset:
    f = _shares(n["counts"], n["ntok"], st.k)
    data = {"load_entropy": ((dim, "moe_layer"), _load_entropy(f, st.E))}
    attrs = {}
    if ent is not None:
        data["mean_entropy"] = ((dim, "moe_layer"), C.safe_div(n["ent_sum"], n["ntok"][:, None]))
        attrs["probabilities"] = ent[2]
        attrs.update(routing_attrs(st.ds, ent[2]))  # as router_entropy says it: softmax(logits) may be a convention
    else:
        attrs["mean_entropy"] = f"not computed: {why}"
    out = xr.Dataset(data, attrs=attrs)
    out["load_entropy"].attrs["definition"] = "-sum_i f_bi log f_bi / log E, f_b = load share of bucket b"
    if ent is not None:
        out["mean_entropy"].attrs.update({"definition": "mean over tokens of bucket b of H_t = -sum_i p_ti log p_ti / log E",
                                          "probabilities": ent[2]})
    return out


def same_expert_rate_by_position(ds: xr.Dataset, *, bucket=DEFAULT_BUCKET, layer: int | None = None, modality=None,
                                 chunk_size: int | None = None, n_experts: int | None = None) -> xr.Dataset:
    """Same-expert rate of consecutive tokens per position bucket, dims ``(bucket, moe_layer)``
    (``(bucket,)`` with ``layer=``).

    Pairs (t-1, t): t the next token after t-1 in the same sequence, tokens ordered by position
    (as :func:`workbench.analysis.repetition_rate`: pairs never cross sequences; with a modality
    filter both tokens must have it). A pair belongs to the bucket of its LATER token t's
    position; P_b = ``n_pairs`` (dim bucket) pairs.

    - ``same_top1_rate`` = (1/P_b) sum_{pairs in b} 1[top1_{t-1} = top1_t] (top-1 = the slot with the
      largest ``topk_weight``, first on ties);
    - ``same_top1_baseline`` = sum_i g_{b,i}^2, g_b the top-1 shares of bucket b's selected tokens:
      the rate of two independent draws from the bucket's top-1 distribution;
    - ``overlap`` = (1/P_b) sum_{pairs in b} |S_{t-1} ∩ S_t| / k, ``overlap_baseline`` = k sum_i f_{b,i}^2.

    Rates NaN when P_b = 0, baselines NaN when T_b = 0. Buckets, coordinates, ``layer`` and
    ``modality`` as in :func:`load_by_position`.
    """
    who = "same_expert_rate_by_position"
    st = _Setup(ds, who, layer=layer, modality=modality, n_experts=n_experts, bucket=bucket, chunk_size=chunk_size)
    src, dst, hi = st.pairs()
    n = _accumulate(st, top1=True, pairs=(src, dst, hi, st.gid_all[dst]), pair_groups=st.B)
    out = _pair_vars(st, n, n["same"], n["inter"], n["npairs"], dim="bucket")
    out = out.assign_coords(st.coords(n["ntok"]))
    out.attrs.update(st.attrs(n_tokens=int(n["ntok"].sum()), n_pairs_total=int(n["npairs"].sum())))
    return st.finish(out)


def _pair_vars(st: _Setup, n: dict, same, inter, npairs, dim: str) -> xr.Dataset:
    k = st.k
    f = _shares(n["counts"], n["ntok"], k)
    g = C.safe_div(n["top1_counts"], n["ntok"][:, None, None])
    out = xr.Dataset({
        "same_top1_rate": ((dim, "moe_layer"), C.safe_div(same, npairs[:, None])),
        "same_top1_baseline": ((dim, "moe_layer"), (g ** 2).sum(axis=-1)),
        "overlap": ((dim, "moe_layer"), C.safe_div(inter, k * npairs[:, None])),
        "overlap_baseline": ((dim, "moe_layer"), k * (f ** 2).sum(axis=-1)),
        "n_pairs": ((dim,), npairs),
    })
    out["same_top1_rate"].attrs["definition"] = "(1/P_b) sum_{pairs (t-1, t), t in b} 1[top1_t-1 == top1_t]"
    out["same_top1_baseline"].attrs["definition"] = "sum_i g_bi^2, g_b = top-1 share of bucket b (independent draws)"
    out["overlap"].attrs["definition"] = "(1/P_b) sum_{pairs, t in b} |S_t-1 ∩ S_t| / k"
    out["overlap_baseline"].attrs["definition"] = "k sum_i f_bi^2 (independent draws)"
    return out


def by_chunk_offset(ds: xr.Dataset, *, chunk_size: int | None = None, bucket=DEFAULT_BUCKET, layer: int | None = None,
                    source: str | None = "auto", modality=None, n_experts: int | None = None) -> xr.Dataset:
    """Routing relative to the attention chunks of Llama 4's RoPE layers: the position statistics
    by offset within the chunk, and the jump at a chunk edge.

    c = ``chunk_size`` or the trace's ``attention_chunk_size`` (provenance ``model_config``, text
    part; ValueError if neither). Token t's offset is p_t mod c; ``bucket`` groups offsets (as
    positions in :func:`load_by_position`, edges capped at c; ``"log2"``: [0,1), [1,2), [2,4), ...,
    so offset 0, a chunk's first token, is a bucket of its own; ``bucket=1``: every offset).

    Per offset bucket (dims ``(bucket, moe_layer[, expert])``; coordinates ``offset_start``,
    ``offset_stop``, ``n_tokens``): ``load_share`` (:func:`load_by_position`), ``load_entropy``
    and ``mean_entropy`` (:func:`entropy_by_position`, with ``source``), ``same_top1_rate``,
    ``same_top1_baseline``, ``overlap``, ``overlap_baseline`` and ``n_pairs``
    (:func:`same_expert_rate_by_position`; a pair's bucket is its later token's offset).

    The jump at a chunk edge (dim ``pair_kind`` = ``["inside", "edge"]``): a pair (t-1, t) is an
    *edge* pair when it straddles a chunk boundary, p_{t-1} // c != p_t // c (for consecutive
    positions: p_t mod c = 0), else *inside*. ``jump_n_pairs`` (pair_kind) = P_inside, P_edge;
    ``jump_n_same_top1`` (pair_kind, moe_layer) = pairs with the same top-1;
    ``jump_same_top1_rate`` = their ratio; ``jump_overlap`` = mean |S ∩ S'| / k;
    ``jump_difference`` (moe_layer) = rate_edge - rate_inside (negative: routing changes more across
    an edge); ``jump_z`` (moe_layer) = the two-proportion z statistic
    (rate_edge - rate_inside) / sqrt(r (1 - r) (1/P_edge + 1/P_inside)), r the pooled rate
    (NaN when a count is 0 or r is 0 or 1). Pairs of one sequence are not independent draws:
    read |z| as a rough guide and the counts as the evidence.

    ``layer`` (decoder layer index) and ``modality`` as in :func:`load_by_position`.
    """
    who = "by_chunk_offset"
    st = _Setup(ds, who, layer=layer, modality=modality, n_experts=n_experts, bucket=bucket, chunk_size=chunk_size,
                offsets=True, need_chunk=True)
    c = st.chunk
    ent, why = _entropy_source(st, source)
    src, dst, hi = st.pairs()
    edge = (st.pos[src] // c != st.pos[dst] // c).astype(np.int64)
    bdst = st.gid_all[dst]
    pgid = np.where(bdst >= 0, bdst * 2 + edge, -1)
    n = _accumulate(st, top1=True, ent=ent, pairs=(src, dst, hi, pgid), pair_groups=2 * st.B)
    L = st.L
    same = n["same"].reshape(st.B, 2, L)
    inter = n["inter"].reshape(st.B, 2, L)
    npairs = n["npairs"].reshape(st.B, 2)
    out = _pair_vars(st, n, same.sum(1), inter.sum(1), npairs.sum(1), dim="bucket")
    out = out.merge(_entropy_vars(st, n, ent, why, dim="bucket"), combine_attrs="drop_conflicts")
    out["load_share"] = (("bucket", "moe_layer", "expert"), _shares(n["counts"], n["ntok"], st.k))
    out["load_share"].attrs["definition"] = "f_bi = (1/(k T_b)) sum_{t in b} 1[i in S_t]"
    # the jump at the chunk edge
    ks = same.sum(0)  # (2, L): inside, edge
    kn = npairs.sum(0)  # (2,)
    ki = inter.sum(0)
    rate = C.safe_div(ks, kn[:, None])
    pooled = C.safe_div(ks.sum(0), kn.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(pooled * (1 - pooled) * (1.0 / kn[1] + 1.0 / kn[0])) if kn.min() > 0 else np.full(L, np.nan)
        z = np.where((se > 0) & np.isfinite(se), (rate[1] - rate[0]) / np.where(se > 0, se, 1.0), np.nan)
    out["jump_n_pairs"] = (("pair_kind",), kn)
    out["jump_n_same_top1"] = (("pair_kind", "moe_layer"), ks)
    out["jump_same_top1_rate"] = (("pair_kind", "moe_layer"), rate)
    out["jump_overlap"] = (("pair_kind", "moe_layer"), C.safe_div(ki, st.k * kn[:, None]))
    out["jump_difference"] = (("moe_layer",), rate[1] - rate[0])
    out["jump_z"] = (("moe_layer",), z)
    out["jump_same_top1_rate"].attrs["definition"] = (
        "pairs (t-1, t) with the same top-1 / pairs; edge: p_t-1 // c != p_t // c, inside: same chunk")
    out["jump_difference"].attrs["definition"] = "rate_edge - rate_inside"
    out["jump_z"].attrs["definition"] = ("(rate_edge - rate_inside) / sqrt(r(1-r)(1/P_edge + 1/P_inside)), "
                                         "r pooled; pairs are not independent: a rough guide")
    out = out.assign_coords({**st.coords(n["ntok"]), "expert": np.arange(st.E), "pair_kind": ["inside", "edge"]})
    out.attrs.update(st.attrs(n_tokens=int(n["ntok"].sum()), n_pairs_total=int(npairs.sum())))
    return st.finish(out)
