"""The reader model: loading (`from_pretrained`, or the tiny random-weight Qwen2-VL with an offline tokenizer), saving,
and batched per-context scoring `log p(answer | query, context)` over each request's candidate answers.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..dataset import Dataset, DatasetError, open_image
from .. import distributed
from ..fsutil import atomic_dir
from ..records import CorpusItem, Query
from .prompts import PROMPT_WORDS, PromptRenderer, prompt_images
from .settings import LoraSettings, ReaderSettings, TinyReaderSettings

log = logging.getLogger(__name__)

# Model families whose prompt layout (image placeholder expansion, M-RoPE positions, vision features scattered into the
# token embeddings) this module implements; loading another model type fails with a clear error.
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# PEFT target regex: every linear projection of the language model (attention and MLP), none of the vision tower.
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# The tiny reader's chat template: Qwen2-VL's ChatML layout without the default system turn (shorter prompts).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
TINY_TEMPLATE_WORDS = ("system", "user", "assistant")
UNK_TOKEN = "[UNK]"
TINY_IMAGE_PIXELS = 56 * 56


class ReaderError(ValueError):
    """Bad reader input (unreadable image, over-long prompt, ambiguous candidates, unsupported model); the message
    names the request and field at fault and what would be valid."""


@dataclass(frozen=True)
class ScoreRequest:
    """Score the candidate answers of `query` given one retrieved item (`context`), or closed-book (None).
    `candidates` overrides `query.candidates`; results follow its order."""

    query: Query
    context: CorpusItem | None
    candidates: tuple[str, ...] | None = None

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


@dataclass
class _Prompt:
    """One request's prompt, tokenized with its image tokens expanded, and its M-RoPE positions."""

    ids: list[int]
    images: list[str]  # absolute image paths in placeholder order
    positions: np.ndarray  # (3, len(ids))
    next_position: int  # position of the first token after the prompt


# ------------------------------------------------------------------------------------------------------- tiny reader


def vocabulary_from_dataset(dataset: Dataset) -> tuple[list[str], list[str]]:
    """Texts (questions, corpus texts) and answers (labels, candidates) to build the tiny tokenizer from."""
    queries = [q for split in dataset.queries.values() for q in split]
    texts = [q.question for q in queries] + [item.text for item in dataset.corpus]
    answers = list(dataset.meta.labels) + [c for q in queries for c in q.candidates]
    return texts, answers


