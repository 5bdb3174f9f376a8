"""Every notebook runs top to bottom (outputs stripped in git, executed here with a real kernel)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == sorted({p.name[:2] for p in NOTEBOOKS}) and NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be stripped in git"
    monkeypatch.setenv("WB_RUNS", str(tmp_path / "runs"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # outputs that survive: every view's widget output is followed by its static snapshot (a PNG for
    # GitHub / nbviewer, HTML for JupyterLab), so the saved notebook shows its figures without a kernel
    widget = "application/vnd.jupyter.widget-view+json"
    for c in nb.cells:
        outs = [o for o in c.get("outputs", []) if o.output_type in ("display_data", "execute_result")]
        for i, o in enumerate(outs):
            if widget in o.data and "interactive view" in o.data.get("text/plain", ""):
                nxt = outs[i + 1].data if i + 1 < len(outs) else {}
                assert "wb-static" in nxt.get("text/html", ""), c.source
    if path.name.startswith("05"):
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "NO CHECKPOINT GIVEN" in text  # said loudly when running on the tiny model


def test_notebook_traces_go_under_the_repo_runs_whatever_the_working_directory(tmp_path):
    """The notebooks' RUNS: WB_RUNS, else <repo>/runs, from any kernel working directory."""
    import subprocess
    import sys

    sys.path.insert(0, str(NOTEBOOKS[0].parent))
    from make_notebooks import RUNS_SETUP

    root = NOTEBOOKS[0].parent.parent
    code = "import os\nimport workbench as wb\n" + RUNS_SETUP
    env = {k: v for k, v in os.environ.items() if k != "WB_RUNS"}
    for cwd in (tmp_path, root / "notebooks", root):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"traces under: {root / 'runs'}", cwd
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "WB_RUNS": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"traces under: {tmp_path}"
