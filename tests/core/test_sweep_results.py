"""The committed sweep behind README's embedded figures (docs/results/embedded-seeds.*): it belongs to today's
configs/embedded.yaml, and its files agree with each other, with the code that writes them and with what README
quotes: seeds.md is the sweep's summary of seeds.csv and selectors.csv, ranges.json's ranges and rows are seeds.csv's,
and README's tables are the seeds' mean ± s.e. and ranges."""

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


def test_seeds_md_is_what_the_sweep_writes_from_the_committed_tables(sweep):
    """seeds.md is the sweep's summary of seeds.csv and selectors.csv: regenerated from the committed tables by the
    sweep's own writer it is the committed file, character for character (a changed table, a hand edit or a change
    of the writer shows here)."""
    from dxrag.core.sweep import seeds_markdown

    ranges, table = sweep
    selectors = pd.read_csv(RESULTS / "embedded-selectors.csv")
    assert sorted(selectors["seed"].unique()) == sorted(ranges["seeds"])
    text = seeds_markdown(ranges["config"]["run"], table, selectors, ranges["vary_data"])
    assert text == (RESULTS / "embedded-seeds.md").read_text(encoding="utf-8")


def _mean_se(values) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (var / len(values)) ** 0.5


def test_readme_quotes_the_committed_sweep(sweep):
    """The numbers README's "Embedded default" section quotes are the committed table's (mean ± s.e. and the range
    over the seeds), and so are its claims that the closed-book reader answers every grade on every seed and is
    weaker on rag-inconsistent queries."""
    ranges, table = sweep
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    r = ranges["ranges"]

    def interval(col: str) -> str:
        return f"[{r[col]['min']:.3f}, {r[col]['max']:.3f}]"

    for system, col in (("closed-book", "closed_book_acc"), ("rag", "rag_acc"), ("joint", "joint_acc")):
        mean, se = _mean_se(table[col])
        assert (mean, se) == pytest.approx((r[col]["mean"], r[col]["se"]))
        assert f"| {system} | {mean:.3f} ± {se:.3f} | {interval(col)} |" in readme, system
    for subset, col in (("on rag-consistent queries", "closed_book_acc_consistent"),
                        ("on rag-inconsistent queries", "closed_book_acc_inconsistent"),
                        ("macro-F1", "closed_book_macro_f1")):
        assert f"| {subset} | {table[col].mean():.3f} | {interval(col)} |" in readme, subset
    assert table["closed_book_acc_consistent"].mean() > table["closed_book_acc_inconsistent"].mean()
    rate, oracle = table["rag_inconsistent_rate"], table["rag_oracle"]
    assert (f"disagree on {rate.min():.2f}–{rate.max():.2f} of the queries (mean {rate.mean():.2f}), and rag "
            f"oracle@4 is {oracle.min():.2f}–{oracle.max():.2f}") in " ".join(readme.split())
    if "answers all five grades on every seed" in readme:
        assert (table["closed_book_distinct"] == len(GRADES)).all(), table[["seed", "closed_book_distinct"]]
    fused, se = _mean_se(table["delta_fused"])
    positive = int((table["delta_fused"] > 0).sum())
    quoted = f"{fused:+.3f} ± {se:.3f} (positive on {positive} of {len(table)} seeds)".replace("-", "−")
    assert f"| fused answer | {quoted} |" in readme
    assert (f"{table['only_joint'].sum()} queries only joint gets right, {table['only_rag'].sum()} only rag"
            in " ".join(readme.split()))


def test_ranges_summarise_the_table(sweep):
    from dxrag.core.sweep import seed_ranges

    ranges, table = sweep
    assert ranges["ranges"] == seed_ranges(table)  # min, max, mean, s.e. per column, recomputed by the sweep's code
    for col, r in ranges["ranges"].items():
        assert r["min"] == table[col].min() and r["max"] == table[col].max()
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
