"""What the reader is asked, one request type per reader method (lm-eval's requests): `ScoreRequest` for
`Reader.score` (log p over candidate answers), `GenerateRequest` for `Reader.generate` (a greedy answer),
`TargetRequest` for `Reader.gold_logprobs` and `Reader.answer_loss` (teacher forcing on the query's gold answer);
`ReaderError`, and the forward-pass record the fast, generic and cached-tower paths share (`_Forward`).
`core/tasks.py` builds the requests of every task type. Importing this module does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..base.records import CorpusItem, Query

if TYPE_CHECKING:
    import torch


class ReaderError(ValueError):
    """Bad reader input (unreadable image, over-long prompt, ambiguous candidates, unsupported model); the message
    names the request and field at fault and what would be valid."""


class _Prompted:
    """What every request shares: a query asked with one retrieved item (`context`) or closed-book (None)."""

    query: Query
    context: CorpusItem | None

    def prompt_size(self) -> int:
        """Rough prompt length for length-sorted batching: images first, then characters of text."""
        context = self.context
        return 100_000 * (1 + (context is not None)) + len(self.query.question) + len(context.text if context else "")

    def describe(self) -> str:
        where = f"query {self.query.id!r}"
        return where + (f" with context {self.context.id!r}" if self.context is not None else " (closed-book)")


@dataclass(frozen=True)
class ScoreRequest(_Prompted):
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


@dataclass(frozen=True)
class GenerateRequest(_Prompted):
    """Generate an answer to `query` given one retrieved item (`context`), or closed-book (None): `Reader.generate`,
    greedy, at most `reader.generate_max_tokens` new tokens."""

    query: Query
    context: CorpusItem | None


@dataclass(frozen=True)
class TargetRequest(_Prompted):
    """Teacher-force `query`'s gold answer (`query.label`; for an open question followed by the end token) after its
    prompt with one retrieved item (`context`), or closed-book (None): `Reader.gold_logprobs` (the mean per-token
    log p, the open questions' judgement in distillation) and `Reader.answer_loss` (the fine-tuning loss)."""

    query: Query
    context: CorpusItem | None


def expect_requests(requests: Sequence[object], kind: type, method: str) -> None:
    """Refuse a request of another type than the reader method's (`Reader.score` takes `ScoreRequest`s, ...)."""
    for n, r in enumerate(requests):
        if type(r) is not kind:
            raise ReaderError(f"Reader.{method}: request {n} is a {type(r).__name__}, not a {kind.__name__} "
                              f"(one request type per reader method: core/reader/requests.py)")


class _PrefixOnly(tuple):
    """The candidates of a prompt item (query, context, candidates) that stands for the prompt's prefix alone
    (`PromptRenderer.split`): the shared-prefix requests' prompts are the prefix followed by suffix tokens."""


@dataclass
class _Forward:
    """A prompt batch's forward pass: logits of the last kept positions, the left-padded attention mask, the KV cache
    (when asked for) and what the family's continuation needs (`Family.prefill_state`)."""

    logits: "torch.Tensor"
    mask: "torch.Tensor"
    cache: object | None
    state: dict
