"""transformers CLIPModel / SiglipModel as an `Encoder` (`hf:org/name` or `hf:/dir`): per-model-type data
(`HF_CLIP_TYPES`; the reader's model types are `core/reader/families.py` FAMILIES), the image tower that query heads
copy, and the save_pretrained directory format with dxrag's weights-hash marker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..base.fsutil import atomic_dir
from .encoders import HF_PREFIX, Encoder, ImageLike, Tokens, _open_images

MARKER_FILE = "dxrag_encoder.json"  # next to config.json: the name the encoder was loaded by and its weights hash


@dataclass(frozen=True)
class HFClipType:
    """What differs between dual-encoder model types; the rest is the shared `get_*_features` API."""

    image_projection: str | None  # model attribute applied to the vision tower's pooled output (None: none)
    text_padding: str  # tokenizer padding: SigLIP was trained on texts padded to the full context ("max_length")
    dim: Callable[[Any], int]  # embedding size from the model config


HF_CLIP_TYPES: dict[str, HFClipType] = {
    "clip": HFClipType(image_projection="visual_projection", text_padding="longest",
                     dim=lambda config: config.projection_dim),
    "siglip": HFClipType(image_projection=None, text_padding="max_length",
                       dim=lambda config: config.vision_config.hidden_size),
}


class HFImageTower(torch.nn.Module):
    """Preprocessed pixels -> unnormalised image embeddings: the vision model's pooled output, then the model type's
    projection; it holds the model's own submodules, so a deep copy is an independent trainable tower."""

    def __init__(self, vision_model: torch.nn.Module, projection: torch.nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection if projection is not None else torch.nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_model(pixel_values=pixels).pooler_output)


class HFEncoder(Encoder):
    """A transformers CLIPModel or SiglipModel with its image processor and tokenizer, in float32."""

    def __init__(self, model: torch.nn.Module, image_processor, tokenizer, name: str):
        model_type = model.config.model_type
        if model_type not in HF_CLIP_TYPES:
            raise ValueError(f"encoder {name!r}: model type {model_type!r} is not supported; valid: "
                             f"{sorted(HF_CLIP_TYPES)} (transformers CLIPModel / SiglipModel)")
        self.clip_type = HF_CLIP_TYPES[model_type]
        projection = getattr(model, self.clip_type.image_projection) if self.clip_type.image_projection else None
        self._visual = HFImageTower(model.vision_model, projection)
        super().__init__(model, name)
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_name(cls, name: str, device: str | torch.device = "cpu") -> "HFEncoder":
        """Load `hf:org/name` (Hub or HF cache) or `hf:/path` (a local directory). A directory written by
        `Encoder.save` restores its recorded name and must still hold the weights it recorded."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        identifier = name[len(HF_PREFIX):]
        if not identifier:
            raise ValueError(f"encoder {name!r}: give a model after 'hf:', e.g. hf:google/medsiglip-448 or hf:/path")
        local = Path(identifier).expanduser()
        if local.is_dir():
            identifier = str(local)
        elif identifier.startswith((".", "/", "~")):
            raise FileNotFoundError(f"encoder {name!r}: directory {identifier} not found")
        try:
            config = AutoConfig.from_pretrained(identifier)
        except OSError as e:
            raise OSError(f"encoder {name!r}: cannot read its config ({e}); offline, point hf: at a local "
                          f"directory or download the model into the HF cache first") from None
        if config.model_type not in HF_CLIP_TYPES:
            raise ValueError(f"encoder {name!r}: model type {config.model_type!r} is not supported; valid: "
                             f"{sorted(HF_CLIP_TYPES)} (transformers CLIPModel / SiglipModel)")
        if config.model_type == "siglip" and not getattr(config.vision_config, "vision_use_head", True):
            raise ValueError(f"encoder {name!r}: vision_use_head is false, so the model has no pooled image "
                             f"embedding to retrieve with")
        model = AutoModel.from_pretrained(identifier, config=config, dtype=torch.float32).to(device)
        image_processor = AutoImageProcessor.from_pretrained(identifier)
        tokenizer = AutoTokenizer.from_pretrained(identifier)
        marker = local / MARKER_FILE if local.is_dir() else None
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker is not None and marker.is_file() else {}
        encoder = cls(model, image_processor, tokenizer, recorded.get("model_name", name))
        if recorded.get("weights_hash") not in (None, encoder.weights_hash):
            raise ValueError(f"{marker}: field 'weights_hash' is {recorded['weights_hash']} but the weights in "
                             f"{identifier} hash to {encoder.weights_hash}; the weights were replaced after "
                             f"Encoder.save (save the encoder again to record its new weights)")
        return encoder

    @property
    def dim(self) -> int:
        return int(self.clip_type.dim(self.model.config))

    @property
    def visual(self) -> torch.nn.Module:
        return self._visual

    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        pil = [im.convert("RGB") for im in _open_images(images)]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"].float()

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        encoded = self.tokenizer(list(texts), padding=self.clip_type.text_padding, truncation=True,
                                 max_length=max_length, return_tensors="pt")
        # the keys the tokenizer returns are the ones the model was trained with (SigLIP: no attention mask)
        return {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}

    def text_features(self, tokens: Tokens) -> torch.Tensor:
        return self.model.get_text_features(**tokens).pooler_output

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a transformers directory (save_pretrained of model, image processor and tokenizer, safetensors)
        plus dxrag_encoder.json, atomically. Load it back with `Encoder.load_saved(out_dir)` or `hf:{out_dir}`."""
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            self.model.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / MARKER_FILE).write_text(json.dumps({"model_name": self.name, "weights_hash": self.weights_hash},
                                                      indent=2), encoding="utf-8")
        return out
