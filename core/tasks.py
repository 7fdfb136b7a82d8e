"""How each task type becomes reader work and how the reader's outputs become answers: closed questions scored over
their candidates, multi-label queries as one yes/no question per label, open VQA questions answered by generation.
Torch-free.

Multi-label scoring is per label: a query over L labels becomes L requests per context, "Is <label> present?" with
candidates ("yes", "no"), and the predicted set is the labels with p(yes) > 0.5. Scoring whole candidate sets instead
would need 2^L candidates per context (16 384 for ChestMNIST's 14 findings) or a generated list that the reader may
not close; per-label requests share their prompt up to the question (`ScoreRequest.share_prefix`, set where they are
scored): one pass over the context's prefix and L short continuations of "<label> present? ..." per context, each a
one-token, two-candidate score. They train on a yes/no target per label and give every label its own probability,
which is also what the fused answer averages over contexts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence as SequenceABC
from typing import Any, Mapping, Sequence

import numpy as np

from .base.answers import SET
from .base.fusion import fused_labels
from .base.dataset import DatasetMeta
from .base.records import Query, format_label_set
from .reader.prompts import with_legend
YES, NO = "yes", "no"
LABEL_QUESTION = "Is {label} present?"


@dataclass(frozen=True)
class TaskPrompts:
    """A dataset's task type, label set and legend: which queries the reader sees for each dataset query.

    The legend (dataset.yaml `legend`, written by the converters per dataset, e.g. `dxrag data medmnist --legend`)
    is prepended to every question the reader is asked (`prompts.with_legend`), whatever the task type."""

    task: str
    labels: tuple[str, ...]
    legend: Mapping[str, str]
    allow_empty: bool = False

    @classmethod
    def of(cls, meta: DatasetMeta) -> "TaskPrompts":
        return cls(meta.task, tuple(meta.labels), dict(meta.legend), meta.allow_empty)

    def answer_type(self, query: Query) -> str:
        """"set" (multi-label), "open" (free text, generated) or "closed" (scored over candidates)."""
        if self.task == "multilabel":
            return SET
        return query.answer_type

    def prompt_query(self, query: Query) -> Query:
        """A closed or open query as the reader is asked it (legend prepended)."""
        if not self.legend:
            return query
        return dataclasses.replace(query, question=with_legend(query.question, self.legend))

    def label_queries(self, query: Query) -> list[Query]:
        """A multi-label query's per-label yes/no questions, one per label it offers (its candidates, in label-set
        order); each has gold label "yes" when the label is in the query's gold set."""
        return [self.label_query(query, label) for label in self.offered(query)]

    def label_query(self, query: Query, label: str) -> Query:
        return Query(id=query.id, image=query.image, metadata=query.metadata, candidates=(YES, NO),
                     question=with_legend(LABEL_QUESTION.format(label=label), self.legend),
                     label=YES if label in (query.label_set or ()) else NO)

    def offered(self, query: Query) -> tuple[str, ...]:
        """The labels a multi-label query asks about, in label-set order."""
        offered = set(query.candidates)
        return tuple(label for label in self.labels if label in offered)

    def training_queries(self, query: Query) -> list[Query]:
        """What the reader is fine-tuned on for one query: its per-label questions (multi-label) or the query."""
        return self.label_queries(query) if self.task == "multilabel" else [self.prompt_query(query)]

    def training_examples(self, pairs: Sequence[tuple[Query, Any]]) -> "TrainingExamples":
        """The fine-tuning examples of (query, context) pairs: `training_queries` of each, built when read."""
        return TrainingExamples(self, list(pairs))

    def predicted_set(self, query: Query, p_yes: Sequence[float]) -> list[str]:
        """The predicted set from p(yes) of each offered label: the labels with p(yes) > 0.5; when none is and the
        dataset forbids the empty set, the most probable label alone."""
        return fused_labels(self.offered(query), p_yes, self.allow_empty)

    def set_answer(self, query: Query, p_yes: Sequence[float]) -> str:
        """The predicted set's canonical string (`records.format_label_set`; "none" for the empty set)."""
        return format_label_set(self.predicted_set(query, p_yes), self.labels)


class TrainingExamples(SequenceABC):
    """(asked query, context) per `TaskPrompts.training_queries` of each pair, in pair order, built on access: a
    multi-label corpus of N pairs over L labels gives N·L examples without holding N·L queries in memory."""

    def __init__(self, prompts: TaskPrompts, pairs: list[tuple[Query, Any]]):
        self.prompts, self.pairs = prompts, pairs
        self.offered = [prompts.offered(q) if prompts.task == "multilabel" else (None,) for q, _ in pairs]
        self.starts = np.concatenate([[0], np.cumsum([len(o) for o in self.offered])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        query, context = self.pairs[k]
        label = self.offered[k][i - self.starts[k]]
        asked = self.prompts.prompt_query(query) if label is None else self.prompts.label_query(query, label)
        return asked, context

