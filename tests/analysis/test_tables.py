"""write_table / loaders round trip in every format with the columns the core pipeline writes, and the Parquet
fast path (dictionary-encoded row groups) against the JSONL path."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dxrag.analysis import CONTEXT_COLUMNS, OracleReport, TableError, load_contexts, write_table
from dxrag.analysis.tables import PROBS, load_answers


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_pipeline_columns_round_trip(tmp_path, suffix):
    df = pd.DataFrame([
        dict(system="joint", query_id="007", rank=1, label="Grade 2", prediction="grade 2", item_id="c1",
             head="image", retrieval_score=0.75, probs={"Grade 2": 0.625, "Grade 3": 0.375}, answer_type="closed"),
        dict(system="joint", query_id="007", rank=2, label="Grade 2", prediction="Grade 3", item_id="c9",
             head="text", retrieval_score=-0.5, probs=None, answer_type="closed"),
    ])[list(CONTEXT_COLUMNS)]
    path = write_table(df, tmp_path / f"ctx{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    table = load_contexts(path, columns=CONTEXT_COLUMNS)
    assert table.query_ids.tolist() == ["007"]  # ids stay strings, even in CSV
    assert table.answers == ["grade 2", "grade 3"]
    assert table.raw.columns[PROBS].to_pylist() == [[("Grade 2", 0.625), ("Grade 3", 0.375)], None]
    assert table.score.tolist() == [0.75, -0.5]
    assert table.raw.columns["head"].to_pylist() == ["image", "text"]
    report = OracleReport.from_tables(table)
    assert report.summary().loc[0, "top1_acc"] == 1.0 and report.summary().loc[0, "inconsistent_rate"] == 1.0

    answers = write_table(pd.DataFrame([dict(system="closed", query_id="007", prediction="Grade 3",
                                             label="Grade 2", probs={"Grade 3": 1.0})]), tmp_path / f"a{suffix}")
    assert load_answers(answers).frame["correct"].tolist() == [False]


def test_unsupported_suffix_writes_nothing(tmp_path):
    with pytest.raises(TableError, match="unsupported file type"):
        write_table(pd.DataFrame({"system": ["x"]}), tmp_path / "ctx.xlsx")
    assert list(tmp_path.iterdir()) == []


def test_parquet_row_groups_match_jsonl(tmp_path):
    rows = [dict(system=s, query_id=f"q{q}", rank=r, label="AB"[q % 2], prediction="ABC"[(q + r + i) % 3])
            for i, s in enumerate(["rag", "joint"]) for q in range(7) for r in (1, 2, 3)]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # shuffled: the sorting path
    write_table(df, tmp_path / "ctx.jsonl")
    write_table(df, tmp_path / "tmp.parquet")
    pq.write_table(pq.read_table(tmp_path / "tmp.parquet"), tmp_path / "ctx.parquet", row_group_size=4)
    a = OracleReport.from_tables(tmp_path / "ctx.jsonl")
    b = OracleReport.from_tables(tmp_path / "ctx.parquet")
    assert len(pq.ParquetFile(tmp_path / "ctx.parquet").metadata.row_group(0).to_dict()["columns"]) == 5
    assert pq.ParquetFile(tmp_path / "ctx.parquet").num_row_groups == 11
    pd.testing.assert_frame_equal(a.per_query().sort_values(["system", "query_id"]).reset_index(drop=True),
                                  b.per_query().sort_values(["system", "query_id"]).reset_index(drop=True))
    assert list(a.summary()["system"]) == list(b.summary()["system"])


def test_fusion_temperature(tmp_path):
    # label A; rank 1 says A with score 1, ranks 2-3 say B with score 0. softmax(s / T): T=1 -> A 0.576 vs B 0.424;
    # T=10 -> A 0.356 vs B 0.644.
    rows = [dict(system="rag", query_id="q", rank=r, label="A", prediction=p, retrieval_score=s, probs={p: 1.0})
            for r, p, s in ((1, "A", 1.0), (2, "B", 0.0), (3, "B", 0.0))]
    path = write_table(pd.DataFrame(rows), tmp_path / "ctx.jsonl")
    for temperature, correct in ((0.1, True), (1.0, True), (10.0, False)):
        report = OracleReport.from_tables(path, fusion_temperature=temperature)
        assert {s.name: bool(s.correct[0]) for s in report.selectors["rag"]}["fusion"] is correct, temperature
    with pytest.raises(TableError, match="fusion-temperature"):
        OracleReport.from_tables(path, fusion_temperature=0.0)
