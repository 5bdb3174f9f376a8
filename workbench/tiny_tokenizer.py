"""Build a tiny, real, deterministic Llama 4 style tokenizer on disk.

Used to build the embedded default model's tokenizer and by the tests.

``make_llama4_tokenizer(dir_path, vocab_size=1024)`` writes

* ``tokenizer.json``          a byte-level BPE (``tokenizers`` format) with Llama 4's
                              pre-tokenizer regex, byte-level decoder and a post-processor that
                              prepends ``<|begin_of_text|>``;
* ``tokenizer_config.json``   what ``transformers.PreTrainedTokenizerFast`` needs
                              (bos / eos / pad tokens, ``model_max_length``);
* ``special_tokens_map.json``

and returns ``{special_token_string: id}``.

Determinism: the BPE merges are learned here, in plain Python, from the fixed corpus
``CORPUS`` embedded below (no dependency on the Python version, on ``tokenizers``' trainer or on
hash order); ties between equally frequent pairs are broken by the pair's text. The same
arguments therefore always give byte-identical files. Vocabulary layout: ids ``0..255`` are the
256 byte symbols (GPT-2 byte-to-unicode order), then the learned merges, then the special tokens
in ``LLAMA4_SPECIAL_TOKENS`` order, so ``vocab_size`` is the total size and the special tokens
take the last ids (as in Llama 4, where they start at 200000). The built-in corpus supports
``vocab_size`` from 275 (256 bytes + 19 special tokens) up to 1661; larger raises ValueError.

"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

__all__ = [
    "CORPUS",
    "LLAMA4_PRETOKENIZE_REGEX",
    "LLAMA4_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "make_llama4_tokenizer",
    "train_bpe",
]

# Llama 4's special tokens (a subset of the real 1135, in the real relative order).
LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|image|>",
    "<|patch|>",
)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot|>"
# Llama 4 pads with <|finetune_right_pad|> (pad_token_id 200018 in the released configs).
PAD_TOKEN = "<|finetune_right_pad|>"
DEFAULT_MODEL_MAX_LENGTH = 10485760  # Llama 4 Scout's tokenizer_config value

# The pre-tokenizer split of Llama 4's tokenizer.json (o200k style).
LLAMA4_PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Fixed training text. Do not edit: the shipped default model's tokenizer is derived from it.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a model
that reads pictures has to turn every image into words of its own. In this workbench an image is
cut into square tiles of 336 by 336 pixels; each tile is split into patches of 14 by 14 pixels,
and four neighbouring patches are folded into one token by a pixel shuffle. That gives 144 patch
tokens for every tile. When an image needs more than one tile, a small global thumbnail of the
whole picture is added at the end, so the model can see both the details and the overall scene.

What is in this image? There is a cat sitting on a red chair next to a window. The sky outside is
blue, with a few white clouds. On the table there are two cups of coffee, a plate of cookies and
an open book. The book is about the history of mathematics, from counting stones to computing
machines. Describe the picture in one sentence. Count the objects on the table. Which color is
the chair? Where is the cat looking? Is it day or night? How many clouds can you see?

A mixture of experts replaces one large feed forward layer with many smaller experts. For every
token a router computes a score for each expert, picks the best one, and sends the token there.
A shared expert sees every token. The router is a single linear layer without a bias; its logits
go through a sigmoid, and the chosen score scales the input of the expert. Load balancing asks
that every expert receives about the same number of tokens. We measure the load share of each
expert, the coefficient of variation, the maximum over the mean, the entropy of the router, how
often two experts are chosen together, and how often consecutive tokens go to the same expert.

Attention lets each token look at the tokens before it. Some layers use rotary position
embeddings and attend inside chunks of 8192 tokens; other layers use no position embedding at
all and attend globally, with a temperature that grows slowly with the position. Queries and keys
are normalized before the dot product. Grouped query attention shares each key and value head
between several query heads, which saves memory during generation.

Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they walked down to the harbour, pushed their little boat into the water and sailed
out past the lighthouse. The daughter knew the names of all the winds and all the stars. One day
a storm came from the north. The waves were higher than the houses, the rain was cold and the
thunder was loud. They found shelter on a tiny island, where they waited until the sun came back.
When they returned, the whole village was standing on the pier, waving and singing.

The weather today will be mostly sunny, with a high of 24 degrees and a low of 13 degrees. Light
winds from the west. Tomorrow: cloudy in the morning, showers in the afternoon. The weekend looks
warm and dry. Please remember to water the plants, close the windows and feed the cat.

def mean(values):
    \"\"\"Return the arithmetic mean of a non-empty sequence of numbers.\"\"\"
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


class Counter:
    \"\"\"Count how often each key was seen.\"\"\"

    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]

for i in range(10):
    print(i, i * i, mean([i, i + 1, i + 2]))

import torch
x = torch.randn(4, 16, dtype=torch.float32)
y = torch.nn.functional.softmax(x @ x.T, dim=-1)
print(y.shape, y.sum(dim=-1))

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096 8192 16384 65536
1000000 3.14159 2.71828 1.41421 0.5 0.25 0.125 2024 2025 1999 42 7 13 100 336 14 144 16

Questions and answers. Question: what is the capital of France? Answer: Paris. Question: how many
legs does a spider have? Answer: eight. Question: what do bees make? Answer: honey. Question: who
wrote the play about the prince of Denmark? Answer: William Shakespeare. Question: which planet is
closest to the sun? Answer: Mercury. Question: what is two plus two? Answer: four.

You are a helpful assistant. The user asks a question and you answer it as well as you can. If
you do not know the answer, say so. Keep answers short and clear. Use the tools when they help.
Thank you! You're welcome. I'm not sure, but I think it's correct. They'll arrive soon; we've
already started. She'd like tea, he'd like coffee. Don't worry, it isn't hard.

Sentences in other languages: Der schnelle braune Fuchs springt über den faulen Hund. Le renard
brun rapide saute par-dessus le chien paresseux. El veloz zorro marrón salta sobre el perro
perezoso. Il veloce volpe marrone salta sopra il cane pigro. Быстрая коричневая лиса прыгает
через ленивую собаку. 敏捷的棕色狐狸跳过了懒狗。 素早い茶色の狐がのろまな犬を飛び越える。

Punctuation and symbols: (a, b) [c; d] {e: f} <g/h> "quoted" 'single' a-b a_b a.b a/b a\\b
50% $10 #1 @user & | ^ ~ ` + - * = ! ? ... -- --- ::: => -> <= >= != == ** // %% @@ ## $$
email: someone@example.com, web: https://example.com/path?x=1&y=2, file: /tmp/data.txt
"""


