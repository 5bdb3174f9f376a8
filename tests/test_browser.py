"""Real-browser test of the widgets: JupyterLab + Debian's Chromium driven by Playwright.

Starts JupyterLab on 127.0.0.1 (random free port, random token, temporary root, config, data and
settings dirs), opens a notebook that builds every view on small traces, runs it through the
"Run" menu, and checks in the page that the plotly figures rendered, that moving a layer slider
changes the figures, that clicking a token pins it, and that hostile token text stays text.
Screenshots go to the test's tmp dir (and ``benchmarks/out/widgets_*.png``).

Needs: ``/usr/bin/chromium`` (Debian package ``chromium``; never a Playwright-downloaded browser)
and the Python packages ``jupyterlab`` and ``playwright``. Skipped with the reason when missing.
The harness (``jupyter_lab``, ``browser``, ``open_notebook``, ...) is reused by
``benchmarks/widgets_browser.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def require_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    for mod in ("playwright", "jupyterlab"):
        try:
            __import__(mod)
        except ImportError:
            pytest.skip(f"python package {mod!r} is not installed (pip install jupyterlab playwright)")


# ----------------------------------------------------------------------------------------- harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(root: Path, *, timeout: float = 90.0):
    """Run JupyterLab on 127.0.0.1 in its own process group; yield (base_url, token); kill it after."""
    port, token = free_port(), secrets.token_hex(16)
    home = root / ".jupyter-test"
    settings = home / "settings"
    for d in ("config", "data", "runtime", "workspaces"):
        (home / d).mkdir(parents=True, exist_ok=True)
    # no network checks, no news toast; cells stay in the DOM (no windowing) so every view renders
    _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
    _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none", "autoStartDefaultKernel": True})
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_PLATFORM_DIRS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=",
           "--LabApp.extension_manager=readonly", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}: "
                                   f"{(home / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"JupyterLab did not start in {timeout:.0f} s")
            time.sleep(0.3)
        yield base, token
    finally:
        kids = []
        with contextlib.suppress(Exception):
            import psutil

            kids = psutil.Process(proc.pid).children(recursive=True)  # kernels run in their own sessions
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server (it shuts its kernels down)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        for k in kids:  # a kernel the server did not stop
            with contextlib.suppress(Exception):
                k.kill()
        log.close()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@contextlib.contextmanager
def browser(viewport=(1600, 1100)):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = b.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            b.close()


def write_notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def open_notebook(page, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")  # reset: no tabs restored from a workspace
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    # a kernel-selection dialog (if this JupyterLab shows one despite autoStartDefaultKernel)
    with contextlib.suppress(Exception):
        page.locator(".jp-Dialog .jp-mod-accept", has_text="Select").click(timeout=3_000)
    # kernel started and idle
    page.wait_for_function(
        "() => { const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return s && s.getAttribute('data-status') === 'idle'; }", timeout=90_000)


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def wait_idle(page, timeout=180_000) -> None:
    """Until no cell is queued or running ([*]) and the first has run (an error stops Run All)."""
    page.wait_for_function(
        "() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(c => c.textContent);"
        " return p.length && /\\[\\d+\\]/.test(p[0]) && !p.some(t => t.includes('*')); }", timeout=timeout)


def cell_errors(page) -> list[str]:
    return page.eval_on_selector_all(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], .jp-RenderedText[data-mime-type"
        "='application/vnd.jupyter.error']", "els => els.map(e => e.innerText)")


JS_FIG_BODY = """const gd = [...document.querySelectorAll('.js-plotly-plot')]
  .find(g => g.layout && g.layout.meta && g.layout.meta.view === view);
  if (!gd) return null;
  return {title: gd.layout.title && gd.layout.title.text, data: JSON.stringify(gd.data.map(t => [t.z, t.y, t.x]))};"""
JS_FIG = "(view) => { " + JS_FIG_BODY + " }"


def fig_state(page, view: str):
    return page.evaluate(JS_FIG, view)


def wait_fig(page, view: str, timeout=30_000) -> dict:
    """The figure of ``view`` once it is drawn (views draw their plots asynchronously, one after another)."""
    page.wait_for_function("(view) => { " + JS_FIG_BODY + " }", arg=view, timeout=timeout)
    return fig_state(page, view)


def wait_fig_change(page, view: str, before: dict, timeout=30_000) -> dict:
    page.wait_for_function(
        "([view, before]) => { const gd = [...document.querySelectorAll('.js-plotly-plot')]"
        ".find(g => g.layout && g.layout.meta && g.layout.meta.view === view);"
        " return gd && JSON.stringify(gd.data.map(t => [t.z, t.y, t.x])) !== before; }",
        arg=[view, before["data"]], timeout=timeout)
    return fig_state(page, view)


def slider_handle(page, container: str, label: str):
    """The noUiSlider handle of the ipywidgets slider whose description is ``label`` in ``container``."""
    return page.locator(f"{container} .widget-slider:has(.widget-label:text-is('{label}')) .noUi-handle").first


# ------------------------------------------------------------------------------------------ fixtures
def make_browser_traces(root: Path) -> None:
    """Small traces for the notebook: a routing trace (with hostile tokens), a second one to compare,
    and a multimodal trace with attention maps recorded from a tiny random model."""
    import torch

    import workbench as wb
    from tests.hf_reference import IMAGE_TOKEN, TOKENS_PER_TILE, hf_multimodal_model
    from tests.test_widgets import make_trace

    batches = [[(s, 40 + 7 * (s % 3))] for s in range(8)]
    make_trace(root / "trace.zarr", layers=[1, 3, 5, 7], n_experts=8, k=2, batches=batches, seed=3)
    make_trace(root / "trace_b.zarr", layers=[1, 3, 5, 7], n_experts=8, k=2, batches=batches[:5], seed=4)
    hf_multimodal_model(seed=5).save_pretrained(root / "mm_ckpt")
    model = wb.load_model(root / "mm_ckpt", progress=False)
    g = torch.Generator().manual_seed(0)
    ids = [1] + torch.randint(3, 300, (3,), generator=g).tolist() + [IMAGE_TOKEN] * (3 * TOKENS_PER_TILE) \
        + torch.randint(3, 300, (6,), generator=g).tolist() + [2]
    with torch.no_grad(), wb.record(model, root / "mm.zarr", capture=("router", "attention")):
        model(input_ids=torch.tensor([ids]), pixel_values=torch.randn(3, 3, 56, 56, generator=g))
    shutil.rmtree(root / "mm_ckpt")


NOTEBOOK = [
    "import numpy as np\n"
    "from workbench.widgets import (ExpertLoadDashboard, TokenRoutingView, CrossModalAttentionView,\n"
    "                               RoutingFlow, TraceComparison)",
    "dash = ExpertLoadDashboard('trace.zarr')\ndash",
    "tokens = TokenRoutingView('trace.zarr', page_size=120)\ntokens",
    "flow = RoutingFlow('trace.zarr', a=1, b=5)\nflow",  # decoder layers (MoE layers 1, 3, 5, 7)
    "cmp = TraceComparison('trace.zarr', 'trace_b.zarr', labels=('A', 'B'))\ncmp",
    "yy, xx = np.mgrid[0:56, 0:112]\n"
    "img = np.stack([xx * 2, yy * 4, 255 - xx * 2], -1).clip(0, 255).astype(np.uint8)\n"
    "info = dict(original_size=(56, 112), grid=(1, 2), resized_size=(56, 112), tile_size=56,\n"
    "            token_grid=(2, 2), has_global_tile=True)\n"
    "att = CrossModalAttentionView('mm.zarr', 0, image=img, image_info=info, layer=3)\natt",
]


# --------------------------------------------------------------------------------------------- test
def test_views_render_and_react_in_jupyterlab(tmp_path):
    require_browser()
    t_start = time.monotonic()
    make_browser_traces(tmp_path)
    write_notebook(tmp_path / "views.ipynb", NOTEBOOK)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    dialogs: list[str] = []
    with jupyter_lab(tmp_path) as (base, token), browser() as page:
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        open_notebook(page, base, token, "views.ipynb")
        run_all(page)
        wait_idle(page)
        assert not cell_errors(page), cell_errors(page)

        # ---- every view rendered its plotly figures (svg)
        for view, n_min in ((".wb-load-dashboard", 3), (".wb-routing-flow", 2),
                            (".wb-trace-comparison", 4), (".wb-attention-view", 1)):
            page.wait_for_function(
                "([sel, n]) => document.querySelectorAll(sel + ' .js-plotly-plot svg.main-svg').length >= n",
                arg=[view, n_min], timeout=60_000)
        assert page.locator(".wb-load-dashboard .js-plotly-plot .hm image").count() >= 1  # heatmap drawn
        assert page.locator(".wb-routing-flow .sankey-link").count() > 0
        page.screenshot(path=str(shots / "notebook.png"), full_page=True)

        # ---- dashboard: the layer slider changes the per-expert bars
        before = fig_state(page, "ExpertLoadDashboard.bars")
        assert before["title"].startswith("Layer 1:")
        h = slider_handle(page, ".wb-load-dashboard", "Layer")
        h.focus()
        h.press("ArrowRight")
        after = wait_fig_change(page, "ExpertLoadDashboard.bars", before)
        assert after["title"].startswith("Layer 3:"), after["title"]
        # the mode toggle changes the heatmap
        hm0 = fig_state(page, "ExpertLoadDashboard.heatmap")
        revs = page.eval_on_selector_all(".wb-load-dashboard .wb-plot", "els => els.map(e => Number(e.dataset.revision))")
        page.locator(".wb-load-dashboard .widget-toggle-button", has_text="count").click()
        hm1 = wait_fig_change(page, "ExpertLoadDashboard.heatmap", hm0)
        assert "count" in hm1["title"]
        # heatmap and bars: switched in the page (no kernel round trip, drawKind 'local'); the kernel's figures
        # follow (their revision passes the one before the click) and its push is not drawn again (still
        # 'local'); the kernel's mode is "count": the next layer change comes from it as a patch, in count
        page.wait_for_function(
            "(revs) => [...document.querySelectorAll('.wb-load-dashboard .wb-plot')].filter((e, i) =>"
            " e.dataset.drawKind === 'local' && e.dataset.variant === 'count' && Number(e.dataset.revision) > revs[i])"
            ".length === 2", arg=revs)
        before = fig_state(page, "ExpertLoadDashboard.bars")
        h.press("ArrowRight")
        after = wait_fig_change(page, "ExpertLoadDashboard.bars", before)
        assert after["title"] == "Layer 5: count per expert", after["title"]
        kinds = page.eval_on_selector_all(".wb-load-dashboard .wb-plot", "els => els.map(e => e.dataset.drawKind)")
        assert kinds.count("patch") >= 2, kinds  # heatmap (highlight) and bars: data-only updates (Plotly.update)
        page.locator(".wb-load-dashboard").screenshot(path=str(shots / "load_dashboard.png"))

        # ---- token view: hostile text stays text; layer slider recolors; click pins
        strip = page.locator(".wb-token-view .wb-tokens")
        page.wait_for_function("() => document.querySelectorAll('.wb-tokens .wb-tok').length === 120")
        assert strip.locator("script, img, b").count() == 0
        text = strip.inner_text()
        assert "<script>alert(1)</script>" in text and "<img src=x onerror=alert(1)>" in text
        e_before = page.eval_on_selector_all(".wb-tokens .wb-tok", "els => els.map(e => e.dataset.e).join()")
        h = slider_handle(page, ".wb-token-view", "Layer")
        h.focus()
        h.press("ArrowRight")
        page.wait_for_function(
            "(b) => [...document.querySelectorAll('.wb-tokens .wb-tok')].map(e => e.dataset.e).join() !== b",
            arg=e_before)
        assert fig_state(page, "TokenRoutingView.path") is None  # made on the first pin
        strip.locator(".wb-tok[data-i='7']").click()
        page.wait_for_function("(js) => { const s = (new Function('view', js))('TokenRoutingView.path');"
                               " return s && s.title.startsWith('Token 7'); }", arg=JS_FIG_BODY)
        path1 = fig_state(page, "TokenRoutingView.path")
        assert path1["data"] != "[]"
        strip.locator(".wb-tok[data-i='9']").click()
        wait_fig_change(page, "TokenRoutingView.path", path1)
        assert fig_state(page, "TokenRoutingView.path")["title"].startswith("Token 9")
        assert strip.locator(".wb-pinned[data-i='9']").count() == 1
        page.locator(".wb-token-view").screenshot(path=str(shots / "token_view.png"))

        # ---- routing flow: choosing another target layer redraws the Sankey
        s0 = fig_state(page, "RoutingFlow.sankey")
        assert "L1 \u2192 L5" in s0["title"], s0["title"]  # a=1, b=5 are decoder indices
        page.locator(".wb-routing-flow .widget-dropdown:has(.widget-label:text-is('To layer')) select") \
            .select_option(label="L3")
        page.wait_for_function(
            "(t) => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.layout && "
            "g.layout.meta && g.layout.meta.view === 'RoutingFlow.sankey'); return gd.layout.title.text !== t; }",
            arg=s0["title"])
        assert "L1 \u2192 L3" in fig_state(page, "RoutingFlow.sankey")["title"]
        page.locator(".wb-routing-flow").screenshot(path=str(shots / "routing_flow.png"))
        page.locator(".wb-trace-comparison").screenshot(path=str(shots / "trace_comparison.png"))

        # ---- attention: the layer slider changes the overlay (L3 global attention -> L2 chunked)
        a0 = fig_state(page, "CrossModalAttentionView")
        assert "L3" in a0["title"]
        h = slider_handle(page, ".wb-attention-view", "Layer")
        h.focus()
        h.press("ArrowLeft")
        a1 = wait_fig_change(page, "CrossModalAttentionView", a0)
        assert "L2" in a1["title"], a1["title"]
        assert page.locator(".wb-attention-view .js-plotly-plot image").count() >= 2  # picture + heatmap
        page.locator(".wb-attention-view").screenshot(path=str(shots / "attention_view.png"))
        assert not cell_errors(page), cell_errors(page)
    assert not dialogs, f"a token's text ran as script: {dialogs}"
    OUT.mkdir(parents=True, exist_ok=True)
    for f in shots.glob("*.png"):
        shutil.copy(f, OUT / f"widgets_{f.name}")
    print(f"browser test: {time.monotonic() - t_start:.1f} s; screenshots in {shots} and {OUT}")


# the real PlotView module on stand-in models: a view that follows the patches shows what a view
# drawing each whole figure shows
JS_PATCH_VS_FULL = r"""
async ([esm, states]) => {
  globalThis.__workbenchPlotly = Promise.resolve(window.Plotly);
  const mod = await import(URL.createObjectURL(new Blob([esm], {type: 'text/javascript'})));
  const model = (state) => { const h = {};
    const m = {state, get: (k) => (k === 'assets' ? {} : m.state[k]), on: (e, cb) => { h[e] = cb; },
               fire: (e) => h[e] && h[e]()};
    return m; };
  const pick = (gd) => { const t = gd._fullData[0], L = gd._fullLayout;
    const arr = (v) => v == null ? v : Array.from(v, (r) => (r && r.length !== undefined ? Array.from(r) : r));
    return JSON.stringify({z: arr(t.z), y: arr(t.y), zmin: t.zmin, zmax: t.zmax, zauto: t.zauto, zmid: t.zmid,
      cs: t.colorscale, cb: t.colorbar && t.colorbar.title.text, ht: t.hovertemplate, title: L.title.text,
      ytitle: L.yaxis.title.text, shapes: (L.shapes || []).map((s) => [s.y0, s.y1]), range: L.yaxis.range}); };
  const A = document.createElement('div'); document.body.appendChild(A);
  const ma = model(Object.assign({}, states[0]));
  await mod.default.render({model: ma, el: A});
  const out = [];
  for (let i = 1; i < states.length; i++) {
    ma.state = Object.assign({}, states[i]); ma.fire('change:revision');
    await globalThis.__workbenchDraws.tail;
    const B = document.createElement('div'); document.body.appendChild(B);
    await mod.default.render({model: model(Object.assign({}, states[i], {patch: ''})), el: B});
    await globalThis.__workbenchDraws.tail;
    const a = A.querySelector('.wb-plot'), b = B.querySelector('.wb-plot');
    out.push({kind: a.dataset.drawKind, other: b.dataset.drawKind, a: pick(a), b: pick(b)});
    B.remove();
  }
  return out;
}"""


def test_patched_figure_equals_a_full_redraw(tmp_path):
    require_browser()
    import plotly

    from tests.test_widgets import make_trace
    from workbench.widgets import ExpertLoadDashboard
    from workbench.widgets._plot import _ESM

    make_trace(tmp_path / "t.zarr", layers=[1, 3, 5, 7], n_experts=8, k=2,
               batches=[[(s, 30 + 5 * s)] for s in range(6)], seed=2)
    dash = ExpertLoadDashboard(tmp_path / "t.zarr", mode="share")
    states = {"heatmap": [], "bars": []}

    def snap():
        for name, plot in (("heatmap", dash.heatmap), ("bars", dash.bars)):
            states[name].append({"spec": plot.widget.spec, "patch": plot.widget.patch,
                                 "revision": plot.widget.revision})

    snap()
    for mode, layer in [("count", 1), ("deviation", 1), ("share", 3), ("deviation", 0), ("count", 2), ("share", 2)]:
        dash.mode = mode
        snap()
        dash.w_layer.value = layer
        snap()
    dash.w_modality.value = 1  # a filter: new counts everywhere
    snap()
    lib = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    with browser() as page:
        page.set_content("<html><body></body></html>")
        page.add_script_tag(path=str(lib))
        for name, seq in states.items():
            for i, r in enumerate(page.evaluate(JS_PATCH_VS_FULL, [_ESM, seq]), start=1):
                assert r["kind"] == "patch" and r["other"] == "full", (name, i, r["kind"], r["other"])
                assert r["a"] == r["b"], (name, i, r["a"][:400], r["b"][:400])


# the real PlotView module on stand-in models with a stand-in "Show" control: the browser switches the
# dashboard's mode itself (client-side variants); the kernel's pushes that follow are not drawn again
JS_CLIENT_VARIANTS = r"""
async ([esm, states, steps, mode0]) => {
  globalThis.__workbenchPlotly = Promise.resolve(window.Plotly);
  const mod = await import(URL.createObjectURL(new Blob([esm], {type: 'text/javascript'})));
  // like an ipywidgets 8 ToggleButtons model: only the option's index is synced
  const options = ['count', 'share', 'deviation'];
  const control = { index: options.indexOf(mode0), h: [], get(k) { return k === 'index' ? this.index : undefined; },
                    on(e, cb) { if (e.split(' ').includes('change:index')) this.h.push(cb); },
                    set(v) { const i = options.indexOf(v);
                             if (i !== this.index) { this.index = i; this.h.forEach((cb) => cb()); } } };
  const model = (state) => { const h = {};
    const m = {state, widget_manager: {get_model: async (id) => { if (id !== 'ctl') throw new Error(id); return control; }},
               get: (k) => (k === 'assets' ? {} : k === 'control' ? 'IPY_MODEL_ctl' : m.state[k]),
               on: (e, cb) => { h[e] = cb; }, fire: (e) => h[e] && h[e]()};
    return m; };
  const arr = (v) => v == null ? v : Array.from(v, (r) => (r && r.length !== undefined ? Array.from(r) : r));
  const pick = (gd) => { const t = gd._fullData[0], L = gd._fullLayout;
    return {values: arr(t.z !== undefined ? t.z : t.y), rest: JSON.stringify({zmin: t.zmin, zmax: t.zmax,
      zauto: t.zauto, zmid: t.zmid, cs: t.colorscale, cb: t.colorbar && t.colorbar.title.text, ht: t.hovertemplate,
      title: L.title.text, ytitle: L.yaxis.title.text, shapes: (L.shapes || []).map((s) => [s.y0, s.y1]),
      range: L.yaxis.range, x: arr(t.x)})}; };
  const views = {};
  const models = {};
  for (const name of ['heatmap', 'bars']) {
    const el = document.createElement('div'); document.body.appendChild(el);
    models[name] = model(Object.assign({}, states[name][0]));
    await mod.default.render({model: models[name], el});
    views[name] = el.querySelector('.wb-plot');
  }
  await globalThis.__workbenchDraws.tail;
  const log = globalThis.__workbenchDraws.log;
  const out = [];
  for (const step of steps) {
    const n0 = log.length;
    if (step.click !== undefined) for (const v of [].concat(step.click)) control.set(v);
    if (step.kernel !== undefined) {
      for (const name of ['heatmap', 'bars']) {
        models[name].state = Object.assign({}, states[name][step.kernel]); models[name].fire('change:revision');
      }
    }
    await globalThis.__workbenchDraws.tail;
    const rec = {step, draws: log.slice(n0).map((d) => [d.view, d.kind])};
    for (const name of ['heatmap', 'bars']) {
      const gd = views[name];
      // a view opened now: draws the kernel's current figure (and the control's variant, if another)
      const el = document.createElement('div'); document.body.appendChild(el);
      const cleanup = await mod.default.render({model: model(Object.assign({}, models[name].state)), el});
      await globalThis.__workbenchDraws.tail;
      const fresh = el.querySelector('.wb-plot');
      rec[name] = {kind: gd.dataset.drawKind, revision: Number(gd.dataset.revision), variant: gd.dataset.variant,
                   shown: pick(gd), fresh: pick(fresh), freshKind: fresh.dataset.drawKind};
      cleanup();  // as anywidget does when a view goes away: it stops following the control
      el.remove();
    }
    out.push(rec);
  }
  return out;
}"""


def test_client_side_mode_switch_equals_the_python_values(tmp_path):
    require_browser()
    import numpy as np
    import plotly

    from tests.test_widgets import make_trace
    from workbench.widgets import ExpertLoadDashboard
    from workbench.widgets import _common as W
    from workbench.widgets._plot import _ESM

    make_trace(tmp_path / "t.zarr", layers=[1, 3, 5, 7], n_experts=8, k=2,
               batches=[[(s, 30 + 5 * s)] for s in range(6)], seed=2)
    dash = ExpertLoadDashboard(tmp_path / "t.zarr", mode="share")
    states = {"heatmap": [], "bars": []}
    expect = []  # per kernel state: the Python values of every mode (heatmap, and the bars' layer)

    def snap():
        for name, plot in (("heatmap", dash.heatmap), ("bars", dash.bars)):
            w = plot.widget
            states[name].append({"spec": w.spec, "patch": w.patch, "revision": w.revision, "variants": w.variants,
                                 "variant": w.variant})
        li = int(dash.w_layer.value)
        expect.append({m: (W.derive(dash.counts, dash.n_selected, dash.k, m).astype(float),
                           W.derive(dash.counts, dash.n_selected, dash.k, m)[li].astype(float))
                       for m in ("count", "share", "deviation")})
        return len(states["heatmap"]) - 1

    def kernel(**change):
        for k, v in change.items():
            if k == "mode":
                dash.mode = v
            elif k == "layer":
                dash.w_layer.value = v
            else:
                dash.w_modality.value = v
        return snap()

    snap()
    steps = [  # (step, mode the page shows after it, kernel state whose values it shows)
        ({"click": "count"}, "count", 0),                     # client-side, before the kernel knows
        ({"kernel": kernel(mode="count")}, "count", 1),       # the kernel's push: not drawn again
        ({"click": "deviation"}, "deviation", 1),
        ({"kernel": kernel(mode="deviation")}, "deviation", 2),
        ({"click": "share"}, "share", 2),
        ({"kernel": kernel(mode="share")}, "share", 3),
        ({"kernel": kernel(layer=3)}, "share", 4),            # a kernel change: patch as before
        ({"click": "count"}, "count", 4),                     # new bars base (layer 3)
        ({"kernel": kernel(mode="count")}, "count", 5),
        ({"kernel": kernel(modality=1)}, "count", 6),         # a filter: new counts from the kernel
        ({"click": "deviation"}, "deviation", 6),             # derived from the filtered counts
        ({"kernel": kernel(mode="deviation")}, "deviation", 7),
        ({"click": ["count", "share"]}, "share", 7),          # two clicks before the kernel answers
        ({"kernel": kernel(mode="count")}, "share", 8),       # the kernel lags: the page keeps the newer mode
        ({"kernel": kernel(mode="share")}, "share", 9),
        ({"click": "deviation"}, "deviation", 9),
        ({"kernel": kernel(layer=1)}, "deviation", 10),       # a kernel patch (old mode) over a local mode
        ({"kernel": kernel(mode="deviation")}, "deviation", 11),
    ]
    lib = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    with browser() as page:
        page.set_content("<html><body></body></html>")
        page.add_script_tag(path=str(lib))
        out = page.evaluate(JS_CLIENT_VARIANTS, [_ESM, states, [s for s, _, _ in steps], "share"])
    for i, ((step, mode, ks), r) in enumerate(zip(steps, out)):
        where = (i, step, mode)
        for name, j in (("heatmap", 0), ("bars", 1)):
            shown = np.array(r[name]["shown"]["values"], float)
            # exactly the Python computation (float64, bit for bit; NaN nowhere in this trace)
            assert np.array_equal(shown, expect[ks][mode][j]), (where, name, shown, expect[ks][mode][j])
            assert r[name]["variant"] == mode, (where, name, r[name]["variant"])
            assert r[name]["revision"] == states[name][ks]["revision"], (where, name)
            # a view opened now shows the same figure (after the kernel caught up: from the kernel's figure alone)
            assert r[name]["fresh"] == r[name]["shown"], (where, name, r[name]["fresh"]["rest"][:300],
                                                          r[name]["shown"]["rest"][:300])
            assert r[name]["freshKind"] == ("full" if mode == states[name][ks]["variant"] else "local"), where
        if "click" in step:  # drawn in the page, heatmap first, with no kernel message
            assert r["draws"] == [["ExpertLoadDashboard.heatmap", "local"], ["ExpertLoadDashboard.bars", "local"]], \
                (where, r["draws"])
    # the kernel's mode-only pushes were not drawn again
    for i in (1, 3, 5, 8, 11, 13, 14):
        assert out[i]["draws"] == [], (i, out[i]["draws"])
    assert [k for _, k in out[6]["draws"]] == ["patch", "patch"]  # layer: both figures patched
    assert "local" in [k for _, k in out[16]["draws"]]  # the kernel's patch, then the page's mode on top
    assert out[17]["draws"] == []


# ------------------------------------------------------------------------------ legibility (issue 17)
def make_legibility_traces(root: Path) -> None:
    """A routing trace whose first tokens are `"`, `<`, `&` and friends; a 16-expert top-1 trace with
    many transitions (Sankey); the demo digit-grid prompt through the embedded model (attention); a
    tiny checkpoint for a live recording."""
    import numpy as np
    import torch

    import workbench as wb
    from tests.hf_reference import hf_text_model
    from workbench.embedded import default_model_dir, demo_prompts, is_trained_default
    from workbench.trace import TraceWriter
    from workbench.trace.schema import routing_layout

    vocab = ['"', 'say "hi"', "<b>x</b>", "a & b", "it's", "&quot;"] + [f"w{i}" for i in range(30)]
    rng = np.random.default_rng(0)
    n = 40  # the first six tokens are the quote-ish ones
    ids = rng.integers(0, len(vocab), n).astype(np.int32)
    ids[:6] = np.arange(6)
    with TraceWriter.create(root / "quoty.zarr", **routing_layout([1, 3], 8, 2), vocab=vocab) as w:
        w.append(token_id=ids, sequence=np.zeros(n, np.int32), position=np.arange(n, dtype=np.int32),
                 modality=np.zeros(n, np.int8),
                 topk_expert=np.stack([np.stack([rng.permutation(8)[:2] for _ in range(2)]) for _ in range(n)])
                 .astype(np.int16), topk_weight=rng.random((n, 2, 2)).astype(np.float32))
    n = 3000
    a = rng.integers(0, 16, n)
    b = np.where(rng.random(n) < 0.6, (a * 5 + 1) % 16, rng.integers(0, 16, n))
    with TraceWriter.create(root / "flow16.zarr", **routing_layout([1, 3], 16, 1)) as w:
        w.append(token_id=np.zeros(n, np.int32), sequence=np.zeros(n, np.int32), position=np.arange(n, dtype=np.int32),
                 modality=np.zeros(n, np.int8), topk_expert=np.stack([a, b], 1)[:, :, None].astype(np.int16),
                 topk_weight=np.ones((n, 2, 1), np.float32))
    if is_trained_default():
        from PIL import Image

        model, proc = wb.load_model(default_model_dir(), progress=False), wb.load_processor(default_model_dir())
        item = [p for p in demo_prompts() if p["images"]][0]
        image = Image.open(item["images"][0]).convert("RGB")
        image.save(root / "digits.png")
        batch = proc(text=[item["text"]], images=[[image]])
        with torch.no_grad(), wb.record(model, root / "demo_att.zarr", capture=("router", "attention"),
                                        processor=proc):
            model(**batch)
    hf_text_model(seed=3, num_experts_per_tok=2, interleave_moe_layer_step=2).save_pretrained(root / "live_ck")


LEGIBILITY_NOTEBOOK = [
    "import json, time, numpy as np, torch, workbench as wb\n"
    "from pathlib import Path\n"
    "from PIL import Image\n"
    "from workbench.widgets import TokenRoutingView, RoutingFlow, CrossModalAttentionView, ExpertLoadDashboard",
    "tokens = TokenRoutingView('quoty.zarr', page_size=40)\ntokens",
    "flow = RoutingFlow('flow16.zarr')\nflow",
    "att = None\n"
    "if Path('demo_att.zarr').exists():\n"
    "    att = CrossModalAttentionView('demo_att.zarr', 0, image=Image.open('digits.png'))\n"
    "    print(json.dumps({'label': att.query_labels[att.w_query.value], 'layer': att.layer}))\n"
    "att",
    "model = wb.load_model('live_ck', progress=False)\n"
    "g = torch.Generator().manual_seed(0)\n"
    "rec = wb.record(model, 'live.zarr', commit_every_seconds=0.25)\n"
    "dash = ExpertLoadDashboard(rec, mode='share')\n"
    "dash",
    "# stream for ~6 s\n"
    "t_stream = [time.time()]\n"
    "with torch.no_grad(), rec:\n"
    "    while time.time() - t_stream[0] < 6.0:\n"
    "        model(input_ids=torch.randint(3, 300, (2, 64), generator=g))\n"
    "t_stream.append(time.time())\n"
    "dash.stop()\n"
    "print(json.dumps({'stream_s': t_stream[1] - t_stream[0], 'kernel_redraws': dash.n_refreshes}))",
]


def _boxes_overlap(a, b, slack=0.5):
    return not (a["right"] <= b["left"] + slack or b["right"] <= a["left"] + slack
                or a["bottom"] <= b["top"] + slack or b["bottom"] <= a["top"] + slack)


JS_TEXT_BOXES = """(sel) => [...document.querySelectorAll(sel)].filter(e => e.textContent.trim()).map(e => {
  const r = e.getBoundingClientRect();
  return {text: e.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom}; })"""


def test_legibility_key_highlight_escaping_sankey_titles_attention_and_live_cadence(tmp_path):
    require_browser()
    make_legibility_traces(tmp_path)
    write_notebook(tmp_path / "legible.ipynb", LEGIBILITY_NOTEBOOK)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with jupyter_lab(tmp_path) as (base, token), browser() as page:
        open_notebook(page, base, token, "legible.ipynb")
        t_run = page.evaluate("() => performance.now()")
        run_all(page)
        wait_idle(page, timeout=300_000)
        assert not cell_errors(page), cell_errors(page)
        page.wait_for_function("() => document.querySelectorAll('.wb-routing-flow .sankey-link').length > 0")

        # ---- live dashboard: >= 1 redraw per second of streaming, drawn in the page; progress shown
        out = page.eval_on_selector_all(".jp-OutputArea-output pre", "els => els.map(e => e.innerText)")
        live = json.loads(next(o for o in out if "stream_s" in o))
        draws = page.evaluate("() => globalThis.__workbenchDraws.log.filter(d => d.view === "
                              "'ExpertLoadDashboard.heatmap').map(d => d.end)")
        assert t_run < draws[0]
        stream = live["stream_s"]
        # draws during the stream: the kernel's redraws arrive while the cell runs (the last one or two after)
        assert live["kernel_redraws"] >= int(stream), live
        assert len(draws) - 1 >= int(stream), (len(draws), stream)  # first draw: the empty dashboard
        gaps = [b - a for a, b in zip(draws[1:], draws[2:])]
        assert max(gaps) < 1500, gaps  # never more than 1.5 s on one frame while tokens arrive
        status = page.locator(".wb-load-dashboard .widget-html-content").first.inner_text()
        assert "tokens committed" in status and "tokens/s" in status, status

        # ---- token view: the color key counts, a click highlights; no `&quot;` anywhere
        key = page.locator(".wb-key")
        assert key.locator("[data-key]").count() == 8
        counts = page.eval_on_selector_all(".wb-tokens .wb-tok", "els => els.map(e => Number(e.dataset.e))")
        e0 = max(set(counts), key=counts.count)
        assert key.locator(f"[data-key='{e0}']").inner_text().split()[:2] == [str(e0), str(counts.count(e0))]
        key.locator(f"[data-key='{e0}']").click()
        page.wait_for_function("(e) => document.querySelectorAll('.wb-tokens .wb-hl').length > 0 && "
                               "[...document.querySelectorAll('.wb-tokens .wb-hl')].every(x => x.dataset.e == e)",
                               arg=str(e0))
        assert page.locator(".wb-tokens .wb-hl").count() == counts.count(e0)
        assert page.locator(".wb-tokens .wb-dim").count() == len(counts) - counts.count(e0)
        assert page.locator(".wb-token-view input[type='text']").first.input_value() == str(e0)
        page.locator(".wb-token-view").screenshot(path=str(shots / "token_key_highlight.png"))
        for i in range(6):  # pin the quote-ish tokens: the path title shows each as itself
            page.locator(f".wb-tokens .wb-tok[data-i='{i}']").click()
            page.wait_for_function("([js, i]) => { const s = (new Function('view', js))('TokenRoutingView.path');"
                                   " return s && s.title.startsWith('Token ' + i + ' '); }", arg=[JS_FIG_BODY, i])
            shown = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                                  ".map(e => e.textContent).join('\\n')")
            assert "&quot;" not in shown.replace("'&quot;'", ""), shown
            assert "&amp;" not in shown and "&lt;" not in shown and "&#" not in shown, shown
            if i == 1:
                assert "'say \"hi\"'" in shown, shown  # the token, as itself

        # ---- every rendered plotly text: no escaped entity shows as text
        texts = page.eval_on_selector_all(".js-plotly-plot svg text", "els => els.map(e => e.textContent)")
        for t in texts:
            assert "&quot;" not in t.replace("'&quot;'", "") and "&amp;" not in t and "&lt;" not in t, t

        # ---- titles are not under the toolbar
        for gd in page.query_selector_all(".js-plotly-plot"):
            title = gd.query_selector(".gtitle")
            bar = gd.query_selector(".modebar")
            if title is None or bar is None:
                continue
            tb, mb = title.bounding_box(), bar.bounding_box()
            if tb and mb and mb["width"] > 0:
                a = {"left": tb["x"], "right": tb["x"] + tb["width"], "top": tb["y"], "bottom": tb["y"] + tb["height"]}
                b = {"left": mb["x"], "right": mb["x"] + mb["width"], "top": mb["y"], "bottom": mb["y"] + mb["height"]}
                assert not _boxes_overlap(a, b), (title.text_content(), a, b)

        # ---- Sankey: node labels do not collide
        labels = page.evaluate(JS_TEXT_BOXES, ".wb-routing-flow .sankey .node-label")
        assert labels, "some nodes are labelled"
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                assert not _boxes_overlap(labels[i], labels[j]), (labels[i], labels[j])
        assert page.locator(".wb-routing-flow .sankey-link").count() == 40
        page.locator(".wb-routing-flow").screenshot(path=str(shots / "sankey_default.png"))

        # ---- attention on the demo image: opens on the token before the first digit, most peaked layer
        info = next((o for o in out if '"label"' in o), None)
        if info is not None:
            info = json.loads(info)
            assert info["label"].endswith("\u2423 -> 3") or " -> " in info["label"], info
            rendered = page.evaluate("() => { const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g =>"
                                     " g.layout.meta && g.layout.meta.view === 'CrossModalAttentionView');"
                                     " return gd.querySelector('.gtitle').textContent; }")
            # the label with its context, shown as itself (plotly text lines join without the break's space)
            assert info["label"].replace(" ", "") in rendered.replace(" ", ""), (info, rendered)
            assert f"L{info['layer']}" in rendered
            shares = wait_fig(page, "CrossModalAttentionView.shares")  # drawn after the map: wait for it
            assert shares is not None and "top left" in shares["data"]
            page.locator(".wb-attention-view").screenshot(path=str(shots / "attention_story.png"))
    OUT.mkdir(parents=True, exist_ok=True)
    for f in shots.glob("*.png"):
        shutil.copy(f, OUT / f"widgets_{f.name}")


# ------------------------------------------------------------------------------ outputs that survive
JS_STATIC = """() => [...document.querySelectorAll('.wb-static img')].map(i => {
  const r = i.getBoundingClientRect();
  return {w: i.naturalWidth, visible: r.width > 50 && r.height > 50 && getComputedStyle(i).visibility !== 'hidden'
          && i.offsetParent !== null};
})"""
JS_ERRORS = """() => [...document.querySelectorAll('.jp-OutputArea-output')]
  .filter(e => e.textContent.includes('model not found') && e.offsetParent !== null).length"""


def test_saved_notebook_reopened_shows_static_figures_and_report_without_scripts(tmp_path):
    """A notebook with views, run and saved in JupyterLab, then reopened with a fresh kernel (the widget
    models are gone): every view's static snapshot shows, the "model not found" lines do not. While live,
    the snapshots are hidden and the plots follow JupyterLab's dark theme. The HTML report shows its
    static figures in Chromium with JavaScript disabled, and the interactive ones when it is enabled."""
    require_browser()
    from playwright.sync_api import sync_playwright

    from tests.test_widgets import make_trace
    from workbench.export import export_all

    root = tmp_path
    make_trace(root / "trace.zarr", layers=[1, 3, 5], n_experts=8, k=2,
               batches=[[(s, 30 + 5 * (s % 3))] for s in range(4)], seed=3)
    write_notebook(root / "saved.ipynb", [
        "from workbench.widgets import ExpertLoadDashboard, RoutingFlow\nExpertLoadDashboard('trace.zarr')",
        "RoutingFlow('trace.zarr', a=1, b=5)"])
    with jupyter_lab(root) as (base, token), browser() as page:
        open_notebook(page, base, token, "saved.ipynb")
        run_all(page)
        wait_idle(page)
        page.wait_for_function("() => document.querySelectorAll('.wb-plot[data-revision]').length >= 5",
                               timeout=120_000)
        assert not cell_errors(page)
        live = page.evaluate(JS_STATIC)
        assert len(live) >= 5 and not any(s["visible"] for s in live)  # the live views hide their snapshots
        # dark theme: the plots take JupyterLab's background
        page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
        page.locator(".lm-Menu-itemLabel", has_text="JupyterLab Dark").first.click()
        page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.wb-plot')].every(d => d.dataset.theme === 'dark')", timeout=30_000)
        bg = page.evaluate("""() => { const gd = document.querySelector('.wb-plot');
            const v = getComputedStyle(document.body).getPropertyValue('--jp-layout-color0').trim();
            return [gd._fullLayout.paper_bgcolor, gd._fullLayout.plot_bgcolor, v]; }""")
        assert bg[0] == bg[1] and bg[0] not in ("#fff", "#ffffff", "white", "rgb(255, 255, 255)"), bg
        # bars are outlined in the theme's text colour, so black / dark expert colours stay visible
        outlines = page.evaluate("""() => [...document.querySelectorAll('.wb-plot')].flatMap(gd =>
            (gd._fullData || []).filter(t => t.type === 'bar').map(t => [t.marker.line.color, t.marker.line.width]))""")
        fg = page.evaluate("() => getComputedStyle(document.body).getPropertyValue('--jp-ui-font-color1').trim()")
        assert outlines and all(w > 0 for _, w in outlines), outlines
        assert all(c not in ("#444", "#444444", "rgba(0, 0, 0, 0)") for c, _ in outlines), (outlines, fg)
        page.screenshot(path=str(tmp_path / "dark.png"), full_page=True)
        page.keyboard.press("Control+s")
        page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
        time.sleep(1)
        # reopen with a fresh kernel: the widget models are gone
        req = urllib.request.Request(f"{base}/api/kernels?token={token}")
        for k in json.loads(urllib.request.urlopen(req).read()):
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}",
                                                          method="DELETE"))
        open_notebook(page, base, token, "saved.ipynb")
        page.wait_for_function("() => document.querySelectorAll('.wb-static img').length >= 5", timeout=60_000)
        time.sleep(3)  # the widget manager gives up on the models
        shown = page.evaluate(JS_STATIC)
        page.screenshot(path=str(tmp_path / "reopened.png"), full_page=True)
        assert len(shown) >= 5 and all(s["visible"] and s["w"] > 200 for s in shown), shown
        assert page.evaluate(JS_ERRORS) == 0
        assert not page.locator(".wb-plot").count()
    import nbformat

    saved = nbformat.read(root / "saved.ipynb", as_version=4)
    for c in saved.cells:  # what GitHub / nbviewer render: a PNG after each widget output
        assert any("image/png" in o.get("data", {}) for o in c.outputs), c.source

    paper = export_all(root / "trace.zarr", root / "paper", what="report", progress=False)
    report = next(p for p in paper if p.name == "report.html")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            for js in (False, True):
                ctx = b.new_context(java_script_enabled=js, viewport={"width": 1200, "height": 900})
                page = ctx.new_page()
                page.goto(report.as_uri())
                imgs = page.locator("img.wb-static")
                assert imgs.count() == 3
                if not js:
                    for i in range(3):
                        im = imgs.nth(i)
                        assert im.is_visible() and im.evaluate("e => e.naturalWidth") > 300
                        assert im.bounding_box()["height"] > 100
                    assert not page.locator(".wb-live").first.is_visible()
                    page.screenshot(path=str(tmp_path / "report_nojs.png"), full_page=True)
                else:
                    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
                    assert not imgs.first.is_visible() and page.locator(".wb-live").first.is_visible()
                ctx.close()
        finally:
            b.close()
