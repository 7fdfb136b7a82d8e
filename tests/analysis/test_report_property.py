"""Property tests: the vectorised path equals a plain-Python reference implementation of docs/design.md's definitions
on random tables (any row order, missing ranks, case/space variants, several systems, probs and scores)."""

from __future__ import annotations

import math
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dxrag.analysis import OracleReport
from dxrag.analysis.tables import TableError, write_table

VARIANTS = {"a": ["a", "A", " a"], "b": ["b", "B "], "c": ["c"], "yes": ["yes", "Yes"]}


@st.composite
def tables(draw):
    answers = sorted(VARIANTS)
    n_sys = draw(st.integers(1, 3))
    n_q = draw(st.integers(1, 6))
    labels = {f"q{q}": draw(st.sampled_from(answers)) for q in range(n_q)}
    rows = []
    for s in range(n_sys):
        for q, label in labels.items():
            if s > 0 and draw(st.booleans()) and draw(st.booleans()):
                continue  # not every system answers every query
            ranks = draw(st.sets(st.integers(1, 5), min_size=1, max_size=5))
            for rank in ranks:
                pred = draw(st.sampled_from(answers))
                weights = [draw(st.integers(0, 4)) for _ in answers]
                weights[answers.index(pred)] += 1
                probs = {a: w / sum(weights) for a, w in zip(answers, weights) if w}
                rows.append(dict(system=f"s{s}", query_id=q, rank=rank,
                                 label=draw(st.sampled_from(VARIANTS[label])),
                                 prediction=draw(st.sampled_from(VARIANTS[pred])),
                                 retrieval_score=float(draw(st.integers(-3, 3))), probs=probs))
    order = draw(st.permutations(range(len(rows))))
    k = draw(st.one_of(st.none(), st.integers(1, 5)))
    return [rows[i] for i in order], k


def norm(x: str) -> str:
    return x.strip().casefold()


def reference(rows: list[dict], k: int | None) -> dict:
    """Straight from the definitions, one query at a time."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["system"], r["query_id"])][r["rank"]] = r
    max_rank = defaultdict(int)
    for (s, _), ranks in by.items():
        max_rank[s] = max(max_rank[s], max(ranks))
    out = {}
    for (s, q), ranks in by.items():
        depth = k if k is not None else max_rank[s]
        kept = [ranks[r] for r in sorted(ranks) if r <= depth]
        if not kept:
            continue  # nothing within 1..k: left out, even with --short keep
        preds = [norm(r["prediction"]) for r in kept]
        gold = norm(next(iter(ranks.values()))["label"])
        counts = Counter(preds)
        majority = next((p for p in preds if counts[p] == max(counts.values())), None)
        first = next((i + 1 for i, r in enumerate(kept) if norm(r["prediction"]) == gold), None)
        confident = max(range(len(kept)), key=lambda i: (max(kept[i]["probs"].values()), -i))
        w = [math.exp(r["retrieval_score"]) for r in kept]
        total = defaultdict(float)
        for wi, r in zip(w, kept):
            for a, p in r["probs"].items():
                total[norm(a)] += wi / sum(w) * p
        best = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
        fused = best[0][0]
        tie = len(best) > 1 and best[0][1] - best[1][1] < 1e-9
        out[(s, q)] = dict(
            n_distinct=len(counts), consistent=len(counts) == 1, top1_correct=preds[0] == gold,
            majority_correct=majority == gold, oracle_correct=first is not None,
            first_correct_rank=[r["rank"] for r in kept][first - 1] if first else 0,
            confidence_correct=preds[confident] == gold,
            fusion_correct=fused == gold, fusion_tie=tie)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.sampled_from([".jsonl", ".parquet", ".csv", "row groups"]))
def test_fast_path_equals_reference(table, suffix):
    rows, k = table
    expect = reference(rows, k)
    with tempfile.TemporaryDirectory() as tmp:
        if suffix == "row groups":  # several Parquet row groups: per-chunk dictionaries that differ
            path = Path(tmp) / "ctx.parquet"
            write_table(pd.DataFrame(rows), path)
            pq.write_table(pq.read_table(path), path, row_group_size=3)
        else:
            path = Path(tmp) / f"ctx{suffix}"
            write_table(pd.DataFrame(rows), path)
        if {r["system"] for r in rows} != {s for s, _ in expect}:  # a system with no rank within 1..k at all
            with pytest.raises(TableError, match="nothing is left"):
                OracleReport.from_tables(path, k=k, short="keep")
            return
        report = OracleReport.from_tables(path, k=k, short="keep")
        per_query = report.per_query()
        selectors = report.selectors
    assert len(per_query) == len(expect)
    for r in per_query.itertuples():
        e = expect[(r.system, r.query_id)]
        got = dict(n_distinct=r.n_distinct, consistent=r.consistent, top1_correct=r.top1_correct,
                   majority_correct=r.majority_correct, oracle_correct=r.oracle_correct,
                   first_correct_rank=r.first_correct_rank)
        assert got == {key: e[key] for key in got}, (r.system, r.query_id)
    for qm in report.metrics:
        by_name = {s.name: s.correct for s in selectors[qm.system]}
        ids = report.contexts.query_ids[qm.matrix.query]
        for i, q in enumerate(ids):
            e = expect[(qm.system, q)]
            assert by_name["confidence"][i] == e["confidence_correct"], (qm.system, q)
            if not e["fusion_tie"]:
                assert by_name["fusion"][i] == e["fusion_correct"], (qm.system, q)
    summary = report.summary().set_index("system")
    for s in summary.index:
        mine = [v for (sys_, _), v in expect.items() if sys_ == s]
        assert summary.loc[s, "top1_acc"] == np.mean([v["top1_correct"] for v in mine])
        assert summary.loc[s, "inconsistent_rate"] == np.mean([not v["consistent"] for v in mine])
