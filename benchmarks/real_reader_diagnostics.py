"""Why a binary (yes/no) run's reader answers as it does, from its run directory alone: per system the answers it
gives, the AUC of its p(yes) (ranking, whatever the threshold), mean p(yes) on positive / negative queries, and, for a
reader trained with `finetune.balanced_sampling`, what its answers would be re-weighted by the training split's prior
(odds x pi_yes / pi_no: the decision of a reader with the same ranking that had learned the split's prior). The
re-weighting is a diagnostic computed after the fact, chosen from the training split only (never from the test split);
the run's own answers are the ones its metrics report. `inference.prior_correction: true` makes it the run's own
decision (add-one smoothed counts, applied per context before fusion: core/tasks.py `Task.with_prior`).

    python benchmarks/real_reader_diagnostics.py trained/breastmnist-real-seed0 [more run dirs]
    python benchmarks/real_reader_diagnostics.py --table trained/breastmnist-real-seed*

Prints one JSON line per (run, split, system); `--table`: a Markdown table of each run's test accuracy and macro-F1
per system (its metrics.json) with the mean ± standard error over the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    from sklearn.metrics import f1_score, roc_auc_score

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        print(table(args.runs))
        return
    for run in args.runs:
        train = _rows(run / "data" / "queries-train.jsonl")
        pi = float(np.mean([q["label"] == "yes" for q in train]))
        odds = pi / (1 - pi)
        for split, name in (("test", "answers.jsonl"), ("val", "val_answers.jsonl")):
            path = run / "predictions" / name
            if not path.is_file():
                continue
            rows = _rows(path)
            for system in dict.fromkeys(r["system"] for r in rows):
                r = [x for x in rows if x["system"] == system]
                y = np.array([x["label"] == "yes" for x in r])
                p_yes = np.array([x["probs"].get("yes", 0.0) for x in r])
                pred = np.array([x["prediction"] == "yes" for x in r])
                out = {"run": run.name, "split": split, "system": system, "n": len(r), "gold_yes": int(y.sum()),
                       "answered_yes": int(pred.sum()), "accuracy": round(float(np.mean(pred == y)), 3),
                       "macro_f1": round(float(f1_score(y, pred, average="macro")), 3),
                       "auc_p_yes": round(float(roc_auc_score(y, p_yes)), 3) if 0 < y.sum() < len(y) else None,
                       "mean_p_yes_pos_neg": [round(float(p_yes[y].mean()), 3), round(float(p_yes[~y].mean()), 3)]}
                if system != "probe":
                    corrected = p_yes * odds / (p_yes * odds + 1 - p_yes) > 0.5
                    out.update({"train_prior_yes": round(pi, 3), "prior_reweighted_yes": int(corrected.sum()),
                                "prior_reweighted_accuracy": round(float(np.mean(corrected == y)), 3),
                                "prior_reweighted_macro_f1": round(float(f1_score(y, corrected, average="macro")),
                                                                   3)})
                print(json.dumps(out), flush=True)


def table(runs: list[Path]) -> str:
    metrics = [json.loads((run / "metrics.json").read_text(encoding="utf-8"))["metrics"] for run in runs]
    systems = [s for s in ("closed-book", "rag", "joint", "probe") if all(s in m for m in metrics)]
    lines = ["| run | " + " | ".join(f"{s} acc | {s} macro-F1" for s in systems) + " |",
             "|---|" + "---|---|" * len(systems)]
    for run, m in zip(runs, metrics):
        lines.append(f"| {run.name} | " + " | ".join(f"{m[s]['accuracy']:.3f} | {m[s]['macro_f1']:.3f}"
                                                     for s in systems) + " |")

    def mean_se(values: list[float]) -> str:
        v = np.array(values)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return f"{v.mean():.3f} ± {se:.3f}"

    lines.append("| mean ± s.e. | " + " | ".join(
        f"{mean_se([m[s]['accuracy'] for m in metrics])} | {mean_se([m[s]['macro_f1'] for m in metrics])}"
        for s in systems) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
