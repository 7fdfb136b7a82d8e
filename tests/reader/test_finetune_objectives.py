"""Tests of the reader fine-tuning settings that fight a collapse to the majority class (issue 20): the candidates
loss (classification cross-entropy over the candidates, as answers are scored) and class-balanced sampling."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.reader.model import Reader, ReaderError, ScoreRequest, TargetRequest  # noqa: E402
from dxrag.core.reader.settings import FinetuneSettings, ReaderSettings  # noqa: E402
from dxrag.core.training.finetune import finetune, sampling_order  # noqa: E402

from .conftest import LABELS, context_for  # noqa: E402
from .test_model import MULTI  # noqa: E402


def _examples(ds, n=6, candidates=None):
    out = []
    for i, q in enumerate(ds.queries["val"][:n]):
        context = None if i % 2 else context_for(ds, q)
        if candidates is not None:
            q = dataclasses.replace(q, candidates=candidates, label=candidates[i % len(candidates)])
        out.append(TargetRequest(q, context))
    return out


@pytest.mark.parametrize("candidates", [None, MULTI])
def test_candidate_loss_is_the_cross_entropy_of_the_scores(tiny_reader, toy_dataset, candidates):
    """Single-token candidates (one pass) and multi-token ones (a pass per candidate): the loss is the mean of
    -log softmax(score)[gold], the scores `Reader.score` gives; the answer loss is something else."""
    examples = _examples(toy_dataset, candidates=candidates)
    scores = tiny_reader.score([ScoreRequest(r.query, r.context) for r in examples], toy_dataset.root)
    want = -np.mean([s[list(r.query.candidates).index(r.query.label)] for s, r in zip(scores, examples)])
    with torch.no_grad():
        got = float(tiny_reader.candidate_loss(examples, toy_dataset.root))
        other = float(tiny_reader.answer_loss(examples, toy_dataset.root))
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(other - want) > 1e-3


def test_candidate_loss_needs_the_gold_label_among_the_candidates(tiny_reader, toy_dataset):
    q, c = _examples(toy_dataset)[0].query, _examples(toy_dataset)[0].context
    bad = dataclasses.replace(q, candidates=tuple(x for x in q.candidates if x != q.label))
    with pytest.raises(ReaderError, match="not among the candidates"):
        tiny_reader.candidate_loss([TargetRequest(bad, c)], toy_dataset.root)


def test_finetune_with_candidates_loss_learns_the_task(toy_dataset):
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset, seed=1)
    examples = [TargetRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["train"]]
    val = [ScoreRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["val"]]
    calls = Counter()
    real = Reader.candidate_loss

    def counting(self, batch, root):
        calls["n"] += 1
        return real(self, batch, root)

    Reader.candidate_loss = counting
    try:
        history = finetune(reader, examples, toy_dataset.root,
                           FinetuneSettings(steps=60, eval_every=0, loss="candidates"), val_requests=val)
    finally:
        Reader.candidate_loss = real
    assert calls["n"] == 60  # the configured objective is the one trained
    assert history.losses[-1] < history.losses[0] / 4
    assert history.val_accuracy[-1] >= 0.9


def test_balanced_sampling_draws_each_answer_equally_often(toy_dataset):
    q = toy_dataset.queries["train"][0]
    examples = ([TargetRequest(dataclasses.replace(q, label="yes"), None)] * 90
                + [TargetRequest(dataclasses.replace(q, label="no"), None)] * 10)
    rng = np.random.default_rng(0)
    plain = Counter(examples[i].query.label for i in sampling_order(examples, rng, False))
    assert plain == {"yes": 90, "no": 10}  # a permutation: the split's prior
    drawn = Counter(examples[i].query.label for _ in range(20) for i in sampling_order(examples, rng, True))
    assert abs(drawn["no"] / 2000 - 0.5) < 0.05


def test_default_settings_keep_todays_training(toy_dataset):
    """loss "answer" and no balancing are the defaults, and a checkpoint written without the new keys resumes."""
    from dxrag.core.training.finetune import _resume_key

    settings = FinetuneSettings()
    assert settings.loss == "answer" and settings.balanced_sampling is False
    assert "loss" not in _resume_key(settings, 0) and "balanced_sampling" not in _resume_key(settings, 0)
    assert _resume_key(dataclasses.replace(settings, loss="candidates"), 0)["loss"] == "candidates"


def test_unknown_loss_is_rejected(toy_dataset):
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset)
    examples = [TargetRequest(q, None) for q in toy_dataset.queries["train"][:4]]
    with pytest.raises(ReaderError, match="loss 'focal'"):
        finetune(reader, examples, toy_dataset.root, FinetuneSettings(steps=1, loss="focal"))
    with pytest.raises(ValueError, match="reader.finetune.loss"):
        ReaderSettings(finetune=FinetuneSettings(loss="focal")).check()
    assert set(LABELS) >= {r.query.label for r in examples}


def test_half_precision_on_cpu_without_onednn_is_warned_about(toy_dataset, monkeypatch, caplog):
    """Under the reproducible avx2 kernel pin oneDNN is off, and bf16 matmuls on CPU crawl (issue 20: 215 s per
    projector step instead of ~5 s): the reader says so and what to set."""
    import logging

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with caplog.at_level(logging.WARNING):
        Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset)
    assert "DXRAG_CPU_KERNELS=native" not in caplog.text
    with caplog.at_level(logging.WARNING):
        Reader.from_config(ReaderSettings(model="tiny", device="cpu", autocast="bfloat16"), dataset=toy_dataset)
    assert "DXRAG_CPU_KERNELS=native" in caplog.text
