"""OracleReport: every number of the oracle analysis for a set of tables, and its exporters.

DataFrames here; Markdown, LaTeX, a compact terminal table, and `write(out_dir)` (CSV files, summary.md,
provenance.json, figures) in `export` (`ReportExports`, which OracleReport inherits), all from the same computed
numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from . import stats
from ..core.base.answers import ANSWER_TYPES, OPEN, SET, AnswerSettings, set_members
from .consistency import QueryMetrics, query_metrics
# the exporters live in `export`; the names other modules import from here stay importable from here
from .export import (ANALYSIS_PACKAGES, CSV_FILES, RELEVANCE_LABELS, SUBSETS, ReportExports,  # noqa: F401
                     ReportWriteError)
from .learned import DEFAULT_CLOSED_BOOK, LearnedSelector, closed_book_answers, train_learned
from .oracle import oracle_at_k
from .relevance import relevance_metrics
from .selectors import SelectorResult, check_rerank_systems, gap_closed, run_selectors
from .tables import (ANSWER_TYPE, HEAD, PROBS, QUERY_ID, RETRIEVAL_SCORE, SHORT_POLICIES, SYSTEM, AnswerTable,
                     ContextTable, RerankTable, TableError, load_answers, load_contexts, load_rerank, rank_matrices)

log = logging.getLogger(__name__)


CONTEXT_METHODS = ("top1", "majority", "fusion")  # how a context system is scored on the subsets


@dataclass
class _Scored:
    """Per-query correctness of one (system, method) over global query codes."""

    system: str
    method: str  # "answer" for answer-table systems, else a context method
    query: np.ndarray
    correct: np.ndarray



@dataclass
class OracleReport(ReportExports):
    """The analysis of one context table (plus optional answer and rerank tables); build with `from_tables`."""

    contexts: ContextTable
    metrics: list[QueryMetrics]
    selectors: dict[str, list[SelectorResult]]
    scored: list[_Scored]
    reference: str
    interval: str
    n_boot: int
    seed: int
    answers: AnswerTable | None = None
    rerank: RerankTable | None = None
    learned: LearnedSelector | None = None
    selector_train: ContextTable | None = None
    selector_train_answers: AnswerTable | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    _frames: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _answer_cache: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_tables(cls, contexts: str | os.PathLike | ContextTable,
                    answers: str | os.PathLike | AnswerTable | None = None,
                    rerank: str | os.PathLike | RerankTable | None = None, k: int | None = None,
                    reference: str | None = None, short: str = "error", interval: str = "wilson",
                    n_boot: int = 1000, seed: int = 0, fusion_temperature: float = 1.0,
                    selector_train: str | os.PathLike | ContextTable | None = None,
                    selector_train_answers: str | os.PathLike | AnswerTable | None = None,
                    closed_book: str = DEFAULT_CLOSED_BOOK,
                    answer_settings: AnswerSettings | None = None) -> "OracleReport":
        """Loads (when given paths) and validates the tables, then computes every metric. Raises TableError.

        `fusion_temperature` divides the retrieval scores before the softmax of the fusion selector (use the
        pipeline's temperature to reproduce its fused answers). `selector_train`: a context table of *validation*
        queries (none of them in `contexts`) to train the `learned` selector on; `selector_train_answers` its answer
        table, whose `closed_book` system (and the one of `answers`) gives the closed-book agreement feature.
        `answer_settings`: answer types and how answers are judged (a ContextTable given as such keeps its own)."""
        if interval not in stats.INTERVALS:
            raise TableError(f"interval {interval!r}: expected one of {stats.INTERVALS}")
        if short not in SHORT_POLICIES:
            raise TableError(f"short policy {short!r}: expected one of {SHORT_POLICIES}")
        if not fusion_temperature > 0:
            raise TableError(f"--fusion-temperature {fusion_temperature}: expected a positive number")
        if n_boot < 1:
            raise TableError(f"--n-boot {n_boot}: expected a positive number of bootstrap resamples")
        if answer_settings is None:
            answer_settings = contexts.settings if isinstance(contexts, ContextTable) else AnswerSettings()
        problems = answer_settings.problems()
        if problems:
            raise TableError("; ".join(problems))
        columns = (RETRIEVAL_SCORE, PROBS) + ((HEAD,) if selector_train is not None else ())  # head: a feature
        ct = (contexts if isinstance(contexts, ContextTable)
              else load_contexts(contexts, columns=columns, settings=answer_settings))
        at = (answers if isinstance(answers, AnswerTable) or answers is None
              else load_answers(answers, settings=answer_settings))
        rt = rerank if isinstance(rerank, RerankTable) or rerank is None else load_rerank(rerank)
        reference = reference if reference is not None else ct.systems[0]
        if reference not in ct.systems:
            raise TableError(f"reference system {reference!r} is not in {ct.path} (systems: {ct.systems})")
        if rt is not None:
            check_rerank_systems(ct, rt)
        if at is not None:
            _check_answer_labels(ct, at)
        metrics = [query_metrics(m) for m in rank_matrices(ct, k=k, short=short)]
        learned = train_ct = train_at = None
        if selector_train is not None:
            train_ct = (selector_train if isinstance(selector_train, ContextTable)
                        else load_contexts(selector_train, columns=columns, settings=answer_settings))
            train_at = (selector_train_answers if isinstance(selector_train_answers, AnswerTable)
                        or selector_train_answers is None
                        else load_answers(selector_train_answers, settings=answer_settings))
            if train_at is not None:
                _check_answer_labels(train_ct, train_at)
            learned = train_learned(train_ct, ct, metrics, k=k, short=short,
                                    train_closed=closed_book_answers(train_at, closed_book),
                                    test_closed=closed_book_answers(at, closed_book))
        elif selector_train_answers is not None:
            raise TableError("selector_train_answers without selector_train: pass the validation context table too")
        selectors = {qm.system: run_selectors(ct, qm, rt, fusion_temperature, learned) for qm in metrics}
        scored = []
        for qm in metrics:
            by_name = {s.name: s for s in selectors[qm.system]}
            for method, sel in (("top1", "retriever"), ("majority", "majority"), ("fusion", "fusion"),
                                ("learned", "learned")):
                if sel in by_name:
                    scored.append(_Scored(qm.system, method, qm.matrix.query, by_name[sel].correct))
        if at is not None:
            codes = pd.Index(ct.query_ids).get_indexer(at.frame[QUERY_ID].to_numpy())
            for name in at.systems:
                rows = (at.frame[SYSTEM] == name).to_numpy() & (codes >= 0)
                scored.append(_Scored(name, "answer", codes[rows], at.frame["correct"].to_numpy()[rows]))
            n_unknown = int((codes < 0).sum())
            if n_unknown:
                log.warning("%s: %d answer rows have a query_id absent from %s; they are left out", at.path,
                            n_unknown, ct.path)
        args = dict(contexts=str(ct.path), answers=str(at.path) if at else None, rerank=str(rt.path) if rt else None,
                    k=k, reference=reference, short=short, interval=interval, n_boot=n_boot, seed=seed,
                    fusion_temperature=fusion_temperature,
                    selector_train=str(learned.train_path) if learned else None,
                    selector_train_answers=str(train_at.path) if train_at else None,
                    closed_book=closed_book if learned else None, task=answer_settings.task,
                    empty_set=answer_settings.empty_set, open_correct=answer_settings.open_correct,
                    open_threshold=answer_settings.open_threshold)
        return cls(contexts=ct, metrics=metrics, selectors=selectors, scored=scored, reference=reference,
                   interval=interval, n_boot=n_boot, seed=seed, answers=at, rerank=rt, learned=learned,
                   selector_train=train_ct, selector_train_answers=train_at, arguments=args)

    def _interval(self, successes: int, n: int, rng: np.random.Generator) -> tuple[float, float]:
        return stats.proportion_interval(successes, n, self.interval, self.n_boot, rng)

    def _rng(self, *key: str) -> np.random.Generator:
        """A generator per table cell, so an interval does not depend on which other numbers were computed."""
        digest = hashlib.sha256("\0".join(key).encode()).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    def _acc(self, correct: np.ndarray, *key: str) -> tuple[float, float, float]:
        n, s = len(correct), int(np.count_nonzero(correct))
        lo, hi = self._interval(s, n, self._rng(*key))
        return (s / n if n else float("nan")), lo, hi

    # ------------------------------------------------------------------------------------------ frames

    def per_query(self) -> pd.DataFrame:
        """One row per (system, query): consistency, the top-1 and majority answers (normalised), correctness."""
        return self._per_query_arrow().to_pandas()

    def _per_query_arrow(self) -> pa.Table:
        answers = pa.array(self.contexts.answers, pa.string())
        query_ids = pa.array(self.contexts.query_ids, pa.string())
        types = pa.array(ANSWER_TYPES, pa.string())
        has_open = self.has_open
        parts = []
        for qm in self.metrics:
            m = qm.matrix
            n = qm.n_queries

            def text(codes: np.ndarray) -> pa.Array:
                return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), answers).cast(pa.string())

            columns = {
                "system": pa.array(np.full(n, m.system, dtype=object), pa.string()),
                "query_id": query_ids.take(pa.array(m.query)),
                "label": text(m.label),
                "k": pa.array(np.full(n, m.k, dtype=np.int64)),
                "n_ranks": qm.n_ranks.astype(np.int64),
                "n_distinct": qm.n_distinct.astype(np.int64),
                "consistent": qm.consistent,
                "top1_prediction": text(qm.prediction_at(qm.top1_col)),
                "top1_correct": qm.top1_correct,
                "majority_prediction": text(qm.prediction_at(qm.majority_col)),
                "majority_correct": qm.majority_correct,
                "oracle_correct": qm.oracle_correct,
                "first_correct_rank": qm.first_correct_rank.astype(np.int64),
                "answer_type": pa.DictionaryArray.from_arrays(
                    pa.array(m.answer_type if m.answer_type is not None else np.zeros(n, np.int8)),
                    types).cast(pa.string()),
            }
            if has_open:
                for name, col in (("top1", qm.top1_col), ("majority", qm.majority_col)):
                    recall, f1 = self._token_scores(qm, qm.prediction_at(col))
                    columns[f"{name}_token_f1"], columns[f"{name}_token_recall"] = f1, recall
            parts.append(pa.table(columns))
        return pa.concat_tables(parts)

    @property
    def has_open(self) -> bool:
        """Some query is open (per_query.csv then has token-score columns)."""
        return self.contexts.run_type is not None and bool((self.contexts.run_type == ANSWER_TYPES.index(OPEN)).any())

    def _token_scores(self, qm: QueryMetrics, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token recall and F1 of answer codes per query of one system; NaN on queries that are not open."""
        m = qm.matrix
        recall, f1 = np.full(qm.n_queries, np.nan), np.full(qm.n_queries, np.nan)
        is_open = m.type_mask(OPEN)
        if is_open.any():
            recall[is_open], f1[is_open] = self.contexts.token_scores(answer[is_open], m.label[is_open])
        return recall, f1

    def _answer_scores(self, qm: QueryMetrics, source: str, answers: Callable[[], np.ndarray]) -> dict[str, float]:
        """Multi-label F1 (over the set queries) and mean token scores (over the open queries) of the answer codes
        `answers()` one method gives a system; `source` names the method (one cache entry and one bootstrap stream
        each)."""
        key = (qm.system, source)
        if key in self._answer_cache:
            return self._answer_cache[key]
        m = qm.matrix
        out = dict(macro_f1=np.nan, macro_f1_lo=np.nan, macro_f1_hi=np.nan, micro_f1=np.nan, token_f1=np.nan,
                   token_recall=np.nan)
        if m.answer_type is None:  # closed only: none of these apply
            return out
        answer = answers()
        is_set = m.type_mask(SET)
        if is_set.any():
            label, pred = m.label[is_set], answer[is_set]
            empty = self.contexts.settings.empty_set
            members = {int(c): set_members(self.contexts.answers[c], empty) for c in np.unique(np.r_[label, pred])}
            labels = sorted({x for c in np.unique(label).tolist() for x in members[c]})
            codes = np.array(sorted(members))
            ind = stats.membership([members[int(c)] for c in codes], labels)
            gold, got = ind[np.searchsorted(codes, label)], ind[np.searchsorted(codes, pred)]
            out["macro_f1"], out["micro_f1"] = stats.set_f1(gold, got)
            out["macro_f1_lo"], out["macro_f1_hi"] = stats.set_f1_interval(gold, got, self.n_boot,
                                                                           self._rng("macro_f1", *key))
        recall, f1 = self._token_scores(qm, answer)
        if m.type_mask(OPEN).any():
            out["token_f1"], out["token_recall"] = float(np.nanmean(f1)), float(np.nanmean(recall))
        self._answer_cache[key] = out
        return out

    def _cached(self, name: str, build) -> pd.DataFrame:
        if name not in self._frames:
            self._frames[name] = build()
        return self._frames[name].copy()

    def summary(self) -> pd.DataFrame:
        """One row per context system: size, depth, inconsistency and top-1 / majority / oracle accuracy."""
        def build() -> pd.DataFrame:
            rows = []
            for qm in self.metrics:
                m = qm.matrix
                row: dict[str, Any] = dict(system=m.system, n_queries=qm.n_queries, k=m.k, n_short=m.n_short,
                                           short_policy=m.short_policy,
                                           inconsistent_rate=float(np.mean(~qm.consistent)))
                _, lo, hi = self._acc(~qm.consistent, "summary", m.system, "inconsistent")
                row.update(inconsistent_rate_lo=lo, inconsistent_rate_hi=hi,
                           mean_n_distinct=float(np.mean(qm.n_distinct)))
                for name, correct in (("top1", qm.top1_correct), ("majority", qm.majority_correct),
                                      ("oracle", qm.oracle_correct)):
                    acc, lo, hi = self._acc(correct, "summary", m.system, name)
                    row.update({f"{name}_acc": acc, f"{name}_acc_lo": lo, f"{name}_acc_hi": hi})
                row.update(relevance_metrics(qm))
                row.update({f"n_{t}": int(m.type_mask(t).sum()) for t in ANSWER_TYPES})
                for name, col in (("top1", qm.top1_col), ("majority", qm.majority_col)):
                    scores = self._answer_scores(qm, name, lambda col=col: qm.prediction_at(col))
                    row.update({f"{name}_{c}": v for c, v in scores.items()})
                rows.append(row)
            return pd.DataFrame(rows)
        return self._cached("summary", build)

    def oracle_at_k(self) -> pd.DataFrame:
        """oracle@j for j = 1..k per context system, with its interval and the system's top-1 accuracy."""
        def build() -> pd.DataFrame:
            rows = []
            for qm in self.metrics:
                n = qm.n_queries
                top1 = float(np.mean(qm.top1_correct))
                for j, hits in enumerate(oracle_at_k(qm), 1):
                    lo, hi = self._interval(int(hits), n, self._rng("oracle_at_k", qm.system, str(j)))
                    rows.append(dict(system=qm.system, k=j, oracle_acc=hits / n, oracle_acc_lo=lo, oracle_acc_hi=hi,
                                     top1_acc=top1))
            return pd.DataFrame(rows)
        return self._cached("oracle_at_k", build)

    def _reference_consistency(self) -> np.ndarray:
        """Per global query code: 1 consistent, 0 inconsistent, -1 not answered by the reference system."""
        ref = next(qm for qm in self.metrics if qm.system == self.reference)
        out = np.full(len(self.contexts.query_ids), -1, dtype=np.int8)
        out[ref.matrix.query] = ref.consistent
        return out

    def subsets(self) -> pd.DataFrame:
        """Accuracy of every scored system on the reference system's consistent / inconsistent queries."""
        def build() -> pd.DataFrame:
            ref = self._reference_consistency()
            rows = []
            for sc in self.scored:
                state = ref[sc.query]
                for subset in SUBSETS:
                    member = state >= 0 if subset == "all" else state == (subset == "consistent")
                    n, s = int(member.sum()), int((sc.correct & member).sum())
                    lo, hi = stats.subset_interval(sc.correct, member, self.interval, self.n_boot,
                                                   self._rng("subsets", sc.system, sc.method, subset))
                    rows.append(dict(system=sc.system, method=sc.method, reference=self.reference, subset=subset,
                                     n=n, acc=s / n if n else float("nan"), acc_lo=lo, acc_hi=hi))
            return pd.DataFrame(rows)
        return self._cached("subsets", build)

    def selectors_frame(self) -> pd.DataFrame:
        """Accuracy of each selector per context system and the share of the top-1-to-oracle gap it closes."""
        def build() -> pd.DataFrame:
            rows = []
            for qm in self.metrics:
                top1, oracle = float(np.mean(qm.top1_correct)), float(np.mean(qm.oracle_correct))
                for sel in self.selectors[qm.system]:
                    acc, lo, hi = self._acc(sel.correct, "selectors", qm.system, sel.name)
                    source = {"retriever": "top1"}.get(sel.name, sel.name)  # the summary's top-1 numbers
                    rows.append(dict(system=qm.system, selector=sel.name, n=qm.n_queries, acc=acc, acc_lo=lo,
                                     acc_hi=hi, gap_closed=gap_closed(acc, top1, oracle), n_fallback=sel.n_fallback,
                                     **self._answer_scores(qm, source, lambda sel=sel: sel.answers(qm))))
            return pd.DataFrame(rows)
        return self._cached("selectors", build)

    def mcnemar(self) -> pd.DataFrame:
        """Exact McNemar test for every pair of scored (system, method) on the queries both answered."""
        def build() -> pd.DataFrame:
            rows = []
            for i in range(len(self.scored)):
                for j in range(i + 1, len(self.scored)):
                    a, b = self.scored[i], self.scored[j]
                    t = stats.paired_outcomes(a.query, a.correct, b.query, b.correct)
                    rows.append(dict(system_a=a.system, method_a=a.method, system_b=b.system, method_b=b.method,
                                     n=t.n, acc_a=t.acc_a, acc_b=t.acc_b, only_a=t.only_a, only_b=t.only_b,
                                     p_value=t.p_value))
            columns = ["system_a", "method_a", "system_b", "method_b", "n", "acc_a", "acc_b", "only_a", "only_b",
                       "p_value"]
            return pd.DataFrame(rows, columns=columns)
        return self._cached("mcnemar", build)

    def improvement(self, baseline: str, improved: str) -> pd.DataFrame:
        """acc(improved) - acc(baseline) per method on the reference's subsets, over the queries both context
        systems answered, with a paired query-bootstrap 95% interval."""
        ref = self._reference_consistency()
        rows = []
        for method in CONTEXT_METHODS:
            pair = {sc.system: sc for sc in self.scored if sc.method == method and sc.system in (baseline, improved)}
            if len(pair) < 2:
                continue
            a = np.full(len(ref), -1, dtype=np.int8)
            b = np.full(len(ref), -1, dtype=np.int8)
            a[pair[baseline].query] = pair[baseline].correct
            b[pair[improved].query] = pair[improved].correct
            for subset in SUBSETS:
                member = (a >= 0) & (b >= 0) & ((ref >= 0) if subset == "all" else ref == (subset == "consistent"))
                ca, cb = a[member] == 1, b[member] == 1
                lo, hi = stats.paired_difference_interval(ca, cb, self.n_boot,
                                                          self._rng("improvement", baseline, improved, method, subset))
                rows.append(dict(baseline=baseline, improved=improved, method=method, subset=subset,
                                 n=int(member.sum()), diff=float(cb.mean() - ca.mean()) if member.any() else np.nan,
                                 diff_lo=lo, diff_hi=hi))
        return pd.DataFrame(rows)

    def frames(self) -> dict[str, pd.DataFrame]:
        """Every CSV table by file stem (per_query included)."""
        return {"per_query": self.per_query(), "summary": self.summary(), "oracle_at_k": self.oracle_at_k(),
                "subsets": self.subsets(), "selectors": self.selectors_frame(), "mcnemar": self.mcnemar()}

def _check_answer_labels(ct: ContextTable, at: AnswerTable) -> None:
    """An answer row's answer type and label must match the context table's for the same query (labels compared
    normalised). An answer table without types (no column, --task auto) takes each query's type from the context
    table (closed for queries it lacks)."""
    codes = pd.Index(ct.query_ids).get_indexer(at.frame[QUERY_ID].to_numpy())
    known = codes >= 0
    rows = np.flatnonzero(known)
    query_type = np.zeros(len(ct.query_ids), dtype=np.int8)
    if ct.run_type is not None:
        query_type[ct.run_query] = ct.run_type
    if not at.typed:
        at.retype(np.array(ANSWER_TYPES, dtype=object)[np.where(known, query_type[codes], 0)])
    ctx_type = np.array(ANSWER_TYPES, dtype=object)[query_type[codes[known]]]
    ans_type = at.frame[ANSWER_TYPE].to_numpy()[known]
    bad = np.flatnonzero(ans_type != ctx_type)
    if len(bad):
        raise at.raw.fail(int(rows[bad[0]]), ANSWER_TYPE,
                          f"{ans_type[bad[0]]!r} differs from the answer type {ctx_type[bad[0]]!r} of the same query "
                          f"in {ct.path}; a query has one answer type (pass the same --task to both tables)")
    query_label = np.full(len(ct.query_ids), -1, dtype=np.int64)
    query_label[ct.run_query] = ct.run_label
    ctx_label = np.array(ct.answers, dtype=object)[query_label[codes[known]]]
    norm = at.frame["label_norm"].to_numpy()[known]
    bad = np.flatnonzero(norm != ctx_label)
    if len(bad):
        r = int(rows[bad[0]])
        raise at.raw.fail(r, "label", f"{at.frame['label'].iloc[r]!r} differs from the label {ctx_label[bad[0]]!r} "
                                      f"of the same query in {ct.path}; a query has one gold label")
