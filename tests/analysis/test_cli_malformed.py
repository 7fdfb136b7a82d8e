"""Every malformed-input case: analyze-oracle exits 2, names file, line (or Parquet row) and field on stderr, and
writes nothing to --out."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dxrag.analysis.cli import main
from dxrag.analysis.tables import write_table

GOOD = [dict(system="rag", query_id="q1", rank=1, label="A", prediction="A"),
        dict(system="rag", query_id="q1", rank=2, label="A", prediction="B"),
        dict(system="rag", query_id="q2", rank=1, label="B", prediction="B"),
        dict(system="rag", query_id="q2", rank=2, label="B", prediction="B")]


def _jsonl(rows: list[dict], blank_first: bool = False) -> str:
    return ("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in rows)


def _with(i: int, **change) -> list[dict]:
    rows = [dict(r) for r in GOOD]
    rows[i].update(change)
    return rows


def _run(tmp_path: Path, contexts: Path, *extra: str, capsys) -> str:
    out = tmp_path / "out"
    code = main(["--contexts", str(contexts), "--out", str(out), "--no-figures", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return err


JSONL_CASES = {
    # name: (file text, expected fragments of the message)
    "missing field": (_jsonl([GOOD[0], {k: v for k, v in GOOD[1].items() if k != "rank"}]), [":2:", "'rank'",
                                                                                              "missing"]),
    "rank wrong type": (_jsonl(_with(2, rank="3")), [":3:", "'rank'", "integer"]),
    "rank float": (_jsonl(_with(1, rank=1.5)), [":2:", "'rank'"]),
    "query_id wrong type": (_jsonl(_with(0, query_id=7)), [":1:", "'query_id'", "string"]),
    "rank zero": (_jsonl(_with(3, rank=0)), [":4:", "'rank'", ">= 1"]),
    "duplicate rank": (_jsonl(_with(1, rank=1)), [":2:", "'rank'", "duplicate", ":1"]),
    "label differs": (_jsonl(_with(1, label="B")), [":2:", "'label'", "differs", ":1"]),
    "probs sum": (_jsonl(_with(2, probs={"A": 0.5, "B": 0.4})), [":3:", "'probs'", "sum to 0.9"]),
    "probs negative": (_jsonl(_with(0, probs={"A": 1.5, "B": -0.5})), [":1:", "'probs'", "negative"]),
    "probs not object": (_jsonl(_with(0, probs=[0.5, 0.5])), [":1:", "'probs'", "object"]),
    "probs value text": (_jsonl(_with(0, probs={"A": "1"})), [":1:", "'probs'", "not a number"]),
    "empty system": (_jsonl(_with(1, system=" ")), [":2:", "'system'", "empty"]),
    "not json": ('{"system": "rag",\n', [":1:", "not valid JSON"]),
    "empty file": ("", ["empty file"]),
    "blank lines count": (_jsonl(_with(0, rank=-1), blank_first=True), [":2:", "'rank'"]),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_cases(case, tmp_path, capsys):
    text, fragments = JSONL_CASES[case]
    path = tmp_path / "ctx.jsonl"
    path.write_text(text)
    err = _run(tmp_path, path, capsys=capsys)
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, (case, err)


def test_short_queries_policy(tmp_path, capsys):
    path = tmp_path / "ctx.jsonl"
    path.write_text(_jsonl(GOOD[:3]))  # q2 has rank 1 only
    err = _run(tmp_path, path, capsys=capsys)
    assert f"{path}:3:" in err and "'q2'" in err and "fewer than k=2" in err and "--short" in err
    assert main(["--contexts", str(path), "--out", str(tmp_path / "drop"), "--no-figures", "--short", "drop"]) == 0
    s = pd.read_csv(tmp_path / "drop" / "summary.csv")
    assert (s.loc[0, "n_queries"], s.loc[0, "n_short"], s.loc[0, "short_policy"]) == (1, 1, "drop")
    assert main(["--contexts", str(path), "--out", str(tmp_path / "keep"), "--no-figures", "--short", "keep"]) == 0
    s = pd.read_csv(tmp_path / "keep" / "summary.csv")
    assert (s.loc[0, "n_queries"], s.loc[0, "n_short"], s.loc[0, "top1_acc"]) == (2, 1, 1.0)
    assert main(["--contexts", str(path), "--out", str(tmp_path / "k1"), "--no-figures", "--k", "1"]) == 0


def test_csv_cases_name_editor_lines(tmp_path, capsys):
    path = tmp_path / "ctx.csv"
    path.write_text("system,query_id,label,prediction\nrag,q1,A,A\n")
    err = _run(tmp_path, path, capsys=capsys)
    assert f"{path}:1:" in err and "'rank'" in err and "missing required column" in err
    # a quoted prediction spanning two lines shifts the line of every later row
    path.write_text('system,query_id,rank,label,prediction\nrag,q1,1,A,"A\nlong"\nrag,q1,two,A,B\n')
    err = _run(tmp_path, path, capsys=capsys)
    assert f"{path}:4:" in err and "'rank'" in err and "'two'" in err
    path.write_text("system,query_id,rank,label,prediction,probs\nrag,q1,1,A,A,{oops}\n")
    err = _run(tmp_path, path, capsys=capsys)
    assert f"{path}:2:" in err and "'probs'" in err and "JSON" in err
    path.write_text("system,query_id,rank,label,prediction,retrieval_score\nrag,q1,1,A,A,high\n")
    err = _run(tmp_path, path, capsys=capsys)
    assert f"{path}:2:" in err and "'retrieval_score'" in err
    path.write_text("system,query_id,rank,label,prediction\n")
    assert "empty file" in _run(tmp_path, path, capsys=capsys)


def test_parquet_cases_name_rows(tmp_path, capsys):
    path = tmp_path / "ctx.parquet"
    df = pd.DataFrame(GOOD)
    pq.write_table(pa.Table.from_pandas(df.assign(rank=df["rank"].astype(str)), preserve_index=False), path)
    err = _run(tmp_path, path, capsys=capsys)
    assert str(path) in err and "'rank'" in err and "type" in err
    pq.write_table(pa.Table.from_pandas(df.drop(columns="label"), preserve_index=False), path)
    assert "'label'" in _run(tmp_path, path, capsys=capsys)
    write_table(pd.DataFrame(_with(3, label="A")), path)
    err = _run(tmp_path, path, capsys=capsys)
    assert "row 3" in err and "'label'" in err and "row 2" in err
    write_table(pd.DataFrame(_with(2, probs={"A": 0.2})).assign(
        probs=lambda d: [p if isinstance(p, dict) else None for p in d["probs"]]), path)
    err = _run(tmp_path, path, capsys=capsys)
    assert "row 2" in err and "'probs'" in err
    write_table(pd.DataFrame(_with(1, system=" ")), path)  # read dictionary-encoded: checked via its values
    err = _run(tmp_path, path, capsys=capsys)
    assert "row 1" in err and "'system'" in err and "empty" in err
    pq.write_table(pa.Table.from_pandas(df.iloc[:0], preserve_index=False), path)
    assert "empty file" in _run(tmp_path, path, capsys=capsys)
    path.write_bytes(b"")
    assert "empty file" in _run(tmp_path, path, capsys=capsys)


def test_other_inputs(tmp_path, capsys):
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text(_jsonl(GOOD))
    assert "not in" in _run(tmp_path, ctx, "--reference", "nope", capsys=capsys)
    bad = tmp_path / "ctx.txt"
    bad.write_text("x")
    assert "unsupported file type" in _run(tmp_path, bad, capsys=capsys)
    assert "file not found" in _run(tmp_path, tmp_path / "missing.csv", capsys=capsys)
    answers = tmp_path / "answers.csv"
    answers.write_text("system,query_id,prediction,label\nclosed,q1,A,A\nclosed,q2,A,C\n")
    err = _run(tmp_path, ctx, "--answers", str(answers), capsys=capsys)
    assert f"{answers}:3:" in err and "'label'" in err
    answers.write_text("system,query_id,prediction,label\nclosed,q1,A,A\nclosed,q1,B,A\n")
    err = _run(tmp_path, ctx, "--answers", str(answers), capsys=capsys)
    assert f"{answers}:3:" in err and "duplicate" in err
    rerank = tmp_path / "rerank.jsonl"
    rerank.write_text(json.dumps(dict(system="other", query_id="q1", selector="lvlm:x", ranking=[1])) + "\n")
    err = _run(tmp_path, ctx, "--rerank", str(rerank), capsys=capsys)
    assert f"{rerank}:1:" in err and "'system'" in err
    rerank.write_text(json.dumps(dict(system="rag", query_id="q1", selector="lvlm:x", ranking=[0, 1])) + "\n")
    err = _run(tmp_path, ctx, "--rerank", str(rerank), capsys=capsys)
    assert f"{rerank}:1:" in err and "'ranking'" in err
    rerank.write_text(json.dumps(dict(system="rag", query_id="q9", selector="lvlm:x", ranking=[1])) + "\n")
    err = _run(tmp_path, ctx, "--rerank", str(rerank), capsys=capsys)
    assert f"{rerank}:1:" in err and "'query_id'" in err
    assert "--k 0" in _run(tmp_path, ctx, "--k", "0", capsys=capsys)


def test_help_and_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text(_jsonl(GOOD))
    assert "--n-boot" in _run(tmp_path, ctx, "--interval", "bootstrap", "--n-boot", "0", capsys=capsys)


def test_lvlm_without_openai_names_the_extra(monkeypatch):
    import sys

    from dxrag.analysis import lvlm

    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` raise ImportError
    with pytest.raises(SystemExit, match=r"pip install 'dxrag\[api\]'"):
        lvlm.main(["--contexts", "x.jsonl", "--dataset", "d", "--model", "m", "--out", "r.jsonl"])
