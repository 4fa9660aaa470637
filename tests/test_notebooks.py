"""The notebooks in notebooks/: stored without outputs, and each runs top to bottom in a fresh kernel.

Every `notebooks/*.ipynb` is picked up. The execution tests run the notebooks as a reader does (kernel
python3, through nbclient), in a temporary working folder with this checkout first on the path; they share
one digits model, which the first notebook trains through `python train.py` (the notebooks' fallback when
`LDM_NOTEBOOK_CKPT` is not set) into that folder and the next ones reuse. The tests shorten that run to
TRAIN_STEPS: they check that every cell runs and draws, not how well a model follows its prompts (README,
"Notebooks", has the numbers for the notebooks' default length). finetune.ipynb's LoRA and DreamBooth runs
are shortened to FINETUNE_STEPS the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TRAIN_STEPS = 200
FINETUNE_STEPS = 30  # finetune.ipynb: its LoRA and DreamBooth runs
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_notebooks_present():
    names = {path.name for path in NOTEBOOKS}
    assert {
        "quickstart.ipynb",
        "how_stable_diffusion_works.ipynb",
        "evaluate.ipynb",
        "finetune.ipynb",
    } <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    """Outputs and execution counts are stripped, so diffs show code changes only."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them first"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"


def _failure(name: str, nb: nbformat.NotebookNode) -> str | None:
    """The first cell that raised: its index, source and the error with traceback (None when none did)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                trace = ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (
                    f"{name}, cell {i} failed:\n--- source ---\n{cell.source}\n--- error ---\n"
                    f"{out['ename']}: {out['evalue']}\n{trace}"
                )
    return None


def execute(nb: nbformat.NotebookNode, name: str, workdir: Path) -> None:
    """Run every cell in a fresh python3 kernel working in `workdir`; fail with the failing cell's source and
    error."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(_failure(name, nb) or str(error), pytrace=False)
    assert _failure(name, nb) is None


def test_failure_names_the_cell(tmp_path):
    """A failing cell is reported with its index, its source and the error."""
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("x / 0")]
    )
    with pytest.raises(pytest.fail.Exception) as failure:
        execute(nb, "broken.ipynb", tmp_path)
    message = str(failure.value)
    assert "broken.ipynb, cell 1 failed" in message
    assert "x / 0" in message and "ZeroDivisionError" in message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for all notebooks, so the digits model is trained once."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, workdir, monkeypatch):
    # The kernel inherits this environment: this checkout first on the path, the model in workdir.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LDM_NOTEBOOK_RUN", str(workdir / "runs" / "notebook_digits"))
    monkeypatch.setenv("LDM_NOTEBOOK_TRAIN_STEPS", str(TRAIN_STEPS))
    monkeypatch.setenv("LDM_NOTEBOOK_LORA_STEPS", str(FINETUNE_STEPS))
    monkeypatch.setenv("LDM_NOTEBOOK_DREAMBOOTH_STEPS", str(FINETUNE_STEPS))
    monkeypatch.delenv("LDM_NOTEBOOK_CKPT", raising=False)
    nb = nbformat.read(path, as_version=4)
    execute(nb, path.name, workdir)
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert figures > 0, f"{path.name} drew no figure"
