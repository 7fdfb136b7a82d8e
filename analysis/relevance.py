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
_BLOCK = 1 << 18  # lines of a TREC file built at a time (bounds the memory of the export, not its output)


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
    if m.score is not None and not (np.isnan(m.score) & present).any():
        # Column by column from the last rank, holding the highest later score per query (one vector, not k).
        best_after = np.full(len(present), -np.inf)
        falls = True
        for j in range(m.k - 1, -1, -1):
            s = np.where(present[:, j], m.score[:, j], -np.inf)
            falls = falls and bool((s > best_after)[present[:, j]].all())
            np.maximum(best_after, s, out=best_after)
        if falls:
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
            # Only that column: the others were validated at load, and reading them again doubled the peak memory.
            item = read_raw(table.path, "contexts", columns=(ITEM_ID,), required=()).columns.get(ITEM_ID)
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
    run_schema = pa.schema([("q", pa.string()), ("q0", pa.string()), ("doc", pa.string()), ("rank", pa.int64()),
                            ("score", pa.float64()), ("tag", pa.string())])
    qrels_schema = pa.schema([("q", pa.string()), ("it", pa.int64()), ("doc", pa.string()), ("rel", pa.int64())])
    done: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    for qm in metrics:
        m = qm.matrix
        name = _safe_name(qm.system)
        name = name if name not in used else f"{name}-{len(used)}"
        used.add(name)
        per_block = max(1, _BLOCK // m.k)
        rank_suffix = pa.array([f"#{j}" for j in range(1, m.k + 1)], pa.string())
        blocks = [(q0, min(len(m.query), q0 + per_block)) for q0 in range(0, len(m.query), per_block)]
        if query_ws[m.query].any() or (item is not None and any(
                item_ws[m.row[q0:q1][m.present[q0:q1]]].any() for q0, q1 in blocks)):
            why = "a query_id or item_id holds whitespace, which the TREC format cannot carry"
            log.warning("TREC export of system %s skipped: %s", qm.system, why)
            done[qm.system] = {"skipped": why}
            continue
        score, kind = trec_scores(qm)
        correct = m.correct
        with (pacsv.CSVWriter(out_dir / f"{name}.run", run_schema, write_options=opts) as run_file,
              pacsv.CSVWriter(out_dir / f"{name}.qrels", qrels_schema, write_options=opts) as qrels_file):
            for q0, q1 in blocks:  # blocks of queries bound the memory of the per-line arrays
                qi, col = np.nonzero(m.present[q0:q1])
                rows, ranks = m.row[q0:q1][qi, col], col + 1
                suffix = rank_suffix.take(pa.array(col))  # "#<rank>"
                if item is not None:
                    # An id repeated within its query: column against column of the block's (query × rank) codes.
                    cell = np.where(m.present[q0:q1], item_code[np.maximum(m.row[q0:q1], 0)], -1)
                    repeated = np.zeros(cell.shape, dtype=bool)
                    for j in range(1, m.k):
                        for i in range(j):
                            same = (cell[:, j] == cell[:, i]) & (cell[:, j] >= 0)
                            repeated[:, j] |= same
                            repeated[:, i] |= same
                    ids = item.take(pa.array(rows)).fill_null("")
                    clash = repeated[qi, col] | (cell[qi, col] < 0) | (pc.utf8_length(ids).to_numpy() == 0)
                    docs = pc.if_else(pa.array(clash), pc.binary_join_element_wise(ids, suffix, ""), ids) \
                        if clash.any() else ids
                else:
                    docs = suffix
                qids = query_ids.take(pa.array(m.query[q0:q1][qi]))
                n = len(rows)
                run_file.write_table(pa.table({"q": qids, "q0": pa.repeat("Q0", n), "doc": docs, "rank": ranks,
                                               "score": score[q0:q1][qi, col], "tag": pa.repeat(name, n)},
                                              schema=run_schema))
                qrels_file.write_table(pa.table({"q": qids, "it": pa.repeat(0, n), "doc": docs,
                                                 "rel": correct[q0:q1][qi, col].astype(np.int64)},
                                                schema=qrels_schema))
        done[qm.system] = {"run": f"{name}.run", "qrels": f"{name}.qrels", "score": kind}
    return done
