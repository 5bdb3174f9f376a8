"""The trace schema ``workbench.trace/2``: everything a trace holds, defined in one place.

Kept free of heavy imports (no zarr, no torch) so that any module may import the names.

Glossary
--------
token
    One row of the token table: a real (non-padding) token of an input, in the order recorded.
sequence
    One input: a prompt (and, when generating, its continuation). Sequence numbers are handed
    out by the runner (``Recorder.run``: the prompt's index in the prompt set) or, for the rows
    of a bare forward pass, the next free numbers.
position
    Place of a token in its sequence, 0-based, as the model saw it (RoPE angle, NoPE temperature,
    attention chunk).
layer
    A decoder layer index, everywhere: function arguments, coordinates, widget controls.
moe_layer
    The dimension of the MoE layers: position among the MoE layers (0 .. L-1). Its coordinate
    ``layer`` holds each MoE layer's decoder index; select by decoder index with
    ``ds.isel(moe_layer=ds.layer.values.tolist().index(layer))``, or use the analyses' ``layer=``.
k
    A slot of a token's top-k set (dimension).
expert
    A routed expert index (dimension).
commit
    One durable write of the store: token rows ``[commit_end[c-1], commit_end[c])``. The unit of
    crash safety: a killed run leaves exactly its committed rows.
modality
    What a token is: :class:`Modality` (text, image patch, special).
capture
    What a recording stores beside the core columns (router decisions, router logits, attention
    maps, ...): a class in :mod:`workbench.hooks.captures` that declares its :class:`Variable` s.

Store layout (zarr v3 group; every array carries ``dimension_names``, so ``xr.open_zarr`` reads it)
---------------------------------------------------------------------------------------------
::

    run.zarr/
      zarr.json            root attributes (below), rewritten at every commit
      token_id             (token)                     int32    core
      sequence             (token)                     int32    core
      position             (token)                     int32    core
      modality             (token)                     int8     core: Modality codes
      commit_end           (commit)                    int64    core: token count after each commit
      layer                (moe_layer)                 int32    coordinate: decoder index of each MoE layer
      topk_expert          (token, moe_layer, k)       int16    capture "router"
      topk_weight          (token, moe_layer, k)       float32  capture "router": score as the model applies it
      expert_load          (commit, moe_layer, expert) int32    capture "router": top-k slots per expert, per commit
      router_logits        (token, moe_layer, expert)  float16|float32  capture "logits"
      <variables of other captures, as declared>
      vocab/               child group: utf8 (vocab_byte) uint8, offsets (vocab_entry) int64;
                           token i is utf8[offsets[i]:offsets[i+1]] (decoded text)
      attention/seq_NNNNNN child groups of the capture "attention" (see "Attention groups")
      .workbench.lock      present while a writer holds the store (not part of the zarr hierarchy)

Fill values: -1 for integers, NaN for floats; readers never show rows past the committed length.

Root attributes: ``schema``; ``complete`` (false until a clean close); ``n_tokens`` and
``n_commits`` (committed lengths, written after the data they cover); ``moe_layers``,
``n_experts``, ``top_k`` (the sizes of the routing dimensions); ``routing`` (how each MoE layer
routes, :func:`routing_description`); ``variables`` (every array's declaration, :class:`Variable`);
``captures`` (capture name -> its options); ``has_vocab``; ``provenance`` (model config,
checkpoint, dtype, device, command, versions of workbench/torch/zarr/..., ``created`` /
``updated`` timestamps, and whatever the caller adds).

Attention groups (capture "attention")
--------------------------------------
``attention/seq_NNNNNN`` holds, for sequence NNNNNN, the softmax probabilities from its text
queries to its image-patch keys: ``probs`` (layer, head, query, patch) float16|float32 with
coordinates ``layer`` (decoder index: ``att.sel(layer=3)`` is decoder layer 3), ``head`` (query
head; -1 when averaged, attribute ``head_mean``), ``query_token`` / ``patch_token`` (indices on the
token dimension), ``query_position``, and per patch ``image``, ``tile``, ``row``, ``col``. The group
attribute ``complete`` is written last; readers ignore groups without it.

Version 1 (``workbench.trace/1``, read by :func:`workbench.trace.open_trace`)
-----------------------------------------------------------------------------
v1 had no ``variables``/``captures``/``routing`` attributes (the arrays were fixed: the core
columns, ``topk_expert``, ``topk_weight``, optional ``router_logits``), called a write a *batch*
(dimension ``batch``, ``batch_end``, ``n_batches``, one ``expert_load`` row per append) and
recorded Llama 4 only. ``open_trace`` presents a v1 trace with the v2 names (``commit``,
``commit_end``, ``n_commits``) and the Llama 4 routing description.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

SCHEMA = "workbench.trace/2"
SCHEMA_V1 = "workbench.trace/1"
SCHEMA_PREFIX = "workbench.trace/"
READABLE_SCHEMAS = (SCHEMA_V1, SCHEMA)

# dimension names
TOKEN = "token"
MOE_LAYER = "moe_layer"
K = "k"
EXPERT = "expert"
COMMIT = "commit"

# coordinate of the moe_layer dimension: decoder layer index of each MoE layer
LAYER_COORD = "layer"
# child group that holds the vocabulary (when one was given at create time)
VOCAB_GROUP = "vocab"
# child groups of the attention capture (see "Attention groups" above)
ATTENTION_GROUP = "attention"
ATTENTION_SCHEMA = "workbench.attention/1"
ATTENTION_COORDS = ("layer", "head", "query_token", "query_position", "patch_token", "image", "tile", "row", "col")
ATTENTION_QUERIES = "non-padding, non-patch tokens (text and special) after the sequence's first patch token"


def attention_group(sequence: int) -> str:
    """The child group of one sequence's attention maps: ``attention/seq_000012``."""
    return f"{ATTENTION_GROUP}/seq_{int(sequence):06d}"

