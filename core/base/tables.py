"""Prediction tables, the contract between the pipeline that writes them and the analysis that reads them: column
names (docs/design.md, "The analysis, defined exactly") and the atomic `write_table`. Importing this module loads
neither pandas nor pyarrow (the writer imports them when called), so core's library can name the columns.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fsutil import atomic_path

if TYPE_CHECKING:
    import pandas as pd

# Column names are part of the public interface (docs/design.md, "The analysis, defined exactly").
SYSTEM, QUERY_ID, RANK, LABEL, PREDICTION = "system", "query_id", "rank", "label", "prediction"
ITEM_ID, HEAD, RETRIEVAL_SCORE, PROBS = "item_id", "head", "retrieval_score", "probs"
SELECTOR, RANKING, ERROR = "selector", "ranking", "error"
ANSWER_TYPE = "answer_type"
CONTEXT_REQUIRED = (SYSTEM, QUERY_ID, RANK, LABEL, PREDICTION)
CONTEXT_COLUMNS = CONTEXT_REQUIRED + (ITEM_ID, HEAD, RETRIEVAL_SCORE, PROBS, ANSWER_TYPE)
ANSWER_REQUIRED = (SYSTEM, QUERY_ID, PREDICTION, LABEL)
ANSWER_COLUMNS = ANSWER_REQUIRED + (PROBS, ANSWER_TYPE)
RERANK_REQUIRED = (SYSTEM, QUERY_ID, SELECTOR, RANKING)
RERANK_COLUMNS = RERANK_REQUIRED + (ERROR,)
SUFFIXES = (".jsonl", ".csv", ".parquet")


class TableError(ValueError):
    """Invalid prediction table; the message names the file, the line (or Parquet row) and the field at fault."""


def probs_type():
    """The Arrow type of a `probs` cell: a map answer -> probability."""
    import pyarrow as pa

    return pa.map_(pa.string(), pa.float64())


# ------------------------------------------------------------------------------------------------- writing


def _probs_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {str(k): float(v) for k, v in dict(value).items()}


def write_table(df: "pd.DataFrame", path: str | os.PathLike) -> Path:
    """Writes a prediction table atomically, the format chosen by suffix (.jsonl, .csv, .parquet).

    `probs` cells are dicts (answer -> probability) or None: a JSON object in JSONL and CSV, a map in Parquet.
    `ranking` cells are lists of ranks (a JSON list in CSV).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TableError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    df = df.reset_index(drop=True)
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            arrays = {}
            for name in df.columns:
                if name == PROBS:
                    cells = [_probs_cell(v) for v in df[name]]
                    arrays[name] = pa.array([list(c.items()) if c is not None else None for c in cells],
                                            type=probs_type())
                elif name == RANKING:
                    arrays[name] = pa.array([list(map(int, r)) if r is not None else None for r in df[name]],
                                            type=pa.list_(pa.int64()))
                else:
                    arrays[name] = pa.array(df[name].to_numpy(dtype=object) if df[name].dtype == object
                                            else df[name])
            pq.write_table(pa.table(arrays), tmp)
        elif suffix == ".csv":
            out = df.copy()
            for name in (PROBS, RANKING):
                if name in out.columns:
                    out[name] = [json.dumps(_probs_cell(v) if name == PROBS else list(map(int, v)))
                                 if v is not None and not (isinstance(v, float) and math.isnan(v)) else ""
                                 for v in out[name]]
            out.to_csv(tmp, index=False)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in df.to_dict(orient="records"):
                    clean = {k: _json_cell(k, v) for k, v in rec.items()}
                    f.write(json.dumps(clean, ensure_ascii=False) + "\n")
    return path


def _json_cell(name: str, value: Any) -> Any:
    import pandas as pd

    if name == PROBS:
        return _probs_cell(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is pd.NA:
        return None
    return value


