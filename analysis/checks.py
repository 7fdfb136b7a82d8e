"""Value checks of a prediction table read by analysis/readers.py: nulls, empty ids, ranks, scores, probs that
are not distributions; errors name file, line/row and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.base.tables import ANSWER_TYPE, LABEL, PROBS
from ..core.base.answers import ANSWER_TYPES, SET

if TYPE_CHECKING:
    from .readers import RawTable

PROB_TOLERANCE = 1e-3

# Value types, the second half of a column spec (readers._SPECS): "id" non-empty string, "text" string (may be
# empty), "rank" integer >= 1, "score" finite number, "probs" map answer -> probability, "ranking" list of
# integers >= 1.
_VALUE_WANT = {
    "id": "a non-empty string",
    "text": "a string",
    "rank": "an integer >= 1",
    "score": "a finite number",
    "probs": "an object mapping answer strings to probabilities",
    "ranking": "a list of integers >= 1 (ranks, best first)",
}
# "id" columns whose empty string is valid on set rows (the empty label set): checked once the row types are known
_BLANK_ON_SET = (LABEL,)


def _first(mask: np.ndarray) -> int | None:
    return int(np.argmax(mask)) if mask.any() else None


def _check_values(raw: RawTable, spec: dict[str, str], required: Sequence[str]) -> None:
    """Nulls in required columns, empty ids, ranks < 1, non-finite scores, probs that are not distributions."""
    for name, col in raw.columns.items():
        vtype = spec[name]
        if name in required and col.null_count:
            row = _first(~pc.is_valid(col).to_numpy(zero_copy_only=False))
            raise raw.fail(row, name, f"missing value; expected {_VALUE_WANT[vtype]}")
        if vtype == "id" and name not in _BLANK_ON_SET:
            row = _first_blank(raw, name)
            if row is not None:
                raise raw.fail(row, name, f"empty string; expected {_VALUE_WANT[vtype]}")
        elif vtype == "rank":
            rank = col.to_numpy()
            row = _first(rank < 1)
            if row is not None:
                raise raw.fail(row, name, f"{int(rank[row])} is not a valid rank; expected {_VALUE_WANT[vtype]}")
        elif vtype == "score":
            values = col.to_numpy(zero_copy_only=False)
            row = _first(~np.isfinite(values) & pc.is_valid(col).to_numpy(zero_copy_only=False))
            if row is not None:
                raise raw.fail(row, name, f"{values[row]} is not {_VALUE_WANT[vtype]}")
        elif vtype == "probs":
            raw.probs = ProbsColumn.from_arrow(col)
            check_distributions(raw.probs, raw, _set_rows(raw))
        elif vtype == "ranking":
            flat = pc.list_flatten(col).to_numpy()
            if (flat < 1).any():
                lengths = pc.list_value_length(col).fill_null(0).to_numpy()
                owner = np.repeat(np.arange(len(lengths)), lengths)
                row = int(owner[np.argmax(flat < 1)])
                raise raw.fail(row, name, f"{col[row].as_py()} holds a rank < 1; expected {_VALUE_WANT[vtype]}")


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
        raise raw.fail(row, LABEL, f"empty string; expected {_VALUE_WANT['id']} (an empty gold label is the empty set, "
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
    types = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
    return pc.fill_null(pc.equal(types, SET), False).to_numpy(zero_copy_only=False)


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
