"""Paper figures of an OracleReport, saved as PNG and PDF: n_distinct distribution, consistent vs inconsistent
accuracy, oracle@k curves, selector gap bars, and one system's improvement over another on inconsistent queries.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .report import OracleReport

log = logging.getLogger(__name__)

IMPROVEMENT_PAIR = ("rag", "joint")  # (baseline, improved) context systems for the improvement figure


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """seaborn's whitegrid look when seaborn is installed, matplotlib defaults otherwise; global state untouched."""
    import matplotlib

    rc = {"figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
          "legend.fontsize": 8, "pdf.fonttype": 42}
    try:
        import seaborn

        rc = {**seaborn.axes_style("whitegrid"), **rc}
    except ImportError:
        pass
    with matplotlib.rc_context(rc):
        yield


def _figure(width: float = 5.0, height: float = 3.2) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: "Figure", out: Path, name: str) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}")


def _err(acc: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.vstack([np.clip(acc - lo, 0, None), np.clip(hi - acc, 0, None)])


def n_distinct_distribution(report: "OracleReport") -> "Figure":
    fig = _figure()
    ax = fig.add_subplot()
    systems = report.metrics
    width = 0.8 / len(systems)
    k_max = max(qm.matrix.k for qm in systems)
    for i, qm in enumerate(systems):
        share = np.bincount(qm.n_distinct, minlength=k_max + 1)[1:] / max(qm.n_queries, 1)
        ax.bar(np.arange(1, k_max + 1) + (i - (len(systems) - 1) / 2) * width, share, width, label=qm.system)
    ax.set_xlabel("distinct predictions among the top-k contexts (n_distinct)")
    ax.set_ylabel("share of queries")
    ax.set_xticks(np.arange(1, k_max + 1))
    ax.set_title("How often the top-k contexts disagree")
    ax.legend(title="system")
    return fig


def subset_accuracy(report: "OracleReport") -> "Figure":
    df = report.subsets()
    df = df[df["subset"] != "all"]
    labels = list(dict.fromkeys(zip(df["system"], df["method"])))
    fig = _figure(max(5.0, 0.7 * len(labels) + 2), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    for i, subset in enumerate(("consistent", "inconsistent")):
        part = df[df["subset"] == subset].set_index(["system", "method"]).reindex(labels)
        acc = part["acc"].to_numpy(float)
        ax.bar(x + (i - 0.5) * 0.38, acc, 0.38, yerr=_err(acc, part["acc_lo"].to_numpy(float),
                                                          part["acc_hi"].to_numpy(float)),
               capsize=2, label=subset)
    ax.set_xticks(x, [f"{s}\n{m}" for s, m in labels], rotation=0)
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Accuracy on queries where {report.reference}'s top-k agree / disagree")
    ax.legend(title=f"subset of {report.reference}")
    return fig


def oracle_curves(report: "OracleReport") -> "Figure":
    df = report.oracle_at_k()
    fig = _figure()
    ax = fig.add_subplot()
    for i, (system, part) in enumerate(df.groupby("system", sort=False)):
        color = f"C{i}"
        acc = part["oracle_acc"].to_numpy(float)
        ax.errorbar(part["k"], acc, yerr=_err(acc, part["oracle_acc_lo"].to_numpy(float),
                                              part["oracle_acc_hi"].to_numpy(float)),
                    marker="o", ms=3, capsize=2, color=color, label=f"{system} oracle@k")
        ax.axhline(part["top1_acc"].iloc[0], color=color, ls="--", lw=1, label=f"{system} top-1")
    n_ctx = df["system"].nunique()
    answers = report.subsets()
    answers = answers[(answers["method"] == "answer") & (answers["subset"] == "all")]
    for j, r in enumerate(answers.itertuples()):
        ax.axhline(r.acc, color=f"C{n_ctx + j}", ls=":", lw=1.2, label=f"{r.system} (answer)")
    ax.set_xlabel("depth k (ranks 1..k)")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title("Oracle@k: any of ranks 1..k correct")
    ax.set_xticks(sorted(df["k"].unique()))
    ax.legend(ncol=2, fontsize=7)
    return fig


def selector_gaps(report: "OracleReport") -> "Figure":
    df = report.selectors_frame()
    systems = list(dict.fromkeys(df["system"]))
    fig = _figure(5.5, 1.0 + 1.6 * len(systems))
    axes = fig.subplots(len(systems), 1, squeeze=False)[:, 0]
    for ax, system in zip(axes, systems):
        part = df[df["system"] == system]
        top1 = part.loc[part["selector"] == "retriever", "acc"].iloc[0]
        oracle = part.loc[part["selector"] == "oracle", "acc"].iloc[0]
        acc = part["acc"].to_numpy(float)
        y = np.arange(len(part))
        ax.barh(y, acc - top1, left=top1, xerr=_err(acc, part["acc_lo"].to_numpy(float),
                                                    part["acc_hi"].to_numpy(float)),
                capsize=2, color=[f"C{i}" for i in range(len(part))])
        ax.axvline(top1, color="k", lw=1, label="top-1")
        ax.axvline(oracle, color="k", lw=1, ls="--", label="oracle")
        ax.set_yticks(y, [f"{s} ({g:.0%})" if not np.isnan(g) else s
                          for s, g in zip(part["selector"], part["gap_closed"])])
        ax.set_title(f"{system}: selectors between top-1 and oracle (gap closed)")
        ax.set_xlabel("accuracy (95% interval)")
        ax.legend(loc="best", fontsize=7)
    return fig


def improvement(report: "OracleReport", baseline: str, improved: str) -> "Figure":
    df = report.improvement(baseline, improved)
    methods = list(dict.fromkeys(df["method"]))
    subsets = ("consistent", "inconsistent", "all")
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        part = df[df["method"] == method].set_index("subset").reindex(subsets)
        diff = part["diff"].to_numpy(float) * 100
        err = np.vstack([diff - part["diff_lo"].to_numpy(float) * 100, part["diff_hi"].to_numpy(float) * 100 - diff])
        ax.bar(np.arange(3) + (i - (len(methods) - 1) / 2) * width, diff, width, yerr=np.clip(err, 0, None),
               capsize=2, label=method)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(3), [f"{s}\n(of {report.reference})" for s in subsets])
    ax.set_ylabel(f"{improved} - {baseline} accuracy, points\n(95% paired bootstrap)")
    ax.set_title(f"Improvement of {improved} over {baseline}")
    ax.legend(title="method")
    return fig


def write_figures(report: "OracleReport", out: Path) -> list[Path]:
    """Writes every applicable figure as PNG and PDF into `out`; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    builders = [("n_distinct", n_distinct_distribution), ("subset_accuracy", subset_accuracy),
                ("oracle_at_k", oracle_curves), ("selector_gaps", selector_gaps)]
    systems = {qm.system for qm in report.metrics}
    baseline, improved = IMPROVEMENT_PAIR
    if baseline in systems and improved in systems:
        builders.append((f"improvement_{improved}_vs_{baseline}", lambda r: improvement(r, baseline, improved)))
    written = []
    with _style():
        for name, build in builders:
            _save(build(report), out, name)
            written.append(out / f"{name}.png")
    log.info("wrote %d figures to %s", len(written), out)
    return written
