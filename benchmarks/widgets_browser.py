"""Widget performance measured in a real browser (JupyterLab + Debian's Chromium via Playwright).

    .venv/bin/python benchmarks/widgets_browser.py [--tokens 1000000] [--root DIR] [--reps 15]

Builds (or reuses, with ``--root``) two synthetic traces with :class:`workbench.trace.TraceWriter`
- ``big.zarr``: 1,000,000 tokens, 48 MoE layers x 128 experts, top-1, batches of 8192 tokens
  (8 sequences of 1024), and ``tok10k.zarr``: 10,000 tokens, same shape, a 5,000-entry vocabulary -
and a small random Llama 4 checkpoint (4 MoE layers, 16 experts, top-1) for the live run.
Starts JupyterLab (127.0.0.1, random port and token, temporary config) and drives Chromium:

1. *Token view*: Shift+Enter on ``TokenRoutingView('tok10k.zarr')`` (the page's first view) to the
   512 token spans of the first page in the page.
2. *Open*: Shift+Enter on ``ExpertLoadDashboard('big.zarr')`` to the 48 x 128 heatmap, the metrics
   panel and the 128 bars drawn: first as the page's first plot (the ~4.8 MB plotly.js is sent and
   evaluated with it: once per page), then again with plotly.js loaded. The kernel imports were
   paid in an earlier cell and are reported separately.
3. *Control change*: in-page time (``performance.now()``) from the click / key / change event on a
   control to the ``plotly_afterplot`` event of the figure it changes, plus one animation frame:
   the "Show" toggle (count / share / deviation: a new 48 x 128 z), the layer slider (bars +
   highlight), the token filter (first time: one pass over the 1M tokens for all three
   modalities; then cached). Median, 90th percentile and max over ``--reps`` changes, and where the
   time went (the plot module's draw log): event to the figure's message (kernel round trip),
   waiting for other plots' draws, the Plotly call, and to the next frame.
4. *Live overhead*: in the kernel, the same recorded run (the random checkpoint, ``--forward``
   passes of 4 x 256 tokens) with no dashboard ('off'), with a live ExpertLoadDashboard at 2 Hz
   whose updates are sent but which is not displayed ('hidden': the kernel-side cost), and with
   it displayed in the page ('shown': the browser renders on the same 2 cores), at ``--hz``.
   Each run pauses 3 s after creating (and displaying) the dashboard so that its first drawing is
   not timed (``--no-live`` skips this part; ``benchmarks/live_overhead.py`` measures the
   kernel-side cost in ABBA rounds with a confidence interval). ``--pairs`` rounds after a warm-up run, the order rotated each round; reported: the
   median over rounds of each round's wall-time ratio to its 'off' run, the same for the kernel
   process's CPU time (all threads), and the refresh thread's CPU time / wall time.

Writes ``benchmarks/out/widgets_browser.json`` and prints a markdown table (the numbers in
``benchmarks/RESULTS.md``, "Widgets").
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_browser import (  # noqa: E402
    CHROMIUM,
    browser,
    cell_errors,
    jupyter_lab,
    open_notebook,
    write_notebook,
)

OUT = ROOT / "benchmarks" / "out"
L, E = 48, 128


# ------------------------------------------------------------------------------------------- data
def write_trace(path: Path, n_tokens: int, *, vocab=None, seed=0, batch=8192, seq_len=1024) -> float:
    from workbench.trace import TraceWriter
    from workbench.trace.schema import routing_layout

    if (path / "zarr.json").exists():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # skewed routing so that the heatmap has structure: expert popularity differs per layer
    pop = rng.dirichlet(np.full(E, 0.6), size=L)
    cum = np.cumsum(pop, axis=1)
    V = len(vocab) if vocab else 50_000
    with TraceWriter.create(path, **routing_layout(list(range(1, 2 * L, 2)), E, 1), vocab=vocab,
                            overwrite=True) as w:
        done = 0
        while done < n_tokens:
            n = min(batch, n_tokens - done)
            rows = np.arange(done, done + n)
            u = rng.random((n, L))
            te = np.empty((n, L, 1), np.int16)
            for l in range(L):
                te[:, l, 0] = np.minimum(np.searchsorted(cum[l], u[:, l]), E - 1)
            mod = np.zeros(n, np.int8)
            mod[(rows % seq_len) < 144] = 1  # an image's patch tokens at the start of each sequence
            mod[(rows % seq_len) == 0] = 2
            w.append(rng.integers(0, V, n).astype(np.int32), (rows // seq_len).astype(np.int32),
                     (rows % seq_len).astype(np.int32), mod, te, rng.random((n, L, 1)).astype(np.float32))
            done += n
    return time.perf_counter() - t0


def make_model(path: Path) -> None:
    if (path / "config.json").exists():
        return
    from tests.hf_reference import hf_text_model

    hf_text_model(seed=1, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16,
                  interleave_moe_layer_step=1, max_position_embeddings=1024).save_pretrained(path)


# --------------------------------------------------------------------------------------- notebook
CELLS = [
    # 0: imports (one-time cost, timed in the kernel)
    "import time, json\n_t = time.perf_counter()\nimport numpy as np\n"
    "from workbench.widgets import ExpertLoadDashboard, TokenRoutingView\n"
    "import workbench.widgets.load, workbench.widgets.tokens, workbench.widgets._plot\n"
    "IMPORT_S = time.perf_counter() - _t\nprint(f'imports {IMPORT_S:.2f} s')",
    # 1: token view of the 10k-token trace (the first view of the page)
    "_t = time.perf_counter()\ntv = TokenRoutingView('tok10k.zarr')\nTOK_KERNEL_S = time.perf_counter() - _t\ntv",
    # 2: open the 1M-token trace: the page's first plot (plotly.js is sent and loaded with it)
    "_t = time.perf_counter()\ndash0 = ExpertLoadDashboard('big.zarr')\nOPEN_KERNEL_COLD_S = time.perf_counter() - _t\n"
    "dash0",
    # 3: open it again (plotly.js loaded in the page)
    "_t = time.perf_counter()\ndash = ExpertLoadDashboard('big.zarr')\nOPEN_KERNEL_S = time.perf_counter() - _t\n"
    "dash",
    # 4: kernel-side timings of the cells above
    "json.dump(dict(imports_s=IMPORT_S, open_kernel_s=OPEN_KERNEL_S, open_kernel_cold_s=OPEN_KERNEL_COLD_S,\n"
    "               token_view_kernel_s=TOK_KERNEL_S), open('kernel_results.json', 'w'))",
    # 5: live overhead
    """import resource, statistics, torch, workbench as wb
