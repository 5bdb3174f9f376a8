"""Write the notebooks from their cell sources (outputs stripped). Run: python notebooks/make_notebooks.py

Keeping the source here makes diffs readable; the .ipynb files are what users open.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
#: Where traces go: WB_RUNS, else the repository's runs/ (found from the kernel's working directory or
#: from the editable install), whatever directory the kernel was started in.
RUNS_SETUP = '''from pathlib import Path
_here = [Path.cwd().resolve(), *Path.cwd().resolve().parents, Path(wb.__file__).resolve().parents[1]]
ROOT = next((p for p in _here if (p / "notebooks" / "make_notebooks.py").is_file()), Path.cwd())
RUNS = os.environ.get("WB_RUNS") or str(ROOT / "runs")   # where traces go
print("traces under:", RUNS)'''
SETUP = '''import os, torch, warnings
import workbench as wb
from workbench.embedded import default_model_dir, demo_prompts
torch.set_grad_enabled(False)
''' + RUNS_SETUP + '''
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
        ("md", "## Record a forward pass\n`wb.record` adds the recorder's listeners to the model's hook points; every forward "
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
                 "load_imbalance(ds).to_dataframe().style.format(precision=3)"),
        ("md", "## Expert load at a glance\nShare of the routed tokens per expert (columns) and MoE layer (rows); the "
               "strip above the heatmap gives each expert its fixed color, the one every view uses."),
        ("code", "from workbench.export.figures import plot_load_heatmap\nplot_load_heatmap(ds)"),
        ("md", "## What next\n* **02_live_expert_load** - watch the load while a run streams, then filter it, read "
               "tokens colored by expert and the routing flow between layers.\n"
               "* **03_cross_modal_attention** - where a text token looks in an image.\n"
               "* **04_analyses_and_export** - the routing metrics, and figures / tables / a report for a paper.\n"
               "* **05_real_llama4_checkpoint** - the same on a real Scout or Maverick checkpoint."),
    ],
    "02_live_expert_load.ipynb": [
        ("md", "# Live expert-load dashboard\n\nThe dashboard watches a running `Recorder`: the MoE layer x "
               "expert heatmap and the imbalance panel refresh at least once a second (at most twice) while the "
               "prompts stream into the trace, and the status line shows the progress (tokens committed, tokens "
               "per second). The recorder commits every half second here (`commit_every_seconds=0.5`), and the "
               "dashboard redraws once per commit. Afterwards the same views open on the stored trace, lazily."),
        ("code", SETUP + "\nfrom IPython.display import display\n"
                 "from workbench.widgets import ExpertLoadDashboard, TokenRoutingView, RoutingFlow"),
        ("code", "model, proc = wb.load_model(MODEL), wb.load_processor(MODEL)\n"
                 "prompts = [p for p in demo_prompts() if not p['images']] * 4\n"
                 "store = f'{RUNS}/live.zarr'\n"
                 "rec = wb.record(model, store, processor=proc, overwrite=True, commit_every_seconds=0.5)\n"
                 "dash = ExpertLoadDashboard(rec)     # live mode: refreshes while the run streams\n"
                 "display(dash)"),
        ("code", "with rec:\n    summary = rec.run(model, proc, prompts, batch_size=2)\n"
                 "dash.stop()\nprint(summary['tokens'], 'tokens;', rec.loads().sum().item(), 'routed slots')"),
        ("md", "## The stored trace\nFilter by modality or sequence range; toggle count / share / deviation from uniform."),
        ("code", "ExpertLoadDashboard(store)"),
        ("code", "TokenRoutingView(store)   # tokens colored by top-1 expert; the key counts them; click the key to "
                 "highlight experts,\n                          # a token to pin its path"),
        ("code", "layers = wb.open_trace(store)['layer'].values\n"
                 "RoutingFlow(store, a=int(layers[0]), b=int(layers[-1]))"),
    ],
    "03_cross_modal_attention.ipynb": [
        ("md", "# Cross-modal attention on the digit images\n\nThe embedded model was trained on 2 x 2 grids of "
               "scikit-learn digits with captions such as \"top left 3, top right 7, bottom left 1, bottom right 0\". "
               "We record its attention from text queries to image-patch keys and check where the token that predicts "
               "each digit looks: it should be that digit's quadrant."),
        ("code", SETUP + "\nimport numpy as np\nfrom PIL import Image\nfrom IPython.display import display\n"
                 "from workbench.widgets import CrossModalAttentionView"),
        ("code", "model, proc = wb.load_model(MODEL), wb.load_processor(MODEL)\n"
                 "items = [p for p in demo_prompts() if p['images']]\n"
                 "assert items, 'this notebook needs the embedded multimodal model and its digit prompts'\n"
                 "item = items[0]\nimage = Image.open(item['images'][0]).convert('RGB')\n"
                 "print(item['text'])\nimage.resize((168, 168), Image.NEAREST)"),
        ("code", "batch = proc(text=[item['text']], images=[[image]])\n"
                 "store = f'{RUNS}/attention.zarr'\n"
                 "with wb.record(model, store, capture=('router', 'attention'), processor=proc, overwrite=True):\n"
                 "    model(**batch)\n"
                 "att = wb.open_attention(store, sequence=0)\natt"),
        ("md", "## Which quadrant does each digit's predicting token attend to?\nFor each digit of the caption, the "
               "token just before it (the one that predicts the digit) and the share of its head-mean attention on "
               "each quadrant of the image (quadrant of a patch from its (row, col) on the tile's token grid), per "
               "layer. Chance is 25%."),
        ("code", "import re, pandas as pd\n"
                 "ds = wb.open_trace(store, tokens=True)\n"
                 "text = [str(t) for t in ds['token_text'].values]\n"
                 "A = att.mean('head').values.astype(float)                # (layer, query, patch)\n"
                 "rows, cols = att['row'].values, att['col'].values\n"
                 "half = (rows.max() + 1) / 2\n"
                 "quadrant = (rows >= half) * 2 + (cols >= half)            # 0 TL, 1 TR, 2 BL, 3 BR\n"
                 "names = ['top left', 'top right', 'bottom left', 'bottom right']\n"
                 "caption = [(f'{m[1]} {m[2]}', m[3])                      # ('top left', '3'), ... in order\n"
                 "           for m in re.finditer(r'(top|bottom) (left|right) (\\d)', item['text'])]\n"
                 "q_tokens = att['query_token'].values\n"
                 "predicting = [qi for qi, t in enumerate(q_tokens[:-1]) if text[t + 1].strip().isdigit()]\n"
                 "def shares(layer_pos, qi):\n"
                 "    m = np.bincount(quadrant, weights=A[layer_pos, qi], minlength=4)\n"
                 "    return m / m.sum()\n"
                 "layers = [int(x) for x in att['layer'].values]\n"
                 "right = pd.DataFrame({f'L{l}': [shares(li, qi)[names.index(where)] for qi, (where, _) in "
                 "zip(predicting, caption)] for li, l in enumerate(layers)},\n"
                 "                     index=[f'{where} {digit}' for where, digit in caption])\n"
                 "right.style.format('{:.0%}').background_gradient(cmap='viridis', vmin=0, vmax=1)"),
        ("md", "## The layers that carry the signal\nA layer carries the signal when the predicting tokens put on "
               "average at least half of their image attention (twice chance) on the quadrant the caption names. "
               "The summary below averages over those layers only: averaging in a layer that attends almost "
               "uniformly (here, typically, the last one) would only dilute the answer."),
        ("code", "mean_right = right.mean()\n"
                 "signal = ([i for i, l in enumerate(layers) if mean_right[f'L{l}'] >= 0.5]\n"
                 "          or [int(np.argmax(mean_right.values))])         # none reaches 50%: the best one\n"
                 "print('mean share on the named quadrant per layer:',\n"
                 "      ', '.join(f'{k} {v:.0%}' for k, v in mean_right.items()))\n"
                 "print('layers carrying the signal:', ', '.join(f'L{layers[i]}' for i in signal), "
                 "'(>= 50% on the named quadrant; chance 25%)')\n"
                 "for qi, (where, digit) in zip(predicting, caption):\n"
                 "    m = np.mean([shares(li, qi) for li in signal], axis=0)\n"
                 "    print(f'before digit {digit} ({where:12s}): most attention on {names[int(m.argmax())]:12s}',\n"
                 "          np.round(m, 2))"),
        ("md", "## Interactive overlay\nThe view opens on the token before the first digit, at the layer where its "
               "attention is most peaked; the bars beside the picture give the share per quadrant. Query labels show "
               "each token in context (`left ␣ -> 3`: the word before, the token, the next token). Pick another "
               "token or layer; the heat map is drawn on the pixels of the picture you gave."),
        ("code", "view = CrossModalAttentionView(store, sequence=0, image=image, image_info=batch.images[0])\n"
                 "print('opens on', view.query_labels[view.w_query.value], 'at layer', view.layer)\nview"),
    ],
    "04_analyses_and_export.ipynb": [
        ("md", "# Routing analyses and paper export\n\nTrace the bundled prompts (prose, code, arithmetic), compute "
               "the routing metrics (definitions in each function's docstring) and export figures, tables and an "
               "HTML report for a paper."),
        ("code", SETUP),
        ("code", "model, proc = wb.load_model(MODEL), wb.load_processor(MODEL)\n"
                 "prompts = [p for p in demo_prompts() if not p['images']]\n"
                 "store = f'{RUNS}/analyses.zarr'\n"
                 "with wb.record(model, store, capture=('router', 'logits'), processor=proc, overwrite=True) as rec:\n"
                 "    summary = rec.run(model, proc, prompts, batch_size=4)\n"
                 "summary"),
        ("code", "from workbench import analysis as A\n"
                 "ds = wb.open_trace(store)\n"
                 "A.load_imbalance(ds).to_dataframe()"),
        ("code", "A.router_entropy(ds)['mean_entropy'].to_pandas()"),
        ("code", "A.repetition_rate(ds).to_dataframe()"),
        ("md", "## Routing by position\nDoes routing drift deep into the context, or jump at the edge of an attention "
               "chunk (Llama 4's RoPE layers attend within `attention_chunk_size` chunks)? Same-expert rate of "
               "consecutive tokens per log2 position bucket, then pairs inside a chunk vs pairs straddling a "
               "chunk edge (with their counts)."),
        ("code", "rate = A.same_expert_rate_by_position(ds)\n"
                 "rate['same_top1_rate'].to_pandas().assign(n_pairs=rate['n_pairs'].values)"),
        ("code", "jump = A.by_chunk_offset(ds)\n"
                 "print('chunk size', jump.attrs['chunk_size'], 'pairs (inside, edge):', jump['jump_n_pairs'].values)\n"
                 "jump['jump_same_top1_rate'].to_pandas()"),
        ("code", "layers = ds['layer'].values\n"
                 "(A.layer_transitions(ds, int(layers[0]), int(layers[-1])).to_pandas()\n"
                 " .style.format('{:.2f}').background_gradient(cmap='viridis', axis=None))"),
        ("code", "labels = {i: p['domain'] for i, p in enumerate(prompts)}\n"
                 "dom = A.domain_specialization(ds, labels)\n"
                 "dom['jsd_normalized'].to_pandas()"),
        ("md", "## Ablate experts\nMask experts at one MoE layer (router forced to the others) and measure the change in loss."),
        ("code", "batch = proc(text=[p['text'] for p in prompts], padding=True)\n"
                 "A.expert_ablation(model, batch, int(layers[0]), range(4)).to_dataframe()"),
        ("md", "## Export for the paper\nVector figures (PDF/SVG, fonts embedded) + PNG previews, CSV/LaTeX tables, "
               "NetCDF/Parquet subsets and a self-contained HTML report; every file carries provenance."),
        ("code", "from workbench.export import export_all\n"
                 "files = export_all(store, f'{RUNS}/paper', labels=labels, progress=False)\n"
                 "kinds = sorted({f.suffix for f in files})\n"
                 "print(len(files), 'files under', f'{RUNS}/paper', '-', ', '.join(kinds), '(report.html opens offline)')"),
        ("md", "### The key figures\nThe same figures as the exported PDF/SVG files, shown here."),
        ("code", "from IPython.display import display\n"
                 "from workbench.export import figures as F\n"
                 "for fig in (F.plot_load_heatmap(ds), F.plot_imbalance(ds), F.plot_token_routing(ds, 0, 64)):\n"
                 "    display(fig)"),
        ("md", "### Transitions between the first and last MoE layer\nP(expert at the last layer | expert at the first), "
               "as a heatmap (color scale from 0 to the largest probability)."),
        ("code", "F.plot_transitions(ds, int(layers[0]), int(layers[-1]))"),
        ("md", "### Tables\nThe per-layer metrics table the export writes as CSV and LaTeX."),
        ("code", "from workbench.export.tables import layer_metrics_table\n"
                 "t = layer_metrics_table(ds)\n"
                 "import pandas as pd\n"
                 "pd.DataFrame(t.rows, columns=[c.key for c in t.columns]).style.format(precision=3).hide(axis='index')"),
    ],
    "05_real_llama4_checkpoint.ipynb": [
        ("md", "# A real Llama 4 Scout / Maverick checkpoint\n\nSet `CHECKPOINT` (next cells) or `WB_CHECKPOINT` to an "
               "HF-format directory "
               "(e.g. a local copy of `meta-llama/Llama-4-Scout-17B-16E-Instruct`: `config.json`, sharded "
               "`model-*.safetensors` + `model.safetensors.index.json`, `tokenizer.json`). Without it this "
               "notebook runs on the embedded tiny model through exactly the same loading path.\n\n"
               "| model | parameters | bf16 weights | where it fits |\n|---|---|---|---|\n"
               "| Scout (16 experts) | 109B total / 17B active | ~218 GB | one host with >= 256 GB RAM (CPU, slow), "
               "or a GPU with that much memory; `load_model` places the whole model on one device |\n"
               "| Maverick (128 experts) | 400B / 17B | ~800 GB | CPU host with >= 1 TB RAM |\n\n"
               "Weights are read lazily from safetensors onto a meta-device model and materialized in place: "
               "peak host memory is about one copy of the weights. Recording costs little on top "
               "(router ids/weights per token; logits add 2 bytes x experts x MoE layers per token)."),
        ("md", "## Which checkpoint\nPut the directory of a real checkpoint in `CHECKPOINT` below (or set the "
               "`WB_CHECKPOINT` environment variable before starting JupyterLab). **Without one, this notebook runs on "
               "the embedded tiny model** and says so in capitals: its numbers then say nothing about Scout or "
               "Maverick."),
        ("code", SETUP + "\nCHECKPOINT = None   # <- e.g. '/data/Llama-4-Scout-17B-16E-Instruct' (HF format); None: "
                 "WB_CHECKPOINT, else the tiny model\n"
                 "CHECKPOINT = CHECKPOINT or os.environ.get('WB_CHECKPOINT')\n"
                 "if CHECKPOINT:\n"
                 "    print('checkpoint:', CHECKPOINT)\n"
                 "else:\n"
                 "    CHECKPOINT = MODEL\n"
                 "    warnings.warn('no checkpoint given: running on the embedded TINY model', stacklevel=1)\n"
                 "    print('=' * 78 + '\\nNO CHECKPOINT GIVEN - running on the embedded TINY model, not on Llama 4 '\n"
                 "          'Scout/Maverick:\\n  ' + MODEL +\n"
                 "          '\\nSet CHECKPOINT in this cell (or WB_CHECKPOINT) to a real '\n"
                 "          'checkpoint directory and run the notebook again.\\n' + '=' * 78)\n"
                 "DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'"),
        ("code", "from workbench.cli import describe_model\n"
                 "print(describe_model(wb.ModelConfig.from_pretrained(CHECKPOINT), CHECKPOINT))\n"
                 "print()\nprint(describe_model(wb.preset('scout'), 'released Scout configuration, for comparison'))"),
        ("code", "dtype = torch.bfloat16 if DEVICE == 'cuda' else None   # None: as stored\n"
                 "model = wb.load_model(CHECKPOINT, dtype=dtype, device=DEVICE)\n"
                 "proc = wb.load_processor(CHECKPOINT)"),
        ("code", "prompts = [p['text'] for p in demo_prompts() if not p['images']]\n"
                 "store = f'{RUNS}/real.zarr'\n"
                 "with wb.record(model, store, processor=proc, overwrite=True) as rec:\n"
                 "    print(rec.run(model, proc, prompts, batch_size=2))\n"
                 "from workbench.cli import describe_trace\nprint(describe_trace(__import__('pathlib').Path(store)))"),
    ],
}


def build() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbf.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(nb.cells):  # stable ids: rebuilding leaves unchanged notebooks unchanged
            cell.id = hashlib.sha1(f"{name}:{i}:{cell.source}".encode()).hexdigest()[:8]
        nbf.write(nb, HERE / name)


if __name__ == "__main__":
    build()
