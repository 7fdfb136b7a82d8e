"""The reader model: loading (`from_pretrained` of any family in `families.FAMILIES`, or a tiny random-weight model with
an offline tokenizer), saving, and batched per-context scoring `log p(answer | query, context)` over candidate answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.answers import OPEN
from ..base.dataset import Dataset, DatasetError, open_image
from .. import distributed
from ..base.fsutil import atomic_dir
from ..base.records import CorpusItem, Query
from .families import FAMILIES, Family, build_tiny, family_of, mrope_continuation
from .prompts import LABEL_QUESTION_WORDS, LEGEND_WORDS, PromptRenderer, prompt_images
from .settings import LoraSettings, ReaderSettings

log = logging.getLogger(__name__)

# The text the assistant header is cut from (answer tokens are the suffix of tokenizing header + answer).
_HEADER_SENTINEL = "\x00end of the user turn\x00"


class ReaderError(ValueError):
    """Bad reader input (unreadable image, over-long prompt, ambiguous candidates, unsupported model); the message
    names the request and field at fault and what would be valid."""


@dataclass(frozen=True)
class ScoreRequest:
    """Score the candidate answers of `query` given one retrieved item (`context`), or closed-book (None).
    `candidates` overrides `query.candidates`; results follow its order.

    `share_prefix`: the prompt is tokenized as two pieces, the prefix up to the question's text (chat-template start,
    context image and text, query image; `PromptRenderer.split`) and the suffix (question, options, assistant header),
    whose tokens follow the prefix's. Requests with the same prefix (the per-label questions of one (query, context)
    of a multi-label task) then encode it once and continue from its KV cache (`ReaderSettings.share_prefix`). The
    scores do not depend on whether the prefix is shared: the unshared path feeds the same two pieces in one pass.
    Tokenizing the pieces apart is what makes the two paths one token sequence (a BPE or SentencePiece tokenizer
    could merge across the cut if the whole text were tokenized); the cut follows the query image's placeholder, a
    special token in every family, where whole-text tokenization splits as well (tested for every family)."""

    query: Query
    context: CorpusItem | None
    candidates: tuple[str, ...] | None = None
    share_prefix: bool = False

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(self.candidates) if self.candidates is not None else tuple(self.query.candidates)

    def prompt_size(self) -> int:
        """Rough prompt length for length-sorted batching: images first, then characters of text."""
        context = self.context
        return 100_000 * (1 + (context is not None)) + len(self.query.question) + len(context.text if context else "")

    def describe(self) -> str:
        where = f"query {self.query.id!r}"
        return where + (f" with context {self.context.id!r}" if self.context is not None else " (closed-book)")


class _PrefixOnly(tuple):
    """The candidates of a prompt item (query, context, candidates) that stands for the prompt's prefix alone
    (`PromptRenderer.split`): the shared-prefix requests' prompts are the prefix followed by suffix tokens."""


@dataclass
class _Prompt:
    """Fast path: one request's prompt, tokenized with its image tokens expanded, and its M-RoPE positions."""

    ids: list[int]
    images: list[str]  # absolute image paths in placeholder order
    positions: np.ndarray  # (3, len(ids))
    next_position: int  # position of the first token after the prompt


@dataclass
class _Forward:
    """A prompt batch's forward pass: logits of the last kept positions, the left-padded attention mask, the KV cache
    (when asked for) and what the family's continuation needs (`Family.prefill_state`)."""

    logits: torch.Tensor
    mask: torch.Tensor
    cache: object | None
    state: dict


# ------------------------------------------------------------------------------------------------------- tiny reader


def vocabulary_from_dataset(dataset: Dataset) -> tuple[list[str], list[str]]:
    """Texts (questions, corpus texts, open answers, the legend) and answers (labels, candidates; yes/no of the
    per-label questions of a multi-label task) to build the tiny tokenizer from. Open answers are texts, so their
    words are separate tokens and generating one takes several steps."""
    from ..tasks import NO, YES

    queries = [q for split in dataset.queries.values() for q in split]
    texts = [q.question for q in queries] + [item.text for item in dataset.corpus]
    answers = list(dataset.meta.labels) + [c for q in queries for c in q.candidates]
    texts += [q.label for q in queries if q.answer_type == OPEN]
    if dataset.meta.task == "multilabel":
        texts += list(LABEL_QUESTION_WORDS)
        answers += [YES, NO]
    if dataset.meta.legend:
        texts += list(LEGEND_WORDS) + list(dataset.meta.legend.values())
    return texts, answers


# ------------------------------------------------------------------------------------------------------------ reader


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ReaderError(f"reader dtype {name!r} is not one of {['auto', *dtypes]}")
    return dtypes[name]


def _family(model_type: str, where: str) -> Family:
    try:
        return family_of(model_type, where)
    except ValueError as e:
        raise ReaderError(str(e)) from None


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
            images = []
            for path in part:
                try:
                    images.append(open_image(Path(path)))
                except DatasetError as e:
                    raise ReaderError(f"{wanted[path]}: {e}") from None
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


