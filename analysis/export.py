"""The exporters of `report.OracleReport`: Markdown, LaTeX, a compact terminal table, provenance, and `write(out_dir)`
(CSV files, summary.md, provenance.json, trec/, figures/, published atomically). Moved out of `report`; OracleReport
inherits them from `ReportExports`, which only reads the report's frames (`summary()`, `subsets()`, ...).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

from ..core.base.dataset import sha256_file
from ..core.base.fsutil import dir_lock, make_temp_dir
from ..core.base.provenance import git_hash, versions
from .learned import CV_FOLDS, RAW
from .relevance import write_trec


class ReportWriteError(ValueError):
    """The report could not be written (a read-only folder, a full disk, another writer); names the folder."""

SUBSETS = ("consistent", "inconsistent", "all")
CSV_FILES = ("per_query.csv", "summary.csv", "oracle_at_k.csv", "subsets.csv", "selectors.csv", "mcnemar.csv")
RELEVANCE_LABELS = (("MRR", "mrr"), ("nDCG@k", "ndcg_at_k"), ("nDCG@1", "ndcg_at_1"), ("Success@k", "success_at_k"),
                    ("Success@1", "success_at_1"))
ANALYSIS_PACKAGES = ("dxrag", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "seaborn")


class ReportExports:
    """The text exports and `write` of an OracleReport (a mixin: every method reads the report's own frames)."""

    def compact_table(self) -> str:
        """The terminal summary: one line per context system, then the selectors and the reference subsets."""
        s = self.summary()
        lines = [f"{'system':<16} {'queries':>8} {'k':>3} {'incons.':>7} {'top-1':>17} {'majority':>17} "
                 f"{'oracle':>17}"]
        for r in s.itertuples():
            cells = [f"{getattr(r, f'{m}_acc'):.3f} [{getattr(r, f'{m}_acc_lo'):.3f},{getattr(r, f'{m}_acc_hi'):.3f}]"
                     for m in ("top1", "majority", "oracle")]
            lines.append(f"{r.system:<16} {r.n_queries:>8} {r.k:>3} {r.inconsistent_rate:>7.3f} "
                         + " ".join(f"{c:>17}" for c in cells))
        sel = self.selectors_frame()
        lines.append("")
        lines.append(f"{'system':<16} {'selector':<22} {'acc':>6} {'gap closed':>10} {'fallbacks':>9}")
        for r in sel.itertuples():
            gap = "   n/a" if np.isnan(r.gap_closed) else f"{r.gap_closed:>6.2f}"
            lines.append(f"{r.system:<16} {r.selector:<22} {r.acc:>6.3f} {gap:>10} {r.n_fallback:>9}")
        sub = self.subsets().set_index(["system", "method", "subset"])["acc"]
        lines.append("")
        lines.append(f"accuracy on the consistent / inconsistent queries of {self.reference!r}")
        lines.append(f"{'system':<16} {'method':<9} {'consistent':>10} {'inconsistent':>12} {'all':>6}")
        for system, method in dict.fromkeys((sc.system, sc.method) for sc in self.scored):
            acc = [sub[(system, method, subset)] for subset in SUBSETS]
            lines.append(f"{system:<16} {method:<9} {acc[0]:>10.3f} {acc[1]:>12.3f} {acc[2]:>6.3f}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """summary.md: the headline numbers as three short Markdown tables (accuracies with 95% intervals)."""
        s = self.summary()
        systems = pd.DataFrame({
            "system": s["system"], "queries": s["n_queries"], "k": s["k"], "short": s["n_short"],
            "inconsistent": s["inconsistent_rate"].map("{:.3f}".format),
            **{label: _with_interval(s, m) for label, m in (("top-1", "top1"), ("majority", "majority"),
                                                             ("oracle@k", "oracle"))}})
        sub = self.subsets()
        cell = pd.Series(_with_interval(sub, ""), index=sub.index) + " (n=" + sub["n"].astype(str) + ")"
        subsets = (sub.assign(cell=cell).pivot(index=["system", "method"], columns="subset", values="cell")
                   .reindex(list(dict.fromkeys((sc.system, sc.method) for sc in self.scored)))
                   .reindex(columns=list(SUBSETS)).reset_index())
        sel = self.selectors_frame()
        selectors = pd.DataFrame({"system": sel["system"], "selector": sel["selector"],
                                  "accuracy": _with_interval(sel, ""),
                                  "gap closed": sel["gap_closed"].map(lambda g: "n/a" if np.isnan(g) else f"{g:.2f}"),
                                  "fallbacks": sel["n_fallback"]})
        typed = []
        if (s["n_set"] > 0).any():
            f1 = pd.DataFrame({"system": s["system"], "set queries": s["n_set"],
                               **{label: [_f1_cell(r, m) for r in s.itertuples()]
                                  for label, m in (("top-1 macro-F1", "top1"), ("majority macro-F1", "majority"))},
                               "top-1 micro-F1": s["top1_micro_f1"].map(_fmt)})
            typed += ["## Multi-label queries (label sets)", "",
                      "Accuracies above are exact-match subset accuracy; macro-F1 over the gold labels seen, with a "
                      "query-bootstrap 95% interval.", "", _markdown(f1), ""]
        if (s["n_open"] > 0).any():
            tok = pd.DataFrame({"system": s["system"], "open queries": s["n_open"],
                                **{label: s[col].map(_fmt) for label, col in (
                                    ("top-1 token F1", "top1_token_f1"), ("top-1 token recall", "top1_token_recall"),
                                    ("majority token F1", "majority_token_f1"),
                                    ("majority token recall", "majority_token_recall"))}})
            rule = self.contexts.settings
            how = ("normalised exact match" if not rule.graded_open
                   else f"token {rule.open_correct} >= {rule.open_threshold:g}")
            typed += ["## Open (free-text) queries", "", f"An open answer counts correct by {how}.", "",
                      _markdown(tok), ""]
        relevance = pd.DataFrame({"system": s["system"], "k": s["k"],
                                  **{label: s[col].map("{:.3f}".format) for label, col in RELEVANCE_LABELS}})
        parts = ["# Oracle analysis", "",
                 f"Contexts: `{self.contexts.path}`; intervals: {self.interval} 95%. Column meanings: "
                 f"reports/README.md.", "", "## Systems (top-k single-context predictions)", "", _markdown(systems),
                 "", *typed, f"## Accuracy on the consistent and inconsistent queries of `{self.reference}`", "",
                 _markdown(subsets), "", "## Selectors (gap closed = (selector - top-1) / (oracle - top-1))", "",
                 _markdown(selectors), ""]
        if self.learned is not None:
            parts += ["The `learned` selector: a logistic regression trained on the validation contexts of "
                      f"`{self.learned.train_path}` (never on these queries), used only where it beat rank 1 on "
                      f"held-out validation queries ({CV_FOLDS}-fold cross-validation), else rank 1; `{RAW}` is "
                      "the model's own picks. Features per system and the ones left out, with why, are in "
                      "learned_selector.json.", ""]
            for system, sm in self.learned.models.items():
                cv = sm.cv
                parts.append(f"- `{system}`: {'the model' if sm.use_model else 'rank 1'} selects (held-out "
                             f"validation accuracy {cv['model_acc']:.3f} model vs {cv['top1_acc']:.3f} rank 1)")
            for system, dropped in self.learned.dropped.items():
                if dropped:
                    parts.append(f"- `{system}`: left out " + "; ".join(f"`{n}` ({why})" for n, why in
                                                                        dropped.items()))
            for system, why in self.learned.skipped.items():
                parts.append(f"- `{system}`: no learned selector ({why})")
            parts.append("")
        parts += ["## Retrieval quality with prediction-derived relevance", "",
                  "A context is relevant iff its single-context prediction is correct (no gold image labels "
                  "needed); trec_eval definitions over ranks 1..k. The TREC run and qrels files are in trec/.", "",
                  _markdown(relevance), ""]
        return "\n".join(parts)

    def to_latex(self) -> str:
        """The summary and selector tables as LaTeX tabulars (booktabs)."""
        s = self.summary()
        summary = pd.DataFrame({
            "System": s["system"], "Queries": s["n_queries"], "k": s["k"],
            "Inconsistent": s["inconsistent_rate"].map("{:.3f}".format),
            **{label: _with_interval(s, m) for label, m in (("Top-1", "top1"), ("Majority", "majority"),
                                                             ("Oracle", "oracle"))}})
        sel = self.selectors_frame()
        selectors = pd.DataFrame({"System": sel["system"], "Selector": sel["selector"],
                                  "Accuracy": sel["acc"].map("{:.3f}".format),
                                  "Gap closed": sel["gap_closed"].map(lambda g: "--" if np.isnan(g) else f"{g:.2f}")})
        return _latex(summary) + "\n" + _latex(selectors)

    def provenance(self) -> dict[str, Any]:
        inputs = {}
        for role, table in (("contexts", self.contexts), ("answers", self.answers), ("rerank", self.rerank),
                            ("selector_train", self.selector_train),
                            ("selector_train_answers", self.selector_train_answers)):
            if table is not None:
                inputs[role] = {"path": str(Path(table.path).resolve()), "sha256": sha256_file(Path(table.path))}
        return {"inputs": inputs, "arguments": self.arguments, "git": git_hash(),
                "versions": versions(ANALYSIS_PACKAGES)}

    # ------------------------------------------------------------------------------------------ writing

    def write(self, out_dir: str | os.PathLike, figures: bool = True, trec: bool = True) -> Path:
        """Writes every CSV, summary.md, provenance.json, (optionally) trec/ run and qrels files per system and
        figures/ into out_dir, and learned_selector.json when the learned selector was trained.

        Everything is built in a temporary sibling directory first; a new out_dir appears in one rename, and in an
        existing one each file is replaced atomically (other files there are left alone).
        """
        out = Path(out_dir)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fresh = not out.exists()
            tmp = make_temp_dir(out)
        except OSError as e:
            raise ReportWriteError(f"{out}: cannot write the report there ({e.strerror or e})") from None
        try:
            pacsv.write_csv(self._per_query_arrow(), tmp / "per_query.csv")
            for name, frame in (("summary", self.summary()), ("oracle_at_k", self.oracle_at_k()),
                                ("subsets", self.subsets()), ("selectors", self.selectors_frame()),
                                ("mcnemar", self.mcnemar())):
                frame.to_csv(tmp / f"{name}.csv", index=False)
            (tmp / "summary.md").write_text(self.to_markdown(), encoding="utf-8")
            provenance = self.provenance()
            if trec:
                provenance["trec"] = write_trec(self.contexts, self.metrics, tmp / "trec")
            if self.learned is not None:
                (tmp / "learned_selector.json").write_text(json.dumps(self.learned.summary(), indent=2) + "\n",
                                                           encoding="utf-8")
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
            if figures:
                from .figures import write_figures

                write_figures(self, tmp / "figures")
            # Publishing takes turns with other writers of the same folder (a lock, not a check then a rename): a
            # new out_dir appears whole in one rename, and one another writer created meanwhile is not merged into.
            with dir_lock(out.parent):
                if not out.exists():
                    os.rename(tmp, out)
                    return out
                if fresh:
                    raise ReportWriteError(f"{out}: another writer created it while this report was built; "
                                           f"nothing written (rerun to replace its files)")
                for src in sorted(tmp.rglob("*")):
                    dst = out / src.relative_to(tmp)
                    if src.is_dir():
                        dst.mkdir(exist_ok=True)
                    else:
                        os.replace(src, dst)
        except OSError as e:  # a read-only folder, a full disk: the temporary folder goes, out_dir is untouched
            raise ReportWriteError(f"{out}: cannot write the report ({e.strerror or e}); "
                                   f"{'nothing written' if fresh else 'files already there are left as they were'}"
                                   ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _with_interval(df: pd.DataFrame, prefix: str) -> list[str]:
    """'0.750 [0.301, 0.954]' from the columns <prefix>_acc, _acc_lo, _acc_hi (acc, acc_lo, acc_hi without prefix)."""
    stem = f"{prefix}_acc" if prefix else "acc"
    return ["n/a" if np.isnan(a) else f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
            for a, lo, hi in zip(df[stem], df[f"{stem}_lo"], df[f"{stem}_hi"])]


def _f1_cell(row: Any, method: str) -> str:
    """'0.833 [0.500, 1.000]' from a summary row's <method>_macro_f1 and its interval; '' without set queries."""
    v, lo, hi = (getattr(row, f"{method}_macro_f1{x}") for x in ("", "_lo", "_hi"))
    return "" if np.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4f}"
    return str(v)


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _latex_escape(text: str) -> str:
    text = text.replace("\\", "\x00")
    for ch in "&%_#${}":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\x00", r"\textbackslash{}")


def _latex(df: pd.DataFrame) -> str:
    lines = [r"\begin{tabular}{l" + "r" * (len(df.columns) - 1) + "}", r"\toprule",
             " & ".join(_latex_escape(str(c)) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(_fmt(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)
