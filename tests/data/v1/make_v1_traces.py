"""Write small workbench.trace/1 stores with the v1 code (commit 1d8784b) for the v2 reader tests."""
import json, shutil, sys
from pathlib import Path
import numpy as np, torch
import workbench as wb
from workbench.embedded import EMBEDDED_MODEL, DATA_DIR
from workbench.hooks import Recorder
from workbench.store import TraceWriter

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = wb.load_model(EMBEDDED_MODEL, progress=False)
proc = wb.load_processor(EMBEDDED_MODEL)
items = [json.loads(l) for l in open(DATA_DIR / "prompts" / "demo.jsonl")]
pick = [items[0], items[5], items[9], items[12], items[13]]
prompts = []
for it in pick:
    prompts.append({"text": it["text"][:160] if not it["images"] else it["text"],
                    "images": [str((DATA_DIR / "prompts" / p).resolve()) for p in it["images"]]})
store = out / "v1_full.zarr"
if store.exists(): shutil.rmtree(store)
rec = Recorder(model, store, ("router", "logits", "attention"), processor=proc, attention_layers=[1, 3],
               attention_heads="all", attention_dtype="float16",
               provenance={"fixture": "workbench.trace/1 written by commit 1d8784b"})
with torch.no_grad():
    run = rec.run(model, proc, prompts, batch_size=2, progress=False)
rec.close()
print(run)
# an interrupted v1 store: two committed appends, then a third resized but never committed
store2 = out / "v1_interrupted.zarr"
if store2.exists(): shutil.rmtree(store2)
rec = Recorder(model, store2, ("router",), processor=proc)
with torch.no_grad():
    rec.run(model, proc, prompts[:3], batch_size=1, progress=False)
rec.close(complete=False)
import zarr
g = zarr.open_group(store2, mode="r+")
for name in ("token_id", "sequence", "position", "modality", "topk_expert", "topk_weight"):
    a = g[name]; n = a.shape[0]
    a.resize((n + 5,) + a.shape[1:])
    a[n:] = np.zeros((5,) + a.shape[1:], a.dtype) + 1
print(dict(zarr.open_group(store2, mode="r").attrs)["n_tokens"])
