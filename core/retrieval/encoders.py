"""CLIP-style dual encoders behind one contract (`Encoder`): open_clip models by name (built-in, `hf-hub:`,
`local-dir:`) and transformers CLIPModel / SiglipModel (`hf:`) and their save formats. The short contrastive stage
(`pretrain_contrastive`) is a training loop: core/training/contrastive.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
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

from ..base.dataset import open_image
from ..base.fsutil import atomic_dir

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODEL = "dxrag-tiny-clip"
CONFIG_FILE = "open_clip_config.json"  # the file names open_clip's `local-dir:` scheme looks for
WEIGHTS_FILE = "open_clip_model.safetensors"
HF_PREFIX = "hf:"  # transformers models: hf:org/name (the Hub) or hf:/path (a directory written by save_pretrained)
PRETRAINED_MODEL = "dxrag-effnet-minilm"  # EfficientNet-Lite0 + MiniLM from the weights cache (dxrag.core.weights)
WEIGHTS_REF = "dxrag-weights:"  # in a model config: a directory of the weights cache, resolved when the model loads
# model-config keys dxrag reads itself (open_clip's factory does not know them): module path -> weights name whose
# model.safetensors initialises that module when the model is built afresh; the inference transform
WEIGHTS_INIT_KEY = "dxrag_weights"
PREPROCESS_KEY = "dxrag_preprocess"

ImageLike = Union[Image.Image, str, os.PathLike]
Tokens = dict[str, torch.Tensor]

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
    """A frozen dual encoder: `encode_images` and `encode_texts` return float32 L2-normalised rows.

    Build with `Encoder.load(name)`:
    - an open_clip name: a built-in architecture (with `pretrained`, a tag such as "openai" or a checkpoint path),
      the shipped "dxrag-tiny-clip" (random weights until `pretrain_contrastive`), "hf-hub:org/repo" (e.g.
      BiomedCLIP) or "local-dir:/path" (open_clip's directory format, written by `Encoder.save`);
    - "hf:org/name" or "hf:/path": a transformers CLIPModel or SiglipModel (e.g. hf:google/medsiglip-448,
      hf:flaviagiammarino/pubmed-clip-vit-base-patch32, hf:openai/clip-vit-base-patch32) from the Hub or from a
      directory written by `save_pretrained` / `Encoder.save`.
    `Encoder.load_saved(dir)` reloads whatever `Encoder.save(dir)` wrote. `name` identifies the architecture;
    `weights_hash` identifies the weights; an index records both.

    A back-end provides `dim`, `visual` (the image tower: preprocessed pixels -> unnormalised image embedding, the
    module query towers copy), `preprocess_images`, `tokenize`, `text_features`, `logit_scale` and `save`.
    """

    def __init__(self, model: torch.nn.Module, name: str):
        from ..fast_convs import pin_convs

        pin_convs(model)  # under the CPU pin: one kernel per convolution, depthwise ones fast (core/fast_convs.py)
        self.model = model
        self.name = name
        self._weights_hash: str | None = None
        self.freeze()

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> "Encoder":
        """Create the model, its inference transform and tokenizer. Nothing is downloaded for `local-dir:` names,
        `hf:` directories or the shipped tiny config; Hub names and pretrained tags download unless already in the
        HF cache."""
        if name.startswith(HF_PREFIX):
            from .hf_clip import HFEncoder

            if pretrained is not None:
                raise ValueError(f"encoder {name!r}: 'pretrained' ({pretrained!r}) applies to open_clip built-in "
                                 f"architectures only; an hf: model carries its weights (set pretrained to null)")
            return HFEncoder.from_name(name, device)
        return OpenCLIPEncoder.from_name(name, pretrained, device)

    @classmethod
    def load_saved(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Encoder":
        """Reload a directory written by `Encoder.save`, whichever back-end wrote it; name and weights hash travel
        with it (a replaced weights file is refused)."""
        from .hf_clip import MARKER_FILE

        directory = Path(directory)
        if (directory / CONFIG_FILE).is_file():
            return cls.load(f"local-dir:{directory}", device=device)
        if (directory / MARKER_FILE).is_file():
            return cls.load(f"{HF_PREFIX}{directory}", device=device)
        raise FileNotFoundError(f"{directory}: not an encoder directory written by Encoder.save (it holds neither "
                                f"{CONFIG_FILE} nor {MARKER_FILE})")

    # ------------------------------------------------------------------------------------------------ back-end

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def visual(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        """The learned log temperature of the image-text logits (trained by `pretrain_contrastive`)."""
        return self.model.logit_scale

    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """PIL images or image paths -> the model's input batch (CPU float tensor). Unreadable files raise an
        error naming the file."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Texts -> the text tower's input tensors (CPU), truncated to the model's context."""
        raise NotImplementedError

    def text_features(self, tokens: Tokens) -> torch.Tensor:
        """Tokenized texts (on the model's device) -> unnormalised text embeddings, with gradients if enabled."""
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> Path:
        raise NotImplementedError

    def tower_split(self):
        """Where a back-end can say so: the towers as (image body, image head, text body, text head), the bodies
        being what `lock_towers` freezes (`pretrain_contrastive` then computes them once); None otherwise."""
        return None

    def lock_towers(self, unlocked_image_groups: int = 0, unlocked_text_layers: int = 0) -> None:
        """LiT-style locking for `pretrain_contrastive`: freeze both towers except their projections (and the last
        `unlocked_*` layer groups / transformer layers). Back-ends that cannot say so refuse."""
        raise ValueError(f"encoder {self.name!r}: locking the towers (retriever.pretrain.lock_towers) is supported "
                         f"for open_clip models only")

    # ------------------------------------------------------------------------------------------------ shared

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (on the model's device) -> unnormalised image embeddings, with gradients if enabled."""
        return self.visual(pixels)

    @torch.no_grad()
    def encode_image_tensor(self, batch: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Preprocessed image batch -> float32 L2-normalised embeddings (n, dim)."""
        out = []
        for start in range(0, len(batch), batch_size):
            x = batch[start:start + batch_size].to(self.device)
            out.append(F.normalize(self.image_features(x).float(), dim=-1).cpu().numpy())
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
            tokens = _to(self.tokenize(list(texts[start:start + batch_size])), self.device)
            out.append(F.normalize(self.text_features(tokens).float(), dim=-1).cpu().numpy())
        return _stack(out, self.dim)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _random_init_quiet(active: bool):
    """open_clip warns on the root logger whenever a model is built without weights; for a built-in architecture asked
    for with no pretrained tag (the tiny embedded encoder) that is the intent, not a problem, so the warning is
    dropped there (and only there: a failed load of requested weights still warns)."""
    if not active:
        yield
        return
    filt = _DropRandomInitWarning()
    logging.getLogger().addFilter(filt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(filt)


class OpenCLIPEncoder(Encoder):
    """An open_clip CLIP model with its inference transform and tokenizer; saves as open_clip's `local-dir:`."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, name: str, model_cfg: dict[str, Any]):
        super().__init__(model, name)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg

    @classmethod
    def from_name(cls, name: str, pretrained: str | None = None,
                  device: str | torch.device = "cpu") -> "OpenCLIPEncoder":
        schema, identifier = parse_model_name(name)
        recorded_name = name
        if schema == "local-dir":
            config_path = Path(identifier) / CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path}: not found; a 'local-dir:' encoder directory holds "
                                        f"{CONFIG_FILE} and {WEIGHTS_FILE} (write one with Encoder.save; a "
                                        f"transformers model directory loads as 'hf:{identifier}')")
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
                                 f"{TINY_MODEL!r} or 'ViT-B-32', 'hf-hub:org/repo', 'local-dir:/path', or a "
                                 f"transformers CLIP/SigLIP model as 'hf:org/name' or 'hf:/path'")
        else:
            model_cfg = open_clip.get_model_config(name)
        if model_cfg is not None and uses_managed_weights(model_cfg):
            if pretrained is not None:
                raise ValueError(f"encoder {name!r}: its weights come from the dxrag weights cache; 'pretrained' "
                                 f"({pretrained!r}) does not apply (set it to null)")
            local = Path(identifier) if schema == "local-dir" else None
            model, preprocess, tokenizer = _build_managed(
                model_cfg, checkpoint=local / WEIGHTS_FILE if local else None,
                preprocess_cfg=raw.get("preprocess_cfg") if local else None, device=device)
            encoder = cls(model, preprocess, tokenizer, recorded_name, model_cfg)
            if local is not None:
                _check_saved_hash(encoder, raw, config_path)
            return encoder
        with _random_init_quiet(schema is None and pretrained is None):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        if schema is None and pretrained is None:
            log.info("%s: no pretrained tag given, weights initialised randomly", name)
        tokenizer = open_clip.get_tokenizer(name)
        encoder = cls(model, preprocess, tokenizer, recorded_name, model_cfg)
        if schema == "local-dir":
            _check_saved_hash(encoder, raw, config_path)
        return encoder

    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return torch.stack([self.preprocess(im.convert("RGB")) for im in _open_images(images)])

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        return {"text": self.tokenizer(list(texts))}

    def text_features(self, tokens: Tokens) -> torch.Tensor:
        return self.model.encode_text(tokens["text"])

    def tower_split(self):
        """(image body, image head, text body, text head) with image_features(x) == image head(image body(x)) and
        text_features(t) == text head(text body(t)), for a timm image tower with an HF text tower (the heads are the
        projections LiT trains); None for other architectures."""
        from open_clip.hf_model import HFTextEncoder
        from open_clip.timm_model import TimmModel

        visual, text = self.model.visual, getattr(self.model, "text", None)
        if not (isinstance(visual, TimmModel) and isinstance(text, HFTextEncoder)):
            return None

        def text_body(tokens: Tokens) -> torch.Tensor:
            ids = tokens["text"]
            mask = (ids != text.config.pad_token_id).long()
            return text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask)

        return visual.trunk, visual.head, text_body, text.proj

    def lock_towers(self, unlocked_image_groups: int = 0, unlocked_text_layers: int = 0) -> None:
        from open_clip.hf_model import HFTextEncoder

        self.model.lock_image_tower(unlocked_groups=unlocked_image_groups, freeze_bn_stats=False)
        text = getattr(self.model, "text", None)
        if not (unlocked_text_layers and isinstance(text, HFTextEncoder)):
            self.model.lock_text_tower(unlocked_layers=unlocked_text_layers, freeze_layer_norm=True)
            return
        # open_clip's partial unlock of an HF tower looks up per-architecture names it lacks for BERT: lock it all,
        # then unlock the last layers of the encoder stack
        text.lock(0, freeze_layer_norm=True)
        layers = getattr(getattr(text.transformer, "encoder", None), "layer", None)
        if layers is None or unlocked_text_layers > len(layers):
            raise ValueError(f"encoder {self.name!r}: unlocked_text_layers={unlocked_text_layers} but the text tower "
                             f"has {0 if layers is None else len(layers)} encoder layers to unlock")
        for layer in layers[len(layers) - unlocked_text_layers:]:
            layer.requires_grad_(True)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write an open_clip `local-dir:` directory (open_clip_config.json + open_clip_model.safetensors), atomically.
        Load it back with `Encoder.load_saved(out_dir)`; the model name and weights hash travel with it."""
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
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
        return out


def _check_saved_hash(encoder: Encoder, raw: dict[str, Any], config_path: Path) -> None:
    if raw.get("weights_hash") not in (None, encoder.weights_hash):
        raise ValueError(f"{config_path}: field 'weights_hash' is {raw['weights_hash']} but the weights in "
                         f"{config_path.parent} hash to {encoder.weights_hash}; the weights file was replaced after "
                         f"Encoder.save (save the encoder again to record its new weights)")


def uses_managed_weights(model_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip model config names directories of the dxrag weights cache (see `_build_managed`)."""
    return WEIGHTS_INIT_KEY in model_cfg or WEIGHTS_REF in json.dumps(model_cfg)


