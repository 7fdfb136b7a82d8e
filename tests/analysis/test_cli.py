"""analyze-oracle on the hand-made fixture (conftest.py): every number below is worked out by hand in comments.

Run in all three formats (JSONL, CSV, Parquet) through the real command.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from dxrag.analysis import OracleReport
from dxrag.analysis.cli import main
from dxrag.analysis.stats import mcnemar, wilson


def _row(df: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(df), dtype=bool)
    for col, value in where.items():
        mask &= (df[col] == value).to_numpy()
    assert mask.sum() == 1, where
    return df[mask].iloc[0]


def test_cli_reproduces_hand_computed_numbers(fixture_files, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--contexts", str(fixture_files["contexts"]), "--answers", str(fixture_files["answers"]),
                 "--rerank", str(fixture_files["rerank"]), "--out", str(out), "--no-figures"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rag" in printed and "lvlm:test" in printed

    per_query = pd.read_csv(out / "per_query.csv", dtype={"query_id": str})
    # rag:   q1 AAA -> 1 distinct; q2 ABB -> 2; q3 BCA -> 3; q4 AAB -> 2
    # joint: q1 ABA -> 2; q2 BBB -> 1; q3 CAA -> 2; q4 CCC -> 1
    expect = {  # (n_distinct, top1, majority, oracle, first_correct_rank, majority_prediction)
        ("rag", "q1"): (1, True, True, True, 1, "a"),
        ("rag", "q2"): (2, False, True, True, 2, "b"),  # majority B (2 of 3)
        ("rag", "q3"): (3, False, False, True, 3, "b"),  # three-way tie -> the answer at the best rank, B
        ("rag", "q4"): (2, False, False, False, 0, "a"),
        ("joint", "q1"): (2, True, True, True, 1, "a"),
        ("joint", "q2"): (1, True, True, True, 1, "b"),
        ("joint", "q3"): (2, False, True, True, 2, "a"),
        ("joint", "q4"): (1, True, True, True, 1, "c"),
    }
    assert len(per_query) == 8
    for (system, q), (nd, top1, maj, orc, first, maj_pred) in expect.items():
        r = _row(per_query, system=system, query_id=q)
        assert (r.n_distinct, r.top1_correct, r.majority_correct, r.oracle_correct, r.first_correct_rank,
                r.majority_prediction) == (nd, top1, maj, orc, first, maj_pred), (system, q)
        assert r.consistent == (nd == 1)

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["system"]) == ["rag", "joint"]  # order of first appearance
    rag, joint = _row(summary, system="rag"), _row(summary, system="joint")
    assert (rag.n_queries, rag.k, rag.n_short) == (4, 3, 0)
    assert rag.inconsistent_rate == pytest.approx(3 / 4) and joint.inconsistent_rate == pytest.approx(2 / 4)
    assert (rag.top1_acc, rag.majority_acc, rag.oracle_acc) == pytest.approx((1 / 4, 2 / 4, 3 / 4))
    assert (joint.top1_acc, joint.majority_acc, joint.oracle_acc) == pytest.approx((3 / 4, 1.0, 1.0))
    # Wilson 95% for 1 of 4: centre (0.25 + 1.96²/8) / (1 + 1.96²/4) = 0.3726, half-width 0.3270
    assert (rag.top1_acc_lo, rag.top1_acc_hi) == pytest.approx((0.0456, 0.6994), abs=1e-4)

    oracle = pd.read_csv(out / "oracle_at_k.csv")
    rag_curve = oracle[oracle["system"] == "rag"].sort_values("k")
    assert list(rag_curve["k"]) == [1, 2, 3]
    assert list(rag_curve["oracle_acc"]) == pytest.approx([1 / 4, 2 / 4, 3 / 4])  # first correct ranks 1, 2, 3, none
    assert list(oracle[oracle["system"] == "joint"]["oracle_acc"]) == pytest.approx([3 / 4, 1.0, 1.0])
    assert set(rag_curve["top1_acc"]) == {0.25}

    subsets = pd.read_csv(out / "subsets.csv")
    # reference rag: consistent = {q1}, inconsistent = {q2, q3, q4}
    cases = {
        ("rag", "top1"): (1.0, 0 / 3, 1 / 4),
        ("rag", "majority"): (1.0, 1 / 3, 2 / 4),
        ("rag", "fusion"): (1.0, 2 / 3, 3 / 4),
        ("joint", "top1"): (1.0, 2 / 3, 3 / 4),  # q2 right, q3 wrong, q4 right
        ("joint", "majority"): (1.0, 3 / 3, 4 / 4),
        ("closed", "answer"): (1.0, 1 / 3, 2 / 4),  # closed: q1 A ok, q2 A wrong, q3 a ok, q4 B wrong
    }
    for (system, method), accs in cases.items():
        for subset, acc, n in zip(("consistent", "inconsistent", "all"), accs, (1, 3, 4)):
            r = _row(subsets, system=system, method=method, subset=subset)
            assert (r.n, r.acc, r.reference) == (n, pytest.approx(acc), "rag"), (system, method, subset)
    assert not ((subsets["system"] == "joint") & (subsets["method"] == "fusion")).any()  # joint has no probs

    sel = pd.read_csv(out / "selectors.csv")
    # rag: top1 1/4, oracle 3/4, gap 1/2.
    # confidence: max-prob context: q1 r1 A ok; q2 r2 (0.9) B ok; q3 r1 (0.9) B wrong; q4 r1 (0.6) A wrong -> 2/4
    # fusion: q1 A ok; q2 equal weights B 2.0/3 > A ok; q3 B 1.4/3 > A 1.0/3 wrong;
    #         q4 scores (0, 0, 10): C = 0.5 w3 + 0.85 w1 > B = 0.5 w3 -> C ok (no single context says C) -> 3/4
    # lvlm:test: q1 rank 2 (a) ok; q2 rank 3 ( B) ok; q3 error -> rank 1 wrong; q4 missing -> rank 1 wrong -> 2/4
    expect_sel = {"retriever": (1 / 4, 0.0, 0), "confidence": (2 / 4, 0.5, 0), "majority": (2 / 4, 0.5, 0),
                  "fusion": (3 / 4, 1.0, 0), "lvlm:test": (2 / 4, 0.5, 2), "oracle": (3 / 4, 1.0, 0)}
    rag_sel = sel[sel["system"] == "rag"]
    assert list(rag_sel["selector"]) == ["retriever", "confidence", "majority", "fusion", "lvlm:test", "oracle"]
    for name, (acc, gap, fallbacks) in expect_sel.items():
        r = _row(sel, system="rag", selector=name)
        assert (r.acc, r.gap_closed, r.n_fallback) == (pytest.approx(acc), pytest.approx(gap), fallbacks), name
    joint_sel = sel[sel["system"] == "joint"]
    assert list(joint_sel["selector"]) == ["retriever", "majority", "oracle"]
    assert math.isnan(_row(sel, system="joint", selector="majority").gap_closed) is False
    # joint: top1 3/4, oracle 1 -> majority closes (1 - 3/4) / (1 - 3/4) = 1
    assert _row(sel, system="joint", selector="majority").gap_closed == pytest.approx(1.0)

    mc = pd.read_csv(out / "mcnemar.csv")
    r = _row(mc, system_a="rag", method_a="top1", system_b="joint", method_b="top1")
    # rag top1 [1,0,0,0] vs joint top1 [1,1,0,1]: only joint right on q2, q4 -> two-sided binomial p = 2 * 0.5² = 0.5
    assert (r.n, r.only_a, r.only_b, r.p_value) == (4, 0, 2, pytest.approx(0.5))

    assert (out / "summary.md").read_text().startswith("# Oracle analysis")
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["inputs"]) == {"contexts", "answers", "rerank"}
    assert len(prov["inputs"]["contexts"]["sha256"]) == 64
    assert prov["arguments"]["reference"] == "rag" and "dxrag" in prov["versions"]


def test_reference_and_k_options(fixture_files):
    report = OracleReport.from_tables(fixture_files["contexts"], answers=fixture_files["answers"], k=2,
                                      reference="joint")
    s = report.summary().set_index("system")
    # depth 2: rag q1 AA, q2 AB, q3 BC, q4 AA -> top1 1/4, oracle 2/4 (q1, q2), inconsistent 2/4
    assert s.loc["rag", "k"] == 2 and s.loc["rag", "oracle_acc"] == pytest.approx(2 / 4)
    assert s.loc["rag", "inconsistent_rate"] == pytest.approx(2 / 4)
    assert (s.loc["rag", "inconsistent_rate_lo"], s.loc["rag", "inconsistent_rate_hi"]) == pytest.approx(wilson(2, 4))
    sub = report.subsets()
    closed = sub[(sub["system"] == "closed")].set_index("subset")
    # joint at depth 2: q1 AB incons., q2 BB cons., q3 CA incons., q4 CC cons. closed: q1 ok q2 no q3 ok q4 no
    assert closed.loc["consistent", "acc"] == pytest.approx(0.0) and closed.loc["inconsistent", "acc"] == 1.0


def test_exporters_and_figures(jsonl_files, tmp_path):
    fixture_files = jsonl_files
    report = OracleReport.from_tables(fixture_files["contexts"], answers=fixture_files["answers"],
                                      rerank=fixture_files["rerank"], interval="bootstrap", n_boot=200, seed=1)
    latex = report.to_latex()
    assert r"\begin{tabular}" in latex and "lvlm:test" in latex and r"\toprule" in latex
    md = report.to_markdown()
    assert "| system |" in md and "lvlm:test" in md
    imp = report.improvement("rag", "joint").set_index(["method", "subset"])
    # inconsistent queries of rag (q2, q3, q4): rag top-1 wrong on all, joint top-1 right on q2 and q4 -> +2/3
    assert imp.loc[("top1", "inconsistent"), "diff"] == pytest.approx(2 / 3)
    assert imp.loc[("top1", "inconsistent"), "n"] == 3 and imp.loc[("top1", "consistent"), "diff"] == 0.0
    assert imp.loc[("top1", "inconsistent"), "diff_lo"] <= 2 / 3 <= imp.loc[("top1", "inconsistent"), "diff_hi"]
    frames = report.frames()
    assert set(frames) == {"per_query", "summary", "oracle_at_k", "subsets", "selectors", "mcnemar"}
    s = frames["summary"].set_index("system")
    assert s.loc["rag", "top1_acc_lo"] <= 0.25 <= s.loc["rag", "top1_acc_hi"]
    again = OracleReport.from_tables(fixture_files["contexts"], interval="bootstrap", n_boot=200, seed=1)
    assert again.summary()["top1_acc_lo"].tolist() == s["top1_acc_lo"].tolist()  # seeded per cell
    out = report.write(tmp_path / "with_figures")
    names = {p.name for p in (out / "figures").iterdir()}
    for stem in ("n_distinct", "subset_accuracy", "oracle_at_k", "selector_gaps", "improvement_joint_vs_rag"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (out / "figures" / f"{stem}.png").stat().st_size > 5000
    # a second write replaces the files in place, leaves other files alone, and leaves no temporary directory
    (out / "notes.txt").write_text("mine")
    report.write(out, figures=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stats_against_textbook_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    t = mcnemar(np.array([1, 1, 1, 1, 1, 0], bool), np.array([0, 0, 0, 0, 0, 0], bool))
    assert (t.only_a, t.only_b, t.p_value) == (5, 0, pytest.approx(2 / 32))  # two-sided: 2 * 0.5**5


def test_bootstrap_intervals_agree_with_wilson_on_large_samples():
    from dxrag.analysis.stats import proportion_interval, subset_interval

    rng = np.random.default_rng(0)
    lo, hi = proportion_interval(300, 1000, "bootstrap", n_boot=4000, rng=rng)
    wlo, whi = wilson(300, 1000)
    assert abs(lo - wlo) < 0.006 and abs(hi - whi) < 0.006
    member = np.arange(2000) < 1000
    correct = np.arange(2000) < 300  # 300 of the 1000 members right; non-members never count
    slo, shi = subset_interval(correct, member, "bootstrap", n_boot=4000, rng=np.random.default_rng(1))
    assert abs(slo - wlo) < 0.008 and abs(shi - whi) < 0.008
    assert subset_interval(correct, member, "wilson") == (wlo, whi)
