"""Shared plumbing of the exporters: errors, trace opening, selection, provenance, atomic writes."""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import xarray as xr

__all__ = ["ExportError", "ExportFailedError", "ExportNote", "ArtifactSkipped", "Selection", "trace_fingerprint",
           "export_provenance", "routing_summary", "storable_text"]

_FINGERPRINT_KEYS = ("schema", "n_tokens", "n_commits", "moe_layers", "n_experts", "top_k", "routing", "variables",
                     "captures", "provenance")


class ExportError(ValueError):
    """Bad export request: unknown artifact, output path that is a file, layer that is not a MoE
    layer, sequence not in the trace, empty selection..."""


class ExportFailedError(Exception):
    """Writing the export failed (disk full, read-only folder...): the files written before are
    intact and ``manifest.json`` lists exactly them. Not a bad request: the CLI exits 1."""


class ExportNote(UserWarning):
    """Something an export had to change to write a file (e.g. text a format cannot hold, escaped);
    also listed in ``ExportResult.notes`` and ``manifest.json``."""


class ArtifactSkipped(Exception):
    """An artifact does not apply to this trace (no router logits, top-1 routing, no attention
    maps...). ``export_all`` records the reason and goes on; the single-artifact functions raise it."""


# ----------------------------------------------------------------------------------- provenance
def trace_fingerprint(attrs: Mapping[str, Any]) -> str:
    """Fingerprint of a trace: the first 16 hex digits of the SHA-256 of the canonical JSON
    (sorted keys, no whitespace) of the root attributes ``schema, n_tokens, n_commits, moe_layers,
    n_experts, top_k, routing, variables, captures`` (as :func:`workbench.trace.open_trace` presents
    them) and ``provenance`` without ``updated``.

    ``provenance`` holds the model config, checkpoint fingerprint, tokenizer and inputs hashes,
    versions and the ``created`` timestamp; ``n_tokens`` / ``n_commits`` fix the committed length
    of this append-only store. So the fingerprint names exactly the data a file was exported from;
    it does not change when a finished trace is reopened (``complete`` and ``updated`` are left
    out), and changes when tokens are appended (resume) or the trace is re-recorded.
    """
    sub = {k: attrs.get(k) for k in _FINGERPRINT_KEYS}
    prov = dict(sub.get("provenance") or {})
    prov.pop("updated", None)
    sub["provenance"] = prov
    blob = json.dumps(sub, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _workbench_version() -> str:
    import workbench

    return str(getattr(workbench, "__version__", "unknown"))


def _model_name(prov: Mapping[str, Any]) -> str:
    cfg = prov.get("model_config") or {}
    arch = cfg.get("architectures") if isinstance(cfg, Mapping) else None
    if isinstance(arch, (list, tuple)) and arch:
        name = str(arch[0])
    else:
        name = str(prov.get("model_class") or (cfg.get("model_type") if isinstance(cfg, Mapping) else None) or "unknown")
    return name


def routing_summary(routing: Mapping[str, Any] | None) -> str:
    """The trace's ``routing`` attribute (:func:`workbench.trace.schema.routing_description`) in one line:
    the fields of each MoE layer but ``layer``, layers with the same fields grouped, e.g.
    ``"layers 1,2: n_experts=8, top_k=3, score=sigmoid, renormalize=True, ..., scale=2.5"``; ``n/a``
    when the trace has no per-layer routing description."""
    layers = routing.get("layers") if isinstance(routing, Mapping) else None
    layers = [x for x in (layers if isinstance(layers, (list, tuple)) else []) if isinstance(x, Mapping)]
    if not layers:
        return "n/a"
    groups: dict[str, list[str]] = {}
    for x in layers:
        fields = ", ".join(f"{k}={v}" for k, v in x.items() if k != "layer")
        groups.setdefault(fields, []).append(str(x.get("layer", "?")))
    return "; ".join(f"layer{'s' if len(ids) > 1 else ''} {','.join(ids)}: {fields}" for fields, ids in groups.items())


def export_provenance(ds: xr.Dataset, path: Path | None = None, *, exported: str | None = None,
                      selection: "Selection | None" = None) -> dict[str, str]:
    """Flat ``{key: str}`` provenance written into every exported file.

    Keys: ``trace_fingerprint`` (see :func:`trace_fingerprint`), ``trace`` (store path),
    ``trace_schema``, ``trace_created``, ``trace_tokens``, ``model`` (architecture),
    ``routing`` (how the model routes, per MoE layer: :func:`routing_summary` of the trace's
    ``routing`` attribute: sigmoid/softmax score, renormalize, selection bias, groups, scale...),
    ``routing_rule`` (that attribute's rule text), ``checkpoint``, ``checkpoint_fingerprint``,
    ``tokenizer_hash``, ``inputs_hash``, ``trace_workbench_version`` (that recorded it),
    ``workbench_version`` (that exported it), ``exported`` (ISO-8601 UTC) and ``selection``.
    Missing values read ``n/a``.
    """
    a = ds.attrs
    prov = a.get("provenance") or {}
    versions = prov.get("versions") or {}

    def s(v: Any) -> str:
        return "n/a" if v is None or v == "" else " ".join(str(v).split())

    out = {
        "trace_fingerprint": trace_fingerprint(a),
        "trace": s(path.resolve() if path is not None else None),
        "trace_schema": s(a.get("schema")),
        "trace_created": s(prov.get("created")),
        "trace_tokens": s(a.get("n_tokens")),
        "model": s(_model_name(prov)),
        # the routing rule decides what the weights and the entropy mean (sigmoid vs softmax, bias...)
        "routing": s(routing_summary(a.get("routing"))),
        "routing_rule": s(a["routing"].get("rule") if isinstance(a.get("routing"), Mapping) else None),
        "checkpoint": s(prov.get("checkpoint_path")),
        "checkpoint_fingerprint": s(prov.get("checkpoint_fingerprint")),
        "tokenizer_hash": s(prov.get("tokenizer_hash")),
        "inputs_hash": s(prov.get("inputs_hash")),
        "trace_workbench_version": s(versions.get("workbench")),
        "workbench_version": _workbench_version(),
        "exported": exported or _now(),
        "selection": selection.describe() if selection is not None else "all",
    }
    return out


def with_artifact(prov: Mapping[str, str], artifact: str, **extra: Any) -> dict[str, str]:
    out = dict(prov)
    out["artifact"] = artifact
    for k, v in extra.items():
        out[k] = " ".join(str(v).split())
    return out


def provenance_text(prov: Mapping[str, str]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in prov.items())


# ------------------------------------------------------------------------------------ opening
def open_for_export(store: Any) -> tuple[xr.Dataset, Path | None]:
    """``(dataset, path)`` from a store path or an ``open_trace`` Dataset, with clear errors."""
    from workbench.trace import open_trace

    if isinstance(store, xr.Dataset):
        src = store.encoding.get("source")
        return store, (Path(src) if src else None)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"expected a trace store path or an xarray.Dataset from open_trace, got {type(store).__name__}")
    p = Path(store)
    if not p.exists():
        raise FileNotFoundError(f"trace store {p} does not exist")
    ds = open_trace(p, tokens=False)
    if ds.attrs.get("has_vocab"):
        ds = open_trace(p, tokens=True)
    return ds, p


