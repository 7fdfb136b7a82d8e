"""Helpers the reader tests share: requests of mixed prompt lengths, and a few LoRA steps."""

from __future__ import annotations

import torch

from dxrag.core.base.records import CorpusItem
from dxrag.core.reader.model import ScoreRequest, TargetRequest


def requests_for(ds, n=5, candidates=None):
    """Closed-book and context requests with different prompt lengths (left padding differs across the batch)."""
    out = []
    for i, q in enumerate(ds.queries["val"][:n]):
        ctx = None if i % 3 == 0 else ds.corpus[i]
        if i % 4 == 1:
            ctx = CorpusItem(id=f"long{i}", image=ds.corpus[i].image, text=ds.corpus[i].text + " mild eye" * i)
        out.append(ScoreRequest(q, ctx, candidates))
    return out


def lora_losses(reader, examples, root, steps: int, lr: float) -> list[float]:
    """The answer loss of (query, context) `examples` before each of `steps` AdamW steps on the trainable
    parameters, then after the last."""
    examples = [TargetRequest(q, c) for q, c in examples]
    optimizer = torch.optim.AdamW([p for p in reader.model.parameters() if p.requires_grad], lr=lr)
    reader.model.train()
    losses = []
    for _ in range(steps):
        loss = reader.answer_loss(examples, root)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(float(reader.answer_loss(examples, root)))
    return losses
