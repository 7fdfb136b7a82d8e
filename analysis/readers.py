"""Reading prediction tables (JSONL, CSV or Parquet by suffix) into typed arrow columns with per-value checks
whose errors name file, line/row and field.
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
from ..core.base.tables import (ANSWER_REQUIRED, ANSWER_TYPE, CONTEXT_REQUIRED, ERROR, HEAD, ITEM_ID, LABEL,
                                PREDICTION, PROBS, QUERY_ID, RANK, RANKING, RERANK_REQUIRED, RETRIEVAL_SCORE, SELECTOR,
                                SUFFIXES, SYSTEM, TableError, probs_type)
from .checks import _VALUE_WANT, ProbsColumn, _check_values, encode_strings

# the loaders' messages keep the logger name users and benchmarks configure (dxrag.analysis.tables)
log = logging.getLogger(__package__ + ".tables")

_SPECS: dict[str, dict[str, str]] = {
    "contexts": {SYSTEM: "id", QUERY_ID: "id", RANK: "rank", LABEL: "id", PREDICTION: "text", ITEM_ID: "text",
                 HEAD: "text", RETRIEVAL_SCORE: "score", PROBS: "probs", ANSWER_TYPE: "text"},
    "answers": {SYSTEM: "id", QUERY_ID: "id", PREDICTION: "text", LABEL: "id", PROBS: "probs", ANSWER_TYPE: "text"},
    "rerank": {SYSTEM: "id", QUERY_ID: "id", SELECTOR: "id", RANKING: "ranking", ERROR: "text"},
}
_REQUIRED = {"contexts": CONTEXT_REQUIRED, "answers": ANSWER_REQUIRED, "rerank": RERANK_REQUIRED}
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


def _bad(where: str, field: str, value: Any, vtype: str) -> TableError:
    shown = value if isinstance(value, str) else json.dumps(value, default=repr)
    return TableError(f"{where}: field '{field}': expected {_VALUE_WANT[vtype]}, got {type(value).__name__} "
                      f"{shown[:60]!r}")


def _check_probs_object(value: Any, where: str, field: str) -> list[tuple[str, float]]:
    if not isinstance(value, dict):
        raise _bad(where, field, value, "probs")
    out = []
    for key, p in value.items():
        if not isinstance(key, str) or isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TableError(f"{where}: field '{field}': entry {key!r}: {p!r} is not a number; expected "
                             f"{_VALUE_WANT['probs']}")
        out.append((key, float(p)))
    return out


def _convert_value(value: Any, vtype: str, where: str, field: str) -> Any:
    """Checks one JSON value against its value type; returns the arrow-ready value (None for null)."""
    if value is None:
        return None
    if vtype in ("id", "text"):
        if not isinstance(value, str):
            raise _bad(where, field, value, vtype)
        return value
    if vtype == "rank":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, field, value, vtype)
        return value
    if vtype == "score":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, field, value, vtype)
        return float(value)
    if vtype == "probs":
        return _check_probs_object(value, where, field)
    if vtype == "ranking":
        if not isinstance(value, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in value):
            raise _bad(where, field, value, vtype)
        return value
    raise AssertionError(vtype)


def _arrow_type(vtype: str) -> pa.DataType:
    return {"id": pa.string(), "text": pa.string(), "rank": pa.int64(), "score": pa.float64(),
            "probs": _PROBS_TYPE, "ranking": pa.list_(pa.int64())}[vtype]


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
    """The table via pyarrow.json, or None when a column is missing or has another type than its value type (the line
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
        col, vtype = table.column(name), spec[name]
        if name in required and col.null_count:
            return None
        if pa.types.is_null(col.type) or col.null_count == len(col):  # every row null or absent: as if not there
            continue
        if vtype == "probs":
            if not pa.types.is_struct(col.type) or col.type.num_fields > _MAX_PROBS_KEYS or not all(
                    pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in col.type):
                return None
            col = _probs_from_struct(col)
            if col is None:
                return None
        elif vtype == "ranking":
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
    for name, vtype in spec.items():
        if name not in df.columns:
            continue
        cells = df[name].to_numpy(dtype=object)
        if vtype in ("id", "text"):
            arr = pa.array(cells, type=pa.string())
        elif vtype == "rank":
            ok = df[name].str.fullmatch(_INT_RE).to_numpy(dtype=bool)
            if not ok.all():
                row = int(np.argmin(ok))
                raise TableError(f"{locate(row)}: field '{name}': expected {_VALUE_WANT[vtype]}, got {cells[row]!r}")
            arr = pa.array(pd.to_numeric(df[name].str.strip()).to_numpy(dtype=np.int64), type=pa.int64())
        elif vtype == "score":
            blank = (df[name].str.strip() == "").to_numpy(dtype=bool)
            nums = pd.to_numeric(df[name].where(~blank, "nan"), errors="coerce").to_numpy(dtype=float)
            bad = ~blank & ~np.isfinite(nums)
            if bad.any():
                row = int(np.argmax(bad))
                raise TableError(f"{locate(row)}: field '{name}': expected {_VALUE_WANT[vtype]}, got {cells[row]!r}")
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
                                     f"{_VALUE_WANT[vtype]} written as JSON") from None
                parsed.append(_convert_value(value, vtype, locate(row), name))
            arr = pa.array(parsed, type=_arrow_type(vtype))
        columns[name] = pa.chunked_array([arr])
    return RawTable(path, columns, len(df), locate)


