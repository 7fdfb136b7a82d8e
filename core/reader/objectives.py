"""The reader's training objectives (a mixin of `Reader`, core/reader/model.py): the answer tokens' cross-entropy
(`answer_loss`, the default fine-tuning loss and LLaVA alignment's caption loss) and the classification cross-entropy
over a query's candidates (`candidate_loss`, `reader.finetune.loss: candidates`), both on `TargetRequest`s."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..base.answers import OPEN, normalize_closed
from .requests import ReaderError, ScoreRequest, TargetRequest, expect_requests


class ObjectivesMixin:
    """Needs `_target_logprobs`, `sequence_logits`, `_candidate_ids`, `_mode` and `device` from `Reader`."""

    def answer_loss(self, requests: Sequence[TargetRequest], image_root: str | os.PathLike) -> torch.Tensor:
        """Mean cross-entropy of the gold answers' tokens (the assistant turn; `target_ids`) given single-context
        prompts."""
        expect_requests(requests, TargetRequest, "answer_loss")
        logp, mask = self._target_logprobs(requests, image_root)
        return -logp.sum() / mask.sum()

    def candidate_loss(self, requests: Sequence[TargetRequest], image_root: str | os.PathLike) -> torch.Tensor:
        """Mean classification cross-entropy over the examples: -log softmax over each query's candidates of their
        log-probabilities, scored as `score` scores them (first tokens or whole sequences, `scoring`), at the gold
        label. Queries without candidates (open questions) contribute their answer tokens' mean cross-entropy."""
        expect_requests(requests, TargetRequest, "candidate_loss")
        closed = [r for r in requests if r.query.candidates and r.query.answer_type != OPEN]
        rest = [r for r in requests if not (r.query.candidates and r.query.answer_type != OPEN)]
        losses = []
        if rest:
            logp, mask = self._target_logprobs(rest, image_root)
            losses.append(-(logp.sum(1) / mask.sum(1)))
        if closed:
            scored = [ScoreRequest(r.query, r.context) for r in closed]
            cands, gold = [], []
            for r in scored:
                ids = self._candidate_ids(r)
                cands.append([c[:1] for c in ids] if self._mode(r, ids) == "first_token" else ids)
                match = [k for k, a in enumerate(r.answers) if normalize_closed(a) == normalize_closed(r.query.label)]
                if not match:
                    raise ReaderError(f"{r.describe()}: gold label {r.query.label!r} is not among the candidates "
                                      f"{list(r.answers)}; the candidates loss needs it there")
                gold.append(match[0])
            items = [(r.query, r.context, r.answers) for r in scored]
            if all(len(c) == 1 for cs in cands for c in cs):  # one pass: the candidates' logits after the prompt
                logits = self.sequence_logits(items, [cs[g] for cs, g in zip(cands, gold)], image_root)[:, 0]
                first = torch.log_softmax(logits.float(), dim=-1)
                seq = [first[b, [c[0] for c in cs]] for b, cs in enumerate(cands)]
            else:  # one teacher-forced pass per (query, candidate): the sum of the candidate's token log-probs
                pairs = [(b, k) for b, cs in enumerate(cands) for k in range(len(cs))]
                answers = [cands[b][k] for b, k in pairs]
                logits = self.sequence_logits([items[b] for b, _ in pairs], answers, image_root)
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                A = lp.shape[1]
                sums = [lp[i, A - len(a) + torch.arange(len(a), device=self.device),
                           torch.tensor(a, device=self.device)].sum() for i, a in enumerate(answers)]
                seq = list(torch.stack(sums).split([len(cs) for cs in cands]))  # pairs are in row order
            losses.append(torch.stack([-torch.log_softmax(s, 0)[g] for s, g in zip(seq, gold)]))
        return torch.cat(losses).mean()
