"""Scoring with the KV cache: candidate continuations after a prompt and `share_prefix` requests continued from one
encoding of their common prefix."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .families import mrope_continuation
from .prompts import prompt_images
from .requests import ReaderError, ScoreRequest, _Forward, _PrefixOnly


_SUFFIX_CACHE = 65536  # suffix texts whose tokens a reader keeps (cleared when full)


class SharedPrefixMixin:
    """`Reader`'s scoring modes, candidate continuations and shared-prefix scoring."""

    def _split(self, requests: Sequence[ScoreRequest]) -> tuple[dict[int, tuple], dict[int, list[int]]]:
        """Of each `share_prefix` request, by request index: the key of its prefix (prefix text and images: equal
        keys, one encoding) and its suffix tokens (question, options, assistant header). A request whose chat
        template does not insert the question verbatim, or whose suffix has no tokens, is scored whole (left
        out). The prompt around the question depends on the candidates and the context only, so it is cut once per
        (candidates, context); each distinct suffix is tokenized once per reader (`_suffix_ids`: a multi-label
        task's L questions, asked after every context in every call)."""
        cuts: dict[tuple, tuple[str, str] | None] = {}
        made: dict[tuple, tuple] = {}  # one key object per distinct prefix, shared by its requests
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
                key = (prefix, tuple(prompt_images(r.query, r.context)))
                keys[i] = made.setdefault(key, key)
                texts[i] = r.query.question.strip() + rest
        ids = self._suffix_ids
        new = [t for t in dict.fromkeys(texts.values()) if t not in ids]
        if len(ids) + len(new) > _SUFFIX_CACHE:
            ids.clear()
            new = list(dict.fromkeys(texts.values()))
        if new:
            ids.update(zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"]))
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
                       keep: Sequence[int], parts: Sequence[range] | None = None):
        """Continue prompts of `fwd` from its KV cache: continuation r feeds `tokens[r]` after prompt `rows[r]`; the
        log-softmax over the vocabulary is kept at its last `keep[r]` positions. One batched pass per chunk of
        `batch_size` right-padded continuations (or per range of `parts`), never one generate() per candidate, so
        many continuations of one prompt (candidates, per-label questions) share its encoding. A chunk whose rows
        are the prompts in order (one continuation each: a full wave of `_waves`) continues the prompts' cache as
        it is; any other chunk first selects its rows (a copy of each continued prompt's cache). Either way the
        model's cache update concatenates the new tokens to the prompt rows (the continuation's own cache).
        Yields per chunk (part, logp, ends): the continuations' indices, their log-probabilities (len(part), P, V)
        and per continuation the index in P one past its last token (its kept positions end there)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        chunk = max(1, self.config.batch_size)
        prompts = fwd.mask.shape[0]
        text_config = self.hf_model.config.get_text_config()
        for part in parts or [range(s, min(s + chunk, len(rows))) for s in range(0, len(rows), chunk)]:
            lengths = [len(tokens[r]) for r in part]
            T = max(lengths)
            inputs = torch.tensor([list(tokens[r]) + [self.pad_id] * (T - n) for r, n in zip(part, lengths)],
                                  dtype=torch.long, device=self.device)
            cont_mask = (torch.arange(T, device=self.device)[None] <
                         torch.tensor(lengths, device=self.device)[:, None]).long()
            part_rows = [rows[r] for r in part]
            every = part_rows == list(range(prompts))
            batch_rows = torch.tensor(part_rows, device=self.device)
            sub = DynamicCache(config=text_config)
            for layer_idx, layer in enumerate(fwd.cache.layers):  # index_select: faster than [rows] on CPU
                keys, values = ((layer.keys, layer.values) if every else
                                (layer.keys.index_select(0, batch_rows), layer.values.index_select(0, batch_rows)))
                target = sub.layers[layer_idx] if layer_idx < len(sub.layers) else None
                if type(target) is DynamicLayer:  # a full-attention layer takes the rows as they are: its update
                    target.lazy_initialization(keys, values)  # concatenates new tokens into a new tensor, and
                    target.keys, target.values = keys, values  # update() on an empty layer would copy them first
                else:
                    sub.update(keys, values, layer_idx)
            first = min(len(tokens[r]) - keep[r] for r in part)  # logits only from the first position kept
            mask = fwd.mask if every else fwd.mask[batch_rows]
            out = self.hf_model(input_ids=inputs, attention_mask=torch.cat([mask, cont_mask], dim=1),
                                cache=sub, use_cache=True, logits_to_keep=T - first,
                                **self._continuation_inputs(fwd, batch_rows, T))
            yield list(part), torch.log_softmax(out.logits.float(), dim=-1), [len(tokens[r]) - first for r in part]

    @staticmethod
    def _waves(rows: Sequence[int], chunk: int) -> tuple[list[int], list[range]]:
        """Continuations in waves, and chunks of whole waves: an order of the continuations (indices into `rows`,
        each the prompt it continues) that takes every prompt's first continuation by prompt, then every prompt's
        second, and so on; and ranges of that order holding as many whole waves as fit in `chunk` rows (a longer
        wave is split). The per-label questions of a multi-label task then meet their own kind in a chunk (the
        same label's question after every context: one length, no padding), and a chunk that is a full wave (every
        prompt once, the usual case for a full batch) continues the prompts' cache without copying it."""
        seen: dict[int, int] = {}
        rank = []
        for r in rows:
            rank.append(seen.get(r, 0))
            seen[r] = rank[-1] + 1
        order = sorted(range(len(rows)), key=lambda n: (rank[n], rows[n]))
        sizes = [0] * max(seen.values(), default=0)
        for k in rank:
            sizes[k] += 1
        parts, start, end = [], 0, 0
        for size in sizes:
            if end > start and end - start + size > chunk:
                parts.append(range(start, end))
                start = end
            end += size
            while end - start > chunk:
                parts.append(range(start, start + chunk))
                start += chunk
        if end > start:
            parts.append(range(start, end))
        return order, parts

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
        # per continuation: its request, its candidate (-1: the request's first tokens), prompt row, tokens and the
        # positions kept; plain lists of numbers and lists shared by the requests asking the same question, so that a
        # call of many requests leaves the garbage collector little to track
        owner, cand, rows, tokens, keep = [], [], [], [], []

        def add(j: int, k: int, row: int, t: list[int], n: int) -> None:
            owner.append(j)
            cand.append(k)
            rows.append(row)
            tokens.append(t)
            keep.append(n)

        modes: dict[int, bool] = {}  # per candidate list (requests with equal candidates share theirs): full?
        tails: dict[tuple[int, int], list[int]] = {}  # (suffix, its tokens in the prefix pass) -> the suffix's rest
        for j, (r, cands, suffix) in enumerate(zip(requests, cand_ids, suffixes)):
            skip = len(common[keys[j]])
            tail = tails.get((id(suffix), skip))
            if tail is None:
                tail = tails[(id(suffix), skip)] = suffix[skip:]
            full = modes.get(id(cands))
            if full is None:
                full = modes[id(cands)] = self._mode(r, cands) == "full" and max(len(c) for c in cands) > 1
            row = row_of[keys[j]]
            if full:  # one continuation per candidate, suffix + candidate: its every token is read after the suffix
                for k, c in enumerate(cands):
                    add(j, k, row, tail + c[:-1], len(c))
            else:  # first tokens only: one continuation per request, read at the suffix's last position
                add(j, -1, row, tail, 1)
        order, parts = self._waves(rows, max(1, self.config.batch_size))
        owner, cand, rows, tokens, keep = ([x[n] for n in order] for x in (owner, cand, rows, tokens, keep))
        # first tokens: one gather per chunk of every continuation's candidates' first tokens at its last position,
        # (continuation, candidate) padded to the most candidates (the full continuations' rows are not read)
        counts = [len(cand_ids[j]) for j in owner]
        width = max(counts)
        firsts_of: dict[int, list[int]] = {}
        for j in owner:
            if id(cand_ids[j]) not in firsts_of:
                firsts_of[id(cand_ids[j])] = [c[0] for c in cand_ids[j]] + [0] * (width - len(cand_ids[j]))
        first_ids = torch.tensor([firsts_of[id(cand_ids[j])] for j in owner], device=self.device)
        picked = np.zeros((len(owner), width))
        seq_lp: list = [np.zeros(len(c)) for c in cand_ids]
        for part, logp, ends in self._continuations(fwd, rows, tokens, keep, parts):
            at = torch.tensor(ends, device=self.device) - 1
            chosen = logp[torch.arange(len(part), device=self.device), at].gather(1, first_ids[part])
            picked[part] = chosen.double().cpu().numpy()
            for i, r in enumerate(part):
                j, k = owner[r], cand[r]
                if k >= 0:  # every token of candidate k, read after the suffix
                    c = cand_ids[j][k]
                    positions = torch.arange(ends[i] - len(c), ends[i], device=self.device)
                    seq_lp[j][k] = float(logp[i, positions, torch.tensor(c, device=self.device)].sum())
        firsts = [r for r, k in enumerate(cand) if k < 0]
        done = set()
        if firsts:  # log-softmax over each request's own candidates (the padding is -inf: it adds nothing)
            values = np.where(np.arange(width)[None] < np.array(counts)[firsts, None], picked[firsts], -np.inf)
            values = values - np.logaddexp.reduce(values, axis=1, keepdims=True)
            for r, v in zip(firsts, values):
                seq_lp[owner[r]] = v[:counts[r]]
                done.add(owner[r])
        return [lp if j in done else lp - np.logaddexp.reduce(lp) for j, lp in enumerate(seq_lp)]