from IPython.display import display
torch.manual_seed(0)
model = wb.load_model('ckpt', progress=False)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 300, (4, 256), generator=g) for _ in range(N_FORWARD)]

def one_run(variant, i):
    # 'off': no dashboard; 'hidden': live dashboard, updates sent, not displayed; 'shown': displayed
    with torch.no_grad(), wb.record(model, f'live_{i}.zarr', overwrite=True) as rec:
        d = ExpertLoadDashboard(rec, refresh_hz=REFRESH_HZ) if variant != 'off' else None
        if variant == 'shown':
            display(d)
        time.sleep(3.0)  # every variant: let the page draw the new dashboard before the timed run
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        for b in batches:
            model(input_ids=b)
        rec.flush()
        dt = time.perf_counter() - t
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)  # the kernel process, all threads
    if d is None:
        return dt, 0, 0.0, cpu
    d.stop()
    return dt, d.n_refreshes, d.refresh_cpu_seconds, cpu

one_run('off', 'warm')
order = ['off', 'hidden', 'shown']
runs = {v: [] for v in order}
for i in range(N_PAIRS):
    for v in order[i % 3:] + order[:i % 3]:  # rotate the order every round
        runs[v].append(one_run(v, i))
wall = {v: [r[0] for r in runs[v]] for v in order}
cpu = {v: [r[3] for r in runs[v]] for v in order}
med = statistics.median
res = json.load(open('kernel_results.json'))
res.update(run_s=wall, process_cpu_s=cpu, refreshes={v: [r[1] for r in runs[v]] for v in order[1:]},
           refresh_cpu_s={v: [r[2] for r in runs[v]] for v in order[1:]},
           # paired: each round's run over the same round's 'off' run (robust to load drifting on a shared box)
           ratio_hidden=med([h / o for h, o in zip(wall['hidden'], wall['off'])]),
           ratio_shown=med([h / o for h, o in zip(wall['shown'], wall['off'])]),
           ratio_hidden_of_medians=med(wall['hidden']) / med(wall['off']),
           cpu_ratio_hidden=med([h / o for h, o in zip(cpu['hidden'], cpu['off'])]),
           cpu_ratio_shown=med([h / o for h, o in zip(cpu['shown'], cpu['off'])]),
           ratio_shown_of_medians=med(wall['shown']) / med(wall['off']),
           cpu_fraction=sum(r[2] for v in order[1:] for r in runs[v]) / sum(wall['hidden'] + wall['shown']),
           threads=torch.get_num_threads())
