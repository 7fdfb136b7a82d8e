"""One routing for every task type (lm-eval's requests): `Task` turns a query and its contexts into typed reader
requests (core/reader/requests.py) and the reader's outputs into answers, for prediction (`requests`,
`context_answers`, `fused_answer`), retriever distillation (`judge_requests`, `judge_value`, `gold`, `answer_code`)
and reader fine-tuning (`training_requests`, `validation_requests`) alike; `run_requests` hands each request to the
reader method of its type. Closed questions are scored over their candidates, multi-label queries become one yes/no
question per label, open VQA questions are answered by generation (and judged by their gold answer's tokens).
Torch-free.

Multi-label scoring is per label: a query over L labels becomes L requests per context, "Is <label> present?" with
candidates ("yes", "no"), and the predicted set is the labels with p(yes) > 0.5. Scoring whole candidate sets instead
would need 2^L candidates per context (16 384 for ChestMNIST's 14 findings) or a generated list that the reader may
not close; per-label requests share their prompt up to the question (`ScoreRequest.share_prefix`): one pass over the
context's prefix and L short continuations of "<label> present? ..." per context, each a one-token, two-candidate
score. They train on a yes/no target per label and give every label its own probability, which is also what the
fused answer averages over contexts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence as SequenceABC
from typing import Any, Mapping, Sequence

import numpy as np

from .base.answers import CLOSED, OPEN, SET, normalize_closed
from .base.fusion import fuse, fused_answer, fused_labels, fusion_weights, open_answer
from .base.dataset import DatasetMeta
from .base.records import CorpusItem, Query, format_label_set
from .reader.prompts import with_legend
from .reader.requests import GenerateRequest, ScoreRequest, TargetRequest

YES, NO = "yes", "no"
LABEL_QUESTION = "Is {label} present?"
Request = ScoreRequest | GenerateRequest | TargetRequest
# one context's answer: the prediction and its probs (closed: answer -> p; set: offered label -> p(yes); open: None)
ContextAnswer = tuple[str, dict[str, float] | None]


@dataclass(frozen=True)
class Task:
    """A dataset's task type, label set and legend: what the reader is asked for each dataset query and how its
    outputs become answers.

    The legend (dataset.yaml `legend`, written by the converters per dataset, e.g. `dxrag data medmnist --legend`)
    is prepended to every question the reader is asked (`prompts.with_legend`), whatever the task type.

    `answer_prior` (`with_prior`): weights (training count + 1) by normalised answer that re-weight each prompt's
    distribution over its candidates before answers are chosen and fused (prediction only; distillation's judge is
    unaffected)."""

    task: str
    labels: tuple[str, ...]
    legend: Mapping[str, str]
    allow_empty: bool = False
    answer_prior: Mapping[str, float] | None = None

    @classmethod
    def of(cls, meta: DatasetMeta) -> "Task":
        return cls(meta.task, tuple(meta.labels), dict(meta.legend), meta.allow_empty)

    def with_prior(self, train: Sequence[Query]) -> "Task":
        """This task with prior correction (`inference.prior_correction`): a reader fine-tuned with balanced
        sampling (core/training/finetune.py: every answer drawn equally often) scores as if the answers were
        uniform, so each prompt's p(answer) is multiplied by that answer's frequency among the gold answers of the
        training queries' `asked` questions (closed answers and a multi-label query's per-label yes/no, as the
        fine-tuning examples are) and renormalised: Bayes' rule back to the training split's prior (Saerens et al.,
        2002). Counts are add-one smoothed, so an answer never seen in training keeps a small weight."""
        counts: dict[str, int] = {}
        for query in train:
            if self.answer_type(query) == OPEN:
                continue
            for asked in self.asked(query):
                label = normalize_closed(asked.label)
                counts[label] = counts.get(label, 0) + 1
        return dataclasses.replace(self, answer_prior={label: n + 1.0 for label, n in sorted(counts.items())})

    def _prior_weights(self, candidates: Sequence[str]) -> np.ndarray:
        """`answer_prior`'s weight (training count + 1) of each candidate; 1 for an answer never seen."""
        prior = self.answer_prior or {}
        return np.array([prior.get(normalize_closed(c), 1.0) for c in candidates])

    # ------------------------------------------------------------------------------------------ what is asked

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

    def label_query(self, query: Query, label: str) -> Query:
        """A multi-label query's yes/no question about one label; gold "yes" when the label is in its gold set."""
        return Query(id=query.id, image=query.image, metadata=query.metadata, candidates=(YES, NO),
                     question=with_legend(LABEL_QUESTION.format(label=label), self.legend),
                     label=YES if label in (query.label_set or ()) else NO)

    def offered(self, query: Query) -> tuple[str, ...]:
        """The labels a multi-label query asks about, in label-set order."""
        offered = set(query.candidates)
        return tuple(label for label in self.labels if label in offered)

    def asked(self, query: Query) -> list[Query]:
        """The questions the reader is asked per context: a multi-label query's per-label yes/no questions (one per
        offered label, in label-set order), else the query itself (legend prepended)."""
        if self.answer_type(query) == SET:
            return [self.label_query(query, label) for label in self.offered(query)]
        return [self.prompt_query(query)]

    # ------------------------------------------------------------------------------------------ prediction

    def requests(self, query: Query, contexts: Sequence[CorpusItem | None]) -> list[Request]:
        """The reader requests answering `query` once per context (None: closed-book), context by context, each
        context's `asked` questions in order: `ScoreRequest`s (closed; set, whose questions about one context share
        their prompt's prefix) or `GenerateRequest`s (open)."""
        kind = self.answer_type(query)
        asked = self.asked(query)
        if kind == OPEN:
            return [GenerateRequest(a, c) for c in contexts for a in asked]
        return [ScoreRequest(a, c, share_prefix=kind == SET) for c in contexts for a in asked]

    def per_context(self, query: Query, outputs: Sequence[Any]) -> list[list[Any]]:
        """The reader's outputs of `requests` (or `judge_requests`) grouped by context."""
        n = len(self.asked(query))
        return [list(outputs[i:i + n]) for i in range(0, len(outputs), n)]

    def _probs(self, query: Query, outputs: Sequence[Any]) -> np.ndarray:
        """Per context: closed, the distribution over the candidates (n, C); set, each offered label's p(yes)
        (n, L)."""
        probs = np.stack([np.stack([np.exp(lp) for lp in group]) for group in self.per_context(query, outputs)])
        kind = self.answer_type(query)
        if self.answer_prior is not None:  # (n contexts, asked questions, candidates), each asked alike
            probs = probs * self._prior_weights((YES, NO) if kind == SET else query.candidates)
            probs = probs / probs.sum(axis=-1, keepdims=True)
        return probs[:, :, 0] if kind == SET else probs[:, 0]

    def context_answers(self, query: Query, outputs: Sequence[Any]) -> list[ContextAnswer]:
        """Per context, the answer of the reader's outputs of `requests`: closed, the most probable candidate with
        the distribution; set, the predicted set's canonical string with each offered label's p(yes) (what the
        analysis fuses); open, the generated text (no probs)."""
        kind = self.answer_type(query)
        if kind == OPEN:
            return [(text, None) for text in outputs]
        probs = self._probs(query, outputs)
        if kind == SET:
            offered = self.offered(query)
            return [(self.set_answer(query, p), dict(zip(offered, map(float, p)))) for p in probs]
        cands = list(query.candidates)
        return [(cands[int(p.argmax())], dict(zip(cands, map(float, p)))) for p in probs]

    def fused_answer(self, query: Query, outputs: Sequence[Any], scores: Sequence[float],
                     temperature: float) -> ContextAnswer:
        """The system's answer from the contexts' outputs, weighted by softmax(retrieval `scores` / temperature)
        (core/base/fusion.py): closed, the fused distribution's answer; set, the labels whose fused p(yes) exceeds
        0.5 (probs: the fused p(yes)); open, the generated answer with the largest total weight (no probs)."""
        kind = self.answer_type(query)
        scores = np.asarray(scores)
        if kind == OPEN:
            return open_answer(list(outputs), fusion_weights(scores, temperature)), None
        fused = fuse(self._probs(query, outputs), scores, temperature)
        if kind == SET:
            return self.set_answer(query, fused), dict(zip(self.offered(query), map(float, fused)))
        cands = list(query.candidates)
        return cands[fused_answer(fused, cands)], dict(zip(cands, map(float, fused)))

    def predicted_set(self, query: Query, p_yes: Sequence[float]) -> list[str]:
        """The predicted set from p(yes) of each offered label: the labels with p(yes) > 0.5; when none is and the
        dataset forbids the empty set, the most probable label alone."""
        return fused_labels(self.offered(query), p_yes, self.allow_empty)

    def set_answer(self, query: Query, p_yes: Sequence[float]) -> str:
        """The predicted set's canonical string (`records.format_label_set`; "none" for the empty set)."""
        return format_label_set(self.predicted_set(query, p_yes), self.labels)

    # ------------------------------------------------------------------------------------------ distillation

    def judge_requests(self, query: Query, contexts: Sequence[CorpusItem | None]) -> list[Request]:
        """What the frozen reader is asked to judge each context in retriever distillation: `requests` for closed
        and multi-label queries; an open question's gold answer teacher-forced (`TargetRequest`): no answer is
        generated during distillation."""
        if self.answer_type(query) == OPEN:
            return [TargetRequest(a, c) for c in contexts for a in self.asked(query)]
        return self.requests(query, contexts)

    def judge_value(self, query: Query, outputs: Sequence[Any]) -> np.ndarray:
        """One context's outputs of `judge_requests` as one array (the judge cache's value): a closed question's
        log p over its candidates (C,); a multi-label query's log p of yes/no per label (L, 2); an open question's
        mean per-token gold log p (1,)."""
        kind = self.answer_type(query)
        if kind == OPEN:
            return np.array([outputs[0]])
        rows = [np.asarray(lp) for lp in outputs]
        return rows[0] if kind == CLOSED else np.stack(rows)

    def gold(self, query: Query, value: np.ndarray) -> float:
        """log p_reader(gold | query, context) from a `judge_value`: the gold candidate's; for a multi-label query
        the mean over its labels of log p(the gold yes/no), which ranks contexts like log p(gold set) = the sum, on
        the scale of one decision; for an open question the mean per-token log p of its gold answer."""
        kind = self.answer_type(query)
        if kind == CLOSED:
            return float(value[query.candidates.index(query.label)])
        if kind == SET:
            gold = [0 if label in (query.label_set or ()) else 1 for label in self.offered(query)]
            return float(np.mean(value[np.arange(len(gold)), gold]))
        return float(value[0])

    def answer_code(self, query: Query, value: np.ndarray) -> int:
        """A code of the reader's answer from a `judge_value` (equal codes: the same answer): the best candidate's
        index; the predicted set as a bitmask over the offered labels; 0 for an open question (nothing is generated
        during distillation, so open queries count as consistent)."""
        kind = self.answer_type(query)
        if kind == CLOSED:
            return int(np.argmax(value))
        if kind == SET:
            members = set(self.predicted_set(query, np.exp(value[:, 0])))
            return sum(1 << j for j, label in enumerate(self.offered(query)) if label in members)
        return 0

    # ------------------------------------------------------------------------------------------ fine-tuning

    def training_requests(self, pairs: Sequence[tuple[Query, Any]]) -> "TrainingRequests":
        """The fine-tuning targets of (query, context) pairs: a `TargetRequest` per `asked` question of each pair
        (per-label yes/no answers of a multi-label query, an open question's answer tokens), built when read."""
        return TrainingRequests(self, list(pairs))

    def validation_requests(self, query: Query, context: CorpusItem | None) -> list[ScoreRequest]:
        """The candidate-scored requests of fine-tuning's validation accuracy: `requests` of a closed or multi-label
        query with one context; none for an open question."""
        return [] if self.answer_type(query) == OPEN else self.requests(query, [context])  # type: ignore[return-value]


