"""Analyses of the v1 fixture stores computed by the v1 code (commit 1d8784b): the reference."""
import sys
from pathlib import Path
import xarray as xr
import workbench as wb
from workbench import analysis as A
from workbench.hooks.attention import open_attention, attention_sequences

d = Path(sys.argv[1])
ds = wb.open_trace(d / "v1_full.zarr")
res = {
    "expert_load": A.expert_load(ds).to_dataset(name="v"),
    "expert_load_by_modality": A.expert_load(ds, by_modality=True).to_dataset(name="v"),
    "expert_load_counts": A.expert_load(ds, normalize=False).to_dataset(name="v"),
    "load_imbalance": A.load_imbalance(ds),
    "router_entropy_logits": A.router_entropy(ds, source="logits"),
    "router_entropy_by_modality": A.router_entropy(ds, source="logits", by_modality=True),
    "coactivation": A.coactivation(ds, 3).to_dataset(name="v"),
    "repetition_rate": A.repetition_rate(ds),
    "layer_transitions": A.layer_transitions(ds, 0, 3).to_dataset(name="v"),
    "vocab_specialization": A.vocab_specialization(ds, min_count=2),
    "domain_specialization": A.domain_specialization(ds, {0: "prose", 1: "code", 2: "math", 3: "image", 4: "image"}),
    "saturation": A.saturation(ds, ds),
    "interrupted_load": A.expert_load(wb.open_trace(d / "v1_interrupted.zarr"), normalize=False).to_dataset(name="v"),
}
for s in attention_sequences(d / "v1_full.zarr"):
    res[f"attention_{s}"] = open_attention(d / "v1_full.zarr", s).to_dataset(name="v")
out = d / "v1_expected.nc"
if out.exists(): out.unlink()
for i, (name, r) in enumerate(res.items()):
    r = r.copy()
    for k in list(r.attrs):
        if type(r.attrs[k]) not in (str, int, float):
            r.attrs[k] = str(r.attrs[k])
    for v in r.variables.values():
        for k in list(v.attrs):
            if type(v.attrs[k]) not in (str, int, float):
                v.attrs[k] = str(v.attrs[k])
        if v.dtype == bool: pass
    r.load().to_netcdf(out, group=name, mode="w" if i == 0 else "a", engine="h5netcdf")
print(sorted(res), out.stat().st_size)
