"""`dxrag sweep`: the same config over several seeds, and how robust joint − rag is across them (per-seed deltas,
mean ± standard error, and an exact McNemar test pooled over every seed's queries).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import load_config
from .fsutil import atomic_dir
from .pipeline import run_pipeline
from .records import normalize_answer

log = logging.getLogger(__name__)

COLUMNS = ("seed", "closed_book_acc", "rag_acc", "joint_acc", "delta_fused", "delta_fused_inconsistent",
           "delta_top1", "only_joint", "only_rag")


def _seed_row(seed: int, run_dir: Path) -> tuple[dict[str, Any], list[tuple[bool, bool]]]:
    from ..analysis.report import OracleReport

    contexts, answers = run_dir / "predictions" / "contexts.jsonl", run_dir / "predictions" / "answers.jsonl"
    config = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"]
    report = OracleReport.from_tables(contexts, answers=answers, reference="rag",
                                      fusion_temperature=config["distill"]["tau_retriever"])
    acc = report.subsets().set_index(["system", "method", "subset"])["acc"]
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    right = {(r["system"], r["query_id"]): normalize_answer(r["label"]) == normalize_answer(r["prediction"])
             for r in rows}
    pairs = [(right[("joint", q)], right[("rag", q)]) for s, q in sorted(right) if s == "joint"]
    row = {
        "seed": seed,
        "closed_book_acc": acc.get(("closed-book", "answer", "all"), float("nan")),
        "rag_acc": acc[("rag", "answer", "all")],
        "joint_acc": acc[("joint", "answer", "all")],
        "delta_fused": acc[("joint", "answer", "all")] - acc[("rag", "answer", "all")],
        "delta_fused_inconsistent": (acc.get(("joint", "answer", "inconsistent"), float("nan"))
                                     - acc.get(("rag", "answer", "inconsistent"), float("nan"))),
        "delta_top1": acc[("joint", "top1", "all")] - acc[("rag", "top1", "all")],
        "only_joint": sum(a and not b for a, b in pairs),
        "only_rag": sum(b and not a for a, b in pairs),
    }
    return row, pairs


def sweep(config: Path, seeds: Sequence[int], overrides: dict[str, Any], vary_data: bool = True,
          trained: Path = Path("trained"), reports: Path = Path("reports")) -> tuple[Any, str, Path]:
    """Run (or continue) one pipeline run per seed, then write `<reports>/<run>-seeds/seeds.csv` and `seeds.md`.
    Returns (the per-seed DataFrame, the Markdown summary, the output directory)."""
    import pandas as pd

    from ..analysis.stats import mcnemar

    name = load_config(config, overrides).run
    rows, pooled = [], []
    for seed in seeds:
        seeded = {**overrides, "seed": seed, **({"data.seed": seed} if vary_data else {})}
        run_dir = trained / f"{name}-seed{seed}"
        log.info("seed %d: %s", seed, run_dir)
        run_pipeline(load_config(config, seeded), run_dir, reports / f"{name}-seed{seed}")
        row, pairs = _seed_row(seed, run_dir)
        rows.append(row)
        pooled += pairs
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    test = mcnemar(np.array([a for a, _ in pooled]), np.array([b for _, b in pooled]))
    n = len(frame)

    def mean_se(col: str) -> str:
        values = frame[col].to_numpy(dtype=float)
        se = values.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
        return f"{values.mean():+.3f} ± {se:.3f}"

    lines = [f"# {name}: joint vs rag over {n} seeds ({'data and models' if vary_data else 'models'} vary)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
             *("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |"
               for r in frame.itertuples(index=False)),
             "",
             f"- fused answer, joint − rag: {mean_se('delta_fused')} (mean ± s.e.); positive on "
             f"{int((frame['delta_fused'] > 0).sum())} of {n} seeds",
             f"- on rag's inconsistent queries: {mean_se('delta_fused_inconsistent')}",
             f"- top-1 context: {mean_se('delta_top1')}",
             f"- pooled over {test.n} queries: {test.only_a} only joint right, {test.only_b} only rag right, "
             f"exact McNemar p = {test.p_value:.3g}"]
    text = "\n".join(lines) + "\n"
    out = reports / f"{name}-seeds"
    with atomic_dir(out) as tmp:
        frame.to_csv(tmp / "seeds.csv", index=False)
        (tmp / "seeds.md").write_text(text, encoding="utf-8")
    return frame, text, out
