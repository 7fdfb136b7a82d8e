"""The fusion rule: how one query's per-context reader outputs become the system's answer, for every answer type.

The weight of a context is softmax(retrieval score / temperature) over the query's contexts (docs/design.md,
inference). Closed questions average the per-context distributions over their candidates and pick the most probable
answer (`fuse`, `fused_answer`); multi-label queries average each label's p(yes) and keep the labels above
`PRESENT` (`fused_labels`); open questions vote: the generated answer whose normalised form has the largest total
weight (`open_answer`). The pipeline (core/stages.py) writes its answers with these functions and the analysis'
`fusion` selector (analysis/selectors.py) reproduces them from the logged context rows, so the two cannot drift.
Torch-free, numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .answers import normalize_closed, normalize_open

FUSION_TIE_TOL = 1e-12  # fused values this close to the maximum count as tied
PRESENT = 0.5  # a label is predicted present when its (fused) p(yes) exceeds this


@dataclass(frozen=True)
class FusionSettings:
    """`inference.fusion` of the run config. `temperature` divides the retrieval scores before the softmax that
    weighs the contexts; its default is the distillation's default `distill.tau_retriever`, the temperature the
    pipeline used for fusion before fusion had a setting of its own."""

    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"fusion.temperature must be > 0, got {self.temperature}")


def fusion_weights(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(retrieval score / temperature) along the last axis; -inf scores (absent contexts) get weight 0."""
    scores = np.asarray(scores, dtype=np.float64)
    w = np.exp((scores - scores.max(axis=-1, keepdims=True)) / temperature)
    return w / w.sum(axis=-1, keepdims=True)


def fuse(probs: np.ndarray, scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """One query's fused distribution: per-context distributions `probs` (n contexts × C candidates) weighted by
    softmax(retrieval `scores` (n,) / temperature) over its n contexts (docs/design.md, inference). Returns (C,).
    Multi-label queries fuse their per-label p(yes) (n contexts × L labels) the same way."""
    return (fusion_weights(scores, temperature)[:, None] * np.asarray(probs, dtype=np.float64)).sum(axis=0)


def fused_answer(fused: np.ndarray, candidates: Sequence[str]) -> int:
    """Index of the answer a fused distribution picks. The tie rule (the vectorised `fusion` selector applies the
    same): every candidate within FUSION_TIE_TOL of the maximum is tied, and the one whose normalised answer
    (strip + casefold) sorts first wins, so the choice depends neither on the candidates' order nor on the last
    bits of the floating-point sums."""
    fused = np.asarray(fused, dtype=np.float64)
    tied = np.flatnonzero(fused >= fused.max() - FUSION_TIE_TOL)
    return int(min(tied, key=lambda i: (normalize_closed(candidates[i]), i)))


def fused_labels(labels: Sequence[str], p_yes: Sequence[float], allow_empty: bool) -> list[str]:
    """The predicted label set from each label's p(yes) (one context's, or fused over contexts), `labels` in
    label-set order: the labels with p(yes) > PRESENT; when none is and the empty set is not allowed, the most
    probable label alone (the first in label-set order on a tie)."""
    p = np.asarray(p_yes, dtype=np.float64)
    members = [label for label, v in zip(labels, p) if v > PRESENT]
    if not members and not allow_empty:
        members = [labels[int(np.argmax(p))]]
    return members


def open_answer(texts: Sequence[str], weights: Sequence[float]) -> str:
    """The fused answer of an open question over its contexts: the generated answer whose normalised form
    (answers.normalize_open, as analyze-oracle compares open answers) has the largest total fusion weight; within
    FUSION_TIE_TOL of it, the best-ranked context's answer."""
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (text, w) in enumerate(zip(texts, weights)):
        key = normalize_open(text)
        totals[key] = totals.get(key, 0.0) + float(w)
        first.setdefault(key, i)
    best = max(totals.values())
    tied = [k for k, v in totals.items() if v >= best - FUSION_TIE_TOL]
    return texts[min(first[k] for k in tied)]