json.dump(res, open('kernel_results.json', 'w'))
print(json.dumps(res, indent=1))""",
]

DASH_DRAWN = ("(n) => { const d = document.querySelectorAll('.wb-load-dashboard')[n - 1]; return d &&"
              " d.querySelectorAll('.js-plotly-plot .hm image').length >= 1 &&"
              " d.querySelectorAll('.js-plotly-plot .bars path, .js-plotly-plot .point path').length >= 128 &&"
              " d.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 3; }")


# Arm a timer on `el`: t0 at the user's event (capture phase), done at the first plotly_afterplot of
# figure `view` OF THE SAME VIEW as `el` whose title differs from now, plus one animation frame (the
# paint). Rejects after 20 s.
JS_ARM = """
return new Promise((armed) => {
  const root = el.closest('.wb-load-dashboard, .wb-token-view, .wb-routing-flow, .wb-trace-comparison,'
                          + ' .wb-attention-view');
  const gd = [...root.querySelectorAll('.js-plotly-plot')]
    .find(g => g.layout && g.layout.meta && g.layout.meta.view === view);
  const before = gd.layout.title.text; let t0 = null;
  window.__wbTimer = new Promise((resolve, reject) => {
    const start = () => { if (t0 === null) t0 = performance.now(); };
    el.addEventListener(evt, start, {capture: true, once: true});
    const done = () => {
      if (t0 === null || gd.layout.title.text === before) return;
      gd.removeListener('plotly_afterplot', done);
      requestAnimationFrame(() => {
        const t1 = performance.now();
        // where the time went: the plot's draw log (workbench.widgets._plot), first draw of `view` after t0
        const log = ((globalThis.__workbenchDraws || {}).log || []).filter(
          (d) => d.view === view && d.received !== null && d.received >= t0);
        const d = log[0];
        resolve(d ? {total: t1 - t0, kernel: d.received - t0, queue: d.start - d.received,
                     draw: d.end - d.start, paint: t1 - d.end, kind: d.kind} : {total: t1 - t0});
      });
    };
    gd.on('plotly_afterplot', done);
    setTimeout(() => reject(new Error('no redraw of ' + view + ' within 20 s')), 20000);
  });
  armed(true);
});"""


def timed_change(page, locator, view: str, evt: str, action, parts: list | None = None) -> float:
    """ms from the control event to the figure painted; appends the breakdown to ``parts``: kernel (event
    to the figure's message received: the kernel's handler and the websocket both ways), queue (waiting
    for other plots' draws), draw (Plotly call), paint (draw done to the next frame), kind (patch/full)."""
    locator.evaluate("(el, [view, evt]) => { " + JS_ARM + " }", [view, evt])
    action()
    r = page.evaluate("() => window.__wbTimer")
    if parts is not None:
        parts.append(r)
    return float(r["total"])


def run_cell(page, i: int, done_js: str, timeout=120_000, arg=None) -> float:
    """Shift+Enter on cell i (command mode); seconds until `done_js` is true in the page."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(i)
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")
    t0 = time.perf_counter()
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(done_js, arg=arg, timeout=timeout, polling="raf")
    return time.perf_counter() - t0


def wait_cell_done(page, i: int, timeout=900_000) -> None:
    page.wait_for_function(
        "(i) => { const p = document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')[i];"
        " return p && /\\[\\d+\\]/.test(p.textContent); }", arg=i, timeout=timeout)


def versions() -> dict:
    import subprocess
    from importlib import metadata

    out = {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()}
    for d in ("jupyterlab", "ipywidgets", "plotly", "anywidget", "playwright", "zarr", "xarray", "numpy", "torch"):
        try:
            out[d] = metadata.version(d)
        except Exception:
            out[d] = None
    try:
        out["chromium"] = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out["chromium"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--root", type=Path, default=None, help="keep traces here (reused on the next run)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=8, help="rounds (off, hidden, shown) of the live-overhead run")
    ap.add_argument("--hz", type=float, default=2.0, help="refresh rate of the live dashboard")
    ap.add_argument("--forward", type=int, default=40, help="forward passes per live-overhead run")
    ap.add_argument("--no-live", action="store_true", help="skip the live-overhead part (see benchmarks/live_overhead.py)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` etc.: still stop JupyterLab
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    root = a.root or Path(tempfile.mkdtemp(prefix="wb-widgets-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": "2026-11-26", "versions": versions(), "tokens": a.tokens, "hz": a.hz,
                 "forward": a.forward, "rounds": a.pairs}
    print(f"traces in {root}", flush=True)
    res["write_big_s"] = write_trace(root / "big.zarr", a.tokens, seed=0)
    vocab = [f"w{i}" for i in range(5000)]
    vocab[:4] = ["<|begin_of_text|>", "<script>alert(1)</script>", " the", "\n"]
    res["write_10k_s"] = write_trace(root / "tok10k.zarr", 10_000, vocab=vocab, seed=1)
    make_model(root / "ckpt")
    cells = [c.replace("N_FORWARD", str(a.forward)).replace("N_PAIRS", str(a.pairs))
             .replace("REFRESH_HZ", repr(float(a.hz))) for c in CELLS]
    write_notebook(root / "bench.ipynb", cells)
    (root / "kernel_results.json").unlink(missing_ok=True)

    res["load_average_before"] = __import__("os").getloadavg()
    with jupyter_lab(root) as (base, token), browser() as page:
        try:
            _measure(page, base, token, a, res)
        except Exception:
            page.screenshot(path=str(OUT / "widgets_bench_failure.png"))
            raise
    res["load_average_after"] = __import__("os").getloadavg()
    _report(root, a, res)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _measure(page, base, token, a, res) -> None:
    open_notebook(page, base, token, "bench.ipynb")
    _log("notebook open")
    run_cell(page, 0, "() => true")
    wait_cell_done(page, 0)
    _log("imports done")
    # token view of 10k tokens: the page's first view
    res["token_view_first_page_s"] = run_cell(
        page, 1, "() => document.querySelectorAll('.wb-token-view .wb-tokens .wb-tok').length === 512")
    wait_cell_done(page, 1)
    _log(f"token view: {res['token_view_first_page_s']:.2f} s")
    page.locator(".wb-token-view").first.screenshot(path=str(OUT / "widgets_bench_tokens_10k.png"))
    # open the 1M-token trace in the dashboard: first plot of the page, then again
    res["open_1m_cold_s"] = run_cell(page, 2, DASH_DRAWN, arg=1)
    wait_cell_done(page, 2)
    _log(f"open 1M (first plot of the page): {res['open_1m_cold_s']:.2f} s")
    res["open_1m_warm_s"] = run_cell(page, 3, DASH_DRAWN, arg=2)
    wait_cell_done(page, 3)
    _log(f"open 1M (plotly.js loaded): {res['open_1m_warm_s']:.2f} s")
    page.wait_for_timeout(500)
    dash = page.locator(".wb-load-dashboard").nth(1)
    mode_t, layer_t, mode_parts, layer_parts = [], [], [], []
    labels = ["share", "count", "deviation from uniform"]  # starts on share: the first click is count
    for r in range(a.reps):
        btn = dash.locator(".widget-toggle-button", has_text=labels[(r + 1) % 3]).first
        mode_t.append(timed_change(page, btn, "ExpertLoadDashboard.heatmap", "click", btn.click, mode_parts))
        handle = dash.locator(".widget-slider:has(.widget-label:text-is('Layer')) .noUi-handle").first
        handle.focus()
        key = "ArrowRight" if r % 2 == 0 else "ArrowLeft"
        layer_t.append(timed_change(page, handle, "ExpertLoadDashboard.bars", "keydown",
                                    lambda: handle.press(key), layer_parts))
    res["mode_change_ms"] = mode_t
    res["layer_change_ms"] = layer_t
    res["mode_change_parts"] = mode_parts
    res["layer_change_parts"] = layer_parts
    sel = dash.locator(".widget-dropdown:has(.widget-label:text-is('Tokens')) select").first
    filt = []
    for label in ("text", "image patches", "text", "all tokens", "image patches", "text"):
        filt.append(timed_change(page, sel, "ExpertLoadDashboard.heatmap", "change",
                                 lambda: sel.select_option(label=label)))
    res["filter_change_ms"] = filt  # first: one pass over all tokens (all modalities cached after)
    _log("controls done")
    dash.screenshot(path=str(OUT / "widgets_bench_dashboard_1m.png"))
    run_cell(page, 4, "() => true")
    wait_cell_done(page, 4)
    # live overhead
    if not a.no_live:
        run_cell(page, 5, "() => true")
        wait_cell_done(page, 5)
        _log("live done")
    res["cell_errors"] = cell_errors(page)


def _report(root, a, res) -> None:
    mode_t, layer_t, filt = res["mode_change_ms"], res["layer_change_ms"], res["filter_change_ms"]
    kr = root / "kernel_results.json"
    if kr.exists():
        res.update(json.loads(kr.read_text()))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "widgets_browser.json").write_text(json.dumps(res, indent=1))
    if a.root is None:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    print()
    print("| measurement | result | target |")
    print("|---|---|---|")
    print(f"| one-time imports in the kernel (ipywidgets, anywidget, plotly, workbench.widgets) | "
          f"{res['imports_s']:.2f} s | - |")
    print(f"| open a {a.tokens:,}-token trace (48 x 128) in ExpertLoadDashboard, Shift+Enter to all three "
          f"plots drawn: first plot of the page (loads plotly.js) | {res['open_1m_cold_s']:.2f} s "
          f"(kernel part {res['open_kernel_cold_s']:.2f} s) | < 3 s |")
    print(f"| same, plotly.js already loaded in the page | {res['open_1m_warm_s']:.2f} s "
          f"(kernel part {res['open_kernel_s']:.2f} s) | < 3 s |")
    def q90(v):  # 90th percentile, nearest rank
        s = sorted(v)
        return s[max(0, -(-9 * len(s) // 10) - 1)]

    def parts(key):
        ps = [p for p in res.get(key, []) if "kernel" in p]
        if not ps:
            return ""
        kinds = sorted({p["kind"] for p in ps})
        return (" (median parts: kernel + messages {:.0f}, waiting {:.0f}, Plotly {:.0f}, to paint {:.0f} ms; "
                "{})".format(*(med([p[k] for p in ps]) for k in ("kernel", "queue", "draw", "paint")), "/".join(kinds)))

    print(f"| heatmap 48 x 128 after the Show toggle, event to painted (median / 90th pct / max of {a.reps}) | "
          f"{med(mode_t):.0f} / {q90(mode_t):.0f} / {max(mode_t):.0f} ms{parts('mode_change_parts')} | <= 100 ms |")
    print(f"| layer slider key to bars painted (median / 90th pct / max) | {med(layer_t):.0f} / {q90(layer_t):.0f} / "
          f"{max(layer_t):.0f} ms{parts('layer_change_parts')} | <= 100 ms |")
    print(f"| token filter, first (one pass over {a.tokens:,} tokens) / cached (median of the rest) | "
          f"{filt[0]:.0f} / {med(filt[1:]):.0f} ms | - |")
    print(f"| TokenRoutingView of 10,000 tokens (first view of the page): Shift+Enter to the first 512 "
          f"tokens drawn | "
          f"{res['token_view_first_page_s']:.2f} s (kernel part {res['token_view_kernel_s']:.2f} s) | < 1 s |")
    if "run_s" in res:
        print(f"| live dashboard ({a.hz:g} Hz) on a recorded run, kernel side only (updates sent, not displayed): "
              f"wall time / no dashboard (median over {a.pairs} rounds of the per-round ratio) | "
              f"{res['ratio_hidden']:.3f} (ratio of medians {res['ratio_hidden_of_medians']:.3f}) | <= 1.02 |")
        print(f"| same, dashboard displayed in the page (browser on the same 2 cores) | {res['ratio_shown']:.3f} "
              f"(ratio of medians {res['ratio_shown_of_medians']:.3f}) | - |")
        print(f"| kernel process CPU time (all threads), live dashboard hidden / none; shown / none (median of "
              f"per-round ratios) | {res['cpu_ratio_hidden']:.3f}; {res['cpu_ratio_shown']:.3f} | - |")
        print(f"| refresh thread CPU time / run wall time | {100 * res['cpu_fraction']:.2f} % | - |")
        print(f"\nrun wall times {json.dumps({k: [round(x, 2) for x in v] for k, v in res['run_s'].items()})}; "
              f"refreshes {res['refreshes']}; cell errors: {res['cell_errors']}")
    print(f"cell errors: {res['cell_errors']}; load average before {res['load_average_before']}, "
          f"after {res['load_average_after']}")
    print(json.dumps(res["versions"]))


if __name__ == "__main__":
    main()
