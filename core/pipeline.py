"""The end-to-end job behind `dxrag run`: dataset → encoder (+ contrastive stage) → indexes → reader fine-tuning with
retrieved context → retriever distillation per head → per-context predictions of closed-book, rag and joint → tables
→ oracle analysis. Every stage leaves a marker in the run directory, so a rerun continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import distributed
from .config import ConfigError, RunConfig, load_config
from .dataset import Dataset, load_dataset
from .records import Answer, ContextPrediction, Query, normalize_answer
from .fsutil import atomic_write_json
from .training.runs import RunDir, provenance

log = logging.getLogger(__name__)

SYSTEMS = ("closed-book", "rag", "joint")
CONTEXTS_FILE = "contexts.jsonl"
ANSWERS_FILE = "answers.jsonl"


# ---------------------------------------------------------------------------------------------------------- helpers


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


def closed_questions(ds: Dataset) -> Dataset:
    """The dataset with only the queries the reader can score: those with at least two candidate answers (VQA sets
    keep open questions with free-text answers; the pipeline evaluates the closed ones)."""
    kept = {split: [q for q in qs if len(q.candidates) >= 2] for split, qs in ds.queries.items()}
    for split, qs in ds.queries.items():
        if len(kept[split]) < len(qs):
            log.info("%s: %d of %d %s queries are open questions without candidate answers; left out",
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


def fuse(probs: np.ndarray, scores: np.ndarray, tau: float) -> np.ndarray:
    """Per-context label distributions (n, C) weighted by softmax(retrieval score / tau) over the n contexts."""
    w = np.exp((scores - scores.max()) / tau)
    w /= w.sum()
    return (w[:, None] * probs).sum(0)


class PredictionLog:
    """Append-only JSONL of prediction rows, written as they are produced; a rerun skips finished queries.

    Each process writes its own `log-<rank>.jsonl` in `directory`; finished queries are read from every log there, so
    a rerun continues whatever the number of processes. A row is a JSON object with `kind` ("context" or "answer")
    and the record's fields; the answer row is written last and marks the query finished. A torn last line (the
    process was killed mid-write) is dropped."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"log-{distributed.rank()}.jsonl"
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self.done = {(r["system"], r["query_id"]) for r in read_logs(directory) if r["kind"] == "answer"}
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, contexts: Iterable[ContextPrediction], answer: Answer) -> None:
        """One query of one system: its context rows, then the answer row that marks it finished."""
        lines = [json.dumps({"kind": "context", **c.to_json()}) for c in contexts]
        lines.append(json.dumps({"kind": "answer", **answer.to_json()}))
        self._f.write("\n".join(lines) + "\n")
        self._f.flush()
        self.done.add((answer.system, answer.query_id))

    def close(self) -> None:
        self._f.close()


def read_logs(directory: Path) -> list[dict]:
    """Every complete row of every process's prediction log in `directory`, for queries whose answer row exists."""
    rows: list[dict] = []
    for path in sorted(directory.glob("log-*.jsonl")):
        text = path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]
        rows.extend(json.loads(line) for line in complete.splitlines())
    finished = {(r["system"], r["query_id"]) for r in rows if r["kind"] == "answer"}
    return [r for r in rows if (r["system"], r["query_id"]) in finished]


# ---------------------------------------------------------------------------------------------------------- the job


