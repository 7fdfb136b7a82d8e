"""Shared fixtures: the embedded synthetic dataset (generated once per session) and the shared-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DXRAG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The embedded default dataset at its default size (seed 0)."""
    from dxrag.core.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "synth", seed=0)


@pytest.fixture(scope="session")
def small_synth_dir(tmp_path_factory) -> Path:
    """A small variant for fast end-to-end tests."""
    from dxrag.core.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth-small") / "synth", seed=1, n_patients=40, n_corpus=200,
                    n_train=120, n_val=40, n_test=60)
