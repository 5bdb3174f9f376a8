"""The forward contract: what one forward call is about, built once and handed to every layer.

A :class:`ForwardBatch` says, for the B x T tokens of one call, where each sits in its row's
stream (``index``: ``start + t``), its position in its sequence (``positions``) and whether it is
a real token (``valid``). Layers take ``(x, batch, cache)`` and ask the batch for what they need
(``batch.mask(chunk)``: the attention rule of :mod:`workbench.runtime.masks` as a dense mask;
``batch.derived(key, make)``: tensors computed once per call and shared by the layers, such as
RoPE rotations).

The same object describes a whole-sequence pass (``start=0``), a block of a long prefill, and a
decode step (``T = 1``, ``start`` = tokens already processed, keys coming from a cache as a
:class:`Keys`); the cache and the O(T) paths that use the latter two arrive with generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from workbench.runtime.masks import dense_mask

__all__ = ["ForwardBatch", "Keys"]


@dataclass(eq=False)
class Keys:
    """The keys a call's queries attend, when they are not just the call's own tokens (a cache).

    index (Tk,) or (B, Tk) int64 stream indices, positions (B, Tk) int64, valid (B, Tk) bool.
    all_allowed: True when the rule lets every query of the call attend every one of these keys
    (a decode step whose cache window is exactly its allowed keys): attention then needs no mask.
    """

    index: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    all_allowed: bool = False


@dataclass(eq=False)
class ForwardBatch:
    """Per-token metadata of one forward call.

    positions: (B, T) int64, the position of each token in its sequence (padding: 0).
    valid: (B, T) bool, False for padding.
    start: stream index of the call's first token in every row (tokens already processed before
        this call, e.g. held in a KV cache); 0 for a pass over whole sequences.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    start: int = 0
    _shared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, shape: tuple[int, int], device, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, *, start: int = 0,
              past_valid: torch.Tensor | None = None, index: torch.Tensor | None = None) -> "ForwardBatch":
        """Metadata for inputs of ``shape`` (B, T).

        attention_mask: (B, T), 1/True for real tokens (default: all real). position_ids: (B, T)
        (default: the count of real tokens before each token in its row, plus ``past_valid`` (B,)
        real tokens seen by earlier calls; padding gets 0). index: the (T,) stream indices as a device
        tensor (a static KV cache: ``start`` may then be a host copy that no kernel reads); default
        ``start + arange(T)``. Raises ValueError on mismatched shapes.
        """
        B, T = shape
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
        elif tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, inputs have (B, T)={(B, T)}")
        else:
            valid = attention_mask.bool()
        if position_ids is None and T == 1 and past_valid is not None:
            # a decode step: a real token's position is the count of real tokens before it
            position_ids = past_valid.to(device=device, dtype=torch.long).view(B, 1) * valid
        elif position_ids is None and attention_mask is None and past_valid is None:
            position_ids = torch.arange(T, device=device).repeat(B, 1)  # every token real: its index
        elif position_ids is None:
            # cumsum of a bool mask counts in int64; a padding token's count (-1 before the row's
            # first real token) is zeroed by the product, a real token's is >= 0
            count = valid.cumsum(-1) - 1
            if past_valid is not None:
                count = count + past_valid.to(count.device).long()[:, None]
            position_ids = count * valid
        elif tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, inputs have (B, T)={(B, T)}")
        fb = cls(positions=position_ids.long(), valid=valid, start=int(start))
        if index is not None:
            fb._shared["index"] = index
        return fb

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)

    @property
    def index(self) -> torch.Tensor:
        """(T,) int64 stream index of each of the call's tokens (the same in every row)."""
        return self.derived("index", lambda: torch.arange(self.start, self.start + self.shape[1],
                                                          device=self.positions.device))

    def keys(self) -> Keys:
        """The call's own tokens as keys (a pass without a cache)."""
        return Keys(self.index, self.positions, self.valid)

    def mask(self, chunk_size: int | None, keys: Keys | None = None) -> torch.Tensor:
        """(B, 1, T, Tk) bool: may each query attend each key (:mod:`workbench.runtime.masks`).

        keys: default the call's own tokens (the result is then built once per chunk size and
        call); chunk_size: the layer's ``attention_chunk_size`` on chunked layers, None on global.
        """
        if keys is not None:
            return dense_mask(self.index, self.positions, keys.index, keys.positions, keys.valid, chunk_size)
        unchunked = None if chunk_size is None else self.mask(None)  # shared by the chunked layers' masks
        return self.derived(("mask", chunk_size), lambda: dense_mask(
            self.index, self.positions, self.index, self.positions, self.valid, chunk_size, unchunked=unchunked))

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per call and key: tensors the layers share (masks, RoPE rotations)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]
