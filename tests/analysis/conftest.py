"""Shared test data: a small context table, answer table and rerank file, every metric computed by hand in
test_cli.py; and a helper that writes them in any of the three formats.

Labels: q1=A, q2=B, q3=A, q4=C. Predictions per rank (rank 1, 2, 3):
  rag    q1 A A A | q2 A B B | q3 B C A | q4 A A B      (probs and retrieval scores on every row)
  joint  q1 A B A | q2 B B B | q3 C A A | q4 C C C      (no probs, no scores)
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from dxrag.analysis.tables import write_table

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = {"q1": "A", "q2": "B", "q3": "A", "q4": "C"}
RAG = {
    "q1": [("A", {"A": .8, "B": .1, "C": .1}, 3.0), ("A", {"A": .7, "B": .2, "C": .1}, 2.0),
           ("A", {"A": .6, "B": .3, "C": .1}, 1.0)],
    "q2": [("A", {"A": .5, "B": .4, "C": .1}, 0.0), ("B", {"A": .1, "B": .9}, 0.0),
           ("B", {"A": .2, "B": .7, "C": .1}, 0.0)],
    "q3": [("B", {"B": .9, "A": .1}, 0.0), ("C", {"C": .6, "A": .4}, 0.0), ("A", {"A": .5, "B": .5}, 0.0)],
    "q4": [("A", {"A": .6, "C": .4}, 0.0), ("A", {"A": .55, "C": .45}, 0.0), ("B", {"B": .5, "C": .5}, 10.0)],
}
JOINT = {"q1": "ABA", "q2": "BBB", "q3": "CAA", "q4": "CCC"}


def contexts_frame() -> pd.DataFrame:
    rows = []
    for q, ranks in RAG.items():
        for rank, (pred, probs, score) in enumerate(ranks, 1):
            # case and whitespace variations: answers are compared after strip() + casefold()
            shown = pred.lower() if (q, rank) == ("q1", 2) else f" {pred}" if (q, rank) == ("q2", 3) else pred
            rows.append(dict(system="rag", query_id=q, rank=rank, label=LABELS[q], prediction=shown,
                             item_id=f"c{q}{rank}", head="image", retrieval_score=score, probs=probs))
    for q, preds in JOINT.items():
        for rank, pred in reversed(list(enumerate(preds, 1))):  # unsorted ranks exercise the sorting path
            rows.append(dict(system="joint", query_id=q, rank=rank, label=LABELS[q], prediction=pred,
                             item_id=f"j{q}{rank}", head="text", retrieval_score=None, probs=None))
    return pd.DataFrame(rows)


def answers_frame() -> pd.DataFrame:
    preds = {"q1": "A", "q2": "A", "q3": "a", "q4": "B"}
    return pd.DataFrame([dict(system="closed", query_id=q, prediction=p, label=LABELS[q]) for q, p in preds.items()])


def rerank_frame() -> pd.DataFrame:
    return pd.DataFrame([
        dict(system="rag", query_id="q1", selector="lvlm:test", ranking=[2, 1, 3], error=""),
        dict(system="rag", query_id="q2", selector="lvlm:test", ranking=[3, 1, 2], error=""),
        dict(system="rag", query_id="q3", selector="lvlm:test", ranking=[], error="APITimeoutError"),
    ])  # q4 missing: falls back to rank 1 too


def write_fixture(root: Path, suffix: str) -> dict[str, Path]:
    paths = {name: root / f"{name}{suffix}" for name in ("contexts", "answers", "rerank")}
    write_table(contexts_frame(), paths["contexts"])
    write_table(answers_frame(), paths["answers"])
    write_table(rerank_frame(), paths["rerank"])
    return paths


@pytest.fixture(params=[".jsonl", ".csv", ".parquet"])
def fixture_files(request, tmp_path: Path) -> dict[str, Path]:
    return write_fixture(tmp_path, request.param)


@pytest.fixture
def jsonl_files(tmp_path: Path) -> dict[str, Path]:
    return write_fixture(tmp_path, ".jsonl")
