"""Selectors: rules that pick one answer per query from a system's top-k contexts, and their gap closed.

retriever (rank 1), confidence (highest max-probability), majority, fusion (retrieval-score-weighted probabilities),
learned (a model trained on validation rows, analysis/learned.py), oracle, and lvlm:<model> (a rerank file's choice). Each returns per-query correctness aligned with the RankMatrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.base.answers import OPEN, SET, SET_SEPARATOR, normalize_set
# the one fusion rule (re-exported here: fuse, fused_answer and fusion_weights were first defined in this module)
from ..core.base.fusion import FUSION_TIE_TOL, fuse, fused_answer, fused_labels, fusion_weights, open_answer
from .consistency import QueryMetrics
from .learned import RAW, LearnedSelector
from .tables import ERROR, QUERY_ID, RANKING, SELECTOR, SYSTEM, ContextTable, RerankTable

log = logging.getLogger(__name__)

BUILTIN = ("retriever", "confidence", "majority", "fusion", "oracle")
_BLOCK = 1 << 20  # (query × answer) cells of the fusion accumulator per block of queries


@dataclass
class SelectorResult:
    name: str
    correct: np.ndarray  # bool per query
    n_fallback: int = 0  # queries where the selector could not choose and rank 1 was used
    answer: np.ndarray | None = None  # answer code chosen per query (fusion), else taken from `col`
    col: np.ndarray | None = None  # the chosen context's column per query

    def answers(self, qm: QueryMetrics) -> np.ndarray:
        """Answer code chosen per query (for F1 and token scores; computed on demand)."""
        return self.answer if self.answer is not None else qm.prediction_at(self.col)


def _pick(qm: QueryMetrics, name: str, col: np.ndarray, n_fallback: int = 0,
          correct: np.ndarray | None = None) -> SelectorResult:
    """A selector that chooses one context (column) per query; `correct` when already known."""
    if correct is None:
        correct = qm.matrix.correct[np.arange(len(col)), col]
    return SelectorResult(name, correct, n_fallback, col=col)


def _probs_exempt(qm: QueryMetrics) -> np.ndarray | None:
    """Open and set queries: free-text answers and per-label p(yes) are no reader distribution over answers, so
    `confidence` falls back to rank 1 on them (counted in n_fallback). None when the system has none."""
    exempt = qm.matrix.type_mask(OPEN) | qm.matrix.type_mask(SET)
    return exempt if exempt.any() else None


def gap_closed(acc: float, top1: float, oracle: float) -> float:
    """(selector - top1) / (oracle - top1); NaN when the oracle gains nothing over top-1."""
    return float("nan") if oracle == top1 else (acc - top1) / (oracle - top1)


def confidence(table: ContextTable, qm: QueryMetrics) -> SelectorResult | None:
    """The context whose reader distribution has the highest maximum (ties -> best rank); open and set queries fall
    back to rank 1. None without probs on every context of the other queries (or without any other query)."""
    m = qm.matrix
    if table.probs is None:
        return None
    exempt = _probs_exempt(qm)
    present = m.present if exempt is None else m.present & ~exempt[:, None]
    if exempt is not None and exempt.all():
        log.info("system %s: confidence selector left out: every query is open or set (no distribution)", m.system)
        return None
    maxp = table.probs.row_max()[np.maximum(m.row, 0)]
    if np.isnan(maxp[present]).any():
        return None
    col = np.argmax(np.where(present, maxp, -np.inf), axis=1)
    if exempt is not None:
        col[exempt] = qm.top1_col[exempt]
    return _pick(qm, "confidence", col, 0 if exempt is None else int(exempt.sum()))


def fusion(table: ContextTable, qm: QueryMetrics, temperature: float = 1.0) -> SelectorResult | None:
    """Per query, the pipeline's fused answer (core/base/fusion.py) from the logged context rows: closed queries
    `fused_answer(fuse(...))` of their probs, vectorised over queries (`table.answers` is sorted, so the first tied
    code is the alphabetically first normalised answer); set queries `fused_labels` of their per-label p(yes)
    (`table.label_probs`; the empty set only under --allow-empty); open queries the `open_answer` vote over their
    contexts' answers. None without retrieval scores, or without the probs a closed or set query needs."""
    m = qm.matrix
    if m.score is None:
        return None
    is_open, is_set = m.type_mask(OPEN), m.type_mask(SET)
    closed = ~(is_open | is_set)
    present = m.present & closed[:, None]
    probs = table.probs
    if closed.any() and (probs is None or table.probs_answer is None or not probs.valid[m.row[present]].all()):
        return None
    if is_set.any() and (table.label_probs is None
                         or not table.label_probs.valid[m.row[m.present & is_set[:, None]]].all()):
        return None
    if np.isnan(m.score[m.present]).any():
        return None
    n = len(qm.n_ranks)
    choice = np.empty(n, dtype=np.int64)
    if closed.any():
        scores = np.where(present, m.score, -np.inf)
        scores[~closed] = 0.0  # fused below, one by one; keeps the softmax finite
        w = fusion_weights(scores, temperature)
        n_answers = len(table.answers)
        per_block = max(1, _BLOCK // max(n_answers, m.k))
        for q0 in range(0, n, per_block):  # blocks of queries bound the memory of the entry-level arrays
            q1 = min(n, q0 + per_block)
            qi, col = np.nonzero(present[q0:q1])
            rows = m.row[q0:q1][qi, col]
            start, lengths = probs.offsets[rows], probs.offsets[rows + 1] - probs.offsets[rows]
            entry = np.repeat(start - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
            weight = np.repeat(w[q0:q1][qi, col], lengths) * probs.values[entry]
            key = np.repeat(qi, lengths) * n_answers + table.probs_answer[entry]
            fused = np.bincount(key, weights=weight, minlength=(q1 - q0) * n_answers).reshape(q1 - q0, n_answers)
            choice[q0:q1] = (fused >= fused.max(axis=1, keepdims=True) - FUSION_TIE_TOL).argmax(axis=1)
    for q in np.flatnonzero(is_open):
        cols = np.flatnonzero(m.present[q])
        texts = [table.answers[c] for c in m.prediction[q, cols]]  # normalize_open forms: the vote's keys
        choice[q] = m.prediction[q, cols[texts.index(open_answer(texts, fusion_weights(m.score[q, cols],
                                                                                          temperature)))]]
    if is_set.any():
        lp, empty = table.label_probs, table.settings.empty_set
        for q in np.flatnonzero(is_set):
            cols = np.flatnonzero(m.present[q])
            cells = [(lp.keys[lp.offsets[r]:lp.offsets[r + 1]].to_pylist(), lp.values[lp.offsets[r]:lp.offsets[r + 1]])
                     for r in m.row[q, cols]]
            labels = cells[0][0]
            p_yes = np.array([dict(zip(keys, values))[label] for keys, values in cells for label in labels])
            fused = fuse(p_yes.reshape(len(cells), len(labels)), m.score[q, cols], temperature)
            members = fused_labels(labels, fused, table.settings.allow_empty)
            choice[q] = table.code_of(normalize_set(SET_SEPARATOR.join(members), empty))
    return SelectorResult("fusion", table.judge(choice, m.label, m.answer_type), 0, choice)


def learned(table: ContextTable, qm: QueryMetrics, model: LearnedSelector, raw: bool = False
            ) -> SelectorResult | None:
    """The context the learned selector scores most likely correct (ties -> best rank), or rank 1 for every query
    (all counted in n_fallback) where the validation's cross-validation found the model no better than rank 1;
    `raw`: the model's picks either way (selector `learned-raw`). None without a model for this system."""
    picked = model.select(table, qm, raw=raw)
    if picked is None:
        return None
    col, by_model = picked
    return _pick(qm, RAW if raw else "learned", col, n_fallback=0 if by_model else len(col))


def rerank_selectors(table: ContextTable, qm: QueryMetrics, rerank: RerankTable) -> list[SelectorResult]:
    """One result per selector of the rerank file for this system: the first rank of its ranking; failed, missing
    or out-of-range rankings fall back to rank 1 and are counted."""
    m = qm.matrix
    df = rerank.frame
    rows = df.index[df[SYSTEM] == m.system].to_numpy()
    if not len(rows):
        return []
    codes = pd.Index(table.query_ids).get_indexer(df[QUERY_ID].to_numpy()[rows])
    unknown = np.flatnonzero(codes < 0)
    if len(unknown):
        r = int(rows[unknown[0]])
        raise rerank.raw.fail(r, QUERY_ID, f"{df[QUERY_ID].iloc[r]!r} is not a query of the context table "
                                           f"{table.path}")
    local_of = np.full(len(table.query_ids), -1, dtype=np.int64)
    local_of[m.query] = np.arange(len(m.query))
    out = []
    sub = df.iloc[rows].assign(_local=local_of[codes])
    for name, group in sub.groupby(SELECTOR, sort=True):
        group = group[group["_local"] >= 0]  # queries dropped by --short drop
        col = qm.top1_col.copy()
        chosen = np.array([r[0] - 1 if r else -1 for r in group[RANKING]], dtype=np.int64)
        failed = (group[ERROR].str.strip() != "").to_numpy() if ERROR in group else np.zeros(len(group), bool)
        local = group["_local"].to_numpy()
        valid = ~failed & (chosen >= 0) & (chosen < m.k)
        valid[valid] &= m.present[local[valid], chosen[valid]]
        col[local[valid]] = chosen[valid]
        n_fallback = len(qm.top1_col) - int(valid.sum())
        out.append(_pick(qm, str(name), col, n_fallback))
    return out


def run_selectors(table: ContextTable, qm: QueryMetrics, rerank: RerankTable | None = None,
                  fusion_temperature: float = 1.0, learned_model: LearnedSelector | None = None) -> list[SelectorResult]:
    """Every available selector for one system (confidence and fusion need probs / retrieval scores, learned a
    trained model)."""
    results = [_pick(qm, "retriever", qm.top1_col, correct=qm.top1_correct)]
    for extra in (confidence(table, qm), _pick(qm, "majority", qm.majority_col, correct=qm.majority_correct),
                  fusion(table, qm, fusion_temperature)):
        if extra is not None:
            results.append(extra)
    if learned_model is not None:
        for raw in (False, True):
            picked = learned(table, qm, learned_model, raw=raw)
            if picked is not None:
                results.append(picked)
    if rerank is not None:
        results.extend(rerank_selectors(table, qm, rerank))
    # The oracle's answer: its best correct context's, else rank 1's (what it reports when nothing is correct).
    results.append(_pick(qm, "oracle", np.where(qm.oracle_correct, qm.first_correct_rank - 1, qm.top1_col),
                         correct=qm.oracle_correct))
    return results


def check_rerank_systems(table: ContextTable, rerank: RerankTable) -> None:
    unknown = ~rerank.frame[SYSTEM].isin(table.systems).to_numpy()
    if unknown.any():
        r = int(np.argmax(unknown))
        raise rerank.raw.fail(r, SYSTEM, f"{rerank.frame[SYSTEM].iloc[r]!r} is not a system of the context table "
                                         f"(systems: {table.systems})")
