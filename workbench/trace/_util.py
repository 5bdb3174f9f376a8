"""Small helpers shared by the trace writer and readers (timestamps, JSON provenance, zarr quieting)."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["now", "versions", "jsonable", "quiet", "format_ranges"]

_NOISE = re.compile(r"Object at .*(\.workbench\.lock|\.partial).* is not recognized")


def now() -> str:
    """The current UTC time, ISO-8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of python and the packages a trace depends on (None when unknown)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in (("workbench", "moe-workbench"), ("torch", "torch"), ("zarr", "zarr"), ("numpy", "numpy"),
                      ("xarray", "xarray"), ("numcodecs", "numcodecs")):
        mod = sys.modules.get(key)
        ver = getattr(mod, "__version__", None) if mod is not None else None
        if ver is None:
            try:
                ver = metadata.version(dist)
            except Exception:
                ver = None
        out[key] = None if ver is None else str(ver)
    return out


def jsonable(obj: Any, where: str) -> Any:
    """Convert provenance values to JSON types; raise TypeError naming the offending key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"attrs: key {k!r} at {where} is not a string")
            out[k] = jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), where)
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if type(obj).__module__.split(".")[0] == "torch":  # torch.dtype, torch.device, torch.Size
        return list(obj) if isinstance(obj, tuple) else str(obj)
    raise TypeError(f"attrs: value at {where} of type {type(obj).__name__} is not JSON-serialisable "
                    "(use str, int, float, bool, None, lists and dicts)")


@contextlib.contextmanager
def quiet():
    """Silence zarr's notices about our lock/temp files and about consolidated metadata."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOISE.pattern)
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


def format_ranges(idx: list[int]) -> str:
    """[0, 1, 2, 4, 5] -> '0-2, 4-5' (sorted integers); 'none' for an empty list."""
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in list(idx[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
