"""`dxrag sweep`: the same config over several seeds, and how robust joint − rag is across them (per-seed deltas,
mean ± standard error, and an exact McNemar test pooled over every seed's queries); the per-seed ranges it writes are
what README figures quote and what `dxrag run --expect` checks a single run against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import load_config, recorded_config
from .base.fsutil import atomic_dir
from .pipeline import run_pipeline
from .base.answers import AnswerSettings, normalize_closed

log = logging.getLogger(__name__)

COLUMNS = ("seed", "closed_book_acc", "closed_book_macro_f1", "closed_book_distinct", "rag_acc", "joint_acc",
           "rag_inconsistent_rate", "rag_oracle", "closed_book_acc_consistent", "closed_book_acc_inconsistent",
           "delta_fused", "delta_fused_inconsistent", "delta_top1", "only_joint", "only_rag")
# the columns whose per-seed range a single run is checked against (`dxrag run --expect`)
RANGE_COLUMNS = ("closed_book_acc", "closed_book_macro_f1", "rag_acc", "joint_acc", "rag_inconsistent_rate",
                 "rag_oracle", "closed_book_acc_consistent", "closed_book_acc_inconsistent", "delta_fused")


def allow_empty(run_dir: Path, config: dict[str, Any]) -> bool:
    """Whether the run's dataset allows the empty label set (dataset.yaml `allow_empty`): the dataset built into the
    run directory, or the directory `data.path` names; False (logged) when neither is there any more."""
    from .base.dataset import META_FILE, load_meta

    data = config.get("data", {})
    root = Path(data["path"]) if data.get("kind") == "dir" and data.get("path") else Path(run_dir) / "data"
    if not (root / META_FILE).is_file():
        log.warning("%s: the run's dataset %s is gone; re-analysed without the empty label set", run_dir, root)
        return False
    return load_meta(root).allow_empty


def seed_row(run_dir: Path, seed: int | None = None) -> dict[str, Any]:
    """The sweep-table row of one finished run directory: accuracies and joint-vs-rag counts as the run computed
    them (metrics.json), subset accuracies and inconsistency from the oracle analysis of its tables."""
    from ..analysis.report import OracleReport

    contexts, answers = run_dir / "predictions" / "contexts.jsonl", run_dir / "predictions" / "answers.jsonl"
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    config = recorded_config(record["config"])
    # the pipeline's own fusion rule: its temperature, and the empty-set rule of the run's dataset
    report = OracleReport.from_tables(contexts, answers=answers, reference="rag",
                                      fusion_temperature=config["inference"]["fusion"]["temperature"],
                                      answer_settings=AnswerSettings(allow_empty=allow_empty(run_dir, config)))
    acc = report.subsets().set_index(["system", "method", "subset"])["acc"]
    summary = report.summary().set_index("system")
    answered = report.answers.frame
    closed = answered.loc[answered["system"] == "closed-book", "prediction"]
    nan = float("nan")
    return {
        "seed": record["seed"] if seed is None else seed,
        "closed_book_acc": metrics.get("closed-book", {}).get("accuracy", nan),
        "closed_book_macro_f1": metrics.get("closed-book", {}).get("macro_f1", nan),
        "closed_book_distinct": int(closed.map(normalize_closed).nunique()),
        "rag_acc": metrics["rag"]["accuracy"],
        "joint_acc": metrics["joint"]["accuracy"],
        "rag_inconsistent_rate": float(summary.loc["rag", "inconsistent_rate"]),
        "rag_oracle": float(summary.loc["rag", "oracle_acc"]),
        "closed_book_acc_consistent": acc.get(("closed-book", "answer", "consistent"), nan),
        "closed_book_acc_inconsistent": acc.get(("closed-book", "answer", "inconsistent"), nan),
        "delta_fused": metrics["joint"]["accuracy"] - metrics["rag"]["accuracy"],
        "delta_fused_inconsistent": (acc.get(("joint", "answer", "inconsistent"), nan)
                                     - acc.get(("rag", "answer", "inconsistent"), nan)),
        "delta_top1": acc[("joint", "top1", "all")] - acc[("rag", "top1", "all")],
        "only_joint": metrics["joint_vs_rag"]["only_joint"],
        "only_rag": metrics["joint_vs_rag"]["only_rag"],
    }


def _json_rows(frame) -> list[dict[str, Any]]:
    """The per-seed rows as JSON values (ints as int, floats at full precision): what `--expect` compares with."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in frame.to_dict("records")]


