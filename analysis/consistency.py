"""Per-query consistency of a system's top-k single-context predictions: n_distinct, top-1, majority and oracle.

Vectorised over a (query × rank) matrix; no per-query Python loop (docs/design.md, "The analysis, defined exactly").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import RankMatrix


@dataclass
class QueryMetrics:
    """One value per query of one system (arrays aligned with `matrix.query`)."""

    matrix: RankMatrix
    n_ranks: np.ndarray  # ranks present within 1..k
    n_distinct: np.ndarray  # distinct (normalised) predictions among them
    top1_col: np.ndarray  # column of the best rank present (rank 1 unless --short keep lets it be absent)
    majority_col: np.ndarray  # column of the majority answer's best rank (ties -> the tied answer seen first)
    top1_correct: np.ndarray
    majority_correct: np.ndarray
    oracle_correct: np.ndarray
    first_correct_rank: np.ndarray  # best rank with a correct prediction, 0 when none

    @property
    def consistent(self) -> np.ndarray:
        return self.n_distinct == 1

    @property
    def system(self) -> str:
        return self.matrix.system

    @property
    def n_queries(self) -> int:
        return len(self.n_ranks)

    def prediction_at(self, col: np.ndarray) -> np.ndarray:
        return self.matrix.prediction[np.arange(len(col)), col]


def query_metrics(m: RankMatrix) -> QueryMetrics:
    cols = np.ascontiguousarray(m.prediction.T)  # (k, n): each rank a contiguous vector, ~5x faster than strides
    present = cols >= 0
    complete = bool(present.all())
    k, n = cols.shape
    count = present.astype(np.int16 if k < 2 ** 15 else np.int32)  # how often each cell's answer occurs
    first = present.copy()  # cell holds the first occurrence of its answer
    for j in range(1, k):
        for i in range(j):
            same = cols[j] == cols[i]
            if not complete:
                same &= present[j]
            count[j] += same
            count[i] += same
            first[j] &= ~same
    queries = np.arange(n)
    top1_col = np.argmax(present, axis=0)
    majority_col = np.argmax(np.where(present, count, -1), axis=0)  # argmax takes the first maximum: best rank
    correct = (cols == m.label) & present if m.graded is None else np.ascontiguousarray(m.graded.T)
    oracle = correct.any(axis=0)
    return QueryMetrics(
        matrix=m,
        n_ranks=present.sum(axis=0),
        n_distinct=first.sum(axis=0),
        top1_col=top1_col,
        majority_col=majority_col,
        top1_correct=correct[top1_col, queries],
        majority_correct=correct[majority_col, queries],
        oracle_correct=oracle,
        first_correct_rank=np.where(oracle, np.argmax(correct, axis=0) + 1, 0),
    )
