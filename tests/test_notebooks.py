"""Every notebook in ``notebooks/`` runs top to bottom without error, and is committed executed.

The notebooks execute in a fresh kernel started from the interpreter running pytest (the
``python3`` kernel spec resolves ``python`` to ``sys.executable``), with the repository root on
``PYTHONPATH`` so the checkout's ``jaxce`` is the one imported even when it is not installed.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

_NEEDS = "the notebooks extra is not installed: pip install -e '.[notebooks]'"
nbclient = pytest.importorskip("nbclient", reason=_NEEDS)
nbformat = pytest.importorskip("nbformat", reason=_NEEDS)
pytest.importorskip("ipykernel", reason=_NEEDS)

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
MAX_NOTEBOOK_BYTES = 300_000  # small enough to review and to render on the web


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # let the kernel use its inline backend, so figures are outputs
    return env


def _execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    return client.execute(env=_kernel_env())


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


def test_kernel_is_this_interpreter() -> None:
    """The ``python3`` kernel runs the interpreter (and so the environment) running the tests."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell("import sys, jaxce; print(sys.executable)"))
    executed = _execute(notebook)
    printed = executed.cells[0].outputs[0]["text"].strip()
    assert pathlib.Path(printed).resolve() == pathlib.Path(sys.executable).resolve()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path: pathlib.Path) -> None:
    """Committed executed, in order, so that it renders with its plots on the web."""
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].cell_type == "markdown"
    assert (
        notebook.cells[0].source.startswith("# ")
        and "?" in notebook.cells[0].source.splitlines()[0]
    )
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: pathlib.Path) -> None:
    """Runs every cell in a fresh kernel; nbclient raises CellExecutionError on any error."""
    notebook = nbformat.read(path, as_version=4)
    executed = _execute(notebook)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
