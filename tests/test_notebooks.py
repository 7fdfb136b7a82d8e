"""The analysis notebooks in notebooks/ run top to bottom on a small pipeline run and on bare prediction tables.

Each is executed with nbclient in the `python3` kernel (the venv's interpreter) with inline figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="needs the notebooks extra: pip install -e '.[notebooks]'")
nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra: pip install -e '.[notebooks]'")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
INLINE = "module://matplotlib_inline.backend_inline"


def execute(name: str, run_dir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Runs notebooks/<name> against run_dir; a failing cell raises CellExecutionError naming the cell."""
    monkeypatch.setenv("DXRAG_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MPLBACKEND", INLINE)
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [out["data"][mime] for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if mime in out.get("data", {})]


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_inconsistent_predictions.ipynb", "02_consistent_vs_inconsistent.ipynb",
                                           "03_joint_vs_rag.ipynb", "04_oracle_and_selectors.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code[0].source.splitlines().count(
            'RUN_DIR = os.environ.get("DXRAG_RUN_DIR", "trained/embedded")  '
            '# a run directory, or a folder holding the tables') == 1, path
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path}: clear outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_pipeline_run(path, small_run, monkeypatch):
    base, _ = small_run
    nb = execute(path.name, base / "trained", monkeypatch)
    images = outputs(nb, "image/png")
    assert images, f"{path.name}: no figure was drawn"
    if path.name.startswith("01_"):
        assert len(images) == 2, "01: expected the n_distinct figure and the retrieved-images examples"
    if path.name.startswith("04_"):
        notes = "\n".join(outputs(nb, "text/markdown"))
        assert "No rerank file" in notes and "lvlm-rerank" in notes


@pytest.mark.slow
def test_notebooks_run_on_bare_tables_with_a_rerank_file(small_run, tmp_path, monkeypatch):
    """Only the prediction tables (no data/, no run.json) plus a rerank file: 01 skips its examples with a note and
    04 shows the LVLM selector."""
    base, summary = small_run
    tables = tmp_path / "logs"
    tables.mkdir()
    shutil.copy(summary["contexts"], tables / "contexts.jsonl")
    shutil.copy(summary["answers"], tables / "answers.jsonl")
    runs = {}
    for line in Path(summary["contexts"]).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        runs.setdefault((row["system"], row["query_id"]), []).append(row["rank"])
    with open(tables / "rerank.jsonl", "w", encoding="utf-8") as f:
        for (system, query_id), ranks in runs.items():
            f.write(json.dumps({"system": system, "query_id": query_id, "selector": "lvlm:test",
                                "ranking": sorted(ranks, reverse=True)}) + "\n")

    nb = execute("01_inconsistent_predictions.ipynb", tables, monkeypatch)
    assert len(outputs(nb, "image/png")) == 1
    assert any("Examples skipped" in note for note in outputs(nb, "text/markdown"))

    nb = execute("04_oracle_and_selectors.ipynb", tables, monkeypatch)
    assert len(outputs(nb, "image/png")) == 2
    text = "\n".join(outputs(nb, "text/plain"))
    assert "lvlm:test" in text and "No rerank file" not in "\n".join(outputs(nb, "text/markdown"))
