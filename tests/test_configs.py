"""The shipped configs keep their fusion: since the fusion temperature has its own setting
(`inference.fusion.temperature`), a config that sets `distill.tau_retriever` (which used to be the fusion
temperature too) must set the fusion temperature as well, or it would silently fuse at the default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dxrag.core.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_config_that_sets_tau_retriever_sets_the_fusion_temperature(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "tau_retriever" in (data.get("distill") or {}):
        assert "temperature" in ((data.get("inference") or {}).get("fusion") or {}), path


def test_a_config_without_it_is_warned_about(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("distill: {tau_retriever: 0.2}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.inference.fusion.temperature == 0.1 and "inference.fusion.temperature" in caplog.text


def test_runs_recorded_before_the_finetune_objective_settings_match_todays_config():
    """docs/results/embedded-seeds.json was recorded before `reader.finetune.loss` / `balanced_sampling` existed:
    read in today's keys it is still the embedded config's sweep (so `--expect` keeps checking equality, and old run
    directories resume), while a config that changes either setting is not."""
    import json

    from dxrag.core.sweep import swept_config

    root = Path(__file__).resolve().parents[1]
    recorded = json.loads((root / "docs/results/embedded-seeds.json").read_text(encoding="utf-8"))["config"]
    assert "loss" not in recorded["reader"]["finetune"]
    today = load_config(root / "configs/embedded.yaml").to_dict()
    seeded = {**today, "seed": recorded["seed"], "data": {**today["data"], "seed": recorded["data"]["seed"]}}
    assert swept_config(recorded) == swept_config(seeded)
    seeded["reader"]["finetune"]["loss"] = "candidates"
    assert swept_config(recorded) != swept_config(seeded)
