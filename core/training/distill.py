"""Retriever distillation from the reader's judgement: per head, the query tower learns KL(P_gold ‖ P_ret) over K
candidates retrieved by a frozen snapshot of the head, where P_gold comes from the frozen reader's log p(y | q, c).

The whole loop is `DistillTask` (student tower, frozen judge, loss) + `train_head` (one screen).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..records import CorpusItem, Query
from .runs import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class ReaderJudge:
    """The frozen reader as teacher: `gold_logprobs(query_idx, item_ids)` = log p_reader(gold | query, item), scored
    in batches and cached per (query, item) — the reader never changes during distillation."""

    def __init__(self, reader, image_root: Path, queries: Sequence[Query], items: dict[str, CorpusItem],
                 batch_size: int = 64):
        from ..reader.model import ScoreRequest

        self._request = ScoreRequest
        self.reader = reader
        self.image_root = Path(image_root)
        self.queries = list(queries)
        self.items = items
        self.batch_size = batch_size
        self.cache: dict[tuple[int, str], float] = {}
        self.calls = 0  # reader forwards actually run

    def gold_logprobs(self, query_idx: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        missing = sorted({(int(q), str(i)) for q, row in zip(query_idx, item_ids) for i in row} - self.cache.keys())
        if missing:
            mine = distributed.shard(missing)  # under torchrun each process scores its share, then all share all
            requests = [self._request(self.queries[q], self.items[i]) for q, i in mine]
            scores = self.reader.score(requests, self.image_root, batch_size=self.batch_size, progress=False)
            gold = [float(lp[req.answers.index(req.query.label)]) for req, lp in zip(requests, scores)]
            self.cache.update(zip(missing, distributed.gather_shards(gold, len(missing))))
            self.calls += len(missing)
        return np.array([[self.cache[(int(q), str(i))] for i in row] for q, row in zip(query_idx, item_ids)],
                        dtype=np.float32)


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
    snapshot: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
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

    def loss(self, batch: np.ndarray, ids: np.ndarray, prior: np.ndarray, gold: np.ndarray) -> torch.Tensor:
        q = self.tower(self.pixels[batch].to(self.device))  # (B, d), the only path with gradients
        docs = self.docs[torch.from_numpy(self.index.rows(ids.reshape(-1)))].view(*ids.shape, -1)  # (B, K, d)
        log_p_ret = F.log_softmax(torch.einsum("bd,bkd->bk", q, docs.to(self.device)) / self.tau_retriever, dim=-1)
        gold_logits = torch.from_numpy(gold).to(self.device) / self.tau_gold
        if self.prior_tilt:
            gold_logits = gold_logits + self.prior_tilt * torch.from_numpy(prior).to(self.device) / self.tau_retriever
        p_gold = F.softmax(gold_logits, dim=-1)
        return F.kl_div(log_p_ret, p_gold, reduction="batchmean")  # KL(P_gold ‖ P_ret)


def batch_for_step(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The training queries of `step`: a seeded permutation per epoch, so a resumed run sees the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[pos * batch_size:(pos + 1) * batch_size]


def train_head(task: DistillTask, steps: int, batch_size: int, lr: float, weight_decay: float, refresh_every: int,
               seed: int, checkpoint_dir: Path | None = None, checkpoint_every: int = 50,
               on_step: Callable[[int], None] | None = None) -> dict:
    """Distil the reader's judgement into one head; resumes from `checkpoint_dir` when a checkpoint is there."""
    params = list(task.tower.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, history = 0, {"loss": []}
    if checkpoint_dir is not None and (checkpoint_dir / "state.json").exists():
        tensors, opt_state, state = load_checkpoint(checkpoint_dir)
        task.tower.trainable.load_state_dict({k[len("tower."):]: v for k, v in tensors.items()
                                              if k.startswith("tower.")})
        task.snapshot.trainable.load_state_dict({k[len("snapshot."):]: v for k, v in tensors.items()
                                                 if k.startswith("snapshot.")})
        optimizer.load_state_dict(opt_state)
        start, history = state["step"], state["history"]
        log.info("resuming distillation of the %s head at step %d", task.tower.head, start)
    task.tower.train(True)
    bar = tqdm(range(start, steps), desc=f"distil {task.tower.head} head", unit="step", initial=start, total=steps,
               disable=not distributed.is_main())
    for step in bar:
        if step % refresh_every == 0 and step > 0:
            task.refresh_snapshot()
        batch = batch_for_step(len(task.pixels), batch_size, step, seed)
        ids, prior = task.retrieve(batch)
        gold = task.judge.gold_logprobs(batch, ids)
        loss = task.loss(batch, ids, prior, gold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(float(loss.item()))
        bar.set_postfix(kl=f"{loss.item():.4f}", reader_calls=task.judge.calls)
        done = step + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps) and distributed.is_main():
            tensors = {f"tower.{k}": v for k, v in task.tower.trainable.state_dict().items()}
            tensors.update({f"snapshot.{k}": v for k, v in task.snapshot.trainable.state_dict().items()})
            save_checkpoint(checkpoint_dir, tensors, optimizer.state_dict(), {"step": done, "history": history})
        if on_step is not None:
            on_step(done)
    task.tower.train(False)
    history["reader_calls"] = task.judge.calls
    return history
