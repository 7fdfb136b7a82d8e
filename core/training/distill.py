"""Retriever distillation from the reader's judgement: per head, the query tower learns KL(P_gold ‖ P_ret) over K
candidates retrieved by a frozen snapshot of the head, where P_gold comes from the frozen reader's log p(y | q, c).

The whole loop is `DistillTask` (student tower, frozen judge, loss) + `train_head` (one screen).
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..base.records import CorpusItem, Query
from ..tasks import Task, run_requests
from .checkpoint import has_checkpoint, load_arrays, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class ReaderJudge:
    """The frozen reader as teacher: `gold_logprobs(query_idx, item_ids)` = log p_reader(gold | query, item) and
    `predictions(...)` = a code of the reader's answer for each (query, item), scored in batches and cached per
    (query, item) — the reader never changes during distillation.

    What the reader is asked and how its outputs become the gold score and the answer code is the task's
    (`task`, core/tasks.py: `Task.judge_requests`, `judge_value`, `gold`, `answer_code`; None: a classification
    task, every query asked as it is): a closed question scores its candidates, a multi-label query asks one yes/no
    question per label, an open question scores its gold answer's tokens.

    The cache is the run's persistent judge cache: saved with every distillation checkpoint (`state_arrays`) and
    restored on resume (`restore`), so a resumed run reuses the very scores the interrupted one computed. A reader's
    score moves by ~1e-7 with the other requests of its batch; recomputing a pair in another batch after a resume
    would let the resumed run drift from the uninterrupted one."""

    def __init__(self, reader, image_root: Path, queries: Sequence[Query], items: dict[str, CorpusItem],
                 batch_size: int = 64, task: Task | None = None):
        self.reader = reader
        self.image_root = Path(image_root)
        self.queries = list(queries)
        self.items = items
        self.batch_size = batch_size
        self.task = task if task is not None else Task("classification", (), {})
        # (query, item) -> `Task.judge_value`: a closed question's log p over its candidates; a multi-label query's
        # (L, 2) log p of yes/no per label; an open question's (1,) mean per-token gold log p
        self.cache: dict[tuple[int, str], np.ndarray] = {}
        self.calls = 0  # (query, item) pairs actually scored

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The cache as plain arrays (numbers and strings; no pickle): pairs, each value's shape, the values
        concatenated in their own dtype, and the count of pairs scored so far."""
        keys = sorted(self.cache)
        values = [np.asarray(self.cache[k]) for k in keys]
        dtype = np.result_type(*values) if values else np.float32
        shapes = np.zeros((len(values), 2), dtype=np.int64)
        for n, v in enumerate(values):
            shapes[n, 2 - v.ndim:] = v.shape
        return {"judge_query": np.array([q for q, _ in keys], dtype=np.int64),
                "judge_item": np.array([i for _, i in keys], dtype=np.str_),
                "judge_shape": shapes,
                "judge_ndim": np.array([v.ndim for v in values], dtype=np.int8),
                "judge_values": (np.concatenate([v.ravel() for v in values]).astype(dtype, copy=False) if values
                                 else np.zeros(0, dtype)),
                "judge_calls": np.array(self.calls, dtype=np.int64)}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the cache by one `state_arrays` saved (the whole cache of that moment)."""
        cache, pos = {}, 0
        for q, item, shape, ndim in zip(arrays["judge_query"].tolist(), arrays["judge_item"].tolist(),
                                        arrays["judge_shape"], arrays["judge_ndim"].tolist()):
            shape = tuple(int(x) for x in shape[2 - ndim:])
            size = int(np.prod(shape))
            cache[(q, item)] = arrays["judge_values"][pos:pos + size].reshape(shape)
            pos += size
        self.cache = cache
        self.calls = int(arrays["judge_calls"])

    def restore_from(self, checkpoint_dir: Path) -> bool:
        """Restore the cache saved with a checkpoint; False when there is none."""
        arrays = load_arrays(checkpoint_dir) if has_checkpoint(checkpoint_dir) else None
        if arrays is None or "judge_query" not in arrays:
            return False
        self.restore(arrays)
        return True

    def _score_pairs(self, pairs: list[tuple[int, str]]) -> list[np.ndarray]:
        """`Task.judge_value` of each (query, item) pair; the requests of all pairs answered in one call per request
        type (a multi-label query's per-label questions about one item share one prefix pass, as at prediction)."""
        groups = [(q, [i for _, i in group]) for q, group in itertools.groupby(pairs, key=lambda p: p[0])]
        requests = [self.task.judge_requests(self.queries[q], [self.items[i] for i in ids]) for q, ids in groups]
        outputs = run_requests(self.reader, [r for rs in requests for r in rs], self.image_root, self.batch_size)
        out, pos = [], 0
        for (q, _), rs in zip(groups, requests):
            query = self.queries[q]
            out += [self.task.judge_value(query, o) for o in self.task.per_context(query, outputs[pos:pos + len(rs)])]
            pos += len(rs)
        return out

    def _scores(self, query_idx: np.ndarray, item_ids: np.ndarray) -> list[list[np.ndarray]]:
        missing = sorted({(int(q), str(i)) for q, row in zip(query_idx, item_ids) for i in row} - self.cache.keys())
        if missing:
            mine = distributed.shard(missing)  # under torchrun each process scores its share, then all share all
            scores = self._score_pairs(mine)
            self.cache.update(zip(missing, distributed.gather_shards([np.asarray(lp) for lp in scores],
                                                                     len(missing))))
            self.calls += len(missing)
        return [[self.cache[(int(q), str(i))] for i in row] for q, row in zip(query_idx, item_ids)]

    def gold_logprobs(self, query_idx: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """(B, K) log p_reader(gold answer | query, item) for each query of `query_idx` and its K items."""
        return np.array([[self.task.gold(self.queries[int(q)], lp) for lp in row]
                         for q, row in zip(query_idx, self._scores(query_idx, item_ids))], dtype=np.float32)

    def predictions(self, query_idx: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """(B, K) a code of the reader's answer given each single item (equal codes: the same answer)."""
        return np.array([[self.task.answer_code(self.queries[int(q)], lp) for lp in row]
                         for q, row in zip(query_idx, self._scores(query_idx, item_ids))], dtype=np.int64)


WEIGHTINGS = ("none", "only", "upweight")


def inconsistent(predictions: np.ndarray) -> np.ndarray:
    """(B,) True where a query's K single-item predictions (B, K) are not all the same answer."""
    return (predictions != predictions[:, :1]).any(axis=1)


@dataclass
class DistillTask:
    """Student query tower of one head, its frozen candidate snapshot, the frozen reader judge, and the KL loss."""

    tower: torch.nn.Module  # QueryTower: forward(pixels) -> normalised query embeddings, grad through f_θ only
    index: object  # CorpusIndex of this head: frozen document embeddings + search
    judge: ReaderJudge
    pixels: torch.Tensor  # preprocessed training query images (Q, C, H, W)
    exclude: list[set[str]]  # per training query: corpus ids never to retrieve (items showing the query's own image)
    candidates: int = 20
    tau_gold: float = 0.1
    tau_retriever: float = 0.1
    prior_tilt: float = 0.0
    inconsistency_weighting: str = "none"  # none | only | upweight (see query_weights)
    inconsistency_factor: float = 2.0
    snapshot: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.inconsistency_weighting not in WEIGHTINGS:
            raise ValueError(f"inconsistency_weighting {self.inconsistency_weighting!r} is not one of "
                             f"{list(WEIGHTINGS)}")
        if self.inconsistency_factor <= 0:
            raise ValueError(f"inconsistency_factor must be > 0, got {self.inconsistency_factor}")
        self.docs = torch.from_numpy(np.array(self.index.embeddings, dtype=np.float32))  # a writable copy
        if self.snapshot is None:
            self.refresh_snapshot()

    @property
    def device(self) -> torch.device:
        return next(self.tower.trainable_parameters()).device

    def refresh_snapshot(self) -> None:
        self.snapshot = copy.deepcopy(self.tower).eval()
        self.snapshot.requires_grad_(False)

    def retrieve(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K candidate ids (B, K) and their snapshot scores, from the frozen snapshot of the head."""
        with torch.no_grad():
            q = self.snapshot(self.pixels[batch].to(self.device)).cpu().numpy()
        scores, ids = self.index.search(q, self.candidates, [self.exclude[i] for i in batch])
        return ids, scores

    def gold_distribution(self, gold: np.ndarray, prior: np.ndarray) -> torch.Tensor:
        """P_gold (B, K) = softmax(gold / τ_g [+ prior_tilt · prior / τ_r]): the reader's judgement of each candidate,
        optionally tilted toward the snapshot retriever's own ranking (its log-prior up to a constant)."""
        gold_logits = torch.from_numpy(gold).to(self.device) / self.tau_gold
        if self.prior_tilt:
            gold_logits = gold_logits + self.prior_tilt * torch.from_numpy(prior).to(self.device) / self.tau_retriever
        return F.softmax(gold_logits, dim=-1)

    def query_weights(self, predictions: np.ndarray) -> np.ndarray | None:
        """Per-query KL weights (B,) from the reader's single-item predictions (B, K); None for `none`. `only` keeps
        just the queries whose K candidates lead to different answers (the reference's weighting_kl); `upweight`
        keeps every query and weighs the inconsistent ones `inconsistency_factor` times a consistent one."""
        if self.inconsistency_weighting == "none":
            return None
        mixed = inconsistent(predictions)
        if self.inconsistency_weighting == "only":
            return mixed.astype(np.float32)
        return np.where(mixed, self.inconsistency_factor, 1.0).astype(np.float32)

    def loss(self, batch: np.ndarray, ids: np.ndarray, prior: np.ndarray, gold: np.ndarray,
             weights: np.ndarray | None = None) -> torch.Tensor:
        """KL(P_gold ‖ P_ret), the mean over the batch's queries, or their `weights`-weighted mean."""
        q = self.tower(self.pixels[batch].to(self.device))  # (B, d), the only path with gradients
        docs = self.docs[torch.from_numpy(self.index.rows(ids.reshape(-1)))].view(*ids.shape, -1)  # (B, K, d)
        log_p_ret = F.log_softmax(torch.einsum("bd,bkd->bk", q, docs.to(self.device)) / self.tau_retriever, dim=-1)
        p_gold = self.gold_distribution(gold, prior)
        if weights is None:
            return F.kl_div(log_p_ret, p_gold, reduction="batchmean")  # KL(P_gold ‖ P_ret)
        per_query = F.kl_div(log_p_ret, p_gold, reduction="none").sum(dim=-1)
        w = torch.from_numpy(weights).to(self.device)
        # a weighted mean keeps the loss (and the learning rate) on the per-query KL scale; a batch of only
        # consistent queries under `only` gives a zero loss (no update) instead of a division by zero
        total = (w * per_query).sum()
        return total / w.sum() if float(w.sum()) > 0 else total


def batch_for_step(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The training queries of `step`: a seeded permutation per epoch, so a resumed run sees the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[pos * batch_size:(pos + 1) * batch_size]


def resume_key(task: DistillTask, batch_size: int, lr: float, weight_decay: float, refresh_every: int,
               seed: int) -> dict:
    """The settings a resumed distillation must share with the interrupted one (checked against its checkpoint; the
    step count may grow: no schedule depends on it)."""
    return {"head": task.tower.head, "alpha": getattr(task.tower, "alpha", None), "candidates": task.candidates,
            "tau_gold": task.tau_gold, "tau_retriever": task.tau_retriever, "prior_tilt": task.prior_tilt,
            "inconsistency_weighting": task.inconsistency_weighting,
            "inconsistency_factor": task.inconsistency_factor, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "refresh_every": refresh_every, "seed": seed}


def train_head(task: DistillTask, steps: int, batch_size: int, lr: float, weight_decay: float, refresh_every: int,
               seed: int, checkpoint_dir: Path | None = None, checkpoint_every: int = 50,
               on_step: Callable[[int], None] | None = None) -> dict:
    """Distil the reader's judgement into one head; resumes from `checkpoint_dir` when a checkpoint is there
    (core/training/checkpoint.py; refused when written with other settings, `resume_key`)."""
    params = list(task.tower.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, history = 0, {"loss": []}
    settings = resume_key(task, batch_size, lr, weight_decay, refresh_every, seed)
    if has_checkpoint(checkpoint_dir):
        ckpt = load_checkpoint(checkpoint_dir, settings)
        task.tower.trainable.load_state_dict({k[len("tower."):]: v for k, v in ckpt.tensors.items()
                                              if k.startswith("tower.")})
        task.snapshot.trainable.load_state_dict({k[len("snapshot."):]: v for k, v in ckpt.tensors.items()
                                                 if k.startswith("snapshot.")})
        optimizer.load_state_dict(ckpt.optimizer)
        start, history = ckpt.state["step"], ckpt.state["history"]
        restored = ckpt.arrays is not None and "judge_query" in ckpt.arrays
        if restored:
            task.judge.restore(ckpt.arrays)
        log.info("resuming distillation of the %s head at step %d (%s)", task.tower.head, start,
                 f"judge cache of {len(task.judge.cache)} pairs restored" if restored else
                 "a checkpoint without a judge cache: scores are recomputed")
    task.tower.train(True)
    bar = tqdm(range(start, steps), desc=f"distil {task.tower.head} head", unit="step", initial=start, total=steps,
               disable=not distributed.is_main())
    for step in bar:
        if step % refresh_every == 0 and step > 0:
            task.refresh_snapshot()
        batch = batch_for_step(len(task.pixels), batch_size, step, seed)
        ids, prior = task.retrieve(batch)
        calls_before = task.judge.calls
        gold = task.judge.gold_logprobs(batch, ids)
        predictions = task.judge.predictions(batch, ids)  # cached by gold_logprobs: no extra reader forward
        weights = task.query_weights(predictions)
        loss = task.loss(batch, ids, prior, gold, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(float(loss.item()))
        history.setdefault("inconsistent_fraction", []).append(float(inconsistent(predictions).mean()))
        history.setdefault("judge_pairs", []).append(int(ids.size))  # (query, candidate) pairs the step judged
        history.setdefault("judge_scored", []).append(task.judge.calls - calls_before)  # of them, new to the cache
        bar.set_postfix(kl=f"{loss.item():.4f}", reader_calls=task.judge.calls)
        done = step + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps) and distributed.is_main():
            tensors = {f"tower.{k}": v for k, v in task.tower.trainable.state_dict().items()}
            tensors.update({f"snapshot.{k}": v for k, v in task.snapshot.trainable.state_dict().items()})
            save_checkpoint(checkpoint_dir, tensors, optimizer.state_dict(), {"step": done, "history": history},
                            settings, arrays=task.judge.state_arrays())
        if on_step is not None:
            on_step(done)
    task.tower.train(False)
    history["reader_calls"] = task.judge.calls
    if history.get("judge_pairs"):
        pairs, scored = sum(history["judge_pairs"]), sum(history["judge_scored"])
        log.info("%s head: the reader scored %d of %d judged (query, candidate) pairs (%.1f per step; judge cache hit "
                 "rate %.1f%%)", task.tower.head, scored, pairs, scored / len(history["judge_pairs"]),
                 100 * (1 - scored / max(pairs, 1)))
    if history.get("inconsistent_fraction"):
        log.info("%s head: %.0f%% of training queries had inconsistent candidates (mean over steps)",
                 task.tower.head, 100 * float(np.mean(history["inconsistent_fraction"])))
    return history
