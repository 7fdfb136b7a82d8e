"""The Qwen2-VL cached-vision fast path of `Reader`: prompts tokenized with their image tokens expanded and M-RoPE
positions computed here, image features computed once per distinct image."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..base.records import CorpusItem, Query
from .prompts import prompt_images
from .requests import ReaderError
from .tower_cache import _wanted_images, open_wanted


@dataclass
class _Prompt:
    """Fast path: one request's prompt, tokenized with its image tokens expanded, and its M-RoPE positions."""

    ids: list[int]
    images: list[str]  # absolute image paths in placeholder order
    positions: np.ndarray  # (3, len(ids))
    next_position: int  # position of the first token after the prompt


class FastPathMixin:
    """`Reader`'s fast path (families whose adapter has `fast_path`)."""

    def _images(self, wanted: dict[str, str]) -> dict[str, tuple[torch.Tensor, tuple[int, int, int]]]:
        """Preprocessed patches and merged (t, h, w) token grid of each image path (keys; values name the record
        field for errors), preprocessing the uncached ones in one call; LRU-cached by path."""
        missing = [p for p in wanted if p not in self._pixels]
        if missing:
            images = open_wanted(missing, wanted)
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
