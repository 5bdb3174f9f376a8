"""Constants of the trace schema ``workbench.trace/1`` (see ``workbench.store`` for the layout).

Kept free of heavy imports (no zarr, no torch) so that any module may import the names.
"""

from __future__ import annotations

SCHEMA = "workbench.trace/1"
SCHEMA_PREFIX = "workbench.trace/"

# modality codes of the `modality` variable
TEXT = 0
IMAGE_PATCH = 1
SPECIAL = 2
MODALITY_NAMES = {TEXT: "text", IMAGE_PATCH: "image_patch", SPECIAL: "special"}

# dimension names
TOKEN = "token"
MOE_LAYER = "moe_layer"
K = "k"
EXPERT = "expert"
BATCH = "batch"

# per-token variables: name -> (dims, dtype); dtype None = chosen at create time
TOKEN_VARIABLES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "token_id": ((TOKEN,), "int32"),
    "sequence": ((TOKEN,), "int32"),
    "position": ((TOKEN,), "int32"),
    "modality": ((TOKEN,), "int8"),
    "topk_expert": ((TOKEN, MOE_LAYER, K), "int16"),
    "topk_weight": ((TOKEN, MOE_LAYER, K), "float32"),
    "router_logits": ((TOKEN, MOE_LAYER, EXPERT), None),  # optional, float16 or float32
}

# per-batch variables (an addition of the store to the table in design.md; see workbench.store)
BATCH_VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "expert_load": ((BATCH, MOE_LAYER, EXPERT), "int32"),
    "batch_end": ((BATCH,), "int64"),
}

# coordinate of the moe_layer dimension: decoder layer index of each MoE layer
LAYER_COORD = "layer"

# child group that holds the vocabulary (when one was given at create time)
VOCAB_GROUP = "vocab"

LOGITS_DTYPES = ("float16", "float32")
