"""Statistics for per-query accuracies: Wilson and query-clustered bootstrap intervals, the exact McNemar test, and
the per-system metrics and paired comparisons that the pipeline, the report and the sweep all report.

Every metric here is a mean of one 0/1 value per query, so resampling queries keeps a query's k rows together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..core.base.answers import (CLOSED, DEFAULT_SETTINGS, OPEN, SET, AnswerSettings, normalize_answer, score_rows,
                                 set_members)
from .tables import ANSWER_TYPE, LABEL, PREDICTION, QUERY_ID, SYSTEM

Z95 = 1.959963984540054
INTERVALS = ("wilson", "bootstrap")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_cells(counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Query-clustered bootstrap on cell counts: queries fall into cells (e.g. (in subset, correct)); resampling n
    queries with replacement is exactly a multinomial draw of the cell counts. Returns (n_boot, n_cells)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return np.zeros((n_boot, len(counts)), dtype=np.int64)
    return rng.multinomial(n, counts / n, size=n_boot)


def bootstrap_ratio(num_cells: np.ndarray, den_cells: np.ndarray, counts: np.ndarray, n_boot: int,
                    rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of sum(draw[num_cells]) / sum(draw[den_cells]) over bootstrap draws of cell counts."""
    draws = bootstrap_cells(counts, n_boot, rng)
    num = draws[:, num_cells].sum(axis=1)
    den = draws[:, den_cells].sum(axis=1)
    ok = den > 0
    if not ok.any():
        return float("nan"), float("nan")
    ratio = num[ok] / den[ok]
    lo, hi = np.quantile(ratio, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def proportion_interval(successes: int, n: int, method: str, n_boot: int = 1000,
                        rng: np.random.Generator | None = None) -> tuple[float, float]:
    """95% interval of an accuracy from `successes` correct queries of `n` (wilson or query bootstrap)."""
    if method == "wilson":
        return wilson(successes, n)
    if method == "bootstrap":
        rng = rng if rng is not None else np.random.default_rng(0)
        return bootstrap_ratio(np.array([1]), np.array([0, 1]), np.array([n - successes, successes]), n_boot, rng)
    raise ValueError(f"interval {method!r}: expected one of {INTERVALS}")


def subset_interval(correct: np.ndarray, member: np.ndarray, method: str, n_boot: int = 1000,
                    rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Interval of the accuracy on the queries with `member` True. The bootstrap resamples all queries, so the
    subset's size varies between draws as it would in a new sample."""
    correct, member = np.asarray(correct, bool), np.asarray(member, bool)
    n, s = int(member.sum()), int((correct & member).sum())
    if method == "wilson":
        return wilson(s, n)
    rng = rng if rng is not None else np.random.default_rng(0)
    cells = np.array([int((~member).sum()), n - s, s])  # outside, in & wrong, in & right
    return bootstrap_ratio(np.array([2]), np.array([1, 2]), cells, n_boot, rng)


def paired_difference_interval(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 1000,
                               rng: np.random.Generator | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of acc(b) - acc(a) on the same queries, resampling queries (the pair of a
    query's outcomes stays together: a multinomial draw over the four (a, b) outcome cells)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if not len(a):
        return float("nan"), float("nan")
    rng = rng if rng is not None else np.random.default_rng(0)
    cells = np.array([(~a & ~b).sum(), (a & ~b).sum(), (~a & b).sum(), (a & b).sum()])
    draws = bootstrap_cells(cells, n_boot, rng)
    diff = (draws[:, 2] - draws[:, 1]) / len(a)
    lo, hi = np.quantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired per-query correctness: b = only A right, c = only B right."""

    n: int
    acc_a: float
    acc_b: float
    only_a: int
    only_b: int
    p_value: float


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (p = 1 when there are none); pooling several
    samples (e.g. seeds) is summing their counts."""
    return 1.0 if only_a + only_b == 0 else float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Two-sided exact binomial test on the discordant pairs of outcomes aligned by query."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = len(a)
    return McNemar(n=n, acc_a=float(a.mean()) if n else float("nan"), acc_b=float(b.mean()) if n else float("nan"),
                   only_a=only_a, only_b=only_b, p_value=mcnemar_p(only_a, only_b))


def paired_outcomes(query_a: np.ndarray, correct_a: np.ndarray, query_b: np.ndarray,
                    correct_b: np.ndarray) -> McNemar:
    """McNemar of two systems on the queries both answered; `query_*` are each system's query keys (unique per
    system, any sortable type), `correct_*` its 0/1 outcome per key."""
    _, ia, ib = np.intersect1d(np.asarray(query_a), np.asarray(query_b), assume_unique=True, return_indices=True)
    return mcnemar(np.asarray(correct_a, bool)[ia], np.asarray(correct_b, bool)[ib])


def membership(sets: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    """(n × L) boolean matrix: set i holds label j; members outside `labels` are left out."""
    index = {label: j for j, label in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), dtype=bool)
    for i, members in enumerate(sets):
        out[i, [index[m] for m in members if m in index]] = True
    return out


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro and micro F1 from per-label counts (..., L): macro = mean over labels with a gold occurrence
    (tp + fn > 0) of 2tp / (2tp + fp + fn); micro = 2Σtp / (2Σtp + Σfp + Σfn). NaN where undefined."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    gold = (tp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(gold, 2 * tp / np.where(gold, 2 * tp + fp + fn, 1.0), 0.0)
        macro = f1.sum(axis=-1) / gold.sum(axis=-1)
        den = (2 * tp + fp + fn).sum(axis=-1)
        micro = np.where(den > 0, 2 * tp.sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)
    return macro, micro


def set_f1(gold: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(macro-F1, micro-F1) of multi-label predictions from gold and predicted membership matrices (n × L)."""
    gold, pred = np.asarray(gold, bool), np.asarray(pred, bool)
    macro, micro = _f1_from_counts((gold & pred).sum(0), (~gold & pred).sum(0), (gold & ~pred).sum(0))
    return float(macro), float(micro)


def set_f1_interval(gold: np.ndarray, pred: np.ndarray, n_boot: int = 1000, rng: np.random.Generator | None = None,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile query-bootstrap interval of the macro-F1 (F1 has no Wilson interval). Queries with the same
    (gold, predicted) membership pattern form one cell, so a draw is a multinomial draw of the cell counts; in a
    draw, labels without a gold occurrence are left out of the mean, as in the sample."""
    gold, pred = np.asarray(gold, bool), np.asarray(pred, bool)
    if not len(gold) or not gold.any():
        return float("nan"), float("nan")
    rng = rng if rng is not None else np.random.default_rng(0)
    patterns, counts = np.unique(np.hstack([gold, pred]), axis=0, return_counts=True)
    n_labels = gold.shape[1]
    g, p = patterns[:, :n_labels], patterns[:, n_labels:]
    tp, fp, fn = ((a & b).astype(np.float64) for a, b in ((g, p), (~g, p), (g, ~p)))
    per_block = max(1, (1 << 22) // len(counts))
    macros = []
    for b0 in range(0, n_boot, per_block):
        draws = bootstrap_cells(counts, min(per_block, n_boot - b0), rng).astype(np.float64)
        macros.append(_f1_from_counts(draws @ tp, draws @ fp, draws @ fn)[0])
    macro = np.concatenate(macros)
    macro = macro[~np.isnan(macro)]
    if not len(macro):
        return float("nan"), float("nan")
    lo, hi = np.quantile(macro, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _types(answers: pd.DataFrame) -> pd.Series:
    if ANSWER_TYPE in answers:
        types = answers[ANSWER_TYPE].fillna("").astype(str).str.strip().str.casefold()
        return types.where(types != "", CLOSED)  # empty or null: closed
    return pd.Series(CLOSED, index=answers.index)


def _scored(answers: pd.DataFrame, settings: AnswerSettings = DEFAULT_SETTINGS) -> dict[str, np.ndarray]:
    return score_rows(answers[PREDICTION].to_numpy(), answers[LABEL].to_numpy(), _types(answers).to_numpy(),
                      settings)


def _correct(answers: pd.DataFrame) -> np.ndarray:
    return _scored(answers)["correct"]


def paired(answers: pd.DataFrame, a: str, b: str) -> McNemar:
    """System `a` against system `b` of an answer frame (columns system, query_id, prediction, label, optional
    answer_type; one row per system and query) on the queries both answered: n, only_a, only_b (queries only that
    system gets right) and the exact McNemar p-value."""
    sub = [answers[answers[SYSTEM] == s] for s in (a, b)]
    return paired_outcomes(sub[0][QUERY_ID].astype(str).to_numpy(), _correct(sub[0]),
                           sub[1][QUERY_ID].astype(str).to_numpy(), _correct(sub[1]))


def system_metrics(answers: pd.DataFrame, labels: Sequence[str] | None = None,
                   settings: AnswerSettings = DEFAULT_SETTINGS) -> dict[str, dict[str, Any]]:
    """Per system of an answer frame (columns system, prediction, label, optional answer_type: closed when absent),
    in order of first appearance: n, accuracy with its Wilson 95% interval (accuracy_lo, accuracy_hi; correctness
    as core/base/answers.judge defines it per type) and macro_f1. macro_f1 is over the closed rows: the mean F1 over
    the `labels` (default: the gold labels seen) that occur as gold labels of that system's closed queries; for a
    system with set rows it is the label-set macro-F1 of those rows (set_f1; labels = the members of `labels`, by
    default the gold members seen), with micro_f1 added. Systems with open rows add token_f1 and token_recall
    (means over those rows)."""
    out: dict[str, dict[str, Any]] = {}
    classes = list(dict.fromkeys(normalize_answer(x) for x in (labels if labels is not None else answers[LABEL])))
    scored = pd.DataFrame(_scored(answers, settings), index=answers.index).assign(
        _type=_types(answers), _system=answers[SYSTEM])
    for system, group in scored.groupby("_system", sort=False):
        right = int(group["correct"].sum())
        lo, hi = wilson(right, len(group))
        row: dict[str, Any] = {"n": len(group), "accuracy": right / len(group) if len(group) else float("nan"),
                               "accuracy_lo": lo, "accuracy_hi": hi}
        sets = group[group["_type"] == SET]
        if len(sets):
            gold = [set_members(x, settings.empty_set) for x in sets["label_norm"]]
            names = (sorted({m for g in gold for m in g}) if labels is None
                     else [normalize_answer(x) for x in labels])
            pred = [set_members(x, settings.empty_set) for x in sets["prediction_norm"]]
            row["macro_f1"], row["micro_f1"] = set_f1(membership(gold, names), membership(pred, names))
        else:
            closed = group[group["_type"] == CLOSED]
            y, pr = closed["label_norm"].to_numpy(dtype=object), closed["prediction_norm"].to_numpy(dtype=object)
            f1s = [2 * np.sum((pr == c) & (y == c)) / (np.sum(pr == c) + np.sum(y == c)) for c in classes
                   if np.sum(y == c)]
            row["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
        opened = group[group["_type"] == OPEN]
        if len(opened):
            row["token_f1"] = float(opened["token_f1"].mean())
            row["token_recall"] = float(opened["token_recall"].mean())
        out[str(system)] = row
    return out
