"""The reader model: loading (`from_pretrained` of any family in `families.FAMILIES`, or a tiny random-weight model with
an offline tokenizer), saving, and batched per-context scoring `log p(answer | query, context)` over candidate answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.answers import OPEN
from ..base.dataset import Dataset
from .. import distributed
from ..base.fsutil import atomic_dir
from ..base.records import CorpusItem, Query
from ..fast_convs import pin_convs
from .families import FAMILIES, Family, build_tiny, family_of
from .prompts import LABEL_QUESTION_WORDS, LEGEND_WORDS, PromptRenderer
from .settings import LoraSettings, ReaderSettings
from .fast_path import FastPathMixin, _Prompt  # noqa: F401 (importable from here)
from .generic_path import GenericPathMixin
from .requests import (GenerateRequest, ReaderError, ScoreRequest, TargetRequest, _Forward,  # noqa: F401
                       _PrefixOnly, expect_requests)
from .objectives import ObjectivesMixin
from .shared_prefix import SharedPrefixMixin
from .tower_cache import TowerCacheMixin, VisionFeatureCache, _freeze, _wanted_images  # noqa: F401

log = logging.getLogger(__name__)

# The text the assistant header is cut from (answer tokens are the suffix of tokenizing header + answer).
_HEADER_SENTINEL = "\x00end of the user turn\x00"


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


class Reader(GenericPathMixin, TowerCacheMixin, FastPathMixin, SharedPrefixMixin, ObjectivesMixin):
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
        self._suffix_ids: dict[str, list[int]] = {}  # share_prefix suffix text -> its tokens (`_split`)
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
        pin_convs(model)  # under the CPU pin: a convolutional vision tower's depthwise layers fast (core/fast_convs)
        if config.adapter:
            from peft import PeftModel

            # with `lora` settings too, fine-tuning continues the loaded adapters
            model = PeftModel.from_pretrained(model, config.adapter, is_trainable=config.lora is not None).eval()
        log.info("reader %s (%s): %s, %.2f M parameters on %s (%s)", config.model, family.model_type,
                 type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, device, dtype)
        half = config.autocast or (dtype in (torch.bfloat16, torch.float16) and config.dtype)
        if device.type == "cpu" and half and not torch.backends.mkldnn.enabled:
            # measured (issue 20): a SmolLM2 projector step 215 s under the avx2 pin vs ~7.5 s native on an AMX CPU
            log.warning("reader: %s on CPU with oneDNN off (DXRAG_CPU_KERNELS=avx2, the reproducible default): half-"
                        "precision matmuls fall back to slow reference kernels, tens of times slower than fp32; set "
                        "DXRAG_CPU_KERNELS=native (numbers then depend on the CPU) or dtype float32 without "
                        "autocast", half)
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
        expect_requests(requests, ScoreRequest, "score")
        root = Path(image_root)
        batch_size = batch_size or self.config.batch_size
        known: dict[tuple[str, ...], list[list[int]]] = {}  # candidates' tokens, once per distinct candidate tuple
        cand_ids = [known[r.answers] if r.answers in known else known.setdefault(r.answers, self._candidate_ids(r))
                    for r in requests]
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

    def _target_logprobs(self, requests: Sequence[TargetRequest], image_root: str | os.PathLike
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing on each query's gold answer tokens (`target_ids`): (B, A) log p of each answer token (0
        where a row has fewer) and the (B, A) token mask."""
        answers = [self.target_ids(r.query) for r in requests]
        logits = self.sequence_logits([(r.query, r.context, r.query.candidates) for r in requests], answers,
                                      image_root)
        A = max(len(a) for a in answers)
        targets = torch.zeros((len(answers), A), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(answers), A), dtype=torch.bool, device=self.device)
        for b, a in enumerate(answers):
            targets[b, A - len(a):] = torch.tensor(a, device=self.device)
            mask[b, A - len(a):] = True
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return logp * mask, mask

    def gold_logprobs(self, requests: Sequence[TargetRequest], image_root: str | os.PathLike,
                      batch_size: int | None = None) -> np.ndarray:
        """Per request, the mean per-token log p of its query's gold answer (`target_ids`, end token included for
        open questions) given its prompt: the open questions' judgement in retriever distillation. The mean, not the
        sum, keeps the scale of one token whatever the answer's length (for one query, sum = length x mean: the
        ranking of its contexts is the same)."""
        expect_requests(requests, TargetRequest, "gold_logprobs")
        batch_size = batch_size or self.config.batch_size
        out = np.zeros(len(requests), dtype=np.float64)
        with self._inference():
            for start in range(0, len(requests), batch_size):
                part = requests[start:start + batch_size]
                logp, mask = self._target_logprobs(part, image_root)
                out[start:start + len(part)] = (logp.sum(1) / mask.sum(1)).cpu().numpy()
        return out

    # ------------------------------------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerateRequest], image_root: str | os.PathLike,
                 batch_size: int | None = None, progress: bool | None = None) -> list[str]:
        """Greedy answers to open questions (the model's own `generate`, at most `generate_max_tokens` new tokens,
        left-padded batches on the generic path), decoded without special tokens and stripped, in input order."""
        expect_requests(requests, GenerateRequest, "generate")
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