class Pipeline:
    def __init__(self, cfg: RunConfig, run_dir: Path, report_dir: Path):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.report_dir = report_dir
        self.timings: dict[str, float] = {}

    # -------------------------------------------------------------- stages

    def dataset(self) -> Dataset:
        cfg = self.cfg.data
        if cfg.kind == "dir":
            return load_dataset(cfg.path)
        path = self.run / "data"
        if not self.run.stage_done("data"):
            if cfg.kind == "medmnist":
                from .data.medmnist import convert_medmnist

                convert_medmnist(cfg.flag, path, npz=Path(cfg.npz) if cfg.npz else None, overwrite=True,
                                 seed=cfg.seed)
            else:
                from .data.synth import generate

                generate(path, seed=cfg.seed, overwrite=True, **dataclasses.asdict(cfg.synth))
            self.run.mark_done("data", {"path": str(path)})
        return load_dataset(path)

    def encoder(self, ds: Dataset):
        from .retrieval.encoders import Encoder, PretrainConfig, pretrain_contrastive

        cfg = self.cfg.retriever
        device = distributed.resolve_device(cfg.device)
        saved = self.run / "encoder"
        if self.run.stage_done("encoder"):
            return Encoder.load(f"local-dir:{saved}", device=device)
        encoder = Encoder.load(cfg.encoder, pretrained=cfg.pretrained, device=device)
        info: dict[str, Any] = {"encoder": cfg.encoder}
        if cfg.pretrain is not None:
            p = cfg.pretrain
            losses = pretrain_contrastive(encoder, [ds.image_path(c.image) for c in ds.corpus],
                                          [c.text for c in ds.corpus],
                                          PretrainConfig(seed=self.cfg.seed, **dataclasses.asdict(p)))
            info["pretrain_losses"] = losses
        encoder.save(saved)
        self.run.mark_done("encoder", info)
        return Encoder.load(f"local-dir:{saved}", device=device)

    def retriever(self, ds: Dataset, encoder):
        from .retrieval.retriever import Retriever, build_retriever

        path = self.run / "index"
        if self.run.stage_done("index"):
            return Retriever.load(path, encoder, ds.corpus_checksum)
        retriever = build_retriever(ds, encoder, path, kind=self.cfg.retriever.index,
                                    batch_size=self.cfg.retriever.batch_size)
        self.run.mark_done("index", {"count": len(ds.corpus)})
        return retriever

    def reader(self, ds: Dataset, retriever, frozen: dict[str, np.ndarray], exclude: dict[str, list[set[str]]]):
        from .reader.finetune import FinetuneConfig, finetune
        from .reader.model import LoraSettings, Reader, ReaderConfig, ScoreRequest, TinyReaderSettings

        cfg = self.cfg.reader
        saved = self.run / "reader"
        lora = None
        if cfg.lora is not None:
            kw = {k: v for k, v in dataclasses.asdict(cfg.lora).items() if v is not None}
            lora = LoraSettings(r=kw["r"], alpha=kw["alpha"], dropout=kw["dropout"],
                                **({"target_modules": kw["target_modules"]} if "target_modules" in kw else {}))
        base = ReaderConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, max_length=cfg.max_length,
                            max_pixels=cfg.max_pixels,
                            batch_size=cfg.batch_size, lora=lora, seed=self.cfg.seed,
                            tiny=TinyReaderSettings(**cfg.tiny))
        if self.run.stage_done("reader"):
            if lora is not None:
                return Reader.from_config(dataclasses.replace(base, adapter=str(saved), lora=None), ds)
            return Reader.from_config(dataclasses.replace(base, model=str(saved)), ds)
        reader = Reader.from_config(base, ds)
        ft = cfg.finetune
        items = ds.corpus_by_id()
        train = ds.queries["train"]
        hits = retriever.search({h: frozen["train"] for h in ("image", "text")}, ft.contexts_per_head,
                                exclude["train"])
        examples = [(q, items[item_id]) for head in ("image", "text")
                    for q, row in zip(train, hits[head]) for item_id, _ in row]
        val = ds.queries.get("val", [])
        val_hits = retriever.search({"image": frozen["val"]}, 1, exclude["val"])["image"] if val else []
        val_requests = [ScoreRequest(q, items[row[0][0]]) for q, row in zip(val, val_hits) if row]
        history = finetune(reader, examples, ds.root,
                           FinetuneConfig(**{k: v for k, v in dataclasses.asdict(ft).items()
                                             if k != "contexts_per_head"},
                                          seed=self.cfg.seed, checkpoint_dir=str(self.run / "checkpoints" / "reader")),
                           val_requests=val_requests)
        if distributed.is_main():
            reader.save(saved)
            self.run.mark_done("reader", {"examples": len(examples), "history": history.to_json()})
        distributed.barrier()
        return reader

    def distill(self, ds: Dataset, encoder, retriever, reader, pixels, exclude) -> dict[str, Any]:
        from .retrieval.heads import QueryTower
        from .training.distill import DistillTask, ReaderJudge, train_head

        cfg = self.cfg.distill
        towers = {}
        judge = ReaderJudge(reader, ds.root, ds.queries["train"], ds.corpus_by_id(), batch_size=self.cfg.reader.batch_size)
        for head in cfg.heads:
            tower = QueryTower(encoder, head, alpha=cfg.alpha)
            path = self.run / "heads" / f"{head}.safetensors"
            if self.run.stage_done(f"distill-{head}"):
                towers[head] = tower.load(path)
                continue
            task = DistillTask(tower, retriever.indexes[head], judge, pixels["train"], exclude["train"],
                               candidates=cfg.candidates, tau_gold=cfg.tau_gold, tau_retriever=cfg.tau_retriever,
                               prior_tilt=cfg.prior_tilt)
            history = train_head(task, cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.refresh_every,
                                 seed=self.cfg.seed, checkpoint_dir=self.run / "checkpoints" / f"distill-{head}",
                                 checkpoint_every=cfg.checkpoint_every)
            if distributed.is_main():
                tower.save(path)
                self.run.mark_done(f"distill-{head}", {"history": history})
            distributed.barrier()
            towers[head] = tower
        for head in ("image", "text"):  # a head left out of training stays the untrained retriever
            towers.setdefault(head, QueryTower(encoder, head, alpha=cfg.alpha))
        return towers

    def predict(self, ds: Dataset, retriever, reader, pixels, frozen, exclude, towers) -> list[dict]:
        from tqdm.auto import tqdm

        from .reader.model import ScoreRequest

        cfg = self.cfg.inference
        queries = ds.queries[cfg.split]
        items = ds.corpus_by_id()
        plog = PredictionLog(self.run / "predictions")
        hits = {
            "rag": retriever.search({h: frozen[cfg.split] for h in ("image", "text")}, cfg.top_n, exclude[cfg.split]),
            "joint": retriever.search({h: towers[h].embed(pixels[cfg.split]) for h in ("image", "text")},
                                      cfg.top_n, exclude[cfg.split]),
        }
        tau = self.cfg.distill.tau_retriever
        todo = distributed.shard([(s, qi) for s in SYSTEMS for qi in range(len(queries))
                                  if (s, queries[qi].id) not in plog.done])
        chunk = max(1, self.cfg.reader.batch_size // (2 * cfg.top_n))
        bar = tqdm(total=len(todo), desc="per-context predictions", unit="query", disable=not distributed.is_main())
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                plans = []
                for system, qi in part:
                    q = queries[qi]
                    if system == "closed-book":
                        plans.append((system, q, [("", "", 0.0)]))
                    else:
                        ranked = interleave({h: hits[system][h][qi] for h in ("image", "text")}, cfg.rank_order)
                        plans.append((system, q, ranked))
                requests = [ScoreRequest(q, items[item_id] if item_id else None)
                            for _, q, ranked in plans for _, item_id, _ in ranked]
                scores = iter(reader.score(requests, ds.root, progress=False))
                for system, q, ranked in plans:
                    probs = np.stack([np.exp(next(scores)) for _ in ranked])
                    cands = list(q.candidates)
                    if system == "closed-book":
                        plog.write([], Answer(system, q.id, cands[int(probs[0].argmax())], q.label,
                                              dict(zip(cands, map(float, probs[0])))))
                        continue
                    rows = [ContextPrediction(system, q.id, rank, q.label, cands[int(p.argmax())], item_id, head,
                                              float(score), dict(zip(cands, map(float, p))))
                            for rank, ((head, item_id, score), p) in enumerate(zip(ranked, probs), 1)]
                    fused = fuse(probs, np.array([s for _, _, s in ranked]), tau)
                    plog.write(rows, Answer(system, q.id, cands[int(fused.argmax())], q.label,
                                            dict(zip(cands, map(float, fused)))))
                bar.update(len(part))
        finally:
            bar.close()
            plog.close()
        distributed.barrier()  # every process's share is written
        return read_logs(self.run / "predictions")

    def write_tables(self, rows: list[dict]) -> tuple[Path, Path]:
        import pandas as pd

        from ..analysis.tables import write_table

        out = self.run / "predictions"
        ctx = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "context"]
        ans = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "answer"]
        contexts = pd.DataFrame(ctx).sort_values(["system", "query_id", "rank"], kind="stable")
        answers = pd.DataFrame(ans).sort_values(["system", "query_id"], kind="stable")
        write_table(contexts, out / CONTEXTS_FILE)
        write_table(answers, out / ANSWERS_FILE)
        return out / CONTEXTS_FILE, out / ANSWERS_FILE

    # -------------------------------------------------------------- driver

    @staticmethod
    def _main_first(fn, *args):
        """Run a stage on the main process while the others wait, then let them load its result from disk."""
        if distributed.is_main():
            result = fn(*args)
            distributed.barrier()
            return result
        distributed.barrier()
        return fn(*args)

    def _timed(self, name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        self.timings[name] = round(time.perf_counter() - t, 2)
        log.info("stage %s: %.1f s", name, self.timings[name])
        return result

    def run_all(self) -> dict[str, Any]:
        import torch

        torch.manual_seed(self.cfg.seed)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        reused = sorted(p.stem for p in (self.run / "stages").glob("*.json"))
        t0 = time.perf_counter()
        ds = closed_questions(self._timed("data", self._main_first, self.dataset))
        encoder = self._timed("encoder", self._main_first, self.encoder, ds)
        retriever = self._timed("index", self._main_first, self.retriever, ds, encoder)
        splits = list(dict.fromkeys(s for s in ("train", "val", self.cfg.inference.split) if s in ds.queries))
        pixels = {s: encoder.preprocess_images([ds.image_path(q.image) for q in ds.queries[s]]) for s in splits}
        frozen = {s: encoder.encode_image_tensor(p) for s, p in pixels.items()}  # the untrained query embeddings
        exclude = {s: same_image_exclusions(ds, ds.queries[s]) for s in splits}
        reader = self._timed("reader", self.reader, ds, retriever, frozen, exclude)
        towers = self._timed("distill", self.distill, ds, encoder, retriever, reader, pixels, exclude)
        rows = self._timed("predict", self.predict, ds, retriever, reader, pixels, frozen, exclude, towers)
        if not distributed.is_main():
            return {}
        contexts, answers = self.write_tables(rows)
        metrics = evaluate(rows, ds)
        summary = {"run_dir": str(self.run.path), "contexts": str(contexts), "answers": str(answers),
                   "metrics": metrics, "timings": self.timings, "reused_stages": reused}
        if self.cfg.report:
            summary["report"], summary["compact"] = self._timed("report", self.report, contexts, answers)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(self.run / "metrics.json", summary)
        return summary

    def report(self, contexts: Path, answers: Path) -> tuple[str, str]:
        """Write the oracle report; returns its directory and the compact terminal table."""
        from ..analysis.report import OracleReport

        report = OracleReport.from_tables(contexts, answers=answers, reference="rag",
                                           fusion_temperature=self.cfg.distill.tau_retriever)
        report.write(self.report_dir, figures=self.cfg.figures)
        return str(self.report_dir), report.compact_table()


def evaluate(rows: list[dict], ds: Dataset) -> dict[str, Any]:
    """Accuracy (Wilson 95% interval) and macro-F1 of every system's final answer (for VQA sets: the closed
    questions), and joint vs rag with an exact McNemar test on the same queries."""
    from ..analysis.stats import mcnemar, wilson

    labels = [normalize_answer(x) for x in ds.meta.labels]
    out: dict[str, Any] = {}
    correct: dict[str, dict[str, bool]] = {}
    for system in dict.fromkeys(r["system"] for r in rows if r["kind"] == "answer"):
        answers = [r for r in rows if r["kind"] == "answer" and r["system"] == system]
        y = np.array([normalize_answer(r["label"]) for r in answers])
        p = np.array([normalize_answer(r["prediction"]) for r in answers])
        f1s = [2 * np.sum((p == c) & (y == c)) / (np.sum(p == c) + np.sum(y == c)) for c in labels if np.sum(y == c)]
        lo, hi = wilson(int(np.sum(y == p)), len(y))
        out[system] = {"n": len(y), "accuracy": float(np.mean(y == p)), "accuracy_lo": lo, "accuracy_hi": hi,
                       "macro_f1": float(np.mean(f1s))}
        correct[system] = {r["query_id"]: bool(a == b) for r, a, b in zip(answers, y, p)}
    if "joint" in correct and "rag" in correct:
        shared = sorted(correct["joint"].keys() & correct["rag"].keys())
        test = mcnemar(np.array([correct["joint"][q] for q in shared]), np.array([correct["rag"][q] for q in shared]))
        out["joint_vs_rag"] = {"n": test.n, "only_joint": test.only_a, "only_rag": test.only_b,
                               "p_value": test.p_value}
    return out


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    diffs = []
    for k in keys:
        path = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diffs += _config_diff(a[k], b[k], path + ".")
        elif a.get(k) != b.get(k):
            diffs.append(path)
    return diffs


def run_pipeline(cfg: RunConfig, run_dir: Path | None = None, report_dir: Path | None = None,
                 resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue) the job of `cfg`. An existing run directory made with the same config is continued; one
    made with another config is refused unless `overwrite` (then started afresh)."""
    import shutil

    distributed.init()
    run_dir = Path(run_dir or Path("trained") / cfg.run)
    report_dir = Path(report_dir or Path("reports") / cfg.run)
    saved = run_dir / "run.json"
    if not distributed.is_main():  # the main process checks and prepares the run directory
        distributed.barrier()
        return Pipeline(cfg, run_dir, report_dir).run_all()
    if saved.exists():
        previous = json.loads(saved.read_text(encoding="utf-8"))["config"]
        diffs = _config_diff(previous, cfg.to_dict())
        if diffs and not overwrite:
            raise ConfigError(f"{run_dir}: this run directory was made with another config (differs at "
                              f"{', '.join(diffs[:6])}); pass --overwrite to start it afresh, or choose another "
                              f"--run-dir / run name")
        if diffs or overwrite:
            shutil.rmtree(run_dir)
        else:
            log.info("continuing run %s (same config; finished stages are skipped)", run_dir)
    elif resume:
        raise ConfigError(f"{run_dir}: nothing to resume (no run.json); run without --resume to start it")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        atomic_write_json(saved, provenance(cfg.to_dict(), cfg.seed, {"run_dir": str(run_dir),
                                                                      "world_size": distributed.world_size()}))
    distributed.barrier()
    return Pipeline(cfg, run_dir, report_dir).run_all()


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "dxrag run finished in %.0f s" % summary["wall_s"]]
    if summary.get("reused_stages"):
        lines[-1] += f" (reused from the run directory: {', '.join(summary['reused_stages'])})"
    lines.append("")
    metrics = dict(summary["metrics"])
    paired = metrics.pop("joint_vs_rag", None)
    lines.append(f"{'system':<14}{'n':>6}  {'accuracy [95% CI]':<22}{'macro-F1':>9}")
    for system, m in metrics.items():
        acc = f"{m['accuracy']:.3f} [{m['accuracy_lo']:.3f},{m['accuracy_hi']:.3f}]"
        lines.append(f"{system:<14}{m['n']:>6}  {acc:<22}{m['macro_f1']:>9.3f}")
    if paired:
        lines.append(f"joint vs rag (exact McNemar): {paired['only_joint']} queries only joint gets right, "
                     f"{paired['only_rag']} only rag, p = {paired['p_value']:.3g}")
    if summary.get("compact"):
        lines += ["", summary["compact"]]
    lines += ["", f"run directory: {summary['run_dir']}", f"prediction tables: {summary['contexts']}, "
              f"{summary['answers']}"]
    if summary.get("report"):
        lines.append(f"analysis report: {summary['report']} (summary.md, CSV tables, figures/)")
    return "\n".join(lines)


def run_from_args(args) -> int:
    from .cli import _parse_sets

    try:
        cfg = load_config(args.config, _parse_sets(args.set))
        summary = run_pipeline(cfg, args.run_dir, args.report_dir, resume=args.resume,
                               overwrite=getattr(args, "overwrite", False))
    finally:
        distributed.close()
    if distributed.is_main():
        print(format_summary(summary))
    return 0
