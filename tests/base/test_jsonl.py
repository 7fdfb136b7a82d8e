"""core/base/jsonl.py: line numbers in every error, blank lines skipped, a torn last line dropped only when asked, the
caller's error class kept; and the JSONL table loader's pyarrow path agrees with its line-by-line pass."""

from __future__ import annotations

import json
import logging

import pytest

from dxrag.analysis import tables
from dxrag.core.base.jsonl import JsonlError, iter_jsonl, parse_line


def test_lines_blank_and_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(JsonlError, match=rf"^{path}:2: not valid JSON"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=rf"^{path}:2: expected a JSON object .* got list"):
        list(iter_jsonl(path))
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonlError, match=rf"^{path}:2: not valid UTF-8"):
        list(iter_jsonl(path))
    with pytest.raises(JsonlError, match="file not found"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


def test_torn_tail_and_error_class(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # a kill mid-write
    assert list(iter_jsonl(path, torn_tail=True)) == [(1, {"a": 1}), (2, {"a": 2})]
    with pytest.raises(JsonlError, match=":3: not valid JSON"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n{"a": 2}')  # complete JSON, but no newline: still a torn write for a log
    assert [o for _, o in iter_jsonl(path, torn_tail=True)] == [{"a": 1}]
    assert [o for _, o in iter_jsonl(path)] == [{"a": 1}, {"a": 2}]

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match=r"x.jsonl:7: not valid JSON"):
        parse_line(b"{oops", "x.jsonl", 7, error=MyError)
    assert parse_line(" \n", "x.jsonl", 1) is None


ROWS = [
    dict(system="rag", query_id="q1", rank=1, label="A", prediction="A", retrieval_score=1, probs={"A": 1}),
    dict(system="rag", query_id="q1", rank=2, label="A", prediction="B", retrieval_score=0.5,
         probs={"B": 0.75, "A": 0.25}),
    dict(system="rag", query_id="q2", rank=1, label="C", prediction="C", probs=None, item_id="x"),
    dict(system="rag", query_id="q2", rank=2, label="C", prediction="C", retrieval_score=0.1, probs={"C": 1}),
    dict(system="joint", query_id="q1", rank=1, label="A", prediction="Z", retrieval_score=0.2,
         probs={"Z": 0.5, "C": 0.5}),
]


def test_arrow_path_matches_line_pass(tmp_path, caplog):
    path = tmp_path / "ctx.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[2:]))
    spec, required = tables._SPECS["contexts"], tables.CONTEXT_REQUIRED
    wanted = tables._wanted(spec, required, (tables.RETRIEVAL_SCORE, tables.PROBS))
    fast = tables._read_jsonl_arrow(path, spec, required, wanted)
    slow = tables._read_jsonl_lines(path, spec, required, wanted)
    assert fast is not None and set(fast.columns) == set(slow.columns) == set(wanted)
    for name in wanted:
        a, b = fast.columns[name].to_pylist(), slow.columns[name].to_pylist()
        if name == tables.PROBS:  # the arrow path orders a row's entries by the struct's fields
            a, b = [sorted(x) if x is not None else None for x in a], [sorted(x) if x is not None else None for x in b]
        assert a == b, name
    assert [fast.locate(i) for i in range(5)] == [slow.locate(i) for i in range(5)] == [
        f"{path}:{n}" for n in (1, 2, 4, 5, 6)]
    with caplog.at_level(logging.INFO, logger="dxrag.analysis.tables"):
        table = tables.load_contexts(path)
    assert "declined" not in caplog.text
    assert table.answers == ["a", "b", "c", "z"]

    path.write_text('{"system": "s", "query_id": "q", "rank": 1, "label": "A", "prediction": "A", "probs": {}}\n')
    empty = tables._read_jsonl_arrow(path, spec, required, wanted)  # an empty object is a row, not a null
    assert empty.columns[tables.PROBS].to_pylist() == [[]]


@pytest.mark.parametrize("change, where", [
    ({"rank": 2.0}, "'rank'"),  # int64 column: pyarrow refuses, the line pass names it
    ({"query_id": 7}, "'query_id'"),
    ({"probs": {"A": True}}, "'probs'"),
    ({"probs": {"A": None}}, "'probs'"),  # a struct field of null type: the line pass rejects the null entry
])
def test_arrow_declines_line_pass_reports(tmp_path, change, where):
    path = tmp_path / "ctx.jsonl"
    rows = [dict(r) for r in ROWS]
    rows[3].update(change)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(tables.TableError, match=rf"{path}:4: field {where}"):
        tables.load_contexts(path)


def test_two_objects_on_a_line(tmp_path):
    path = tmp_path / "ctx.jsonl"
    path.write_text(json.dumps(ROWS[0]) + " " + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(tables.TableError, match=rf"{path}:1: not valid JSON \(Extra data"):
        tables.load_contexts(path)
