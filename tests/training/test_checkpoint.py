"""The one training checkpoint format (core/training/checkpoint.py): what is saved comes back, a checkpoint written
with other settings is refused naming the keys, the reader's older format is refused with what to do, and a
distillation checkpoint written before checkpoints recorded their settings is still read."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.training.checkpoint import (CheckpointError, has_checkpoint, load_checkpoint,  # noqa: E402
                                            save_checkpoint)


def test_a_checkpoint_round_trips_and_checks_its_settings(tmp_path):
    ckpt = tmp_path / "ck"
    assert not has_checkpoint(ckpt) and not has_checkpoint(None)
    settings = {"lr": 0.1, "heads": ("text", "image"), "seed": 0}
    save_checkpoint(ckpt, {"w": torch.arange(3.0)}, {"state": {}, "param_groups": []}, {"step": 4, "history": [1.5]},
                    settings, arrays={"order": np.array([2, 0, 1]), "names": np.array(["a", "b"])})
    assert has_checkpoint(ckpt)
    got = load_checkpoint(ckpt, settings)  # a tuple in the settings compares equal to the list JSON gives back
    assert torch.equal(got.tensors["w"], torch.arange(3.0)) and got.optimizer == {"state": {}, "param_groups": []}
    assert got.state["step"] == 4 and got.state["history"] == [1.5]
    assert got.arrays["order"].tolist() == [2, 0, 1] and got.arrays["names"].tolist() == ["a", "b"]
    with pytest.raises(CheckpointError, match=r"state.json: written by a run with settings .* \(at lr, seed\)"):
        load_checkpoint(ckpt, {**settings, "lr": 0.2, "seed": 1})


def test_the_readers_older_format_is_refused_and_older_distillation_checkpoints_are_read(tmp_path, caplog):
    old = tmp_path / "reader"
    old.mkdir()
    (old / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"state.pt: a reader checkpoint in the format .* delete"):
        has_checkpoint(old)
    ckpt = tmp_path / "distill"
    save_checkpoint(ckpt, {"w": torch.zeros(1)}, None, {"step": 2}, {"lr": 0.1})
    state = json.loads((ckpt / "state.json").read_text())
    del state["settings"]  # as written before checkpoints recorded their settings
    (ckpt / "state.json").write_text(json.dumps(state))
    assert load_checkpoint(ckpt, {"lr": 0.5}).state["step"] == 2
    assert "records no settings" in caplog.text
