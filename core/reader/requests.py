"""What the reader scores and its errors: `ScoreRequest`, `ReaderError`, and the forward-pass record the fast,
generic and cached-tower paths share (`_Forward`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.records import CorpusItem, Query


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
class _Forward:
    """A prompt batch's forward pass: logits of the last kept positions, the left-padded attention mask, the KV cache
    (when asked for) and what the family's continuation needs (`Family.prefill_state`)."""

    logits: torch.Tensor
    mask: torch.Tensor
    cache: object | None
    state: dict
