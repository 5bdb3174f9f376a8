"""What the CLI commands share: one-line user errors, the prompts file, capture options, the run summary."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from workbench.trace._util import format_ranges

__all__ = ["CLIError", "read_prompts", "trace_summary", "add_capture_arguments", "capture_options", "format_ranges"]


class CLIError(Exception):
    """A user error the CLI reports in one line (bad prompts file, missing image...)."""


def read_prompts(path: Path, images_dir: Path | None) -> list[dict]:
    """Read a JSONL prompts file: one object per line, {"text": str, "images": [file, ...]}.

    A bare JSON string is a text prompt. Image files resolve against ``images_dir`` (default: the
    prompts file's folder). Errors name the line.
    """
    if not path.is_file():
        raise CLIError(f"prompts file {path} does not exist")
    base = images_dir if images_dir is not None else path.parent
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("text", ""), str):
                raise CLIError(f"{path}:{n}: expected an object with a string 'text' (and optional 'images')")
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
            prompts.append({"text": obj.get("text", ""), "images": files, "line": n})
    return prompts


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
    imb = load_imbalance(ds)
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
    lines.append("load imbalance per MoE layer (CV = std/mean of load shares; max/mean = E * max share):")
    for i, layer in enumerate(imb["layer"].values):
        lines.append(f"  layer {int(layer):3d}: CV {float(imb['cv'][i]):.3f}  max/mean {float(imb['max_over_mean'][i]):.2f}")
    return "\n".join(lines)
