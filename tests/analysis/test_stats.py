"""The statistics the pipeline, report and sweep share: system_metrics, paired (exact McNemar on shared queries),
and the one fusion rule: the per-query fuse/fused_answer and the vectorised fusion selector agree, ties included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dxrag.analysis import OracleReport, write_table
from dxrag.core.base.fusion import fuse, fused_answer
from dxrag.analysis.stats import mcnemar_p, paired, system_metrics, wilson

ANSWERS = pd.DataFrame([
    # closed-book answers one class; joint and rag differ on q2, q3, q4
    *(dict(system="closed-book", query_id=q, prediction="No", label=y) for q, y in
      (("q1", "Yes"), ("q2", "no"), ("q3", "Yes"), ("q4", "No"))),
    *(dict(system="joint", query_id=q, prediction=p, label=y) for q, p, y in
      (("q1", "yes", "Yes"), ("q2", "No", "no"), ("q3", " YES", "Yes"), ("q4", "Yes", "No"))),
    *(dict(system="rag", query_id=q, prediction=p, label=y) for q, p, y in
      (("q1", "Yes", "Yes"), ("q2", "Yes", "no"), ("q3", "No", "Yes"), ("q5", "No", "No"))),
])


def test_system_metrics():
    m = system_metrics(ANSWERS, labels=["Yes", "No"])
    assert list(m) == ["closed-book", "joint", "rag"]
    cb = m["closed-book"]
    assert (cb["n"], cb["accuracy"]) == (4, 0.5)
    assert (cb["accuracy_lo"], cb["accuracy_hi"]) == wilson(2, 4)
    # closed-book: F1(yes) = 0 (never predicted), F1(no) = 2*2/(4+2) = 2/3 -> macro 1/3
    assert cb["macro_f1"] == pytest.approx(1 / 3)
    # joint: yes tp 2, pred 3, gold 2 -> 0.8; no tp 1, pred 1, gold 2 -> 2/3
    assert m["joint"]["accuracy"] == 0.75 and m["joint"]["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert system_metrics(ANSWERS)["rag"] == m["rag"]  # default classes: the gold labels seen


def test_paired_on_shared_queries():
    t = paired(ANSWERS, "joint", "rag")  # shared q1..q3: q2 and q3 only joint right
    assert (t.n, t.only_a, t.only_b) == (3, 2, 0)
    assert t.p_value == pytest.approx(0.5) == mcnemar_p(2, 0)
    assert paired(ANSWERS, "rag", "joint").only_b == 2
    assert mcnemar_p(0, 0) == 1.0


def _table(rng: np.random.Generator, n_queries: int) -> tuple[pd.DataFrame, list]:
    """Queries over 3 answers whose candidates come in random order; many exact and near (float-rounding) ties."""
    rows, per_query = [], []
    for q in range(n_queries):
        cands = list(rng.permutation(["Yes", "no", "Maybe"]))
        k = int(rng.integers(1, 5))
        kind = q % 3
        if kind == 0:  # exact tie: contexts that are permutations of each other, equal scores
            base = rng.dirichlet(np.ones(3))
            probs = np.stack([np.roll(base, j) for j in range(3)])[: max(k, 3)]
            scores = np.zeros(len(probs))
        elif kind == 1:  # ties at the maximum up to rounding: 0.35 + 0.1 = 0.44999999999999996 against 0.45
            probs = np.array([[0.35 + 0.1, 0.45, 0.1], [0.45, 0.1 + 0.35, 0.1], [0.45, 0.45, 0.1],
                              [0.1 + 0.35, 0.45, 0.1]])[:k]
            scores = np.zeros(k)
        else:
            probs = rng.dirichlet(np.ones(3), size=k)
            scores = rng.normal(size=k)
        label = cands[int(rng.integers(3))]
        for r, (p, s) in enumerate(zip(probs, scores), 1):
            rows.append(dict(system="rag", query_id=f"q{q}", rank=r, label=label, prediction=cands[int(p.argmax())],
                             retrieval_score=float(s), probs=dict(zip(cands, map(float, p)))))
        per_query.append((f"q{q}", cands, label, probs, scores))
    return pd.DataFrame(rows), per_query


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_fusion_selector_agrees_with_per_query_rule(tmp_path, temperature):
    df, per_query = _table(np.random.default_rng(0), 300)
    report = OracleReport.from_tables(write_table(df, tmp_path / "ctx.jsonl"), k=max(df["rank"]), short="keep",
                                      fusion_temperature=temperature)
    qm = report.metrics[0]
    vectorised = dict(zip(report.contexts.query_ids[qm.matrix.query],
                          next(s for s in report.selectors["rag"] if s.name == "fusion").correct))
    n_ties = 0
    for qid, cands, label, probs, scores in per_query:
        fused = fuse(probs, scores, temperature)
        n_ties += int(np.sum(np.isclose(fused, fused.max(), rtol=0, atol=1e-12)) > 1)
        assert vectorised[qid] == (cands[fused_answer(fused, cands)] == label), qid
    assert n_ties >= 150  # the test exercises the tie rule, not only clear winners


def test_fused_answer_tie_rule():
    # equal weights, one context for each answer: a tie, won by the alphabetically first normalised answer
    fused = fuse(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.3, 0.3]))
    assert fused.tolist() == [0.5, 0.5]
    assert fused_answer(fused, ["Yes", "No"]) == 1 and fused_answer(fused, ["no", "yes"]) == 0
    assert fused_answer(np.array([0.1 + 0.2, 0.3, 0.3 - 1e-9]), [" B", "a", "c"]) == 1  # c: 1e-9 below, not tied
    assert fused_answer(np.array([0.2, 0.5, 0.3]), ["a", "b", "c"]) == 1