def prepare_out_dir(out_dir: Any, create: bool = True) -> Path:
    """Check that ``out_dir`` can be a directory (not a file, no file among its parents); create it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is a file, not a directory")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"output path {out}: {parent} is a file, not a directory")
        if parent.exists():
            break
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------- selection
def parse_int_list(text: str | Sequence[int] | None, what: str) -> list[int] | None:
    """``"0,3,5-7"`` -> [0, 3, 5, 6, 7]; an int, or a list of ints (or of integer strings), passes
    through; None -> None. Anything else (floats, bools...) is an ExportError."""
    if text is None:
        return None
    if as_index(text) is not None:
        return [as_index(text)]
    if not isinstance(text, str):
        vals = []
        try:
            for x in text:
                v = int(x) if isinstance(x, str) else as_index(x)
                if v is None:
                    raise ValueError
                vals.append(v)
        except (TypeError, ValueError):
            raise ExportError(f"{what}: expected integers, got {text!r}") from None
        return vals
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                i = part.index("-", 1)
                lo, hi = int(part[:i]), int(part[i + 1:])
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ExportError(f"{what}: cannot read {part!r} (use e.g. 0,3,5-7)") from None
    if not out:
        raise ExportError(f"{what}: empty list {text!r}")
    return out


def parse_token_range(tokens: Any) -> tuple[int, int] | None:
    """``"10:200"`` / ``(10, 200)`` / ``slice(10, 200)`` -> (10, 200); open ends allowed (``":50"``)."""
    if tokens is None:
        return None
    if isinstance(tokens, slice):
        if tokens.step not in (None, 1):
            raise ExportError(f"tokens: step {tokens.step} is not supported")
        return (tokens.start, tokens.stop)
    if isinstance(tokens, str):
        if ":" not in tokens:
            raise ExportError(f"tokens: expected START:STOP (e.g. 0:512), got {tokens!r}")
        a, b = tokens.split(":", 1)
        try:
            return (int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            raise ExportError(f"tokens: expected START:STOP integers, got {tokens!r}") from None
    try:
        a, b = tokens
        return (None if a is None else int(a), None if b is None else int(b))
    except (TypeError, ValueError):
        raise ExportError(f"tokens: expected (start, stop) or 'START:STOP', got {tokens!r}") from None


def as_index(value: Any) -> int | None:
    """``value`` as an int when it is an integer, else None (:func:`workbench.analysis._common.as_index`)."""
    from workbench.analysis._common import as_index as _as_index  # imported on use: workbench.analysis loads torch

    return _as_index(value)


def moe_layers_of(ds: xr.Dataset) -> list[int]:
    """The decoder layer indices of the MoE layers of ``ds`` (its ``layer`` coordinate)."""
    return [int(x) for x in np.asarray(ds["layer"].values)]


def check_moe_layer(ds: xr.Dataset, layer: Any, *, what: str | None = None, scope: str = "the selection") -> int:
    """``layer``, a decoder layer index, as an int once checked to be a MoE layer of ``ds`` (a value
    of its ``layer`` coordinate); an ExportError (prefixed ``what:``) naming the MoE layers otherwise."""
    prefix = f"{what}: " if what else ""
    value = as_index(layer)
    if value is None:
        raise ExportError(f"{prefix}layer must be a decoder layer index (int), got {layer!r}")
    layers = moe_layers_of(ds)
    if value not in layers:
        raise ExportError(f"{prefix}layer {value} is not a MoE layer of {scope}; MoE layers "
                          f"(decoder layer indices): {layers}")
    return value


@dataclass
class Selection:
    """Which part of the trace to export.

    layers: decoder layer indices (values of the ``layer`` coordinate; each must be a MoE layer, else
    ExportError).
    sequences: values of the ``sequence`` variable. tokens: a half-open range ``[start, stop)``
    of rows of the trace's ``token`` dimension (the index ``open_trace`` shows; attention maps'
    ``query_token`` refer to it). Filters combine (a token must pass all). None = everything.
    """

    layers: list[int] | None = None
    sequences: list[int] | None = None
    tokens: tuple[int | None, int | None] | None = None
    # resolved
    layer_pos: list[int] = field(default_factory=list)
    token_rows: np.ndarray | None = None

    @classmethod
    def make(cls, ds: xr.Dataset, layers=None, sequences=None, tokens=None) -> "Selection":
        sel = cls(parse_int_list(layers, "layers"), parse_int_list(sequences, "sequences"), parse_token_range(tokens))
        sel.resolve(ds)
        return sel

    def resolve(self, ds: xr.Dataset) -> None:
        all_layers = moe_layers_of(ds)
        if self.layers is None:
            self.layer_pos = list(range(len(all_layers)))
        else:
            pos = [all_layers.index(check_moe_layer(ds, layer, scope="this trace")) for layer in self.layers]
            self.layer_pos = list(dict.fromkeys(pos))
        n = int(ds.sizes["token"])
        rows = None
        if self.sequences is not None:
            seq = np.asarray(ds["sequence"].values)
            present = set(np.unique(seq).tolist())
            missing = [s for s in self.sequences if s not in present]
            if missing:
                have = sorted(present)
                show = ", ".join(map(str, have[:20])) + (" ..." if len(have) > 20 else "")
                raise ExportError(f"sequence(s) {missing} are not in this trace; it holds sequences {show}")
            rows = np.flatnonzero(np.isin(seq, self.sequences))
        if self.tokens is not None:
            a, b = self.tokens
            a = 0 if a is None else a
            b = n if b is None else b
            if a < 0 or b > n or a >= b:
                raise ExportError(f"tokens {a}:{b}: need 0 <= start < stop <= {n} (the trace has {n} tokens)")
            r = np.arange(a, b)
            rows = r if rows is None else np.intersect1d(rows, r)
        if rows is not None and rows.size == 0:
            raise ExportError(f"the selection ({self.describe()}) holds no tokens")
        self.token_rows = rows

    def apply(self, ds: xr.Dataset) -> xr.Dataset:
        """The trace restricted to the selection (token variables only; per-commit arrays dropped
        when tokens are subset, since commits no longer match)."""
        out = ds
        if self.layers is not None:
            out = out.isel(moe_layer=self.layer_pos)
        if self.token_rows is not None:
            out = out.drop_vars([v for v in ("expert_load", "commit_end") if v in out.variables])
            out = out.isel(token=self.token_rows)
        return out

    def describe(self) -> str:
        parts = []
        parts.append("layers=" + ("all" if self.layers is None else ",".join(map(str, self.layers))))
        parts.append("sequences=" + ("all" if self.sequences is None else ",".join(map(str, self.sequences))))
        if self.tokens is None:
            parts.append("tokens=all")
        else:
            a, b = self.tokens
            parts.append(f"tokens={'' if a is None else a}:{'' if b is None else b}")
        return "; ".join(parts)


# ------------------------------------------------------------------------------- atomic write
#: called with each file's final path once it is renamed into place (``export_all`` keeps its
#: manifest in step with the files that exist); None outside ``export_all``
on_written: contextvars.ContextVar = contextvars.ContextVar("workbench_export_on_written", default=None)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``path`` (never half-written: a
    failure, e.g. a full disk, removes the temporary file and leaves an older ``path`` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    hook = on_written.get()
    if hook is not None:
        hook(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically; lone surrogates (not UTF-8) are written as ``\\udcXX`` escapes."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace", newline="\n")
    return Path(path)


def storable_text(text: str, nul: bool = True) -> tuple[str, bool]:
    """``(text, changed)``: ``text`` with what binary formats cannot hold escaped, Python-style:
    NUL (HDF5/NetCDF strings end at NUL; ``nul=False`` keeps it) as ``\\x00`` and lone surrogates
    (not encodable as UTF-8) as ``\\udcXX``. ``changed`` says whether anything was escaped."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if nul:
        out = out.replace("\x00", "\\x00")
    return out, out != text


# ------------------------------------------------------------------------------------- misc
def expert_palette(n_experts: int) -> list[str]:
    """The shared colorblind-safe expert colors (``workbench.widgets.expert_color``)."""
    from workbench.widgets._palette import expert_colors

    return expert_colors(n_experts)


def layer_labels(ds: xr.Dataset) -> list[str]:
    return [f"L{int(x)}" for x in np.asarray(ds["layer"].values)]


def token_texts(ds: xr.Dataset, rows: np.ndarray) -> list[str]:
    """Token strings of the given rows (the vocabulary's text, else ``#<id>``)."""
    if "token_text" in ds.variables:
        return [str(x) for x in np.asarray(ds["token_text"].isel(token=rows).values)]
    return [f"#{int(i)}" for i in np.asarray(ds["token_id"].isel(token=rows).values)]


def visible(text: str) -> str:
    """A token string with invisible characters made visible (for labels, not for data)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    s = "".join(out)
    if s.startswith(" "):
        s = "\u2423" + s[1:]
    return s


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def ensure_iter(x: Iterable[str] | str) -> list[str]:
    return [x] if isinstance(x, str) else list(x)
