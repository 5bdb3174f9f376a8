"""workbench.export: figures (PDF/SVG/PNG), tables (CSV/LaTeX), NetCDF/Parquet subsets, HTML report,
provenance in every file, the `workbench export` CLI and its errors.

Two traces: a synthetic one written with TraceWriter (top-2, router logits, a vocabulary with
LaTeX/HTML-hostile tokens, mixed modalities) and one recorded with wb.record from a tiny random
multimodal Llama 4 (top-1, no logits, cross-modal attention maps).
"""
from __future__ import annotations

import csv
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.analysis import (domain_specialization, load_imbalance, router_entropy, vocab_specialization)
from workbench.export import (ArtifactSkipped, ExportError, export_all, export_attention, export_entropy,
                              export_vocab_tables, latex_escape, trace_fingerprint)
from workbench.trace import TraceWriter, open_trace
from workbench.trace.schema import routing_layout

ROOT = Path(__file__).resolve().parents[1]
NASTY = ["a_b%", "\\x", "</script><script>alert(1)</script>", " the", "$x^2$ & {y}", "line\nbreak", "#~^"]
VOCAB = [f"tok{i}" for i in range(24)] + NASTY
LAYERS = [1, 3, 5]
E, K = 6, 2
SEQ_LEN = (30, 25, 20)
LABELS = {0: "code", 1: "prose", 2: "code"}


def make_synthetic(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = TraceWriter.create(path, **routing_layout(LAYERS, E, K, logits_dtype="float16"),
                           attrs={"model_config": {"architectures": ["Llama4ForCausalLM"]}, "inputs_hash": "in0123",
                                  "checkpoint_path": "/ckpt/tiny", "checkpoint_fingerprint": "ck4567",
                                  "tokenizer_hash": "tk89"},
                           vocab=VOCAB)
    for s, T in enumerate(SEQ_LEN):
        ids = rng.integers(0, len(VOCAB), T).astype(np.int32)
        if s == 0:  # every hostile token occurs, at the start of sequence 0 (shown by the routing views)
            ids[1:1 + len(NASTY)] = np.arange(24, 24 + len(NASTY))
        lg = rng.normal(size=(T, len(LAYERS), E)).astype(np.float32)
        top = np.argsort(-lg, axis=-1)[..., :K]
        wt = (1 / (1 + np.exp(-np.take_along_axis(lg, top, -1)))).astype(np.float32)
        mod = np.zeros(T, np.int8)
        mod[10:16] = 1
        mod[0] = 2
        w.append(token_id=ids, sequence=np.full(T, s, np.int32), position=np.arange(T, dtype=np.int32),
                 modality=mod, topk_expert=top.astype(np.int16), topk_weight=wt, router_logits=lg)
    w.close()
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "syn.zarr")


