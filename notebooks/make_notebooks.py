"""Write the notebooks from their cell sources (outputs stripped). Run: python notebooks/make_notebooks.py

Keeping the source here makes diffs readable; the .ipynb files are what users open.
"""
from __future__ import annotations

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = '''import os, torch, warnings
import workbench as wb
from workbench.embedded import default_model_dir, demo_prompts
torch.set_grad_enabled(False)
RUNS = os.environ.get("WB_RUNS", "runs")          # where traces go
MODEL = os.environ.get("WB_MODEL") or str(default_model_dir(f"{RUNS}/random-tiny-llama4"))
print("model:", MODEL)'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# MoE Workbench quick start\n\nLoad a Llama 4 checkpoint (the embedded tiny model by default; set "
               "`WB_MODEL` to a real Scout/Maverick directory), run prompts through it while recording every "
               "token's router decisions, and open the trace as a lazy xarray Dataset."),
        ("code", SETUP),
        ("code", "from workbench.cli import describe_model\nmodel = wb.load_model(MODEL)\nproc = wb.load_processor(MODEL)\n"
                 "print(describe_model(model.config if hasattr(model.config, 'text') else wb.ModelConfig.from_pretrained(MODEL)))"),
        ("md", "## Record a forward pass\n`wb.record` attaches the recorder to the model's tap points; every forward "
               "pass inside the block streams into the zarr store."),
        ("code", "prompts = [p['text'] for p in demo_prompts() if not p['images']][:4]\n"
                 "batch = proc(text=prompts, padding=True)\n"
                 "with wb.record(model, f'{RUNS}/quickstart.zarr', capture=('router', 'logits'), processor=proc, overwrite=True) as rec:\n"
                 "    out = model(**batch)\n"
                 "print(out.logits.shape, rec.n_tokens, 'tokens recorded')"),
        ("code", "ds = wb.open_trace(f'{RUNS}/quickstart.zarr', tokens=True)\nds"),
        ("md", "## Which experts did each token use?"),
        ("code", "first = ds.isel(token=slice(0, 12))\n"
                 "for t in range(first.sizes['token']):\n"
                 "    print(repr(str(first['token_text'][t].values)).ljust(14), first['topk_expert'][t, :, 0].values)"),
        ("code", "from workbench.analysis import expert_load, load_imbalance\n"
                 "print(expert_load(ds).round(3).to_pandas())\n"
                 "load_imbalance(ds)"),
    ],
}


def build() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbf.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        nbf.write(nb, HERE / name)


if __name__ == "__main__":
    build()
