"""Generation with a KV cache, recorded token by token: ``wb.generate``.

A batch of prompts (text, or text with images) is left-padded, prefilled in blocks into a static
:class:`~workbench.runtime.kv_cache.KVCache`, then decoded one token per step. With a recorder,
every pass is recorded into the prompt's own trace sequence: the prompt's tokens with
``generated = 0``, each generated token with ``generated = 1`` at the position that follows, so
that a trace of a generation is the trace of one forward pass over prompt + answer. To record the
routing of every generated token, the last one is run through the model too (one extra step,
only when recording; transformers' ``generate`` never runs its last token).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from workbench.runtime.kv_cache import KVCache
from workbench.runtime.memory import check_context, check_fits, generation_bytes

__all__ = ["generate", "check_generation", "Generation"]


@dataclass
class Generation:
    """One prompt's answer.

    text: the decoded answer (special tokens dropped; cut before a stop string). token_ids: the
    generated ids, the stop token included. finish_reason: "eos" (an end-of-sequence token),
    "stop" (a stop string or id), "length" (``max_new_tokens`` reached). sequence: its trace
    sequence number when recorded, else None. prompt_tokens: real (non-padding) prompt tokens.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    sequence: int | None = None
    images: list = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "sequence": self.sequence, "images": [str(i) for i in self.images if isinstance(i, (str, Path))]}


def generate(model: nn.Module, processor, prompts: str | dict | Iterable, max_new_tokens: int = 32, *,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | int | Sequence[str | int] | None = None, recorder=None, batch_size: int = 8,
             prefill_chunk: int | None = None, progress: bool = False) -> list[Generation]:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    prompts: a string, a dict {"text": str, "images": [PIL image | path, ...]}, or a list of them.
    Greedy by default (``do_sample=False``: argmax, the same ids as transformers' greedy
    ``generate``); sampling divides the logits by ``temperature`` and keeps the smallest set of
    tokens whose probability reaches ``top_p``; ``seed`` makes it reproducible (without one, a fresh
    seed; under tensor parallelism rank 0's, so every rank picks the same tokens). Each row stops at
    an end-of-sequence id of the model config, at a ``stop`` string (the text is cut before it)
    or token id, or after ``max_new_tokens``. recorder: a :class:`~workbench.hooks.Recorder` of
    this model; each prompt becomes one trace sequence (see the module docstring). batch_size:
    prompts per batch (left-padded). Returns one :class:`Generation` per prompt, in order.

    The passes run under ``torch.inference_mode`` (faster than ``no_grad`` on small models):
    tensors a hook listener keeps are inference tensors; ``clone()`` one after the call to modify
    it in place or use it with autograd (e.g. to train a probe on captured activations).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not hasattr(model, "prefill_chunk") or not hasattr(model, "text_config"):
        raise ValueError(f"wb.generate runs workbench's Llama 4 models, not {type(model).__name__}; for a "
                         "transformers model call its own generate() inside wb.record(...) (decode steps are "
                         "recorded in their sequences)")
    if recorder is not None and recorder.model is not model:
        raise ValueError("generate: the recorder records another model")
    items = _as_prompts(prompts)
    _check_batches(model, processor, items, max_new_tokens, batch_size, prefill_chunk, None)
    stop_ids, stop_texts = _stops(model, stop)
    device = next(model.parameters()).device
    gen = None
    if do_sample:
        from workbench.runtime.parallel import tp_of

        gen = torch.Generator(device=device)
        seed_given = seed is not None
        mine = seed if seed_given else gen.seed()  # a fresh seed for this generator only (not the global RNG)
        seed, tp = mine, tp_of(model)
        if tp is not None:
            # every rank must pick the same tokens (each embeds its pick and the embedding's all-reduce
            # would add different rows): rank 0's seed everywhere; the logits are equal on all ranks
            seed = tp.broadcast_object(mine)
            if seed_given and seed != mine:
                warnings.warn(f"generate: rank {tp.rank} samples with rank 0's seed {seed}, not its own {mine}",
                              stacklevel=2)
        gen.manual_seed(seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items) * max_new_tokens, desc="generate", unit="tok", disable=not progress)
    out: list[Generation] = []
    t0, n_new = time.perf_counter(), 0
    if recorder is not None:
        recorder.attach()
    try:
        # inference mode, not just no_grad: no version counters or view tracking on each op, which
        # on CPU is ~10-20% of a small model's decode step (benchmarks/RESULTS.md, "Inference mode")
        with torch.inference_mode():
            for b0 in range(0, len(items), batch_size):
                chunk = items[b0:b0 + batch_size]
                got = _generate_batch(model, processor, chunk, max_new_tokens, do_sample, temperature, top_p, gen,
                                      stop_ids, stop_texts, recorder, prefill_chunk, bar)
                out.extend(got)
                n_new += sum(len(g.token_ids) for g in got)
                bar.set_postfix(tok_s=f"{n_new / max(time.perf_counter() - t0, 1e-9):,.1f}")
        if recorder is not None:
            recorder.flush()
    finally:
        bar.close()
    return out


