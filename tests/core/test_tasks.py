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
