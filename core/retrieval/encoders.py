"""CLIP-style dual encoders by open_clip name (built-in, `hf-hub:`, `local-dir:`), their safetensors save format, and
the short contrastive pre-training that turns the shipped tiny config into the embedded default's backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import open_clip
from open_clip.factory import parse_model_name
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..dataset import open_image
from .index import replace_dir

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODEL = "dxrag-tiny-clip"
CONFIG_FILE = "open_clip_config.json"  # the file names open_clip's `local-dir:` scheme looks for
WEIGHTS_FILE = "open_clip_model.safetensors"

ImageLike = Union[Image.Image, str, os.PathLike]

open_clip.add_model_config(MODEL_CONFIG_DIR)


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: every tensor's name, dtype, shape and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Encoder:
    """A frozen open_clip dual encoder: `encode_images` and `encode_texts` return float32 L2-normalised rows.

    Build with `Encoder.load(name)`. `name` is an open_clip model name: a built-in architecture (with `pretrained`,
    a tag such as "openai" or a checkpoint path), the shipped "dxrag-tiny-clip" (random weights until
    `pretrain_contrastive`), "hf-hub:org/repo" (e.g. BiomedCLIP) or "local-dir:/path" (a directory written by
    `Encoder.save`). `name` identifies the architecture; `weights_hash` identifies the weights; an index records both.
    """

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, name: str, model_cfg: dict[str, Any]):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.model_cfg = model_cfg
        self._weights_hash: str | None = None
        self.freeze()

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> "Encoder":
        """Create the model, its inference transform and tokenizer. Nothing is downloaded for `local-dir:` names or
        the shipped tiny config; `hf-hub:` names and pretrained tags download unless already in the HF cache."""
        schema, identifier = parse_model_name(name)
        recorded_name = name
        if schema == "local-dir":
            config_path = Path(identifier) / CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path}: not found; a 'local-dir:' encoder directory holds "
                                        f"{CONFIG_FILE} and {WEIGHTS_FILE} (write one with Encoder.save)")
            with open(config_path, encoding="utf-8") as f:
                raw = json.load(f)
            model_cfg = raw.get("model_cfg")
            if not isinstance(model_cfg, dict):
                raise ValueError(f"{config_path}: missing object field 'model_cfg' (the open_clip model config)")
            recorded_name = raw.get("model_name", name)
        elif schema is None:
            model_cfg = open_clip.get_model_config(name.replace("/", "-"))  # open_clip's own name cleaning
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model {name!r}; valid: a built-in name such as "
                                 f"{TINY_MODEL!r} or 'ViT-B-32', 'hf-hub:org/repo', or 'local-dir:/path'")
        else:
            model_cfg = open_clip.get_model_config(name)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
        encoder = cls(model, preprocess, tokenizer, recorded_name, model_cfg)
        if schema == "local-dir" and raw.get("weights_hash") not in (None, encoder.weights_hash):
            raise ValueError(f"{config_path}: field 'weights_hash' is {raw['weights_hash']} but the weights in "
                             f"{identifier} hash to {encoder.weights_hash}; the weights file was replaced after "
                             f"Encoder.save (save the encoder again to record its new weights)")
        return encoder

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def visual(self) -> torch.nn.Module:
        """The image tower (query towers copy it)."""
        return self.model.visual

    @property
    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = state_dict_hash(self.model)
        return self._weights_hash

    def freeze(self) -> None:
        """Put the model in eval mode without gradients; forget the cached weights hash (weights may have changed)."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._weights_hash = None

    def to(self, device: str | torch.device) -> "Encoder":
        self.model.to(device)
        return self

    # ------------------------------------------------------------------------------------------------ encoding

    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """PIL images or image paths -> the model's input batch (CPU float tensor). Unreadable files raise an
        error naming the file."""
        pil = [im if isinstance(im, Image.Image) else open_image(Path(im)) for im in images]
        return torch.stack([self.preprocess(im.convert("RGB")) for im in pil])

    @torch.no_grad()
    def encode_image_tensor(self, batch: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Preprocessed image batch -> float32 L2-normalised embeddings (n, dim)."""
        out = []
        for start in range(0, len(batch), batch_size):
            x = batch[start:start + batch_size].to(self.device)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy())
        return _stack(out, self.dim)

    def encode_images(self, images: Sequence[ImageLike], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """PIL images or paths -> float32 L2-normalised embeddings (n, dim), preprocessing one batch at a time."""
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="encode images", disable=not progress,
                          unit="batch"):
            out.append(self.encode_image_tensor(self.preprocess_images(images[start:start + batch_size]), batch_size))
        return _stack(out, self.dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Texts -> float32 L2-normalised embeddings (n, dim); texts longer than the context are truncated."""
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode texts", disable=not progress, unit="batch"):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
        return _stack(out, self.dim)

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write an open_clip `local-dir:` directory (open_clip_config.json + open_clip_model.safetensors), atomically.
        Load it back with `Encoder.load(f"local-dir:{out_dir}")`; the model name and weights hash travel with it."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            config = {
                "model_name": self.name,
                "weights_hash": self.weights_hash,
                "model_cfg": self.model_cfg,
                "preprocess_cfg": dict(self.model.visual.preprocess_cfg),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"model_name": self.name,
                                                                 "weights_hash": self.weights_hash})
            if isinstance(self.tokenizer, open_clip.tokenizer.HFTokenizer):
                # open_clip reads the HF tokenizer of a `local-dir:` model (BiomedCLIP's PubMedBERT) from the directory
                self.tokenizer.tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def _stack(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks).astype(np.float32, copy=False))


