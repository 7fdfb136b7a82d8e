"""`dxrag sweep`: one run per seed and the joint-vs-rag robustness summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dxrag_test_support import SMALL

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_over_two_seeds(tmp_path, capsys, monkeypatch):
    import pandas as pd

    from dxrag.core.cli import main

    monkeypatch.chdir(tmp_path)
    sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert main(["sweep", "--config", str(REPO / "configs" / "embedded.yaml"), "--seeds", "0", "1", *sets]) == 0
    out = capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "reports" / "small-seeds" / "seeds.csv")
    assert list(frame["seed"]) == [0, 1]
    for seed in (0, 1):
        answers = [json.loads(line) for line in
                   (tmp_path / "trained" / f"small-seed{seed}" / "predictions" / "answers.jsonl").read_text().splitlines()]
        acc = {s: sum(a["label"] == a["prediction"] for a in answers if a["system"] == s) / 40
               for s in ("rag", "joint")}
        row = frame.set_index("seed").loc[seed]
        assert row["rag_acc"] == pytest.approx(acc["rag"]) and row["joint_acc"] == pytest.approx(acc["joint"])
        assert row["delta_fused"] == pytest.approx(acc["joint"] - acc["rag"])
    run0 = json.loads((tmp_path / "trained" / "small-seed0" / "run.json").read_text())["config"]
    run1 = json.loads((tmp_path / "trained" / "small-seed1" / "run.json").read_text())["config"]
    assert (run0["seed"], run0["data"]["seed"], run1["seed"], run1["data"]["seed"]) == (0, 0, 1, 1)
    pooled = int(frame["only_joint"].sum()), int(frame["only_rag"].sum())
    assert f"{pooled[0]} only joint right, {pooled[1]} only rag right" in out
    assert (tmp_path / "reports" / "small-seeds" / "seeds.md").read_text().startswith("# small: joint vs rag over 2")
