"""core/config.py on the shipped configs: each loads without a warning, as written, and round-trips through its YAML
form; and the fusion temperature's own setting (`inference.fusion.temperature`): a config that sets
`distill.tau_retriever` (which used to be the fusion temperature too) without it is warned about, since it would fuse
at the default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dxrag.core.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_as_written(path, tmp_path, caplog):
    """A shipped config loads without a warning (nothing in it falls back to a default silently: e.g. a config that
    sets `distill.tau_retriever` without `inference.fusion.temperature` is warned about, see below), every value it
    sets is the loaded config's at the same key (`retriever.index: NAME` is the shorthand for `index.factory`), and
    the loaded config written back as YAML loads to the same config."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    loaded = cfg.to_dict()
    for keys, value in _leaves(data):
        got = loaded
        for key in keys:
            got = got[key]
        if keys == ("retriever", "index") and isinstance(value, str):
            got = got["factory"]
        assert got == value, (path.name, ".".join(keys), value, got)
    again = tmp_path / path.name
    again.write_text(yaml.safe_dump(loaded), encoding="utf-8")
    assert load_config(again).to_dict() == loaded


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

    root = Path(__file__).resolve().parents[2]
    recorded = json.loads((root / "docs/results/embedded-seeds.json").read_text(encoding="utf-8"))["config"]
    assert "loss" not in recorded["reader"]["finetune"]
    today = load_config(root / "configs/embedded.yaml").to_dict()
    seeded = {**today, "seed": recorded["seed"], "data": {**today["data"], "seed": recorded["data"]["seed"]}}
    assert swept_config(recorded) == swept_config(seeded)
    seeded["reader"]["finetune"]["loss"] = "candidates"
    assert swept_config(recorded) != swept_config(seeded)
    seeded["reader"]["finetune"]["loss"] = "answer"
    seeded["inference"]["prior_correction"] = True
    assert swept_config(recorded) != swept_config(seeded)


def test_prior_correction_needs_balanced_sampling(tmp_path):
    from dxrag.core.config import ConfigError

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="reader.finetune.balanced_sampling: true"):
        load_config(root / "configs/embedded.yaml", {"inference.prior_correction": True})
    cfg = load_config(root / "configs/embedded.yaml", {"inference.prior_correction": True,
                                                        "reader.finetune.balanced_sampling": True})
    assert cfg.inference.prior_correction
