"""Prediction tables on disk: the context-prediction, answer and rerank tables (JSONL, CSV or Parquet by suffix).

Owns the validating loaders whose errors name file, line/row and field; the column names and the atomic
`write_table` are the contract of core/base/tables.py (re-exported here). The loaders live by concept:
analysis/readers.py (reading files into typed columns), analysis/checks.py (value checks),
analysis/contexts.py (the context table and its rank matrices); this module keeps the answers and rerank tables and
re-exports the rest, so `analysis.tables` stays the one import for every table name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq  # noqa: F401  (re-exported: tests patch tables.pq.read_table)

# names re-exported for the modules and tests that import them from here (noqa: F401 throughout)
from ..core.base.tables import (ANSWER_COLUMNS, ANSWER_REQUIRED, ANSWER_TYPE, CONTEXT_COLUMNS,  # noqa: F401
                                CONTEXT_REQUIRED, ERROR, HEAD, ITEM_ID, LABEL, PREDICTION, PROBS, QUERY_ID, RANK,
                                RANKING, RERANK_COLUMNS, RERANK_REQUIRED, RETRIEVAL_SCORE, SELECTOR, SUFFIXES, SYSTEM,
                                TableError, probs_type, write_table)
from ..core.base.answers import (ANSWER_TYPES, CLOSED, DEFAULT_SETTINGS, OPEN, SET, AnswerSettings,  # noqa: F401
                                 normalize_answer, score_rows)
from .checks import (_VALUE_WANT, PROB_TOLERANCE, ProbsColumn, _first, check_blank_labels,  # noqa: F401
                     check_distributions, encode_strings)
from .contexts import SHORT_POLICIES, ContextTable, RankMatrix, _row_types, load_contexts, rank_matrices  # noqa: F401
from .readers import (_SPECS, RawTable, _read_jsonl_arrow, _read_jsonl_lines, _wanted, read_raw)  # noqa: F401


# ------------------------------------------------------------------------------------ answers and rerank tables


def _frame(raw: RawTable, names: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({name: raw.columns[name].to_pandas() for name in names if name in raw.columns})


def _check_unique(df: pd.DataFrame, keys: list[str], raw: RawTable, what: str) -> None:
    dup = df.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first = rows[0]
        second = rows[1:][(df.iloc[rows[1:]][keys].to_numpy() == df.iloc[first][keys].to_numpy()).all(1)][0]
        values = ", ".join(f"{df.iloc[first][c]}" for c in keys)
        raise raw.fail(int(second), keys[-1], f"duplicate ({', '.join(keys)}) = ({values}); first at "
                                              f"{raw.locate(int(first))}; {what}")


@dataclass
class AnswerTable:
    """A validated answer table: one final answer per (system, query_id); `frame` has a boolean `correct`."""

    raw: RawTable
    systems: list[str]
    frame: pd.DataFrame  # system, query_id, prediction, label, answer_type, prediction_norm, label_norm, correct,
    #                      token_recall, token_f1
    settings: AnswerSettings = DEFAULT_SETTINGS
    typed: bool = True  # the types come from the column or --task (else every row was read as closed)

    def retype(self, types: np.ndarray) -> None:
        """Gives the rows these answer types (names) and judges them again: an answer table without the column
        takes each query's type from the context table; its labels are then checked (non-empty except on set rows,
        one gold label per query) after that type's normalisation."""
        self.frame[ANSWER_TYPE] = types
        codes = pd.Series(types).map({t: i for i, t in enumerate(ANSWER_TYPES)}).to_numpy(dtype=np.int8)
        check_blank_labels(self.raw, codes)
        scored = score_rows(self.frame[PREDICTION], self.frame[LABEL], types, self.settings)
        _check_one_label_per_query(self.frame, scored["label_norm"], self.raw)
        for key, value in scored.items():
            self.frame[key] = value
        self.typed = True

    @property
    def path(self) -> Path:
        return self.raw.path


def _check_one_label_per_query(df: pd.DataFrame, label_norm: np.ndarray, raw: RawTable) -> None:
    """A query has one answer type (checked first: labels normalise by it) and one gold label (normalised)."""
    for name, values, what in ((ANSWER_TYPE, df[ANSWER_TYPE], "answer type"),
                               (LABEL, pd.Series(label_norm, index=df.index), "gold label")):
        first_value = values.groupby(df[QUERY_ID], sort=False).transform("first")
        bad = _first((values != first_value).to_numpy())
        if bad is not None:
            first = int(np.argmax((df[QUERY_ID] == df[QUERY_ID].iloc[bad]).to_numpy()))
            raise raw.fail(bad, name, f"{df[name].iloc[bad]!r} differs from {df[name].iloc[first]!r} at "
                                      f"{raw.locate(first)} for the same query; a query has one {what}")


def load_answers(path: str | os.PathLike, settings: AnswerSettings = DEFAULT_SETTINGS) -> AnswerTable:
    """Loads and validates an answer table; `frame` gains answer_type, the normalised prediction_norm and
    label_norm, correct, and token_recall / token_f1 (NaN on rows that are not open)."""
    raw = read_raw(path, "answers", columns=ANSWER_REQUIRED + (ANSWER_TYPE,))
    df = _frame(raw, ANSWER_REQUIRED)
    _check_unique(df, [SYSTEM, QUERY_ID], raw, "the answer table holds one answer per system and query")
    types = _row_types(raw, settings)
    typed = ANSWER_TYPE in raw.columns or settings.task != "auto"
    if typed:  # untyped tables are checked when they take their types from a context table (AnswerTable.retype)
        check_blank_labels(raw, types)
    df[ANSWER_TYPE] = (np.array(ANSWER_TYPES, dtype=object)[types] if types is not None
                       else np.full(len(df), CLOSED, dtype=object))
    scored = score_rows(df[PREDICTION], df[LABEL], df[ANSWER_TYPE], settings)
    if typed:
        _check_one_label_per_query(df, scored["label_norm"], raw)
    for key, value in scored.items():
        df[key] = value
    return AnswerTable(raw=raw, systems=list(dict.fromkeys(df[SYSTEM])), frame=df, settings=settings, typed=typed)


@dataclass
class RerankTable:
    """A validated rerank file: per (system, query_id, selector) a ranking best-first, or an error."""

    raw: RawTable
    frame: pd.DataFrame  # system, query_id, selector, ranking (list[int]), error (str, "" = none)

    @property
    def path(self) -> Path:
        return self.raw.path


def load_rerank(path: str | os.PathLike) -> RerankTable:
    raw = read_raw(path, "rerank")
    df = _frame(raw, RERANK_REQUIRED)
    df[RANKING] = raw.columns[RANKING].to_pylist()
    df[ERROR] = raw.columns[ERROR].to_pandas().fillna("") if ERROR in raw.columns else ""
    _check_unique(df, [SYSTEM, QUERY_ID, SELECTOR], raw, "a rerank file ranks each query once per selector")
    empty = np.array([not r for r in df[RANKING]]) & (df[ERROR].str.strip() == "").to_numpy()
    row = _first(empty)
    if row is not None:
        raise raw.fail(row, RANKING, f"empty ranking without an error; expected {_VALUE_WANT['ranking']}, or a "
                                     f"non-empty '{ERROR}' for a failed query")
    return RerankTable(raw=raw, frame=df)
