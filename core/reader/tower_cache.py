"""Frozen vision-tower features computed once per image (`VisionFeatureCache`) and the reader's forward pass that
uses them (`TowerCacheMixin`)."""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..base.dataset import DatasetError, open_image
from ..base.records import CorpusItem, Query
from .prompts import prompt_images
from .requests import ReaderError, _Forward


def open_wanted(paths: Sequence[str], wanted: dict[str, str]) -> list:
    """Open each image path; a missing or unreadable one is a ReaderError naming the record field `wanted[path]`."""
    images = []
    for path in paths:
        try:
            images.append(open_image(Path(path)))
        except DatasetError as e:
            raise ReaderError(f"{wanted[path]}: {e}") from None
    return images

if TYPE_CHECKING:
    from .model import Reader

log = logging.getLogger(__name__)


def _wanted_images(items: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]], root: Path) -> dict[str, str]:
    """The distinct image paths of the prompts, each naming the record field it comes from (for errors)."""
    wanted: dict[str, str] = {}
    for query, context, _ in items:
        if context is not None:
            wanted.setdefault(str(root / context.image), f"context {context.id!r} field 'image'")
        wanted.setdefault(str(root / query.image), f"query {query.id!r} field 'image'")
    return wanted


def _freeze(tower: torch.nn.Module) -> None:
    """No gradients into a frozen vision tower, and eval mode whatever the reader's mode: its BatchNorm must neither
    normalise with batch statistics nor update its running ones while the rest of the reader trains."""
    tower.requires_grad_(False)
    tower.train = types.MethodType(lambda self, mode=True: torch.nn.Module.train(self, False), tower)
    tower.eval()


class VisionFeatureCache:
    """Frozen vision-tower outputs (before the trainable projector) per image path, each computed once: scoring K
    contexts per query and every training step reuse them. `save` / `load` keep them in a run directory, keyed by
    the image's path relative to the dataset root and stamped with a fingerprint of the tower's weights and the image
    preprocessing, so a changed tower or image size is never served stale features."""

    def __init__(self, reader: "Reader"):
        self.reader = reader
        self.features: dict[str, torch.Tensor] = {}

    def fingerprint(self) -> str:
        import hashlib
        import json

        h = hashlib.sha256()
        for name, t in sorted(self.reader.hf_model.get_submodule(self.reader.family.tower).state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(json.dumps(self.reader.processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def get(self, wanted: dict[str, str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Features of each image path (keys; values name the record field for errors), computing missing ones."""
        missing = [p for p in wanted if p not in self.features]
        reader = self.reader
        for start in range(0, len(missing), batch_size):
            part = missing[start:start + batch_size]
            images = open_wanted(part, wanted)
            pixels = reader.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out = reader.family.tower_features(reader.hf_model, pixels.to(reader.device))
            self.features.update(zip(part, out.detach()))
        return {p: self.features[p] for p in wanted}

    def save(self, file: str | os.PathLike, image_root: str | os.PathLike) -> Path:
        """Write every cached feature (safetensors, atomically) keyed by path relative to `image_root`."""
        from safetensors.torch import save_file

        root, file = str(Path(image_root)), Path(file)
        tensors = {os.path.relpath(p, root): t.cpu().contiguous() for p, t in self.features.items()}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint()})
        os.replace(tmp, file)
        return file

    def load(self, file: str | os.PathLike, image_root: str | os.PathLike) -> int:
        """Add the features of `file` when its fingerprint is this tower's; returns how many were loaded."""
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != self.fingerprint():
                log.warning("%s: vision features of another tower or image size; recomputing them", file)
                return 0
            for key in f.keys():
                self.features[str(Path(image_root) / key)] = f.get_tensor(key).to(self.reader.device)
        return len(self.features)


class TowerCacheMixin:
    """`Reader`'s forward pass on cached frozen-tower features (`Reader.tower_cache`)."""

    def _tower_forward(self, items, root: Path, tails=None, logits_to_keep: int = 1, use_cache: bool = False,
                       answer_lengths: Sequence[int] | None = None) -> _Forward:
        """The generic forward with the frozen tower's outputs taken from `tower_cache` (computed once per image):
        the same tokens as the processor's (each placeholder repeated once per image token), the trainable projector
        applied to the cached features and scattered into the token embeddings."""
        texts = self._rendered(items)
        feats = self.tower_cache.get(_wanted_images(items, root))
        order = [str(root / rel) for q, c, _ in items for rel in prompt_images(q, c)]
        tower = torch.stack([feats[p] for p in order])
        texts = [t.replace(self.placeholder, self.placeholder * tower.shape[1]) for t in texts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if tails is not None:
            inputs = self._append(inputs, tails)
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        tail_lengths = [len(t) for t in tails] if tails is not None else [0] * len(items)
        self._check_lengths(items, [n - t for n, t in zip(mask.sum(1).tolist(), tail_lengths)],
                            answer_lengths or tail_lengths)
        slots = ids == self.image_token_id
        if int(slots.sum()) != tower.shape[0] * tower.shape[1]:
            raise ReaderError(f"{self._names(items)}: {int(slots.sum())} image tokens in the prompts for "
                              f"{tower.shape[0]} images of {tower.shape[1]} tokens; the tokenizer must keep "
                              f"{self.placeholder!r} a single special token")
        embeds = self.hf_model.get_input_embeddings()(ids)
        image = self.family.project(self.hf_model, tower.to(self.hf_model.dtype))
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), image.to(embeds.dtype))
        out = self.hf_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=logits_to_keep,
                            use_cache=use_cache)
        return _Forward(out.logits, mask, out.cache if use_cache else None, {})
