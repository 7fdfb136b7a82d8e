"""Reader fine-tuning on single-context prompts (query + one retrieved item, or closed-book) with the gold answer as the
assistant turn: LoRA adapters for pretrained models, every weight for the tiny random-weight reader; checkpoints in
the training checkpoint format (core/training/checkpoint.py).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..base.answers import normalize_closed
from ..base.records import CorpusItem, Query
from ..reader.model import Reader, ReaderError, ScoreRequest, TargetRequest, predictions
from ..reader.settings import FINETUNE_LOSSES, AlignSettings, FinetuneSettings
from .checkpoint import WEIGHTS_FILE, has_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class FinetuneHistory:
    """What the caller logs: the loss of every step and validation accuracy at the evaluation steps."""

    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    trainable_parameters: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def accuracy(reader: Reader, requests: Sequence[ScoreRequest], image_root: str | os.PathLike) -> float:
    """Fraction of requests whose best-scoring candidate is the query's label."""
    preds = predictions(requests, reader.score(requests, image_root, progress=False))
    return float(np.mean([normalize_closed(p) == normalize_closed(r.query.label) for p, r in zip(preds, requests)]))


def finetune(reader: Reader, examples: Sequence[TargetRequest], image_root: str | os.PathLike,
             config: FinetuneSettings, val_requests: Sequence[ScoreRequest] = (), seed: int = 0,
             checkpoint_dir: str | os.PathLike | None = None, projector_only: bool = False) -> FinetuneHistory:
    """Train the reader in place on (query, context) targets (`Task.training_requests`, core/tasks.py); loss =
    cross-entropy of the gold answer's tokens (`Reader.answer_loss`).
    `projector_only`: only the family's projector trains (the alignment stage, `align_settings`).

    With `reader.config.lora` set, fresh LoRA adapters are added (unless present) and only they train; with
    `lora: None` every weight trains (the tiny reader, which has no pretrained weights to adapt).
    """
    if not examples:
        raise ReaderError("finetune: no training examples")
    if not 0.0 <= config.closed_book_fraction <= 1.0:
        raise ReaderError(f"finetune: closed_book_fraction {config.closed_book_fraction} must lie in [0, 1]")
    if config.loss not in FINETUNE_LOSSES:
        raise ReaderError(f"finetune: loss {config.loss!r} is not one of {list(FINETUNE_LOSSES)}")
    if projector_only:
        if not reader.family.projector:
            raise ReaderError(f"finetune: model type {reader.family.model_type!r} names no projector to align")
        reader.model.requires_grad_(False)
        reader.hf_model.get_submodule(reader.family.projector).requires_grad_(True)
    elif reader.config.lora is not None and not hasattr(reader.model, "peft_config"):
        reader.add_lora(reader.config.lora)
    if config.gradient_checkpointing:
        # non-reentrant: gradients reach the adapters although the prompt embeddings themselves need none
        reader.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in reader.model.parameters() if p.requires_grad]
    history = FinetuneHistory(trainable_parameters=sum(p.numel() for p in params))
    log.info("fine-tuning the reader: %d examples, %d steps, %d trainable parameters", len(examples), config.steps,
             history.trainable_parameters)

    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * config.steps), config.steps)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order: list[int] = []
    first_step = 1
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if has_checkpoint(ckpt):
        first_step, order = _load_checkpoint(ckpt, config, seed, reader, optimizer, schedule, rng, history)
        log.info("resuming reader fine-tuning at step %d from %s", first_step, ckpt)

    def evaluate(step: int) -> None:
        if val_requests:
            history.val_steps.append(step)
            history.val_accuracy.append(accuracy(reader, val_requests, image_root))
            log.info("reader step %d: validation accuracy %.3f", step, history.val_accuracy[-1])

    reader.model.train()
    bar = tqdm(range(first_step, config.steps + 1), desc="reader fine-tune", unit="step", initial=first_step - 1,
               total=config.steps)
    for step in bar:
        if len(order) < config.batch_size:
            order.extend(sampling_order(examples, rng, config.balanced_sampling))
        picked, order = order[:config.batch_size], order[config.batch_size:]
        closed = rng.random(len(picked)) < config.closed_book_fraction
        batch = [TargetRequest(examples[i].query, None) if drop else examples[i] for i, drop in zip(picked, closed)]
        objective = reader.candidate_loss if config.loss == "candidates" else reader.answer_loss
        loss = objective(distributed.shard(batch), image_root)  # under torchrun: this rank's share
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        history.losses.append(loss.item())
        bar.set_postfix(loss=f"{history.losses[-1]:.3f}")
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            evaluate(step)
            reader.model.train()
        if ckpt and config.checkpoint_every and step % config.checkpoint_every == 0 and distributed.is_main():
            _save_checkpoint(ckpt, step, order, config, seed, reader, optimizer, schedule, rng, history)
    evaluate(config.steps)
    reader.model.eval()
    return history


