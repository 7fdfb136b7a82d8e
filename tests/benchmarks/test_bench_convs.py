"""benchmarks/bench_convs.py runs end to end at small sizes: the tower table (swapped features equal to NNPACK-off's,
depthwise layers bitwise equal to Slow2d) and the single-layer table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_convs.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
def test_bench_convs_tower_and_layers(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "tower.json"
    run = subprocess.run([sys.executable, str(BENCH), "--sizes", "64", "--batches", "1", "16", "--reps", "1",
                          "--random-weights", "--check-depthwise", "--json", str(out)],
                         capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["swapped"] == {"dense": 33, "depthwise": 16, "left": 0}
    assert [(r["size"], r["batch"]) for r in report["rows"]] == [(64, 1), (64, 16)]
    for row in report["rows"]:  # at 64 px no depthwise output is a single pixel (fast_convs' docstring)
        assert row["diff_vs_nonnpack"] == 0.0 and row["diff_vs_pinned"] <= 1e-5 * row["max_abs_feature"]
        assert set(row["seconds"]) == {"pinned", "pinned-nonnpack", "swapped", "onednn"}
    assert len(report["depthwise_check"]) == 16
    assert all(c["max_abs_diff"] == 0.0 for c in report["depthwise_check"])
    assert "| pw 1x1 |" in run.stdout and "| total |" in run.stdout
    out = tmp_path / "layers.json"
    run = subprocess.run([sys.executable, str(BENCH), "--layers", "--sizes", "64", "--batches", "2", "--reps", "1",
                          "--random-weights", "--json", str(out)], capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    layers = json.loads(out.read_text())["64"]["2"]
    dw, pw = layers["depthwise"], layers["pointwise 1x1"]
    assert sum(r["count"] for r in dw["rows"]) == 16 and sum(r["count"] for r in pw["rows"]) == 32
    for row in dw["rows"] + pw["rows"]:
        assert row["diff"]["slow2d"] == 0.0 and max(row["diff"].values()) < 1e-4
    assert dw["max_diff"]["onednn"] == 0.0  # bitwise, as in fast_convs
    assert all(t > 0 for t in dw["sum_ms"].values()) and all(t > 0 for t in pw["sum_ms"].values())
