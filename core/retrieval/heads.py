"""Query towers of the two retrieval heads: a trainable copy f_θ of the image tower mixed with the frozen f_0,
q = normalize(α·f_θ(x) + (1−α)·f_0(x)); document embeddings are never recomputed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..base.fsutil import atomic_path
from .encoders import Encoder, ImageLike

HEADS = ("image", "text")  # image head: query image -> image index; text head: query image -> text index
DEFAULT_ALPHA = 0.15


class QueryTower(torch.nn.Module):
    """The query encoder of one head. `forward(pixels)` returns L2-normalised query embeddings; gradients reach the
    trainable copy only. Each tower output is normalised before mixing, so at initialisation (f_θ == f_0) the query
    embedding equals the frozen encoder's image embedding, i.e. the untrained retriever.

    For a distillation loop: optimise `trainable_parameters()`, call `save(path)` for the trained part, and
    `QueryTower.from_encoder(encoder, head).load(path)` to restore it.
    """

    def __init__(self, encoder: Encoder, head: str, alpha: float = DEFAULT_ALPHA):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r} is not one of {list(HEADS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.head = head
        self.alpha = float(alpha)
        self.encoder_name = encoder.name
        self.encoder_hash = encoder.weights_hash
        self.dim = encoder.dim
        self.frozen = encoder.visual  # shared with the encoder, never trained
        self.trainable = copy.deepcopy(encoder.visual)
        self.trainable.requires_grad_(True)
        self.train(False)

    @classmethod
    def from_encoder(cls, encoder: Encoder, head: str, alpha: float = DEFAULT_ALPHA) -> "QueryTower":
        return cls(encoder, head, alpha)

    def train(self, mode: bool = True) -> "QueryTower":
        """Train mode applies to the trainable copy only; the frozen tower stays in eval mode."""
        self.training = mode
        self.trainable.train(mode)
        self.frozen.eval()
        return self

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.trainable.parameters()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f0 = F.normalize(self.frozen(pixels).float(), dim=-1)
        ft = F.normalize(self.trainable(pixels).float(), dim=-1)
        return F.normalize(self.alpha * ft + (1.0 - self.alpha) * f0, dim=-1)

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Preprocessed image batch -> float32 query embeddings (n, dim), without gradients, in eval mode."""
        was_training = self.training
        self.train(False)
        device = next(self.trainable.parameters()).device
        try:
            out = [self(pixels[i:i + batch_size].to(device)).cpu().numpy() for i in range(0, len(pixels), batch_size)]
        finally:
            self.train(was_training)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), dtype=np.float32)

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trainable copy's state dict as safetensors (atomically), with head, alpha and encoder hash."""
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable.state_dict().items()}
        metadata = {"head": self.head, "alpha": repr(self.alpha), "encoder_name": self.encoder_name,
                    "encoder_weights_hash": self.encoder_hash}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    def load(self, path: str | os.PathLike) -> "QueryTower":
        """Load a trainable copy written by `save`. Refuses a file from another head or another encoder; the alpha
        stored in the file replaces this tower's alpha."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: query tower weights not found")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("head") != self.head:
            raise ValueError(f"{path}: metadata 'head' is {meta.get('head')!r}, expected {self.head!r}")
        if meta.get("encoder_weights_hash") != self.encoder_hash:
            raise ValueError(f"{path}: trained on top of encoder {meta.get('encoder_name')!r} with weights hash "
                             f"{meta.get('encoder_weights_hash')}, but this encoder ({self.encoder_name!r}) has "
                             f"weights hash {self.encoder_hash}; load the encoder the head was trained with")
        self.trainable.load_state_dict(state, strict=True)
        self.alpha = float(meta.get("alpha", self.alpha))
        return self


def query_towers(encoder: Encoder, alpha: float = DEFAULT_ALPHA) -> dict[str, QueryTower]:
    """One query tower per head, each with its own trainable copy."""
    return {head: QueryTower(encoder, head, alpha) for head in HEADS}


def preprocess_queries(encoder: Encoder, images: Sequence[ImageLike]) -> torch.Tensor:
    """Query images (PIL or paths) -> the tower input batch; compute once and reuse across training steps."""
    return encoder.preprocess_images(images)
