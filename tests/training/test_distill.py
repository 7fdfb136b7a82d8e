"""Retriever distillation on a toy problem: the real QueryTower, CorpusIndex, ReaderJudge, DistillTask and train_head
over a linear 'encoder' and a fake reader whose per-(query, item) judgement is known in closed form. Seconds, no model.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dxrag.core.base.records import CorpusItem, Query
from dxrag.core.retrieval.heads import QueryTower
from dxrag.core.retrieval.index import build_index
from dxrag.core.training.distill import DistillTask, ReaderJudge, inconsistent, train_head
from dxrag.core.training.checkpoint import save_checkpoint

D_IN, DIM, N_ITEMS, N_QUERIES, K = 16, 8, 80, 64, 10
CANDIDATES = ("yes", "no")
SHARPNESS = 6.0  # fake reader: logit of the gold answer = SHARPNESS * <u_q, d_i>


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class CountingReader:
    """Stands in for `Reader.score`: log-softmax over the candidates, where the gold answer's logit is
    SHARPNESS·<u_q, d_i> for a hidden per-query direction u_q, the other answer's 0. Counts forwards (requests)."""

    def __init__(self, targets: dict[str, np.ndarray], docs: dict[str, np.ndarray]):
        self.targets, self.docs = targets, docs
        self.forwards = 0

    def logprobs(self, query: Query, item_id: str) -> np.ndarray:
        logits = np.zeros(len(query.candidates))
        logits[query.candidates.index(query.label)] = SHARPNESS * float(self.targets[query.id] @ self.docs[item_id])
        return (logits - np.logaddexp.reduce(logits)).astype(np.float32)

    def score(self, requests, image_root, batch_size=None, progress=None):
        self.forwards += len(requests)
        return [self.logprobs(r.query, r.context.id) for r in requests]


@pytest.fixture()
def toy(tmp_path):
    """A toy retrieval problem: corpus embeddings, query 'pixels' (feature vectors), a linear encoder whose query
    embedding is W0·x, and a reader that prefers the items along M·x for a hidden M != W0."""
    rng = np.random.default_rng(0)
    docs = _unit(rng.normal(size=(N_ITEMS, DIM)))
    ids = [f"c{i:03d}" for i in range(N_ITEMS)]
    x = rng.normal(size=(N_QUERIES, D_IN)).astype(np.float32)
    hidden = rng.normal(size=(DIM, D_IN)).astype(np.float32)
    targets = _unit(x @ hidden.T)
    queries = [Query(f"q{j:03d}", f"q{j:03d}.png", "malignant?", CANDIDATES, CANDIDATES[j % 2]) for j in range(N_QUERIES)]
    items = {i: CorpusItem(i, f"{i}.png", f"report {i}") for i in ids}
    index = build_index(tmp_path / "index", docs, ids, encoder_name="toy", encoder_weights_hash="0", head="text",
                        corpus_checksum="toy")
    torch.manual_seed(0)
    visual = torch.nn.Linear(D_IN, DIM, bias=False)
    encoder = types.SimpleNamespace(name="toy", weights_hash="0", dim=DIM, visual=visual)
    reader = CountingReader({q.id: t for q, t in zip(queries, targets)}, dict(zip(ids, docs)))
    # every query excludes one item, as the pipeline excludes items showing the query's own image
    exclude = [{ids[j % N_ITEMS]} for j in range(N_QUERIES)]
    return types.SimpleNamespace(encoder=encoder, index=index, reader=reader, queries=queries, items=items,
                                 pixels=torch.from_numpy(x), exclude=exclude, tmp=tmp_path)


def make_task(toy, alpha: float = 1.0, **kw) -> DistillTask:
    judge = ReaderJudge(toy.reader, toy.tmp, toy.queries, toy.items, batch_size=16)
    tower = QueryTower(toy.encoder, "text", alpha=alpha)
    return DistillTask(tower, toy.index, judge, toy.pixels, toy.exclude, candidates=K,
                       **{"tau_gold": 0.1, "tau_retriever": 0.1, **kw})


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def reference_kl(task: DistillTask, batch, ids, prior, gold) -> np.ndarray:
    """Per-query KL(P_gold ‖ P_ret) in float64 NumPy, straight from docs/design.md's definition."""
    with torch.no_grad():
        q = task.tower(task.pixels[batch]).numpy().astype(np.float64)
    docs = np.asarray(task.index.embeddings, dtype=np.float64)[task.index.rows(ids.reshape(-1))].reshape(*ids.shape, -1)
    log_ret = _log_softmax(np.einsum("bd,bkd->bk", q, docs) / task.tau_retriever)
    log_gold = _log_softmax(gold / task.tau_gold + task.prior_tilt * prior / task.tau_retriever)
    return (np.exp(log_gold) * (log_gold - log_ret)).sum(axis=-1)


