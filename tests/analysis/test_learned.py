"""The learned selector: it beats rank 1 when a feature truly predicts correctness, learns only from the validation
table (a reversed relation there must hurt), refuses shared queries, and drops features a table cannot give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from dxrag.analysis import OracleReport, TableError, write_table  # noqa: E402
from dxrag.analysis.cli import main  # noqa: E402

ANSWERS = ("a", "b", "c")


def generate(n: int, seed: int, prefix: str, k: int = 4, reverse: bool = False, probs: bool = True,
             p_correct: tuple[float, ...] = (0.6, 0.5, 0.45, 0.4),
             signal: str = "confidence") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Context and answer tables where a context's reader confidence tells whether it is correct (max-prob ~0.9 when
    correct, ~0.55 when wrong; `reverse` swaps that). Scores fall with rank; heads alternate image / text.
    signal="head": text contexts are right 80% of the time, image ones 25%, and confidence is noise."""
    rng = np.random.default_rng(seed)
    rows, answers = [], []
    for i in range(n):
        qid, label = f"{prefix}{i:05d}", ANSWERS[rng.integers(3)]
        for rank in range(1, k + 1):
            p = p_correct[rank - 1] if signal == "confidence" else (0.25, 0.8)[(rank - 1) % 2]
            correct = rng.random() < p
            pred = label if correct else rng.choice([a for a in ANSWERS if a != label])
            informative = signal == "confidence" and correct != reverse
            top = rng.uniform(0.8, 0.98) if informative or (signal == "head" and rng.random() < 0.5) \
                else rng.uniform(0.4, 0.7)
            rest = [a for a in ANSWERS if a != pred]
            dist = {pred: top, rest[0]: (1 - top) / 2, rest[1]: (1 - top) / 2}
            rows.append(dict(system="rag", query_id=qid, rank=rank, label=label, prediction=pred,
                             item_id=f"c{rng.integers(1000)}", head=("image", "text")[(rank - 1) % 2],
                             retrieval_score=float(1 - 0.1 * rank + 0.01 * rng.random()),
                             probs=dist if probs else None))
        answers.append(dict(system="closed-book", query_id=qid, prediction=ANSWERS[rng.integers(3)], label=label))
    return pd.DataFrame(rows), pd.DataFrame(answers)


