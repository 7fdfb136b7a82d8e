"""Shared test settings: the small variant of the embedded config used by end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

# The offline copies of the real datasets used by tests: DXRAG_SHARED_DATA, else shared/data beside the checkout
SHARED_DATA = Path(os.environ.get("DXRAG_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_vqarad() -> Path:
    """The shared VQA-RAD folder (MEVF layout); skips the calling test when it is absent."""
    import pytest

    root = SHARED_DATA / "vqa-rad"
    if not (root / "trainset.json").is_file():
        pytest.skip(f"{root} not present (set DXRAG_SHARED_DATA to the folder of the offline datasets)")
    return root

# A small variant of configs/embedded.yaml: well under a minute on 2 cores instead of a few minutes.
SMALL = {
    "run": "small",
    "data.synth": {"n_patients": 30, "n_corpus": 240, "n_train": 120, "n_val": 30, "n_test": 40},
    "retriever.pretrain.epochs": 2,
    "reader.finetune.steps": 40,
    "reader.finetune.eval_every": 0,
    "distill.steps": 12,
    "distill.batch_size": 16,
    "distill.candidates": 8,
    "distill.refresh_every": 4,
    "distill.checkpoint_every": 4,
    "figures": False,
    "probe.mode": "off",  # the probe baseline (real weights) has its own tests: tests/core/test_probe.py
}


def _sets(overrides: dict) -> list[str]:
    """The overrides as `--set KEY=VALUE` command-line arguments."""
    import json

    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out




def real_weights(name: str) -> Path:
    """The installed directory of real pretrained weights `name` (dxrag.core.weights); skips the calling test when the
    cache lacks it."""
    import pytest

    from dxrag.core import weights

    try:
        return weights.path(name)
    except weights.WeightsError as e:
        pytest.skip(f"real weights {name!r} not installed (run `make weights`): {e}")
