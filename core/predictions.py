"""Per-context prediction logs: append-only JSONL written as predictions are produced, so an interrupted run (or one
process of a torchrun group) resumes where it stopped, and the merged tables the analysis reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from . import distributed
from .base.jsonl import iter_jsonl
from .base.records import Answer, ContextPrediction

CONTEXTS_FILE = "contexts.jsonl"
ANSWERS_FILE = "answers.jsonl"


class PredictionLog:
    """Append-only JSONL of prediction rows, written as they are produced; a rerun skips finished queries.

    Each process writes its own `log-<rank>.jsonl` in `directory`; finished queries are read from every log there, so
    a rerun continues whatever the number of processes. A row is a JSON object with `kind` ("context" or "answer")
    and the record's fields; the answer row is written last and marks the query finished. A torn last line (the
    process was killed mid-write) is dropped."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"log-{distributed.rank()}.jsonl"
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self.done = {(r["system"], r["query_id"]) for r in read_logs(directory) if r["kind"] == "answer"}
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, contexts: Iterable[ContextPrediction], answer: Answer) -> None:
        """One query of one system: its context rows, then the answer row that marks it finished."""
        lines = [json.dumps({"kind": "context", **c.to_json()}) for c in contexts]
        lines.append(json.dumps({"kind": "answer", **answer.to_json()}))
        self._f.write("\n".join(lines) + "\n")
        self._f.flush()
        self.done.add((answer.system, answer.query_id))

    def close(self) -> None:
        self._f.close()


def read_logs(directory: Path) -> list[dict]:
    """Every complete row of every process's prediction log in `directory`, for queries whose answer row exists."""
    rows = [obj for path in sorted(directory.glob("log-*.jsonl")) for _, obj in iter_jsonl(path, torn_tail=True)]
    finished = {(r["system"], r["query_id"]) for r in rows if r["kind"] == "answer"}
    return [r for r in rows if (r["system"], r["query_id"]) in finished]


def write_tables(rows: list[dict], out: Path, prefix: str = "") -> tuple[Path, Path]:
    """The context and answer tables (`<prefix>contexts.jsonl`, `<prefix>answers.jsonl` in `out`), sorted by system,
    query and rank, through the tables' writer (base/tables.py)."""
    import pandas as pd

    from .base.tables import write_table

    ctx = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "context"]
    ans = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "answer"]
    contexts = pd.DataFrame(ctx).sort_values(["system", "query_id", "rank"], kind="stable")
    answers = pd.DataFrame(ans).sort_values(["system", "query_id"], kind="stable")
    paths = out / f"{prefix}{CONTEXTS_FILE}", out / f"{prefix}{ANSWERS_FILE}"
    write_table(contexts, paths[0])
    write_table(answers, paths[1])
    return paths
