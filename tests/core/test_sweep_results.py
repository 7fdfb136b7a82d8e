"""The committed sweep behind README's embedded figures: it belongs to today's configs/embedded.yaml, and on every seed
the closed-book reader answers more than one class, beats chance on macro-F1 and is weaker on rag-inconsistent
queries than on consistent ones (the latent difficulty the generator gives its exams)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dxrag.core.config import load_config
from dxrag.core.sweep import swept_config
from dxrag.core.data.synth import GRADES

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


@pytest.fixture(scope="module")
def sweep():
    ranges = json.loads((RESULTS / "embedded-seeds.json").read_text(encoding="utf-8"))
    table = pd.read_csv(RESULTS / "embedded-seeds.csv")
    return ranges, table


def test_committed_sweep_is_of_the_current_embedded_config(sweep):
    ranges, table = sweep
    current = load_config(ROOT / "configs" / "embedded.yaml").to_dict()
    swept, current = swept_config(ranges["config"]), swept_config(current)
    assert swept == current, ("configs/embedded.yaml (or a default it relies on) changed after the sweep in "
                              "docs/results was run: rerun `dxrag sweep --config configs/embedded.yaml --seeds 0 1 2 3 "
                              "4` and copy its ranges.json and seeds.csv there")
    assert sorted(table["seed"]) == sorted(ranges["seeds"]) and len(table) >= 5


def test_closed_book_reader_never_collapses(sweep):
    _, table = sweep
    assert (table["closed_book_distinct"] >= 2).all(), table[["seed", "closed_book_distinct"]]
    assert (table["closed_book_macro_f1"] > 1 / len(GRADES)).all(), table[["seed", "closed_book_macro_f1"]]


def test_closed_book_is_weaker_on_inconsistent_queries(sweep):
    _, table = sweep
    gap = table["closed_book_acc_consistent"] - table["closed_book_acc_inconsistent"]
    assert (gap > 0).all(), table[["seed", "closed_book_acc_consistent", "closed_book_acc_inconsistent"]]


def test_ranges_summarise_the_table(sweep):
    ranges, table = sweep
    for col, r in ranges["ranges"].items():
        assert r["min"] == pytest.approx(table[col].min()) and r["max"] == pytest.approx(table[col].max())
        assert r["min"] <= r["mean"] <= r["max"]


def test_rows_are_the_table(sweep):
    """`dxrag run --expect` compares a run with `rows` of the JSON: value for value the committed CSV's rows."""
    import csv

    ranges, _ = sweep
    with open(RESULTS / "embedded-seeds.csv", encoding="utf-8") as f:
        text_rows = list(csv.DictReader(f))
    assert len(ranges["rows"]) == len(text_rows)
    for row, text in zip(ranges["rows"], text_rows):
        assert row == {k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in text.items()}


def test_expect_checks_equality_with_its_seeds_row(sweep):
    from dxrag.core.sweep import check_equal

    ranges, _ = sweep
    row = dict(ranges["rows"][0])
    config = ranges["config"]
    lines, differ = check_equal(row, config, ranges)
    assert differ == 0 and all(line.endswith("equal") for line in lines)
    row["closed_book_macro_f1"] = float(__import__("numpy").nextafter(row["closed_book_macro_f1"], 1))  # last bit
    lines, differ = check_equal(row, config, ranges)
    assert differ == 1 and any("closed_book_macro_f1" in line and "DIFFERS" in line for line in lines)
    seed1 = {**ranges["rows"][1]}
    lines, differ = check_equal(seed1, {**config, "seed": 1, "data": {**config["data"], "seed": 1}}, ranges)
    assert differ == 0
    lines, differ = check_equal(seed1, {**config, "seed": 1, "distill": {**config["distill"], "steps": 1}}, ranges)
    assert differ is None and "not the sweep's" in lines[0]
