"""The distillation judge on multi-label and open questions: the gold score of a label set (mean over labels of
log p(gold yes/no)), of an open answer (the reader's per-token gold log p), and the prediction codes."""

from __future__ import annotations

import numpy as np
import pytest

from dxrag.core.base.records import CorpusItem, Query
from dxrag.core.tasks import Task
from dxrag.core.training.distill import ReaderJudge, inconsistent

LABELS = ("opacity", "effusion", "mass")


class FakeReader:
    """log p(yes) of "Is <label> present?" given item i is fixed per (label, item); open answers' gold score too."""

    def __init__(self):
        self.p_yes = {("opacity", "c0"): 0.9, ("effusion", "c0"): 0.2, ("mass", "c0"): 0.6,
                      ("opacity", "c1"): 0.3, ("effusion", "c1"): 0.8, ("mass", "c1"): 0.1}
        self.open_gold = {"c0": -0.5, "c1": -2.0}
        self.requests = 0
        self.shared = []

    def score(self, requests, image_root, batch_size=None, progress=None):
        self.requests += len(requests)
        self.shared += [r.share_prefix for r in requests]
        out = []
        for r in requests:
            label = r.query.question.split()[1]
            p = self.p_yes[(label, r.context.id)]
            out.append(np.log([p, 1 - p]))
        return out

    def gold_logprobs(self, requests, image_root, batch_size=None):
        self.requests += len(requests)
        return np.array([self.open_gold[r.context.id] for r in requests])


def test_set_gold_is_the_mean_over_labels_and_predictions_code_the_set(tmp_path):
    prompts = Task("multilabel", LABELS, {}, allow_empty=True)
    queries = [Query("q0", "q.png", "Which?", LABELS, "", label_set=("opacity", "mass")),
               Query("q1", "q.png", "Which?", ("effusion", "opacity"), "", label_set=())]
    items = {i: CorpusItem(i, f"{i}.png", "t") for i in ("c0", "c1")}
    reader = FakeReader()
    judge = ReaderJudge(reader, tmp_path, queries, items, task=prompts)
    ids = np.array([["c0", "c1"], ["c0", "c1"]], dtype=object)
    gold = judge.gold_logprobs(np.array([0, 1]), ids)
    assert reader.requests == 2 * 3 + 2 * 2  # one request per (query, item, offered label)
    assert all(reader.shared)  # the per-label questions of one (query, item) share their prompt's prefix pass
    p = reader.p_yes
    assert gold[0, 0] == pytest.approx(np.mean(np.log([p["opacity", "c0"], 1 - p["effusion", "c0"], p["mass", "c0"]])))
    assert gold[1, 1] == pytest.approx(np.mean(np.log([1 - p["opacity", "c1"], 1 - p["effusion", "c1"]])))
    preds = judge.predictions(np.array([0, 1]), ids)
    assert reader.requests == 10  # cached
    # q0 | c0 -> {opacity, mass} = bits 0 and 2; q0 | c1 -> {effusion}; q1 offers (opacity, effusion)
    np.testing.assert_array_equal(preds, [[0b101, 0b010], [0b01, 0b10]])
    np.testing.assert_array_equal(inconsistent(preds), [True, True])


def test_open_gold_is_the_readers_answer_score_and_open_queries_count_as_consistent(tmp_path):
    prompts = Task("vqa", ("yes", "no"), {}, allow_empty=False)
    queries = [Query("o0", "q.png", "What is seen?", (), "a mass", {"answer_type": "open"}),
               Query("c0", "q.png", "Is it?", ("yes", "no"), "no", {"answer_type": "closed"})]
    items = {i: CorpusItem(i, f"{i}.png", "t") for i in ("c0", "c1")}
    reader = FakeReader()
    reader.p_yes.update({("it?", "c0"): 0.7, ("it?", "c1"): 0.4})  # the closed question's "Is it?"
    judge = ReaderJudge(reader, tmp_path, queries, items, task=prompts)
    ids = np.array([["c0", "c1"], ["c0", "c1"]], dtype=object)
    gold = judge.gold_logprobs(np.array([0, 1]), ids)
    np.testing.assert_allclose(gold[0], [-0.5, -2.0])
    np.testing.assert_allclose(gold[1], np.log([0.3, 0.6]), rtol=1e-6)
    np.testing.assert_array_equal(judge.predictions(np.array([0, 1]), ids), [[0, 0], [0, 1]])
