"""The settings of retriever distillation (`distill` of the run config; core/training/distill.py). Torch-free, so the
config mapper (core/config.py) builds them without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillSettings:
    heads: list[str] = field(default_factory=lambda: ["text", "image"])  # trained in this order
    steps: int = 150  # per head
    batch_size: int = 32
    candidates: int = 20  # K
    refresh_every: int = 10  # R: steps between snapshot refreshes of the candidate retriever
    alpha: float = 0.15
    tau_gold: float = 0.1
    tau_retriever: float = 0.1
    prior_tilt: float = 0.0  # > 0 adds prior_tilt * retriever log-prior to the gold logits (the reference's variant)
    # per-query KL weight from whether the reader's predictions over the query's K candidates disagree (the
    # reference's weighting_kl): none (every query 1), only (consistent queries 0, inconsistent 1), upweight
    # (consistent 1, inconsistent inconsistency_factor); the loss is the weighted mean over the batch
    inconsistency_weighting: str = "none"
    inconsistency_factor: float = 2.0  # upweight: an inconsistent query's weight relative to a consistent one's
    lr: float = 1e-4
    weight_decay: float = 0.01
    checkpoint_every: int = 50