def check_generation(model: nn.Module, processor, prompts: str | dict | Iterable, max_new_tokens: int, *,
                     batch_size: int = 8, prefill_chunk: int | None = None,
                     names: Sequence[str] | None = None, memory_hint: str | None = None) -> None:
    """Raise before any work when :func:`generate` could not run these prompts to ``max_new_tokens``.

    Each batch of ``batch_size`` prompts is encoded as ``generate`` encodes it (left-padded to its
    longest prompt, images expanded): ContextLengthError (a ValueError) when that length plus
    ``max_new_tokens`` exceeds the model's ``max_position_embeddings``; InsufficientMemoryError
    when its KV cache and prefill (:func:`~workbench.runtime.memory.generation_bytes`) need more
    memory than is free on the model's device; the processor's own error for a prompt it cannot
    encode. names: how messages call each prompt (default "prompt <index>"; the CLI passes
    "FILE:LINE"); memory_hint: what the memory error suggests changing (the CLI names its flags).
    ``generate`` runs this first; run it yourself to fail before, e.g., creating a trace store.
    """
    _check_batches(model, processor, _as_prompts(prompts), max_new_tokens, batch_size, prefill_chunk, names,
                   memory_hint)


def _check_batches(model, processor, items, max_new_tokens, batch_size, prefill_chunk, names,
                   memory_hint=None) -> None:
    config = model.text_config
    param = next(model.parameters())
    for b0 in range(0, len(items), batch_size):
        chunk = items[b0:b0 + batch_size]
        mask = _encode(processor, chunk)["attention_mask"]
        B, T0 = mask.shape
        longest = b0 + int(mask.sum(-1).argmax())
        name = names[longest] if names is not None else f"prompt {longest}"
        what = f"{name} ({T0:,} tokens" + (", the longest of its batch" if B > 1 else "") + \
            f") with {max_new_tokens:,} new tokens"
        check_context(T0 + max_new_tokens, config, what)
        block = max(1, min(T0, prefill_chunk or getattr(model, "prefill_chunk", T0)))
        check_fits(generation_bytes(config, B, T0, max_new_tokens, block, param.dtype), param.device,
                   f"generating for {what} in a batch of {B}",
                   hint=memory_hint or "fewer new tokens, a smaller batch_size, or shorter prompts")


def _encode(processor, items: list[dict]):
    """A batch of prompts as ``generate`` feeds it: left-padded ids and mask (+ pixel values)."""
    kw: dict[str, Any] = dict(text=[it["text"] for it in items], padding=True, padding_side="left",
                              return_tensors="pt")
    if any(it["images"] for it in items):
        kw["images"] = [it["images"] for it in items]
    return processor(**kw)


