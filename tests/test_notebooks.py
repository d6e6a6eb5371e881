"""Every notebook in notebooks/ runs top to bottom in a fresh kernel with BUDGET = "ci" (seconds
small); a failing cell fails the test. Notebooks are committed without outputs.

The BUDGET/OUT_DIR cell is injected right after the cell tagged ``parameters``, as papermill
does, so `papermill -p BUDGET ci` runs them the same way. Needs nbclient and ipykernel (in the
``test`` extra); the HF notebook also needs peft and transformers (also in it).
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def parameters_index(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))


def test_notebooks_are_there_and_committed_without_outputs():
    assert len(NOTEBOOKS) >= 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert 'BUDGET = "full"' in nb.cells[parameters_index(nb)].source, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    if "hf" in path.stem:
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    nb = nbformat.read(path, as_version=4)
    params = 'BUDGET = "ci"\n' + (
        f"OUT_DIR = {str(tmp_path)!r}" if "OUT_DIR" in nb.cells[parameters_index(nb)].source else ""
    )
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(params))
    # The kernel is a fresh process: it must import this checkout, on one thread, without a display.
    path_env = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path_env)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")  # every cell ran
