"""What the CLI commands share: one-line user errors, the prompts file, flag types, output checks,
capture options, the run summary."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

from workbench.trace._util import format_ranges

__all__ = ["CLIError", "read_prompts", "check_prompts_process", "trace_summary", "add_capture_arguments",
           "capture_options", "format_ranges",
           "positive_int", "dtype_name", "device_name", "DTYPE_CHOICES", "check_writable_dir", "check_store_out",
           "check_vocab", "checkpoint_loader", "load_transformers_checkpoint", "TransformersTextProcessor"]


class CLIError(Exception):
    """A user error the CLI reports in one line (bad prompts file, missing image...)."""


_JSON_TYPES = {list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_prompts(path: Path, images_dir: Path | None) -> list[dict]:
    """Read a JSONL prompts file: one object per line, {"text": str, "images": [file, ...]}.

    A bare JSON string is a text prompt; an object needs a string "text" ("" is an empty prompt,
    which trace skips). Image files resolve against ``images_dir`` (default: the
    prompts file's folder). Errors name the line: binary data (a NUL byte), bytes that are not
    UTF-8, invalid or too deeply nested JSON, a text with a lone surrogate (``"\\ud800"`` is valid
    JSON but no Unicode text: the tokenizer and the store could not take it), a missing image.
    Only a regular file is read (a FIFO would block). A file without any prompt is an error.
    """
    if not path.exists():
        raise CLIError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise CLIError(f"prompts file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CLIError(f"prompts file {path}: cannot read it ({e.strerror or e})") from e
    base = images_dir if images_dir is not None else path.parent
    prompts = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if b"\0" in raw:
            raise CLIError(f"{path}:{n}: binary data (a NUL byte at column {raw.index(0) + 1}); "
                           f"a prompts file is UTF-8 JSON, one prompt per line")
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{n}: not valid JSON (column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise CLIError(f"{path}:{n}: JSON nested too deeply") from None
        if isinstance(obj, str):
            obj = {"text": obj}
        # a missing 'text' (a typo such as "txt") is refused, not read as an empty prompt
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            got = ("an object without 'text'" if isinstance(obj, dict) and "text" not in obj else
                   f"'text' of type {type(obj['text']).__name__}" if isinstance(obj, dict) else
                   f"a JSON {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
            raise CLIError(f"{path}:{n}: expected an object with a string 'text' (and optional 'images'), got {got}")
        text = obj["text"]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CLIError(f"{path}:{n}: 'text' holds a lone surrogate {text[e.start]!r} at character {e.start}; "
                           f"that is not Unicode text") from None
        images = obj.get("images") or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise CLIError(f"{path}:{n}: 'images' must be a list of file names")
        files = []
        for name in images:
            f_img = (base / name) if not Path(name).is_absolute() else Path(name)
            if not f_img.is_file():
                raise CLIError(f"{path}:{n}: image file {f_img} does not exist")
            files.append(f_img)
        prompts.append({"text": text, "images": files, "line": n})
    if not prompts:
        raise CLIError(f"prompts file {path} holds no prompt (one JSON object or string per line)")
    return prompts


def check_prompts_process(processor, prompts: list[dict], path: Path, *, max_tokens: int | None,
                          truncate: bool, max_positions: int | None = None) -> None:
    """Run ``processor`` on each prompt of :func:`read_prompts` alone, with the arguments the
    recorder will use, so that a prompt it refuses (longer than ``--max-tokens``, ``<|image|>``
    placeholders that do not match ``images``, an unusable image) is a CLIError ``file:line: ...``
    naming the CLI's flags, before an output store is created. The processor's own messages speak
    of its API (``sample 0``, ``max_length``, ``truncation=True``). ``max_positions``: the model's
    ``max_position_embeddings``; a longer prompt (images expanded) is refused here too, not by
    the model after the store exists."""
    from workbench.models.llama4.processor import ProcessorError

    for p in prompts:
        if not p["text"].strip() and not p["images"]:
            continue  # the recorder skips empty prompts
        kw = dict(text=[p["text"]], padding=True, return_tensors="pt")
        if max_tokens is not None:
            kw.update(max_length=max_tokens, truncation=truncate)
        if p["images"]:
            kw["images"] = [p["images"]]
        try:
            n = int(processor(**kw)["input_ids"].shape[-1])
        except (ProcessorError, CLIError) as e:
            raise CLIError(f"{path}:{p['line']}: {_in_cli_words(str(e), p, max_tokens)}") from None
        if max_positions is not None and n > max_positions:
            raise CLIError(f"{path}:{p['line']}: the prompt is {n} tokens long, more than the model's "
                           f"max_position_embeddings {max_positions}; shorten it, or pass --max-tokens "
                           f"{max_positions} --truncate")


_IMG = re.escape("<|image|>")


def _in_cli_words(message: str, prompt: dict, max_tokens: int | None) -> str:
    """A processor error about one prompt (sample 0 of a batch of one) in the words of the CLI."""
    if m := re.match(r"sample \d+ is (\d+) tokens long \(images expanded\), above max_length=(\d+);", message):
        n, limit = m.groups()
        n = f"{n} tokens long" + (" (images expanded)" if prompt["images"] else "")
        if max_tokens is None:  # the limit is the tokenizer's model_max_length
            return (f"the prompt is {n}, more than the tokenizer's limit of {limit} "
                    f"(model_max_length); shorten it, pass a larger --max-tokens, or --max-tokens {limit} --truncate")
        return (f"the prompt is {n}, more than --max-tokens {limit}; shorten it, "
                f"pass a larger --max-tokens, or --truncate")
    if m := re.match(r"prompt \d+ of the batch has (\d+) tokens, more than --max-tokens (\d+)", message):
        return (f"the prompt is {m[1]} tokens long, more than --max-tokens {m[2]}; shorten it, pass a larger "
                f"--max-tokens, or --truncate")
    if m := re.match(r"truncating sample \d+ to max_length=(\d+) would cut into its image tokens "
                     r"\((\d+) tokens before truncation\)", message):
        return (f"--truncate to --max-tokens {m[1]} would cut into the prompt's image tokens (it is {m[2]} tokens "
                f"long); pass a larger --max-tokens or drop its images")
    if m := re.match(rf"sample \d+ has (\d+) {_IMG} placeholder\(s\) but no images were passed", message):
        return (f"the text has {m[1]} <|image|> placeholder(s) but the prompt has no 'images'; each placeholder "
                f"takes one image file, in order")
    if m := re.match(rf"sample \d+ has (\d+) {_IMG} placeholder\(s\) in its text but (\d+) image\(s\)", message):
        return (f"the text has {m[1]} <|image|> placeholder(s) but 'images' lists {m[2]} file(s); each placeholder "
                f"takes one image file, in order")
    # anything else (an image the processor cannot use): name the image file instead of the batch slot
    images = prompt["images"]
    return re.sub(r"image (\d+) of sample \d+",
                  lambda m: f"image {images[int(m[1])]}" if int(m[1]) < len(images) else m[0], message)


# ---------------------------------------------------------------------------------------------
# Flag types (argparse reports their errors: one line "workbench CMD: error: argument ...")
# ---------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """``type=`` of counts such as --batch-size: 0 and negatives are refused (a negative batch size
    once wrote a complete trace of 0 tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


DTYPE_CHOICES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(text: str) -> str:
    """``type=`` of --dtype: a floating dtype name (or fp32/bf16/fp16); anything else lists the choices."""
    name = text.strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_CHOICES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(DTYPE_CHOICES)})")
    return name