class Reader:
    """An image-text-to-text LVLM with its processor, scoring candidate answers per (query, context).

    Scoring runs the processor and `model(**inputs)` (the generic path, exact for every family in `FAMILIES`), or for
    families whose adapter has `fast_path` the equivalent cached-vision-features path (images encoded once per
    distinct image). Images are read from `image_root` (the dataset directory) given to `score`.
    """

    def __init__(self, model, processor, config: ReaderSettings):
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model  # the HF model, or a PeftModel wrapping it
        self.hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        hf_config = self.hf_model.config
        self.family = _family(hf_config.model_type, f"reader model {config.model!r}")
        try:
            config.check()
        except ValueError as e:
            raise ReaderError(str(e)) from None
        self.device = next(self.hf_model.parameters()).device
        self.image_token_id = getattr(hf_config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(hf_config, "image_token_index", None)
        text_config = hf_config.get_text_config()
        self.max_length = config.max_length or text_config.max_position_embeddings
        self.tokenizer.padding_side = "left"  # prompts end where the answer starts
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.unk_id = self.tokenizer.unk_token_id
        self.fast = self.family.fast_path and config.fast_path
        if self.fast:
            self.merge = hf_config.vision_config.spatial_merge_size
        self.placeholder = processor.image_token  # what the chat template renders an image as
        self.tower_cache = None
        if self.family.tower:
            _freeze(self.hf_model.get_submodule(self.family.tower))
        if self.family.tower_features is not None and config.fast_path:
            self.tower_cache = VisionFeatureCache(self)
        self._pixels: OrderedDict[str, tuple[torch.Tensor, tuple[int, int, int]]] = OrderedDict()
        self._answer_ids: dict[str, list[int]] = {}
        self._grid_offsets: dict[tuple[int, int, int], np.ndarray] = {}
        self._render = PromptRenderer(processor)
        self._header = self._assistant_header()

    def _assistant_header(self) -> str:
        """The chat template's text between the end of the user's content and the answer."""
        try:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": _HEADER_SENTINEL}]}], tokenize=False,
                add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a processor without a (usable) chat template
            raise ReaderError(f"reader model {self.config.model!r}: the processor's chat template cannot render a "
                              f"user turn ({e}); save the processor with a chat template") from None
        if text.count(_HEADER_SENTINEL) != 1:
            raise ReaderError(f"reader model {self.config.model!r}: the chat template does not insert the user's "
                              f"text verbatim; prompts cannot be scored")
        return text.split(_HEADER_SENTINEL)[1]

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, config: ReaderSettings, dataset: Dataset | None = None, seed: int = 0) -> "Reader":
        """Build the tiny reader (`model: tiny`, vocabulary from `dataset`, weights from `seed`, family
        `tiny.family`) or load one with `from_pretrained` (a hub name or a local directory)."""
        device = torch.device(distributed.resolve_device(config.device))
        dtype = _resolve_dtype(config.dtype, device)
        if config.model == "tiny":
            if dataset is None:
                raise ReaderError("reader model 'tiny' builds its vocabulary from the dataset; pass dataset=")
            family = _family(config.tiny.family, "reader.tiny.family")
            try:
                processor, model = build_tiny(family, *vocabulary_from_dataset(dataset), config.tiny, seed=seed)
            except ValueError as e:
                raise ReaderError(str(e)) from None
        else:
            from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

            from .build import recipe_of

            if recipe_of(config.model) is not None and not Path(config.model).is_dir():
                raise ReaderError(f"reader model {config.model!r} is a recipe: `dxrag run` builds it into the run "
                                  f"directory, `dxrag reader build {config.model} --out DIR` into DIR (then "
                                  f"reader.model: DIR)")

            family = _family(AutoConfig.from_pretrained(config.model).model_type, f"reader model {config.model!r}")
            sizes = {}
            if config.max_pixels:
                if family.pixel_budget is None:
                    raise ReaderError(f"reader.max_pixels: model type {family.model_type!r} resizes images to a fixed "
                                      f"size; set max_pixels to null (families with a pixel budget: "
                                      f"{sorted(k for k, f in FAMILIES.items() if f.pixel_budget)})")
                sizes = family.pixel_budget(config.max_pixels)
            processor = AutoProcessor.from_pretrained(config.model, **sizes)
            model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
        model = model.to(device=device, dtype=dtype).eval()
        if config.adapter:
            from peft import PeftModel

            # with `lora` settings too, fine-tuning continues the loaded adapters
            model = PeftModel.from_pretrained(model, config.adapter, is_trainable=config.lora is not None).eval()
        log.info("reader %s (%s): %s, %.2f M parameters on %s (%s)", config.model, family.model_type,
                 type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, device, dtype)
        return cls(model, processor, config)

    def add_lora(self, settings: LoraSettings) -> None:
        """Wrap the model with fresh LoRA adapters; afterwards only adapter weights are trainable."""
        from peft import LoraConfig, get_peft_model

        # a family's projector trains beside the adapters and is saved with them (LLaVA's stage 2)
        saved = [self.family.projector.rsplit(".", 1)[-1]] if self.family.projector else None
        lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=settings.target_modules or self.family.lora_targets, bias="none",
                          modules_to_save=saved)
        self.model = get_peft_model(self.hf_model, lora)
        self.hf_model = self.model.get_base_model()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the reader atomically: the full model and processor, or only the LoRA adapters (safetensors) plus
        the processor when adapters are attached (load with `ReaderSettings(model=<base>, adapter=out_dir)`)."""
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.processor.save_pretrained(tmp)
        return out

    # ------------------------------------------------------------------------------------------------ generic path

    def _open_images(self, items: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]], root: Path) -> list:
        out = []
        for query, context, _ in items:
            row = []
            for record, rel in zip(([context] if context is not None else []) + [query],
                                   prompt_images(query, context)):
                kind = "context" if record is context else "query"
                try:
                    row.append(open_image(root / rel))
                except DatasetError as e:
                    raise ReaderError(f"{kind} {record.id!r} field 'image': {e}") from None
            out.append(row)
        return out

    def _prompt_text(self, query: Query, context: CorpusItem | None, candidates: Sequence[str]) -> str:
        """The rendered prompt of an item, or its prefix when its candidates are marked `_PrefixOnly`."""
        if isinstance(candidates, _PrefixOnly):
            return self._render.split(query, context, candidates)[0]
        return self._render(query, context, candidates)

    def _generic_inputs(self, items: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]], root: Path,
                        tails: Sequence[Sequence[int]] | None = None) -> dict:
        """The processor's model inputs for the prompts (left-padded), optionally followed by answer tokens."""
        texts = self._rendered(items)
        images = self._open_images(items, root)
        try:
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                    add_special_tokens=False, **self.family.call_kwargs(self.processor))
        except (ValueError, RuntimeError, TypeError) as e:
            raise ReaderError(f"{self._names(items)}: the processor rejected the prompt ({e})") from None
        inputs = {k: v for k, v in inputs.items() if k not in self.family.drop_inputs}
        if tails is not None:
            inputs = self._append(inputs, tails)
        dtype = self.hf_model.dtype
        return {k: (v.to(self.device, dtype=dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def _rendered(self, items: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]]) -> list[str]:
        """The prompts' texts through the chat template, each checked to hold one placeholder per image."""
        texts = [self._prompt_text(q, c, cands) for q, c, cands in items]
        for (q, c, _), text in zip(items, texts):
            n_images = 1 + (c is not None)
            if text.count(self.placeholder) != n_images:
                raise ReaderError(f"{ScoreRequest(q, c).describe()}: the chat template produced "
                                  f"{text.count(self.placeholder)} image placeholders ({self.placeholder!r}) for "
                                  f"{n_images} images")
        return texts

    @staticmethod
    def _names(items) -> str:
        return "; ".join(ScoreRequest(q, c).describe() for q, c, _ in items)

    def _append(self, inputs: dict, tails: Sequence[Sequence[int]]) -> dict:
        """Re-pad each row as [padding, prompt, tail]: per-token inputs take the family's value at the tail."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, L = ids.shape
        lengths = mask.sum(1).tolist()
        new_L = max(n + len(t) for n, t in zip(lengths, tails))
        per_token = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 2
                     and v.shape[:2] == (B, L) and not torch.is_floating_point(v)}
        fill = {"input_ids": None, "attention_mask": 1, **self.family.tail_fill}
        unknown = sorted(set(per_token) - set(fill))
        if unknown:
            raise ReaderError(f"model type {self.family.model_type!r}: the processor returns per-token inputs "
                              f"{unknown} that the reader cannot extend over answer tokens; add them to the family's "
                              f"tail_fill (core/reader/families.py)")
        out = dict(inputs)
        for key, value in per_token.items():
            pad = self.pad_id if key == "input_ids" else 0
            new = torch.full((B, new_L, *value.shape[2:]), pad, dtype=value.dtype)
            for b, (n, tail) in enumerate(zip(lengths, tails)):
                start = new_L - n - len(tail)
                new[b, start:start + n] = value[b, L - n:]
                if not tail:
                    continue
                how = fill[key]
                if key == "input_ids":
                    new[b, new_L - len(tail):] = torch.tensor(list(tail), dtype=value.dtype)
                elif how == "repeat":
                    new[b, new_L - len(tail):] = value[b, L - 1:L]
                else:
                    new[b, new_L - len(tail):] = how
            out[key] = new
        return out

    def _image_token_counts(self, inputs: dict) -> list[int]:
        if self.image_token_id is None:
            return []
        return (inputs["input_ids"] == self.image_token_id).sum(1).tolist()

    def _generic_forward(self, items, root: Path, tails=None, logits_to_keep: int = 1, use_cache: bool = False,
                         answer_lengths: Sequence[int] | None = None) -> _Forward:
        inputs = self._generic_inputs(items, root, tails)
        tail_lengths = [len(t) for t in tails] if tails is not None else [0] * len(items)
        self._check_lengths(items, [n - t for n, t in zip(inputs["attention_mask"].sum(1).tolist(), tail_lengths)],
                            answer_lengths or tail_lengths)
        try:
            state = self.family.prefill_state(self.hf_model, inputs) if use_cache and self.family.prefill_state else {}
            positions = {"position_ids": state["position_ids"]} if "position_ids" in state else {}
            out = self.hf_model(**inputs, **positions, logits_to_keep=logits_to_keep, use_cache=use_cache)
        except (ValueError, RuntimeError, IndexError) as e:
            counts = self._image_token_counts(inputs)
            images = [1 + (c is not None) for _, c, _ in items]
            raise ReaderError(f"{self._names(items)}: the model rejected the processor's inputs ({e}); the processor "
                              f"yielded {counts} image tokens for {images} images per prompt; its image settings "
                              f"(image_seq_length, patch and image sizes) must match the model's config") from None
        return _Forward(out.logits, inputs["attention_mask"], out.cache if use_cache else None, state)

    def _check_lengths(self, items, prompt_lengths: Sequence[int], answer_lengths: Sequence[int]) -> None:
        for (q, c, _), n, a in zip(items, prompt_lengths, answer_lengths):
            if n + a > self.max_length:
                raise ReaderError(f"{ScoreRequest(q, c).describe()}: prompt of {n} tokens plus an answer of up to {a} "
                                  f"tokens exceeds the reader's context of {self.max_length} tokens; shorten the "
                                  f"context text or raise max_length")

    def _run(self, items, root: Path, tails=None, logits_to_keep: int = 1, use_cache: bool = False,
             features: OrderedDict | None = None, answer_lengths: Sequence[int] | None = None) -> _Forward:
        """One forward pass over the prompts of `items` (+ answer `tails`) on the fast or the generic path;
        `answer_lengths` (default: the tails') is what the length check adds to each prompt."""
        if self.tower_cache is not None:
            return self._tower_forward(items, root, tails, logits_to_keep, use_cache, answer_lengths)
        if not self.fast:
            return self._generic_forward(items, root, tails, logits_to_keep, use_cache, answer_lengths)
        prompts = self._encode(items, root)
        tail_lengths = [len(t) for t in tails] if tails is not None else [0] * len(items)
        self._check_lengths(items, [len(p.ids) for p in prompts], answer_lengths or tail_lengths)
        logits, mask, cache = self._forward(prompts, tails, features, logits_to_keep, use_cache)
        state = {"next_position": torch.tensor([p.next_position + n for p, n in zip(prompts, tail_lengths)],
                                               device=self.device)}
        return _Forward(logits, mask, cache, state)

    # ------------------------------------------------------------------------------------------------ cached tower

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

    # ------------------------------------------------------------------------------------------------ fast path

    def _images(self, wanted: dict[str, str]) -> dict[str, tuple[torch.Tensor, tuple[int, int, int]]]:
        """Preprocessed patches and merged (t, h, w) token grid of each image path (keys; values name the record
        field for errors), preprocessing the uncached ones in one call; LRU-cached by path."""
        missing = [p for p in wanted if p not in self._pixels]
        if missing:
            images = []
            for path in missing:
                try:
                    images.append(open_image(Path(path)))
                except DatasetError as e:
                    raise ReaderError(f"{wanted[path]}: {e}") from None
            out = self.processor.image_processor(images=images, return_tensors="pt")
            sizes = out["image_grid_thw"].prod(-1).tolist()
            for path, pixels, (t, h, w) in zip(missing, out["pixel_values"].split(sizes),
                                               out["image_grid_thw"].tolist()):
                self._pixels[path] = (pixels, (t, h // self.merge, w // self.merge))
        found = {}
        for path in wanted:
            self._pixels.move_to_end(path)
            found[path] = self._pixels[path]
        while len(self._pixels) > max(self.config.image_cache, len(wanted)):
            self._pixels.popitem(last=False)
        return found

    def _grid_positions(self, grid: tuple[int, int, int]) -> np.ndarray:
        """(3, t*h*w) M-RoPE offsets of an image's tokens: temporal, row and column index."""
        offsets = self._grid_offsets.get(grid)
        if offsets is None:
            t, h, w = grid
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            offsets = self._grid_offsets[grid] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        return offsets

    def _encode(self, requests: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]], root: Path) -> list[_Prompt]:
        """Render, tokenize and expand the image placeholders of each (query, context, candidates) prompt."""
        texts = [self._prompt_text(q, c, cands) for q, c, cands in requests]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pixels = self._images(_wanted_images(requests, root))
        prompts = []
        for (query, context, _), ids in zip(requests, token_ids):
            rels = prompt_images(query, context)
            grids = [pixels[str(root / rel)][1] for rel in rels]
            if ids.count(self.image_token_id) != len(grids):
                raise ReaderError(f"query {query.id!r}: the chat template produced "
                                  f"{ids.count(self.image_token_id)} image placeholders for {len(grids)} images")
            expanded: list[int] = []
            positions = []
            cursor = 0
            start = 0
            grid_iter = iter(grids)
            for i in [k for k, tok in enumerate(ids) if tok == self.image_token_id] + [len(ids)]:
                n_text = i - start
                expanded.extend(ids[start:i])
                positions.append(np.broadcast_to(np.arange(cursor, cursor + n_text), (3, n_text)))
                cursor += n_text
                if i == len(ids):
                    break
                grid = next(grid_iter)
                positions.append(cursor + self._grid_positions(grid))
                expanded.extend([self.image_token_id] * (grid[0] * grid[1] * grid[2]))
                cursor += max(grid[1], grid[2])  # Qwen2-VL M-RoPE: text after an image continues past its largest side
                start = i + 1
            prompts.append(_Prompt(expanded, [str(root / rel) for rel in rels],
                                   np.concatenate(positions, axis=1), cursor))
        return prompts

    def _collate(self, prompts: Sequence[_Prompt], tails: Sequence[Sequence[int]] | None = None):
        """Left-padded ids, attention mask and (3, B, L) positions of prompts followed by optional answer tokens."""
        tails = tails or [()] * len(prompts)
        lengths = [len(p.ids) + len(t) for p, t in zip(prompts, tails)]
        L = max(lengths)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        pos = np.zeros((3, len(prompts), L), dtype=np.int64)
        for b, (p, tail, n) in enumerate(zip(prompts, tails, lengths)):
            ids[b, L - n:] = torch.tensor(list(p.ids) + list(tail), dtype=torch.long)
            mask[b, L - n:] = 1
            pos[:, b, L - n:L - n + len(p.ids)] = p.positions
            pos[:, b, L - len(tail):] = p.next_position + np.arange(len(tail))
        return ids.to(self.device), mask.to(self.device), torch.from_numpy(pos).to(self.device)

    def _image_features(self, paths: Iterable[str], cache: OrderedDict[str, torch.Tensor] | None
                        ) -> OrderedDict[str, torch.Tensor]:
        """Vision-tower outputs (merged image tokens) of the distinct images, reusing `cache` when given."""
        feats = OrderedDict() if cache is None else cache
        paths = list(dict.fromkeys(paths))
        for p in paths:
            if p in feats:
                feats.move_to_end(p)
        missing = [p for p in paths if p not in feats]
        if missing:
            pixels = list(self._images({p: p for p in missing}).values())
            grid = torch.tensor([[t, h * self.merge, w * self.merge] for _, (t, h, w) in pixels], device=self.device)
            values = torch.cat([px for px, _ in pixels]).to(self.device, dtype=self.hf_model.dtype)
            out = self.hf_model.model.get_image_features(values, grid, return_dict=True).pooler_output
            feats.update(zip(missing, out))
        return feats

    def _forward(self, prompts: Sequence[_Prompt], tails=None, feature_cache=None, logits_to_keep: int = 1,
                 use_cache: bool = False):
        """One forward pass over prompts (+ tails): returns (logits of the last `logits_to_keep` positions, mask,
        KV cache or None)."""
        ids, mask, pos = self._collate(prompts, tails)
        feats = self._image_features([p for pr in prompts for p in pr.images], feature_cache)
        embeds = self.hf_model.get_input_embeddings()(ids)
        image_embeds = torch.cat([feats[p] for pr in prompts for p in pr.images]).to(embeds.dtype)
        embeds = embeds.masked_scatter((ids == self.image_token_id).unsqueeze(-1), image_embeds)
        out = self.hf_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                            logits_to_keep=logits_to_keep)
        return out.logits, mask, (out.cache if use_cache else None)

    # ------------------------------------------------------------------------------------------------ answers

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as it follows the assistant-turn header: the suffix of tokenizing header + answer
        beyond the header's tokens (SentencePiece/BPE pieces such as a leading-space word then come out as in the
        full prompt)."""
        ids = self._answer_ids.get(answer)
        if ids is None:
            header = self.tokenizer(self._header, add_special_tokens=False)["input_ids"]
            full = self.tokenizer(self._header + answer, add_special_tokens=False)["input_ids"]
            if full[:len(header)] != header:
                raise ReaderError(f"candidate {answer!r} merges with the end of the assistant header "
                                  f"{self._header!r} into other tokens; its log-probability is not defined after "
                                  f"the prompt (start the answer with a word boundary)")
            ids = self._answer_ids[answer] = full[len(header):]
        return ids

    def _candidate_ids(self, request: ScoreRequest) -> list[list[int]]:
        answers = request.answers
        if not answers:
            raise ReaderError(f"{request.describe()}: no candidate answers; give at least one non-empty candidate")
        if len(set(answers)) != len(answers):
            raise ReaderError(f"{request.describe()}: duplicate candidate answers {list(answers)}; candidates must "
                              f"be distinct")
        out = []
        for a in answers:
            try:
                ids = self.answer_ids(a)
            except ReaderError as e:
                raise ReaderError(f"{request.describe()}: {e}") from None
            if not ids:
                raise ReaderError(f"{request.describe()}: candidate {a!r} encodes to no tokens; candidates must "
                                  f"contain at least one token (a non-empty, non-whitespace string)")
            if self.unk_id is not None and self.unk_id in ids:
                raise ReaderError(f"{request.describe()}: candidate {a!r} contains words outside the tokenizer's "
                                  f"vocabulary (unknown token); build the tiny reader from a dataset that lists it")
            out.append(ids)
        if len(out) > 1 and any(a != b and a == b[:len(a)] for a in out for b in out):
            # a candidate that is a prefix of another would win by construction: score complete answers instead
            end = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token) if self.tokenizer.eos_token else None
            if end is None:
                raise ReaderError(f"{request.describe()}: a candidate is a prefix of another ({list(answers)}) and "
                                  f"the tokenizer has no end token to close the answers; give candidates none of "
                                  f"which is a prefix of another")
            out = [ids + [end] for ids in out]
        return out

    # ------------------------------------------------------------------------------------------------ scoring

    def score(self, requests: Sequence[ScoreRequest], image_root: str | os.PathLike, batch_size: int | None = None,
              progress: bool | None = None) -> list[np.ndarray]:
        """Log-probabilities over each request's candidate answers (log-softmax over the candidates, in the order
        given): one forward pass per (query, context); multi-token candidates continue from the prompt's KV cache.
        Requests are batched by prompt length and returned in input order. Requests with `share_prefix` are
        scored as prefix + suffix (`ScoreRequest`), by default encoding each distinct prefix once per batch
        (`_score_shared`)."""
        root = Path(image_root)
        batch_size = batch_size or self.config.batch_size
        cand_ids = [self._candidate_ids(r) for r in requests]
        # longest prompts first (an out-of-memory batch fails at once); text length stands in for token count
        order = sorted(range(len(requests)), key=lambda i: -requests[i].prompt_size())
        keys, suffixes = self._split(requests)
        results: list[np.ndarray | None] = [None] * len(requests)
        show = progress if progress is not None else len(requests) > 8 * batch_size
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        split = [i for i in order if i in suffixes]
        batches = [(idx, False) for idx in self._batches([i for i in order if i not in suffixes], requests,
                                                         batch_size)]
        if self.config.share_prefix:
            batches += [(idx, True) for idx in self._prefix_batches(split, requests, keys, batch_size)]
        else:
            batches += [(idx, False) for idx in self._batches(split, requests, batch_size)]
        with self._inference(), tqdm(total=len(requests), desc="scoring", unit="ctx", disable=not show) as bar:
            for idx, shared in batches:
                part, cands = [requests[i] for i in idx], [cand_ids[i] for i in idx]
                tails = [suffixes[i] for i in idx] if idx[0] in suffixes else None
                with self._autocast():
                    if shared:
                        scores = self._score_shared(part, cands, tails, [keys[i] for i in idx], root, features)
                    else:
                        scores = self._score_batch(part, cands, root, features, tails)
                for i, lp in zip(idx, scores):
                    results[i] = lp
                while len(features) > self.config.image_cache:
                    features.popitem(last=False)
                bar.update(len(idx))
        return results  # type: ignore[return-value]

    def _split(self, requests: Sequence[ScoreRequest]) -> tuple[dict[int, tuple], dict[int, list[int]]]:
        """Of each `share_prefix` request, by request index: the key of its prefix (prefix text and images: equal
        keys, one encoding) and its suffix tokens (question, options, assistant header). A request whose chat
        template does not insert the question verbatim, or whose suffix has no tokens, is scored whole (left
        out). The prompt around the question depends on the candidates and the context only, so it is cut once per
        (candidates, context) and each distinct suffix is tokenized once."""
        cuts: dict[tuple, tuple[str, str] | None] = {}
        keys, texts = {}, {}
        for i, r in enumerate(requests):
            if not r.share_prefix:
                continue
            around = (r.answers, None if r.context is None else r.context.text)
            if around not in cuts:
                pieces = self._render.split(r.query, r.context, r.answers)
                cuts[around] = None if pieces is None else (pieces[0], pieces[1][len(r.query.question.strip()):])
            if cuts[around] is not None:
                prefix, rest = cuts[around]
                keys[i] = (prefix, tuple(prompt_images(r.query, r.context)))
                texts[i] = r.query.question.strip() + rest
        distinct = list(dict.fromkeys(texts.values()))
        ids = dict(zip(distinct, self.tokenizer(distinct, add_special_tokens=False)["input_ids"])) if distinct else {}
        suffixes = {i: ids[t] for i, t in texts.items() if ids[t]}
        return {i: k for i, k in keys.items() if i in suffixes}, suffixes

    def _prefix_batches(self, order: list[int], requests: Sequence[ScoreRequest], keys: dict[int, tuple],
                        batch_size: int) -> list[list[int]]:
        """Batches of whole prefix groups (requests with the same prefix, in `order` of their first member), up to
        `batch_size` prefixes each: a batch's prefix pass is no wider than an unshared batch, and its continuation
        rows run in chunks of `batch_size`."""
        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault(keys[i], []).append(i)
        members = list(groups.values())
        out = []
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            if self.family.same_image_count:
                out += [[i for g in chunk for i in g if (requests[g[0]].context is None) == closed]
                        for closed in (False, True)]
            else:
                out.append([i for g in chunk for i in g])
        return [b for b in out if b]

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode and no autograd for the duration; the model's train/eval mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _autocast(self):
        """`reader.autocast`: forward passes in mixed precision (weights untouched); otherwise nothing."""
        if self.config.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.autocast))

    def _batches(self, order: list[int], requests: Sequence[ScoreRequest], batch_size: int) -> list[list[int]]:
        """Consecutive chunks of `order`, split where the image count changes when the family needs that."""
        out = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if self.family.same_image_count:
                out += [[i for i in idx if (requests[i].context is None) == closed] for closed in (False, True)]
            else:
                out.append(idx)
        return [b for b in out if b]

    def _score_batch(self, requests: Sequence[ScoreRequest], cand_ids: Sequence[list[list[int]]], root: Path,
                     features: OrderedDict, suffixes: Sequence[list[int]] | None = None) -> list[np.ndarray]:
        """One forward pass over the requests' prompts, or with `suffixes` over their prefixes followed by the
        suffix tokens (the unshared path of `share_prefix` requests)."""
        modes = [self._mode(r, cands) for r, cands in zip(requests, cand_ids)]
        multi = any(m == "full" and max(len(c) for c in cands) > 1 for m, cands in zip(modes, cand_ids))
        items = [(r.query, r.context, r.answers if suffixes is None else _PrefixOnly(r.answers)) for r in requests]
        answer_lengths = [max(len(c) for c in cands) for cands in cand_ids]
        if suffixes is not None:
            answer_lengths = [a + len(t) for a, t in zip(answer_lengths, suffixes)]
        fwd = self._run(items, root, tails=suffixes, use_cache=multi, features=features,
                        answer_lengths=answer_lengths)
        first = torch.log_softmax(fwd.logits[:, -1].float(), dim=-1)
        seq_lp = [first[b, [c[0] for c in cands]] for b, cands in enumerate(cand_ids)]
        if multi:
            self._add_continuations(fwd, cand_ids, modes, seq_lp)
        return [torch.log_softmax(lp, dim=0).cpu().numpy().astype(np.float64) for lp in seq_lp]

    def _mode(self, request: ScoreRequest, cands: list[list[int]]) -> str:
        mode = self.config.scoring
        if mode == "auto":
            mode = "first_token" if all(len(c) == 1 for c in cands) else "full"
        if mode == "first_token":
            seen: dict[int, str] = {}
            for answer, c in zip(request.answers, cands):
                if c[0] in seen:
                    token = self.tokenizer.convert_ids_to_tokens(c[0])
                    raise ReaderError(f"{request.describe()}: candidates {seen[c[0]]!r} and {answer!r} share their "
                                      f"first token {token!r}; single-token scoring cannot tell them apart "
                                      f"(use scoring: full)")
                seen[c[0]] = answer
        return mode

    def _continuation_inputs(self, fwd: _Forward, rows: torch.Tensor, steps: int) -> dict:
        if self.fast:
            return mrope_continuation(fwd.state, rows, steps)
        if self.family.continuation is None:
            return {}
        return self.family.continuation(fwd.state, rows, steps)

    def _add_continuations(self, fwd: _Forward, cand_ids, modes, seq_lp) -> None:
        """Add log p(tokens 2.. of each multi-token candidate) by running the candidates' continuations against the
        prompt's KV cache (`_continuations`)."""
        rows = [(b, k) for b, (cands, m) in enumerate(zip(cand_ids, modes)) if m == "full"
                for k, c in enumerate(cands) if len(c) > 1]
        conts = [cand_ids[b][k] for b, k in rows]
        for part, logp, ends in self._continuations(fwd, [b for b, _ in rows], [c[:-1] for c in conts],
                                                    [len(c) - 1 for c in conts]):
            for i, r in enumerate(part):
                (b, k), c = rows[r], conts[r]
                positions = torch.arange(ends[i] - len(c) + 1, ends[i], device=self.device)
                seq_lp[b][k] = seq_lp[b][k] + logp[i, positions, torch.tensor(c[1:], device=self.device)].sum()

    def _continuations(self, fwd: _Forward, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                       keep: Sequence[int]):
        """Continue prompts of `fwd` from its KV cache: continuation r feeds `tokens[r]` after prompt `rows[r]`; the
        log-softmax over the vocabulary is kept at its last `keep[r]` positions. One batched pass per chunk of
        `batch_size` right-padded continuations, never one generate() per candidate; the cache rows are copied per
        continuation, so many continuations of one prompt (candidates, per-label questions) share its encoding.
        Yields per chunk (part, logp, ends): the continuations' indices, their log-probabilities (len(part), P, V)
        and per continuation the index in P one past its last token (its kept positions end there)."""
        from transformers import DynamicCache

        chunk = max(1, self.config.batch_size)
        for start in range(0, len(rows), chunk):
            part = range(start, min(start + chunk, len(rows)))
            T = max(len(tokens[r]) for r in part)
            inputs = torch.tensor([list(tokens[r]) + [self.pad_id] * (T - len(tokens[r])) for r in part],
                                  dtype=torch.long, device=self.device)
            lengths = torch.tensor([len(tokens[r]) for r in part], device=self.device)
            cont_mask = (torch.arange(T, device=self.device)[None] < lengths[:, None]).long()
            batch_rows = torch.tensor([rows[r] for r in part], device=self.device)
            sub = DynamicCache(config=self.hf_model.config.get_text_config())
            for layer_idx, layer in enumerate(fwd.cache.layers):  # index_select: faster than [rows] on CPU
                sub.update(layer.keys.index_select(0, batch_rows), layer.values.index_select(0, batch_rows), layer_idx)
            first = min(len(tokens[r]) - keep[r] for r in part)  # logits only from the first position kept
            out = self.hf_model(input_ids=inputs, attention_mask=torch.cat([fwd.mask[batch_rows], cont_mask], dim=1),
                                cache=sub, use_cache=True, logits_to_keep=T - first,
                                **self._continuation_inputs(fwd, batch_rows, T))
            yield list(part), torch.log_softmax(out.logits.float(), dim=-1), [len(tokens[r]) - first for r in part]

    def _score_shared(self, requests: Sequence[ScoreRequest], cand_ids: Sequence[list[list[int]]],
                      suffixes: Sequence[list[int]], keys: Sequence[tuple], root: Path, features: OrderedDict
                      ) -> list[np.ndarray]:
        """`share_prefix` requests, each distinct prefix encoded once: one forward pass over the prefixes (with KV
        cache), then every request's suffix (and, for multi-token candidates, suffix + candidate per candidate)
        continued from its prefix's cache. The suffixes' common leading tokens (a legend, "Is") join the prefix
        pass, each request keeping at least its last suffix token to continue. Equals `_score_batch(...,
        suffixes)` on the same requests (tested)."""
        slot: dict[tuple, int] = {}
        for j, key in enumerate(keys):
            slot.setdefault(key, j)
        heads = list(slot.values())
        row_of = {key: b for b, key in enumerate(slot)}
        longest: dict[tuple, int] = {}
        common: dict[tuple, list[int]] = {}
        for key, t, cands in zip(keys, suffixes, cand_ids):
            longest[key] = max(longest.get(key, 0), len(t) + max(len(c) for c in cands))
            shared = common.setdefault(key, list(t[:-1]))
            n = 0
            while n < min(len(shared), len(t) - 1) and shared[n] == t[n]:
                n += 1
            del shared[n:]
        prefixes = [(requests[j].query, requests[j].context, _PrefixOnly(requests[j].answers)) for j in heads]
        fwd = self._run(prefixes, root, tails=list(common.values()), use_cache=True, features=features,
                        answer_lengths=list(longest.values()))
        owners, rows, tokens, keep = [], [], [], []
        for j, (r, cands, suffix) in enumerate(zip(requests, cand_ids, suffixes)):
            tail = suffix[len(common[keys[j]]):]
            if self._mode(r, cands) == "full" and max(len(c) for c in cands) > 1:
                # one continuation per candidate, suffix + candidate: its every token is read after the suffix
                conts = [(k, tail + c[:-1], len(c)) for k, c in enumerate(cands)]
            else:  # first tokens only: one continuation per request, read at the suffix's last position
                conts = [(None, tail, 1)]
            for k, t, n in conts:
                owners.append((j, k))
                rows.append(row_of[keys[j]])
                tokens.append(t)
                keep.append(n)
        seq_lp: list = [np.zeros(len(c)) for c in cand_ids]
        for part, logp, ends in self._continuations(fwd, rows, tokens, keep):
            # first tokens: one gather per chunk, (continuation, candidate) padded to the most candidates
            firsts = [i for i, r in enumerate(part) if owners[r][1] is None]
            if firsts:
                width = max(len(cand_ids[owners[part[i]][0]]) for i in firsts)
                ids = [[c[0] for c in cand_ids[owners[part[i]][0]]] for i in firsts]
                ids = torch.tensor([x + [x[0]] * (width - len(x)) for x in ids], device=self.device)
                at = torch.tensor([ends[i] - 1 for i in firsts], device=self.device)
                picked = logp[torch.tensor(firsts, device=self.device), at].gather(1, ids).double().cpu().numpy()
                for i, values in zip(firsts, picked):
                    j = owners[part[i]][0]
                    seq_lp[j] = values[:len(cand_ids[j])]
            for i, r in enumerate(part):
                j, k = owners[r]
                if k is not None:  # every token of candidate k, read after the suffix
                    c = cand_ids[j][k]
                    positions = torch.arange(ends[i] - len(c), ends[i], device=self.device)
                    seq_lp[j][k] = float(logp[i, positions, torch.tensor(c, device=self.device)].sum())
        return [lp - np.logaddexp.reduce(lp) for lp in seq_lp]

    # ------------------------------------------------------------------------------------------------ training

    def sequence_logits(self, items: Sequence[tuple[Query, CorpusItem | None, Sequence[str]]],
                        answers: Sequence[Sequence[int]], image_root: str | os.PathLike) -> torch.Tensor:
        """Teacher forcing: logits (B, A + 1, V) of the last A + 1 positions of prompt + answer tokens, A the longest
        answer; `logits[b, A - len(answer_b) + j]` predicts answer token j (answers end at the last position)."""
        A = max(len(a) for a in answers)
        if self.family.same_image_count and len({c is None for _, c, _ in items}) > 1:
            groups = [[i for i, (_, c, _) in enumerate(items) if (c is None) == closed] for closed in (False, True)]
            parts = [self.sequence_logits([items[i] for i in g], [answers[i] for i in g], image_root)
                     for g in groups]
            # each part keeps the last max(its answers) + 1 positions; align them to A + 1 by left-padding
            parts = [torch.nn.functional.pad(x, (0, 0, A + 1 - x.shape[1], 0)) for x in parts]
            order = torch.tensor([i for g in groups for i in g], device=parts[0].device)
            return torch.cat(parts)[torch.argsort(order)]
        with self._autocast():
            return self._run(items, Path(image_root), tails=answers, logits_to_keep=A + 1).logits

    def target_ids(self, query: Query) -> list[int]:
        """The tokens of a query's gold answer as the assistant turn: the answer's tokens, and for an open question
        the tokenizer's end token after them (what makes generation stop after the answer)."""
        ids = self.answer_ids(query.label)
        if query.answer_type == OPEN and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def _target_logprobs(self, examples: Sequence[tuple[Query, CorpusItem | None]], image_root: str | os.PathLike
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing on each query's gold answer tokens (`target_ids`): (B, A) log p of each answer token (0
        where a row has fewer) and the (B, A) token mask."""
        answers = [self.target_ids(q) for q, _ in examples]
        logits = self.sequence_logits([(q, c, q.candidates) for q, c in examples], answers, image_root)
        A = max(len(a) for a in answers)
        targets = torch.zeros((len(answers), A), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(answers), A), dtype=torch.bool, device=self.device)
        for b, a in enumerate(answers):
            targets[b, A - len(a):] = torch.tensor(a, device=self.device)
            mask[b, A - len(a):] = True
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return logp * mask, mask

    def answer_loss(self, examples: Sequence[tuple[Query, CorpusItem | None]], image_root: str | os.PathLike
                    ) -> torch.Tensor:
        """Mean cross-entropy of the gold answers' tokens (the assistant turn; `target_ids`) given single-context
        prompts."""
        logp, mask = self._target_logprobs(examples, image_root)
        return -logp.sum() / mask.sum()

    def gold_logprobs(self, requests: Sequence[ScoreRequest], image_root: str | os.PathLike,
                      batch_size: int | None = None) -> np.ndarray:
        """Per request, the mean per-token log p of its query's gold answer (`target_ids`, end token included for
        open questions) given its prompt: the open questions' judgement in retriever distillation. The mean, not the
        sum, keeps the scale of one token whatever the answer's length (for one query, sum = length x mean: the
        ranking of its contexts is the same)."""
        batch_size = batch_size or self.config.batch_size
        out = np.zeros(len(requests), dtype=np.float64)
        with self._inference():
            for start in range(0, len(requests), batch_size):
                part = requests[start:start + batch_size]
                logp, mask = self._target_logprobs([(r.query, r.context) for r in part], image_root)
                out[start:start + len(part)] = (logp.sum(1) / mask.sum(1)).cpu().numpy()
        return out

    # ------------------------------------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[ScoreRequest], image_root: str | os.PathLike, batch_size: int | None = None,
                 progress: bool | None = None) -> list[str]:
        """Greedy answers to open questions (the model's own `generate`, at most `generate_max_tokens` new tokens,
        left-padded batches on the generic path), decoded without special tokens and stripped, in input order."""
        root = Path(image_root)
        batch_size = batch_size or self.config.batch_size
        max_new = self.config.generate_max_tokens
        order = sorted(range(len(requests)), key=lambda i: -requests[i].prompt_size())
        results: list[str | None] = [None] * len(requests)
        show = progress if progress is not None else len(requests) > 8 * batch_size
        with self._inference(), tqdm(total=len(requests), desc="generating", unit="ctx", disable=not show) as bar:
            for idx in self._batches(order, requests, batch_size):
                items = [(requests[i].query, requests[i].context, ()) for i in idx]
                inputs = self._generic_inputs(items, root)
                self._check_lengths(items, inputs["attention_mask"].sum(1).tolist(), [max_new] * len(items))
                with self._autocast():
                    out = self.hf_model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                                 pad_token_id=self.pad_id)
                new = out[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(idx, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    results[i] = text.strip()
                bar.update(len(idx))
        return results  # type: ignore[return-value]


def predictions(requests: Sequence[ScoreRequest], scores: Sequence[np.ndarray]) -> list[str]:
    """The best-scoring candidate of each request."""
    return [r.answers[int(np.argmax(s))] for r, s in zip(requests, scores)]
