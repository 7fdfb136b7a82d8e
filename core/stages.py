"""The stages of `dxrag run`, one function each: dataset, encoder (+ contrastive stage), indexes, reader fine-tuning
with retrieved context, retriever distillation per head, per-context predictions, oracle report. Each stage leaves a
marker in the run directory and, when it finds its marker, loads its result instead of recomputing it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import distributed
from .config import RunConfig
from .reader.settings import ReaderSettings
from .base.dataset import Dataset, load_dataset
from .predictions import PredictionLog, read_logs
from .base.records import Answer, ContextPrediction, Query
from .base.answers import CLOSED
from .tasks import Task, run_requests
from .run import RunDir

log = logging.getLogger(__name__)

SYSTEMS = ("closed-book", "rag", "joint")
HEADS = ("image", "text")


@dataclass
class RunContext:
    """What every stage needs: the resolved config, the run directory (markers, checkpoints) and the report dir."""

    cfg: RunConfig
    run: RunDir
    report_dir: Path


@dataclass
class QueryInputs:
    """Per split: the query images preprocessed for the retriever, their untrained (frozen) embeddings, and the corpus
    ids each query must never retrieve (its own image)."""

    pixels: dict[str, Any]
    frozen: dict[str, np.ndarray]
    exclude: dict[str, list[set[str]]]


# ------------------------------------------------------------------------------------------------------- helpers


def same_image_exclusions(ds: Dataset, queries: Sequence[Query]) -> list[set[str]]:
    """Per query, the corpus ids that show the query's own image (dataset.yaml `extra.same_image_keys`, else the
    same image path), which retrieval must never return."""
    keys = ds.meta.extra.get("same_image_keys")
    if keys:
        by_key: dict[tuple, set[str]] = {}
        for item in ds.corpus:
            k = tuple(item.metadata.get(key) for key in keys)
            if None not in k:
                by_key.setdefault(k, set()).add(item.id)
        return [set(by_key.get(tuple(q.metadata.get(key) for key in keys), ())) for q in queries]
    by_path: dict[str, set[str]] = {}
    for item in ds.corpus:
        by_path.setdefault(item.image, set()).add(item.id)
    return [set(by_path.get(q.image, ())) for q in queries]


def answerable(ds: Dataset) -> Dataset:
    """The dataset with the queries the reader can answer: multi-label queries (one yes/no question per offered
    label), open VQA questions (answered by generation) and closed questions with at least two candidate answers;
    closed questions with fewer are left out (logged)."""
    task = Task.of(ds.meta)
    kept = {split: [q for q in qs if task.answer_type(q) != CLOSED or len(q.candidates) >= 2]
            for split, qs in ds.queries.items()}
    for split, qs in ds.queries.items():
        if len(kept[split]) < len(qs):
            log.info("%s: %d of %d %s queries are closed questions with fewer than two candidate answers; left out",
                     ds.root, len(qs) - len(kept[split]), len(qs), split)
    return dataclasses.replace(ds, queries=kept)


def interleave(hits: dict[str, list[tuple[str, float]]], order: Sequence[str]) -> list[tuple[str, str, float]]:
    """Merge the heads' ranked lists into one ranking: order[0]'s 1st, order[1]'s 1st, order[0]'s 2nd, ..."""
    out = []
    for i in range(max(len(h) for h in hits.values())):
        for head in order:
            if i < len(hits[head]):
                item_id, score = hits[head][i]
                out.append((head, item_id, score))
    return out


def main_first(fn, *args):
    """Run a stage on the main process while the others wait, then let them load its result from disk."""
    if distributed.is_main():
        result = fn(*args)
        distributed.barrier()
        return result
    distributed.barrier()
    return fn(*args)


# -------------------------------------------------------------------------------------------------------- stages


def dataset(ctx: RunContext) -> Dataset:
    """The dataset: an existing directory, or built into the run directory (synthetic or MedMNIST)."""
    cfg = ctx.cfg.data
    if cfg.kind == "dir":
        return load_dataset(cfg.path)
    path = ctx.run / "data"
    if not ctx.run.stage_done("data"):
        if cfg.kind == "medmnist":
            from .data.medmnist import convert_medmnist

            convert_medmnist(cfg.flag, path, npz=Path(cfg.npz) if cfg.npz else None, overwrite=True, seed=cfg.seed)
        else:
            from .data.synth import generate

            generate(path, seed=cfg.seed, overwrite=True, **dataclasses.asdict(cfg.synth))
        ctx.run.mark_done("data", {"path": str(path)})
    return load_dataset(path)


def encoder(ctx: RunContext, ds: Dataset):
    """The retriever's encoder, after the optional contrastive stage on the corpus; saved in the run directory."""
    from .training.contrastive import pretrain_contrastive
    from .retrieval.encoders import Encoder

    cfg = ctx.cfg.retriever
    device = distributed.resolve_device(cfg.device)
    saved = ctx.run / "encoder"
    if ctx.run.stage_done("encoder"):
        return Encoder.load_saved(saved, device=device)
    enc = Encoder.load(cfg.encoder, pretrained=cfg.pretrained, device=device)
    info: dict[str, Any] = {"encoder": cfg.encoder}
    if cfg.pretrain is not None:
        info["pretrain_losses"] = pretrain_contrastive(
            enc, [ds.image_path(c.image) for c in ds.corpus], [c.text for c in ds.corpus], cfg.pretrain,
            seed=ctx.cfg.seed)
    enc.save(saved)
    ctx.run.mark_done("encoder", info)
    return Encoder.load_saved(saved, device=device)