def device_name(text: str) -> str:
    """``type=`` of --device: cpu, cuda, cuda:N (or mps), and only when that device exists here."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine "
                                             f"(torch.cuda.is_available() is False); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: the MPS backend is not available on this machine")
        return text
    raise argparse.ArgumentTypeError(f"device {text!r} is not supported (use cpu, cuda or cuda:N)")


# ---------------------------------------------------------------------------------------------
# Output paths: checked before anything expensive (loading a model) runs
# ---------------------------------------------------------------------------------------------
def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """CLIError unless ``path`` is, or can be created as, a writable directory: it is not a file,
    no existing parent of it is a file, and the nearest existing one is writable (a read-only
    mount or a folder without write permission is caught here, not after loading a model)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise CLIError(f"{flag} {path} exists and is a file, not a directory")
        raise CLIError(f"{flag} {path}: {existing} is a file, so no directory can be created under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_mount(existing) else "no write permission"
        raise CLIError(f"{flag} {path}: {existing} is not writable ({why})")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_store_out(out: Path, *, resume: bool, overwrite: bool, inputs_hash: str | None = None,
                    can_resume: bool = True) -> dict | None:
    """Cheap checks of a trace store path for ``--out`` (before the model loads): writable; with
    ``--resume`` an incomplete trace recorded from the same inputs must be there (its root
    attributes are returned); without ``--resume``/``--overwrite`` no trace may be there. The
    messages name this command's flags (the store's own errors speak of the Python API):
    ``can_resume=False`` for a command without ``--resume``, whose messages then offer only
    ``--overwrite`` or another ``--out``."""
    from workbench.trace.reader import read_root

    check_writable_dir(out)
    holds_trace = (out / "zarr.json").exists()
    if resume:
        if not holds_trace:
            raise CLIError(f"--resume: there is no trace at {out} to resume")
        attrs = read_root(out)["attributes"]
        prev_hash = (attrs.get("provenance") or {}).get("inputs_hash")
        if inputs_hash is not None and prev_hash is not None and prev_hash != inputs_hash:
            raise CLIError(f"{out} was traced from other prompts (inputs hash {prev_hash}, this file {inputs_hash}); "
                           f"refusing to resume with a different prompts file")
        if attrs.get("complete"):
            raise CLIError(f"--resume: {out} is already a complete trace (n_tokens={attrs.get('n_tokens')}); "
                           f"nothing to resume. Use --overwrite to record it again, or another --out")
        return attrs
    if holds_trace and not overwrite:
        attrs = read_root(out)["attributes"]
        fix = ("pass --resume to continue it or --overwrite to replace it" if can_resume else
               "pass --overwrite to replace it, or choose another --out")
        raise CLIError(f"{out} already holds a trace (n_tokens={attrs.get('n_tokens')}, complete="
                       f"{attrs.get('complete')}): {fix}")
    return None


def check_vocab(processor, model) -> None:
    """CLIError when the tokenizer can produce ids the model's embedding does not have (a
    tokenizer.json from another checkpoint): each such id would fail deep in the forward pass."""
    tok = getattr(processor, "tokenizer", None)
    vocab = getattr(getattr(model, "text_config", None), "vocab_size", None)
    if vocab is None and hasattr(getattr(model, "config", None), "get_text_config"):  # a transformers model
        vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if tok is None or vocab is None or not hasattr(tok, "get_vocab_size"):
        return
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab:
        raise CLIError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab}: ids {vocab} and up "
                       f"would index past the embedding; is tokenizer.json the one for this checkpoint?")


