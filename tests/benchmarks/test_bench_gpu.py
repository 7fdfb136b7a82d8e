"""benchmarks/bench_gpu.py --smoke: the real-shape GPU benchmark's code runs end to end on CPU at toy shapes (every
model, every phase), so the script is ready when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "gpu-bench.md"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in rows] == ["qwen2-vl-2b", "qwen2-vl-7b", "pixtral-12b", "small"]
    for r in rows:
        assert "errors" not in r, r
        for key in ("generic_prompts_per_s", "generic_multilabel_over_closed", "finetune_steps_per_s"):
            assert r[key] > 0, (r["model"], key)
        assert r["lora_parameters_m"] > 0 and r["prompt_tokens"] > 0
    qwen = rows[0]
    assert qwen["fast_over_generic"] > 0 and qwen["fast_multilabel_over_closed"] > 0
    assert "fast_prompts_per_s" not in rows[2]  # LLaVA has no fast path
    table = out.read_text()
    assert table.startswith("# Reader at real shapes") and table.count("\n| ") == 1 + len(rows)