def mean_kl_and_top_mass(task: DistillTask, batch, ids, prior, gold) -> tuple[float, float]:
    """Mean KL and the mean P_ret mass on each query's P_gold-best candidate, for fixed candidates."""
    with torch.no_grad():
        kl = float(task.loss(batch, ids, prior, gold))
        q = task.tower(task.pixels[batch])
        docs = task.docs[torch.from_numpy(task.index.rows(ids.reshape(-1)))].view(*ids.shape, -1)
        p_ret = F.softmax(torch.einsum("bd,bkd->bk", q, docs) / task.tau_retriever, dim=-1).numpy()
    best = task.gold_distribution(gold, prior).numpy().argmax(axis=1)
    return kl, float(p_ret[np.arange(len(best)), best].mean())


# ---------------------------------------------------------------------------------------------- the loss itself


@pytest.mark.parametrize("prior_tilt", [0.0, 0.5])
def test_loss_is_kl_from_gold_to_retriever(toy, prior_tilt):
    """The loss is KL(P_gold ‖ P_ret) with P_gold tilted by +prior_tilt·prior/τ_r. The reference is checked to differ
    clearly from the swapped KL, the untilted and the wrongly signed tilt, so each of those bugs fails here."""
    task = make_task(toy, alpha=0.5, prior_tilt=prior_tilt)
    batch = np.arange(24)
    ids, prior = task.retrieve(batch)
    gold = task.judge.gold_logprobs(batch, ids)
    expected = reference_kl(task, batch, ids, prior, gold).mean()
    assert task.loss(batch, ids, prior, gold).item() == pytest.approx(expected, rel=1e-4)

    with torch.no_grad():
        q = task.tower(task.pixels[batch]).numpy().astype(np.float64)
    docs = np.asarray(task.index.embeddings, np.float64)[task.index.rows(ids.reshape(-1))].reshape(*ids.shape, -1)
    log_ret = _log_softmax(np.einsum("bd,bkd->bk", q, docs) / task.tau_retriever)
    log_gold = _log_softmax(gold / task.tau_gold + prior_tilt * prior / task.tau_retriever)
    swapped = (np.exp(log_ret) * (log_ret - log_gold)).sum(-1).mean()
    assert abs(swapped - expected) > 0.05 * expected
    if prior_tilt:
        for tilt in (0.0, -prior_tilt):
            wrong = _log_softmax(gold / task.tau_gold + tilt * prior / task.tau_retriever)
            assert abs((np.exp(wrong) * (wrong - log_ret)).sum(-1).mean() - expected) > 0.05 * expected


