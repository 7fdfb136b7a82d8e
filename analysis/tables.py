"""Prediction tables on disk: the context-prediction, answer and rerank tables (JSONL, CSV or Parquet by suffix).

Owns the validating loaders whose errors name file, line/row and field; the column names and the atomic
`write_table` are the contract of core/base/tables.py (re-exported here).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.base.jsonl import iter_jsonl
from ..core.base.tables import (ANSWER_COLUMNS, ANSWER_REQUIRED, ANSWER_TYPE, CONTEXT_COLUMNS, CONTEXT_REQUIRED, ERROR,
                                HEAD, ITEM_ID, LABEL, PREDICTION, PROBS, QUERY_ID, RANK, RANKING, RERANK_COLUMNS,
                                RERANK_REQUIRED, RETRIEVAL_SCORE, SELECTOR, SUFFIXES, SYSTEM, TableError, probs_type,
                                write_table)
from ..core.base.answers import (ANSWER_TYPES, CLOSED, DEFAULT_SETTINGS, OPEN, SET, AnswerSettings, normalize_answer,
                                 score_rows)
from ..core.base.answers import token_scores as _token_scores

log = logging.getLogger(__name__)

SHORT_POLICIES = ("error", "drop", "keep")
PROB_TOLERANCE = 1e-3

# Value kinds: "id" non-empty string, "text" string (may be empty), "rank" integer >= 1, "score" finite number,
# "probs" map answer -> probability, "ranking" list of integers >= 1.
_KIND_WANT = {
    "id": "a non-empty string",
    "text": "a string",
    "rank": "an integer >= 1",
    "score": "a finite number",
    "probs": "an object mapping answer strings to probabilities",
    "ranking": "a list of integers >= 1 (ranks, best first)",
}
_SPECS: dict[str, dict[str, str]] = {
    "contexts": {SYSTEM: "id", QUERY_ID: "id", RANK: "rank", LABEL: "id", PREDICTION: "text", ITEM_ID: "text",
                 HEAD: "text", RETRIEVAL_SCORE: "score", PROBS: "probs", ANSWER_TYPE: "text"},
    "answers": {SYSTEM: "id", QUERY_ID: "id", PREDICTION: "text", LABEL: "id", PROBS: "probs", ANSWER_TYPE: "text"},
    "rerank": {SYSTEM: "id", QUERY_ID: "id", SELECTOR: "id", RANKING: "ranking", ERROR: "text"},
}
_REQUIRED = {"contexts": CONTEXT_REQUIRED, "answers": ANSWER_REQUIRED, "rerank": RERANK_REQUIRED}
# "id" columns whose empty string is valid on set rows (the empty label set): checked once the row types are known
_BLANK_ON_SET = (LABEL,)
_PROBS_TYPE = probs_type()


# ---------------------------------------------------------------------------------------------------- reading


class _Locator:
    """Turns a 0-based data-row index into the place a user finds it: `file:line` (JSONL, CSV) or `file: row i`.

    `lines` maps rows to 1-based lines; `record_lines(path)` computes that map on first use (only an error needs it).
    """

    def __init__(self, path: Path, lines: Sequence[int] | None = None,
                 record_lines: Callable[[Path], Sequence[int]] | None = None):
        self.path, self._lines, self._record_lines = path, lines, record_lines

    def __call__(self, row: int) -> str:
        if self._lines is None and self._record_lines is not None:
            self._lines = self._record_lines(self.path)
        if self._lines is not None:
            return f"{self.path}:{self._lines[row]}"
        return f"{self.path}: row {row} (0-based Parquet row index)"


def _csv_record_lines(path: Path) -> list[int]:
    """1-based starting line of every CSV data record (quoted fields may span lines; blank lines are skipped)."""
    lines = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        end = 0
        for record in reader:
            start, end = end + 1, reader.line_num
            if record:
                lines.append(start)
    return lines[1:]  # the first record is the header


@dataclass
class RawTable:
    """Columns of a prediction table as arrow arrays with normalised types, in file order, plus its locator."""

    path: Path
    columns: dict[str, pa.ChunkedArray]
    n_rows: int
    locate: Callable[[int], str]
    probs: ProbsColumn | None = None  # the probs column flattened (set when validated)
    _encoded: dict[str, tuple[np.ndarray, pa.Array]] = field(default_factory=dict, repr=False)

    def encode(self, name: str) -> tuple[np.ndarray, pa.Array]:
        """Integer codes and unique values of a string column (computed once)."""
        if name not in self._encoded:
            self._encoded[name] = encode_strings(self.columns[name])
        return self._encoded[name]

    def fail(self, row: int, field: str, message: str) -> TableError:
        return TableError(f"{self.locate(int(row))}: field '{field}': {message}")


def _bad(where: str, field: str, value: Any, kind: str) -> TableError:
    shown = value if isinstance(value, str) else json.dumps(value, default=repr)
    return TableError(f"{where}: field '{field}': expected {_KIND_WANT[kind]}, got {type(value).__name__} "
                      f"{shown[:60]!r}")


def _check_probs_object(value: Any, where: str, field: str) -> list[tuple[str, float]]:
    if not isinstance(value, dict):
        raise _bad(where, field, value, "probs")
    out = []
    for key, p in value.items():
        if not isinstance(key, str) or isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TableError(f"{where}: field '{field}': entry {key!r}: {p!r} is not a number; expected "
                             f"{_KIND_WANT['probs']}")
        out.append((key, float(p)))
    return out


def _convert_value(value: Any, kind: str, where: str, field: str) -> Any:
    """Checks one JSON value against its kind; returns the arrow-ready value (None for null)."""
    if value is None:
        return None
    if kind in ("id", "text"):
        if not isinstance(value, str):
            raise _bad(where, field, value, kind)
        return value
    if kind == "rank":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, field, value, kind)
        return value
    if kind == "score":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, field, value, kind)
        return float(value)
    if kind == "probs":
        return _check_probs_object(value, where, field)
    if kind == "ranking":
        if not isinstance(value, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in value):
            raise _bad(where, field, value, kind)
        return value
    raise AssertionError(kind)


def _arrow_type(kind: str) -> pa.DataType:
    return {"id": pa.string(), "text": pa.string(), "rank": pa.int64(), "score": pa.float64(),
            "probs": _PROBS_TYPE, "ranking": pa.list_(pa.int64())}[kind]


def _wanted(spec: dict[str, str], required: Sequence[str], columns: Sequence[str] | None) -> list[str]:
    """The columns to read: the required ones and, of the optional ones, those in `columns` (None: all)."""
    return [c for c in spec if c in required or columns is None or c in columns]


def _read_jsonl(path: Path, spec: dict[str, str], required: Sequence[str],
                columns: Sequence[str] | None) -> RawTable:
    """pyarrow's multithreaded JSON reader first; any file it rejects or reads into types that are not the
    table's goes through the line-by-line pass, which names the line and field at fault (or reads what pyarrow
    would not, e.g. a key given twice)."""
    wanted = _wanted(spec, required, columns)
    try:
        raw = _read_jsonl_arrow(path, spec, required, wanted)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        log.info("%s: pyarrow's JSON reader declined (%s); reading line by line", path, str(e)[:200])
        raw = None
    return raw if raw is not None else _read_jsonl_lines(path, spec, required, wanted)


_MAX_PROBS_KEYS = 256  # probs with more distinct answers than this are read line by line (one column per key)


def _read_jsonl_arrow(path: Path, spec: dict[str, str], required: Sequence[str],
                      wanted: Sequence[str]) -> RawTable | None:
    """The table via pyarrow.json, or None when a column is missing or has another type than its kind (the line
    pass then reports it). Nested probs objects arrive as a struct with one field per answer seen anywhere in the
    file (absent keys null); they are turned into the map column here. A null probability therefore reads as an
    absent entry on this path."""
    import pyarrow.json as pa_json

    # Scalar columns get explicit types, so a value of another JSON type fails the read instead of being inferred.
    scalar = {"id": pa.string(), "text": pa.string(), "rank": pa.int64(), "score": pa.float64()}
    schema = pa.schema([(name, scalar[spec[name]]) for name in wanted if spec[name] in scalar])
    with ThreadPoolExecutor(1) as pool:  # the newline count runs while pyarrow's threads parse (both free the GIL)
        n_newlines = pool.submit(_count_lines, path)
        table = pa_json.read_json(path, parse_options=pa_json.ParseOptions(explicit_schema=schema))
        n_lines = n_newlines.result()
    if table.num_rows == 0:
        return None
    lines = None  # rows are lines 1..n when the file has no blank lines: the locator computes the map if needed
    if n_lines != table.num_rows:
        lines = _jsonl_record_lines(path)
        if len(lines) != table.num_rows:  # several objects on one line: the line pass rejects the file
            return None
    cols: dict[str, pa.ChunkedArray] = {}
    for name in wanted:
        if name not in table.column_names:
            if name in required:
                return None
            continue
        col, kind = table.column(name), spec[name]
        if name in required and col.null_count:
            return None
        if pa.types.is_null(col.type) or col.null_count == len(col):  # every row null or absent: as if not there
            continue
        if kind == "probs":
            if not pa.types.is_struct(col.type) or col.type.num_fields > _MAX_PROBS_KEYS or not all(
                    pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in col.type):
                return None
            col = _probs_from_struct(col)
            if col is None:
                return None
        elif kind == "ranking":
            if not (pa.types.is_list(col.type) and (pa.types.is_integer(col.type.value_type)
                                                    or pa.types.is_null(col.type.value_type))):
                return None
            col = col.cast(pa.list_(pa.int64()))
        cols[name] = col
    return RawTable(path, cols, table.num_rows, _Locator(path, lines, record_lines=_jsonl_record_lines))


def _count_lines(path: Path) -> int:
    """Lines of a file: newlines, plus one for a last line without one."""
    n, last = 0, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n, last = n + int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == 10)), block[-1:]
    return n + (last not in (b"", b"\n"))


def _jsonl_record_lines(path: Path) -> list[int]:
    """1-based line number of every non-blank line."""
    with open(path, "rb") as f:
        return [lineno for lineno, line in enumerate(f, 1) if line.strip()]


def _probs_from_struct(col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """struct<answer: number, ...> (null fields = absent keys) -> map<string, float64>, chunk by chunk; entries
    keep the struct's field order. None if the entries would overflow the map's int32 offsets."""
    names = pa.array([f.name for f in col.type], pa.string())
    out = []
    for chunk in col.chunks:
        n = len(chunk)
        row_valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        present = np.empty((n, chunk.type.num_fields), dtype=bool)
        values = np.empty((n, chunk.type.num_fields))
        for j in range(chunk.type.num_fields):
            child = pc.struct_field(chunk, [j])  # honours the chunk's offset, unlike .field(j)
            present[:, j] = child.is_valid().to_numpy(zero_copy_only=False)
            values[:, j] = child.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        present &= row_valid[:, None]
        counts = present.sum(axis=1)
        if int(counts.sum()) >= 2 ** 31:
            return None
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        keys = names.take(pa.array(np.nonzero(present)[1].astype(np.int32)))
        out.append(pa.MapArray.from_arrays(pa.array(offsets), keys, pa.array(values[present]), type=_PROBS_TYPE,
                                           mask=pa.array(~row_valid) if not row_valid.all() else None))
    return pa.chunked_array(out, type=_PROBS_TYPE)


def _read_jsonl_lines(path: Path, spec: dict[str, str], required: Sequence[str],
                      wanted: Sequence[str]) -> RawTable:
    values: dict[str, list] = {name: [] for name in wanted}
    present: set[str] = set()
    lines: list[int] = []
    for lineno, obj in iter_jsonl(path, error=TableError):
        where = f"{path}:{lineno}"
        for name in required:
            if obj.get(name) is None:
                raise TableError(f"{where}: field '{name}': missing required field (required: "
                                 f"{', '.join(required)})")
        for name in wanted:
            value = obj.get(name)
            if value is not None:
                present.add(name)
            values[name].append(_convert_value(value, spec[name], where, name))
        lines.append(lineno)
    if not lines:
        raise TableError(f"{path}: empty file: no rows")
    columns = {name: pa.chunked_array([pa.array(vals, type=_arrow_type(spec[name]))])
               for name, vals in values.items() if name in present or name in required}
    return RawTable(path, columns, len(lines), _Locator(path, lines))


_INT_RE = r"\s*[+-]?\d+\s*"


def _read_csv(path: Path, spec: dict[str, str], required: Sequence[str]) -> RawTable:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: empty file: no header and no rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a valid UTF-8 CSV file ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TableError(f"{path}:1: field '{missing[0]}': missing required column (header has "
                         f"{list(df.columns)}; required: {', '.join(required)})")
    if len(df) == 0:
        raise TableError(f"{path}: empty file: a header but no data rows")
    locate = _Locator(path, record_lines=_csv_record_lines)
    columns = {}
    for name, kind in spec.items():
        if name not in df.columns:
            continue
        cells = df[name].to_numpy(dtype=object)
        if kind in ("id", "text"):
            arr = pa.array(cells, type=pa.string())
        elif kind == "rank":
            ok = df[name].str.fullmatch(_INT_RE).to_numpy(dtype=bool)
            if not ok.all():
                row = int(np.argmin(ok))
                raise TableError(f"{locate(row)}: field '{name}': expected {_KIND_WANT[kind]}, got {cells[row]!r}")
            arr = pa.array(pd.to_numeric(df[name].str.strip()).to_numpy(dtype=np.int64), type=pa.int64())
        elif kind == "score":
            blank = (df[name].str.strip() == "").to_numpy(dtype=bool)
            nums = pd.to_numeric(df[name].where(~blank, "nan"), errors="coerce").to_numpy(dtype=float)
            bad = ~blank & ~np.isfinite(nums)
            if bad.any():
                row = int(np.argmax(bad))
                raise TableError(f"{locate(row)}: field '{name}': expected {_KIND_WANT[kind]}, got {cells[row]!r}")
            arr = pa.array(nums, type=pa.float64(), mask=blank)
        else:  # probs / ranking: JSON in a cell, empty = null
            parsed = []
            for row, cell in enumerate(cells):
                if not cell.strip():
                    parsed.append(None)
                    continue
                try:
                    value = json.loads(cell)
                except json.JSONDecodeError as e:
                    raise TableError(f"{locate(row)}: field '{name}': not valid JSON ({e.msg}); expected "
                                     f"{_KIND_WANT[kind]} written as JSON") from None
                parsed.append(_convert_value(value, kind, locate(row), name))
            arr = pa.array(parsed, type=_arrow_type(kind))
        columns[name] = pa.chunked_array([arr])
    return RawTable(path, columns, len(df), locate)


def _parquet_kind_ok(kind: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if kind in ("id", "text"):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if kind == "rank":
        return pa.types.is_integer(t)
    if kind == "score":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if kind == "probs":
        return (pa.types.is_map(t) and _parquet_kind_ok("id", t.key_type)
                and _parquet_kind_ok("score", t.item_type)) or _parquet_kind_ok("id", t)
    if kind == "ranking":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    raise AssertionError(kind)


def _read_parquet(path: Path, spec: dict[str, str], required: Sequence[str], columns: Sequence[str] | None,
                  dictionary: Sequence[str]) -> RawTable:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        if path.stat().st_size == 0:
            raise TableError(f"{path}: empty file") from None
        raise TableError(f"{path}: not a valid Parquet file ({e})") from None
    names = set(schema.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise TableError(f"{path}: field '{missing[0]}': missing required column (columns: {schema.names}; "
                         f"required: {', '.join(required)})")
    wanted = [c for c in _wanted(spec, required, columns) if c in names]
    for name in wanted:
        t = schema.field(name).type
        if not _parquet_kind_ok(spec[name], t):
            raise TableError(f"{path}: field '{name}': column has type {t}; expected {_KIND_WANT[spec[name]]}")
    read_dict = [c for c in dictionary if c in wanted and not pa.types.is_dictionary(schema.field(c).type)]
    table = pq.read_table(path, columns=wanted, read_dictionary=read_dict or None)
    if table.num_rows == 0:
        raise TableError(f"{path}: empty file: no rows")
    cols = {}
    for name in wanted:
        col, kind = table.column(name), spec[name]
        if kind == "probs" and not pa.types.is_map(col.type):
            col = _probs_from_json_strings(col, _Locator(path), name)
        elif kind == "probs" and col.type != _PROBS_TYPE:
            col = col.cast(_PROBS_TYPE)
        elif kind == "rank" and col.type != pa.int64():
            col = col.cast(pa.int64())
        elif kind == "score" and col.type != pa.float64():
            col = col.cast(pa.float64())
        elif kind == "ranking" and col.type != pa.list_(pa.int64()):
            col = col.cast(pa.list_(pa.int64()))
        cols[name] = col
    return RawTable(path, cols, table.num_rows, _Locator(path))


def _probs_from_json_strings(col: pa.ChunkedArray, locate: _Locator, name: str) -> pa.ChunkedArray:
    out = []
    for row, cell in enumerate(col.to_pylist()):
        if cell is None or not cell.strip():
            out.append(None)
            continue
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as e:
            raise TableError(f"{locate(row)}: field '{name}': not valid JSON ({e.msg}); expected "
                             f"{_KIND_WANT['probs']}") from None
        out.append(_check_probs_object(value, locate(row), name))
    return pa.chunked_array([pa.array(out, type=_PROBS_TYPE)])


def read_raw(path: str | os.PathLike, kind: str, columns: Sequence[str] | None = None,
             dictionary: Sequence[str] = (), required: Sequence[str] | None = None) -> RawTable:
    """Reads a table file (format by suffix) with per-value type checks; `kind` is contexts, answers or rerank.

    `columns` limits the optional columns read (Parquet reads only those); `dictionary` names string columns to
    read dictionary-encoded from Parquet (cheap integer codes for low-cardinality columns). `required`: the columns
    that must be there (default: the kind's); `()` reads one more column of a table already validated, and from
    Parquet only that column.
    """
    path = Path(path)
    spec, required = _SPECS[kind], (_REQUIRED[kind] if required is None else tuple(required))
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TableError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".jsonl":
        raw = _read_jsonl(path, spec, required, columns)
    elif suffix == ".csv":
        raw = _read_csv(path, spec, required)
    else:
        raw = _read_parquet(path, spec, required, columns, dictionary)
    _check_values(raw, spec, required)
    return raw


def _first(mask: np.ndarray) -> int | None:
    return int(np.argmax(mask)) if mask.any() else None


def _check_values(raw: RawTable, spec: dict[str, str], required: Sequence[str]) -> None:
    """Nulls in required columns, empty ids, ranks < 1, non-finite scores, probs that are not distributions."""
    for name, col in raw.columns.items():
        kind = spec[name]
        if name in required and col.null_count:
            row = _first(~pc.is_valid(col).to_numpy(zero_copy_only=False))
            raise raw.fail(row, name, f"missing value; expected {_KIND_WANT[kind]}")
        if kind == "id" and name not in _BLANK_ON_SET:
            row = _first_blank(raw, name)
            if row is not None:
                raise raw.fail(row, name, f"empty string; expected {_KIND_WANT[kind]}")
        elif kind == "rank":
            rank = col.to_numpy()
            row = _first(rank < 1)
            if row is not None:
                raise raw.fail(row, name, f"{int(rank[row])} is not a valid rank; expected {_KIND_WANT[kind]}")
        elif kind == "score":
            values = col.to_numpy(zero_copy_only=False)
            row = _first(~np.isfinite(values) & pc.is_valid(col).to_numpy(zero_copy_only=False))
            if row is not None:
                raise raw.fail(row, name, f"{values[row]} is not {_KIND_WANT[kind]}")
        elif kind == "probs":
            raw.probs = ProbsColumn.from_arrow(col)
            check_distributions(raw.probs, raw, _set_rows(raw))
        elif kind == "ranking":
            flat = pc.list_flatten(col).to_numpy()
            if (flat < 1).any():
                lengths = pc.list_value_length(col).fill_null(0).to_numpy()
                owner = np.repeat(np.arange(len(lengths)), lengths)
                row = int(owner[np.argmax(flat < 1)])
                raise raw.fail(row, name, f"{col[row].as_py()} holds a rank < 1; expected {_KIND_WANT[kind]}")


def encode_strings(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes (int32, -1 for null) and the unique values of a string column. Dictionary chunks with different
    dictionaries (Parquet read with read_dictionary) are unified through their values, without touching the rows."""
    codes = np.empty(len(col), dtype=np.int32)
    if pa.types.is_dictionary(col.type):
        chunks = [c for c in col.chunks if len(c)]
        if not chunks:
            return codes, pa.array([], pa.string())
        enc = pc.dictionary_encode(pa.concat_arrays([c.dictionary.cast(pa.string()) for c in chunks]))
        global_of = enc.indices.to_numpy().astype(np.int32)
        pos = start = 0
        for c in chunks:
            n = len(c.dictionary)
            idx = c.indices.fill_null(-1) if c.null_count else c.indices
            local = np.append(global_of[start:start + n], np.int32(-1))  # index -1 (a null) maps to -1
            np.take(local, idx.to_numpy(), out=codes[pos:pos + len(c)])
            pos, start = pos + len(c), start + n
        return codes, enc.dictionary
    enc = pc.dictionary_encode(col)
    chunks = [c for c in enc.chunks if len(c)]
    if not chunks:
        return codes, pa.array([], pa.string())
    pos = 0
    for c in chunks:
        codes[pos:pos + len(c)] = (c.indices.fill_null(-1) if c.null_count else c.indices).to_numpy()
        pos += len(c)
    return codes, chunks[0].dictionary.cast(pa.string())


def _blank(raw: RawTable, name: str) -> np.ndarray:
    """Per row: the string is empty or only whitespace. Dictionary columns are checked through their values."""
    col = raw.columns[name]
    if pa.types.is_dictionary(col.type):
        codes, uniques = raw.encode(name)
        blank = [i for i, u in enumerate(uniques.to_pylist()) if u is not None and not u.strip()]
        return np.isin(codes, blank) if blank else np.zeros(raw.n_rows, dtype=bool)
    blank = pc.or_(pc.equal(pc.utf8_length(col), 0), pc.utf8_is_space(col))
    return blank.fill_null(False).to_numpy(zero_copy_only=False)


def _first_blank(raw: RawTable, name: str) -> int | None:
    """First row whose string is empty or only whitespace."""
    return _first(_blank(raw, name))


def check_blank_labels(raw: RawTable, types: np.ndarray | None) -> None:
    """An empty gold label is the empty set on a set row (answers.parse_set) and an error on any other row; `types`:
    the answer-type code of every file row (None: all closed)."""
    if LABEL not in raw.columns:
        return
    blank = _blank(raw, LABEL)
    if types is not None:
        blank &= np.asarray(types) != ANSWER_TYPES.index(SET)
    row = _first(blank)
    if row is not None:
        raise raw.fail(row, LABEL, f"empty string; expected {_KIND_WANT['id']} (an empty gold label is the empty set, "
                                   f"valid only on a row whose answer_type is set)")


@dataclass
class ProbsColumn:
    """A probs column flattened: entries offsets[r]:offsets[r+1] belong to row r; `valid[r]` is False for null."""

    offsets: np.ndarray  # int64, n_rows + 1
    keys: pa.Array  # raw answer strings of all entries
    values: np.ndarray  # float64
    valid: np.ndarray  # bool, n_rows

    @classmethod
    def from_arrow(cls, col: pa.ChunkedArray) -> "ProbsColumn":
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        off = arr.offsets.to_numpy().astype(np.int64)
        start, length = int(off[0]), int(off[-1] - off[0])  # .keys/.items ignore a slice of the map array
        items = arr.items.slice(start, length)
        return cls(off - start, arr.keys.slice(start, length),
                   (items.fill_null(np.nan) if items.null_count else items).to_numpy(zero_copy_only=False)
                   .astype(np.float64, copy=False),
                   arr.is_valid().to_numpy(zero_copy_only=False))

    def subset(self, rows: np.ndarray) -> "ProbsColumn":
        """The column with only `rows` (bool, per row) kept; the other rows become null."""
        lengths = np.diff(self.offsets)
        keep = np.repeat(rows, lengths)
        offsets = np.concatenate([[0], np.cumsum(np.where(rows, lengths, 0))]).astype(np.int64)
        return ProbsColumn(offsets, self.keys.filter(pa.array(keep)), self.values[keep], self.valid & rows)

    def row_sums(self) -> np.ndarray:
        cs = np.concatenate([[0.0], np.cumsum(self.values)])
        return cs[self.offsets[1:]] - cs[self.offsets[:-1]]

    def row_max(self) -> np.ndarray:
        """Largest probability of each row (NaN for null or empty rows)."""
        out = np.full(len(self.valid), np.nan)
        nonempty = self.offsets[1:] > self.offsets[:-1]
        if len(self.values):
            out[nonempty] = np.maximum.reduceat(self.values, self.offsets[:-1][nonempty])
        return out


def _set_rows(raw: RawTable) -> np.ndarray | None:
    """Rows whose answer_type cell says set (their probs are per-label p(yes), not a distribution); None without
    the column."""
    col = raw.columns.get(ANSWER_TYPE)
    if col is None:
        return None
    kind = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
    return pc.fill_null(pc.equal(kind, SET), False).to_numpy(zero_copy_only=False)


def check_distributions(probs: ProbsColumn, raw: RawTable, set_rows: np.ndarray | None = None) -> None:
    """Every probs cell a distribution over answers, except on set rows (`set_rows`), where each value is one
    label's p(yes) in [0, 1]."""
    if len(probs.values):
        bad_entry = ~np.isfinite(probs.values) | (probs.values < 0)
        if set_rows is not None:
            bad_entry |= np.repeat(set_rows, np.diff(probs.offsets)) & (probs.values > 1)
        if bad_entry.any():
            row = int(np.searchsorted(probs.offsets, np.argmax(bad_entry), side="right") - 1)
            raise raw.fail(row, PROBS, f"holds a negative or non-finite probability "
                                       f"{probs.values[np.argmax(bad_entry)]}; expected non-negative values "
                                       f"summing to 1 (within {PROB_TOLERANCE}; on set rows each in [0, 1])")
    sums = probs.row_sums()
    bad = probs.valid & ~(np.abs(sums - 1.0) <= PROB_TOLERANCE)
    if set_rows is not None:
        bad &= ~set_rows
    row = _first(bad)
    if row is not None:
        raise raw.fail(row, PROBS, f"values sum to {sums[row]:.6g}; expected a probability distribution "
                                   f"(non-negative, summing to 1 within {PROB_TOLERANCE})")


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
        raise raw.fail(row, RANKING, f"empty ranking without an error; expected {_KIND_WANT['ranking']}, or a "
                                     f"non-empty '{ERROR}' for a failed query")
    return RerankTable(raw=raw, frame=df)
