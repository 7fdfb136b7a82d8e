"""The scale benchmark runs end to end on tiny tables, Parquet and JSONL, and reports the keys the issues ask for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_analysis.py"


def _bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--k", "4", "--repeats", "1", "--naive-queries", "100", "--shuffle",
                    "--json", str(out), *extra], check=True, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_small(tmp_path):
    result = _bench(tmp_path, "--queries", "300")
    for key in ("ratio_to_read", "speedup_vs_naive", "peak_mem_ratio", "read_parquet_s", "analysis_s"):
        assert result[key] > 0, key
    assert result["naive_matches_fast_path"] is True
    assert result["rows"] == 1200 and result["format"] == "parquet"


@pytest.mark.slow
def test_bench_jsonl_small(tmp_path):
    result = _bench(tmp_path, "--jsonl", "--probs", "--rows", "1200")
    for key in ("ratio_to_pyarrow_read", "ratio_to_pyarrow_read_with_write", "read_json_pyarrow_s", "analysis_s"):
        assert result[key] > 0, key
    assert result["naive_matches_fast_path"] is True
    assert result["line_by_line_fallback"] is False  # the loader stayed on pyarrow's reader
    assert result["rows"] == 1200 and result["format"] == "jsonl" and "fusion" in result["selectors"]