def run_requests(reader, requests: Sequence[Request], image_root, batch_size: int | None = None) -> list[Any]:
    """Each request answered by the reader method of its type (`ScoreRequest`: `score`, log p over the candidates;
    `GenerateRequest`: `generate`, the text; `TargetRequest`: `gold_logprobs`, the mean per-token gold log p), one
    call per type over all its requests, in input order."""
    methods = ((ScoreRequest, lambda rs: reader.score(rs, image_root, batch_size=batch_size, progress=False)),
               (GenerateRequest, lambda rs: reader.generate(rs, image_root, batch_size=batch_size, progress=False)),
               (TargetRequest, lambda rs: reader.gold_logprobs(rs, image_root, batch_size=batch_size)))
    out: list[Any] = [None] * len(requests)
    for kind, method in methods:
        idx = [i for i, r in enumerate(requests) if type(r) is kind]
        if idx:
            for i, result in zip(idx, method([requests[i] for i in idx])):
                out[i] = result
    return out


class TrainingRequests(SequenceABC):
    """`TargetRequest`s per `Task.asked` question of each (query, context) pair, in pair order, built on access: a
    multi-label corpus of N pairs over L labels gives N·L requests without holding N·L queries in memory."""

    def __init__(self, task: Task, pairs: list[tuple[Query, Any]]):
        self.task, self.pairs = task, pairs
        self.offered = [task.offered(q) if task.answer_type(q) == SET else (None,) for q, _ in pairs]
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
        asked = self.task.prompt_query(query) if label is None else self.task.label_query(query, label)
        return TargetRequest(asked, context)