def index(ctx: RunContext, ds: Dataset, enc):
    """The image and text indexes of the corpus (frozen document embeddings)."""
    from .retrieval.retriever import Retriever, build_retriever

    path = ctx.run / "index"
    if ctx.run.stage_done("index"):
        return Retriever.load(path, enc, ds.corpus_checksum)
    retriever = build_retriever(ds, enc, path, ctx.cfg.retriever.index, batch_size=ctx.cfg.retriever.batch_size)
    ctx.run.mark_done("index", {"count": len(ds.corpus)})
    return retriever


def query_inputs(ctx: RunContext, ds: Dataset, enc) -> QueryInputs:
    """Preprocessed query images, frozen embeddings and same-image exclusions of the splits the run uses."""
    splits = [s for s in dict.fromkeys(("train", "val", ctx.cfg.inference.split)) if s in ds.queries]
    pixels = {s: enc.preprocess_images([ds.image_path(q.image) for q in ds.queries[s]]) for s in splits}
    return QueryInputs(pixels, {s: enc.encode_image_tensor(p) for s, p in pixels.items()},
                       {s: same_image_exclusions(ds, ds.queries[s]) for s in splits})


def reader_base(ctx: RunContext) -> ReaderSettings:
    """The reader settings with a recipe name (core/reader/build.py, e.g. `effnet-smollm2`) replaced by the
    directory it is built into, once, in the run directory (`reader-base`); other models are returned as given."""
    from .reader.build import build_reader, recipe_of

    cfg = ctx.cfg.reader
    recipe = recipe_of(cfg.model)
    if recipe is None:
        return cfg
    path = ctx.run / "reader-base"
    if not ctx.run.stage_done("reader-base"):
        if distributed.is_main():
            build_reader(recipe, path, seed=ctx.cfg.seed)
            ctx.run.mark_done("reader-base", {"recipe": cfg.model, **dataclasses.asdict(recipe)})
        distributed.barrier()
    return dataclasses.replace(cfg, model=str(path))


def vision_features(ctx: RunContext, ds: Dataset, model) -> None:
    """Frozen-tower families: the tower's features of every corpus and query image, computed once for the run and
    kept in the run directory (`vision-features.safetensors`); later stages and resumed runs reuse them."""
    cache = model.tower_cache
    if cache is None:
        return
    file = ctx.run / "vision-features.safetensors"
    if file.is_file() and cache.load(file, ds.root):
        return
    images = {str(ds.image_path(item.image)): f"corpus item {item.id!r} field 'image'" for item in ds.corpus}
    images.update({str(ds.image_path(q.image)): f"query {q.id!r} field 'image'"
                   for split in ds.queries.values() for q in split})
    cache.get(images, batch_size=ctx.cfg.reader.batch_size)
    if distributed.is_main():
        cache.save(file, ds.root)
    log.info("vision features of %d images cached in %s", len(images), file)