@pytest.fixture(scope="module")
def syn_export(syn, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_out") / "paper"
    res = export_all(syn, out, labels=LABELS, vocab_min_count=1, progress=False)
    return out, res


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny random multimodal Llama 4 (top-1, 8 experts), recorded with router + attention."""
    import torch

    from tests.hf_reference import IMAGE_TOKEN, TEXT, VISION
    from workbench.checkpoint import random_model, save_model
    from workbench.models.llama4.config import ModelConfig

    d = tmp_path_factory.mktemp("rec")
    cfg = ModelConfig.from_dict({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                                 "text_config": dict(TEXT), "vision_config": dict(VISION),
                                 "image_token_index": IMAGE_TOKEN})
    save_model(random_model(cfg, seed=1, std=0.2), d / "ckpt", cfg)
    model = wb.load_model(d / "ckpt", progress=False)
    store = d / "rec.zarr"
    # 12 patch tokens = 3 tiles of 2 x 2 tokens (56 px tiles): a 1 x 2 grid plus the global thumbnail
    ids = torch.tensor([[1, 10, 11, 12] + [IMAGE_TOKEN] * 12 + list(range(20, 30)) + [2]])
    with torch.no_grad(), wb.record(model, store, capture=("router", "attention"), provenance={"inputs_hash": "rec42"}):
        model(input_ids=ids, pixel_values=torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
        model(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9, 2]]))
    return store


def fingerprint_of(store: Path) -> str:
    return trace_fingerprint(json.loads((store / "zarr.json").read_text())["attributes"])


# ----------------------------------------------------------------------------------- files
EXPECTED = (
    [f"figures/{n}.{e}" for n in ("load_heatmap", "imbalance", "entropy", "token_routing_seq0", "transitions_L1_L3",
                                  "coactivation_L1", "routing_by_position") for e in ("pdf", "svg", "png")]
    + [f"tables/{n}.{e}" for n in ("layer_metrics", "layer_metrics_by_modality", "routing_paths", "vocab_top_tokens",
                                   "vocab_specialization", "domain_specialization", "domain_shares")
       for e in ("csv", "tex")]
    + ["data/trace_subset.nc", "data/trace_subset.parquet", "report.html", "manifest.json"]
)


def test_export_all_writes_every_file(syn, syn_export):
    out, res = syn_export
    got = sorted(str(p.relative_to(out)) for p in res)
    assert got == sorted(EXPECTED)
    for rel in EXPECTED:
        assert (out / rel).stat().st_size > 0, rel
    assert set(res.skipped) == {"attention"} and "no cross-modal attention maps" in res.skipped["attention"]
    assert not [p for p in out.rglob("*") if ".partial" in p.name]  # atomic writes leave no temp files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["trace_fingerprint"] == fingerprint_of(syn)
    assert sorted(manifest["files"]) == sorted(r for r in EXPECTED if r != "manifest.json")
    assert manifest["skipped"] == res.skipped


def test_fingerprint_definition(syn):
    attrs = json.loads((syn / "zarr.json").read_text())["attributes"]
    keys = ("schema", "n_tokens", "n_commits", "moe_layers", "n_experts", "top_k", "routing", "variables", "captures")
    sub = {k: attrs.get(k) for k in keys}
    sub["provenance"] = {k: v for k, v in attrs["provenance"].items() if k != "updated"}
    blob = json.dumps(sub, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert fingerprint_of(syn) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    attrs2 = dict(attrs, provenance=dict(attrs["provenance"], updated="2099-01-01T00:00:00+00:00"), complete=False)
    assert trace_fingerprint(attrs2) == fingerprint_of(syn)  # reopening/closing does not change it
    assert trace_fingerprint(dict(attrs, n_tokens=attrs["n_tokens"] + 1)) != fingerprint_of(syn)


# --------------------------------------------------------------------------------- figures
def pdf_info(raw: bytes) -> dict:
    """Tiny PDF reader: page count, font subtypes, embedded font files, Info literal strings."""
    assert raw.startswith(b"%PDF-1.") and raw.rstrip().endswith(b"%%EOF")
    pages = [int(x) for x in re.findall(rb"/Type\s*/Pages\b.*?/Count\s+(\d+)", raw, re.S)]
    fonts = re.findall(rb"/Type\s*/Font\b[^>]*?/Subtype\s*/(\w+)|/Subtype\s*/(\w+)[^>]*?/Type\s*/Font\b", raw, re.S)
    subtypes = {(a or b).decode() for a, b in fonts}
    info = {}
    for key in (b"Title", b"Subject", b"Keywords", b"Creator"):
        m = re.search(rb"/" + key + rb"\s*\(((?:\\.|[^\\)])*)\)", raw, re.S)
        if m:
            info[key.decode()] = re.sub(rb"\\(.)", rb"\1", m.group(1)).decode("latin-1")
    return {"pages": pages, "font_subtypes": subtypes, "fontfile2": raw.count(b"/FontFile2"),
            "type3": len(re.findall(rb"/Subtype\s*/Type3", raw)), "info": info}


def test_pdf_opens_with_pages_embedded_truetype_and_provenance(syn, syn_export):
    out, _ = syn_export
    fp = fingerprint_of(syn)
    pdfs = sorted((out / "figures").glob("*.pdf"))
    assert len(pdfs) == 7
    for pdf in pdfs:
        d = pdf_info(pdf.read_bytes())
        assert d["pages"] == [1], pdf.name
        assert d["type3"] == 0, f"{pdf.name}: Type 3 font"
        assert d["font_subtypes"] and d["font_subtypes"] <= {"Type0", "CIDFontType2", "TrueType"}, d["font_subtypes"]
        assert d["fontfile2"] >= 1, f"{pdf.name}: TrueType font program not embedded"
        kw = d["info"]["Keywords"]
        for want in (f"trace_fingerprint={fp}", "model=Llama4ForCausalLM", "inputs_hash=in0123",
                     f"workbench_version={wb.__version__}", "exported=", f"artifact={pdf.stem}"):
            assert want in kw, (pdf.name, want)
        assert "MoE Workbench" in d["info"]["Creator"] and fp in d["info"]["Title"]


def test_svg_is_xml_with_provenance_and_text_as_paths(syn, syn_export):
    out, _ = syn_export
    fp = fingerprint_of(syn)
    ns = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
          "svg": "http://www.w3.org/2000/svg"}
    for svg in sorted((out / "figures").glob("*.svg")):
        root = ET.parse(svg).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.find(".//dc:identifier", ns).text == f"workbench-trace:{fp}"
        desc = root.find(".//dc:description", ns).text
        for want in (f"trace_fingerprint: {fp}", "inputs_hash: in0123", f"workbench_version: {wb.__version__}",
                     "model: Llama4ForCausalLM", "exported: "):
            assert want in desc, (svg.name, want)
        keywords = [li.text for li in root.findall(".//dc:subject/rdf:Bag/rdf:li", ns)]
        assert f"trace_fingerprint={fp}" in keywords
        assert root.find(".//svg:text", ns) is None  # svg.fonttype = "path": glyphs are paths


def test_png_has_text_chunks(syn, syn_export):
    from PIL import Image

    out, _ = syn_export
    fp = fingerprint_of(syn)
    for png in sorted((out / "figures").glob("*.png")):
        with Image.open(png) as im:
            im.load()
            text = dict(im.text)
            assert im.size[0] > 200
        assert text["trace_fingerprint"] == fp and text["inputs_hash"] == "in0123"
        assert text["workbench_version"] == wb.__version__ and text["model"] == "Llama4ForCausalLM"
        assert text["artifact"] == png.stem and text["exported"] and "MoE Workbench" in text["Software"]


# ---------------------------------------------------------------------------------- tables
def read_csv(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    comments = {}
    for line in lines:
        if not line.startswith("# "):
            break
        k, _, v = line[2:].rstrip("\n").partition(": ")
        comments.setdefault(k, v)
    body = [line for line in lines if not line.startswith("# ")]
    return comments, list(csv.DictReader(body))


def test_csv_values_equal_the_analysis_functions(syn, syn_export):
    out, _ = syn_export
    ds = open_trace(syn)
    fp = fingerprint_of(syn)
    com, rows = read_csv(out / "tables" / "layer_metrics.csv")
    assert com["trace_fingerprint"] == fp and com["inputs_hash"] == "in0123" and com["model"] == "Llama4ForCausalLM"
    assert com["workbench_version"] == wb.__version__ and com["exported"] and com["artifact"] == "layer_metrics"
    imb = load_imbalance(ds)
    ent = router_entropy(ds, source="logits", per_token=False)
    assert [int(r["layer"]) for r in rows] == LAYERS
    for i, r in enumerate(rows):
        for key in ("cv", "max_over_mean", "maxvio", "load_entropy"):
            assert float(r[key]) == float(imb[key].values[i]), key  # exact: written with repr
        assert float(r["router_entropy"]) == float(ent["mean_entropy"].values[i])
        assert int(r["n_tokens"]) == sum(SEQ_LEN)

    _, rows = read_csv(out / "tables" / "layer_metrics_by_modality.csv")
    split = load_imbalance(ds, by_modality=True)
    code = {"text": 0, "image": 1, "special": 2}
    assert {r["modality"] for r in rows} == {"text", "image", "special"}
    for r in rows:
        li = LAYERS.index(int(r["layer"]))
        assert float(r["cv"]) == float(split["cv"].values[code[r["modality"]], li])

    _, rows = read_csv(out / "tables" / "vocab_top_tokens.csv")
    vs = vocab_specialization(ds, min_count=1)
    assert rows
    for r in rows:
        p = vs["share"].sel(token_id=int(r["token_id"])).values[LAYERS.index(int(r["layer"])), int(r["expert"])]
        assert float(r["share"]) == float(p)
        assert r["token"] == VOCAB[int(r["token_id"])]  # raw token text, CSV-quoted (newlines included)
        assert int(r["count"]) == int(vs["count"].sel(token_id=int(r["token_id"])))
    _, rows = read_csv(out / "tables" / "vocab_specialization.csv")
    np.testing.assert_array_equal([float(r["score"]) for r in rows], vs["score"].values)

    dsp = domain_specialization(ds, LABELS)
    _, rows = read_csv(out / "tables" / "domain_shares.csv")
    assert len(rows) == 2 * len(LAYERS) * E
    for r in rows:
        assert float(r["share"]) == float(dsp["share"].sel(label=r["label"]).values[LAYERS.index(int(r["layer"])),
                                                                                   int(r["expert"])])
    _, rows = read_csv(out / "tables" / "domain_specialization.csv")
    np.testing.assert_array_equal([float(r["jsd"]) for r in rows], dsp["jsd"].values)


def tabular(path: Path) -> tuple[list[str], str, list[str]]:
    """(comment lines, column spec, body rows) of a booktabs tabular; checks the rule order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = [line for line in lines if line.startswith("%")]
    rest = [line for line in lines if not line.startswith("%")]
    m = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", rest[0])
    assert m, rest[0]
    assert rest[1] == r"\toprule" and rest[3] == r"\midrule" and rest[-2] == r"\bottomrule"
    assert rest[-1] == r"\end{tabular}"
    return comments, m.group(1), [rest[2]] + rest[4:-2]


def cells(row: str) -> list[str]:
    assert row.endswith(r" \\")
    return re.split(r"(?<!\\) & ", row[:-3])


def test_latex_tables_structure_and_escaping(syn, syn_export, tmp_path):
    out, _ = syn_export
    fp = fingerprint_of(syn)
    comments, spec, rows = tabular(out / "tables" / "layer_metrics.tex")
    assert f"% trace_fingerprint: {fp}" in comments and "% inputs_hash: in0123" in comments
    assert len(spec) == 7 and len(rows) == 1 + len(LAYERS)
    assert all(len(cells(r)) == len(spec) for r in rows)
    assert [cells(r)[0] for r in rows[1:]] == [str(x) for x in LAYERS]

    # every hostile token in the vocabulary table, escaped, one table row per (layer, expert)
    res = export_vocab_tables(syn, tmp_path / "v", vocab_top=100, vocab_min_count=1)
    _, spec, rows = tabular(tmp_path / "v" / "tables" / "vocab_top_tokens.tex")
    assert spec == "rrrl" and len(rows) == 1 + len(LAYERS) * E
    assert all(len(cells(r)) == 4 for r in rows)
    body = "\n".join(rows)
    for raw, esc in [("a_b%", r"\texttt{a\_b\%}"), ("\\x", r"\texttt{\textbackslash{}x}"),
                     ("$x^2$ & {y}", r"\texttt{\$x\textasciicircum{}2\$\textvisiblespace{}\&\textvisiblespace{}\{y\}}"),
                     (" the", r"\texttt{\textvisiblespace{}the}"), ("line\nbreak", r"\texttt{line\textbackslash{}nbreak}"),
                     ("#~^", r"\texttt{\#\textasciitilde{}\textasciicircum{}}"),
                     ("</script>", r"\textless{}/script\textgreater{}")]:
        assert esc in body, raw
    # no unescaped special character left in any cell
    stripped = re.sub(r"\\(textbackslash|textasciitilde|textasciicircum|textless|textgreater|textbar|"
                      r"textvisiblespace|texttt|textit)\b(\{\})?|\\[&%$#_{}]|\$p\(i\\mid v\)\$|\$f_i\$", "", body)
    stripped = stripped.replace(" & ", " ").replace(r" \\", "")
    assert not re.search(r"[&%$#_^~\\]", stripped), stripped[:400]
    assert [p.name for p in res] == ["vocab_top_tokens.csv", "vocab_top_tokens.tex", "vocab_specialization.csv",
                                     "vocab_specialization.tex"]
    assert latex_escape("a_b%") == r"a\_b\%" and latex_escape("\\x") == r"\textbackslash{}x"


# -------------------------------------------------------------------------------- data
SEL = dict(layers=[1, 5], sequences=[0, 2], tokens=(3, 70))


def expected_subset(store: Path):
    ds = open_trace(store, tokens=True)
    seq = ds["sequence"].values
    rows = np.intersect1d(np.flatnonzero(np.isin(seq, SEL["sequences"])), np.arange(*SEL["tokens"]))
    return ds.isel(moe_layer=[0, 2], token=rows).load(), rows


@pytest.mark.parametrize("engine", ["h5netcdf", "scipy"])
def test_netcdf_roundtrip(syn, tmp_path, monkeypatch, engine):
    import workbench.export.data as data

    monkeypatch.setattr(data, "netcdf_engine", lambda: engine)  # scipy = the fallback without h5py
    res = export_all(syn, tmp_path / "o", what="netcdf", progress=False, **SEL)
    nc = tmp_path / "o" / "data" / "trace_subset.nc"
    assert nc in res
    want, rows = expected_subset(syn)
    with xr.open_dataset(nc, engine=engine) as got:
        got = got.load()
    np.testing.assert_array_equal(got["token_index"].values, rows)
    np.testing.assert_array_equal(got["layer"].values, [1, 5])
    for name in ("token_id", "sequence", "position", "modality", "topk_expert", "topk_weight"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
        assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got["router_logits"].values, want["router_logits"].values.astype(np.float32))
    assert got["token_text"].values.tolist() == want["token_text"].values.tolist()
    assert got.attrs["trace_fingerprint"] == fingerprint_of(syn) and got.attrs["inputs_hash"] == "in0123"
    assert got.attrs["netcdf_engine"] == engine
    assert got.attrs["selection"] == "layers=1,5; sequences=0,2; tokens=3:70"
    assert json.loads(got.attrs["trace_provenance"]) == json.loads(json.dumps(open_trace(syn).attrs["provenance"]))


def test_parquet_roundtrip(syn, tmp_path):
    import pyarrow.parquet as pq

    export_all(syn, tmp_path / "o", what="parquet", progress=False, **SEL)
    t = pq.read_table(tmp_path / "o" / "data" / "trace_subset.parquet")
    want, rows = expected_subset(syn)
    n, L = rows.size, 2
    assert t.num_rows == n * L
    c = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names if name != "router_logits"}
    np.testing.assert_array_equal(c["token_index"].reshape(n, L)[:, 0], rows)
    np.testing.assert_array_equal(c["layer"].reshape(n, L), np.tile([1, 5], (n, 1)))
    for name in ("token_id", "sequence", "position", "modality"):
        np.testing.assert_array_equal(c[name].reshape(n, L)[:, 0], want[name].values)
    experts = np.stack([c[f"expert_{j}"] for j in range(K)], -1).reshape(n, L, K)
    weights = np.stack([c[f"weight_{j}"] for j in range(K)], -1).reshape(n, L, K)
    np.testing.assert_array_equal(experts, want["topk_expert"].values)
    np.testing.assert_array_equal(weights, want["topk_weight"].values)
    logits = np.asarray(t.column("router_logits").combine_chunks().flatten()).reshape(n, L, E)
    np.testing.assert_array_equal(logits, want["router_logits"].values.astype(np.float32))
    assert c["token"].reshape(n, L)[:, 0].tolist() == want["token_text"].values.tolist()
    meta = t.schema.metadata
    prov = json.loads(meta[b"workbench.provenance"])
    assert prov["trace_fingerprint"] == fingerprint_of(syn) and prov["inputs_hash"] == "in0123"
    assert prov["workbench_version"] == wb.__version__ and prov["exported"]
    assert json.loads(meta[b"workbench.trace_provenance"])["checkpoint_fingerprint"] == "ck4567"


