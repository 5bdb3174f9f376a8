"""Write tests/data/v2/v2.zarr with the last code that wrote ``workbench.trace/2`` (commit 96b7638).

Run from a checkout of that commit: ``PYTHONPATH=<checkout> python tests/data/v2/make_v2_trace.py OUT``.
"""
import sys

import torch

import workbench as wb
from workbench.embedded import EMBEDDED_MODEL

PROMPTS = ["left 3 right", "the quick brown fox jumps over the lazy dog"]

model = wb.load_model(EMBEDDED_MODEL, progress=False)
proc = wb.load_processor(EMBEDDED_MODEL)
with torch.no_grad(), wb.record(model, sys.argv[1], capture={"router": {}, "logits": {"dtype": "float32"}},
                                processor=proc) as rec:
    rec.run(model, proc, PROMPTS, batch_size=2, progress=False)