# ---------------------------------------------------------------------------------------------- contrastive stage


def _warmup_cosine(step: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 10% of the steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))


@dataclass
class PretrainConfig:
    """The short contrastive stage that stands in for a general-purpose pretrained backbone: image <-> text InfoNCE,
    plus (`image_weight` > 0) an image <-> image InfoNCE between two augmented views of each image (random shift of up
    to `augment_shift` pixels, Gaussian noise of std `augment_noise` in normalised units). Without the image term the
    image embeddings of a corpus of similar-looking images collapse into a narrow cone (cosine about 0.99 between all
    images of the embedded default), which leaves the image head a few thousandths of cosine to rank by."""

    epochs: int = 20  # on the synthetic corpus the loss sits near log(batch) for a few epochs before it falls
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    image_weight: float = 1.0
    image_temperature: float = 0.2
    augment_noise: float = 0.3
    augment_shift: int = 1


def pretrain_contrastive(encoder: Encoder, images: torch.Tensor | Sequence[ImageLike], texts: Sequence[str],
                         config: PretrainConfig | None = None) -> list[float]:
    """Train both towers with the symmetric CLIP loss on paired (image, text) rows, plus the image <-> image loss on
    augmented views (see `PretrainConfig`); returns the mean total loss per epoch.

    `images` is a preprocessed batch (`encoder.preprocess_images`) or PIL images / paths, row i paired with texts[i].
    The encoder is frozen again afterwards (its `weights_hash` changes).
    """
    cfg = config or PretrainConfig()
    if len(images) != len(texts):
        raise ValueError(f"pretrain_contrastive: {len(images)} images but {len(texts)} texts; rows must pair up")
    if len(texts) < 2:
        raise ValueError("pretrain_contrastive: need at least 2 pairs (in-batch negatives)")
    pixels = images if isinstance(images, torch.Tensor) else encoder.preprocess_images(images)
    tokens = encoder.tokenizer(list(texts))
    model, device = encoder.model, encoder.device
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
                batch = pixels[idx]
                views = [_augment(batch, cfg, generator) for _ in range(2)] if cfg.image_weight > 0 else [batch]
                img_f, txt_f, scale = model(views[0].to(device), tokens[idx].to(device))
                target = torch.arange(len(idx), device=device)
                loss = _symmetric_infonce(scale * img_f @ txt_f.T, target)
                if cfg.image_weight > 0:
                    other = F.normalize(model.encode_image(views[1].to(device)), dim=-1)
                    loss = loss + cfg.image_weight * _symmetric_infonce(img_f @ other.T / cfg.image_temperature,
                                                                        target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, np.log(100))
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


def _symmetric_infonce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _augment(batch: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of a preprocessed batch: one shift for the whole batch, fresh noise per pixel."""
    if cfg.augment_shift:
        dy, dx = torch.randint(-cfg.augment_shift, cfg.augment_shift + 1, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
    if cfg.augment_noise:
        batch = batch + cfg.augment_noise * torch.randn(batch.shape, generator=generator)
    return batch