def sampling_order(examples: Sequence[TargetRequest], rng: np.random.Generator, balanced: bool) -> list[int]:
    """The next len(examples) training indices: a permutation (epoch-wise shuffling), or with `balanced` draws with
    replacement with probability inversely proportional to the frequency of each example's answer (each answer is
    then drawn equally often in expectation)."""
    n = len(examples)
    if not balanced:
        return rng.permutation(n).tolist()
    labels = [normalize_closed(r.query.label) for r in examples]
    counts = Counter(labels)
    weights = np.array([1.0 / counts[label] for label in labels])
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum()).tolist()


def align_settings(align: AlignSettings) -> FinetuneSettings:
    """The fine-tuning loop's settings for projector alignment (closed-book captions, no validation)."""
    return FinetuneSettings(steps=align.steps, batch_size=align.batch_size, lr=align.lr,
                            warmup_fraction=align.warmup_fraction, closed_book_fraction=0.0, eval_every=0,
                            checkpoint_every=align.checkpoint_every)


def caption_examples(corpus: Sequence[CorpusItem], question: str) -> list[TargetRequest]:
    """LLaVA stage 1's data: each corpus image, closed-book, asked `question`, answered by its corpus text (an open
    answer: its tokens and the end token are the target)."""
    return [TargetRequest(Query(id=f"caption-{item.id}", image=item.image, question=question, candidates=(),
                                label=item.text.strip(), metadata={"answer_type": "open"}), None)
            for item in corpus if item.text.strip()]


def _resume_key(config: FinetuneSettings, seed: int) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    key = {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "eval_every", "contexts_per_head")}
    for name, default in (("loss", "answer"), ("balanced_sampling", False)):  # keys of checkpoints written before them
        if key[name] == default:
            del key[name]
    return {**key, "seed": seed}


def _save_checkpoint(out: Path, step: int, order: list[int], config: FinetuneSettings, seed: int, reader: Reader,
                     optimizer, schedule, rng, history: FinetuneHistory) -> None:
    """Trainable weights, optimizer and schedule state, the sampler's order and random states, and the history, in
    one atomically replaced checkpoint folder (core/training/checkpoint.py)."""
    weights = {n: p for n, p in reader.model.named_parameters() if p.requires_grad}
    state = {"step": step, "history": history.to_json(), "schedule": schedule.state_dict(),
             "rng": rng.bit_generator.state}
    arrays = {"order": np.array(order, dtype=np.int64), "torch_rng": torch.get_rng_state().numpy()}
    save_checkpoint(out, weights, optimizer.state_dict(), state, _resume_key(config, seed), arrays=arrays)


def _load_checkpoint(src: Path, config: FinetuneSettings, seed: int, reader: Reader, optimizer, schedule, rng,
                     history: FinetuneHistory) -> tuple[int, list[int]]:
    ckpt = load_checkpoint(src, _resume_key(config, seed))
    params = dict(reader.model.named_parameters())
    wrong = sorted(set(ckpt.tensors) ^ {n for n, p in params.items() if p.requires_grad})
    if wrong:
        raise ReaderError(f"{src / WEIGHTS_FILE}: trainable parameters differ from this reader's (e.g. {wrong[:3]}); "
                          f"the checkpoint was written with another model or LoRA setting")
    with torch.no_grad():
        for name, value in ckpt.tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer)
    schedule.load_state_dict(ckpt.state["schedule"])
    rng.bit_generator.state = ckpt.state["rng"]
    torch.set_rng_state(torch.from_numpy(ckpt.arrays["torch_rng"]))
    saved = ckpt.state["history"]
    history.losses[:] = saved["losses"]
    history.val_steps[:] = saved["val_steps"]
    history.val_accuracy[:] = saved["val_accuracy"]
    return ckpt.state["step"] + 1, ckpt.arrays["order"].tolist()
