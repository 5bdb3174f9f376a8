"""Routing analyses on ``workbench.trace/2`` traces (schema and glossary: :mod:`workbench.trace.schema`;
v1 traces as :func:`workbench.trace.open_trace` presents them).

Every function takes an ``xarray.Dataset`` trace (in memory, or lazy/dask-backed as returned by
``xr.open_zarr``/``open_trace``) and streams it in token blocks, so traces larger than memory
work. Results are labelled xarray objects with dims ``moe_layer``/``expert``/... and the
``layer`` coordinate (decoder layer index) kept. Layer arguments (``layer`` of
:func:`coactivation`, ``a``/``b`` of :func:`layer_transitions`, ``layer`` of
:func:`expert_ablation`) are decoder layer indices; a decoder layer that is not a MoE layer raises
a ValueError naming the MoE layers, a non-integer a TypeError. ``modality=`` filters tokens
(a :class:`~workbench.trace.schema.Modality`, its name "text"/"image"/"special" or its code); the
load, imbalance and entropy functions also take ``by_modality=True`` (adds a ``modality`` dim,
the Modality codes 0/1/2). The number of experts comes from ``attrs['n_experts']`` or the
router_logits' expert dim; pass ``n_experts=`` otherwise.

Inside the experts (:mod:`workbench.analysis.paths`, :mod:`workbench.analysis.steering`): routing
paths (:func:`routing_paths`, :func:`path_entropy`, :func:`path_tokens`; ``layers=`` decoder
indices), steering (:func:`risk_difference` between two traces, :func:`top_experts`,
:func:`steering_effect` of interventions on a model) and causal vs observational importance
(:func:`expert_importance`).

Position-aware analyses (:mod:`workbench.analysis.position`, for long contexts):
:func:`load_by_position`, :func:`entropy_by_position` and :func:`same_expert_rate_by_position`
give the load, entropy and same-expert rate per position bucket (``bucket="log2"``, an int width,
``"chunk"`` or explicit edges; dim ``bucket``), and :func:`by_chunk_offset` the same statistics by
offset within Llama 4's attention chunks plus the same-expert rate of pairs that straddle a chunk
edge vs pairs inside one (``chunk_size=`` or the trace's ``attention_chunk_size``). Their
``layer=`` (a decoder layer index; None = every MoE layer) and ``modality=`` filter as above.
"""

from .ablation import expert_ablation
from .coactivation import coactivation
from .entropy import router_entropy
from .load import expert_load, load_imbalance
from .position import (
    by_chunk_offset,
    entropy_by_position,
    load_by_position,
    same_expert_rate_by_position,
)
from .routing_shift import routing_shift
from .paths import path_entropy, path_tokens, routing_paths, token_paths
from .saturation import saturation
from .specialization import domain_specialization, vocab_specialization
from .steering import expert_importance, risk_difference, spearman, steering_effect, top_experts
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
    "routing_shift",
    "expert_ablation",
    "load_by_position",
    "entropy_by_position",
    "same_expert_rate_by_position",
    "by_chunk_offset",
    "routing_paths",
    "path_entropy",
    "path_tokens",
    "token_paths",
    "risk_difference",
    "top_experts",
    "steering_effect",
    "expert_importance",
    "spearman",
]