def _resolve_weight_refs(value: Any) -> Any:
    """A copy of a model config with every "dxrag-weights:NAME" string replaced by the installed directory of NAME
    (`dxrag.core.weights.path`, which says what to install when it is absent)."""
    from .. import weights

    if isinstance(value, dict):
        return {k: _resolve_weight_refs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_weight_refs(v) for v in value]
    if isinstance(value, str) and value.startswith(WEIGHTS_REF):
        return str(weights.path(value[len(WEIGHTS_REF):]))
    return value


def _build_managed(model_cfg: dict[str, Any], checkpoint: Path | None, preprocess_cfg: dict | None,
                   device: str | torch.device):
    """Build an open_clip CustomTextCLIP whose towers come from the dxrag weights cache (e.g. dxrag-effnet-minilm:
    timm EfficientNet-Lite0 + the MiniLM transformers tower). The config keeps "dxrag-weights:NAME" references, not
    paths, and is saved that way, so a saved encoder is portable: the references are resolved on this machine at
    every load. Built afresh (`checkpoint` None), the HF tower loads its pretrained weights and each module listed
    under "dxrag_weights" gets the state dict of its weights entry; reloaded, the checkpoint (all weights) is
    loaded strictly."""
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip.model import set_model_preprocess_cfg
    from safetensors.torch import load_file

    from .. import weights

    cfg = _resolve_weight_refs({k: v for k, v in model_cfg.items() if k not in (WEIGHTS_INIT_KEY, PREPROCESS_KEY)})
    cfg.pop("custom_text", None)
    text_cfg = dict(cfg.pop("text_cfg"))
    text_cfg["hf_model_pretrained"] = checkpoint is None
    with _quiet_transformers():
        model = CustomTextCLIP(vision_cfg=cfg.pop("vision_cfg"), text_cfg=text_cfg, **cfg)
    if checkpoint is None:
        for module_path, weights_name in model_cfg.get(WEIGHTS_INIT_KEY, {}).items():
            # a classifier head of the source (timm's, with num_classes=0 in open_clip) falls off the end
            weights.load_into(model.get_submodule(module_path), weights_name)
    else:
        model.load_state_dict(load_file(str(checkpoint)), strict=True)
    pp = dict(dataclasses.asdict(PreprocessCfg()))
    pp.update(preprocess_cfg if preprocess_cfg is not None else model_cfg.get(PREPROCESS_KEY, {}))
    pp_cfg = PreprocessCfg(**pp)
    set_model_preprocess_cfg(model, dataclasses.asdict(pp_cfg))
    tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    return model.to(device), image_transform_v2(pp_cfg, is_train=False), tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs that a bare BertModel has unused pooler weights; the HF tower uses its hidden states."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_images(images: Sequence[ImageLike]) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else open_image(Path(im)) for im in images]


def _to(tokens: Tokens, device: torch.device) -> Tokens:
    return {k: v.to(device) for k, v in tokens.items()}


def _stack(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks).astype(np.float32, copy=False))