def _generate_batch(model, processor, items, max_new_tokens, do_sample, temperature, top_p, gen, stop_ids,
                    stop_texts, recorder, prefill_chunk, bar) -> list[Generation]:
    enc = _encode(processor, items)
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    pixels = enc.get("pixel_values") if hasattr(enc, "get") else None
    B, T0 = ids.shape
    config = model.text_config
    dtype = next(model.parameters()).dtype
    block = min(T0, prefill_chunk or getattr(model, "prefill_chunk", T0))
    cache = KVCache(config, B, T0 + max_new_tokens, block=max(block, 1), dtype=dtype, device=device)
    seqs = recorder.new_sequences(B) if recorder is not None else None
    if recorder is not None:
        recorder._note_images([{"index": int(s), "images": it["images"]} for s, it in zip(seqs, items)],
                              getattr(enc, "images", None))

    def step(generated: bool, **inputs):
        ctx = recorder.sequences(seqs, generated=generated) if recorder is not None else contextlib.nullcontext()
        with ctx:
            logits = model(**inputs, cache=cache, prefill_chunk=block, logits_to_keep=1).logits[:, -1]
        return _pick(logits, do_sample, temperature, top_p, gen)

    inputs = {"input_ids": ids, "attention_mask": mask}
    if pixels is not None:
        inputs["pixel_values"] = pixels.to(device)
    nxt = step(False, **inputs)
    answers: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    texts: list[str | None] = [None] * B
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    all_real = torch.ones(B, 1, dtype=mask.dtype, device=device)
    with _decode_threads(config, B, device):
        while True:
            toks = nxt.tolist()  # the one host sync per step: stopping is decided on the host
            feed = [False] * B  # rows whose newest token goes through the model next
            for b in range(B):
                if reasons[b] is not None:
                    continue
                answers[b].append(toks[b])
                bar.update(1)
                feed[b] = True
                if toks[b] in stop_ids["eos"]:
                    reasons[b] = "eos"
                elif toks[b] in stop_ids["stop"]:
                    reasons[b] = "stop"
                elif stop_texts:
                    text = processor.decode(answers[b], skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stop_texts) if i >= 0), default=-1)
                    if cut >= 0:
                        reasons[b], texts[b] = "stop", text[:cut]
                if reasons[b] is None and len(answers[b]) >= max_new_tokens:
                    reasons[b] = "length"
                if reasons[b] is not None and recorder is None:
                    feed[b] = False  # its last token is run only to record its routing
            if not any(feed):
                break
            if all(feed):  # every row goes on: the picked ids as they are, no host-built tensors
                step_ids, step_mask = nxt[:, None], all_real
            else:
                step_ids = torch.tensor([[toks[b] if feed[b] else pad] for b in range(B)], device=device)
                step_mask = torch.tensor([[int(f)] for f in feed], device=device)
            nxt = step(True, input_ids=step_ids, attention_mask=step_mask)
            if all(r is not None for r in reasons):
                break  # that step only recorded the last tokens
    real = mask.sum(-1).tolist()
    out = []
    for b, it in enumerate(items):
        text = texts[b] if texts[b] is not None else processor.decode(answers[b], skip_special_tokens=True)
        out.append(Generation(prompt=it["text"], text=text, token_ids=answers[b], finish_reason=reasons[b],
                              prompt_tokens=int(real[b]), sequence=None if seqs is None else int(seqs[b]),
                              images=list(it["images"])))
    return out


# A CPU decode step with at most this many multiply-adds (rows x weights used per token) runs on
# one thread: its ops are too small for a second thread to pay (benchmarks/RESULTS.md, "Decode"),
# and every parallel region waits for all threads, which collapses when another job holds a core
# (a 2-thread decode step of the embedded model: 2.5 ms alone, ~50 ms beside a busy process).
SINGLE_THREAD_DECODE_MACS = 1 << 25


def active_macs(config) -> int:
    """Multiply-adds per token of a decode step (TextConfig): attention projections, the routed
    experts actually run (top-k), shared experts, dense MLPs, router and LM head; attention over
    the cache and elementwise work not counted."""
    H, D = config.hidden_size, config.head_dim
    attn = H * D * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    total = config.vocab_size * H
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            ffn = 3 * H * config.intermediate_size * (config.num_experts_per_tok + 1) + H * config.num_local_experts
        else:
            ffn = 3 * H * config.intermediate_size_mlp
        total += attn + ffn
    return total


@contextlib.contextmanager
def _decode_threads(config, rows: int, device: torch.device):
    """One torch thread for the decode steps of a small model on CPU (SINGLE_THREAD_DECODE_MACS);
    the caller's thread count is restored afterwards. The prefill keeps every thread."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or rows * active_macs(config) > SINGLE_THREAD_DECODE_MACS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """(B, vocab) logits -> (B,) next ids: argmax, or a sample (temperature, nucleus top_p)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token when the mass before it is below top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _stops(model, stop) -> tuple[dict[str, set[int]], list[str]]:
    eos = model.text_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    ids, texts = set(), []
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, (str, int)):
            raise ValueError(f"stop entries must be strings or token ids, got {s!r}")
        if isinstance(s, int):
            ids.add(s)
        elif s:
            texts.append(s)
    return {"eos": {int(i) for i in eos_ids}, "stop": ids}, texts


def _as_prompts(prompts) -> list[dict[str, Any]]:
    return [_as_prompt(p, i) for i, p in enumerate([prompts] if isinstance(prompts, (str, dict)) else list(prompts))]


def _as_prompt(x, i: int) -> dict[str, Any]:
    if isinstance(x, str):
        return {"index": i, "text": x, "images": []}
    if isinstance(x, dict) and isinstance(x.get("text"), str):  # no "text" is a mistake, not an empty prompt
        return {"index": i, "text": x["text"], "images": list(x.get("images") or [])}
    raise ValueError(f"prompt {i}: expected a string or a dict with a string 'text' (and 'images'), "
                     f"got {type(x).__name__}")
