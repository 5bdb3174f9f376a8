"""Router saturation: agreement of routing between two traces of the same inputs."""

from __future__ import annotations

import numpy as np
import xarray as xr

from . import _common as C


def saturation(ds_a: xr.Dataset, ds_b: xr.Dataset, *, modality=None, n_experts: int | None = None) -> xr.Dataset:
    """Per-layer agreement of two traces recorded on the same inputs (e.g. two checkpoints).

    Requires the same ``token_id`` sequence (same length and values, row by row), the same k and
    the same MoE layers (``layer`` coordinate); raises a ValueError naming the first mismatch
    otherwise. Over the selected tokens (modality filter taken from ``ds_a``), T tokens:

    - ``overlap`` = (1/T) sum_t |S_t^a ∩ S_t^b| / k
    - ``top1_agreement`` = (1/T) sum_t 1[top1_t^a = top1_t^b], top-1 = the slot with the largest
      ``topk_weight`` (first slot on ties).

    For k = 1 both are the same number. NaN when T = 0.
    """
    who = "saturation"
    code = C.resolve_modality(modality, who)
    for name, d in (("ds_a", ds_a), ("ds_b", ds_b)):
        C.require(d, "topk_expert", "token_id", who=f"{who} ({name})")
    Ea = C.get_n_experts(ds_a, n_experts, who)
    Eb = C.get_n_experts(ds_b, n_experts, who)
    if Ea != Eb:
        raise ValueError(f"{who}: the traces have different expert counts: {Ea} vs {Eb}")
    E = Ea
    na, nb = ds_a.sizes["token"], ds_b.sizes["token"]
    if na != nb:
        raise ValueError(f"{who}: the traces cover different inputs: {na} tokens in ds_a vs {nb} in ds_b")
    ka, kb = ds_a.sizes["k"], ds_b.sizes["k"]
    if ka != kb:
        raise ValueError(f"{who}: the traces have different top-k: k={ka} in ds_a vs k={kb} in ds_b")
    k = ka
    la = np.asarray(ds_a["layer"].values) if "layer" in ds_a.coords else np.arange(ds_a.sizes["moe_layer"])
    lb = np.asarray(ds_b["layer"].values) if "layer" in ds_b.coords else np.arange(ds_b.sizes["moe_layer"])
    if la.shape != lb.shape or not np.array_equal(la, lb):
        raise ValueError(f"{who}: the traces have different MoE layers: {la.tolist()} vs {lb.tolist()}")
    ta, tb = C.load_column(ds_a, "token_id"), C.load_column(ds_b, "token_id")
    diff = np.flatnonzero(ta != tb)
    if diff.size:
        i = int(diff[0])
        raise ValueError(
            f"{who}: the traces are not on the same inputs: token_id differs at token {i} "
            f"({int(ta[i])} vs {int(tb[i])}; {diff.size} tokens differ)"
        )
    ok = None
    if code is not None:
        C.require(ds_a, "modality", who=who)
        ok = C.load_column(ds_a, "modality") == code
    L = la.shape[0]
    names = ["topk_expert"] + (["topk_weight"] if k > 1 else [])
    slices = C.token_blocks(ds_a, names)
    inter = np.zeros(L, dtype=np.int64)
    agree = np.zeros(L, dtype=np.int64)
    T = 0
    for (sl, a), (_, b) in zip(C.iter_blocks(ds_a, names, slices), C.iter_blocks(ds_b, names, slices)):
        ea = C.check_experts(a["topk_expert"], E, sl.start, f"{who} (ds_a)")
        eb = C.check_experts(b["topk_expert"], E, sl.start, f"{who} (ds_b)")
        t1a, t1b = C.top1(ea, a.get("topk_weight")), C.top1(eb, b.get("topk_weight"))
        if ok is not None:
            m = ok[sl]
            ea, eb, t1a, t1b = ea[m], eb[m], t1a[m], t1b[m]
        for x in range(k):
            for y in range(k):
                inter += (ea[..., x] == eb[..., y]).sum(axis=0)
        agree += (t1a == t1b).sum(axis=0)
        T += ea.shape[0]
    coords = {"layer": ("moe_layer", la)} if "layer" in ds_a.coords else {}
    out = xr.Dataset(
        {"overlap": (("moe_layer",), C.safe_div(inter, k * T)),
         "top1_agreement": (("moe_layer",), C.safe_div(agree, T))},
        coords=coords,
    )
    out["overlap"].attrs["definition"] = "(1/T) sum_t |S_t^a ∩ S_t^b| / k"
    out["top1_agreement"].attrs["definition"] = "(1/T) sum_t 1[top1_t^a == top1_t^b]"
    out.attrs.update({"k": k, "n_experts": E, "n_tokens": int(T), "modality_filter": C.modality_attr(code)})
    return out