def build_tiny_processor(texts: Iterable[str], answers: Iterable[str]):
    """A Qwen2VLProcessor over an offline word-level tokenizer: every word of `texts` and of the prompts is a token,
    every answer string is one token (matched as a whole word), plus the chat and vision special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    splitter = pre_tokenizers.Whitespace()
    answers = sorted({a.strip() for a in answers if a.strip()})
    words = set(PROMPT_WORDS) | set(TINY_TEMPLATE_WORDS)
    for text in list(texts) + answers:
        words.update(w for w, _ in splitter.pre_tokenize_str(text))
    vocab = {UNK_TOKEN: 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(a, single_word=True, normalized=False) for a in answers])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", padding_side="left")
    # Every image is resized to about 56x56 pixels (4 LLM tokens), large radiographs included.
    images = Qwen2VLImageProcessor(min_pixels=TINY_IMAGE_PIXELS, max_pixels=TINY_IMAGE_PIXELS)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE)


def build_tiny_model(processor, settings: TinyReaderSettings, seed: int = 0):
    """A randomly initialised Qwen2VLForConditionalGeneration sized by `settings` for `processor`'s vocabulary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    head_dim = settings.hidden_size // settings.heads
    if sum(settings.mrope_section) * 2 != head_dim:
        raise ReaderError(f"tiny reader: mrope_section {settings.mrope_section} must sum to head_dim/2 = "
                          f"{head_dim // 2} (hidden_size {settings.hidden_size} / heads {settings.heads} / 2)")
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
            num_key_value_heads=settings.heads, max_position_embeddings=settings.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": list(settings.mrope_section)},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id),
        vision_config=dict(
            depth=settings.vision_depth, embed_dim=settings.vision_dim, hidden_size=settings.hidden_size,
            num_heads=settings.vision_heads, mlp_ratio=2, patch_size=settings.patch_size, spatial_merge_size=2,
            temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = ids("<|im_end|>")
    return model


# ------------------------------------------------------------------------------------------------------------ reader


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ReaderError(f"reader dtype {name!r} is not one of {['auto', *dtypes]}")
    return dtypes[name]


class Reader:
    """A Qwen2-VL-family model with its processor, scoring candidate answers per (query, context).

    Images are read from `image_root` (the dataset directory) given to `score`; preprocessed images are cached.
    """

    def __init__(self, model, processor, config: ReaderSettings):
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model  # the HF model, or a PeftModel wrapping it
        self.hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        hf_config = self.hf_model.config
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ReaderError(f"reader model {config.model!r}: model type {hf_config.model_type!r} is not supported; "
                              f"supported: {list(SUPPORTED_MODEL_TYPES)}")
        try:
            config.check()
        except ValueError as e:
            raise ReaderError(str(e)) from None
        self.device = next(self.hf_model.parameters()).device
        self.image_token_id = hf_config.image_token_id
        self.merge = hf_config.vision_config.spatial_merge_size
        text_config = hf_config.get_text_config()
        self.max_length = config.max_length or text_config.max_position_embeddings
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.unk_id = self.tokenizer.unk_token_id
        self._pixels: OrderedDict[str, tuple[torch.Tensor, tuple[int, int, int]]] = OrderedDict()
        self._answer_ids: dict[str, list[int]] = {}
        self._grid_offsets: dict[tuple[int, int, int], np.ndarray] = {}
        self._render = PromptRenderer(processor)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, config: ReaderSettings, dataset: Dataset | None = None, seed: int = 0) -> "Reader":
        """Build the tiny reader (`model: tiny`, vocabulary from `dataset`, weights from `seed`) or load one with
        `from_pretrained`."""
        device = torch.device(distributed.resolve_device(config.device))
        dtype = _resolve_dtype(config.dtype, device)
        if config.model == "tiny":
            if dataset is None:
                raise ReaderError("reader model 'tiny' builds its vocabulary from the dataset; pass dataset=")
            processor = build_tiny_processor(*vocabulary_from_dataset(dataset))
            model = build_tiny_model(processor, config.tiny, seed=seed)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            sizes = {"max_pixels": config.max_pixels} if config.max_pixels else {}
            processor = AutoProcessor.from_pretrained(config.model, **sizes)
            model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
        model = model.to(device=device, dtype=dtype).eval()
        if config.adapter:
            from peft import PeftModel

            # with `lora` settings too, fine-tuning continues the loaded adapters
            model = PeftModel.from_pretrained(model, config.adapter, is_trainable=config.lora is not None).eval()
        log.info("reader %s: %s, %.2f M parameters on %s (%s)", config.model, type(model).__name__,
                 sum(p.numel() for p in model.parameters()) / 1e6, device, dtype)
        return cls(model, processor, config)

    def add_lora(self, settings: LoraSettings) -> None:
        """Wrap the model with fresh LoRA adapters; afterwards only adapter weights are trainable."""
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=settings.target_modules or LANGUAGE_MODEL_LINEAR, bias="none")
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

    # ------------------------------------------------------------------------------------------------ encoding

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
        texts = [self._render(q, c, cands) for q, c, cands in requests]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        wanted: dict[str, str] = {}
        for query, context, _ in requests:
            if context is not None:
                wanted.setdefault(str(root / context.image), f"context {context.id!r} field 'image'")
            wanted.setdefault(str(root / query.image), f"query {query.id!r} field 'image'")
        pixels = self._images(wanted)
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

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as it follows the assistant-turn header."""
        ids = self._answer_ids.get(answer)
        if ids is None:
            ids = self._answer_ids[answer] = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return ids

    def _candidate_ids(self, request: ScoreRequest) -> list[list[int]]:
        answers = request.answers
        if not answers:
            raise ReaderError(f"{request.describe()}: no candidate answers")
        if len(set(answers)) != len(answers):
            raise ReaderError(f"{request.describe()}: duplicate candidate answers {list(answers)}")
        out = []
        for a in answers:
            ids = self.answer_ids(a)
            if not ids:
                raise ReaderError(f"{request.describe()}: candidate {a!r} encodes to no tokens")
            if self.unk_id is not None and self.unk_id in ids:
                raise ReaderError(f"{request.describe()}: candidate {a!r} contains words outside the tokenizer's "
                                  f"vocabulary (unknown token); build the tiny reader from a dataset that lists it")
            out.append(ids)
        if len(out) > 1 and any(a != b and a == b[:len(a)] for a in out for b in out):
            # a candidate that is a prefix of another would win by construction: score complete answers instead
            end = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token) if self.tokenizer.eos_token else None
            if end is None:
                raise ReaderError(f"{request.describe()}: a candidate is a prefix of another ({list(answers)}) and "
                                  f"the tokenizer has no end token to close the answers")
            out = [ids + [end] for ids in out]
        return out

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

    # ------------------------------------------------------------------------------------------------ scoring

    def score(self, requests: Sequence[ScoreRequest], image_root: str | os.PathLike, batch_size: int | None = None,
              progress: bool | None = None) -> list[np.ndarray]:
        """Log-probabilities over each request's candidate answers (log-softmax over the candidates, in the order
        given): one forward pass per (query, context); multi-token candidates continue from the prompt's KV cache.
        Requests are batched by prompt length and returned in input order."""
        root = Path(image_root)
        batch_size = batch_size or self.config.batch_size
        cand_ids = [self._candidate_ids(r) for r in requests]
        # longest prompts first (an out-of-memory batch fails at once); text length stands in for token count
        order = sorted(range(len(requests)), key=lambda i: -requests[i].prompt_size())
        results: list[np.ndarray | None] = [None] * len(requests)
        show = progress if progress is not None else len(requests) > 8 * batch_size
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), tqdm(total=len(requests), desc="scoring", unit="ctx",
                                              disable=not show) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    for i, lp in zip(idx, self._score_batch([requests[i] for i in idx], [cand_ids[i] for i in idx],
                                                            root, features)):
                        results[i] = lp
                    while len(features) > self.config.image_cache:
                        features.popitem(last=False)
                    bar.update(len(idx))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _score_batch(self, requests: Sequence[ScoreRequest], cand_ids: Sequence[list[list[int]]], root: Path,
                     features: dict) -> list[np.ndarray]:
        prompts = self._encode([(r.query, r.context, r.answers) for r in requests], root)
        for r, p, cands in zip(requests, prompts, cand_ids):
            need = len(p.ids) + max(len(c) for c in cands)
            if need > self.max_length:
                raise ReaderError(f"{r.describe()}: prompt of {len(p.ids)} tokens plus an answer of up to "
                                  f"{need - len(p.ids)} tokens exceeds the reader's context of {self.max_length} "
                                  f"tokens; shorten the context text or raise max_length")
        modes = [self._mode(r, cands) for r, cands in zip(requests, cand_ids)]
        multi = any(m == "full" and max(len(c) for c in cands) > 1 for m, cands in zip(modes, cand_ids))
        logits, mask, cache = self._forward(prompts, feature_cache=features, use_cache=multi)
        first = torch.log_softmax(logits[:, -1].float(), dim=-1)
        seq_lp = [first[b, [c[0] for c in cands]] for b, cands in enumerate(cand_ids)]
        if multi:
            self._add_continuations(prompts, cand_ids, modes, mask, cache, seq_lp)
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

    def _add_continuations(self, prompts, cand_ids, modes, mask, cache, seq_lp) -> None:
        """Add log p(tokens 2.. of each multi-token candidate) by running the candidates' continuations against the
        prompt's KV cache (one batched pass per chunk of rows, never one generate() per candidate)."""
        from transformers import DynamicCache

        rows = [(b, k) for b, (cands, m) in enumerate(zip(cand_ids, modes)) if m == "full"
                for k, c in enumerate(cands) if len(c) > 1]
        chunk = max(1, self.config.batch_size)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            conts = [cand_ids[b][k] for b, k in part]
            T = max(len(c) for c in conts) - 1
            inputs = torch.full((len(part), T), self.pad_id, dtype=torch.long, device=self.device)
            cont_mask = torch.zeros((len(part), T), dtype=torch.long, device=self.device)
            for r, c in enumerate(conts):
                inputs[r, :len(c) - 1] = torch.tensor(c[:-1], device=self.device)
                cont_mask[r, :len(c) - 1] = 1
            batch_rows = torch.tensor([b for b, _ in part], device=self.device)
            sub = DynamicCache(config=self.hf_model.config.get_text_config())
            for layer_idx, layer in enumerate(cache.layers):
                sub.update(layer.keys[batch_rows], layer.values[batch_rows], layer_idx)
            next_pos = torch.tensor([prompts[b].next_position for b, _ in part], device=self.device)
            pos = (next_pos[:, None] + torch.arange(T, device=self.device)[None]).unsqueeze(0).expand(3, -1, -1)
            out = self.hf_model(inputs_embeds=self.hf_model.get_input_embeddings()(inputs),
                                attention_mask=torch.cat([mask[batch_rows], cont_mask], dim=1),
                                position_ids=pos, cache=sub, use_cache=True)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            for r, ((b, k), c) in enumerate(zip(part, conts)):
                targets = torch.tensor(c[1:], device=self.device)
                seq_lp[b][k] = seq_lp[b][k] + logp[r, torch.arange(len(c) - 1, device=self.device), targets].sum()

    # ------------------------------------------------------------------------------------------------ training

    def answer_loss(self, examples: Sequence[tuple[Query, CorpusItem | None]], image_root: str | os.PathLike
                    ) -> torch.Tensor:
        """Mean cross-entropy of the gold answers' tokens (the assistant turn) given single-context prompts."""
        root = Path(image_root)
        prompts = self._encode([(q, c, q.candidates) for q, c in examples], root)
        answers = [self.answer_ids(q.label) for q, _ in examples]
        for (q, c), p, a in zip(examples, prompts, answers):
            if len(p.ids) + len(a) > self.max_length:
                raise ReaderError(f"{ScoreRequest(q, c).describe()}: prompt + answer of {len(p.ids) + len(a)} "
                                  f"tokens exceeds the reader's context of {self.max_length} tokens")
        A = max(len(a) for a in answers)
        logits, _, _ = self._forward(prompts, tails=answers, logits_to_keep=A + 1)
        # logits[:, j] predicts the token at position L - A + j; answers end at the last position (left padding)
        targets = torch.full((len(answers), A), -100, dtype=torch.long, device=self.device)
        for b, a in enumerate(answers):
            targets[b, A - len(a):] = torch.tensor(a, device=self.device)
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)


def predictions(requests: Sequence[ScoreRequest], scores: Sequence[np.ndarray]) -> list[str]:
    """The best-scoring candidate of each request."""
    return [r.answers[int(np.argmax(s))] for r, s in zip(requests, scores)]
