"""The `analyze-oracle` command: load prediction tables, compute the oracle analysis, write the report.

Exit 0 on success, 2 on invalid input (message on stderr, nothing written to --out).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from ..core.base.answers import DEFAULT_EMPTY_SET, OPEN_CORRECT, TASKS, AnswerSettings
from .learned import DEFAULT_CLOSED_BOOK
from .stats import INTERVALS
from .tables import SHORT_POLICIES, TableError

log = logging.getLogger("dxrag.analysis")

EXAMPLES = textwrap.dedent("""\
    examples:
      analyze-oracle --contexts trained/run/contexts.parquet --out reports/run
      analyze-oracle --contexts ctx.jsonl --answers answers.csv --reference rag --k 4 --out reports/x
      analyze-oracle --contexts ctx.parquet --rerank rerank.jsonl --interval bootstrap --no-figures --out reports/y
      analyze-oracle --contexts test_ctx.jsonl --answers test_ans.jsonl --train-selector val_ctx.jsonl \\
                     --train-answers val_ans.jsonl --out reports/z
      analyze-oracle --contexts chest_ctx.jsonl --task set --out reports/multilabel
      analyze-oracle --contexts vqa_ctx.jsonl --open-correct recall --out reports/vqa

    The table formats and every output column are documented in reports/README.md.""")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze-oracle", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Oracle analysis of retrieval-augmented predictions: consistency of the top-k single-context "
                    "predictions, accuracy on consistent vs inconsistent queries, oracle@k, selectors and their "
                    "gap closed. Reads JSONL, CSV or Parquet (by suffix); needs no model and no torch.")
    p.add_argument("--contexts", required=True, type=Path, help="context-prediction table (one row per context)")
    p.add_argument("--answers", type=Path, help="answer table: final answers of whole systems (e.g. closed-book)")
    p.add_argument("--rerank", type=Path, help="rerank file (from lvlm-rerank): rankings for the lvlm selectors")
    p.add_argument("--train-selector", type=Path, metavar="VAL_CONTEXTS",
                   help="context table of validation queries (none of them in --contexts): trains the 'learned' "
                        "selector (needs scikit-learn: pip install 'dxrag[learn]')")
    p.add_argument("--train-answers", type=Path, metavar="VAL_ANSWERS",
                   help="answer table of the validation queries: its closed-book answers feed the learned selector")
    p.add_argument("--closed-book", default=DEFAULT_CLOSED_BOOK, metavar="SYSTEM",
                   help="answer-table system whose answers are closed-book, for the learned selector's agreement "
                        f"feature (default {DEFAULT_CLOSED_BOOK!r})")
    p.add_argument("--k", type=int, help="depth: ranks 1..k (default: each system's largest rank)")
    p.add_argument("--reference", help="system whose top-k defines the consistent / inconsistent subsets "
                                       "(default: the first system in the context table)")
    p.add_argument("--short", choices=SHORT_POLICIES, default="error",
                   help="queries with fewer than k ranks: error (default), drop them, or keep the ranks they have; "
                        "always counted in summary.csv (n_short)")
    p.add_argument("--interval", choices=INTERVALS, default="wilson", help="95%% intervals (default wilson)")
    p.add_argument("--fusion-temperature", type=float, default=1.0,
                   help="fusion selector weights = softmax(retrieval_score / T) (default 1; a dxrag run's "
                        "inference.fusion.temperature reproduces its fused answers)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of queries (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--task", choices=TASKS, default="auto",
                   help="answer type of every row: closed (one answer, strip + casefold equality), set (multi-label: "
                        "comma-separated label sets), open (free text); auto (default): the tables' answer_type "
                        "column, closed without it")
    p.add_argument("--empty-set", default=DEFAULT_EMPTY_SET, metavar="TOKEN",
                   help=f"how the empty label set is written in set answers (default {DEFAULT_EMPTY_SET!r})")
    p.add_argument("--allow-empty", action="store_true",
                   help="the dataset allows the empty label set (dataset.yaml allow_empty): the fusion selector then "
                        "answers it when no label's fused p(yes) exceeds 0.5, instead of the most probable label")
    p.add_argument("--open-correct", choices=OPEN_CORRECT, default="em",
                   help="what makes an open answer correct: em (normalised exact match, default), recall or f1 "
                        "(token score >= --open-threshold)")
    p.add_argument("--open-threshold", type=float, default=1.0,
                   help="token recall / F1 an open answer needs to count correct (default 1.0: every gold token "
                        "present for recall, the same tokens for f1)")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG/PDF figures")
    p.add_argument("--no-trec", action="store_true", help="skip the trec/ run and qrels files")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .report import OracleReport, ReportWriteError

    try:
        report = OracleReport.from_tables(args.contexts, answers=args.answers, rerank=args.rerank, k=args.k,
                                          reference=args.reference, short=args.short, interval=args.interval,
                                          n_boot=args.n_boot, seed=args.seed,
                                          fusion_temperature=args.fusion_temperature,
                                          selector_train=args.train_selector,
                                          selector_train_answers=args.train_answers, closed_book=args.closed_book,
                                          answer_settings=AnswerSettings(task=args.task, empty_set=args.empty_set,
                                                                         open_correct=args.open_correct,
                                                                         open_threshold=args.open_threshold,
                                                                         allow_empty=args.allow_empty))
    except TableError as e:
        print(f"analyze-oracle: error: {e}", file=sys.stderr)
        return 2
    try:
        out = report.write(args.out, figures=not args.no_figures, trec=not args.no_trec)
    except ReportWriteError as e:
        print(f"analyze-oracle: error: {e}", file=sys.stderr)
        return 2
    print(report.compact_table())
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
