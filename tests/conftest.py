"""Shared fixtures: the embedded synthetic dataset (generated once per session) and the shared-data location."""

from __future__ import annotations

import os
from pathlib import Path

from dxrag.core import cpu_kernels

# The CPU kernel level, before any test imports numpy or torch: the numbers tests compare are the same on every x86
# machine, and the subprocesses tests start (dxrag run, torchrun, notebooks) inherit it. DXRAG_CPU_KERNELS=native
# turns it off.
cpu_kernels.pin()

import pytest  # noqa: E402

from dxrag_test_support import SMALL  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The embedded default dataset at its default size (seed 0)."""
    from dxrag.core.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "synth", seed=0)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """One finished pipeline run of the small config: (base dir with trained/ and reports/, the run summary)."""
    from dxrag.core.config import load_config
    from dxrag.core.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "embedded.yaml", SMALL)
    summary = run_pipeline(cfg, base / "trained", base / "reports")
    return base, summary
