"""Routing analyses on ``workbench.trace/1`` datasets (see design.md, "Routing analyses").

Every function takes an ``xarray.Dataset`` trace (in memory, or lazy/dask-backed as returned by
``xr.open_zarr``/``open_trace``) and streams it in token blocks, so traces larger than memory
work. Results are labelled xarray objects with dims ``moe_layer``/``expert``/... and the
``layer`` coordinate (decoder layer index) kept. ``modality=`` filters tokens
("text"/"image"/"special"/int code); the load, imbalance and entropy functions also take
``by_modality=True`` (adds a ``modality`` dim, codes 0/1/2). The number of experts comes
from ``attrs['n_experts']`` or the router_logits' expert dim; pass ``n_experts=`` otherwise.
"""

from .ablation import expert_ablation
from .coactivation import coactivation
from .entropy import router_entropy
from .load import expert_load, load_imbalance
from .saturation import saturation
from .specialization import domain_specialization, vocab_specialization
from .transitions import layer_transitions, repetition_rate

__all__ = [
    "expert_load",
    "load_imbalance",
    "router_entropy",
    "coactivation",
    "repetition_rate",
    "layer_transitions",
    "vocab_specialization",
    "domain_specialization",
    "saturation",
    "expert_ablation",
]
