"""The short contrastive stage: CLIP-style pre-training of both towers of an `Encoder` on paired (image, text) rows,
with optional LiT-style locking of the towers (the `Encoder`'s locking hooks live in core/retrieval/encoders.py; the
settings, `PretrainSettings`, in core/retrieval/settings.py)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..retrieval.encoders import Encoder, ImageLike, Tokens, _to
from ..retrieval.settings import PretrainSettings

log = logging.getLogger(__name__)


def _warmup_cosine(step: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 10% of the steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))


def pretrain_contrastive(encoder: Encoder, images: torch.Tensor | Sequence[ImageLike], texts: Sequence[str],
                         settings: PretrainSettings | None = None, seed: int = 0) -> list[float]:
    """Train both towers with the symmetric CLIP loss on paired (image, text) rows, plus the image <-> image loss on
    augmented views (see `PretrainSettings`); returns the mean total loss per epoch. Every back-end trains with the
    same softmax InfoNCE and its own `logit_scale` (a SigLIP model's sigmoid bias is left as it is).

    `images` is a preprocessed batch (`encoder.preprocess_images`) or PIL images / paths, row i paired with texts[i].
    The encoder is frozen again afterwards (its `weights_hash` changes).
    """
    cfg = settings or PretrainSettings()
    if len(images) != len(texts):
        raise ValueError(f"pretrain_contrastive: {len(images)} images but {len(texts)} texts; rows must pair up")
    if len(texts) < 2:
        raise ValueError("pretrain_contrastive: need at least 2 pairs (in-batch negatives)")
    pixels = images if isinstance(images, torch.Tensor) else encoder.preprocess_images(images)
    tokens = encoder.tokenize(list(texts))
    model, device = encoder.model, encoder.device
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    cached = None
    if cfg.lock_towers:
        encoder.lock_towers(cfg.unlocked_image_groups, cfg.unlocked_text_layers)
        _eval_locked(model)
        split = encoder.tower_split() if not (cfg.unlocked_image_groups or cfg.unlocked_text_layers) else None
        if split is not None:
            cached = _locked_outputs(split, pixels, tokens, cfg, generator, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("contrastive pre-training of %s: %d of %d parameters trainable", encoder.name,
             sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(texts) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total_steps))
    losses = []
    bar = tqdm(total=total_steps, desc="contrastive pre-training", unit="step")
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(texts), generator=generator)
            total = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                if cached is not None:
                    image_head, views, text_head, text_out = cached
                    img_f = F.normalize(image_head(views[0][idx]), dim=-1)
                    txt_f = F.normalize(text_head(text_out[idx]), dim=-1)
                else:
                    batch = pixels[idx]
                    views = [_augment(batch, cfg, generator) for _ in range(2)] if cfg.image_weight > 0 else [batch]
                    img_f = F.normalize(encoder.image_features(views[0].to(device)), dim=-1)
                    txt_f = F.normalize(encoder.text_features(_to({k: v[idx] for k, v in tokens.items()}, device)),
                                        dim=-1)
                target = torch.arange(len(idx), device=device)
                loss = _symmetric_infonce(encoder.logit_scale.exp() * img_f @ txt_f.T, target)
                if cfg.image_weight > 0:
                    other = F.normalize(image_head(views[1][idx]) if cached is not None else
                                        encoder.image_features(views[1].to(device)), dim=-1)
                    loss = loss + cfg.image_weight * _symmetric_infonce(img_f @ other.T / cfg.image_temperature,
                                                                        target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    encoder.logit_scale.clamp_(0, np.log(100))
                total += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / steps_per_epoch)
    finally:
        bar.close()
        encoder.freeze()
    log.info("contrastive pre-training of %s: %d epochs, loss %.3f -> %.3f", encoder.name, cfg.epochs, losses[0],
             losses[-1])
    return losses


@torch.no_grad()
def _locked_outputs(split, pixels: torch.Tensor, tokens: Tokens, cfg: PretrainSettings, generator: torch.Generator,
                    device: torch.device, chunk: int = 64):
    """For fully locked towers: what the locked bodies output, computed once (the loss is the same, an epoch costs
    the projections only): the image body on two augmented views of every image (one when `image_weight` is 0: the
    plain images), each view fixed for the run, and the text body on every text. Returns (image head, views, text
    head, text outputs)."""
    image_body, image_head, text_body, text_head = split
    n = len(pixels)

    def images(augment: bool) -> torch.Tensor:
        out = []
        for start in tqdm(range(0, n, chunk), desc="locked image tower", unit="batch", leave=False):
            batch = pixels[start:start + chunk]
            out.append(image_body((_augment(batch, cfg, generator) if augment else batch).to(device)))
        return torch.cat(out)

    views = [images(True), images(True)] if cfg.image_weight > 0 else [images(False)]
    text_out = torch.cat([text_body(_to({k: v[start:start + chunk] for k, v in tokens.items()}, device))
                          for start in range(0, n, chunk)])
    return image_head, views, text_head, text_out


def _eval_locked(model: torch.nn.Module) -> None:
    """Eval mode (running BatchNorm statistics, no dropout) for every module whose parameters are all locked: a
    locked pretrained tower must compute what it computed before training, and its statistics must not drift."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _symmetric_infonce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _augment(batch: torch.Tensor, cfg: PretrainSettings, generator: torch.Generator) -> torch.Tensor:
    """One random view of a preprocessed batch: one shift for the whole batch, fresh noise per pixel."""
    if cfg.augment_shift:
        dy, dx = torch.randint(-cfg.augment_shift, cfg.augment_shift + 1, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
    if cfg.augment_noise:
        batch = batch + cfg.augment_noise * torch.randn(batch.shape, generator=generator)
    return batch
