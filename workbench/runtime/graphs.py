"""A decode step captured once as a CUDA graph, then replayed per token.

A replay runs the recorded kernels only: no Python, no host checks. So the step must read
everything that changes from device tensors updated in place: the input ids (a buffer the caller
refills), and a :class:`~workbench.runtime.kv_cache.KVCache` made with ``static=True`` (fixed
shapes; its write positions come from device counters). The MoE layers must run without host
synchronization (the Triton expert kernels: bf16/fp16 on CUDA with triton installed)::

    cache = KVCache(model.text_config, B, max_len, block=T0, dtype=torch.bfloat16, device="cuda", static=True)
    model(input_ids=prompt, cache=cache, prefill_chunk=T0)          # prefill, eagerly
    ids = next_ids.clone()                                           # (B, 1) long, on the GPU
    graph, logits = capture_decode_step(model, cache, ids)
    for _ in range(n):
        graph.replay()                                               # logits (B, 1, vocab) refreshed
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))

Each replay advances the cache by one slot and checks nothing: the caller keeps the number of
replays within ``cache.max_len`` (``cache.length`` on the host does not move during replays).
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.runtime.kv_cache import KVCache

__all__ = ["capture_decode_step"]


def capture_decode_step(model: nn.Module, cache: KVCache, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """Capture one decode step of ``model`` (B new tokens, one per row) continuing ``cache``.

    input_ids: (B, 1) long CUDA tensor, the buffer each replay reads (refill it in place).
    attention_mask: (B, 1) (default: all real), read the same way. The step is first run once on
    a side stream (lazy allocations, kernel autotuning) from a saved cache state, which is then
    restored, so the cache is where it was when the graph is captured. Returns (graph, logits):
    ``logits`` (B, 1, vocab) is the buffer each ``graph.replay()`` overwrites.
    Raises ValueError for a cache without ``static=True`` or inputs not on a CUDA device.
    """
    if not cache.static:
        raise ValueError("capture_decode_step needs KVCache(static=True): a default cache writes to slots chosen "
                         "on the host, which every replay would reuse")
    if not input_ids.is_cuda or input_ids.shape != (cache.batch_size, 1):
        raise ValueError(f"input_ids must be a ({cache.batch_size}, 1) tensor on a CUDA device, got "
                         f"{tuple(input_ids.shape)} on {input_ids.device}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def step() -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits

    saved = _state(cache)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    _restore(cache, saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    _restore(cache, saved)  # the capture ran the host side once more (cache.length)
    return graph, logits


def _state(cache: KVCache) -> tuple:
    tensors = {id(t): t for c in cache.layers for t in (c.key, c.value, c.index, c.positions, c.valid)}
    tensors.update({id(cache.seen): cache.seen, id(cache.stream): cache.stream})
    return cache.length, {k: t.clone() for k, t in tensors.items()}, tensors


def _restore(cache: KVCache, saved: tuple) -> None:
    length, copies, tensors = saved
    for k, t in tensors.items():
        t.copy_(copies[k])
    cache.length = length
