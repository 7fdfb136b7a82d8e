"""Provenance saved with every output: git hash, Python/platform and package versions, and the record of a run
(resolved config, seed, creation time). Torch-free: the analysis reports use it too.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

PACKAGES = ("dxrag", "torch", "torchvision", "transformers", "peft", "open_clip_torch", "faiss-cpu", "numpy",
            "pandas", "safetensors")


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Python, platform and the installed version of each package (None when not installed). Torch-free."""
    found: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def provenance(config: dict[str, Any], seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"config": config, "seed": seed, "git": git_hash(), "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