def test_prior_tilt_pulls_p_gold_toward_the_snapshot_ranking(toy):
    """With a judge that cannot tell the candidates apart, the tilted P_gold is the snapshot's own softmax: highest
    on its rank-1 candidate; untilted it is uniform."""
    batch = np.arange(8)
    flat = np.zeros((len(batch), K), dtype=np.float32)
    task = make_task(toy, prior_tilt=1.0)
    ids, prior = task.retrieve(batch)
    assert (np.diff(prior, axis=1) <= 0).all() and (prior[:, 0] > prior[:, -1]).all()  # best first
    p = task.gold_distribution(flat, prior).numpy()
    np.testing.assert_allclose(p, np.exp(_log_softmax(prior / task.tau_retriever)), rtol=1e-5)
    assert (p[:, 0] > p[:, -1]).all()
    untilted = make_task(toy, prior_tilt=0.0).gold_distribution(flat, prior).numpy()
    np.testing.assert_allclose(untilted, 1.0 / K, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- training


def test_training_lowers_the_kl_and_moves_p_ret_toward_p_gold(toy):
    task = make_task(toy, alpha=1.0)
    batch = np.arange(N_QUERIES)
    ids, prior = task.retrieve(batch)  # fixed candidates from the untrained snapshot
    gold = task.judge.gold_logprobs(batch, ids)
    kl0, mass0 = mean_kl_and_top_mass(task, batch, ids, prior, gold)
    history = train_head(task, steps=80, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=10, seed=0)
    kl1, mass1 = mean_kl_and_top_mass(task, batch, ids, prior, gold)
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    assert mass1 > mass0 + 0.1, (mass0, mass1)
    assert np.mean(history["loss"][-10:]) < np.mean(history["loss"][:10])
    assert len(history["inconsistent_fraction"]) == 80
    # the trained head also retrieves better by the reader's own judgement: mean gold log-prob of the top-1 item
    fresh_ids, _ = make_task(toy).retrieve(batch)
    task.refresh_snapshot()
    trained_ids, _ = task.retrieve(batch)
    judge = task.judge
    assert judge.gold_logprobs(batch, trained_ids[:, :1]).mean() > judge.gold_logprobs(batch, fresh_ids[:, :1]).mean()


def test_default_training_is_the_unweighted_batchmean_kl(toy):
    """inconsistency_weighting=none leaves training exactly as before: same weights and losses, bit for bit, as a
    loop whose loss is the plain batch-mean KL(P_gold ‖ P_ret) (the pre-weighting code's loss)."""

    class PlainKL(DistillTask):
        def loss(self, batch, ids, prior, gold, weights=None):
            q = self.tower(self.pixels[batch].to(self.device))
            docs = self.docs[torch.from_numpy(self.index.rows(ids.reshape(-1)))].view(*ids.shape, -1)
            log_p_ret = F.log_softmax(torch.einsum("bd,bkd->bk", q, docs.to(self.device)) / self.tau_retriever, -1)
            gold_logits = torch.from_numpy(gold) / self.tau_gold
            if self.prior_tilt:
                gold_logits = gold_logits + self.prior_tilt * torch.from_numpy(prior) / self.tau_retriever
            return F.kl_div(log_p_ret, F.softmax(gold_logits, dim=-1), reduction="batchmean")

    runs = []
    for cls in (DistillTask, PlainKL):
        torch.manual_seed(1)
        judge = ReaderJudge(toy.reader, toy.tmp, toy.queries, toy.items)
        task = cls(QueryTower(toy.encoder, "text", alpha=0.5), toy.index, judge, toy.pixels, toy.exclude,
                   candidates=K, prior_tilt=0.3)
        history = train_head(task, steps=12, batch_size=16, lr=0.05, weight_decay=0.01, refresh_every=4, seed=3)
        runs.append((history["loss"], [p.detach().clone() for p in task.tower.trainable_parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_train_head_resumes_from_its_checkpoint(toy):
    """Stopping after 6 of 12 steps and resuming gives the same head as 12 steps at once."""
    whole = make_task(toy, alpha=0.5)
    train_head(whole, steps=12, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=4, seed=0)
    part = make_task(toy, alpha=0.5)
    ckpt = toy.tmp / "ckpt"
    train_head(part, steps=6, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=4, seed=0,
               checkpoint_dir=ckpt, checkpoint_every=6)
    resumed = make_task(toy, alpha=0.5)
    history = train_head(resumed, steps=12, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=4, seed=0,
                         checkpoint_dir=ckpt, checkpoint_every=6)
    assert len(history["loss"]) == 12
    for a, b in zip(whole.tower.trainable_parameters(), resumed.tower.trainable_parameters()):
        torch.testing.assert_close(a, b)


class BatchSensitiveReader(CountingReader):
    """Like a real reader, its scores move a little with the other requests of the batch (padding, blocked
    matmuls): here by 1e-6 x the batch's size."""

    def score(self, requests, image_root, batch_size=None, progress=None):
        self.forwards += len(requests)
        return [self.logprobs(r.query, r.context.id) + np.float32(1e-6 * len(requests)) for r in requests]


def test_killed_and_resumed_distillation_equals_the_uninterrupted_one(toy):
    """The judge cache travels with the checkpoint: after a resume every pair keeps the score it was given before
    the kill, so the head is bit-identical (without it the resumed run rescored those pairs in other batches), and
    the resumed run asks the reader only for pairs it has not seen."""
    toy.reader = BatchSensitiveReader(toy.reader.targets, toy.reader.docs)
    kw = dict(steps=12, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=4, seed=0)
    whole = make_task(toy, alpha=0.5)
    history = train_head(whole, **kw)
    total = toy.reader.forwards
    part = make_task(toy, alpha=0.5)
    ckpt = toy.tmp / "ckpt"
    train_head(part, **{**kw, "steps": 6}, checkpoint_dir=ckpt, checkpoint_every=6)
    before_kill = toy.reader.forwards - total
    resumed = make_task(toy, alpha=0.5)
    resumed_history = train_head(resumed, **kw, checkpoint_dir=ckpt, checkpoint_every=6)
    for a, b in zip(whole.tower.trainable_parameters(), resumed.tower.trainable_parameters()):
        assert torch.equal(a, b)
    assert resumed_history["loss"] == history["loss"]
    assert toy.reader.forwards - total == whole.judge.calls  # scored once over kill and resume, as uninterrupted
    assert resumed.judge.calls == whole.judge.calls and before_kill < whole.judge.calls
    assert sum(resumed_history["judge_scored"]) == whole.judge.calls
    assert sum(resumed_history["judge_pairs"]) == 12 * 16 * K


def test_judge_cache_round_trips_every_shape_and_dtype(toy):
    judge = ReaderJudge(toy.reader, toy.tmp, toy.queries, toy.items)
    judge.cache = {(0, "c001"): np.array([-0.1, -2.3], dtype=np.float32),  # a closed question's candidates
                   (1, "c002"): np.array([[-0.5, -0.9], [-1.5, -0.2], [-0.7, -0.7]], dtype=np.float32),  # set
                   (2, "c003"): np.array([-0.25], dtype=np.float32)}  # an open question's gold
    judge.calls = 3
    again = ReaderJudge(toy.reader, toy.tmp, toy.queries, toy.items)
    save_checkpoint(toy.tmp / "ck", {"x": torch.zeros(1)}, None, {"step": 1}, {}, arrays=judge.state_arrays())
    assert again.restore_from(toy.tmp / "ck") and again.calls == 3
    assert again.cache.keys() == judge.cache.keys()
    for key, value in judge.cache.items():
        assert again.cache[key].dtype == value.dtype and np.array_equal(again.cache[key], value)
    assert not ReaderJudge(toy.reader, toy.tmp, toy.queries, toy.items).restore_from(toy.tmp / "none")


# ----------------------------------------------------------------------------------------------- the judge


def test_judge_scores_each_pair_once_and_reads_the_gold_answer(toy):
    reader = toy.reader
    judge = ReaderJudge(reader, toy.tmp, toy.queries, toy.items, batch_size=4)
    q = np.array([0, 1, 1])  # query 1 twice: its pairs are scored once
    ids = np.array([["c001", "c002"], ["c002", "c003"], ["c003", "c004"]], dtype=object)
    gold = judge.gold_logprobs(q, ids)
    assert reader.forwards == judge.calls == 5  # distinct (query, item) pairs
    for (qi, row), lp_row in zip(zip(q, ids), gold):
        query = toy.queries[qi]
        for item_id, lp in zip(row, lp_row):
            assert lp == pytest.approx(reader.logprobs(query, item_id)[query.candidates.index(query.label)], abs=1e-6)
    again = judge.gold_logprobs(q, ids)
    preds = judge.predictions(q, ids)
    assert reader.forwards == 5, "a second call for the same pairs must not run the reader"
    np.testing.assert_array_equal(again, gold)
    expected = [[int(np.argmax(reader.logprobs(toy.queries[qi], i))) for i in row] for qi, row in zip(q, ids)]
    np.testing.assert_array_equal(preds, expected)
    judge.gold_logprobs(np.array([0, 2]), np.array([["c001", "c009"], ["c001", "c002"]], dtype=object))
    assert reader.forwards == judge.calls == 8  # only the three new pairs


def test_training_runs_the_reader_once_per_distinct_pair(toy):
    task = make_task(toy, inconsistency_weighting="upweight")
    train_head(task, steps=20, batch_size=16, lr=0.05, weight_decay=0.0, refresh_every=5, seed=0)
    assert toy.reader.forwards == task.judge.calls == len(task.judge.cache)
    assert toy.reader.forwards < 20 * 16 * K  # repeated queries and unchanged candidates were not re-scored


# ------------------------------------------------------------------------------------ inconsistency weighting


def test_inconsistent_flags_queries_whose_candidates_disagree():
    preds = np.array([[0, 0, 0], [0, 1, 0], [2, 2, 2], [1, 1, 0]])
    np.testing.assert_array_equal(inconsistent(preds), [False, True, False, True])


def test_query_weights(toy):
    preds = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 1], [1, 1, 0]])
    assert make_task(toy).query_weights(preds) is None
    np.testing.assert_array_equal(make_task(toy, inconsistency_weighting="only").query_weights(preds), [0, 1, 0, 1])
    np.testing.assert_array_equal(
        make_task(toy, inconsistency_weighting="upweight", inconsistency_factor=3.0).query_weights(preds), [1, 3, 1, 3])
    with pytest.raises(ValueError, match="inconsistency_weighting"):
        make_task(toy, inconsistency_weighting="some")
    with pytest.raises(ValueError, match="inconsistency_factor"):
        make_task(toy, inconsistency_weighting="upweight", inconsistency_factor=0.0)


def test_weighted_loss_is_the_weighted_mean_of_per_query_kls(toy):
    """`only` = the plain loss over the inconsistent queries alone; `upweight` = their KL counted f times; a batch
    with no inconsistent query under `only` has zero loss and no gradient."""
    task = make_task(toy, alpha=0.5, prior_tilt=0.2)
    batch = np.arange(12)
    ids, prior = task.retrieve(batch)
    gold = task.judge.gold_logprobs(batch, ids)
    mixed = np.zeros(len(batch), dtype=bool)
    mixed[[1, 4, 5, 9]] = True
    preds = np.where(mixed[:, None], np.arange(K)[None, :] % 2, 0)
    per_query = reference_kl(task, batch, ids, prior, gold)

    only = make_task(toy, alpha=0.5, prior_tilt=0.2, inconsistency_weighting="only")
    got = float(only.loss(batch, ids, prior, gold, only.query_weights(preds)))
    assert got == pytest.approx(per_query[mixed].mean(), rel=1e-4)
    sub = float(task.loss(batch[mixed], ids[mixed], prior[mixed], gold[mixed]))
    assert got == pytest.approx(sub, rel=1e-5)

    up = make_task(toy, alpha=0.5, prior_tilt=0.2, inconsistency_weighting="upweight", inconsistency_factor=4.0)
    got = float(up.loss(batch, ids, prior, gold, up.query_weights(preds)))
    w = np.where(mixed, 4.0, 1.0)
    assert got == pytest.approx((w * per_query).sum() / w.sum(), rel=1e-4)
    assert got != pytest.approx(per_query.mean(), rel=1e-3)

    none_mixed = only.loss(batch, ids, prior, gold, only.query_weights(np.zeros_like(preds)))
    none_mixed.backward()
    assert float(none_mixed) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in only.tower.trainable_parameters())