def _mean_se(values) -> tuple[float, float]:
    """Mean and standard error over the seeds of the non-NaN values (NaN when none; se NaN for a single value)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def _format_mean_se(values, signed: bool = False) -> str:
    mean, se = _mean_se(values)
    if np.isnan(mean):
        return "–"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if np.isnan(se) else f"{text} ± {se:.3f}"


def seed_ranges(frame) -> dict[str, dict[str, float]]:
    """Per column of RANGE_COLUMNS: min, max, mean and standard error over the seeds."""
    out = {}
    for col in RANGE_COLUMNS:
        v = frame[col].to_numpy(dtype=float)
        v = v[~np.isnan(v)]
        if len(v):
            mean, se = _mean_se(v)
            out[col] = {"min": float(v.min()), "max": float(v.max()), "mean": mean, "se": se}
    return out


def check_against(row: dict[str, Any], expected: dict[str, Any]) -> tuple[list[str], int]:
    """Lines saying, per expected column, whether this run's value lies inside the seeds' [min, max]; and how many
    lie outside."""
    lines, outside = [], 0
    seeds = expected.get("seeds", [])
    for col, r in expected["ranges"].items():
        value = row.get(col)
        if value is None or np.isnan(value):
            continue
        inside = r["min"] - 1e-9 <= value <= r["max"] + 1e-9
        outside += not inside
        lines.append(f"  {col:<30}{value:>7.3f}  {'inside ' if inside else 'OUTSIDE'} [{r['min']:.3f}, {r['max']:.3f}]"
                     f"  (mean {r['mean']:.3f} over {len(seeds)} seeds)")
    return lines, outside


# config sections that change none of a sweep's columns: the probe baseline runs after the swept systems and its
# answers are a system of their own (the swept systems' prediction tables are identical with and without it)
NOT_SWEPT = ("probe",)


def swept_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as far as a sweep's numbers depend on it: in today's keys (`recorded_config`), without the
    sections in `NOT_SWEPT`. Two runs whose swept configs are equal must give the same row."""
    return {k: v for k, v in recorded_config(config).items() if k not in NOT_SWEPT}


def check_equal(row: dict[str, Any], config: dict[str, Any], expected: dict[str, Any]) -> tuple[list[str], int | None]:
    """Lines comparing a run's row with the committed row of its seed (`rows` of a ranges.json), value for value;
    and how many differ. None instead of a count when there is nothing to compare it with: no row for this seed, or
    a run whose config is not the sweep's (beyond its seed)."""
    rows = {r["seed"]: r for r in expected.get("rows", [])}
    seed = row["seed"]
    if seed not in rows:
        return [f"  no committed row for seed {seed} (seeds {sorted(rows) or 'none'}): equality not checked"], None
    swept = expected.get("config")
    if swept is not None:
        seeded = {**swept, "seed": seed}
        if expected.get("vary_data", True):
            seeded["data"] = {**swept["data"], "seed": seed}
        if swept_config(seeded) != swept_config(config):
            return [f"  this run's config is not the sweep's (beyond the seed): equality with seed {seed}'s row not "
                    f"checked"], None
    lines, differ = [], 0
    for col in COLUMNS:
        want, got = rows[seed].get(col), row.get(col)
        same = want == got or (isinstance(want, float) and isinstance(got, float) and np.isnan(want) and np.isnan(got))
        differ += not same
        lines.append(f"  {col:<30}{got!s:>22}  {'equal' if same else f'DIFFERS (committed {want!s})'}")
    return lines, differ


def seeds_markdown(name: str, frame, selectors, vary_data: bool = True) -> str:
    """`seeds.md`: the per-seed table (`frame`, one row per seed in COLUMNS), joint − rag as mean ± s.e. over the
    seeds, the pooled McNemar test, and each (system, selector)'s mean ± s.e. over the seeds (`selectors`, the
    seeds' selectors.csv rows)."""
    from ..analysis.stats import mcnemar_p

    only_joint, only_rag = int(frame["only_joint"].sum()), int(frame["only_rag"].sum())
    n = len(frame)

    def mean_se(col: str) -> str:
        return _format_mean_se(frame[col], signed=True)

    collapsed = frame.loc[frame["closed_book_distinct"] < 2, "seed"].tolist()
    lines = [f"# {name}: joint vs rag over {n} seeds ({'data and models' if vary_data else 'models'} vary)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
             *("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |"
               for r in frame.itertuples(index=False)),
             "",
             f"- fused answer, joint − rag: {mean_se('delta_fused')} (mean ± s.e.); positive on "
             f"{int((frame['delta_fused'] > 0).sum())} of {n} seeds",
             f"- on rag's inconsistent queries: {mean_se('delta_fused_inconsistent')}",
             f"- top-1 context: {mean_se('delta_top1')}",
             f"- pooled over every seed's queries: {only_joint} only joint right, {only_rag} only rag right, "
             f"exact McNemar p = {mcnemar_p(only_joint, only_rag):.3g}",
             f"- closed-book reader answering a single class: {'seeds ' + str(collapsed) if collapsed else 'none'}",
             "", "Selectors, mean ± s.e. over seeds (selectors.csv has every seed's rows):", "",
             "| system | selector | accuracy | gap closed |", "|---|---|---|---|",
             *(f"| {system} | {selector} | {_format_mean_se(g['acc'])} | {_format_mean_se(g['gap_closed'])} |"
               for (system, selector), g in selectors.groupby(["system", "selector"], sort=False))]
    return "\n".join(lines) + "\n"


