"""Reader prompts: the single-context prompt `[retrieved image] "Background: <text>" [query image] <question + options>`
and its closed-book variant, as chat messages rendered through the processor's chat template. Torch-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ..base.records import CorpusItem, Query

BACKGROUND_PREFIX = "Background: "
OPTIONS_PREFIX = "Options: "
# Words the prompts add around the dataset's own text; the tiny reader's offline vocabulary must contain them.
PROMPT_WORDS = ("Background", "Options", ":", ",", ".", "?")
# ... and those of the per-label questions of multi-label tasks (core/tasks.py) and of label legends, added to the
# vocabulary only for datasets that use them (the tiny reader of every other dataset keeps its vocabulary).
LABEL_QUESTION_WORDS = ("Is", "present", "?")


def question_text(question: str, candidates: Sequence[str]) -> str:
    """The query turn's text: the question followed by its candidate answers ("Options: a, b, c"); an open question
    (no candidates) alone."""
    if not candidates:
        return question.strip()
    return f"{question.strip()} {OPTIONS_PREFIX}{', '.join(candidates)}"


LEGEND_PREFIX = "Provide answer according to the labels:"
LEGEND_WORDS = (LEGEND_PREFIX, "-", "'")


def with_legend(question: str, legend: Mapping[str, str]) -> str:
    """The question preceded by a dataset's label legend (dataset.yaml `legend`), as the reference code prompts
    numbered classes: "Provide answer according to the labels:\n0 - 'No DR'\n1 - ...\n\n<question>". Without a
    legend the question is returned unchanged."""
    if not legend:
        return question
    lines = "\n".join(f"{label} - '{text}'" for label, text in legend.items())
    return f"{LEGEND_PREFIX}\n{lines}\n\n{question}"


def build_messages(query: Query, context: CorpusItem | None, candidates: Sequence[str] | None = None) -> list[dict]:
    """One user turn: [context image] "Background: <text>" [query image] <question + options>; closed-book without
    the context. Images are placeholders ({"type": "image"}) filled in the order they appear (context, then query)."""
    content: list[dict[str, Any]] = []
    if context is not None:
        content.append({"type": "image"})
        content.append({"type": "text", "text": f"{BACKGROUND_PREFIX}{context.text.strip()}"})
    content.append({"type": "image"})
    content.append({"type": "text", "text": question_text(query.question, candidates or query.candidates)})
    return [{"role": "user", "content": content}]


def prompt_images(query: Query, context: CorpusItem | None) -> list[str]:
    """The image paths (relative to the dataset root) of a prompt, in placeholder order."""
    return [query.image] if context is None else [context.image, query.image]


def render_prompt(processor: Any, query: Query, context: CorpusItem | None,
                  candidates: Sequence[str] | None = None) -> str:
    """The prompt text up to the start of the assistant turn (the answer follows it), via the chat template."""
    return processor.apply_chat_template(build_messages(query, context, candidates), tokenize=False,
                                         add_generation_prompt=True)


class PromptRenderer:
    """`render_prompt` with the chat template rendered once per (question, candidates, closed-book) and the context
    text substituted into it; templates that do not insert the text verbatim are rendered every time."""

    _SENTINEL = "\x00context\x00"
    _QUESTION = "\x00question\x00"

    def __init__(self, processor: Any):
        self.processor = processor
        self._templates: dict[tuple, str | None] = {}

    def __call__(self, query: Query, context: CorpusItem | None, candidates: Sequence[str] | None = None) -> str:
        candidates = tuple(candidates or query.candidates)
        key = (query.question, candidates, context is None)
        if key not in self._templates:
            probe = None if context is None else CorpusItem(id="", image=context.image, text=self._SENTINEL)
            text = render_prompt(self.processor, query, probe, candidates)
            self._templates[key] = text if context is None or text.count(self._SENTINEL) == 1 else None
        template = self._templates[key]
        if template is None:
            return render_prompt(self.processor, query, context, candidates)
        return template if context is None else template.replace(self._SENTINEL, context.text.strip())

    def split(self, query: Query, context: CorpusItem | None, candidates: Sequence[str] | None = None
              ) -> tuple[str, str] | None:
        """The prompt cut where the question's text starts: (prefix, suffix), prefix + suffix being the prompt. The
        prefix (chat-template start, context image and text, query image) is the same for every question asked of
        one (query image, context), such as the per-label questions of a multi-label query, so it can be encoded
        once (`model.ScoreRequest.share_prefix`). None when the chat template does not insert the question
        verbatim."""
        text = self(dataclasses.replace(query, question=self._QUESTION), context, candidates)
        if text.count(self._QUESTION) != 1:
            return None
        prefix, rest = text.split(self._QUESTION)
        return prefix, query.question.strip() + rest

