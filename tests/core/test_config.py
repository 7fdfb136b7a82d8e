"""The shipped configs keep their fusion: since the fusion temperature has its own setting
(`inference.fusion.temperature`), a config that sets `distill.tau_retriever` (which used to be the fusion
temperature too) must set the fusion temperature as well, or it would silently fuse at the default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dxrag.core.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


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