# --------------------------------------------------------------------------------------------
# BPE training (pure Python, deterministic)
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _make_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(LLAMA4_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=8)
def train_bpe(n_merges: int, corpus: str = CORPUS) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Learn ``n_merges`` byte-level BPE merges from ``corpus``.

    Returns ``(tokens, merges)``: ``tokens`` are the 256 byte symbols followed by one new token per
    merge (so ``len(tokens) == 256 + n_merges``). Greedy: at each step the most frequent adjacent
    pair is merged; ties go to the lexicographically smallest ``(left, right)`` pair.
    Raises ``ValueError`` if the corpus runs out of pairs first.
    """
    byte_map = _bytes_to_unicode()
    pre = _make_pre_tokenizer()
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(corpus))

    word_syms: list[list[str]] = []
    word_freq: list[int] = []
    for w, f in sorted(words.items()):
        word_syms.append(list(w))
        word_freq.append(f)

    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    pair_where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, syms in enumerate(word_syms):
        for a, b in zip(syms, syms[1:]):
            pair_count[(a, b)] += word_freq[wi]
            pair_where[(a, b)].add(wi)

    tokens = [byte_map[b] for b in range(256)]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        best = None
        best_count = 0
        for pair, c in pair_count.items():
            if c <= 0:
                continue
            if c > best_count or (c == best_count and pair < best):
                best, best_count = pair, c
        if best is None:
            raise ValueError(
                f"the BPE corpus supports only {len(merges)} merges; asked for {n_merges} "
                f"(vocab_size too large for the built-in corpus)"
            )
        a, b = best
        new = a + b
        merges.append(best)
        if new not in known:
            tokens.append(new)
            known.add(new)
        else:  # pragma: no cover - cannot happen with byte-level symbols, kept for safety
            raise AssertionError(f"duplicate token {new!r}")
        for wi in sorted(pair_where.pop(best, ())):
            syms = word_syms[wi]
            f = word_freq[wi]
            for x, y in zip(syms, syms[1:]):
                pair_count[(x, y)] -= f
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            word_syms[wi] = out
            for x, y in zip(out, out[1:]):
                pair_count[(x, y)] += f
                pair_where[(x, y)].add(wi)
        pair_count.pop(best, None)
    return tuple(tokens), tuple(merges)


# --------------------------------------------------------------------------------------------
# Writing the tokenizer files
# --------------------------------------------------------------------------------------------


def _build_tokenizer(vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    n_special = len(LLAMA4_SPECIAL_TOKENS)
    n_bpe = vocab_size - n_special
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} special tokens)")
    tokens, merges = train_bpe(n_bpe - 256)
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=list(merges), ignore_merges=True, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = _make_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA4_SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    ids = {t: tok.token_to_id(t) for t in LLAMA4_SPECIAL_TOKENS}
    expected = list(range(n_bpe, vocab_size))
    if sorted(ids.values()) != expected or tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"unexpected special token ids {ids}")
    return tok, ids


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_llama4_tokenizer(
    dir_path: str | os.PathLike,
    vocab_size: int = 1024,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    padding_side: str | None = None,
) -> dict[str, int]:
    """Write a tiny Llama 4 tokenizer to ``dir_path`` (created if needed).

    Files: ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.
    ``vocab_size`` is the total vocabulary size (BPE tokens + the special tokens, which take the
    last ids). ``padding_side`` is written to tokenizer_config.json only when given (the released
    Llama 4 config has none, so the processor default, left, applies).
    Returns ``{special_token: id}`` for every token in ``LLAMA4_SPECIAL_TOKENS``.
    Deterministic: the same arguments always give byte-identical files.
    """
    d = Path(dir_path)
    d.mkdir(parents=True, exist_ok=True)
    tok, ids = _build_tokenizer(int(vocab_size))
    tmp = d / "tokenizer.json.tmp"
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, d / "tokenizer.json")

    added_tokens_decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if padding_side is not None:
        config["padding_side"] = padding_side
    _write_json(d / "tokenizer_config.json", config)
    _write_json(
        d / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    return dict(ids)