def test_only_weighting_leaves_consistent_queries_untrained(toy):
    """Under `only`, a query whose candidates all lead to one answer gets no gradient: training on a batch of such
    queries leaves the head unchanged, while `upweight` and `none` train on it."""
    task = make_task(toy)
    batch = np.arange(N_QUERIES)
    ids, _ = task.retrieve(batch)
    preds = task.judge.predictions(batch, ids)
    assert 0 < inconsistent(preds).sum() < N_QUERIES  # the toy problem has both kinds
    consistent_only = [int(i) for i in np.flatnonzero(~inconsistent(preds))]
    sub = copy.copy(toy)
    sub.pixels, sub.exclude = toy.pixels[consistent_only], [toy.exclude[i] for i in consistent_only]
    sub.queries = [toy.queries[i] for i in consistent_only]
    for weighting, changes in (("only", False), ("upweight", True), ("none", True)):
        t = make_task(sub, inconsistency_weighting=weighting)
        before = [p.detach().clone() for p in t.tower.trainable_parameters()]
        # refresh_every > steps: the candidates stay the snapshot's, so these queries stay consistent
        train_head(t, steps=3, batch_size=len(consistent_only), lr=0.05, weight_decay=0.0, refresh_every=100, seed=0)
        moved = any(not torch.equal(a, b) for a, b in zip(before, t.tower.trainable_parameters()))
        assert moved == changes, weighting


def test_config_switch_is_checked_and_off_by_default():
    from dxrag.core.config import ConfigError, load_config

    assert load_config(None).distill.inconsistency_weighting == "none"
    cfg = load_config(None, {"distill.inconsistency_weighting": "upweight", "distill.inconsistency_factor": 3})
    assert (cfg.distill.inconsistency_weighting, cfg.distill.inconsistency_factor) == ("upweight", 3.0)
    with pytest.raises(ConfigError, match=r"distill\.inconsistency_weighting 'sometimes' is not one of"):
        load_config(None, {"distill.inconsistency_weighting": "sometimes"})
    with pytest.raises(ConfigError, match=r"distill\.inconsistency_factor must be > 0"):
        load_config(None, {"distill.inconsistency_factor": 0})
