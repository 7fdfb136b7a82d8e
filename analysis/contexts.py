"""The context-prediction table: loading it (load_contexts) and its per-system rank matrices (rank_matrices)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.base.tables import (ANSWER_TYPE, LABEL, PREDICTION, PROBS, QUERY_ID, RANK, RETRIEVAL_SCORE, SYSTEM,
                                TableError)
from ..core.base.answers import ANSWER_TYPES, CLOSED, DEFAULT_SETTINGS, OPEN, SET, AnswerSettings, normalize_answer
from ..core.base.answers import token_scores as _token_scores
from .checks import ProbsColumn, _first, check_blank_labels, encode_strings
from .readers import RawTable, read_raw

# the loaders' messages keep the logger name users and benchmarks configure (dxrag.analysis.tables)
log = logging.getLogger(__package__ + ".tables")

SHORT_POLICIES = ("error", "drop", "keep")


# ------------------------------------------------------------------------------------------ the context table


@dataclass
class ContextTable:
    """A validated context-prediction table, rows sorted by (system, query, rank).

    Answers are integer codes into `answers` (normalised strings, sorted, so ties broken by code are alphabetical);
    `row` maps each sorted row back to its file row (for messages); probs stay in file-row order.
    """

    raw: RawTable
    systems: list[str]  # in order of first appearance in the file
    query_ids: np.ndarray  # object array: global query code -> query_id
    answers: list[str]
    row: np.ndarray  # int64, sorted row -> file row
    run_start: np.ndarray  # int64, start of each (system, query) run in sorted rows; runs end at the next start
    run_system: np.ndarray  # int64 per run
    run_query: np.ndarray  # int64 per run (global query code)
    run_label: np.ndarray  # answer code per run
    rank: np.ndarray  # int64 per sorted row
    prediction: np.ndarray  # answer code per sorted row
    score: np.ndarray | None  # float64 per sorted row (NaN where missing) or None without the column
    probs: ProbsColumn | None  # in file-row order
    probs_answer: np.ndarray | None  # answer code of every probs entry
    run_type: np.ndarray | None = None  # answer-type code per run (index into ANSWER_TYPES); None: all closed
    settings: AnswerSettings = DEFAULT_SETTINGS
    # set rows' probs (per-label p(yes), keys the raw labels) in file-row order; `probs` holds the other rows'
    label_probs: ProbsColumn | None = None
    _token_cache: dict[int, tuple[float, float]] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.raw.path

    @property
    def n_rows(self) -> int:
        return len(self.row)

    def locate(self, sorted_row: int) -> str:
        return self.raw.locate(int(self.row[sorted_row]))

    def code_of(self, normalised: str) -> int:
        """The answer code of a normalised answer, appended to `answers` when no row holds it (a fused label set no
        context predicted): appended codes break the sorted order, which only closed answers' ties rely on."""
        if not hasattr(self, "_code"):
            self._code = {a: i for i, a in enumerate(self.answers)}
        if normalised not in self._code:
            self._code[normalised] = len(self.answers)
            self.answers.append(normalised)
            self._token_cache.clear()  # keyed by pred * len(answers) + label
        return self._code[normalised]

    def token_scores(self, pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token recall and F1 (answers.token_scores) of answer codes against label codes, element-wise; each
        distinct pair is scored once."""
        pred, label = np.broadcast_arrays(np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64))
        key = pred * len(self.answers) + label
        pairs, inverse = np.unique(key, return_inverse=True)
        n_a = len(self.answers)
        scores = np.empty((len(pairs), 2))
        for i, k in enumerate(pairs.tolist()):
            if k not in self._token_cache:
                self._token_cache[k] = _token_scores(self.answers[k // n_a], self.answers[k % n_a])
            scores[i] = self._token_cache[k]
        scores = scores[inverse.reshape(-1)].reshape(key.shape + (2,))
        return scores[..., 0], scores[..., 1]

    def judge(self, pred: np.ndarray, label: np.ndarray, types: np.ndarray | None) -> np.ndarray:
        """Correctness of answer codes against label codes (broadcast) of queries with answer-type codes `types`:
        equal codes, except open answers under --open-correct recall / f1 (answers.judge)."""
        correct = np.asarray(pred) == np.asarray(label)
        if types is None or not self.settings.graded_open:
            return correct
        pred, label, types = np.broadcast_arrays(pred, label, types)
        graded = (types == ANSWER_TYPES.index(OPEN)) & (pred >= 0)
        if graded.any():
            recall, f1 = self.token_scores(pred[graded], label[graded])
            score = recall if self.settings.open_correct == "recall" else f1
            correct = correct.copy()
            correct[graded] = score >= self.settings.open_threshold - 1e-12
        return correct


def _answer_vocabulary(uniques: list[pa.Array]) -> tuple[list[str], list[np.ndarray]]:
    """Normalised answer vocabulary (sorted) and, for each input array of raw strings, the code of each value."""
    normalized = [[normalize_answer(v) if v is not None else "" for v in u.to_pylist()] for u in uniques]
    vocab = sorted(set().union(*normalized))
    index = {a: i for i, a in enumerate(vocab)}
    dtype = np.int32
    return vocab, [np.array([index[a] for a in norm], dtype=dtype) for norm in normalized]


def _typed_vocabulary(inputs: list[tuple[np.ndarray, pa.Array, np.ndarray]],
                      settings: AnswerSettings) -> tuple[list[str], list[np.ndarray]]:
    """Like `_answer_vocabulary` when values are normalised by the answer type of their row: for each input
    (codes into uniques, type code per element) the answer code of every element."""
    normalized, inverses = [], []
    for codes, uniques, types in inputs:
        n_u = max(len(uniques), 1)
        pairs, inverse = np.unique(types.astype(np.int64) * n_u + codes, return_inverse=True)
        values = uniques.to_pylist()
        normalized.append([normalize_answer(values[c], ANSWER_TYPES[t], settings.empty_set)
                           if values[c] is not None else ""
                           for t, c in zip((pairs // n_u).tolist(), (pairs % n_u).tolist())])
        inverses.append(inverse.reshape(-1))
    vocab = sorted(set().union(*normalized))
    index = {a: i for i, a in enumerate(vocab)}
    return vocab, [np.array([index[a] for a in norm], dtype=np.int32)[inv] for norm, inv in zip(normalized, inverses)]


def _row_types(raw: RawTable, settings: AnswerSettings) -> np.ndarray | None:
    """Answer-type code of every file row, from the `answer_type` column or --task; None when every row is closed
    (the path without per-row types)."""
    task = settings.task
    codes = None
    if ANSWER_TYPE in raw.columns and raw.columns[ANSWER_TYPE].null_count < raw.n_rows:  # all null: as if absent
        codes, uniques = raw.encode(ANSWER_TYPE)
    if codes is None:
        if task in ("auto", CLOSED):
            return None
        return np.full(raw.n_rows, ANSWER_TYPES.index(task), dtype=np.int8)
    lookup = np.zeros(len(uniques) + 1, dtype=np.int8)  # the last entry: null (code -1), closed
    for i, value in enumerate(uniques.to_pylist()):
        norm = value.strip().casefold() if value is not None else ""
        if norm and norm not in ANSWER_TYPES:
            raise raw.fail(int(np.argmax(codes == i)), ANSWER_TYPE, f"{value!r} is not an answer type; expected one "
                                                                    f"of {', '.join(ANSWER_TYPES)} (empty: closed)")
        lookup[i] = ANSWER_TYPES.index(norm) if norm else 0
    types = lookup[codes]
    if task != "auto":
        row = _first(types != ANSWER_TYPES.index(task))
        if row is not None:
            raise raw.fail(row, ANSWER_TYPE, f"{ANSWER_TYPES[types[row]]!r} contradicts --task {task}; pass --task "
                                             f"auto to use the column, or fix the row")
    return None if not types.any() else types


def load_contexts(path: str | os.PathLike, columns: Sequence[str] | None = None,
                  settings: AnswerSettings = DEFAULT_SETTINGS) -> ContextTable:
    """Loads and validates a context-prediction table.

    `columns`: optional columns to read beyond the required ones (default: retrieval_score and probs, which feed
    the fusion and confidence selectors, and answer_type; item_id and head are not needed for the metrics).
    `settings`: the answer types and how answers are judged (AnswerSettings).
    """
    if columns is None:
        columns = (RETRIEVAL_SCORE, PROBS)
    columns = tuple(columns) + (ANSWER_TYPE,)
    raw = read_raw(path, "contexts", columns=columns, dictionary=(SYSTEM, LABEL, PREDICTION, ANSWER_TYPE))
    n = raw.n_rows
    sys_codes, sys_uniques = raw.encode(SYSTEM)
    lab_codes, lab_uniques = raw.encode(LABEL)
    pred_codes, pred_uniques = raw.encode(PREDICTION)
    rank = raw.columns[RANK].to_numpy()
    probs = raw.probs
    row_type = _row_types(raw, settings)
    check_blank_labels(raw, row_type)
    label_probs = None
    if probs is not None and row_type is not None and (row_type == ANSWER_TYPES.index(SET)).any():
        is_set = row_type == ANSWER_TYPES.index(SET)  # their probs are per-label p(yes), not answers
        label_probs, probs = probs.subset(is_set), probs.subset(~is_set)
    if probs is not None:
        key_codes, key_uniques = encode_strings(pa.chunked_array([probs.keys]))
    if row_type is None:
        vocab_inputs = [lab_uniques, pred_uniques] + ([key_uniques] if probs is not None else [])
        answers, maps = _answer_vocabulary(vocab_inputs)
        label = maps[0][lab_codes]
        pred = maps[1].astype(np.int16 if len(answers) < 2 ** 15 else np.int32)[pred_codes]
        probs_answer = maps[2][key_codes] if probs is not None else None
    else:
        typed = [(lab_codes, lab_uniques, row_type), (pred_codes, pred_uniques, row_type)]
        if probs is not None:
            typed.append((key_codes, key_uniques, np.repeat(row_type, np.diff(probs.offsets))))
        answers, per_row = _typed_vocabulary(typed, settings)
        label = per_row[0]
        pred = per_row[1].astype(np.int16 if len(answers) < 2 ** 15 else np.int32)
        probs_answer = per_row[2] if probs is not None else None
    score = None
    if RETRIEVAL_SCORE in raw.columns:
        score = raw.columns[RETRIEVAL_SCORE].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)

    # Runs of consecutive rows with the same (system, query_id); a file written query by query is already grouped.
    qid = raw.columns[QUERY_ID]
    qid = qid.chunk(0) if qid.num_chunks == 1 else qid.combine_chunks()
    run_start_mask = np.empty(n, dtype=bool)
    run_start_mask[0] = True
    if n > 1:
        qchange = pc.not_equal(qid.slice(1), qid.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        np.logical_or(qchange, sys_codes[1:] != sys_codes[:-1], out=run_start_mask[1:])
    starts = np.flatnonzero(run_start_mask)
    q_codes, q_uniques = encode_strings(pa.chunked_array([qid.take(pa.array(starts))]))
    run_sys = sys_codes[starts]
    n_q = len(q_uniques)
    pair = run_sys.astype(np.int64) * n_q + q_codes
    grouped = np.bincount(pair).max() == 1
    ordered = grouped and not np.any(~run_start_mask[1:] & (rank[1:] <= rank[:-1]))
    row = np.arange(n, dtype=np.int64)
    if not ordered:
        run_id = np.cumsum(run_start_mask) - 1
        key = pair[run_id]
        rmax = int(rank.max())
        if (int(key.max()) + 1) * (rmax + 1) < 2 ** 63:  # one int64 sort key is ~2x faster than lexsort
            row = np.argsort(key * (rmax + 1) + rank)
        else:
            row = np.lexsort((rank, key))
        key, srank = key[row], rank[row]
        dup = (key[1:] == key[:-1]) & (srank[1:] == srank[:-1])
        if dup.any():
            i = int(np.argmax(dup))
            raise raw.fail(int(row[i + 1]), RANK,
                           f"duplicate (system, query_id, rank) = ({sys_uniques[sys_codes[row[i]]]}, "
                           f"{q_uniques[q_codes[run_id[row[i]]]]}, {int(srank[i])}); first at "
                           f"{raw.locate(int(row[i]))}; each query may have each rank once per system")
        run_start_mask = np.empty(n, dtype=bool)
        run_start_mask[0] = True
        run_start_mask[1:] = key[1:] != key[:-1]
        sorted_run_id = run_id[row]
        starts = np.flatnonzero(run_start_mask)
        q_codes = q_codes[sorted_run_id[starts]]
        run_sys = run_sys[sorted_run_id[starts]]
        rank, label, pred = srank, label[row], pred[row]
        if score is not None:
            score = score[row]
        if row_type is not None:
            row_type = row_type[row]

    # Systems in order of first appearance in the file.
    first_row = np.full(len(sys_uniques), n, dtype=np.int64)
    np.minimum.at(first_row, run_sys, row[starts])
    order = np.argsort(first_row, kind="stable")
    recode = np.empty_like(order)
    recode[order] = np.arange(len(order))
    systems = [sys_uniques[int(i)].as_py() for i in order]
    run_sys = recode[run_sys]

    # One answer type per query (checked first: labels normalise by it), then one gold label per query; each within
    # a run, and across the runs (systems) of a query.
    run_type = None
    if row_type is not None:
        run_type = _check_one_per_query(raw, row, starts, run_start_mask, q_codes, q_uniques, row_type, ANSWER_TYPE,
                                        lambda code: repr(ANSWER_TYPES[code]), "answer type")
    run_label = _check_one_per_query(raw, row, starts, run_start_mask, q_codes, q_uniques, label, LABEL,
                                     lambda code: repr(answers[code]), "gold label")
    return ContextTable(raw=raw, systems=systems, query_ids=q_uniques.to_numpy(zero_copy_only=False),
                        answers=answers, row=row, run_start=starts, run_system=run_sys, run_query=q_codes,
                        run_label=run_label, rank=rank, prediction=pred, score=score, probs=probs,
                        probs_answer=probs_answer, run_type=run_type, settings=settings, label_probs=label_probs)


def _check_one_per_query(raw: RawTable, row: np.ndarray, starts: np.ndarray, run_start_mask: np.ndarray,
                         q_codes: np.ndarray, q_uniques: pa.Array, values: np.ndarray, field_name: str,
                         show: Callable[[int], str], what: str) -> np.ndarray:
    """`values` (per sorted row) must be constant within each run and across the runs of a query; returns the value
    per run. The error names the first row that differs and where the query's first value is."""
    changed = np.flatnonzero((values[1:] != values[:-1]) & ~run_start_mask[1:])
    if len(changed):
        bad = int(changed[0]) + 1
        first = int(starts[np.searchsorted(starts, bad, side="right") - 1])
        raise raw.fail(int(row[bad]), field_name, f"{show(values[bad])} differs from {show(values[first])} at "
                                                  f"{raw.locate(int(row[first]))} for the same query; a query has "
                                                  f"one {what}")
    run_value = values[starts]
    per_query = np.zeros(len(q_uniques), dtype=run_value.dtype)
    per_query[q_codes] = run_value
    bad_run = _first(per_query[q_codes] != run_value)
    if bad_run is not None:
        other = int(np.argmax((q_codes == q_codes[bad_run]) & (run_value == per_query[q_codes[bad_run]])))
        raise raw.fail(int(row[starts[bad_run]]), field_name,
                       f"{show(run_value[bad_run])} differs from {show(run_value[other])} at "
                       f"{raw.locate(int(row[starts[other]]))} for query {q_uniques[int(q_codes[bad_run])]}; a "
                       f"query has one {what} in every system")
    return run_value


@dataclass
class RankMatrix:
    """One system's top-k as dense (query × rank) arrays; column j holds rank j+1, -1 / NaN where absent."""

    system: str
    k: int
    n_short: int  # queries with fewer than k ranks (before the short policy applied)
    short_policy: str
    query: np.ndarray  # global query codes, one per row
    label: np.ndarray  # answer code per query
    prediction: np.ndarray  # (n_queries, k) answer codes, -1 where the rank is absent
    row: np.ndarray  # (n_queries, k) file row of each cell, -1 where absent
    score: np.ndarray | None  # (n_queries, k) retrieval scores, NaN where absent
    answer_type: np.ndarray | None = None  # answer-type code per query; None: all closed
    graded: np.ndarray | None = None  # (n_queries, k) correctness when open answers are judged by a token score

    @property
    def present(self) -> np.ndarray:
        return self.prediction >= 0

    @property
    def correct(self) -> np.ndarray:
        if self.graded is not None:
            return self.graded
        return (self.prediction == self.label[:, None]) & self.present

    def type_mask(self, answer_type: str) -> np.ndarray:
        """Queries of one answer type."""
        if self.answer_type is None:
            return np.full(len(self.query), answer_type == CLOSED)
        return self.answer_type == ANSWER_TYPES.index(answer_type)


def rank_matrices(table: ContextTable, k: int | None = None, short: str = "error") -> list[RankMatrix]:
    """Per-system top-k matrices. k defaults to each system's largest rank. Queries with fewer than k ranks are
    counted and, by `short`: `error` raises TableError, `drop` removes them, `keep` scores the ranks they have
    (a query with no rank at all within 1..k is left out even then: it has nothing to score)."""
    if short not in SHORT_POLICIES:
        raise ValueError(f"short policy {short!r}: expected one of {SHORT_POLICIES}")
    if k is not None and k < 1:
        raise TableError(f"--k {k}: expected an integer >= 1")
    run_len = np.diff(np.append(table.run_start, table.n_rows))
    out = []
    for s, name in enumerate(table.systems):
        runs = np.flatnonzero(table.run_system == s)
        starts, lengths = table.run_start[runs], run_len[runs]
        first, stop = int(starts[0]), int(starts[-1] + lengths[-1])
        contiguous = stop - first == int(lengths.sum())
        rows = np.arange(first, stop) if contiguous else np.repeat(starts - np.cumsum(lengths) + lengths, lengths) \
            + np.arange(int(lengths.sum()))
        max_rank = int(table.rank[first:stop].max() if contiguous else table.rank[rows].max())
        ks = int(k if k is not None else max_rank)
        if contiguous and max_rank <= ks and (lengths == ks).all():
            # Every query has ranks exactly 1..k (strictly increasing, at most k, k of them): the rows are the matrix.
            pred = table.prediction[first:stop].reshape(-1, ks)
            filerow = table.row[first:stop].reshape(-1, ks)
            score = table.score[first:stop].reshape(-1, ks) if table.score is not None else None
            short_q = np.zeros(len(runs), dtype=bool)
        else:
            local = np.repeat(np.arange(len(runs)), lengths)
            keep = table.rank[rows] <= ks
            qi, col, keep_rows = local[keep], table.rank[rows][keep] - 1, rows[keep]
            pred = np.full((len(runs), ks), -1, dtype=table.prediction.dtype)
            pred[qi, col] = table.prediction[keep_rows]
            filerow = np.full((len(runs), ks), -1, dtype=np.int64)
            filerow[qi, col] = table.row[keep_rows]
            score = None
            if table.score is not None:
                score = np.full((len(runs), ks), np.nan)
                score[qi, col] = table.score[keep_rows]
            short_q = np.count_nonzero(pred >= 0, axis=1) < ks
        n_short = int(short_q.sum())
        if n_short and short == "error":
            i = int(np.argmax(short_q))
            have = [int(j) + 1 for j in np.flatnonzero(pred[i] >= 0)]
            raise TableError(f"{table.locate(int(table.run_start[runs[i]]))}: field '{RANK}': query "
                             f"{table.query_ids[table.run_query[runs[i]]]!r} of system {name!r} has ranks {have}, "
                             f"fewer than k={ks} ({n_short} such queries in this system); pass --k with a smaller "
                             f"depth, or --short drop (leave them out) or --short keep (score the ranks they have)")
        if n_short and short != "error":
            keep = ~short_q if short == "drop" else (pred >= 0).any(axis=1)  # keep: a query needs one rank in 1..k
            runs, pred, filerow = runs[keep], pred[keep], filerow[keep]
            score = score[keep] if score is not None else None
            if not len(runs):
                raise TableError(f"{table.path}: every query of system {name!r} has fewer than k={ks} ranks; "
                                 f"nothing is left after --short {short}")
        if n_short:
            log.info("system %s: %d queries with fewer than k=%d ranks (policy %s)", name, n_short, ks, short)
        qtype = table.run_type[runs] if table.run_type is not None else None
        graded = None
        if qtype is not None and table.settings.graded_open and (qtype == ANSWER_TYPES.index(OPEN)).any():
            graded = table.judge(pred, table.run_label[runs][:, None], qtype[:, None]) & (pred >= 0)
        out.append(RankMatrix(system=name, k=ks, n_short=n_short, short_policy=short,
                              query=table.run_query[runs], label=table.run_label[runs], prediction=pred,
                              row=filerow, score=score, answer_type=qtype, graded=graded))
    return out