# ------------------------------------------------------------------------------- report
class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.scripts, self.meta, self.tags, self.images = [], 0, {}, set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href", "data", "srcset", "poster", "action"):
            if a.get(key) and not (tag == "img" and key == "src" and a[key].startswith("data:image/png;base64,")):
                self.refs.append((tag, key, a[key]))  # inline images (data URIs) fetch nothing
            elif a.get(key):
                self.images.append(a)
        if tag == "meta" and a.get("name"):
            self.meta[a["name"]] = a.get("content")


def test_html_report_is_self_contained_with_provenance(syn, syn_export):
    out, _ = syn_export
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Refs()
    p.feed(text)
    assert p.refs == []  # no <script src>, <link href>, <img src>, <iframe src> ...: nothing to fetch
    assert "link" not in p.tags and "iframe" not in p.tags
    assert not re.search(r"@import|url\(\s*['\"]?https?:", text.split("<body>")[0])  # CSS fetches nothing
    assert p.scripts >= 4 and len(text) > 1_000_000 and "Plotly.newPlot" in text
    import plotly

    assert re.search(r"plotly\.js v\d", text)  # the bundle itself is inlined
    fp = fingerprint_of(syn)
    assert p.meta["workbench:trace_fingerprint"] == fp and p.meta["workbench:inputs_hash"] == "in0123"
    assert f"<td>{fp}</td>" in text and "<td>in0123</td>" in text
    for title in ("Expert load", "Load imbalance", "Token routing", "Per-layer metrics", "Provenance"):
        assert f"<h2>{title}</h2>" in text
    assert "<script>alert(1)" not in text and "alert(1)" in text  # token text is escaped
    assert plotly.__version__


