"""Typed records shared by datasets, the reader and the analysis: corpus items, queries, and prediction rows.

Everything here is plain Python (no torch), so the analysis side can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from .answers import CLOSED, EMPTY_SET, OPEN, SET_SEPARATOR, normalize_closed


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


# A multi-label answer (a set of labels) is one string (answers.SET_SEPARATOR, answers.EMPTY_SET): its members in
# label-set order joined by ", ", or "none" for the empty set. Two sets are equal exactly when these strings are.


@dataclass(frozen=True)
class Query:
    """One question about a query image, with its candidate answers and gold label.

    Multi-label queries (dataset task "multilabel") also carry `label_set`, the gold set in label-set order; their
    `label` is then that set's canonical string (`join_label_set`), filled in when given as "". Open VQA questions
    have `metadata["answer_type"] == "open"` and a free-text `label`.
    """

    id: str
    image: str
    question: str
    candidates: tuple[str, ...]
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)
    label_set: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.label_set is None:
            return
        canonical = join_label_set(self.label_set)
        if self.label == "":
            object.__setattr__(self, "label", canonical)
        elif self.label != canonical:
            raise ValueError(f"query {self.id!r}: label {self.label!r} is not the canonical string {canonical!r} of "
                             f"its label_set {list(self.label_set)}")

    @property
    def answer_type(self) -> str:
        """"open" (free-text answer, answered by generation) or "closed" (answered from `candidates`)."""
        return OPEN if self.metadata.get("answer_type") == OPEN else CLOSED

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        label_set = d.pop("label_set")
        if label_set is not None:
            d["label"] = list(label_set)  # on disk a multi-label query's label is the JSON list of its labels
        return d


@dataclass(frozen=True)
class ContextPrediction:
    """One single-context prediction: the reader's answer for a query given one retrieved item (a row of docs/design.md's
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
    answer_type: str | None = None  # closed | set | open (core/tasks.py); None: closed

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
    answer_type: str | None = None  # closed | set | open (core/tasks.py); None: closed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def join_label_set(members: Iterable[str]) -> str:
    """The canonical string of a label set whose members are already in label-set order."""
    members = list(members)
    return SET_SEPARATOR.join(members) if members else EMPTY_SET


def format_label_set(members: Iterable[str], labels: Sequence[str]) -> str:
    """The canonical string of a set of labels (any order), e.g. a predicted set; ValueError for a member outside
    `labels`."""
    position = {label: i for i, label in enumerate(labels)}
    members = set(members)
    unknown = sorted(members - position.keys())
    if unknown:
        raise ValueError(f"{unknown} not in the label set {list(labels)}")
    return join_label_set(sorted(members, key=position.__getitem__))


def parse_label_set(text: str, labels: Sequence[str]) -> tuple[str, ...] | None:
    """A label set from an answer such as "Effusion, mass" or "none": comma-separated labels compared after
    `answers.normalize_closed`, returned in label-set order; None when a part is not a label (an unparseable answer)."""
    by_norm = {normalize_closed(label): label for label in labels}
    parts = [normalize_closed(p) for p in str(text).split(",")]
    parts = [p for p in parts if p]
    if not parts:
        return None
    if parts == [EMPTY_SET]:
        return ()
    if any(p not in by_norm for p in parts):
        return None
    found = {by_norm[p] for p in parts}
    return tuple(label for label in labels if label in found)
