"""Tables of routing metrics as CSV and LaTeX (booktabs), with provenance.

CSV: UTF-8, ``# key: value`` provenance comment lines first (read with
``pandas.read_csv(path, comment="#")`` or skip lines starting with ``#``), then a header row.
Floats are written with Python's shortest round-trip ``repr`` (reading them back gives the exact
float64 the analysis returned); NaN is ``nan``. Text cells (tokens, labels) that a spreadsheet
would run as a formula, those beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return,
get a leading ``'`` (OWASP's CSV injection advice); numbers are written as they are.

LaTeX: a ``tabular`` only (``\\input`` it inside your own ``table`` environment), with ``booktabs``
rules (``\\toprule``, ``\\midrule``, ``\\bottomrule``), ``% key: value`` provenance comment lines
and the suggested caption as a comment. Needs ``\\usepackage{booktabs}``; token strings use
``\\texttt`` and ``\\textvisiblespace`` and assume UTF-8 input (the LaTeX default since 2018).
Every LaTeX special character of a text cell is escaped (:func:`latex_escape`). Numbers are
rounded to 3 decimals for display (the CSV holds the exact values); NaN shows as ``--``.

Values come from :mod:`workbench.analysis` (no formula is re-derived here):

- ``layer_metrics``: per MoE layer, :func:`~workbench.analysis.load_imbalance` (cv,
  max_over_mean, maxvio, load_entropy) and, when router logits were recorded,
  :func:`~workbench.analysis.router_entropy` (mean normalized entropy of softmax(logits); its note
  says what these probabilities are for the recorded model, ``attrs['probabilities_are']``: for a
  sigmoid router, Llama 4 or DeepSeek-V3, a convention, not the distribution the model applies).
- ``layer_metrics_by_modality``: the same split by modality (when the trace mixes modalities).
- ``vocab_top_tokens`` / ``vocab_specialization``: :func:`~workbench.analysis.vocab_specialization`,
  the token ids with the largest p(expert | token id) per expert, and the per-layer score.
- ``domain_specialization`` / ``domain_shares``: :func:`~workbench.analysis.domain_specialization`
  with the given sequence labels.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from workbench.trace.schema import Modality

from ._common import ArtifactSkipped, ExportError, atomic_path

__all__ = ["Table", "latex_escape", "latex_token", "csv_text", "write_csv", "write_latex", "layer_metrics_table",
           "layer_metrics_by_modality_table", "vocab_tables", "domain_tables", "routing_shift_tables",
           "importance_table"]


@dataclass
class Column:
    key: str
    header: str  # LaTeX header (already escaped / LaTeX markup)
    kind: str = "float"  # "int" | "float" | "str" | "token" | "tex" (raw LaTeX, CSV gets the plain text)
    digits: int = 3


@dataclass
class Table:
    """A table: named columns and rows of Python values (one list per row)."""

    name: str
    columns: list[Column]
    rows: list[list[Any]]
    caption: str
    notes: list[str] = field(default_factory=list)

    def column(self, key: str) -> list[Any]:
        i = [c.key for c in self.columns].index(key)
        return [r[i] for r in self.rows]


# ------------------------------------------------------------------------------------ escaping
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}


def latex_escape(text: Any) -> str:
    """Escape every LaTeX special character (``\\ & % $ # _ { } ~ ^ < > |``) and make control
    characters visible (``\\n`` -> ``\\textbackslash{}n``)."""
    out = []
    for ch in str(text):
        if ch in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[ch])
        elif ch == "\n":
            out.append(r"\textbackslash{}n")
        elif ch == "\t":
            out.append(r"\textbackslash{}t")
        elif ch == "\r":
            out.append(r"\textbackslash{}r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(rf"\textbackslash{{}}x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def latex_token(text: str) -> str:
    """A token string for LaTeX: escaped, spaces as ``\\textvisiblespace{}``, in ``\\texttt``."""
    esc = latex_escape(text).replace(" ", r"\textvisiblespace{}")
    return r"\texttt{" + (esc if esc else r"\textit{(empty)}") + "}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: Any) -> str:
    """A text cell for CSV: prefixed with ``'`` when it begins like a spreadsheet formula
    (``= + - @``, tab, carriage return), so that opening the file runs nothing."""
    s = str(text)
    return "'" + s if s.startswith(_FORMULA_START) else s


def _fmt_csv(v: Any, kind: str) -> str:
    if v is None:
        return ""
    if kind == "int":
        return str(int(v))
    if kind == "float":
        f = float(v)
        return "nan" if math.isnan(f) else repr(f)
    return csv_text(v)  # "str", "token", "tex": text


def _fmt_tex(v: Any, col: Column) -> str:
    if v is None:
        return "--"
    if col.kind == "int":
        return f"{int(v):,}".replace(",", "{,}")
    if col.kind == "float":
        f = float(v)
        return "--" if not math.isfinite(f) else f"{f:.{col.digits}f}"
    if col.kind == "token":
        return latex_token(str(v))
    if col.kind == "tex":
        return str(v[1]) if isinstance(v, tuple) else str(v)
    return latex_escape(v)


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def write_csv(table: Table, path: Path, prov: Mapping[str, str]) -> Path:
    """CSV with ``# key: value`` provenance lines (written atomically)."""
    buf = io.StringIO()
    for k, v in prov.items():
        buf.write(f"# {k}: {_one_line(v)}\n")
    buf.write(f"# table: {table.name}\n# caption: {_one_line(table.caption)}\n")
    for n in table.notes:
        buf.write(f"# note: {_one_line(n)}\n")
    # csv quotes a field holding a character of the line terminator: with "\r\n" a bare CR in a
    # token is quoted too (with "\n" alone it was not, and readers split the row there)
    line = io.StringIO()
    w = csv.writer(line, lineterminator="\r\n")

    def put(cells: list[str]) -> None:
        line.seek(0)
        line.truncate()
        w.writerow(cells)
        buf.write(line.getvalue()[:-2] + "\n")

    put([c.key for c in table.columns])
    for row in table.rows:
        put([_fmt_csv(v[0] if (c.kind == "tex" and isinstance(v, tuple)) else v, c.kind)
             for v, c in zip(row, table.columns)])
    with atomic_path(path) as tmp:  # lone surrogates (not UTF-8) as \\udcXX escapes
        tmp.write_text(buf.getvalue(), encoding="utf-8", errors="backslashreplace", newline="")
    return Path(path)


def latex_source(table: Table, prov: Mapping[str, str]) -> str:
    align = "".join("r" if c.kind in ("int", "float") else "l" for c in table.columns)
    lines = [f"% {k}: {_one_line(v)}" for k, v in prov.items()]
    lines += [f"% table: {table.name}", f"% caption: {_one_line(table.caption)}"]
    lines += [f"% note: {_one_line(n)}" for n in table.notes]
    lines += [r"% requires \usepackage{booktabs} (and UTF-8 input for token strings)",
              rf"\begin{{tabular}}{{{align}}}", r"\toprule",
              " & ".join(c.header for c in table.columns) + r" \\", r"\midrule"]
    for row in table.rows:
        lines.append(" & ".join(_fmt_tex(v, c) for v, c in zip(row, table.columns)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def write_latex(table: Table, path: Path, prov: Mapping[str, str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(latex_source(table, prov), encoding="utf-8", errors="backslashreplace", newline="\n")
    return Path(path)


# ------------------------------------------------------------------------------------- tables
_METRIC_COLUMNS = [
    Column("cv", "CV"),
    Column("max_over_mean", "max/mean", digits=2),
    Column("maxvio", "MaxVio", digits=2),
    Column("load_entropy", r"$H(f)/\log E$"),
]


def _entropy_note(ent: xr.Dataset) -> str:
    """The router_entropy column's definition, with what softmax(logits) is for the recorded model
    (``attrs['probabilities_are']`` of :func:`~workbench.analysis.router_entropy`, when the trace says)."""
    note = "router_entropy = mean over tokens of H(softmax(router logits)) / log E"
    if ent.attrs.get("probabilities_are"):
        note += f"; softmax(logits) is {ent.attrs['probabilities_are']}"
    return note


def layer_metrics_table(ds: xr.Dataset) -> Table:
    """Per MoE layer: tokens, load imbalance (CV, max/mean, MaxVio, load entropy) and, with
    router logits, the mean normalized router entropy of softmax(logits) (its note says whether that
    is the distribution the model applies)."""
    from workbench.analysis import load_imbalance, router_entropy

    imb = load_imbalance(ds)
    cols = [Column("layer", "Layer", "int"), Column("n_tokens", "Tokens", "int")] + list(_METRIC_COLUMNS)
    ent = None
    notes = [f"{imb.attrs['n_experts']} experts, top-{imb.attrs['k']}; load share f_i = (1/kT) sum_t 1[i in S_t]",
             "cv = std(f)/mean(f) (population std); max_over_mean = E max f; maxvio = E max f - 1; "
             "load_entropy = H(f)/log E"]
    if "router_logits" in ds.variables:
        ent = router_entropy(ds, source="logits", per_token=False)
        cols.append(Column("router_entropy", r"$\bar H_{\mathrm{router}}$"))
        notes.append(_entropy_note(ent))
    else:
        notes.append("router_entropy omitted: the trace has no router_logits")
    rows = []
    for i, layer in enumerate(np.asarray(ds["layer"].values)):
        r = [int(layer), int(imb.attrs["n_tokens"])] + [float(imb[c.key].values[i]) for c in _METRIC_COLUMNS]
        if ent is not None:
            r.append(float(ent["mean_entropy"].values[i]))
        rows.append(r)
    return Table("layer_metrics", cols, rows, "Routing metrics per MoE layer (all selected tokens).", notes)


def routing_paths_table(ds: xr.Dataset, top: int = 20) -> Table:
    """The ``top`` most frequent routing paths (:func:`workbench.analysis.routing_paths`: each
    token's top-1 expert at every selected MoE layer), with count, share and the count per modality."""
    from workbench.analysis import routing_paths
    from workbench.trace.schema import Modality

    paths = routing_paths(ds, top=top, by_modality=True)
    if int(paths.attrs["n_tokens"]) == 0:
        raise ArtifactSkipped("routing paths table skipped: the selection holds no tokens")
    layers = [int(x) for x in np.asarray(paths["layer"].values)]
    mods = list(Modality)
    cols = [Column("rank", "Rank", "int"), Column("path", "Path (top-1 expert at layers "
                                                   + ", ".join(map(str, layers)) + ")", "str"),
            Column("count", "Tokens", "int"), Column("share", "Share")]
    cols += [Column(f"count_{m.label}", f"{m.label.capitalize()} tokens", "int") for m in mods]
    rows = []
    for i in range(paths.sizes["path"]):
        expert = np.asarray(paths["expert"].values[i]).tolist()
        by_mod = np.asarray(paths["count_by_modality"].values[i]).tolist()
        rows.append([i + 1, " -> ".join(map(str, expert)), int(paths["count"].values[i]),
                     float(paths["share"].values[i])] + [int(by_mod[int(m)]) for m in mods])
    notes = [str(paths.attrs.get("definition", "")),
             f"{int(paths.attrs['n_distinct'])} distinct paths over {int(paths.attrs['n_tokens'])} tokens; "
             f"{int(paths.attrs['other_count'])} tokens on paths outside the top {top}"]
    return Table("routing_paths", cols, rows, f"The {top} most frequent routing paths.", notes)


def layer_metrics_by_modality_table(ds: xr.Dataset) -> Table:
    """The metrics of :func:`layer_metrics_table` split by modality (modalities with tokens)."""
    from workbench.analysis import load_imbalance, router_entropy

    imb = load_imbalance(ds, by_modality=True)
    ntok = np.asarray(imb["n_tokens"].values)
    present = [m for m in range(ntok.size) if ntok[m] > 0]
    if len(present) < 2:
        raise ArtifactSkipped("per-modality metrics table skipped: the selection holds a single modality")
    ent = router_entropy(ds, source="logits", per_token=False, by_modality=True) if "router_logits" in ds else None
    cols = [Column("modality", "Modality", "str"), Column("layer", "Layer", "int"), Column("n_tokens", "Tokens", "int")]
    cols += list(_METRIC_COLUMNS)
    if ent is not None:
        cols.append(Column("router_entropy", r"$\bar H_{\mathrm{router}}$"))
    rows = []
    for m in present:
        for i, layer in enumerate(np.asarray(ds["layer"].values)):
            r = [Modality(m).label, int(layer), int(ntok[m])]
            r += [float(imb[c.key].values[m, i]) for c in _METRIC_COLUMNS]
            if ent is not None:
                r.append(float(ent["mean_entropy"].values[m, i]))
            rows.append(r)
    notes = ["same definitions as layer_metrics, over the tokens of each modality"]
    if ent is not None:
        notes.append(_entropy_note(ent))
    return Table("layer_metrics_by_modality", cols, rows, "Routing metrics per MoE layer and modality.", notes)


def vocab_tables(ds: xr.Dataset, vocab: Sequence[str] | None, *, top: int = 5, min_count: int = 5,
                 target: str = "input") -> tuple[Table, Table, Table]:
    """``(top tokens long CSV table, compact LaTeX table, per-layer score table)`` from
    :func:`workbench.analysis.vocab_specialization`.

    Per layer and expert, the ``top`` token ids (occurring >= ``min_count`` times) with the largest
    p(expert | token id) (ties: more frequent first, then smaller id)."""
    from workbench.analysis import vocab_specialization

    vs = vocab_specialization(ds, min_count=min_count, target=target)
    ids = np.asarray(vs["token_id"].values)
    counts = np.asarray(vs["count"].values)
    if ids.size == 0:
        raise ArtifactSkipped(f"vocabulary tables skipped: no token id occurs at least min_count={min_count} times "
                              "in the selection (lower min_count)")
    share = np.asarray(vs["share"].values)  # (V, L, E)
    load = np.asarray(vs["load"].values)  # (L, E)
    layers = [int(x) for x in np.asarray(ds["layer"].values)]
    E = share.shape[2]

    def text(i: int) -> str:
        if vocab is not None and 0 <= i < len(vocab):
            return vocab[i]
        return f"#{i}"

    long_cols = [Column("layer", "Layer", "int"), Column("expert", "Expert", "int"), Column("rank", "Rank", "int"),
                 Column("token_id", "Token id", "int"), Column("token", "Token", "token"),
                 Column("share", r"$p(i\mid v)$"), Column("count", "Count", "int")]
    long_rows, tex_rows = [], []
    for li, layer in enumerate(layers):
        for e in range(E):
            p = share[:, li, e]
            order = np.lexsort((ids, -counts, -p))
            order = [j for j in order if p[j] > 0][:top]
            for r, j in enumerate(order, 1):
                long_rows.append([layer, e, r, int(ids[j]), text(int(ids[j])), float(p[j]), int(counts[j])])
            cell = ", ".join(f"{latex_token(text(int(ids[j])))} ({p[j]:.2f})" for j in order) or "--"
            plain = "; ".join(f"{text(int(ids[j]))} ({p[j]:.2f})" for j in order)
            tex_rows.append([layer, e, float(load[li, e]), (plain, cell)])
    notes = [f"p(i|v) = share of token id v's top-k slots routed to expert i (workbench.analysis.vocab_specialization, "
             f"target={target}); ids occurring >= {min_count} times; top {top} per expert"]
    long = Table("vocab_top_tokens", long_cols, long_rows, "Tokens most specific to each expert.", notes)
    tex_cols = [Column("layer", "Layer", "int"), Column("expert", "Expert", "int"),
                Column("load_share", "$f_i$"), Column("top_tokens", r"Top tokens ($p(i\mid v)$)", "tex")]
    compact = Table("vocab_top_tokens", tex_cols, tex_rows, "Tokens most specific to each expert.", notes)
    score_cols = [Column("layer", "Layer", "int"), Column("n_tokens", "Tokens", "int"),
                  Column("n_ids", "Token ids", "int"), Column("score", "MI [nats]"),
                  Column("score_normalized", "MI$/H(f)$")]
    score_rows = [[layer, int(vs.attrs["n_tokens"]), int(ids.size), float(vs["score"].values[li]),
                   float(vs["score_normalized"].values[li])] for li, layer in enumerate(layers)]
    scores = Table("vocab_specialization", score_cols, score_rows,
                   "Vocabulary specialization per MoE layer: mutual information between token id and expert.",
                   ["score = sum_v (n_v/N) KL(p(.|v) || f) = I(token id; expert) in nats; "
                    "score_normalized = score / H(f)", notes[0]])
    return long, compact, scores


def domain_tables(ds: xr.Dataset, labels: Mapping[int, Any] | Sequence[Any], *, top: int = 3) -> tuple[Table, Table]:
    """``(per-layer JSD + top experts per label, long shares table)`` from
    :func:`workbench.analysis.domain_specialization`."""
    from workbench.analysis import domain_specialization

    dsp = domain_specialization(ds, labels)
    lab = [str(x) for x in np.asarray(dsp["label"].values).tolist()]
    if not lab:
        raise ArtifactSkipped("domain tables skipped: no selected sequence has a label")
    share = np.asarray(dsp["share"].values)  # (G, L, E)
    count = np.asarray(dsp["count"].values)
    layers = [int(x) for x in np.asarray(ds["layer"].values)]
    E = share.shape[2]
    cols = [Column("layer", "Layer", "int"), Column("jsd", "JSD [nats]"), Column("jsd_normalized", r"JSD$/\log m$")]
    cols += [Column(f"top_{g}", latex_escape(name), "tex") for g, name in enumerate(lab)]
    rows = []
    for li, layer in enumerate(layers):
        r = [layer, float(dsp["jsd"].values[li]), float(dsp["jsd_normalized"].values[li])]
        for g in range(len(lab)):
            p = share[g, li]
            order = [e for e in np.argsort(-np.nan_to_num(p, nan=-1.0), kind="stable")[:top] if np.isfinite(p[e])]
            plain = "; ".join(f"{e} ({p[e]:.2f})" for e in order)
            r.append((plain, ", ".join(f"{e} ({p[e]:.2f})" for e in order) or "--"))
        rows.append(r)
    notes = ["JSD = H(mean_l p_l) - mean_l H(p_l) over labels with tokens (workbench.analysis.domain_specialization); "
             f"top_<label> = the {top} experts with the largest share p_l(i) of that label",
             "labels: " + "; ".join(f"{name} ({int(c)} tokens)" for name, c in zip(lab, count)),
             f"unlabeled tokens: {int(dsp.attrs.get('n_unlabeled_tokens', 0))}"]
    main = Table("domain_specialization", cols, rows, "Domain specialization per MoE layer.", notes)
    long_cols = [Column("label", "Label", "str"), Column("layer", "Layer", "int"), Column("expert", "Expert", "int"),
                 Column("share", "$p_l(i)$"), Column("label_tokens", "Tokens", "int")]
    long_rows = [[lab[g], layer, e, float(share[g, li, e]), int(count[g])]
                 for g in range(len(lab)) for li, layer in enumerate(layers) for e in range(E)]
    shares = Table("domain_shares", long_cols, long_rows, "Expert load share per domain label and MoE layer.",
                   ["p_l(i) = (1/(k n_l)) sum_{t in l} 1[i in S_t]"])
    return main, shares


def read_labels(path: str | Path) -> dict[int, str]:
    """Sequence labels from a file: a JSON object ``{"0": "code", ...}`` or a JSON list (index =
    sequence), or a JSONL prompts file whose n-th non-empty line (sequence n) has a
    ``"domain"`` or ``"label"`` field."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"labels file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        try:
            return {int(k): str(v) for k, v in obj.items()}
        except ValueError:
            raise ExportError(f"{p}: keys must be sequence numbers, got {list(obj)[:5]}") from None
    if isinstance(obj, list):
        return {i: str(v) for i, v in enumerate(obj)}
    out = {}
    n = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and ("domain" in rec or "label" in rec):
            out[n] = str(rec.get("domain", rec.get("label")))
        n += 1
    if not out:
        raise ExportError(f"{p}: no labels found (expected a JSON object sequence -> label, a JSON list, or JSONL "
                          "lines with a 'domain' or 'label' field)")
    return out


def routing_shift_tables(ds_a: xr.Dataset, ds_b: xr.Dataset, vocab: Sequence[str] | None = None, *,
                         labels: tuple[str, str] = ("reference", "other"),
                         max_tokens: int | None = 100_000) -> tuple[Table, Table]:
    """``(per-layer table, changed-tokens table)`` from :func:`~workbench.analysis.routing_shift` of
    trace ``ds_b`` against ``ds_a`` (e.g. int4 against bf16) on the same inputs.

    Per MoE layer: tokens, top-1 agreement, top-k overlap, tokens whose top-1 / top-k set changed,
    the total absolute load change sum_i |f_b - f_a|, and the experts that gained / lost the most
    share. Changed tokens (CSV): token row, layer, sequence, position, token id and text, top-1 and
    top-k sets before and after (the first ``max_tokens``; a note says when the list is cut)."""
    from workbench.analysis import routing_shift

    r = routing_shift(ds_a, ds_b, vocab=vocab, max_changes=max_tokens)
    a, b = labels
    k = int(r.attrs["k"])
    layers = [int(x) for x in np.asarray(r["layer"].values)]
    d = np.asarray(r["load_change"].values)
    cols = [Column("layer", "Layer", "int"), Column("n_tokens", "Tokens", "int"),
            Column("top1_agreement", "Top-1 agree"), Column("overlap", f"Top-{k} overlap"),
            Column("top1_changed", "Top-1 changed", "int"), Column("set_changed", f"Top-{k} set changed", "int"),
            Column("load_shift", r"$\sum_i |\Delta f_i|$"), Column("max_gain_expert", "Gains most", "int"),
            Column("max_gain", r"$\Delta f$"), Column("max_loss_expert", "Loses most", "int"),
            Column("max_loss", r"$\Delta f$")]
    rows = []
    for li, layer in enumerate(layers):
        dl = d[li]
        finite = np.isfinite(dl).any()
        gi = int(np.nanargmax(dl)) if finite else None
        lo = int(np.nanargmin(dl)) if finite else None
        rows.append([layer, int(r.attrs["n_tokens"]), float(r["top1_agreement"].values[li]),
                     float(r["overlap"].values[li]), int(r["top1_changed"].values[li]),
                     int(r["set_changed"].values[li]), float(np.nansum(np.abs(dl))) if finite else float("nan"),
                     gi, float(dl[gi]) if finite else float("nan"), lo, float(dl[lo]) if finite else float("nan")])
    notes = [f"routing shift of {b} against {a} on the same inputs ({r.attrs['n_experts']} experts, top-{k}; "
             "workbench.analysis.routing_shift)",
             "top1_agreement = (1/T) sum_t 1[top1_a == top1_b]; overlap = (1/T) sum_t |S_a ∩ S_b| / k; "
             "load_shift = sum_i |f_b,i - f_a,i| with f_i = (1/kT) sum_t 1[i in S_t]"]
    per_layer = Table("routing_shift", cols, rows, f"Routing shift per MoE layer: {b} against {a}.", notes)
    tcols = [Column("token", "Token row", "int"), Column("layer", "Layer", "int"),
             Column("sequence", "Seq", "int"), Column("position", "Pos", "int"), Column("token_id", "Token id", "int"),
             Column("text", "Text", "token"), Column(f"top1_{a}", f"Top-1 {latex_escape(a)}", "int"),
             Column(f"top1_{b}", f"Top-1 {latex_escape(b)}", "int"), Column("top1_changed", "Top-1 moved", "str"),
             Column(f"experts_{a}", f"Top-{k} {latex_escape(a)}", "str"),
             Column(f"experts_{b}", f"Top-{k} {latex_escape(b)}", "str")]
    n = r.sizes["change"]
    get = {name: np.asarray(r[name].values) for name in r.data_vars if r[name].dims and r[name].dims[0] == "change"}
    trows = [[int(get["change_token"][i]), int(get["change_layer"][i]),
              int(get["sequence"][i]) if "sequence" in get else None,
              int(get["position"][i]) if "position" in get else None,
              int(get["token_id"][i]) if "token_id" in get else None, str(get["text"][i]),
              int(get["top1_a"][i]), int(get["top1_b"][i]), "yes" if bool(get["top1_moved"][i]) else "no",
              " ".join(map(str, get["experts_a"][i].tolist())), " ".join(map(str, get["experts_b"][i].tolist()))]
             for i in range(n)]
    tnotes = [f"{r.attrs['n_changes']} (token, layer) pairs changed their top-1 expert or top-{k} set"
              + (f"; the first {r.attrs['changes_listed']} are listed" if r.attrs["changes_truncated"] else ""),
              notes[0]]
    tokens = Table("routing_shift_tokens", tcols, trows, f"Tokens whose routing changed: {b} against {a}.", tnotes)
    return per_layer, tokens


def importance_table(imp: xr.Dataset) -> Table:
    """Causal vs observational expert importance (:func:`workbench.analysis.expert_importance`): per
    (MoE layer, expert) the load share, mean contribution norm, loss increase and KL when blocked, and
    the ranks of the load share and of the loss increase within the layer (1 = largest); the
    Spearman correlations per layer and overall are in the notes."""
    need = ("load_share", "mean_norm", "delta_loss", "kl")
    missing = [k for k in need if k not in imp.variables]
    if missing:
        raise ExportError(f"importance: the dataset lacks {missing}; pass the result of "
                          "workbench.analysis.expert_importance (or its netCDF file)")
    cols = [Column("layer", "Layer", "int"), Column("expert", "Expert", "int"), Column("load_share", "Load share"),
            Column("mean_norm", r"Mean $\|c\|$"), Column("delta_loss", r"$\Delta$ loss (blocked)", digits=4),
            Column("kl", "KL (blocked)", digits=4), Column("rank_load", "Rank load", "int"),
            Column("rank_delta_loss", r"Rank $\Delta$ loss", "int")]
    rows = []
    notes = ["observational: load share f_i = (1/kT) sum_t 1[i in S_t]; mean ||c|| = mean L2 norm of the expert's "
             "contribution SwiGLU_i(w x) where chosen (NaN: never chosen)",
             "causal: delta loss = next-token loss (nats) with the expert blocked (router logit -inf) - plain; "
             "KL = mean KL(p_plain || p_blocked)"]
    for li, layer in enumerate(np.asarray(imp["layer"].values)):
        load = imp["load_share"].values[li]
        dl = imp["delta_loss"].values[li]
        rank_load = _desc_rank(load)
        rank_dl = _desc_rank(dl)
        for xi, e in enumerate(np.asarray(imp["expert"].values)):
            rows.append([int(layer), int(e), float(load[xi]), float(imp["mean_norm"].values[li, xi]), float(dl[xi]),
                         float(imp["kl"].values[li, xi]), int(rank_load[xi]), int(rank_dl[xi])])
        if "rho_load" in imp.variables:
            notes.append(f"layer {int(layer)}: Spearman rho(load, delta loss) = {float(imp['rho_load'].values[li]):.3f}"
                         f", rho(mean norm, delta loss) = {float(imp['rho_norm'].values[li]):.3f}")
    for key in ("rho_load", "rho_norm", "rho_contribution"):
        if key in imp.attrs:
            notes.append(f"all layers: Spearman {key} = {float(imp.attrs[key]):.3f}")
    return Table("causal_vs_observational", cols, rows,
                 "Expert importance: observational (load, contribution norm) vs causal (loss increase when blocked).",
                 notes)


def _desc_rank(v: np.ndarray) -> np.ndarray:
    """1 = the largest value (ties: first index first); NaN last."""
    key = np.where(np.isnan(v), -np.inf, v)
    order = np.lexsort((np.arange(v.size), -key))
    r = np.empty(v.size, np.int64)
    r[order] = np.arange(1, v.size + 1)
    return r