def test_html_report_shows_static_figures_first(syn, syn_export):
    """Every figure is a static PNG first (data URI), the plotly layer shown only where scripts run."""
    import base64
    import io

    from PIL import Image

    out, _ = syn_export
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Refs()
    p.feed(text)
    static = [a for a in p.images if a.get("class") == "wb-static"]
    assert len(static) == 3 == text.count('<div class="wb-fig">')  # load, imbalance, token routing
    for a in static:
        im = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert im.format == "PNG" and im.size[0] > 300
    head = text.split("</head>")[0]
    assert "classList.add('wb-js')" in head  # the interactive layer replaces them only when scripts run
    assert ".wb-fig .wb-live{display:none}" in head and ".wb-js .wb-fig img.wb-static{display:none}" in head


# ------------------------------------------------------------------- recorded multimodal
def test_recorded_trace_attention_and_skips(recorded, tmp_path):
    out = tmp_path / "rec_out"
    res = export_all(recorded, out, what="figures,report", progress=False)
    names = {p.name for p in res}
    assert {"attention_seq0_L3_img0.pdf", "attention_seq0_L3_img0.svg", "attention_seq0_L3_img0.png",
            "load_heatmap.pdf", "token_routing_seq0.png", "report.html"} <= names
    assert set(res.skipped) == {"entropy", "coactivation"}
    assert "router_logits" in res.skipped["entropy"] and "k = 1" in res.skipped["coactivation"]
    report = (out / "report.html").read_text()
    assert "entropy: router entropy figure skipped" in report
    assert "inputs_hash=rec42" in pdf_info((out / "figures" / "attention_seq0_L3_img0.pdf").read_bytes())["info"]["Keywords"]
    ck = open_trace(recorded).attrs["provenance"]["checkpoint_fingerprint"]
    assert f"checkpoint_fingerprint={ck}" in pdf_info((out / "figures" / "load_heatmap.pdf").read_bytes())["info"]["Keywords"]

    with pytest.raises(ArtifactSkipped, match="router_logits"):
        export_entropy(recorded, tmp_path / "e")
    # on the pixels: a 1 x 2 tile grid plus the global thumbnail = the 12 patch tokens of the image
    info = dict(original_size=(50, 100), grid=(1, 2), resized_size=(56, 112), has_global_tile=True, tile_size=56,
                token_grid=(2, 2))
    img = np.random.default_rng(0).integers(0, 255, (50, 100, 3)).astype(np.uint8)
    paths = export_attention(recorded, tmp_path / "px", image=img, image_info=info, attention_layer=1, formats=["pdf"])
    assert [p.name for p in paths] == ["attention_seq0_L1_img0.pdf"]
    assert pdf_info(paths[0].read_bytes())["pages"] == [1]
    with pytest.raises(ExportError, match="describes 8 patch tokens but image 0 of sequence 0 has 12"):
        export_attention(recorded, tmp_path / "px2", image=img, image_info=dict(info, grid=(1, 1), resized_size=(28, 56)))
    with pytest.raises(ExportError, match="image_info: resized_size"):
        export_attention(recorded, tmp_path / "px4", image=img, image_info=dict(info, grid=(1, 1)))
    with pytest.raises(ExportError, match="no attention maps; sequences with maps: \\[0\\]"):
        export_attention(recorded, tmp_path / "px3", sequence=1)
    # the synthetic trace has none: a clear skip
    res = export_all(recorded, tmp_path / "seq1", what="attention", sequences=[1], progress=False)
    assert "none of the selected sequences has attention maps" in res.skipped["attention"]


