"""Test support: the tiny tokenizer (from the package) and a matching transformers processor."""
from __future__ import annotations

import os

from workbench.tiny_tokenizer import *  # noqa: F401,F403  (re-export for the tests)
from workbench.tiny_tokenizer import make_llama4_tokenizer


def save_transformers_llama4_processor(dir_path: str | os.PathLike, vocab_size: int = 1024, **image_kwargs):
    """Write the tokenizer (``make_llama4_tokenizer``) and save a matching
    ``transformers.Llama4Processor`` (default ``Llama4ImageProcessor`` with ``image_kwargs`` as
    overrides, the tokenizer loaded back from ``dir_path``, Llama 4's chat template) to ``dir_path``
    with ``save_pretrained``. Returns the processor as loaded back by ``AutoProcessor``.
    ``save_pretrained`` rewrites tokenizer.json / tokenizer_config.json in its own format (same
    vocabulary and ids) and adds processor_config.json (nested image processor settings) and
    chat_template.jinja, i.e. the layout of a checkpoint saved by transformers 5.

    Needs ``transformers`` and ``torchvision``; raises ``ImportError`` otherwise.
    """
    import transformers  # noqa: F401  (ImportError is the signal for callers to skip)
    from transformers import AutoProcessor, Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast

    make_llama4_tokenizer(dir_path, vocab_size=vocab_size)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(dir_path))
    image_processor = Llama4ImageProcessor(**image_kwargs)  # ImportError without torchvision
    proc = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer)
    proc.save_pretrained(str(dir_path))
    return AutoProcessor.from_pretrained(str(dir_path))