def _write(tmp_path: Path, name: str, frames: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[Path, Path]:
    ctx, ans = tmp_path / f"{name}_contexts.jsonl", tmp_path / f"{name}_answers.jsonl"
    write_table(frames[0], ctx)
    write_table(frames[1], ans)
    return ctx, ans


def _selectors(report: OracleReport) -> pd.Series:
    return report.selectors_frame().set_index("selector")["acc"]


def test_learned_beats_rank1_when_confidence_predicts_correctness(tmp_path):
    val = _write(tmp_path, "val", generate(400, 1, "v"))
    test = _write(tmp_path, "test", generate(400, 2, "t"))
    report = OracleReport.from_tables(test[0], answers=test[1], selector_train=val[0], selector_train_answers=val[1])
    acc = _selectors(report)
    assert acc["learned"] > acc["retriever"] + 0.2
    assert acc["learned"] <= acc["oracle"]
    row = report.selectors_frame().set_index("selector").loc["learned"]
    assert row["acc_lo"] < row["acc"] < row["acc_hi"] and 0.5 < row["gap_closed"] <= 1
    used = report.learned.models["rag"].features
    assert set(used) == {"rank", "head_text", "retrieval_score", "score_margin", "max_prob", "entropy",
                         "vote_share", "closed_book_agree"}
    assert report.learned.models["rag"].coefficients["max_prob"] > 0
    # the learned method is scored like the other context methods (subsets and McNemar)
    assert "learned" in set(report.subsets()["method"])


def test_learned_beats_every_other_selector_when_the_head_predicts_correctness(tmp_path):
    val = _write(tmp_path, "val", generate(300, 1, "v", signal="head"))
    test = _write(tmp_path, "test", generate(300, 2, "t", signal="head"))
    acc = _selectors(OracleReport.from_tables(test[0], selector_train=val[0]))
    others = acc.drop(["learned", "learned-raw", "oracle"])
    assert acc["learned"] > others.max() + 0.1, acc.to_dict()
    assert acc["learned"] == acc["learned-raw"]  # the cross-validation chose the model


def test_learned_learns_only_from_the_validation_table(tmp_path):
    """In the validation table confidence means *wrong*: a selector fitted there must pick badly on the test table
    (a selector that had seen the test rows would pick well)."""
    val = _write(tmp_path, "val", generate(400, 1, "v", reverse=True))
    test = _write(tmp_path, "test", generate(400, 2, "t"))
    acc = _selectors(OracleReport.from_tables(test[0], selector_train=val[0]))
    assert acc["learned"] < acc["retriever"] - 0.1


def test_learned_falls_back_to_rank1_when_validation_says_so(tmp_path, capsys):
    """Rank 1 is right 90% of the time and no feature tells a wrong rank 1 from a right one: on held-out
    validation queries the model does not beat rank 1, so `learned` is rank 1 (every query a fallback) and says so;
    `learned-raw` still reports the model's own picks."""
    frames = {}
    for name, seed in (("val", 1), ("test", 2)):
        frames[name] = generate(300, seed, name[0], probs=False, p_correct=(0.9, 0.15, 0.15, 0.15))
    val, test = _write(tmp_path, "val", frames["val"]), _write(tmp_path, "test", frames["test"])
    out = tmp_path / "report"
    assert main(["--contexts", str(test[0]), "--train-selector", str(val[0]), "--out", str(out),
                 "--no-figures"]) == 0
    sel = pd.read_csv(out / "selectors.csv").set_index("selector")
    assert sel.loc["learned", "acc"] == sel.loc["retriever", "acc"] and sel.loc["learned", "gap_closed"] == 0
    assert sel.loc["learned", "n_fallback"] == 300 and sel.loc["learned-raw", "n_fallback"] == 0
    summary = json.loads((out / "learned_selector.json").read_text())["systems"]["rag"]
    assert summary["selects"] == "rank 1" and summary["cv"]["model_acc"] <= summary["cv"]["top1_acc"]
    assert summary["cv"]["folds"] == 5 and summary["cv"]["n_queries"] == 300
    assert "`rag`: rank 1 selects" in (out / "summary.md").read_text()


def test_cross_validation_holds_each_query_out_once():
    from dxrag.analysis.learned import _require_sklearn, context_features, cross_validate
    from dxrag.analysis.consistency import query_metrics
    from dxrag.analysis.tables import load_contexts, rank_matrices

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctx, _ = _write(Path(tmp), "val", generate(50, 3, "v"))
        table = load_contexts(ctx, columns=("retrieval_score", "probs", "head"))
        qm = query_metrics(rank_matrices(table)[0])
        feats = context_features(table, qm, None)
        names = sorted(feats.values)
        calls = []

        class Spy:
            def __init__(self):
                self.model = _require_sklearn()

            def fit(self, x, y):
                calls.append(len(x))
                return self.model.fit(x, y)

            def predict_proba(self, x):
                return self.model.predict_proba(x)

        cv = cross_validate(Spy, feats, names, qm)
    assert cv["folds"] == 5 and len(calls) == 5 and sum(calls) == 4 * 50 * 4  # each row trains 4 of the 5 folds
    assert cv["top1_acc"] == qm.top1_correct.mean() and cv["model_acc"] > cv["top1_acc"]


def test_training_on_test_queries_is_refused(tmp_path):
    test = _write(tmp_path, "test", generate(50, 2, "t"))
    overlap = _write(tmp_path, "overlap", generate(50, 3, "t"))  # same query ids t00000...
    with pytest.raises(TableError, match="also analysed"):
        OracleReport.from_tables(test[0], selector_train=overlap[0])
    assert main(["--contexts", str(test[0]), "--train-selector", str(overlap[0]), "--out",
                 str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_missing_columns_drop_features_and_say_so(tmp_path, caplog):
    val_ctx, _ = generate(200, 1, "v", probs=False)
    test_ctx, _ = generate(200, 2, "t")
    write_table(val_ctx.drop(columns=["head"]), tmp_path / "val.csv")
    write_table(test_ctx, tmp_path / "test.parquet")
    report = OracleReport.from_tables(tmp_path / "test.parquet", selector_train=tmp_path / "val.csv")
    model = report.learned.models["rag"]
    assert set(model.features) == {"rank", "retrieval_score", "score_margin", "vote_share"}
    dropped = report.learned.dropped["rag"]
    assert set(dropped) == {"head_text", "max_prob", "entropy", "closed_book_agree"}
    assert "val.csv" in dropped["max_prob"] and "left out" in caplog.text
    md = report.to_markdown()
    assert "`max_prob`" in md and "learned_selector.json" in md


def test_cli_writes_learned_row_and_model_summary(tmp_path):
    val = _write(tmp_path, "val", generate(200, 1, "v"))
    test = _write(tmp_path, "test", generate(200, 2, "t"))
    out = tmp_path / "out"
    assert main(["--contexts", str(test[0]), "--answers", str(test[1]), "--train-selector", str(val[0]),
                 "--train-answers", str(val[1]), "--no-figures", "--out", str(out)]) == 0
    sel = pd.read_csv(out / "selectors.csv")
    learned = sel[sel["selector"] == "learned"].iloc[0]
    assert learned["n"] == 200 and learned["acc_lo"] <= learned["acc"] <= learned["acc_hi"]
    summary = json.loads((out / "learned_selector.json").read_text())
    assert summary["systems"]["rag"]["train_queries"] == 200
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["inputs"]) >= {"contexts", "answers", "selector_train", "selector_train_answers"}


def test_depth_mismatch_between_tables_is_an_error(tmp_path):
    val = _write(tmp_path, "val", generate(50, 1, "v", k=3, p_correct=(0.6, 0.5, 0.4)))
    test = _write(tmp_path, "test", generate(50, 2, "t"))
    with pytest.raises(TableError, match="depth k=3"):
        OracleReport.from_tables(test[0], selector_train=val[0])


def test_without_scikit_learn_the_error_names_the_extra(tmp_path, monkeypatch):
    val = _write(tmp_path, "val", generate(20, 1, "v"))
    test = _write(tmp_path, "test", generate(20, 2, "t"))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(TableError, match=r"dxrag\[learn\]"):
        OracleReport.from_tables(test[0], selector_train=val[0])
    assert OracleReport.from_tables(test[0]).selectors_frame()["selector"].tolist()[-1] == "oracle"


def test_importing_the_analysis_loads_no_scikit_learn():
    done = subprocess.run([sys.executable, "-c", "import sys, dxrag.analysis, dxrag.analysis.cli; "
                           "print('sklearn' in sys.modules)"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
