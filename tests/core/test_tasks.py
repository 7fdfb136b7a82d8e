"""One routing (core/tasks.py): prediction (`stages.predict`), retriever distillation (`ReaderJudge`) and reader
fine-tuning (`stages.reader`: training targets and validation requests) ask the reader the same questions for the
same (query, context), on a multi-label and on an open/closed VQA dataset. The reader is a recorder: each user's
requests are captured where they reach a reader method."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")

from dxrag.core import stages  # noqa: E402
from dxrag.core.base.dataset import load_dataset  # noqa: E402
from dxrag.core.config import load_config  # noqa: E402
from dxrag.core.reader.requests import GenerateRequest, ScoreRequest, TargetRequest  # noqa: E402
from dxrag.core.tasks import Task  # noqa: E402
from dxrag.core.base.records import Query  # noqa: E402
from dxrag.core.run import RunDir  # noqa: E402
from dxrag.core.training.distill import ReaderJudge  # noqa: E402

from task_fixtures import multilabel_dataset, open_vqa_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A reader that records every request by method and answers with fixed outputs."""

    tower_cache = None

    def __init__(self):
        self.seen: dict[str, list] = {"score": [], "generate": [], "gold_logprobs": []}

    def score(self, requests, image_root, batch_size=None, progress=None):
        self.seen["score"] += requests
        return [np.log(np.full(len(r.answers), 1 / len(r.answers))) for r in requests]

    def generate(self, requests, image_root, batch_size=None, progress=None):
        self.seen["generate"] += requests
        return ["a mass"] * len(requests)

    def gold_logprobs(self, requests, image_root, batch_size=None):
        self.seen["gold_logprobs"] += requests
        return np.zeros(len(requests))

    def save(self, out):
        return out


class Retriever:
    """Every query retrieves the same two corpus items from each head."""

    def __init__(self, ds):
        self.ids = [ds.corpus[0].id, ds.corpus[1].id]

    def search(self, embeddings, n, exclude):
        return {head: [[(i, 1.0 - 0.1 * k) for k, i in enumerate(self.ids[:n])] for _ in exclude]
                for head in embeddings}