def _parquet_type_ok(vtype: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if vtype in ("id", "text"):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if vtype == "rank":
        return pa.types.is_integer(t)
    if vtype == "score":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if vtype == "probs":
        return (pa.types.is_map(t) and _parquet_type_ok("id", t.key_type)
                and _parquet_type_ok("score", t.item_type)) or _parquet_type_ok("id", t)
    if vtype == "ranking":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    raise AssertionError(vtype)


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
        if not _parquet_type_ok(spec[name], t):
            raise TableError(f"{path}: field '{name}': column has type {t}; expected {_VALUE_WANT[spec[name]]}")
    read_dict = [c for c in dictionary if c in wanted and not pa.types.is_dictionary(schema.field(c).type)]
    table = pq.read_table(path, columns=wanted, read_dictionary=read_dict or None)
    if table.num_rows == 0:
        raise TableError(f"{path}: empty file: no rows")
    cols = {}
    for name in wanted:
        col, vtype = table.column(name), spec[name]
        if vtype == "probs" and not pa.types.is_map(col.type):
            col = _probs_from_json_strings(col, _Locator(path), name)
        elif vtype == "probs" and col.type != _PROBS_TYPE:
            col = col.cast(_PROBS_TYPE)
        elif vtype == "rank" and col.type != pa.int64():
            col = col.cast(pa.int64())
        elif vtype == "score" and col.type != pa.float64():
            col = col.cast(pa.float64())
        elif vtype == "ranking" and col.type != pa.list_(pa.int64()):
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
                             f"{_VALUE_WANT['probs']}") from None
        out.append(_check_probs_object(value, locate(row), name))
    return pa.chunked_array([pa.array(out, type=_PROBS_TYPE)])


def read_raw(path: str | os.PathLike, table: str, columns: Sequence[str] | None = None,
             dictionary: Sequence[str] = (), required: Sequence[str] | None = None) -> RawTable:
    """Reads a table file (format by suffix) with per-value type checks; `table` is contexts, answers or rerank.

    `columns` limits the optional columns read (Parquet reads only those); `dictionary` names string columns to
    read dictionary-encoded from Parquet (cheap integer codes for low-cardinality columns). `required`: the columns
    that must be there (default: the table's); `()` reads one more column of a table already validated, and from
    Parquet only that column.
    """
    path = Path(path)
    spec, required = _SPECS[table], (_REQUIRED[table] if required is None else tuple(required))
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
