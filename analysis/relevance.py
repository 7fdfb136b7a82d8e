"""Retrieval evaluation without gold relevance labels: a retrieved context is relevant iff its single-context
prediction is correct. Owns MRR / nDCG / Success on that relevance and the TREC run + qrels export per system.

The metrics follow trec_eval's definitions (recip_rank, ndcg_cut, success) over the contexts present in ranks 1..k,
in rank order; they are computed here vectorised (trec_eval through ir_measures is the reference in the tests, and
any TREC tool gives the same numbers on the exported files).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .consistency import QueryMetrics
from .tables import ITEM_ID, ContextTable, encode_strings, read_raw

log = logging.getLogger(__name__)

METRICS = ("mrr", "ndcg_at_k", "ndcg_at_1", "success_at_k", "success_at_1")


def _positions(present: np.ndarray) -> np.ndarray:
    """1-based position of each present cell among the present cells of its row (what a TREC tool ranks by)."""
    return np.cumsum(present, axis=1) * present


def _ndcg(rel: np.ndarray, pos: np.ndarray, cut: int) -> np.ndarray:
    """Binary-gain nDCG@cut per query; the ideal ranking puts the query's judged relevant contexts first; 0 when it
    has none."""
    inside = rel & (pos >= 1) & (pos <= cut)
    dcg = np.where(inside, 1.0 / np.log2(np.maximum(pos, 1) + 1), 0.0).sum(axis=1)
    discount = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, cut + 2)))])
    ideal = discount[np.minimum(rel.sum(axis=1), cut)]
    return np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)


def per_query_relevance(qm: QueryMetrics) -> dict[str, np.ndarray]:
    """Per-query reciprocal rank, nDCG@k, nDCG@1, Success@k, Success@1 (k = the system's depth)."""
    m = qm.matrix
    rel = m.correct
    pos = _positions(m.present)
    first = np.where(rel.any(axis=1), np.where(rel, pos, np.iinfo(np.int64).max).min(axis=1), 0)
    return {"mrr": np.divide(1.0, first, out=np.zeros(len(first)), where=first > 0),
            "ndcg_at_k": _ndcg(rel, pos, m.k), "ndcg_at_1": _ndcg(rel, pos, 1),
            "success_at_k": rel.any(axis=1).astype(np.float64), "success_at_1": (rel & (pos == 1)).any(axis=1)
            .astype(np.float64)}


def relevance_metrics(qm: QueryMetrics) -> dict[str, float]:
    """Means over the system's queries of `per_query_relevance` (a query without a correct context counts 0)."""
    return {name: float(v.mean()) for name, v in per_query_relevance(qm).items()}


def _safe_name(system: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", system)


def trec_scores(qm: QueryMetrics) -> tuple[np.ndarray, str]:
    """The score column of the run: retrieval scores when they fall strictly with rank in every query (TREC tools
    rank by score, so the file then evaluates to the system's own ranking), else 1 / position."""
    m = qm.matrix
    present = m.present
    if m.score is not None and not np.isnan(m.score[present]).any():
        s = np.where(present, m.score, -np.inf)
        best_after = np.concatenate([np.maximum.accumulate(s[:, :0:-1], axis=1)[:, ::-1],
                                     np.full((len(s), 1), -np.inf)], axis=1)  # highest later score
        if (s[present] > best_after[present]).all():
            return m.score, "retrieval_score"
    return 1.0 / np.maximum(_positions(present), 1), "1/position"


def write_trec(table: ContextTable, metrics: list[QueryMetrics], out_dir: Path) -> dict[str, dict[str, str]]:
    """Writes <system>.run (`query_id Q0 item_id rank score system`) and <system>.qrels (`query_id 0 item_id rel`)
    for every context system into out_dir; returns per system the files and the score used (or why it was skipped).

    Item ids come from the table's `item_id` column; a context without one, or whose id repeats within the query, is
    named `<item_id>#<rank>` (`#<rank>` alone without an id) so that every line of a query names a distinct item."""
    item = table.raw.columns.get(ITEM_ID)
    if item is None:
        try:
            item = read_raw(table.path, "contexts", columns=(ITEM_ID,)).columns.get(ITEM_ID)
        except (OSError, ValueError):  # an in-memory or moved table: contexts are named by rank
            item = None
    if item is not None:
        item = item.combine_chunks().cast(pa.string())
        item_code, _ = encode_strings(pa.chunked_array([item]))
        item_ws = pc.match_substring_regex(item, r"\s").fill_null(False).to_numpy(zero_copy_only=False)
    query_ids = pa.array(table.query_ids, pa.string())
    query_ws = pc.match_substring_regex(query_ids, r"\s").to_numpy(zero_copy_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
    done: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    for qm in metrics:
        m = qm.matrix
        name = _safe_name(qm.system)
        name = name if name not in used else f"{name}-{len(used)}"
        used.add(name)
        qi, col = np.nonzero(m.present)
        rows, qcode, ranks = m.row[qi, col], m.query[qi], col + 1
        if query_ws[qcode].any() or (item is not None and item_ws[rows].any()):
            why = "a query_id or item_id holds whitespace, which the TREC format cannot carry"
            log.warning("TREC export of system %s skipped: %s", qm.system, why)
            done[qm.system] = {"skipped": why}
            continue
        suffix = pc.binary_join_element_wise("", "#", pa.array(ranks.astype(str)), "")  # "#<rank>"
        if item is not None:
            codes = item_code[rows].astype(np.int64)
            key = qcode.astype(np.int64) * (int(codes.max()) + 2) + codes + 1
            _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
            ids = item.take(pa.array(rows)).fill_null("")
            clash = (counts[inverse] > 1) | (codes < 0) | (pc.utf8_length(ids).to_numpy() == 0)
            docs = pc.if_else(pa.array(clash), pc.binary_join_element_wise(ids, suffix, ""), ids) \
                if clash.any() else ids
        else:
            docs = suffix
        qids = query_ids.take(pa.array(qcode))
        score, kind = trec_scores(qm)
        run = pa.table({"q": qids, "q0": pa.repeat("Q0", len(rows)), "doc": docs, "rank": ranks,
                        "score": score[qi, col], "tag": pa.repeat(name, len(rows))})
        qrels = pa.table({"q": qids, "it": pa.repeat(0, len(rows)), "doc": docs,
                          "rel": m.correct[qi, col].astype(np.int64)})
        pacsv.write_csv(run, out_dir / f"{name}.run", write_options=opts)
        pacsv.write_csv(qrels, out_dir / f"{name}.qrels", write_options=opts)
        done[qm.system] = {"run": f"{name}.run", "qrels": f"{name}.qrels", "score": kind}
    return done
