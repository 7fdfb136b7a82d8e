"""Prediction-derived relevance: summary.csv's MRR / nDCG / Success equal a direct per-query computation and
trec_eval's (through ir_measures) on the exported run and qrels files, including short queries, repeated item ids,
queries without a correct context and retrieval scores that do not fall with rank."""

from __future__ import annotations

import logging
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dxrag.analysis import OracleReport, relevance, write_table
from dxrag.analysis.cli import main


def _table(n: int = 300, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """Random context table: ~1/3 of contexts correct, some ranks missing (for --short keep), repeated item ids,
    scores that rise with rank in system 'mixed' (TREC tools would reorder those)."""
    rng = np.random.default_rng(seed)
    rows = []
    for system in ("rag", "mixed"):
        for i in range(n):
            label = "yes" if i % 2 else "no"
            for rank in range(1, k + 1):
                if rng.random() < 0.1:
                    continue  # a missing rank
                pred = label if rng.random() < 0.33 else ("no" if label == "yes" else "yes")
                score = 1.0 - 0.1 * rank if system == "rag" else float(rng.random())
                rows.append(dict(system=system, query_id=f"q{i}", rank=rank, label=label, prediction=pred,
                                 item_id=f"d{rng.integers(8)}", retrieval_score=score))
    return pd.DataFrame(rows)


def _direct(df: pd.DataFrame, system: str, k: int) -> dict[str, float]:
    """MRR, nDCG@k, nDCG@1, Success@k, Success@1 by their textbook formulas, one query at a time."""
    out = {"mrr": [], "ndcg_at_k": [], "ndcg_at_1": [], "success_at_k": [], "success_at_1": []}
    part = df[(df["system"] == system) & (df["rank"] <= k)]
    for _, g in part.sort_values("rank").groupby("query_id"):
        rel = (g["prediction"] == g["label"]).to_list()
        out["mrr"].append(next((1 / (i + 1) for i, r in enumerate(rel) if r), 0.0))
        for cut, name in ((k, "ndcg_at_k"), (1, "ndcg_at_1")):
            dcg = sum(1 / math.log2(i + 2) for i, r in enumerate(rel[:cut]) if r)
            ideal = sum(1 / math.log2(i + 2) for i in range(min(sum(rel), cut)))
            out[name].append(dcg / ideal if ideal else 0.0)
        out["success_at_k"].append(float(any(rel)))
        out["success_at_1"].append(float(rel[0]))
    return {name: float(np.mean(v)) for name, v in out.items()}


@pytest.fixture
def written(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    df = _table()
    write_table(df, tmp_path / "contexts.parquet")
    out = tmp_path / "out"
    assert main(["--contexts", str(tmp_path / "contexts.parquet"), "--short", "keep", "--k", "5", "--no-figures",
                 "--out", str(out)]) == 0
    return df, out


def test_summary_matches_direct_computation(written):
    df, out = written
    summary = pd.read_csv(out / "summary.csv").set_index("system")
    for system in ("rag", "mixed"):
        direct = _direct(df, system, 5)
        for name, value in direct.items():
            assert summary.loc[system, name] == pytest.approx(value, abs=1e-12), (system, name)
        assert summary.loc[system, "success_at_1"] == pytest.approx(summary.loc[system, "top1_acc"])
        assert summary.loc[system, "success_at_k"] == pytest.approx(summary.loc[system, "oracle_acc"])
    assert 0 < summary.loc["rag", "mrr"] < 1 and summary.loc["rag", "ndcg_at_k"] != summary.loc["rag", "mrr"]


def test_exported_files_evaluate_to_the_same_numbers_in_trec_eval(written):
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import RR, Success, nDCG

    _, out = written
    summary = pd.read_csv(out / "summary.csv").set_index("system")
    measures = {"mrr": RR, "ndcg_at_k": nDCG @ 5, "ndcg_at_1": nDCG @ 1, "success_at_k": Success @ 5,
                "success_at_1": Success @ 1}
    for system in ("rag", "mixed"):
        qrels = list(ir_measures.read_trec_qrels(str(out / "trec" / f"{system}.qrels")))
        run = list(ir_measures.read_trec_run(str(out / "trec" / f"{system}.run")))
        queries = {q.query_id for q in qrels}
        assert len(queries) == summary.loc[system, "n_queries"]
        per_query = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(measures.values(), qrels,
                                                                                           run)}
        for name, measure in measures.items():
            mean = np.mean([per_query.get((q, str(measure)), 0.0) for q in queries])  # absent: no relevant item
            assert summary.loc[system, name] == pytest.approx(mean, abs=1e-9), (system, name)


def test_run_file_format_and_score_rule(written):
    _, out = written
    run = pd.read_csv(out / "trec" / "rag.run", sep=" ", header=None,
                      names=["query_id", "q0", "item_id", "rank", "score", "tag"], dtype={"query_id": str})
    assert (run["q0"] == "Q0").all() and (run["tag"] == "rag").all()
    assert not run.duplicated(["query_id", "item_id"]).any()  # repeated item ids got '#<rank>'
    assert run["item_id"].str.contains("#").any()
    assert run["score"].round(6).isin([0.9, 0.8, 0.7, 0.6, 0.5]).all()  # rag's scores fall with rank: kept
    mixed = pd.read_csv(out / "trec" / "mixed.run", sep=" ", header=None)
    first = mixed.groupby(0)[4].max()
    assert (first == 1.0).all()  # mixed's do not: 1 / position
    qrels = pd.read_csv(out / "trec" / "rag.qrels", sep=" ", header=None)
    assert set(qrels[1]) == {0} and set(qrels[3]) == {0, 1} and len(qrels) == len(run)


def test_whitespace_ids_skip_the_export_with_a_warning(tmp_path, caplog):
    df = _table(n=20, k=2)
    df["query_id"] = df["query_id"].str.replace("q", "query ")
    write_table(df, tmp_path / "c.jsonl")
    report = OracleReport.from_tables(tmp_path / "c.jsonl", short="keep")
    with caplog.at_level(logging.WARNING):
        report.write(tmp_path / "out", figures=False)
    assert "TREC export of system rag skipped" in caplog.text
    assert not (tmp_path / "out" / "trec" / "rag.run").exists() and (tmp_path / "out" / "summary.csv").exists()
    assert not np.isnan(report.summary()["mrr"]).any()


@pytest.mark.parametrize("block", [1, 7])
def test_export_in_blocks_writes_the_same_files(written, tmp_path, monkeypatch, block):
    """The TREC files are built a block of queries at a time; the blocks (one query each, or queries split across
    ranks) change nothing in the files, repeated ids and short queries included."""
    _, out = written
    report = OracleReport.from_tables(tmp_path / "contexts.parquet", short="keep", k=5)
    monkeypatch.setattr(relevance, "_BLOCK", block, raising=False)
    done = relevance.write_trec(report.contexts, report.metrics, tmp_path / "blocks")
    assert done == {"rag": {"run": "rag.run", "qrels": "rag.qrels", "score": "retrieval_score"},
                    "mixed": {"run": "mixed.run", "qrels": "mixed.qrels", "score": "1/position"}}
    for name in ("rag.run", "rag.qrels", "mixed.run", "mixed.qrels"):
        assert (tmp_path / "blocks" / name).read_bytes() == (out / "trec" / name).read_bytes(), name


def test_export_memory_is_bounded_by_the_block(tmp_path, monkeypatch):
    """Memory of the export: numpy's allocations (traced) stay a few bytes per line when the blocks are small
    (a whole-table pass formatting each rank as a numpy string took ~124 bytes a line)."""
    n, k = 20_000, 10
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"system": "rag", "query_id": np.repeat([f"q{i}" for i in range(n)], k),
                       "rank": np.tile(np.arange(1, k + 1), n),
                       "label": np.repeat(rng.integers(0, 3, n), k).astype(str),
                       "prediction": rng.integers(0, 3, n * k).astype(str),
                       "item_id": [f"d{i}" for i in rng.integers(0, 1000, n * k)],
                       "retrieval_score": np.tile(1.0 - 0.05 * np.arange(k), n)})
    write_table(df, tmp_path / "c.parquet")
    report = OracleReport.from_tables(tmp_path / "c.parquet")
    monkeypatch.setattr(relevance, "_BLOCK", 1 << 12, raising=False)
    tracemalloc.start()
    try:
        relevance.write_trec(report.contexts, report.metrics, tmp_path / "trec")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * n * k, f"{peak / (n * k):.1f} bytes per line"
    assert sum(1 for _ in open(tmp_path / "trec" / "rag.run")) == n * k


def test_export_reads_only_the_item_column_again(written, tmp_path, monkeypatch):
    """The loader leaves item_id out; the export reads that one column back from Parquet, not the whole table (a
    second copy of the validated columns was the analysis' memory peak)."""
    from dxrag.analysis import tables

    report = OracleReport.from_tables(tmp_path / "contexts.parquet", short="keep", k=5)
    read = []
    real = tables.pq.read_table
    monkeypatch.setattr(tables.pq, "read_table", lambda *a, **kw: read.append(kw.get("columns")) or real(*a, **kw))
    relevance.write_trec(report.contexts, report.metrics, tmp_path / "again")
    assert read == [["item_id"]]
    _, out = written
    assert (tmp_path / "again" / "rag.run").read_bytes() == (out / "trec" / "rag.run").read_bytes()
