"""Answer types: how a prediction is compared with its gold label — closed (one answer), set (multi-label label
sets), open (free text). Owns the normalisation of each type, the set parser, open-answer token metrics and judging.
"""

from __future__ import annotations

import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CLOSED, SET, OPEN = "closed", "set", "open"
ANSWER_TYPES = (CLOSED, SET, OPEN)  # the code of a type is its index here
TASKS = ("auto",) + ANSWER_TYPES
OPEN_CORRECT = ("em", "recall", "f1")
EMPTY_SET = "none"  # how the pipeline writes the empty label set (records.join_label_set)
DEFAULT_EMPTY_SET = EMPTY_SET  # the analysis' default --empty-set token
SET_SEPARATOR = ", "  # between the members of a set answer
_PUNCT = frozenset(string.punctuation)
_ARTICLES = frozenset(("a", "an", "the"))
_TOLERANCE = 1e-12  # a token score this close below the threshold still reaches it (floating-point sums)


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are read and judged (analyze-oracle --task, --empty-set, --open-correct, --open-threshold,
    --allow-empty).

    `task`: auto (the `answer_type` column when present, else closed) or one type for every row. `empty_set`: the
    token that writes the empty label set. `open_correct`: what makes an open answer correct — em (normalised exact
    match), recall or f1 (token score >= `open_threshold`). `allow_empty`: the dataset allows the empty label set
    (dataset.yaml `allow_empty`, --allow-empty), which decides the fused set when no label's fused p(yes) exceeds
    0.5 (fusion.fused_labels)."""

    task: str = "auto"
    empty_set: str = DEFAULT_EMPTY_SET
    open_correct: str = "em"
    open_threshold: float = 1.0
    allow_empty: bool = False

    def problems(self) -> list[str]:
        """What is invalid about these settings (empty when they are valid)."""
        out = []
        if self.task not in TASKS:
            out.append(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        token = normalize_closed(self.empty_set)
        if not token or "," in token:
            out.append(f"--empty-set {self.empty_set!r}: expected a non-empty token without a comma")
        if self.open_correct not in OPEN_CORRECT:
            out.append(f"--open-correct {self.open_correct!r}: expected one of {', '.join(OPEN_CORRECT)}")
        if not 0.0 < self.open_threshold <= 1.0:
            out.append(f"--open-threshold {self.open_threshold}: expected a number in (0, 1]")
        return out

    @property
    def empty_token(self) -> str:
        return normalize_closed(self.empty_set)

    @property
    def graded_open(self) -> bool:
        """Open answers are judged by a token score rather than by equality of their normalised text."""
        return self.open_correct != "em"


DEFAULT_SETTINGS = AnswerSettings()


def normalize_closed(text: str) -> str:
    """Closed answers are compared after strip() + casefold() (docs/design.md)."""
    return str(text).strip().casefold()


def parse_set(text: str, empty_set: str = DEFAULT_EMPTY_SET) -> tuple[str, ...]:
    """The members of a label set written as comma-separated labels: each part strip() + casefold(), empty parts
    and parts equal to the empty-set token dropped, duplicates merged; sorted."""
    token = normalize_closed(empty_set)
    return tuple(sorted({p for p in (normalize_closed(x) for x in str(text).split(",")) if p and p != token}))


def normalize_set(text: str, empty_set: str = DEFAULT_EMPTY_SET) -> str:
    """Canonical form of a label set: its sorted members joined by ", "; the empty set is the empty-set token."""
    members = parse_set(text, empty_set)
    return SET_SEPARATOR.join(members) if members else normalize_closed(empty_set)


def set_members(canonical: str, empty_set: str = DEFAULT_EMPTY_SET) -> tuple[str, ...]:
    """The members of a canonical set string (the inverse of `normalize_set`)."""
    return () if canonical == normalize_closed(empty_set) else tuple(canonical.split(SET_SEPARATOR))


def normalize_open(text: str) -> str:
    """Free-text answers as med-VQA evaluation compares them (SQuAD's normalisation): casefold, delete punctuation
    (ASCII string.punctuation and every Unicode P* character), drop the articles a / an / the, collapse
    whitespace (which also strips)."""
    s = str(text).casefold()
    s = "".join(ch for ch in s if ch not in _PUNCT and not (ord(ch) > 127 and unicodedata.category(ch)[0] == "P"))
    return " ".join(w for w in s.split() if w not in _ARTICLES)


def normalize_answer(text: str, answer_type: str = CLOSED, empty_set: str = DEFAULT_EMPTY_SET) -> str:
    """The normalised form answers of `answer_type` are compared in: equal forms are the same answer."""
    if answer_type == CLOSED:
        return normalize_closed(text)
    if answer_type == SET:
        return normalize_set(text, empty_set)
    if answer_type == OPEN:
        return normalize_open(text)
    raise ValueError(f"answer type {answer_type!r}: expected one of {ANSWER_TYPES}")


def token_scores(prediction: str, gold: str) -> tuple[float, float]:
    """(token recall, token F1) of two normalised open answers, tokens split on whitespace, overlap counted as a
    multiset (SQuAD): recall = overlap / gold tokens, precision = overlap / predicted tokens, F1 their harmonic
    mean. When either side has no token, both are 1 if both are empty and 0 otherwise."""
    p, g = prediction.split(), gold.split()
    if not p or not g:
        v = float(p == g)
        return v, v
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0, 0.0
    precision, recall = same / len(p), same / len(g)
    return recall, 2 * precision * recall / (precision + recall)


def judge(prediction: str, gold: str, answer_type: str, settings: AnswerSettings = DEFAULT_SETTINGS) -> bool:
    """Whether a normalised prediction is correct: equal normalised forms, except open answers under
    --open-correct recall / f1 (token score >= --open-threshold)."""
    if answer_type != OPEN or not settings.graded_open:
        return prediction == gold
    recall, f1 = token_scores(prediction, gold)
    return (recall if settings.open_correct == "recall" else f1) >= settings.open_threshold - _TOLERANCE


def score_rows(predictions: Sequence[str], labels: Sequence[str], types: Sequence[str],
               settings: AnswerSettings = DEFAULT_SETTINGS) -> dict[str, np.ndarray]:
    """Row by row (answer tables): normalised prediction and label, correct, and token recall / F1 (NaN on rows that
    are not open)."""
    n = len(predictions)
    pn = np.empty(n, dtype=object)
    ln = np.empty(n, dtype=object)
    correct = np.zeros(n, dtype=bool)
    recall = np.full(n, np.nan)
    f1 = np.full(n, np.nan)
    seen: dict[tuple[str, str], str] = {}  # (type, raw) -> normalised: answer tables repeat few distinct answers

    def norm(text: str, answer_type: str) -> str:
        key = (answer_type, text)
        if key not in seen:
            seen[key] = normalize_answer(text, answer_type, settings.empty_set)
        return seen[key]

    for i, (p, g, t) in enumerate(zip(predictions, labels, types)):
        pn[i], ln[i] = norm(p, t), norm(g, t)
        correct[i] = judge(pn[i], ln[i], t, settings)
        if t == OPEN:
            recall[i], f1[i] = token_scores(pn[i], ln[i])
    return {"prediction_norm": pn, "label_norm": ln, "correct": correct, "token_recall": recall, "token_f1": f1}
