"""The scale benchmark runs end to end on a tiny table and reports the keys the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_analysis.py"


@pytest.mark.slow
def test_bench_small(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--queries", "300", "--k", "4", "--repeats", "1",
                    "--naive-queries", "100", "--shuffle", "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    for key in ("ratio_to_read", "speedup_vs_naive", "peak_mem_ratio", "read_parquet_s", "analysis_s"):
        assert result[key] > 0, key
    assert result["naive_matches_fast_path"] is True
    assert result["rows"] == 1200