# ---------------------------------------------------------------------------------------------
# Captures on the command line: --capture a,b and --<capture>-<option> for every registered one
# ---------------------------------------------------------------------------------------------
def _option_fields(cls) -> list:
    return [f for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    """``--capture`` and one ``--<capture>-<option>`` flag per option of every registered capture."""
    from workbench.hooks import CAPTURES

    p.add_argument("--capture", default="router",
                   help=f"comma list of captures: {', '.join(CAPTURES)} (default: router; router is always on)")
    for name, cls in CAPTURES.items():
        for f in _option_fields(cls):
            flag = f"--{name}-{f.name}".replace("_", "-")
            p.add_argument(flag, dest=f"capture__{name}__{f.name}", default=None, metavar=f.name.upper(),
                           help=f"[{name}] {f.metadata.get('help', f.name)}")


def capture_options(args: argparse.Namespace) -> dict[str, dict]:
    """{capture: {option: value}} from ``--capture`` and the option flags; CLIError for an option of
    a capture that is not asked for, or an unknown capture."""
    from workbench.hooks import CAPTURES

    names = [c.strip() for c in args.capture.split(",") if c.strip()]
    unknown = [c for c in names if c not in CAPTURES]
    if unknown:
        raise CLIError(f"--capture: unknown capture(s) {', '.join(unknown)}; choose from {', '.join(CAPTURES)}")
    out: dict[str, dict] = {n: {} for n in dict.fromkeys(names)}
    for name, cls in CAPTURES.items():
        for f in _option_fields(cls):
            value = getattr(args, f"capture__{name}__{f.name}", None)
            if value is None:
                continue
            if name not in out:
                raise CLIError(f"--{name}-{f.name.replace('_', '-')} given, but --capture does not include {name}")
            out[name][f.name] = f.metadata.get("parse", str)(value)
    return out


# ---------------------------------------------------------------------------------------------
def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trace_summary(store: Path, run: dict | None = None) -> str:
    """Tokens, speed, bytes and per-layer load imbalance of a trace (what `trace` prints at the end)."""
    from workbench.analysis import load_imbalance
    from workbench.trace import open_trace

    ds = open_trace(store)
    lines = []
    if run is not None:
        lines.append(f"traced {run['prompts']} prompts, {run['tokens']:,} tokens in {run['seconds']:.1f} s "
                     f"({run['tokens_per_s']:,.0f} tokens/s)")
        if run.get("resumed_after"):
            lines.append(f"resumed: prompts 0-{run['resumed_after'] - 1} were already in the store")
        if run["skipped_empty"]:
            lines.append(f"skipped {len(run['skipped_empty'])} empty prompt(s): "
                         + ", ".join(str(i) for i in run["skipped_empty"][:10]))
    lines.append(f"store {store}: {ds.sizes['token']:,} tokens, {_du(store) / 1e6:.2f} MB on disk, "
                 f"complete={ds.attrs['complete']}")
    if ds.sizes["token"] == 0:  # no load to share out: every layer's CV would be nan
        lines.append("no tokens recorded: no load imbalance to report")
        return "\n".join(lines)
    imb = load_imbalance(ds)
    lines.append("load imbalance per MoE layer (CV = std/mean of load shares; max/mean = E * max share):")
    for i, layer in enumerate(imb["layer"].values):
        lines.append(f"  layer {int(layer):3d}: CV {float(imb['cv'][i]):.3f}  max/mean {float(imb['max_over_mean'][i]):.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# transformers checkpoints (every MoE family with a routing adapter)
# ---------------------------------------------------------------------------------------------
WORKBENCH_MODEL_TYPES = ("llama4", "llama4_text")


def checkpoint_loader(path: Path, loader: str = "auto") -> str:
    """"workbench" or "transformers": who loads the checkpoint directory ``path``. ``auto``: Llama 4
    checkpoints load with workbench's own model, every other model type with a routing adapter
    (:func:`workbench.hooks.adapters.adapter_for`) with transformers; anything else is a CLIError
    listing the supported model types."""
    if loader not in ("auto", "workbench", "transformers"):
        raise CLIError(f"--loader must be auto, workbench or transformers, got {loader!r}")
    cfg_file = Path(path) / "config.json"
    if loader == "workbench" or not cfg_file.is_file():
        return "workbench"  # the workbench loader reports a missing directory / config itself
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        return "workbench"  # ... and a corrupt config.json
    if loader == "auto" and model_type in WORKBENCH_MODEL_TYPES:
        return "workbench"
    from workbench.hooks.adapters import ADAPTERS

    known = sorted(t for f, t in ADAPTERS if f == "transformers")
    if model_type not in known:
        raise CLIError(f"{cfg_file}: model_type {model_type!r} has no routing adapter; supported transformers model "
                       f"types: {', '.join(known)}")
    return "transformers"


class TransformersTextProcessor:
    """A transformers tokenizer as the recorder's processor (text prompts): called like workbench's
    processor (``text=[...], padding=True, return_tensors="pt"``), padding on the RIGHT (a forward
    pass without ``position_ids`` then gives every real token the positions of an unpadded run),
    with ``tokenizer`` (the ``tokenizers`` backend: the trace's vocabulary and special ids) and
    ``tokenizer_hash``."""

    def __init__(self, hf_tokenizer) -> None:
        import hashlib

        self.hf = hf_tokenizer
        self.hf.padding_side = "right"
        if self.hf.pad_token is None:  # Mixtral, DeepSeek...: padding is masked out, any id will do
            self.hf.pad_token = self.hf.eos_token or self.hf.unk_token
        self.tokenizer = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.tokenizer_hash = (hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]
                               if self.tokenizer is not None else None)

    def __call__(self, text, images=None, **kw):
        if images is not None and any(images):
            raise CLIError("prompts with images need a multimodal Llama 4 checkpoint (loaded with workbench)")
        kw.pop("padding_side", None)
        max_length = kw.get("max_length")
        if max_length is not None and not kw.get("truncation"):  # longer is an error, as with workbench's processor
            kw.pop("max_length")
            out = self.hf(text=text, **kw)
            lengths = out["attention_mask"].sum(-1).tolist()
            long = [i for i, n in enumerate(lengths) if n > max_length]
            if long:
                raise CLIError(f"prompt {long[0]} of the batch has {lengths[long[0]]} tokens, more than --max-tokens "
                               f"{max_length} (pass --truncate to cut it)")
            return out
        return self.hf(text=text, **kw)


def transformers_config(path: Path):
    """(config, auto model class) of a transformers checkpoint directory: ``AutoModelForCausalLM``,
    or ``AutoModelForImageTextToText`` for a multimodal config; CLIError when transformers cannot
    read its config.json."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"{path}: transformers cannot read its config.json ({_first_line(e)})") from None
    auto = transformers.AutoModelForCausalLM
    if hasattr(cfg, "text_config") and cfg.model_type not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = transformers.AutoModelForImageTextToText
    return cfg, auto


def load_transformers_checkpoint(path: Path, *, dtype: str | None, device: str | None, device_map: str | None,
                                 progress: bool = True):
    """(model, processor) of a transformers checkpoint directory: ``AutoModelForCausalLM`` (or
    ``AutoModelForImageTextToText`` for a multimodal config) in eval mode, ``dtype`` (default: as
    stored), on ``device`` or spread by ``device_map`` ("auto", "balanced", ...), with
    ``model.source`` (path, checkpoint fingerprint: resume compares it), and the tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from workbench.checkpoint import checkpoint_fingerprint

    if device is not None and device_map is not None:
        raise CLIError("give --device or --device-map, not both")
    _, auto = transformers_config(path)
    kw = {"dtype": getattr(torch, dtype) if dtype else "auto"}
    if device_map is not None:
        kw["device_map"] = device_map
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:  # the tokenizer first: no weights are read for a checkpoint that cannot be traced anyway
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"{path}: transformers finds no usable tokenizer there (tokenizer.json or "
                       f"tokenizer_config.json with its files; {_first_line(e)})") from None
    try:
        model = auto.from_pretrained(str(path), **kw)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"{path}: transformers cannot load it ({_first_line(e)})") from None
    if device is not None:
        model = model.to(device)
    model.eval()
    model.source = {"path": str(Path(path).resolve()), "fingerprint": checkpoint_fingerprint(path)}
    return model, TransformersTextProcessor(tok)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Quantized loading on the command line (#14): --quantize / --quantize-modules
# ---------------------------------------------------------------------------------------------
def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """``--quantize none|fp8|int4`` and ``--quantize-modules`` (parts besides the routed experts)."""
    p.add_argument("--quantize", choices=("none", "fp8", "int4"), default="none",
                   help="quantize the weights while loading a float checkpoint: fp8 (per output channel) or int4 "
                        "(group 128); routed experts always, router/norms/embeddings/vision never (default: none; "
                        "an FP8 checkpoint is read as stored)")
    p.add_argument("--quantize-modules", default=None, metavar="PARTS",
                   help="also quantize: comma list of shared_expert, dense_mlp, attention")


def quantize_options(args: argparse.Namespace) -> dict:
    """``load_model`` keyword arguments from the quantize flags ({} without --quantize); CLIError for
    a module list without --quantize or an unknown / never-quantized part."""
    q = getattr(args, "quantize", "none") or "none"
    mods = getattr(args, "quantize_modules", None)
    if q == "none":
        if mods:
            raise CLIError("--quantize-modules needs --quantize fp8 or int4")
        return {}
    from workbench.quant.modules import parse_modules

    try:
        return {"quantize": q, "quantize_modules": parse_modules(mods)}
    except ValueError as e:
        raise CLIError(f"--quantize-modules: {e}") from None


__all__ += ["add_quantize_arguments", "quantize_options", "transformers_config"]


def non_negative_seconds(text: str) -> float:
    """``type=`` of --commit-every: seconds >= 0 (0: every forward pass is committed before the next)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def add_commit_argument(p: argparse.ArgumentParser) -> None:
    """``--commit-every SECONDS``: the recorder's commit policy (a kill loses at most about that much)."""
    p.add_argument("--commit-every", type=non_negative_seconds, default=1.0, metavar="SECONDS",
                   help="commit recorded passes when this many seconds passed since the last commit (default 1; "
                        "a kill loses at most about that much work, which --resume re-runs); 0: every pass")


__all__ += ["non_negative_seconds", "add_commit_argument"]