def align(ctx: RunContext, ds: Dataset, model) -> None:
    """Projector alignment (LLaVA stage 1, `reader.align`): caption the corpus images with their corpus texts,
    training only the projector; the aligned projector is kept in the run directory (`aligned-projector`)."""
    from safetensors.torch import load_file, save_file

    from .training.finetune import align_settings, caption_examples, finetune

    settings = ctx.cfg.reader.align
    if settings is None:
        return
    projector = model.hf_model.get_submodule(model.family.projector or "")
    file = ctx.run / "aligned-projector.safetensors"
    if ctx.run.stage_done("align"):
        projector.load_state_dict(load_file(str(file)))
        return
    examples = caption_examples(ds.corpus, settings.question)
    history = finetune(model, examples, ds.root, align_settings(settings), seed=ctx.cfg.seed,
                       checkpoint_dir=ctx.run / "checkpoints" / "align", projector_only=True)
    model.model.requires_grad_(True)
    if model.family.tower:
        model.hf_model.get_submodule(model.family.tower).requires_grad_(False)
    if distributed.is_main():
        tmp = file.with_name(file.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}, str(tmp))
        tmp.replace(file)
        ctx.run.mark_done("align", {"examples": len(examples), "history": history.to_json()})
    distributed.barrier()


def reader(ctx: RunContext, ds: Dataset, retriever, q: QueryInputs):
    """The reader fine-tuned on single-context prompts from the untrained retriever (top-n of each head per training
    query), validated on the val queries' top image context; built from a recipe and its projector aligned first
    when the config asks for it."""
    from .training.finetune import finetune
    from .reader.model import Reader

    cfg, seed = reader_base(ctx), ctx.cfg.seed
    saved = ctx.run / "reader"
    if ctx.run.stage_done("reader"):
        if cfg.lora is not None:
            model = Reader.from_config(dataclasses.replace(cfg, adapter=str(saved), lora=None), ds, seed)
        else:
            model = Reader.from_config(dataclasses.replace(cfg, model=str(saved)), ds, seed)
        vision_features(ctx, ds, model)
        return model
    model = Reader.from_config(cfg, ds, seed)
    vision_features(ctx, ds, model)
    align(ctx, ds, model)
    ft = cfg.finetune
    items = ds.corpus_by_id()
    task = Task.of(ds.meta)
    hits = retriever.search({h: q.frozen["train"] for h in HEADS}, ft.contexts_per_head, q.exclude["train"])
    # a multi-label query trains on its per-label yes/no questions, an open one on its answer's tokens
    examples = task.training_requests([(query, items[item_id]) for head in HEADS
                                          for query, row in zip(ds.queries["train"], hits[head])
                                          for item_id, _ in row])
    val = ds.queries.get("val", [])
    val_hits = retriever.search({"image": q.frozen["val"]}, 1, q.exclude["val"])["image"] if val else []
    # validation accuracy over the candidate-scored questions (per label for multi-label; open ones left out)
    val_requests = [r for query, row in zip(val, val_hits) if row
                    for r in task.validation_requests(query, items[row[0][0]])]
    history = finetune(model, examples, ds.root, ft, val_requests=val_requests, seed=seed,
                       checkpoint_dir=ctx.run / "checkpoints" / "reader")
    if distributed.is_main():
        model.save(saved)
        ctx.run.mark_done("reader", {"examples": len(examples), "history": history.to_json()})
    distributed.barrier()
    return model


def distill(ctx: RunContext, ds: Dataset, enc, retriever, model, q: QueryInputs) -> dict[str, Any]:
    """The trained query tower of each head (distilled from the frozen reader's judgement, in the configured order);
    a head left out of training stays the untrained retriever."""
    from .retrieval.heads import QueryTower
    from .training.distill import DistillTask, ReaderJudge, train_head

    cfg = ctx.cfg.distill
    towers = {}
    judge = ReaderJudge(model, ds.root, ds.queries["train"], ds.corpus_by_id(), batch_size=ctx.cfg.reader.batch_size,
                        task=Task.of(ds.meta))
    for head in cfg.heads:
        tower = QueryTower(enc, head, alpha=cfg.alpha)
        path = ctx.run / "heads" / f"{head}.safetensors"
        if ctx.run.stage_done(f"distill-{head}"):
            towers[head] = tower.load(path)
            # the next head starts from the judge cache this one ended with, as in an uninterrupted run
            judge.restore_from(ctx.run / "checkpoints" / f"distill-{head}")
            continue
        task = DistillTask(tower, retriever.indexes[head], judge, q.pixels["train"], q.exclude["train"],
                           candidates=cfg.candidates, tau_gold=cfg.tau_gold, tau_retriever=cfg.tau_retriever,
                           prior_tilt=cfg.prior_tilt, inconsistency_weighting=cfg.inconsistency_weighting,
                           inconsistency_factor=cfg.inconsistency_factor)
        history = train_head(task, cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.refresh_every,
                             seed=ctx.cfg.seed, checkpoint_dir=ctx.run / "checkpoints" / f"distill-{head}",
                             checkpoint_every=cfg.checkpoint_every)
        if distributed.is_main():
            tower.save(path)
            ctx.run.mark_done(f"distill-{head}", {"history": history})
        distributed.barrier()
        towers[head] = tower
    for head in HEADS:
        towers.setdefault(head, QueryTower(enc, head, alpha=cfg.alpha))
    return towers


