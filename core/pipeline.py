"""The end-to-end job behind `dxrag run`: the stages of `core/stages.py` in order, each timed, over one run directory
(config check, provenance, resume). The command-line printing lives in `core/cli.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any


from . import cpu_kernels, distributed, stages
from .config import ConfigError, RunConfig, recorded_config
from .base.dataset import Dataset
from .base.fsutil import Busy, atomic_write_json, process_lock
from .predictions import write_tables
from .base.provenance import provenance
from .stages import SYSTEMS, RunContext
from .run import RunDir

log = logging.getLogger(__name__)

__all__ = ["SYSTEMS", "run_pipeline", "run_stages", "evaluate"]


def _timed(timings: dict[str, float], name: str, fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    timings[name] = round(time.perf_counter() - t, 2)
    log.info("stage %-12s %7.1f s", name, timings[name])
    return result


def run_stages(cfg: RunConfig, run_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Every stage of the run in order (finished ones load their result); returns the run summary (also written to
    `metrics.json`). Under torchrun only the main process returns a summary."""
    import torch

    cpu_kernels.configure_torch()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = RunContext(cfg, RunDir(run_dir), report_dir)
    reused = sorted(p.stem for p in (ctx.run / "stages").glob("*.json"))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = stages.answerable(_timed(timings, "data", stages.main_first, stages.dataset, ctx))
    if distributed.is_main():
        check_inputs(ctx.run.path, ds)
    enc = _timed(timings, "encoder", stages.main_first, stages.encoder, ctx, ds)
    retriever = _timed(timings, "index", stages.main_first, stages.index, ctx, ds, enc)
    q = stages.query_inputs(ctx, ds, enc)
    model = _timed(timings, "reader", stages.reader, ctx, ds, retriever, q)
    towers = _timed(timings, "distill", stages.distill, ctx, ds, enc, retriever, model, q)
    split = cfg.inference.split
    rows = _timed(timings, "predict", stages.predict, ctx, ds, retriever, model, q, towers, split,
                  ctx.run / "predictions")
    val_rows = []
    if split != "val" and ds.queries.get("val"):  # validation predictions: what a learned context selector trains on
        val_rows = _timed(timings, "predict-val", stages.predict, ctx, ds, retriever, model, q, towers, "val",
                          ctx.run / "predictions" / "val", cfg.inference.val_queries)
    if not distributed.is_main():
        return {}
    rows = rows + _timed(timings, "probe", stages.probe, ctx, ds, split, ctx.run / "predictions" / "probe")
    contexts, answers = write_tables(rows, ctx.run / "predictions")
    summary: dict[str, Any] = {"run_dir": str(ctx.run.path), "contexts": str(contexts), "answers": str(answers)}
    val_tables: tuple[Path, Path] | tuple[()] = ()
    if val_rows:
        val_tables = write_tables(val_rows, ctx.run / "predictions", prefix="val_")
        summary["val_contexts"], summary["val_answers"] = map(str, val_tables)
    summary.update({"metrics": evaluate(rows, ds), "timings": timings, "reused_stages": reused})
    if cfg.report:
        summary["report"], summary["compact"] = _timed(timings, "report", stages.report, ctx, contexts, answers,
                                                           *(val_tables or (None, None)), ds.meta.allow_empty)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["invocations"] = _earlier_invocations(ctx.run / "metrics.json") + [
        {"timings": timings, "wall_s": summary["wall_s"], "reused_stages": reused}]
    atomic_write_json(ctx.run / "metrics.json", summary)
    return summary


def _earlier_invocations(metrics_path: Path) -> list[dict[str, Any]]:
    """The timings of every earlier invocation on this run directory, from its metrics.json, so that re-running a
    finished run (a sweep's re-analysis) keeps what building each stage cost instead of only the reload times."""
    try:
        earlier = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if isinstance(earlier.get("invocations"), list):
        return earlier["invocations"]
    if "timings" in earlier:  # written before metrics.json kept its invocations
        return [{k: earlier.get(k) for k in ("timings", "wall_s", "reused_stages")}]
    return []


INPUTS_FILE = "inputs.json"


