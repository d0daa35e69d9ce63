"""The Colab notebooks run top to bottom: each notebook's code cells execute in order in one fresh namespace (a
subprocess, as a kernel would), with a few training steps, and leave the metrics the notebook plots.

Run one by hand, as the test does:
`JAXOPD_NOTEBOOK_STEPS=3 PYTHONPATH=. python tests/test_notebooks.py notebooks/distillation.ipynb result.json`.
"""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from tests.xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STEPS = 3


def code_cells(notebook: dict) -> list[str]:
    """Source of each code cell, without IPython's shell (`!`) and magic (`%`) lines, which only set up Colab."""
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            cells.append("\n".join(line for line in lines if not line.lstrip().startswith(("!", "%"))))
    return cells


def execute(path: pathlib.Path) -> dict:
    """Runs the notebook's code cells in order in one namespace; returns its WORKDIR and the HTML it displayed.

    The cells' `from IPython.display import HTML, display` gets a stand-in that keeps the HTML: outside a kernel
    there is nowhere to render it, and IPython is not a jaxopd dependency. Only the notebook's own imports see it.
    """
    shown = []
    display_module = types.SimpleNamespace(
        HTML=type("HTML", (), {"__init__": lambda self, data: setattr(self, "data", data)}),
        display=lambda *objects: shown.extend(getattr(o, "data", repr(o)) for o in objects))

    def import_module(name, *args, **kwargs):
        return display_module if name == "IPython.display" else builtins.__import__(name, *args, **kwargs)

    namespace = {"__name__": "__main__", "__builtins__": {**vars(builtins), "__import__": import_module}}
    for index, source in enumerate(code_cells(json.loads(path.read_text()))):
        exec(compile(source, f"{path.name}, code cell {index}", "exec"), namespace)
    return {"workdir": namespace["WORKDIR"], "displayed_html": shown}


def run_notebook(name: str, tmp_path: pathlib.Path) -> tuple[list[dict], dict]:
    """Executes notebooks/<name> in a subprocess from the notebooks folder; returns (metrics.jsonl lines, result)."""
    notebook = json.loads((NOTEBOOKS / name).read_text())
    assert notebook["nbformat"] == 4 and isinstance(notebook["metadata"], dict)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: clear the outputs"
    env = {**os.environ, "JAXOPD_NOTEBOOK_STEPS": str(STEPS), "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # as `pip install -e .`
    env["XLA_FLAGS"] = xla_flags(None)  # one device, as on Colab, instead of the test suite's eight host devices
    result_file = tmp_path / "result.json"
    process = subprocess.run([sys.executable, __file__, str(NOTEBOOKS / name), str(result_file)], cwd=NOTEBOOKS,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert process.returncode == 0, f"{name} failed:\n{process.stdout[-5000:]}"
    result = json.loads(result_file.read_text())
    assert pathlib.Path(result["workdir"]).is_relative_to(tmp_path)
    lines = (pathlib.Path(result["workdir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], result


@pytest.mark.slow
def test_pretraining_notebook_trains_logs_the_loss_and_samples(tmp_path):
    metrics, _ = run_notebook("pretraining.ipynb", tmp_path)
    assert [m for m in metrics if "loss" in m][-1]["step"] == STEPS
    assert any("unigram_entropy" in m for m in metrics) and any("eval/loss" in m for m in metrics)


@pytest.mark.slow
def test_distillation_notebook_logs_eval_against_flops_and_shows_the_penalty_view(tmp_path):
    metrics, result = run_notebook("distillation.ipynb", tmp_path)
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS  # before and after distilling
    assert all("eval/reverse_kl" in m and "flops/total" in m for m in evals)
    assert evals[0]["flops/total"] == 0 < evals[-1]["flops/total"]
    assert result["displayed_html"] and all('class="token"' in page for page in result["displayed_html"])
    # and a wrong column_addition solution of the bundled student, its first wrong step found
    assert sum("column_addition: " in page for page in result["displayed_html"]) == 1


if __name__ == "__main__":
    pathlib.Path(sys.argv[2]).write_text(json.dumps(execute(pathlib.Path(sys.argv[1]))))