LOGITS_DTYPES = ("float16", "float32")


class Modality(enum.IntEnum):
    """What a token is (the ``modality`` variable)."""

    TEXT = 0
    IMAGE_PATCH = 1
    SPECIAL = 2  # bos/eos, chat headers, image delimiters, tile separators...

    @property
    def label(self) -> str:
        """Short name: "text", "image", "special"."""
        return {0: "text", 1: "image", 2: "special"}[int(self)]

    @classmethod
    def parse(cls, value: Any) -> "Modality":
        """A code (0/1/2) or a name ("text", "image", "image_patch", "patch", "special") -> Modality.

        Raises ValueError (unknown name or code) or TypeError (a bool or another type)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.lower()
            names = {"text": cls.TEXT, "image": cls.IMAGE_PATCH, "image_patch": cls.IMAGE_PATCH,
                     "patch": cls.IMAGE_PATCH, "special": cls.SPECIAL}
            if key not in names:
                raise ValueError(f"unknown modality {value!r}; use one of 'text', 'image', 'special' or a code "
                                 "(0 text, 1 image patch, 2 special)")
            return names[key]
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"modality must be a name or an int code, got {value!r}")
        try:
            return cls(int(value))
        except ValueError:
            raise ValueError(f"unknown modality code {value!r}; codes: 0 text, 1 image patch, 2 special") from None


# ---------------------------------------------------------------------------------------------
# Variables
# ---------------------------------------------------------------------------------------------
CODECS = ("int", "float", "sequential")  # blosc settings by kind of data, see workbench.trace.writer


@dataclass(frozen=True)
class Variable:
    """Declaration of one trace array: everything the writer and readers need to handle it.

    name: array name. dims: dimension names, the first ``token`` (one row per token) or
    ``commit`` (one row per commit). row_shape: sizes of the other dims. dtype: numpy dtype name.
    codec: ``"int"`` (small-range integers: bit-shuffle), ``"float"`` (byte shuffle) or
    ``"sequential"`` (runs of consecutive integers: byte shuffle). valid_range: (lo, hi) inclusive
    bounds that appended integer values must respect. reduce: for ``commit`` variables, how a row is
    computed from the commit's token rows: ``{"count": "<token variable>"}``: for a token
    variable X (token, A, S) of values in [0, N), row[a, v] = #{(t, s): X[t, a, s] == v} (shape
    (A, N)). chunk_rows: rows per chunk (default: >= the store's chunk size in bytes).
    capture: the capture that declared it (None: core). attrs: array attributes (e.g. long_name).
    """

    name: str
    dims: tuple[str, ...]
    row_shape: tuple[int, ...]
    dtype: str
    codec: str = "int"
    valid_range: tuple[int, int] | None = None
    reduce: dict | None = None
    chunk_rows: int | None = None
    capture: str | None = None
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "row_shape", tuple(int(x) for x in self.row_shape))
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"variable name must be a non-empty string, got {self.name!r}")
        if not self.dims or self.dims[0] not in (TOKEN, COMMIT):
            raise ValueError(f"variable {self.name!r}: the first dimension must be {TOKEN!r} or {COMMIT!r}, "
                             f"got dims {self.dims}")
        if len(self.dims) != len(self.row_shape) + 1:
            raise ValueError(f"variable {self.name!r}: dims {self.dims} need {len(self.dims) - 1} row sizes, "
                             f"got row_shape {self.row_shape}")
        if self.codec not in CODECS:
            raise ValueError(f"variable {self.name!r}: codec must be one of {CODECS}, got {self.codec!r}")
        if (self.reduce is not None) != (self.dims[0] == COMMIT):
            raise ValueError(f"variable {self.name!r}: commit variables need a reduce rule, token variables none")

    @property
    def per_commit(self) -> bool:
        return self.dims[0] == COMMIT

    def to_json(self) -> dict:
        d = asdict(self)
        d["dims"], d["row_shape"] = list(self.dims), list(self.row_shape)
        if self.valid_range is not None:
            d["valid_range"] = list(self.valid_range)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Variable":
        d = dict(d)
        if d.get("valid_range") is not None:
            d["valid_range"] = tuple(d["valid_range"])
        return cls(**d)


_I32 = 2**31 - 1

#: the columns every trace has, whatever it captures
CORE_VARIABLES = (
    Variable("token_id", (TOKEN,), (), "int32", valid_range=(0, _I32), attrs={"long_name": "token id"}),
    Variable("sequence", (TOKEN,), (), "int32", valid_range=(0, _I32),
             attrs={"long_name": "sequence (input) number"}),
    Variable("position", (TOKEN,), (), "int32", codec="sequential", valid_range=(0, _I32),
             attrs={"long_name": "position in the sequence"}),
    Variable("modality", (TOKEN,), (), "int8", valid_range=(0, int(max(Modality))),
             attrs={"long_name": "0 text, 1 image patch, 2 special"}),
)
COMMIT_END = "commit_end"  # (commit,) int64, written by the writer itself


def routing_variables(n_moe_layers: int, n_experts: int, top_k: int, *, capture: str = "router") -> list[Variable]:
    """The router decision arrays: ``topk_expert``, ``topk_weight`` and the per-commit ``expert_load``."""
    L, E, k = int(n_moe_layers), int(n_experts), int(top_k)
    return [
        Variable("topk_expert", (TOKEN, MOE_LAYER, K), (L, k), "int16", valid_range=(0, E - 1), capture=capture,
                 attrs={"long_name": "expert of each top-k slot"}),
        Variable("topk_weight", (TOKEN, MOE_LAYER, K), (L, k), "float32", codec="float", capture=capture,
                 attrs={"long_name": "router score of each top-k slot, as the model applies it"}),
        Variable("expert_load", (COMMIT, MOE_LAYER, EXPERT), (L, E), "int32", reduce={"count": "topk_expert"},
                 capture=capture, attrs={"long_name": "top-k slots routed to each expert, per commit"}),
    ]


def logits_variable(n_moe_layers: int, n_experts: int, dtype: str = "float16", *, capture: str = "logits") -> Variable:
    """The full router logits, (token, moe_layer, expert) in ``dtype`` (float16 or float32)."""
    if dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits dtype must be one of {LOGITS_DTYPES}, got {dtype!r}")
    return Variable("router_logits", (TOKEN, MOE_LAYER, EXPERT), (int(n_moe_layers), int(n_experts)), dtype,
                    codec="float", capture=capture, attrs={"long_name": "router logits, as top-k saw them"})


# ---------------------------------------------------------------------------------------------
# Routing description
# ---------------------------------------------------------------------------------------------
SCORES = ("sigmoid", "softmax")
WEIGHT_APPLIED_TO = ("input", "output")


@dataclass(frozen=True)
class MoELayerRouting:
    """How one MoE layer routes a token, as the model applies it.

    layer: decoder index. n_experts, top_k. score: the function turning router logits into the
    applied weights, ``"sigmoid"`` (of each chosen logit) or ``"softmax"`` (over all experts, then
    the top-k taken). renormalize: the chosen weights are divided by their sum. weight_applied_to:
    ``"input"`` (y = sum_k SwiGLU_e(w_k * x), Llama 4) or ``"output"`` (y = sum_k w_k SwiGLU_e(x)).
    shared_expert: a shared expert also processes every token.
    """

    layer: int
    n_experts: int
    top_k: int
    score: str = "sigmoid"
    renormalize: bool = False
    weight_applied_to: str = "input"
    shared_expert: bool = True

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"routing score must be one of {SCORES}, got {self.score!r}")
        if self.weight_applied_to not in WEIGHT_APPLIED_TO:
            raise ValueError(f"weight_applied_to must be one of {WEIGHT_APPLIED_TO}, got {self.weight_applied_to!r}")
        if not 1 <= int(self.top_k) <= int(self.n_experts):
            raise ValueError(f"layer {self.layer}: top_k {self.top_k} must lie in [1, n_experts={self.n_experts}]")


def routing_description(layers: Sequence[MoELayerRouting], rule: str = "") -> dict:
    """The ``routing`` root attribute: {"layers": [per MoE layer], "rule": text}."""
    return {"layers": [asdict(x) for x in layers], "rule": rule}


LLAMA4_RULE = ("logits = x W_r^T; top-k of the logits; weight = sigmoid(chosen logit), applied to the expert "
               "INPUT: y = shared(x) + sum_k SwiGLU_e(w_k * x)")


def v1_routing(moe_layers: Sequence[int], n_experts: int, top_k: int) -> dict:
    """The routing description of a v1 trace: v1 recorded Llama 4 models only."""
    return routing_description([MoELayerRouting(int(x), int(n_experts), int(top_k)) for x in moe_layers],
                               LLAMA4_RULE + " (v1 trace: inferred, v1 recorded Llama 4 only)")


def routing_layout(moe_layers: Sequence[int], n_experts: int, top_k: int, *, logits_dtype: str | None = None,
                   rule: str = LLAMA4_RULE) -> dict:
    """``TraceWriter.create`` arguments of a plain routing trace (what ``capture=("router",)``, or
    with ``logits_dtype`` ``("router", "logits")``, records from a Llama 4 model):
    ``TraceWriter.create(path, **routing_layout([1, 3], 16, 1))``."""
    L = len(moe_layers)
    variables = routing_variables(L, n_experts, top_k)
    captures: dict[str, dict] = {"router": {}}
    if logits_dtype is not None:
        variables.append(logits_variable(L, n_experts, logits_dtype))
        captures["logits"] = {"dtype": logits_dtype}
    return {"routing": [MoELayerRouting(int(x), int(n_experts), int(top_k)) for x in moe_layers],
            "variables": variables, "captures": captures, "routing_rule": rule}