# ---------------------------------------------------------------------------- errors
def test_api_errors_are_clear(syn, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_all(tmp_path / "nowhere.zarr", tmp_path / "o", progress=False)
    with pytest.raises(wb.trace.NotATraceError, match="not a trace"):
        export_all(tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(ExportError, match="exists and is a file"):
        export_all(syn, afile, progress=False)
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_all(syn, afile / "sub", progress=False)
    with pytest.raises(ExportError, match="unknown export item 'figurs'"):
        export_all(syn, tmp_path / "o", what="figurs", progress=False)
    with pytest.raises(ExportError, match=r"layer 2 is not a MoE layer of this trace; MoE layers .*\[1, 3, 5\]"):
        export_all(syn, tmp_path / "o", layers=[1, 2], progress=False)
    with pytest.raises(ExportError, match=r"sequence\(s\) \[7\] are not in this trace"):
        export_all(syn, tmp_path / "o", sequences="0,7", progress=False)
    with pytest.raises(ExportError, match="holds no tokens"):
        export_all(syn, tmp_path / "o", sequences=[0], tokens="40:50", progress=False)
    with pytest.raises(ExportError, match="unknown figure format"):
        export_all(syn, tmp_path / "o", formats=["eps"], progress=False)
    assert not (tmp_path / "o").exists()  # a refused request creates nothing
    with pytest.raises(ExportError, match="sequence 5 is not in the selection"):
        export_all(syn, tmp_path / "o2", sequence=5, progress=False)
    with pytest.raises(ExportError, match="transitions: layer 3 is not a MoE layer of the selection"):
        export_all(syn, tmp_path / "o2", layers=[1, 5], transitions=(1, 3), progress=False)
    assert not list((tmp_path / "o2").iterdir())
    res = export_all(syn, tmp_path / "one", what="transitions", layers=[3], progress=False)
    assert "single MoE layer" in res.skipped["transitions"]


def test_layer_arguments_are_decoder_layers(syn, recorded, tmp_path):
    """Every layer argument of workbench.export is a decoder layer index; a layer that is not a MoE
    layer (LAYERS = [1, 3, 5]: 0, 2, 4 are dense, 6 does not exist) is an ExportError."""
    from workbench.export import (export_coactivation, export_transitions, plot_coactivation,
                                  plot_transitions)

    ds = open_trace(syn)
    for bad in (0, 2, 4, 6):
        with pytest.raises(ExportError, match=rf"layer {bad} is not a MoE layer of this trace"):
            export_all(syn, tmp_path / "o", layers=[1, bad], progress=False)
        with pytest.raises(ExportError, match=rf"transitions: layer {bad} is not a MoE layer.*\[1, 3, 5\]"):
            export_all(syn, tmp_path / "o", transitions=(1, bad), progress=False)
        with pytest.raises(ExportError, match=rf"coactivation_layer: layer {bad} is not a MoE layer"):
            export_all(syn, tmp_path / "o", coactivation_layer=bad, progress=False)
        with pytest.raises(ExportError, match=rf"transitions: layer {bad} is not a MoE layer"):
            export_transitions(syn, tmp_path / "o", transitions=(bad, 3))
        with pytest.raises(ExportError, match=rf"coactivation: layer {bad} is not a MoE layer"):
            export_coactivation(syn, tmp_path / "o", coactivation_layer=bad)
        with pytest.raises(ExportError, match=rf"layer {bad} is not a MoE layer"):
            plot_transitions(ds, 1, bad)
        with pytest.raises(ExportError, match=rf"layer {bad} is not a MoE layer"):
            plot_coactivation(ds, bad)
    for bad in ([1.5], [True], ["x"]):  # int(1.5) == 1 and True == 1 would silently select layer 1
        with pytest.raises(ExportError, match="layers: "):
            export_all(syn, tmp_path / "o", layers=bad, progress=False)
    for bad in (1.0, True, "3"):
        with pytest.raises(ExportError, match="must be a decoder layer index"):
            export_all(syn, tmp_path / "o", coactivation_layer=bad, progress=False)
        with pytest.raises(ExportError, match="must be a decoder layer index"):
            plot_transitions(ds, bad, 5)
    for bad in ((1,), (1, 3, 5), 3):
        with pytest.raises(ExportError, match="transitions: expected two MoE layers"):
            export_transitions(syn, tmp_path / "o", transitions=bad)
        with pytest.raises(ExportError, match="transitions: expected two MoE layers"):
            export_all(syn, tmp_path / "o", transitions=bad, progress=False)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.*"))  # refused: nothing written
    # numpy integers are decoder indices too: layers 1 and 5, not positions 1 and 5
    paths = export_transitions(syn, tmp_path / "np", transitions=(np.int64(1), np.int32(5)), formats=["png"])
    assert [p.name for p in paths] == ["transitions_L1_L5.png"]
    # top-1 trace: a bad layer is a bad request (ExportError), not a skipped artifact
    moe = [int(x) for x in open_trace(recorded)["layer"].values]
    with pytest.raises(ExportError, match=rf"coactivation: layer 7 is not a MoE layer.*{moe}".replace("[", r"\[")):
        export_coactivation(recorded, tmp_path / "rc", coactivation_layer=7)
    with pytest.raises(ArtifactSkipped, match="k = 1"):
        export_coactivation(recorded, tmp_path / "rc", coactivation_layer=moe[0])
    # attention_layer: a decoder layer with recorded maps (refused before anything is written)
    with pytest.raises(ExportError, match=r"recorded at decoder layers \[.*\], not 7"):
        export_all(recorded, tmp_path / "ra", attention_layer=7, progress=False)
    with pytest.raises(ExportError, match="attention layer must be a decoder layer index"):
        export_all(recorded, tmp_path / "ra", attention_layer=1.0, progress=False)
    assert not list((tmp_path / "ra").iterdir())
    res = export_all(syn, tmp_path / "sa", what="attention", attention_layer=7, progress=False)
    assert "no cross-modal attention maps" in res.skipped["attention"]  # nothing to draw: the layer is moot


# ------------------------------------------------------------------------------- CLI
def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workbench.cli", "export", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_export_end_to_end(syn, tmp_path):
    out = tmp_path / "cli"
    r = run_cli(syn, "--out", out, "--what", "transitions,attention,tables,parquet", "--layers", "1,5",
                "--sequences", "0,2", "--formats", "pdf,png", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "skipped attention: attention overlay skipped" in r.stderr and "wrote 14 files" in r.stdout
    assert (out / "figures" / "transitions_L1_L5.pdf").is_file() and not list(out.glob("figures/*.svg"))
    assert (out / "data" / "trace_subset.parquet").is_file() and not (out / "report.html").exists()
    assert not (out / "tables" / "domain_shares.csv").exists()  # no --labels: no domain tables
    com, rows = read_csv(out / "tables" / "layer_metrics.csv")
    assert [int(x["layer"]) for x in rows] == [1, 5]
    assert com["selection"] == "layers=1,5; sequences=0,2; tokens=all"
    ds = open_trace(syn)
    sub = ds.isel(moe_layer=[0, 2], token=np.flatnonzero(np.isin(ds["sequence"].values, [0, 2])))
    assert [float(x["cv"]) for x in rows] == load_imbalance(sub)["cv"].values.tolist()

    r = run_cli(syn, "--out", tmp_path / "bad", "--layers", "4", "--quiet")
    assert r.returncode == 2 and "layer 4 is not a MoE layer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--out", "{tmp}/o"], "does not exist"),
    (["{tmp}", "--out", "{tmp}/o"], "not a trace"),
    (["{syn}", "--out", "{file}"], "exists and is a file"),
    (["{syn}", "--out", "{tmp}/o", "--what", "figures,bogus"], "unknown export item 'bogus'"),
    (["{syn}", "--out", "{tmp}/o", "--sequences", "9"], "not in this trace"),
    (["{syn}", "--out", "{tmp}/o", "--tokens", "9"], "START:STOP"),
    (["{syn}", "--out", "{tmp}/o", "--labels", "{tmp}/none.json", "--what", "domain"], "labels file"),
])
def test_cli_errors(syn, tmp_path, capsys, args, message):
    from workbench.cli import main

    f = tmp_path / "file.txt"
    f.write_text("x")
    sub = {"missing": tmp_path / "missing.zarr", "tmp": tmp_path, "syn": syn, "file": f}
    rc = main(["export", *[a.format(**sub) for a in args], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("workbench export: error:"), err


def test_read_labels_formats(tmp_path):
    from workbench.export import read_labels

    (tmp_path / "m.json").write_text('{"0": "code", "2": "math"}')
    (tmp_path / "l.json").write_text('["code", "prose"]')
    (tmp_path / "p.jsonl").write_text('{"text": "a", "domain": "code"}\n\n{"text": "b", "label": "prose"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    assert read_labels(tmp_path / "m.json") == {0: "code", 2: "math"}
    assert read_labels(tmp_path / "l.json") == {0: "code", 1: "prose"}
    assert read_labels(tmp_path / "p.jsonl") == {0: "code", 1: "prose"}
    with pytest.raises(ExportError, match="bad.jsonl:2: not valid JSON"):
        read_labels(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------- escaping once, identity colors, scales
QUOTY = ['"', 'say "hi"', "<b>bold</b>", "a & b", "it's", "&quot;"]


def _quoty_trace(path: Path, n_experts: int = 6, k: int = 2, n: int = 24) -> Path:
    rng = np.random.default_rng(5)
    vocab = [f"t{i}" for i in range(10)] + QUOTY
    with TraceWriter.create(path, **routing_layout(LAYERS, n_experts, k), vocab=vocab) as w:
        ids = rng.integers(0, 10, n).astype(np.int32)
        ids[:len(QUOTY)] = np.arange(10, 10 + len(QUOTY))
        top = np.stack([np.stack([rng.permutation(n_experts)[:k] for _ in LAYERS]) for _ in range(n)]).astype(np.int16)
        w.append(token_id=ids, sequence=np.zeros(n, np.int32), position=np.arange(n, dtype=np.int32),
                 modality=np.zeros(n, np.int8), topk_expert=top,
                 topk_weight=rng.random((n, len(LAYERS), k)).astype(np.float32))
    return path


def test_report_plotly_text_is_escaped_exactly_once(tmp_path):
    """Tick labels and hover text of the report's token routing figure show `"`, `<`, `&` tokens as
    themselves: escaped once for plotly's tag parser (`& < >`), never `&quot;` (plotly does not decode it)."""
    from workbench.export.report import _routing_figure

    ds = open_trace(_quoty_trace(tmp_path / "q.zarr"), tokens=True)
    fig = _routing_figure(ds, 0, 64)
    ticks = list(fig.layout.xaxis.ticktext)
    hover = [x for row in fig.data[0].text for x in row]
    for s in ticks + hover:
        assert "&quot;" not in s.replace("&amp;quot;", ""), s
        assert "&#x27;" not in s and "<b>bold" not in s
    assert ticks[:6] == ['"', 'say "hi"', "&lt;b&gt;bold&lt;/b&gt;", "a &amp; b", "it's", "&amp;quot;"]
    assert 'say "hi"' in hover[1] and "&lt;b&gt;bold&lt;/b&gt;" in hover[2]


def test_report_token_routing_has_a_categorical_key_not_a_colorbar(tmp_path):
    from workbench.export.report import _routing_figure
    from workbench.widgets._palette import CATEGORICAL, NEUTRAL

    ds = open_trace(_quoty_trace(tmp_path / "q6.zarr"), tokens=True)
    fig = _routing_figure(ds, 0, 64)
    assert fig.data[0].showscale is False  # identity is not a magnitude: no colorbar (whose 16 ticks collided)
    keys = [tr for tr in fig.data[1:] if tr.showlegend]
    assert [tr.name.split(" (")[0] for tr in keys] == [f"expert {e}" for e in range(6)]
    assert [tr.marker.color for tr in keys] == list(CATEGORICAL[:6])
    # 128 experts: grey, the most used highlighted and named, one entry for the others
    ds = open_trace(_quoty_trace(tmp_path / "q128.zarr", n_experts=128, k=1), tokens=True)
    fig = _routing_figure(ds, 0, 64)
    names = [tr.name for tr in fig.data[1:]]
    assert len(names) == 9 and names[-1].startswith("other ") and fig.data[-1].marker.color == NEUTRAL


def test_transitions_color_scale_fits_the_data(syn):
    from workbench.analysis import layer_transitions
    from workbench.export.figures import plot_transitions

    ds = open_trace(syn)
    fig = plot_transitions(ds, 1, 3)
    im = next(i for a in fig.axes for i in a.images if i.get_array().shape == (E, E))  # not the expert strips
    vmin, vmax = im.get_clim()
    P = layer_transitions(ds, 1, 3).values
    assert vmin == 0 and vmax == pytest.approx(float(np.nanmax(P))) and vmax < 1.0


def test_token_routing_figure_with_128_experts_names_the_highlighted(tmp_path):
    from matplotlib.colors import to_hex

    from workbench.export.figures import plot_token_routing
    from workbench.widgets._palette import CATEGORICAL

    ds = open_trace(_quoty_trace(tmp_path / "r128.zarr", n_experts=128, k=1), tokens=True)
    fig = plot_token_routing(ds, 0)
    leg = fig.legends[0]
    labels = [t.get_text() for t in leg.get_texts()]
    experts = [lab for lab in labels if lab.startswith("expert ")]
    assert len(experts) == 8 and any(lab.startswith("other ") for lab in labels)
    colors = [to_hex(h.get_facecolor()).upper() for h, lab in zip(leg.legend_handles, labels)
              if lab.startswith("expert ")]
    assert colors == [c.upper() for c in CATEGORICAL[:8]]


def test_routing_paths_table_equals_the_analysis(syn, tmp_path):
    """The paper table lists routing_paths' top paths with their counts and shares."""
    import workbench as wb
    from workbench.export import export_routing_paths

    files = export_routing_paths(syn, tmp_path / "out")
    assert sorted(p.name for p in files) == ["routing_paths.csv", "routing_paths.tex"]
    want = wb.analysis.routing_paths(wb.open_trace(syn), top=20, by_modality=True)
    import csv
    rows = [r for r in csv.reader((tmp_path / "out" / "tables" / "routing_paths.csv").read_text().splitlines())
            if r and not r[0].startswith("#")]
    body = rows[1:]
    assert len(body) == want.sizes["path"]
    for i, r in enumerate(body):
        assert r[1] == " -> ".join(str(int(x)) for x in want["expert"].values[i])
        assert int(r[2]) == int(want["count"].values[i])
        assert float(r[3]) == pytest.approx(float(want["share"].values[i]), abs=1e-3)


# ------------------------------------------------------------------- the routing rule in every file kind
DS_RULE = ("s = sigmoid(logits); experts CHOSEN by s + b within the topk_group best of n_group groups; weight = s "
           "without b / their sum, times scale, applied to the expert OUTPUT (test rule)")
DS_ROUTING = "layers 1,3: n_experts=6, top_k=2, score=sigmoid, renormalize=True, weight_applied_to=output, " \
             "shared_expert=True, selection_bias=True, n_group=4, topk_group=2, scale=2.5"


def _routed_trace(path: Path, score: str) -> Path:
    """A 2-layer (decoder 1, 3), E = 6, top-2 trace with router logits and text + image tokens; ``score``
    ``"sigmoid"``: DeepSeek-V3's routing fields (selection bias, groups, scale), else a plain softmax."""
    from workbench.trace.schema import MoELayerRouting, logits_variable, routing_variables

    extra = (dict(selection_bias=True, n_group=4, topk_group=2, scale=2.5, renormalize=True) if score == "sigmoid"
             else {})
    routing = [MoELayerRouting(x, 6, 2, score=score, weight_applied_to="output", **extra) for x in (1, 3)]
    rng = np.random.default_rng(5)
    T = 24
    lg = rng.normal(size=(T, 2, 6)).astype(np.float32)
    top = np.argsort(-lg, axis=-1)[..., :2]
    variables = routing_variables(2, 6, 2) + [logits_variable(2, 6, "float32")]
    with TraceWriter.create(path, routing=routing, variables=variables,
                            routing_rule=DS_RULE if score == "sigmoid" else "softmax top-k (test rule)",
                            attrs={"model_config": {"architectures": ["DeepseekV3ForCausalLM"]}}) as w:
        rows = dict(token_id=rng.integers(0, 50, T).astype(np.int32),
                    sequence=np.repeat([0, 1], T // 2).astype(np.int32),
                    position=np.tile(np.arange(T // 2), 2).astype(np.int32),
                    modality=np.where(np.arange(T) % 3 == 0, 1, 0).astype(np.int8), topk_expert=top.astype(np.int16),
                    topk_weight=np.take_along_axis(1 / (1 + np.exp(-lg)), top, -1).astype(np.float32),
                    router_logits=lg)
        if "generated" in w.variables:  # schema v3: a per-token prompt/generated flag
            rows["generated"] = np.zeros(T, np.int8)
        w.append(**rows)
    return path


def _note_lines(path: Path, mark: str) -> list[str]:
    return [line[len(mark):] for line in path.read_text(encoding="utf-8").splitlines() if line.startswith(mark)]


def test_every_file_kind_states_the_routing_rule(tmp_path):
    """A DeepSeek-like (sigmoid, bias-corrected, grouped, scaled) trace: manifest, CSV, LaTeX, NetCDF, Parquet,
    report and figures name the rule; the router-entropy line and figure title carry the sigmoid caveat."""
    import pyarrow.parquet as pq
    from PIL import Image

    from workbench.export import plot_entropy

    store = _routed_trace(tmp_path / "ds.zarr", "sigmoid")
    out = tmp_path / "out"
    export_all(store, out, what="layer_metrics,layer_metrics_by_modality,entropy,netcdf,parquet,report",
               formats=("pdf", "png"), progress=False)
    caveat = router_entropy(open_trace(store), per_token=False).attrs["probabilities_are"]
    assert caveat.startswith("a convention: the model scores experts with a sigmoid")
    want_layers = [{"layer": x, "n_experts": 6, "top_k": 2, "score": "sigmoid", "renormalize": True,
                    "weight_applied_to": "output", "shared_expert": True, "selection_bias": True, "n_group": 4,
                    "topk_group": 2, "scale": 2.5} for x in (1, 3)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["routing"] == DS_ROUTING and manifest["provenance"]["routing_rule"] == DS_RULE
    assert manifest["trace_routing"] == {"layers": want_layers, "rule": DS_RULE}
    # CSV and LaTeX: provenance comment lines, and the caveat on the router_entropy line
    for name in ("layer_metrics", "layer_metrics_by_modality"):
        com, rows = read_csv(out / "tables" / f"{name}.csv")
        assert com["routing"] == DS_ROUTING and com["routing_rule"] == DS_RULE and rows
        for path, mark in ((out / "tables" / f"{name}.csv", "# note: "), (out / "tables" / f"{name}.tex", "% note: ")):
            ent = [n for n in _note_lines(path, mark) if n.startswith("router_entropy = ")]
            assert len(ent) == 1 and ent[0].endswith(f"; softmax(logits) is {caveat}"), path.name
        tex = (out / "tables" / f"{name}.tex").read_text()
        assert f"% routing: {DS_ROUTING}\n" in tex and f"% routing_rule: {DS_RULE}\n" in tex
    # NetCDF global attributes
    with xr.open_dataset(out / "data" / "trace_subset.nc") as nc:
        attrs = dict(nc.attrs)
    assert attrs["routing"] == DS_ROUTING and attrs["routing_rule"] == DS_RULE
    assert json.loads(attrs["trace_routing"]) == {"layers": want_layers, "rule": DS_RULE}
    # Parquet schema metadata
    meta = pq.read_schema(out / "data" / "trace_subset.parquet").metadata
    prov = json.loads(meta[b"workbench.provenance"])
    assert prov["routing"] == DS_ROUTING and prov["routing_rule"] == DS_RULE
    assert json.loads(meta[b"workbench.trace_routing"]) == {"layers": want_layers, "rule": DS_RULE}
    # report: meta tags, provenance table, the caveat under the metrics table
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Refs()
    p.feed(text)
    assert p.meta["workbench:routing"] == DS_ROUTING and p.meta["workbench:routing_rule"] == DS_RULE
    assert f"<td>routing_rule</td><td>{DS_RULE}</td>" in text
    assert html.escape(f"softmax(logits) is {caveat}") in text
    # figures: metadata, and the entropy title
    assert f"routing_rule={DS_RULE}" in pdf_info((out / "figures" / "entropy.pdf").read_bytes())["info"]["Keywords"]
    with Image.open(out / "figures" / "entropy.png") as im:
        im.load()
        assert im.text["routing"] == DS_ROUTING
    title = plot_entropy(open_trace(store)).axes[0].get_title(loc="left")
    assert f"softmax(logits) is {caveat}" in " ".join(title.split())


def test_softmax_trace_names_its_rule_without_the_caveat(tmp_path):
    from workbench.export import plot_entropy

    store = _routed_trace(tmp_path / "sm.zarr", "softmax")
    out = tmp_path / "out"
    export_all(store, out, what="layer_metrics", progress=False)
    com, _ = read_csv(out / "tables" / "layer_metrics.csv")
    assert com["routing"] == ("layers 1,3: n_experts=6, top_k=2, score=softmax, renormalize=False, "
                              "weight_applied_to=output, shared_expert=True")
    assert com["routing_rule"] == "softmax top-k (test rule)"
    ent = [n for n in _note_lines(out / "tables" / "layer_metrics.csv", "# note: ") if n.startswith("router_entropy")]
    assert ent == ["router_entropy = mean over tokens of H(softmax(router logits)) / log E; softmax(logits) is the "
                   "router's own distribution (the model applies a softmax over the logits)"]
    title = plot_entropy(open_trace(store)).axes[0].get_title(loc="left")
    assert title == "Router entropy of softmax(logits), 6 experts"


def test_subsets_hold_every_per_token_capture_and_name_what_they_leave_out(tmp_path):
    """A generation recorded with margin, expert norms, attribution and vectors: the NetCDF and Parquet
    subsets carry ``generated`` and every per-token capture over (token, moe_layer, k, expert) with the
    trace's values on the selected rows and layers; the vectors, over other dims, are named in a note."""
    import pyarrow.parquet as pq
    import torch

    from workbench.embedded import EMBEDDED_MODEL

    model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
    proc = wb.load_processor(EMBEDDED_MODEL)
    store = tmp_path / "gen.zarr"
    capture = {"router": {}, "margin": {}, "attribution": {}, "expert_out": {"vector_layers": [0]}}
    with wb.record(model, store, capture=capture, processor=proc) as rec:
        wb.generate(model, proc, ["The cat sat on", "Two plus two is"], 5, recorder=rec)
    ds = open_trace(store).load()
    layers = [int(x) for x in ds["layer"].values]
    extra = ["generated", "router_margin", "expert_out_norm", "shared_out_norm", "resid_norm", "attribution",
             "attribution_shared", "attribution_target"]
    assert all(n in ds for n in extra) and "expert_out_vec" in ds and ds["generated"].values.any()
    from workbench.export import ExportNote

    with pytest.warns(ExportNote, match="left out expert_out_vec"):
        res = export_all(store, tmp_path / "o", what=("netcdf", "parquet"), layers=[layers[1]], progress=False)
    want = ds.isel(moe_layer=[1])
    with xr.open_dataset(tmp_path / "o" / "data" / "trace_subset.nc") as got:
        got = got.load()
    for name in extra:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert "expert_out_vec" not in got
    assert any("left out expert_out_vec ('token', 'vector_layer', 'part', 'hidden')" in n for n in res.notes), res.notes
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sum("left out expert_out_vec" in n for n in manifest["notes"]) == 1  # once for both files

    t = pq.read_table(tmp_path / "o" / "data" / "trace_subset.parquet")
    n, K_ = ds.sizes["token"], ds.sizes["k"]
    assert t.num_rows == n  # one selected layer: a row per token
    col = lambda c: t.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    for name in ("generated", "attribution_target"):
        np.testing.assert_array_equal(col(name), ds[name].values, err_msg=name)
    for name in ("router_margin", "shared_out_norm", "resid_norm", "attribution_shared"):
        np.testing.assert_array_equal(col(name), want[name].values[:, 0], err_msg=name)
    for name in ("expert_out_norm", "attribution"):
        np.testing.assert_array_equal(np.stack([col(f"{name}_{j}") for j in range(K_)], -1),
                                      want[name].values[:, 0], err_msg=name)
    # written in row groups of a few tokens (the default is 16,384): the same table
    from workbench.export.data import subset_dataset, write_parquet
    from workbench.export._common import Selection

    sub = subset_dataset(ds, Selection.make(ds, layers=[layers[1]]), {"p": "1"})
    small = write_parquet(sub, tmp_path / "small.parquet", {"p": "1"}, block_tokens=7)
    t7 = pq.read_table(small)
    assert t7.num_rows == n and t7.num_rows > 7 * 3
    assert "generated" in t7.column_names and "expert_out_norm_0" in t7.column_names
    for c in t7.column_names:
        np.testing.assert_array_equal(np.asarray(t7.column(c).to_pylist(), dtype=object if c == "token" else None),
                                      np.asarray(t.column(c).to_pylist(), dtype=object if c == "token" else None), c)


def test_subsets_leave_out_per_token_variables_without_a_table_layout(tmp_path):
    """A registered capture writing (token, expert) and (token, k) variables: not in the subsets (the
    Parquet table has no layout for them), named in a note; the export completes."""
    from dataclasses import dataclass
    from typing import ClassVar

    import pyarrow.parquet as pq
    import torch

    from workbench.embedded import EMBEDDED_MODEL
    from workbench.export import ExportNote
    from workbench.hooks.captures import CAPTURES, _PerLayer, kept_rows, register_capture, to_host
    from workbench.trace.schema import TOKEN, Variable

    @dataclass(eq=False)
    class FirstLayer(_PerLayer):
        name: ClassVar[str] = "first_layer_test"
        keys: ClassVar[tuple] = ("router_logits", "topk_weights")

        def variables(self, spec):
            return [Variable("first_logits", (TOKEN, "expert"), (spec.n_experts,), "float32", codec="float",
                             capture=self.name),
                    Variable("first_w", (TOKEN, "k"), (spec.top_k,), "float32", codec="float", capture=self.name)]

        def finish(self):
            logits, w = self._stacked()
            return to_host(logits[:, 0].float()), to_host(w[:, 0].float())

        def rows(self, payload, keep):
            return {"first_logits": kept_rows(payload[0].numpy(), keep), "first_w": kept_rows(payload[1].numpy(), keep)}

    register_capture(FirstLayer)
    try:
        model = wb.load_model(EMBEDDED_MODEL, dtype=torch.float32, progress=False)
        proc = wb.load_processor(EMBEDDED_MODEL)
        store = tmp_path / "c.zarr"
        with wb.record(model, store, capture=("router", "margin", "first_layer_test"), processor=proc) as rec:
            rec.run(model, proc, ["hello there", "abc def"], progress=False)
    finally:
        CAPTURES.pop("first_layer_test", None)
    with pytest.warns(ExportNote, match=r"left out first_logits \('token', 'expert'\), first_w \('token', 'k'\)"):
        res = export_all(store, tmp_path / "o", what=("netcdf", "parquet"), progress=False)
    assert {p.name for p in res} >= {"trace_subset.nc", "trace_subset.parquet"}
    with xr.open_dataset(tmp_path / "o" / "data" / "trace_subset.nc") as got:
        assert "router_margin" in got and "first_logits" not in got and "first_w" not in got
    cols = pq.read_table(tmp_path / "o" / "data" / "trace_subset.parquet").column_names
    assert "router_margin" in cols and not any(c.startswith("first") for c in cols)