def sweep(config: Path, seeds: Sequence[int], overrides: dict[str, Any], vary_data: bool = True,
          trained: Path = Path("trained"), reports: Path = Path("reports")) -> tuple[Any, str, Path]:
    """Run (or continue) one pipeline run per seed, then write `<reports>/<run>-seeds/seeds.csv`, `selectors.csv`
    (every seed's selector rows with a `seed` column), `seeds.md` (`seeds_markdown`) and `ranges.json`. Returns (the
    per-seed DataFrame, the Markdown summary, the output directory)."""
    import pandas as pd

    from .base.provenance import provenance

    cfg = load_config(config, overrides)
    name = cfg.run
    rows, selector_tables = [], []
    for seed in seeds:
        seeded = {**overrides, "seed": seed, **({"data.seed": seed} if vary_data else {})}
        run_dir = trained / f"{name}-seed{seed}"
        log.info("seed %d: %s", seed, run_dir)
        run_pipeline(load_config(config, seeded), run_dir, reports / f"{name}-seed{seed}")
        rows.append(seed_row(run_dir, seed))
        selector_tables.append(pd.read_csv(reports / f"{name}-seed{seed}" / "selectors.csv").assign(seed=seed))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    selectors = pd.concat(selector_tables, ignore_index=True)
    text = seeds_markdown(name, frame, selectors, vary_data)
    from . import cpu_kernels

    ranges = {**provenance(cfg.to_dict(), cfg.seed, {"cpu_kernels": cpu_kernels.record()}), "seeds": list(seeds),
              "vary_data": vary_data, "ranges": seed_ranges(frame), "rows": _json_rows(frame)}
    out = reports / f"{name}-seeds"
    with atomic_dir(out) as tmp:
        frame.to_csv(tmp / "seeds.csv", index=False)
        selectors.to_csv(tmp / "selectors.csv", index=False)
        (tmp / "seeds.md").write_text(text, encoding="utf-8")
        (tmp / "ranges.json").write_text(json.dumps(ranges, indent=2) + "\n", encoding="utf-8")
    return frame, text, out


def compare_sweeps(a_dirs: Sequence[Path], b_dirs: Sequence[Path], system: str = "joint") -> str:
    """Markdown comparing `system`'s fused answers between two sweeps run over the same seeds (e.g. a distillation
    option on and off): per seed b − a overall and on rag's inconsistent queries (rag is the same reader and
    retriever in both), mean ± s.e., and a McNemar test pooled over every seed's queries. Answers are judged and
    paired by analysis.stats, as the pipeline's own joint-vs-rag test."""
    import pandas as pd

    from ..analysis.report import OracleReport
    from ..analysis.stats import mcnemar_p, paired, system_metrics
    from ..analysis.tables import load_answers

    rows, only_a, only_b = [], 0, 0
    for a, b in zip(a_dirs, b_dirs, strict=True):
        frames = [load_answers(d / "predictions" / "answers.jsonl").frame for d in (a, b)]
        both = pd.concat([f[f["system"] == system].assign(system=tag) for f, tag in zip(frames, "ab")],
                         ignore_index=True)
        if set(both.loc[both["system"] == "a", "query_id"]) != set(both.loc[both["system"] == "b", "query_id"]):
            raise ValueError(f"{a} and {b}: {system} answered different queries; compare runs of the same seeds")
        per_query = OracleReport.from_tables(a / "predictions" / "contexts.jsonl").per_query()
        rag = per_query[per_query["system"] == "rag"]
        inconsistent = both["query_id"].isin(rag.loc[~rag["consistent"].astype(bool), "query_id"])
        test = paired(both, "b", "a")
        only_b, only_a = only_b + test.only_a, only_a + test.only_b
        acc, acc_inc = system_metrics(both), system_metrics(both[inconsistent])
        rows.append({"a": a.name, "b": b.name, "delta": acc["b"]["accuracy"] - acc["a"]["accuracy"],
                     "delta_inconsistent": (acc_inc["b"]["accuracy"] - acc_inc["a"]["accuracy"]
                                            if int(inconsistent.sum()) else float("nan")),
                     "n_inconsistent": int(inconsistent.sum()) // 2})
    frame = pd.DataFrame(rows)
    lines = [f"| run a | run b | {system} b − a | on rag-inconsistent (n) |", "|---|---|---|---|",
             *(f"| {r.a} | {r.b} | {r.delta:+.3f} | {r.delta_inconsistent:+.3f} ({r.n_inconsistent}) |"
               for r in frame.itertuples()),
             "", f"- b − a: {_format_mean_se(frame['delta'], signed=True)} (mean ± s.e.); on rag-inconsistent "
                 f"queries: {_format_mean_se(frame['delta_inconsistent'], signed=True)}",
             f"- pooled: {only_b} queries only b right, {only_a} only a right, exact McNemar p = "
             f"{mcnemar_p(only_b, only_a):.3g}"]
    return "\n".join(lines) + "\n"
