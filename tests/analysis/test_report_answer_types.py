"""The report on set-valued (multi-label) and free-text (open VQA) predictions: judging and every output, with the
expected numbers worked out by hand in the comments; bad answer types fail with file, line and field. The answer
normalisation itself (core/base/answers.py) is tested in tests/base/test_answers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dxrag.analysis import OracleReport, TableError
from dxrag.core.base.answers import AnswerSettings, score_rows
from dxrag.analysis.cli import main
from dxrag.analysis.stats import membership, set_f1, set_f1_interval, system_metrics
from dxrag.analysis.tables import write_table
from task_fixtures import rewrite_set

ALL_FILES = ("per_query.csv", "summary.csv", "oracle_at_k.csv", "subsets.csv", "selectors.csv", "mcnemar.csv",
             "summary.md", "provenance.json")


# ------------------------------------------------------------------------------------------------ report units


def test_set_report_is_invariant_to_how_sets_are_written(tmp_path):
    rng = np.random.default_rng(11)
    labels = ["a", "b", "c", "d"]
    rows, rewritten = [], []
    for q in range(60):
        gold = [x for x in labels if rng.random() < 0.4]
        for r in range(1, 4):
            pred = gold if rng.random() < 0.5 else [x for x in labels if rng.random() < 0.4]
            row = dict(system="rag", query_id=f"q{q}", rank=r, answer_type="set")
            rows.append(dict(row, label=", ".join(sorted(gold)) or "none",
                             prediction=", ".join(sorted(pred)) or "none"))
            rewritten.append(dict(row, label=rewrite_set(gold, rng), prediction=rewrite_set(pred, rng)))
    a = OracleReport.from_tables(write_table(pd.DataFrame(rows), tmp_path / "a.jsonl"))
    b = OracleReport.from_tables(write_table(pd.DataFrame(rewritten), tmp_path / "b.jsonl"))
    pd.testing.assert_frame_equal(a.summary(), b.summary())
    pd.testing.assert_frame_equal(a.per_query(), b.per_query())
    assert 0 < a.summary().loc[0, "top1_acc"] < 1 and 0 < a.summary().loc[0, "top1_macro_f1"] < 1


def test_set_f1_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    gold, pred = rng.random((200, 5)) < 0.3, rng.random((200, 5)) < 0.3
    gold[:, 4] = False  # a label never gold: left out of the macro mean (labels = gold members seen)
    macro, micro = set_f1(gold, pred)
    assert macro == pytest.approx(sk.f1_score(gold[:, :4], pred[:, :4], average="macro", zero_division=0))
    # micro counts every label given (label 4's false positives too)
    assert micro == pytest.approx(sk.f1_score(gold, pred, average="micro", zero_division=0))
    lo, hi = set_f1_interval(gold[:, :4], pred[:, :4], n_boot=500, rng=np.random.default_rng(0))
    assert lo < macro < hi and hi - lo < 0.3
    assert (lo, hi) == set_f1_interval(gold[:, :4], pred[:, :4], n_boot=500, rng=np.random.default_rng(0))
    same = np.ones((10, 2), dtype=bool)  # every query right: no spread
    assert set_f1_interval(same, same, n_boot=50) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------ set tables


SET_ROWS = {  # query: (gold, predictions at ranks 1..3)
    "q1": ("a, b", ["b, a", "A,B", "a , b"]),  # all {a, b}: consistent, right
    "q2": ("none", ["a", "None", "c"]),  # {a}, {}, {c}: 3 distinct, rank 2 right; majority tie -> rank 1 {a}
    "q3": ("c", ["c, a", "a,c", "c"]),  # {a, c} twice, {c}: 2 distinct, majority {a, c} wrong, rank 3 right
}


def _set_table(path: Path, column: bool) -> Path:
    rows = [dict(system="rag", query_id=q, rank=r, label=gold, prediction=p, item_id=f"{q}-{r}",
                 retrieval_score=float(3 - r), **({"answer_type": "set"} if column else {}))
            for q, (gold, preds) in SET_ROWS.items() for r, p in enumerate(preds, 1)]
    return write_table(pd.DataFrame(rows), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_set_table_by_hand(tmp_path, suffix):
    report = OracleReport.from_tables(_set_table(tmp_path / f"ctx{suffix}", column=True), interval="bootstrap",
                                      n_boot=200)
    pq = report.per_query().set_index("query_id")
    assert pq["answer_type"].tolist() == ["set"] * 3
    assert pq["label"].tolist() == ["a, b", "none", "c"]
    assert pq["top1_prediction"].tolist() == ["a, b", "a", "a, c"]
    assert pq["n_distinct"].tolist() == [1, 3, 2]
    assert pq["majority_prediction"].tolist() == ["a, b", "a", "a, c"]
    assert pq["top1_correct"].tolist() == [True, False, False]
    assert pq["oracle_correct"].tolist() == [True, True, True]
    assert pq["first_correct_rank"].tolist() == [1, 2, 3]
    s = report.summary().iloc[0]
    assert (s["n_set"], s["n_closed"], s["n_open"]) == (3, 0, 0)
    assert s["top1_acc"] == pytest.approx(1 / 3) and s["oracle_acc"] == 1.0
    assert s["inconsistent_rate"] == pytest.approx(2 / 3)
    # Top-1 sets {a,b}, {a}, {a,c} against gold {a,b}, {}, {c}; labels = gold members seen = a, b, c.
    # a: TP 1, FP 2 -> F1 0.5; b: TP 1 -> 1; c: TP 1 -> 1. Macro (0.5 + 1 + 1) / 3; micro 2*3 / (2*3 + 2) = 0.75.
    assert s["top1_macro_f1"] == pytest.approx(2.5 / 3) and s["top1_micro_f1"] == pytest.approx(0.75)
    assert s["majority_macro_f1"] == pytest.approx(2.5 / 3)
    assert s["top1_macro_f1_lo"] <= s["top1_macro_f1"] <= s["top1_macro_f1_hi"]
    assert np.isnan(s["top1_token_f1"])
    sel = report.selectors_frame().set_index("selector")
    assert sel.loc["oracle", "macro_f1"] == 1.0 and sel.loc["oracle", "micro_f1"] == 1.0
    assert sel.loc["retriever", "macro_f1"] == s["top1_macro_f1"]
    assert sel.loc["retriever", "macro_f1_lo"] == s["top1_macro_f1_lo"]  # one bootstrap stream per method
    oak = report.oracle_at_k()
    assert oak["oracle_acc"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_task_option_equals_the_column(tmp_path):
    by_column = OracleReport.from_tables(_set_table(tmp_path / "a.jsonl", column=True))
    by_task = OracleReport.from_tables(_set_table(tmp_path / "b.jsonl", column=False),
                                       answer_settings=AnswerSettings(task="set"))
    pd.testing.assert_frame_equal(by_column.per_query(), by_task.per_query())
    pd.testing.assert_frame_equal(by_column.summary(), by_task.summary())
    closed = OracleReport.from_tables(tmp_path / "b.jsonl").summary().iloc[0]  # read as closed: "b, a" != "a, b"
    assert closed["top1_acc"] == 0.0 and closed["n_closed"] == 3


def test_cli_on_a_set_table_writes_every_file(tmp_path, capsys):
    ctx = _set_table(tmp_path / "ctx.csv", column=False)
    answers = write_table(pd.DataFrame([dict(system="closed-book", query_id=q, prediction=p, label=SET_ROWS[q][0])
                                        for q, p in (("q1", "B, A"), ("q2", "none"), ("q3", "a"))]),
                          tmp_path / "answers.csv")
    out = tmp_path / "out"
    assert main(["--contexts", str(ctx), "--answers", str(answers), "--task", "set", "--out", str(out)]) == 0
    for name in ALL_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "figures" / "oracle_at_k.pdf").exists() and (out / "trec" / "rag.qrels").exists()
    sub = pd.read_csv(out / "subsets.csv").set_index(["system", "subset"])
    assert sub.loc[("closed-book", "all"), "acc"] == pytest.approx(2 / 3)  # {a,b} and {} right, {a} for {c} wrong
    qrels = (out / "trec" / "rag.qrels").read_text().split("\n")
    assert "q2 0 q2-2 1" in qrels and "q2 0 q2-1 0" in qrels
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["arguments"]["task"] == "set" and prov["arguments"]["empty_set"] == "none"
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "top1_macro_f1"] == pytest.approx(2.5 / 3)
    assert "## Multi-label queries" in (out / "summary.md").read_text()


def test_answer_table_without_types_takes_the_contexts_types(tmp_path):
    ctx = _set_table(tmp_path / "ctx.jsonl", column=True)
    answers = write_table(pd.DataFrame([dict(system="closed-book", query_id=q, prediction=p, label=SET_ROWS[q][0])
                                        for q, p in (("q1", "B, A"), ("q2", "None"), ("q3", "c, a"))]),
                          tmp_path / "answers.csv")
    sub = OracleReport.from_tables(ctx, answers=answers).subsets().set_index(["system", "subset"])
    assert sub.loc[("closed-book", "all"), "acc"] == pytest.approx(2 / 3)  # read as sets: {a,b} and {} right


def test_untyped_answer_labels_compare_after_the_contexts_normalisation(tmp_path):
    # Two systems write the same gold differently; equal once each query's type (set, open) normalises them.
    ctx = [dict(system="rag", query_id="q1", rank=1, label="Atelectasis", prediction="atelectasis", answer_type="set"),
           dict(system="rag", query_id="q2", rank=1, label="The left lung.", prediction="left lung",
                answer_type="open")]
    answers = [dict(system="rag", query_id="q1", prediction="atelectasis", label="Atelectasis"),
               dict(system="joint", query_id="q1", prediction="Atelectasis, mass", label=",atelectasis, Atelectasis"),
               dict(system="rag", query_id="q2", prediction="left lung", label="The left lung."),
               dict(system="joint", query_id="q2", prediction="right lung", label="left lung")]
    report = OracleReport.from_tables(write_table(pd.DataFrame(ctx), tmp_path / "ctx.jsonl"),
                                      answers=write_table(pd.DataFrame(answers), tmp_path / "answers.csv"))
    frame = report.answers.frame.set_index(["system", "query_id"])
    assert frame["answer_type"].tolist() == ["set", "set", "open", "open"]
    assert frame["correct"].tolist() == [True, False, True, False]
    # a real disagreement is still refused, after normalisation
    answers[1]["label"] = "atelectasis, mass"
    with pytest.raises(TableError, match=r"answers.csv:3: field 'label': .*a query has one gold label"):
        OracleReport.from_tables(tmp_path / "ctx.jsonl",
                                 answers=write_table(pd.DataFrame(answers), tmp_path / "answers.csv"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_gold_on_a_set_row_is_the_empty_set(tmp_path, suffix):
    rows = [dict(system="rag", query_id="q1", rank=1, label="", prediction="none", answer_type="set"),
            dict(system="rag", query_id="q1", rank=2, label="", prediction="a, b", answer_type="set"),
            dict(system="rag", query_id="q2", rank=1, label="a", prediction="", answer_type="set"),
            dict(system="rag", query_id="q2", rank=2, label="a", prediction="a", answer_type="set")]
    path = write_table(pd.DataFrame(rows), tmp_path / f"ctx{suffix}")
    pq = OracleReport.from_tables(path).per_query().set_index("query_id")
    assert pq.loc["q1", "label"] == "none" and bool(pq.loc["q1", "top1_correct"])
    assert not pq.loc["q2", "top1_correct"]
    answers = write_table(pd.DataFrame([dict(system="cb", query_id="q1", prediction="None", label="")]),
                          tmp_path / "answers.jsonl")  # untyped: the context table says set
    assert OracleReport.from_tables(path, answers=answers).answers.frame["correct"].tolist() == [True]
    # on a closed row an empty gold is still an error, naming the row
    for row in rows[2:]:
        row.update(answer_type="closed", label="")
    with pytest.raises(TableError, match=r"field 'label': empty string.*valid only on a row whose answer_type is set"):
        OracleReport.from_tables(write_table(pd.DataFrame(rows), tmp_path / f"bad{suffix}"))
    closed = write_table(pd.DataFrame([dict(system="cb", query_id="q9", prediction="a", label="")]),
                         tmp_path / "closed_answers.jsonl")
    with pytest.raises(TableError, match=r"closed_answers.jsonl:1: field 'label': empty string"):
        OracleReport.from_tables(path, answers=closed)


def test_empty_set_token(tmp_path):
    rows = [dict(system="rag", query_id="q1", rank=1, label="No finding", prediction="no finding"),
            dict(system="rag", query_id="q1", rank=2, label="No finding", prediction="mass, no finding")]
    path = write_table(pd.DataFrame(rows), tmp_path / "ctx.jsonl")
    s = OracleReport.from_tables(path, answer_settings=AnswerSettings(task="set", empty_set="No finding"))
    pq = s.per_query()
    assert pq["label"].tolist() == ["no finding"] and pq["n_distinct"].tolist() == [2]
    assert pq["top1_correct"].tolist() == [True]
    assert np.isnan(s.summary().loc[0, "top1_macro_f1"])  # no gold member at all: macro-F1 undefined


# ----------------------------------------------------------------------------------------------- open tables


OPEN_ROWS = {  # query: (gold, predictions at ranks 1, 2)
    "q1": ("left lung", ["The left lung.", "right lung"]),  # rank 1 EM-right
    "q2": ("pleural effusion", ["effusion", "large pleural effusion"]),  # recall 1/2 and 1; F1 2/3 and 0.8
    "q3": ("no", ["No", "no."]),  # consistent, right
}


def _open_table(path: Path) -> Path:
    rows = [dict(system="rag", query_id=q, rank=r, label=gold, prediction=p, answer_type="open")
            for q, (gold, preds) in OPEN_ROWS.items() for r, p in enumerate(preds, 1)]
    return write_table(pd.DataFrame(rows), path)


def test_open_table_by_hand(tmp_path):
    path = _open_table(tmp_path / "ctx.jsonl")
    report = OracleReport.from_tables(path)
    pq = report.per_query().set_index("query_id")
    assert pq["label"].tolist() == ["left lung", "pleural effusion", "no"]
    assert pq["top1_prediction"].tolist() == ["left lung", "effusion", "no"]
    assert pq["n_distinct"].tolist() == [2, 2, 1]
    assert pq["top1_correct"].tolist() == [True, False, True]
    assert pq["oracle_correct"].tolist() == [True, False, True]
    assert pq["top1_token_f1"].tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    assert pq["top1_token_recall"].tolist() == pytest.approx([1.0, 0.5, 1.0])
    s = report.summary().iloc[0]
    assert s["n_open"] == 3 and s["top1_acc"] == pytest.approx(2 / 3) and s["oracle_acc"] == pytest.approx(2 / 3)
    assert s["top1_token_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert s["top1_token_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert np.isnan(s["top1_macro_f1"])
    sel = report.selectors_frame().set_index("selector")
    assert "confidence" not in sel.index and "fusion" not in sel.index  # no distribution over free text

    recall = OracleReport.from_tables(path, answer_settings=AnswerSettings(open_correct="recall"))
    pq = recall.per_query().set_index("query_id")
    assert pq["oracle_correct"].tolist() == [True, True, True]  # q2 rank 2 holds every gold token
    assert pq["first_correct_rank"].tolist() == [1, 2, 1]
    assert pq["n_distinct"].tolist() == [2, 2, 1]  # consistency stays on normalised answers
    f1 = OracleReport.from_tables(path, answer_settings=AnswerSettings(open_correct="f1", open_threshold=0.75))
    assert f1.per_query()["first_correct_rank"].tolist() == [1, 2, 1]  # F1 0.8 >= 0.75 > 2/3
    assert f1.selectors_frame().set_index("selector").loc["oracle", "acc"] == 1.0


def test_mixed_closed_and_open_table(tmp_path, capsys):
    rows = [
        dict(system="rag", query_id="q1", rank=1, label="yes", prediction="no", answer_type="closed",
             retrieval_score=1.0, probs={"yes": 0.4, "no": 0.6}),
        dict(system="rag", query_id="q1", rank=2, label="yes", prediction="Yes", answer_type="closed",
             retrieval_score=0.0, probs={"yes": 0.9, "no": 0.1}),
        dict(system="rag", query_id="q2", rank=1, label="Left lung", prediction="right lung", answer_type="open",
             retrieval_score=1.0, probs=None),
        dict(system="rag", query_id="q2", rank=2, label="Left lung", prediction="the left lung",
             answer_type="open", retrieval_score=0.0, probs=None),
    ]
    ctx = write_table(pd.DataFrame(rows), tmp_path / "ctx.jsonl")
    answers = write_table(pd.DataFrame([
        dict(system="closed-book", query_id="q1", prediction="YES", label="yes", answer_type="closed"),
        dict(system="closed-book", query_id="q2", prediction="Left lung.", label="Left lung", answer_type="open")]),
        tmp_path / "answers.jsonl")
    report = OracleReport.from_tables(ctx, answers=answers)
    pq = report.per_query().set_index("query_id")
    assert pq["answer_type"].tolist() == ["closed", "open"]
    assert pq["top1_correct"].tolist() == [False, False] and pq["oracle_correct"].tolist() == [True, True]
    assert np.isnan(pq.loc["q1", "top1_token_f1"]) and pq.loc["q2", "top1_token_f1"] == 0.5
    s = report.summary().iloc[0]
    assert (s["n_closed"], s["n_open"]) == (1, 1) and s["top1_token_f1"] == 0.5
    sel = report.selectors_frame().set_index("selector")
    # confidence: q1 -> rank 2 (0.9), right; q2 open -> falls back to rank 1, wrong.
    assert sel.loc["confidence", "acc"] == 0.5 and sel.loc["confidence", "n_fallback"] == 1
    # fusion on q1: w = softmax(1, 0) = (0.731, 0.269); yes = 0.731*0.4 + 0.269*0.9 = 0.535 > no; q2 votes with the
    # same weights: "right lung" 0.731 > "left lung" 0.269, wrong (no fallback: open answers are fused too)
    assert sel.loc["fusion", "acc"] == 0.5 and sel.loc["fusion", "n_fallback"] == 0
    sub = report.subsets().set_index(["system", "subset"])
    assert sub.loc[("closed-book", "all"), "acc"] == 1.0  # "Left lung." EM-equals "Left lung" as open answers
    out = tmp_path / "out"
    assert main(["--contexts", str(ctx), "--answers", str(answers), "--out", str(out)]) == 0
    for name in ALL_FILES:
        assert (out / name).exists(), name
    assert "top1_token_f1" in pd.read_csv(out / "per_query.csv").columns
    assert "## Open (free-text) queries" in (out / "summary.md").read_text()


def test_system_metrics_by_answer_type():
    frame = pd.DataFrame([
        dict(system="s", prediction="b, a", label="a, b", answer_type="set"),
        dict(system="s", prediction="a", label="none", answer_type="set"),
        dict(system="s", prediction="a, c", label="c", answer_type="set"),
        dict(system="v", prediction="The left lung.", label="left lung", answer_type="open"),
        dict(system="v", prediction="effusion", label="pleural effusion", answer_type="open"),
        dict(system="v", prediction="Yes", label="yes", answer_type="closed"),
    ])
    m = system_metrics(frame)
    assert m["s"]["accuracy"] == pytest.approx(1 / 3)
    assert m["s"]["macro_f1"] == pytest.approx(2.5 / 3) and m["s"]["micro_f1"] == pytest.approx(0.75)  # as above
    assert m["v"]["accuracy"] == pytest.approx(2 / 3) and m["v"]["token_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["v"]["macro_f1"] == 1.0  # over the closed rows
    rows = score_rows(["b, a"], ["a, b"], ["set"])
    assert rows["correct"].tolist() == [True] and rows["prediction_norm"].tolist() == ["a, b"]
    assert membership([("a",), ("b", "x")], ["a", "b"]).tolist() == [[True, False], [False, True]]


# -------------------------------------------------------------------------------------------------- bad input


def _rows(**change_second) -> list[dict]:
    rows = [dict(system="rag", query_id="q1", rank=1, label="a", prediction="a", answer_type="set"),
            dict(system="rag", query_id="q1", rank=2, label="a", prediction="b", answer_type="set"),
            dict(system="rag", query_id="q2", rank=1, label="c", prediction="c", answer_type="set"),
            dict(system="rag", query_id="q2", rank=2, label="c", prediction="c", answer_type="set")]
    rows[1].update(change_second)
    return rows


def _fails(tmp_path: Path, rows: list[dict], capsys, *extra: str, suffix: str = ".jsonl") -> str:
    path = tmp_path / f"ctx{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        write_table(pd.DataFrame(rows), path)
    out = tmp_path / "out"
    assert main(["--contexts", str(path), "--out", str(out), "--no-figures", *extra]) == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_answer_type_differs_within_a_query(tmp_path, capsys, suffix):
    err = _fails(tmp_path, _rows(answer_type="open"), capsys, suffix=suffix)
    assert f"ctx{suffix}:{3 if suffix == '.csv' else 2}:" in err and "'answer_type'" in err
    assert "one answer type" in err and f":{2 if suffix == '.csv' else 1}" in err


def test_answer_type_differs_across_systems(tmp_path, capsys):
    rows = _rows() + [dict(system="joint", query_id="q1", rank=1, label="a", prediction="a", answer_type="closed"),
                      dict(system="joint", query_id="q1", rank=2, label="a", prediction="a", answer_type="closed")]
    err = _fails(tmp_path, rows, capsys)
    assert "ctx.jsonl:1:" in err and "ctx.jsonl:5" in err and "'answer_type'" in err and "every system" in err


def test_unknown_answer_type(tmp_path, capsys):
    err = _fails(tmp_path, _rows(answer_type="multi"), capsys)
    assert "ctx.jsonl:2:" in err and "'answer_type'" in err and "'multi'" in err and "closed, set, open" in err


def test_answer_type_missing_on_some_rows_reads_as_closed(tmp_path, capsys):
    rows = _rows()
    del rows[1]["answer_type"]  # closed, while rank 1 of the same query is set
    err = _fails(tmp_path, rows, capsys)
    assert "ctx.jsonl:2:" in err and "'answer_type'" in err and "'closed' differs from 'set'" in err
    rows = [dict(r, answer_type=None if r["query_id"] == "q2" else "set") for r in _rows()]
    report = OracleReport.from_tables(write_table(pd.DataFrame(rows), tmp_path / "ok.csv"))
    assert report.per_query()["answer_type"].tolist() == ["set", "closed"]  # an empty CSV cell: closed


def test_task_contradicts_the_column(tmp_path, capsys):
    err = _fails(tmp_path, _rows(), capsys, "--task", "open")
    assert "ctx.jsonl:1:" in err and "'answer_type'" in err and "--task open" in err


def test_bad_settings(tmp_path, capsys):
    err = _fails(tmp_path, _rows(), capsys, "--open-threshold", "1.5")
    assert "--open-threshold" in err
    with pytest.raises(TableError, match="--empty-set"):
        OracleReport.from_tables(_set_table(tmp_path / "x.jsonl", column=True),
                                 answer_settings=AnswerSettings(empty_set="a,b"))


def test_answer_table_type_differs_from_contexts(tmp_path, capsys):
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    answers = tmp_path / "answers.csv"
    answers.write_text("system,query_id,prediction,label,answer_type\ncb,q1,a,a,set\ncb,q2,c,c,open\n")
    out = tmp_path / "out"
    assert main(["--contexts", str(ctx), "--answers", str(answers), "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert f"{answers}:3:" in err and "'answer_type'" in err and not out.exists()


def _head_signal(n: int, seed: int, prefix: str) -> pd.DataFrame:
    """k=4 contexts alternating image / text; text contexts are right 80% of the time, image ones 25%; even queries
    are open (no probs), odd ones closed (probs on every context)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label, is_open = "abc"[rng.integers(3)], i % 2 == 0
        for rank in range(1, 5):
            pred = label if rng.random() < (0.25, 0.8)[(rank - 1) % 2] else rng.choice([a for a in "abc" if a != label])
            rows.append(dict(system="rag", query_id=f"{prefix}{i}", rank=rank, label=label, prediction=pred,
                             head=("image", "text")[(rank - 1) % 2], retrieval_score=1.0 - 0.1 * rank,
                             answer_type="open" if is_open else "closed",
                             probs=None if is_open else {pred: 0.7, **{a: 0.15 for a in "abc" if a != pred}}))
    return pd.DataFrame(rows)


def test_learned_selector_on_a_mixed_table(tmp_path):
    pytest.importorskip("sklearn")
    val = write_table(_head_signal(300, 1, "v"), tmp_path / "val.parquet")
    test = write_table(_head_signal(300, 2, "t"), tmp_path / "test.parquet")
    report = OracleReport.from_tables(test, selector_train=val)
    sel = report.selectors_frame().set_index("selector")
    assert sel.loc["learned", "acc"] > sel.loc["retriever", "acc"] + 0.2  # it learns to pick the text contexts
    assert "max_prob" in report.learned.dropped["rag"]  # missing on the open queries' contexts
    assert report.summary().loc[0, "n_open"] == 150
    # confidence needs a distribution (rank 1 on open queries); fusion votes over the open answers
    assert sel.loc["confidence", "n_fallback"] == 150 and sel.loc["fusion", "n_fallback"] == 0
