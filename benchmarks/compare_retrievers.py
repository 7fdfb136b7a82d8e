"""Two retrievers over the same seeds of one dataset (e.g. configs/breastmnist.yaml vs
configs/breastmnist-pretrained.yaml, both swept with `dxrag sweep --seeds ...`): retrieval quality as label precision
of the items the reader was given, and the reader-side numbers of each sweep, mean ± s.e. over seeds, plus rag's
answers of b against a, pooled exact McNemar (`dxrag compare-sweeps --system rag`).

    python benchmarks/compare_retrievers.py --a breastmnist --b breastmnist-pretrained --seeds 0 1 2

Reads the runs `dxrag sweep` leaves, trained/<run>-seed<N>/ (metrics, data/corpus.jsonl, predictions/) and
reports/<run>-seed<N>/selectors.csv, so seeds swept one call at a time combine; prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dxrag.analysis.stats import mcnemar_p
from dxrag.core.sweep import _format_mean_se, compare_sweeps, seed_row


def label_precision(run_dir: Path) -> dict[str, float]:
    """Fraction of the retrieved items (every context row of the test predictions) whose corpus label equals the
    query's label, per system (rag, joint) and per head."""
    corpus = {}
    with open(run_dir / "data" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            corpus[item["id"]] = item["label"]
    rows = [json.loads(line) for line in open(run_dir / "predictions" / "contexts.jsonl", encoding="utf-8")]
    ctx = pd.DataFrame(rows)
    ctx = ctx[ctx["item_id"].notna()]
    ctx["hit"] = [corpus[i] == lab for i, lab in zip(ctx["item_id"], ctx["label"])]
    out = {}
    for system, g in ctx.groupby("system"):
        out[f"p_{system}"] = float(g["hit"].mean())
        for head, h in g.groupby("head"):
            out[f"p_{system}_{head}"] = float(h["hit"].mean())
    out["k"] = int(ctx.groupby(["system", "query_id"]).size().max())
    return out


def sweep_frame(run: str, seeds: list[int], trained: Path, reports: Path) -> pd.DataFrame:
    frame = pd.DataFrame([seed_row(trained / f"{run}-seed{s}", s) for s in seeds])
    precision = pd.DataFrame([label_precision(trained / f"{run}-seed{s}") for s in seeds])
    frame = pd.concat([frame, precision], axis=1)
    frame["rag_minus_closed"] = frame["rag_acc"] - frame["closed_book_acc"]
    selectors = pd.concat([pd.read_csv(reports / f"{run}-seed{s}" / "selectors.csv").assign(seed=s) for s in seeds])
    selectors = selectors[selectors["system"] == "rag"]
    wide = selectors.pivot_table(index="seed", columns="selector", values="acc").loc[seeds]
    frame["rag_oracle_sel"] = wide["oracle"].to_numpy()
    real = wide.drop(columns=["oracle"])
    frame["rag_best_selector"] = real.max(axis=1).to_numpy()
    frame["rag_best_selector_name"] = real.idxmax(axis=1).to_numpy()
    return frame


ROWS = [
    ("label precision of retrieved items, rag", "p_rag"),
    ("  image head", "p_rag_image"),
    ("  text head", "p_rag_text"),
    ("label precision, joint (after distillation)", "p_joint"),
    ("closed-book accuracy", "closed_book_acc"),
    ("rag accuracy", "rag_acc"),
    ("joint accuracy", "joint_acc"),
    ("rag − closed-book", "rag_minus_closed"),
    ("rag inconsistency rate", "rag_inconsistent_rate"),
    ("closed-book acc on consistent", "closed_book_acc_consistent"),
    ("closed-book acc on inconsistent", "closed_book_acc_inconsistent"),
    ("joint − rag", "delta_fused"),
    ("joint − rag on inconsistent", "delta_fused_inconsistent"),
    ("rag oracle@k", "rag_oracle"),
    ("rag best selector", "rag_best_selector"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="run name of sweep a (the config's `run`)")
    parser.add_argument("--b", required=True, help="run name of sweep b")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--trained", type=Path, default=Path("trained"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args()
    frames = {r: sweep_frame(r, args.seeds, args.trained, args.reports) for r in (args.a, args.b)}
    print(f"seeds {args.seeds}; mean ± s.e. over seeds (k = {frames[args.a]['k'].max()} contexts per query)\n")
    print(f"| | {args.a} | {args.b} |\n|---|---|---|")
    for label, col in ROWS:
        cells = [_format_mean_se(frames[r][col], signed=col.startswith(("delta", "rag_minus"))) for r in frames]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for r, f in frames.items():
        pooled_j, pooled_r = int(f["only_joint"].sum()), int(f["only_rag"].sum())
        print(f"\n- {r}: joint vs rag pooled over seeds: {pooled_j} only joint right, {pooled_r} only rag right "
              f"(exact McNemar p = {mcnemar_p(pooled_j, pooled_r):.3g}); "
              f"closed-book answers a single class on seeds {f.loc[f['closed_book_distinct'] < 2, 'seed'].tolist()}; "
              f"best real selector per seed: {f['rag_best_selector_name'].tolist()}")
    print(f"\nrag answers, {args.b} (b) against {args.a} (a):\n")
    print(compare_sweeps([args.trained / f"{args.a}-seed{s}" for s in args.seeds],
                         [args.trained / f"{args.b}-seed{s}" for s in args.seeds], "rag"))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
