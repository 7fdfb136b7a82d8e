"""Typed records shared by datasets, the reader and the analysis: corpus items, queries, and prediction rows.

Everything here is plain Python (no torch), so the analysis side can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CorpusItem:
    """One knowledge-base entry: an image with its report/caption text."""

    id: str
    image: str  # path relative to the dataset directory, e.g. "images/c000001.png"
    text: str
    label: str | None = None  # the grade/class the record states, when known (may be wrong: mislabeled records)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Query:
    """One question about a query image, with its candidate answers and gold label."""

    id: str
    image: str
    question: str
    candidates: tuple[str, ...]
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        return d


@dataclass(frozen=True)
class ContextPrediction:
    """One single-context prediction: the reader's answer for a query given one retrieved item (a row of DESIGN.md's
    context-prediction table). A closed-book prediction is an answer row, not a context row."""

    system: str
    query_id: str
    rank: int
    label: str
    prediction: str
    item_id: str | None = None
    head: str | None = None
    retrieval_score: float | None = None
    probs: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """The final answer of a whole system for one query (a row of the answer table)."""

    system: str
    query_id: str
    prediction: str
    label: str
    probs: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def normalize_answer(text: str) -> str:
    """Answers are compared after strip() + casefold() (DESIGN.md)."""
    return str(text).strip().casefold()
