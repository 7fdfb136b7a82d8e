"""`dxrag sweep`: one run per seed and the joint-vs-rag robustness summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dxrag_test_support import SMALL

REPO = Path(__file__).resolve().parents[2]


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
    selectors = pd.read_csv(tmp_path / "reports" / "small-seeds" / "selectors.csv")
    per_seed = pd.read_csv(tmp_path / "reports" / "small-seed1" / "selectors.csv")
    pd.testing.assert_frame_equal(selectors[selectors["seed"] == 1].drop(columns="seed").reset_index(drop=True),
                                  per_seed)
    oracle = selectors[(selectors["system"] == "rag") & (selectors["selector"] == "oracle")]["acc"]
    assert f"| rag | oracle | {oracle.mean():.3f} ± " in out
    ranges = json.loads((tmp_path / "reports" / "small-seeds" / "ranges.json").read_text())
    assert ranges["seeds"] == [0, 1] and ranges["config"]["run"] == "small"
    for col in ("rag_acc", "joint_acc", "closed_book_macro_f1"):
        assert ranges["ranges"][col]["min"] == pytest.approx(frame[col].min())
        assert ranges["ranges"][col]["max"] == pytest.approx(frame[col].max())

    # a run is checked against the ranges: seed 0 lies inside (it is one of the seeds), a shifted range is outside
    from dxrag.core.cli import expectation_report

    text, reproduced = expectation_report(tmp_path / "trained" / "small-seed0",
                                          tmp_path / "reports" / "small-seeds" / "ranges.json")
    assert reproduced and "every number lies inside" in text and "every number equals the committed seed-0" in text
    ranges["ranges"]["rag_acc"] = {"min": 2.0, "max": 3.0, "mean": 2.5, "se": 0.1}
    ranges["rows"][0]["rag_acc"] += 1e-12  # a difference in the last digits is a difference
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(ranges))
    text, reproduced = expectation_report(tmp_path / "trained" / "small-seed0", shifted)
    assert "1 number(s) outside" in text and "rag_acc" in text and "OUTSIDE" in text
    assert not reproduced and "1 number(s) differ from the committed seed-0 row" in text and "DIFFERS" in text
    # compare-sweeps: a sweep against itself differs nowhere; unpaired run lists are refused
    runs = [str(tmp_path / "trained" / f"small-seed{seed}") for seed in (0, 1)]
    assert main(["compare-sweeps", "--a", *runs, "--b", *runs]) == 0
    out = capsys.readouterr().out
    assert "| small-seed0 | small-seed0 | +0.000 |" in out and "0 queries only b right, 0 only a right" in out
    assert main(["compare-sweeps", "--a", *runs, "--b", runs[0]]) == 2
    assert "give one per seed to each" in capsys.readouterr().err
