"""The generic path of `Reader`: the processor and `model(**inputs)`, exact for every family in `FAMILIES`, and the
prompt helpers the other paths share."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..base.dataset import DatasetError, open_image
from ..base.records import CorpusItem, Query
from .prompts import prompt_images
from .requests import ReaderError, ScoreRequest, _Forward, _PrefixOnly


class GenericPathMixin:
    """`Reader`'s generic forward pass and prompt rendering."""

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
