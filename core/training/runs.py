"""Run directories: stage markers for `--resume` and training checkpoints (safetensors for weights,
torch.load(weights_only=True) for optimizer state). Provenance lives in `dxrag.core.base.provenance`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..base.fsutil import atomic_dir, atomic_write_json


class RunDir:
    """A run's directory: `stage_done(name)` / `mark_done(name, info)` let `--resume` skip finished stages."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def _marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def stage_done(self, stage: str) -> bool:
        return self._marker(stage).is_file()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self._marker(stage), {"stage": stage, "finished": time.time(), **(info or {})})


ARRAYS_FILE = "arrays.npz"


def save_checkpoint(path: Path, tensors: dict, optimizer_state: dict | None, state: dict[str, Any],
                    arrays: dict[str, Any] | None = None) -> None:
    """One training checkpoint directory, written atomically: weights.safetensors, optimizer.pt, state.json, and
    `arrays` (numpy arrays of numbers or strings, no objects) as arrays.npz: everything of a step or nothing."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    with atomic_dir(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if arrays:
            with open(tmp / ARRAYS_FILE, "wb") as f:
                np.savez(f, **arrays)
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def load_arrays(path: Path) -> dict[str, Any] | None:
    """The arrays saved with a checkpoint (read without pickle), or None when it has none."""
    import numpy as np

    file = Path(path) / ARRAYS_FILE
    if not file.is_file():
        return None
    with np.load(file, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_checkpoint(path: Path) -> tuple[dict, dict | None, dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "weights.safetensors"))
    opt = path / "optimizer.pt"
    optimizer_state = torch.load(opt, weights_only=True) if opt.exists() else None
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return tensors, optimizer_state, state