def predict(ctx: RunContext, ds: Dataset, retriever, model, q: QueryInputs, towers, split: str,
            log_dir: Path, limit: int | None = None) -> list[dict]:
    """Per-context predictions of closed-book, rag and joint on `split`, logged as they are produced (a rerun skips
    finished queries); every process of a torchrun group scores its shard. Returns every finished row. `limit`: only
    that many of the split's queries, a sample fixed by the run's seed (`inference.val_queries`).

    Closed questions score their candidates; multi-label queries ask one yes/no question per offered label per
    context (core/tasks.py); open questions are answered by greedy generation, one answer per context."""
    from tqdm.auto import tqdm

    cfg = ctx.cfg.inference
    queries = ds.queries[split]
    items = ds.corpus_by_id()
    task = Task.of(ds.meta)
    if cfg.prior_correction:
        task = task.with_prior(ds.queries["train"])
        log.info("prior correction: answers re-weighted by their training counts + 1 %s", task.answer_prior)
    plog = PredictionLog(log_dir)
    hits = {"rag": retriever.search({h: q.frozen[split] for h in HEADS}, cfg.top_n, q.exclude[split]),
            "joint": retriever.search({h: towers[h].embed(q.pixels[split]) for h in HEADS}, cfg.top_n,
                                      q.exclude[split])}
    chosen = range(len(queries))
    if limit is not None and limit < len(queries):
        chosen = sorted(np.random.default_rng(ctx.cfg.seed).choice(len(queries), limit, replace=False).tolist())
    todo = distributed.shard([(s, qi) for s in SYSTEMS for qi in chosen if (s, queries[qi].id) not in plog.done])
    tau = ctx.cfg.inference.fusion.temperature
    # prompt passes per context: a multi-label context's L questions share one prefix pass (ScoreRequest.share_prefix)
    per_context = len(ds.meta.labels) if ds.meta.task == "multilabel" and not ctx.cfg.reader.share_prefix else 1
    chunk = max(1, ctx.cfg.reader.batch_size // (2 * cfg.top_n * per_context))
    bar = tqdm(total=len(todo), desc=f"per-context predictions ({split})", unit="query",
               disable=not distributed.is_main())
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            plans = [(system, queries[qi], [("", "", 0.0)] if system == "closed-book" else
                      interleave({h: hits[system][h][qi] for h in HEADS}, cfg.rank_order)) for system, qi in part]
            # one routing (core/tasks.py): each query's requests, all of them answered by type in one call each
            requests = [task.requests(query, [items[item_id] if item_id else None for _, item_id, _ in ranked])
                        for _, query, ranked in plans]
            outputs = iter(run_requests(model, [r for rs in requests for r in rs], ds.root))
            for (system, query, ranked), rs in zip(plans, requests):
                _log_answers(plog, task, system, query, ranked, [next(outputs) for _ in rs], tau)
            bar.update(len(part))
    finally:
        bar.close()
        plog.close()
    distributed.barrier()  # every process's share is written
    return read_logs(log_dir)


def _log_answers(plog: PredictionLog, task: Task, system: str, query: Query, ranked, outputs: list,
                 tau: float) -> None:
    """One query's context rows and its final answer (`Task.context_answers`, `Task.fused_answer`): closed-book,
    the one prompt's answer; else the contexts' answers fused with the weights softmax(retrieval score / tau)."""
    kind = task.answer_type(query)
    answers = task.context_answers(query, outputs)
    if system == "closed-book":
        prediction, probs = answers[0]
        plog.write([], Answer(system, query.id, prediction, query.label, probs, answer_type=kind))
        return
    rows = [ContextPrediction(system, query.id, rank, query.label, prediction, item_id, head, float(score), probs,
                              answer_type=kind)
            for rank, ((head, item_id, score), (prediction, probs)) in enumerate(zip(ranked, answers), 1)]
    prediction, probs = task.fused_answer(query, outputs, [s for _, _, s in ranked], tau)
    plog.write(rows, Answer(system, query.id, prediction, query.label, probs, answer_type=kind))


def probe(ctx: RunContext, ds: Dataset, split: str, log_dir: Path) -> list[dict]:
    """The `probe` baseline's answers on `split` (core/probe.py: logistic regression on frozen vision features of the
    training queries, C chosen on val), logged like every system's; [] when the probe is off or cannot run here
    (mode auto: the reason is logged). Runs after the other systems and draws no random numbers from torch, so their
    results are the same with and without it."""
    from .probe import SYSTEM, ProbeError, fit, image_features, load_encoder, unavailable

    settings = ctx.cfg.probe
    if settings.mode == "off":
        return []
    reason = unavailable(settings, ds.meta.task)
    if reason is not None:
        if settings.mode == "on":
            raise ProbeError(f"probe.mode is 'on' but the probe cannot run: {reason}")
        log.info("probe baseline left out: %s", reason)
        return []
    plog = PredictionLog(log_dir)
    queries = ds.queries[split]
    try:
        if all((SYSTEM, q.id) in plog.done for q in queries):
            return read_logs(log_dir)
        encoder = load_encoder(settings.weights)

        def features(qs):
            return image_features(encoder, [ds.image_path(q.image) for q in qs], settings.image_size,
                                  settings.batch_size)

        train, val = ds.queries["train"], ds.queries.get("val", [])
        fitted = fit(features(train), [q.label for q in train], features(val) if val else None,
                     [q.label for q in val], settings.c_grid, settings.balanced, seed=ctx.cfg.seed)
        proba = fitted.predict_proba(features(queries))
        for query, p in zip(queries, proba):
            if (SYSTEM, query.id) in plog.done:
                continue
            probs = {c: float(p[fitted.classes.index(c)]) if c in fitted.classes else 0.0 for c in query.candidates}
            plog.write([], Answer(SYSTEM, query.id, max(probs, key=probs.get), query.label, probs,
                                  answer_type=CLOSED))
        ctx.run.mark_done("probe", {"weights": settings.weights, "image_size": settings.image_size, "C": fitted.c,
                                    "balanced": fitted.balanced, "val_accuracy": fitted.val_accuracy,
                                    "train": len(train)})
    finally:
        plog.close()
    return read_logs(log_dir)


def report(ctx: RunContext, contexts: Path, answers: Path, val_contexts: Path | None = None,
           val_answers: Path | None = None, allow_empty: bool = False) -> tuple[str, str]:
    """The oracle report in the report directory (with the `learned` selector trained on the validation predictions
    when they exist and scikit-learn is installed); returns its path and the compact terminal table."""
    from importlib.util import find_spec

    from ..analysis.report import OracleReport
    from .base.answers import AnswerSettings

    train = {}
    if val_contexts is not None:
        if find_spec("sklearn") is None:
            log.warning("learned selector left out: scikit-learn is not installed (pip install 'dxrag[learn]')")
        else:
            train = {"selector_train": val_contexts, "selector_train_answers": val_answers}
    from .base.tables import TableError

    # the fusion selector reproduces the pipeline's fused answers: same temperature, same empty-set rule
    tau = ctx.cfg.inference.fusion.temperature
    train["answer_settings"] = AnswerSettings(allow_empty=allow_empty)
    try:
        rep = OracleReport.from_tables(contexts, answers=answers, reference="rag", fusion_temperature=tau, **train)
    except TableError as e:
        if not train:
            raise
        # e.g. every validation context right (or wrong): nothing to learn from; the other selectors still report
        log.warning("learned selector left out: %s", e)
        rep = OracleReport.from_tables(contexts, answers=answers, reference="rag", fusion_temperature=tau,
                                       answer_settings=train["answer_settings"])
    rep.write(ctx.report_dir, figures=ctx.cfg.figures)
    return str(ctx.report_dir), rep.compact_table()