def input_fingerprint(ds: Dataset) -> dict[str, Any]:
    """What a run's results depend on beyond its config: the corpus checksum and, per split, a sha256 of the queries
    it answers (ids, images, questions, candidates, labels, metadata)."""
    import dataclasses
    import hashlib

    def digest(queries) -> str:
        text = json.dumps([dataclasses.asdict(q) for q in queries], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    return {"corpus": ds.corpus_checksum, "queries": {split: digest(qs) for split, qs in sorted(ds.queries.items())}}


def check_inputs(run_dir: Path, ds: Dataset) -> None:
    """Record the run's inputs on its first start; on every later start refuse a dataset whose corpus or queries
    changed, so a continued run never mixes predictions (or models) of two datasets."""
    path = Path(run_dir) / INPUTS_FILE
    now = input_fingerprint(ds)
    if not path.exists():
        atomic_write_json(path, now)
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = (["corpus"] if before.get("corpus") != now["corpus"] else []) + [
        f"{split} queries" for split in sorted(set(before.get("queries", {})) | set(now["queries"]))
        if before.get("queries", {}).get(split) != now["queries"].get(split)]
    if changed:
        raise ConfigError(f"{run_dir}: the dataset {ds.root} changed since this run began ({', '.join(changed)} "
                          f"differ from {path}); pass --overwrite to start the run afresh, or choose another "
                          f"--run-dir / run name")


def evaluate(rows: list[dict], ds: Dataset) -> dict[str, Any]:
    """Accuracy (Wilson 95% interval) and macro-F1 of every system's final answer, and joint vs rag with an exact
    McNemar test on the same queries: analysis.stats computes all of them, with answers judged per `answer_type` as
    analyze-oracle does (core/base/answers.py). Multi-label: accuracy is subset accuracy, macro_f1 / micro_f1 over the
    labels' membership. VQA with open questions: `by_answer_type` adds n and accuracy of the closed and of the open
    questions (normalised exact match), and token_f1 / token_recall of the open ones."""
    import pandas as pd

    from ..analysis.stats import paired, system_metrics
    from .base.answers import CLOSED, OPEN

    answers = pd.DataFrame([r for r in rows if r["kind"] == "answer"])
    out: dict[str, Any] = system_metrics(answers, ds.meta.labels)
    types = answers["answer_type"].fillna(CLOSED) if "answer_type" in answers else pd.Series(CLOSED, answers.index)
    if (types == OPEN).any():
        for kind in (CLOSED, OPEN):
            for system, m in system_metrics(answers[types == kind], ds.meta.labels).items():
                out[system].setdefault("by_answer_type", {})[kind] = {"n": m["n"], "accuracy": m["accuracy"]}
    if {"joint", "rag"} <= set(out):
        test = paired(answers, "joint", "rag")
        out["joint_vs_rag"] = {"n": test.n, "only_joint": test.only_a, "only_rag": test.only_b,
                               "p_value": test.p_value}
    return out


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
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
    distributed.init()
    cpu_kernels.configure_torch()  # before run.json records it
    run_dir = Path(run_dir or Path("trained") / cfg.run)
    report_dir = Path(report_dir or Path("reports") / cfg.run)
    saved = run_dir / "run.json"
    if not distributed.is_main():  # the main process checks and prepares the run directory
        distributed.barrier()
        return run_stages(cfg, run_dir, report_dir)
    # one process per run directory: the lock file sits beside it, so that --overwrite may remove the directory
    lock = run_dir.parent / f".{run_dir.name}.lock"
    try:
        with process_lock(lock, f"run directory {run_dir}"):
            return _prepare_and_run(cfg, run_dir, report_dir, resume, overwrite)
    except Busy as e:
        raise ConfigError(str(e)) from None


def _prepare_and_run(cfg: RunConfig, run_dir: Path, report_dir: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    saved = run_dir / "run.json"
    if saved.exists():
        record = json.loads(saved.read_text(encoding="utf-8"))
        diffs = _config_diff(recorded_config(record["config"]), cfg.to_dict())
        level, was = cpu_kernels.record()["level"], record.get("cpu_kernels", {}).get("level")
        if was is not None and was != level:  # kernels that round differently would mix within one run
            diffs.append(f"CPU kernels ({was} then, {level} now; {cpu_kernels.ENV})")
        if diffs and not any((run_dir / "stages").glob("*.json")):
            log.info("%s: the earlier start with another config finished no stage; starting afresh", run_dir)
            overwrite = True
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
                                                                      "world_size": distributed.world_size(),
                                                                      "cpu_kernels": cpu_kernels.record()}))
    distributed.barrier()
    return run_stages(cfg, run_dir, report_dir)
