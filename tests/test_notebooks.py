"""The notebooks in examples/: committed without outputs, and run end to end by a real Jupyter
kernel (nbclient) at smoke size, their cell of parameters replaced by a tiny model, local data
and two optimizer steps (the two-GPU notebook on two CPU processes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, make_rows

NOTEBOOKS = sorted((REPO / "examples").glob("*.ipynb"))


def _parameters(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    (cell,) = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in (c for c in book.cells if c.cell_type == "code"):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    assert "INSTALL" in _parameters(book).source  # the cell the smoke run replaces


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_notebook_runs_at_smoke_size(
    path: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    from datasets import Dataset
    from nbclient import NotebookClient

    unlabelled = tmp_path / "test_unlabelled.pkl"
    with unlabelled.open("wb") as fh:
        pickle.dump(Dataset.from_dict({"text": [t for t, _ in make_rows(40, seed=5)]}), fh)
    book = nbformat.read(path, as_version=4)
    smoke = {"max_steps": 2, "max_length": 32, "validation_size": 0.2, "test_size": 0.2, "progress": False}
    _parameters(book).source = "\n".join(
        [
            'INSTALL = ""',
            f"MODEL = {str(tiny_model_dir)!r}",
            f"DATA = {str(tiny_data_csv)!r}",
            f"UNLABELLED = {str(unlabelled)!r}",
            f"OUTPUT = {str(tmp_path / 'run')!r}",
            "EPOCHS = 1",
            "PROCESSES = 2",
            'MIXED_PRECISION = "no"',
            f"SMOKE = {smoke!r}",
        ]
    )
    NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    assert (tmp_path / "run" / "metrics.json").is_file()
    shown = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    markdown = [o["data"]["text/markdown"] for o in shown if "text/markdown" in o.get("data", {})]
    assert any("data:image/png;base64," in page for page in markdown)  # the report, its plots inline
    if path.name == "course-job.ipynb":
        assert any("text/html" in o.get("data", {}) for o in shown)  # the plan and the submission tables
        assert any("expect" in page for page in markdown)  # the shift report
        assert (tmp_path / "submission.csv").read_text().splitlines()[0] == "ID,Label"
    else:
        assert any("2 processes" in o.get("text", "") for o in shown)