def _users(tmp_path: Path, data: Path, monkeypatch, answer_type: str):
    """The requests of one query (the first training query of `answer_type`) with one context (corpus item 0), as
    each user built them: (predict, distillation, fine-tuning targets, fine-tuning validation)."""
    ds = stages.answerable(load_dataset(data))
    ds.queries["test"] = ds.queries["train"]  # predict on the training queries: the same queries in every user
    cfg = load_config(REPO / "configs" / "embedded.yaml",
                      {"inference.top_n": 1, "reader.finetune.contexts_per_head": 1})
    ctx = stages.RunContext(cfg, RunDir(tmp_path / "run"), tmp_path / "report")
    retriever = Retriever(ds)
    n = len(ds.queries["train"])
    q = SimpleNamespace(frozen={s: np.zeros((n, 2)) for s in ("train", "val", "test")},
                        pixels={s: np.zeros((n, 2)) for s in ("train", "val", "test")},
                        exclude={s: [set()] * len(ds.queries[s]) for s in ("train", "val", "test")})
    towers = {h: SimpleNamespace(embed=lambda pixels: pixels) for h in stages.HEADS}
    task = Task.of(ds.meta)
    index = next(i for i, x in enumerate(ds.queries["train"]) if task.answer_type(x) == answer_type)
    query, item = ds.queries["train"][index], ds.corpus[0]

    def of(requests):
        return [r for r in requests if r.query.id == query.id and r.context is not None and r.context.id == item.id]

    predict = Recorder()
    stages.predict(ctx, ds, retriever, predict, q, towers, "test", tmp_path / "predictions")
    # the rag system asks once per head (the same item from both): its first context's requests
    predicted = of(predict.seen["score"] + predict.seen["generate"])
    predicted = predicted[:len(predicted) // 4]  # rag and joint, image and text head: four times the same requests

    judged = Recorder()
    ReaderJudge(judged, ds.root, ds.queries["train"], ds.corpus_by_id(), task=Task.of(ds.meta)).gold_logprobs(
        np.array([index]), np.array([[item.id]], dtype=object))
    judged = of(judged.seen["score"] + judged.seen["gold_logprobs"])

    caught = {}

    def finetune(model, examples, root, settings, val_requests=(), **kw):
        caught["examples"], caught["val"] = list(examples), list(val_requests)
        return SimpleNamespace(to_json=lambda: {})

    monkeypatch.setattr("dxrag.core.training.finetune.finetune", finetune)
    monkeypatch.setattr("dxrag.core.reader.model.Reader.from_config", lambda *a, **k: Recorder())
    ds.queries["val"] = ds.queries["train"]  # validate on the same queries
    q.frozen["val"], q.exclude["val"] = q.frozen["train"], q.exclude["train"]
    stages.reader(ctx, ds, retriever, q)
    return task, query, predicted, judged, of(caught["examples"])[:len(predicted)], of(caught["val"])


def test_predict_distillation_and_finetuning_ask_the_same_for_a_multilabel_query(tmp_path, monkeypatch):
    task, query, predicted, judged, targets, val = _users(tmp_path, multilabel_dataset(tmp_path / "data"),
                                                          monkeypatch, "set")
    assert len(predicted) == len(task.offered(query)) > 1
    assert all(type(r) is ScoreRequest and r.share_prefix for r in predicted)
    assert predicted == judged == val
    assert targets == [TargetRequest(r.query, r.context) for r in predicted]


def test_predict_distillation_and_finetuning_ask_the_same_for_open_and_closed_questions(tmp_path, monkeypatch):
    data = open_vqa_dataset(tmp_path / "data")
    for kind in ("open", "closed"):
        task, query, predicted, judged, targets, val = _users(tmp_path / kind, data, monkeypatch, kind)
        assert task.answer_type(query) == kind and len(predicted) == 1
        if kind == "open":
            assert [type(r) for r in predicted + judged] == [GenerateRequest, TargetRequest]
            assert judged == targets == [TargetRequest(r.query, r.context) for r in predicted] and val == []
        else:
            assert type(predicted[0]) is ScoreRequest and not predicted[0].share_prefix
            assert predicted == judged == val
            assert targets == [TargetRequest(r.query, r.context) for r in predicted]


# ------------------------------------------------------------------------------------------ prior correction

def _query(label, candidates=("yes", "no"), answer_type="closed"):
    return Query(id=f"q-{label}", image="x.png", question="Malignant?", candidates=candidates, label=label,
                 metadata={"answer_type": answer_type})


def test_prior_correction_reweights_each_context_by_the_training_answer_counts():
    """Training answers 3 x "no", 1 x "yes" give weights 4 and 2 (add-one): p(yes) = 0.6 becomes
    0.6*2 / (0.6*2 + 0.4*4) = 0.43, so the answer turns to "no"; the fused answer fuses the corrected contexts; an
    answer never seen in training weighs 1."""
    task = Task("binary", ("yes", "no"), {})
    prior = task.with_prior([_query("no"), _query("No "), _query("no"), _query("yes"),
                             _query("ignored", (), "open")])
    assert prior.answer_prior == {"no": 4.0, "yes": 2.0} and task.answer_prior is None
    q = _query("yes")
    outputs = [np.log([0.6, 0.4]), np.log([0.9, 0.1])]
    assert [a for a, _ in task.context_answers(q, outputs)] == ["yes", "yes"]
    (first, p1), (second, p2) = prior.context_answers(q, outputs)
    assert first == "no" and p1["yes"] == pytest.approx(1.2 / 2.8)
    assert second == "yes" and p2["yes"] == pytest.approx(1.8 / 2.2)
    fused, probs = prior.fused_answer(q, outputs, [1.0, 1.0], 1.0)
    assert probs["yes"] == pytest.approx((1.2 / 2.8 + 1.8 / 2.2) / 2) and fused == "yes"
    unseen = _query("maybe", ("yes", "maybe"))
    assert prior.context_answers(unseen, [np.log([0.4, 0.6])])[0][1]["yes"] == pytest.approx(0.8 / 1.4)


def test_prior_correction_of_a_multilabel_query_uses_the_per_label_yes_no_counts():
    task = Task("multilabel", ("a", "b"), {})
    train = [Query(id=f"t{i}", image="x.png", question="Findings?", candidates=("a", "b"), label="",
                   label_set=members) for i, members in enumerate([("a",), (), ()])]
    prior = task.with_prior(train)  # 6 per-label answers: 1 yes, 5 no
    assert prior.answer_prior == {"yes": 2.0, "no": 6.0}
    q = Query(id="q", image="x.png", question="Findings?", candidates=("a", "b"), label="", label_set=("a",))
    outputs = [np.log([0.8, 0.2]), np.log([0.5, 0.5])]  # p(yes) of a, of b
    answer, probs = prior.context_answers(q, outputs)[0]
    assert probs["a"] == pytest.approx(1.6 / 2.8) and probs["b"] == pytest.approx(0.25) and answer == "a"


def test_predict_logs_corrected_answers_under_prior_correction(tmp_path):
    """`inference.prior_correction` in the prediction stage: every logged context distribution (and closed-book
    answer) is the uncorrected run's re-weighted by the training answer counts, and every answer its most probable
    candidate."""
    class Skewed(Recorder):  # nearly uniform, the last candidate a little more probable
        def score(self, requests, image_root, batch_size=None, progress=None):
            return [np.log(np.linspace(1, 1.01, len(r.answers)) / np.linspace(1, 1.01, len(r.answers)).sum())
                    for r in requests]

    ds = stages.answerable(load_dataset(open_vqa_dataset(tmp_path / "data")))
    n = max(len(qs) for qs in ds.queries.values())
    zeros = {s: np.zeros((n, 2)) for s in ds.queries}
    q = SimpleNamespace(frozen=zeros, pixels=zeros, exclude={s: [set()] * len(ds.queries[s]) for s in ds.queries})
    towers = {h: SimpleNamespace(embed=lambda pixels: pixels) for h in stages.HEADS}
    logs = {}
    for on in (False, True):
        cfg = load_config(REPO / "configs" / "embedded.yaml", {"inference.top_n": 1, "inference.prior_correction": on,
                                                               "reader.finetune.balanced_sampling": True})
        ctx = stages.RunContext(cfg, RunDir(tmp_path / f"run-{on}"), tmp_path / "report")
        logs[on] = {(r["kind"], r["system"], r["query_id"], r.get("rank")): r
                    for r in stages.predict(ctx, ds, Retriever(ds), Skewed(), q, towers, "test", tmp_path / f"p-{on}")}
    weights = Task.of(ds.meta).with_prior(ds.queries["train"]).answer_prior
    changed = 0
    for key, row in logs[True].items():
        before = logs[False][key]
        if not before.get("probs"):  # open answers: generated, not re-weighted
            assert row["prediction"] == before["prediction"]
            continue
        assert row["prediction"] == max(row["probs"], key=row["probs"].get)
        if key[0] == "answer" and key[1] != "closed-book":  # fused from the corrected contexts (checked above)
            continue
        expected = {c: p * weights.get(c, 1.0) for c, p in before["probs"].items()}
        total = sum(expected.values())
        assert row["probs"] == pytest.approx({c: p / total for c, p in expected.items()})
        changed += row["prediction"] != before["prediction"]
    assert changed > 0
